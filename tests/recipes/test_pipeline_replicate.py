"""``charforge pipeline --train-on replicate:...``: the dataset and caption stages on the ComfyUI server (a
stand-in that writes what the nodes write), the LoRA trained on the fake Replicate through ``train_remote``,
home in out/lora, checked, and in the server's loras folder (uploaded through the transfer routes of the fake
ComfyUI, or copied into the loras folder of a ComfyUI the pipeline started); a rerun does not train again; the
token is in no output."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.charforge_routes import sample_photos, transfer_server
from fakes.comfy_server import FakeComfyServer
from fakes.pipeline_stand_ins import DatasetStages, pipeline_argv, use_stand_ins
from fakes.replicate_api import TRAINER, FakeReplicate, trainer_fake

from cf_testing.cli import run_charforge as cli
from charforge.recipes import pipeline


@pytest.fixture
def replicate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeReplicate]:
    with trainer_fake(monkeypatch, tmp_path, "me/pip") as fake:
        yield fake


def _pipeline(photos: Path, out: Path, url: str, *extra: str) -> tuple[int, str, str]:
    return cli(
        *pipeline_argv(
            photos, out, url, "--train-on", f"replicate:{TRAINER}", "--destination", "me/pip", *extra
        )
    )


def _trainings(replicate: FakeReplicate) -> int:
    return sum(
        1 for method, path, _ in replicate.requests if method == "POST" and path.endswith("/trainings")
    )


def test_remote_server_trains_on_replicate_uploads_the_lora_and_a_rerun_skips(
    replicate: FakeReplicate, comfy_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos, out = sample_photos(tmp_path), tmp_path / "out"
    with transfer_server(comfy_env) as fake:
        side = DatasetStages(fake.output_dir)
        use_stand_ins(monkeypatch, side, pipeline.Server(fake.url))
        code, stdout, stderr = _pipeline(photos, out, fake.url, "--remote")
        assert code == 0, stderr
        assert _trainings(replicate) == 1
        state = json.loads((out / pipeline.STATE_FILE).read_text())
        lora = state["stages"]["lora"]
        home = Path(lora["lora_path"])
        assert home.parent == out / "lora" and home.suffix == ".safetensors"
        assert lora["lora_sha256"] == hashlib.sha256(home.read_bytes()).hexdigest()
        on_server = fake.root / "models" / "loras" / home.name
        assert on_server.read_bytes() == home.read_bytes()  # uploaded through the transfer route
        assert [r for r in fake.requests if r.method == "PUT" and "/models/loras/files/" in r.path]
        # the generation stage loads the Replicate-trained LoRA by its name
        assert any(p.get("2", {}).get("inputs", {}).get("lora_name") == home.name for p in side.prompts)
        # the dataset trained on: the captioned export's images and captions, flat
        flat = sorted(p.name for p in (out / "lora" / "replicate_dataset").iterdir())
        assert flat == ["0001_0001.png", "0001_0001.txt", "0002_0002.png", "0002_0002.txt"]
        outputs = [stdout, stderr]

        # the stage failed after training (or the state is gone): the LoRA is home and checked, no new training
        (out / pipeline.STATE_FILE).unlink()
        on_server.unlink()
        code, stdout, stderr = _pipeline(photos, out, fake.url, "--remote")
        assert code == 0, stderr
        assert _trainings(replicate) == 1
        assert "not training again" in stdout + stderr
        assert on_server.read_bytes() == home.read_bytes()  # put back on the server
        outputs += [stdout, stderr]

        # with the state in place the stage is skipped altogether
        code, stdout, stderr = _pipeline(photos, out, fake.url, "--remote")
        assert code == 0 and _trainings(replicate) == 1
        assert "[3/5] LoRA training: finished in an earlier run, skipped" in stdout + stderr
        outputs += [stdout, stderr]
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".yaml", ".html")]
    for text in outputs + [p.read_text(errors="replace") for p in files]:
        assert replicate.token not in text


def test_a_comfyui_the_pipeline_started_gets_the_lora_in_its_loras_folder(
    replicate: FakeReplicate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos, out, base = sample_photos(tmp_path), tmp_path / "out", tmp_path / "base"
    with FakeComfyServer() as fake:
        side = DatasetStages(fake.output_dir)
        use_stand_ins(monkeypatch, side, pipeline.Server(fake.url, base_dir=base))
        code, stdout, stderr = _pipeline(photos, out, fake.url)
        assert code == 0, stderr
        lora = json.loads((out / pipeline.STATE_FILE).read_text())["stages"]["lora"]
        home = Path(lora["lora_path"])
        assert (base / "models" / "loras" / home.name).read_bytes() == home.read_bytes()
        assert list((base / "models" / "charforge" / "characters").glob("*.yaml"))  # the preset
        assert replicate.token not in stdout + stderr


def test_a_server_without_transfer_routes_is_refused_before_training(
    replicate: FakeReplicate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos, out = sample_photos(tmp_path), tmp_path / "out"
    with FakeComfyServer() as fake:  # no CharForge transfer routes
        use_stand_ins(monkeypatch, DatasetStages(fake.output_dir), pipeline.Server(fake.url))
        code, stdout, stderr = _pipeline(photos, out, fake.url)
    assert code != 0
    assert "cannot receive the LoRA trained on Replicate" in stderr and "Nothing was trained" in stderr
    assert _trainings(replicate) == 0
    assert replicate.token not in stdout + stderr


def test_train_on_needs_a_destination(replicate: FakeReplicate, tmp_path: Path) -> None:
    code, _, stderr = cli(
        "pipeline",
        str(sample_photos(tmp_path)),
        "--out",
        str(tmp_path / "out"),
        "--train-on",
        f"replicate:{TRAINER}",
    )
    assert code == 2 and "--destination" in stderr
