"""``charforge pipeline --train-on runpod-serverless:ID``: the dataset and caption stages on the pipeline's
ComfyUI (a stand-in that writes what the nodes write), the LoRA trained on the fake serverless endpoint whose
worker behaves like worker-comfyui (images only, a disk of its own): the captioned dataset goes up through a real
S3-compatible server on loopback (moto) and the worker fetches it; the LoRA and run folder come back the same way,
into out/lora and the pipeline ComfyUI's loras folder; a rerun sends no job again; no credential in any output."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.charforge_routes import sample_photos
from fakes.comfy_server import FakeComfyServer
from fakes.moto_s3 import ACCESS_KEY, SECRET_KEY
from fakes.pipeline_stand_ins import DatasetStages, pipeline_argv, use_stand_ins
from fakes.runpod_api import FakeRunPod
from fakes.serverless_worker import serverless_endpoint
from fakes.train_lora import add_fetch_node, add_store_node, add_train_node, lora_bytes

from cf_testing.cli import run_charforge as cli
from charforge.recipes import pipeline

pytest.importorskip("boto3")
pytest.importorskip("moto")


@pytest.fixture
def endpoint(
    comfy_env, monkeypatch, tmp_path, s3_endpoint
) -> Iterator[tuple[FakeRunPod, FakeComfyServer, str]]:
    from charforge import bridge

    bridge.register_model_folders()
    nodes = (add_train_node, add_store_node, add_fetch_node)
    with serverless_endpoint(monkeypatch, tmp_path, s3_endpoint, comfy_env.base_dir, *nodes) as found:
        monkeypatch.setenv("CHARFORGE_SERVERLESS_RESULTS", f"s3://{found[2]}/results")
        yield found


def _pipeline(photos: Path, out: Path, url: str) -> tuple[int, str, str]:
    return cli(*pipeline_argv(photos, out, url, "--train-on", "runpod-serverless:ep1"))


def test_the_pipeline_trains_on_a_serverless_endpoint_and_the_lora_comes_home(
    endpoint, tmp_path, monkeypatch
):
    runpod, worker, bucket = endpoint
    photos, out, base = sample_photos(tmp_path), tmp_path / "out", tmp_path / "base"
    with FakeComfyServer() as main_server:
        stages = DatasetStages(main_server.output_dir)
        use_stand_ins(monkeypatch, stages, pipeline.Server(main_server.url, base_dir=base))
        code, stdout, stderr = _pipeline(photos, out, main_server.url)
        assert code == 0, stderr
        assert len(runpod.run_bodies) == 1
        graph = runpod.run_bodies[0]["input"]["workflow"]
        assert {n["class_type"] for n in graph.values()} - {"PreviewImage"} == {
            "CharForgeTrainLoRA",
            "CharForgeFetchFromStorage",
            "CharForgeSendTrainingToStorage",
        }
        state = json.loads((out / pipeline.STATE_FILE).read_text())
        lora = state["stages"]["lora"]
        name = Path(lora["lora_path"]).name
        trained = name.removesuffix(".safetensors")
        home = Path(lora["lora_path"])
        assert home.read_bytes() == lora_bytes(trained)
        assert lora["lora_sha256"] == hashlib.sha256(lora_bytes(trained)).hexdigest()
        assert lora["trained_on"] == "runpod-serverless:ep1" and lora["run_dir"].startswith(f"s3://{bucket}/")
        assert (Path(lora["run_copy"]) / "loss.png").is_file()
        assert (base / "models" / "loras" / name).read_bytes() == lora_bytes(
            trained
        )  # where generation looks
        # the worker trained on the captioned export, fetched from storage byte for byte
        captioned = main_server.output_dir / "charforge" / "datasets" / "pip_captioned" / "captioned" / "img"
        on_worker = Path(worker.trained_on[trained])
        assert sorted(
            p.relative_to(on_worker).as_posix() for p in on_worker.rglob("*") if p.is_file()
        ) == sorted(p.relative_to(captioned).as_posix() for p in captioned.rglob("*") if p.is_file())
        # the generation stage loads that LoRA by its name
        assert any(p.get("2", {}).get("inputs", {}).get("lora_name") == name for p in stages.prompts)
        outputs = [stdout, stderr]

        # the state is lost after training: the stage runs again, finds its job done, sends nothing
        (out / pipeline.STATE_FILE).unlink()
        (base / "models" / "loras" / name).unlink()
        code, stdout, stderr = _pipeline(photos, out, main_server.url)
        assert code == 0, stderr
        assert len(runpod.run_bodies) == 1
        assert (base / "models" / "loras" / name).read_bytes() == lora_bytes(trained)
        outputs += [stdout, stderr]
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".jsonl", ".html")]
    for text in outputs + [p.read_text(errors="replace") for p in files]:
        assert SECRET_KEY not in text and ACCESS_KEY not in text and runpod.api_key not in text


def test_the_whole_pipeline_on_serverless_is_refused_with_the_fix(endpoint, tmp_path):
    code, _, stderr = cli(
        "pipeline",
        str(sample_photos(tmp_path)),
        "--out",
        str(tmp_path / "out"),
        "--server",
        "runpod-serverless:ep1",
    )
    assert code != 0
    assert (
        "serverless endpoint" in stderr
        and "runpod-pod" in stderr
        and "--train-on runpod-serverless" in stderr
    )
