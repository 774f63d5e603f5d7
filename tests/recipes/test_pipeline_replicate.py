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
from fakes.charforge_routes import sample_photos, tiny_models, transfer_server
from fakes.comfy_server import FakeComfyServer
from fakes.replicate_api import TRAINER, FakeReplicate, trainer_fake

from cf_testing.cli import run_charforge as cli
from charforge.driver.client import ComfyClient
from charforge.recipes import pipeline


@pytest.fixture
def replicate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeReplicate]:
    with trainer_fake(monkeypatch, tmp_path, "me/pip") as fake:
        yield fake


class ServerSide:
    """What the dataset and caption nodes write (kohya exports with manifests and reports); no prompt may
    train on the server."""

    def __init__(self, output_dir: Path):
        self.root = output_dir / "charforge" / "datasets"
        self.prompts: list[dict[str, Any]] = []

    def __call__(self, prompt: dict[str, Any]) -> dict[str, str]:
        classes = {n["class_type"] for n in prompt.values()}
        self.prompts.append(prompt)
        assert "CharForgeTrainLoRA" not in classes  # training happens on Replicate
        if "CharForgeLoadDataset" in classes:
            captioning = "CharForgeCaptionDataset" in classes
            source = Path(prompt["1"]["inputs"]["folder"])
            name = "pip_captioned" if captioning else "pip"
            export = self.root / name / ("captioned" if captioning else "kohya")
            img = export / "img" / "10_zqx cartoon boy"
            img.mkdir(parents=True, exist_ok=True)
            entries = []
            for i, picture in enumerate(sorted(source.rglob("*.png")), 1):
                (img / f"{i:04d}.png").write_bytes(picture.read_bytes())
                if captioning:
                    (img / f"{i:04d}.txt").write_text(f"zqx, cartoon boy, tag{i}")
                entries.append(
                    {"id": f"{i:04d}", "source": str(picture), "file": f"img/{img.name}/{i:04d}.png"}
                )
            (export / "manifest.json").write_text(json.dumps({"entries": entries}))
            report = self.root / name / "report"
            report.mkdir(parents=True, exist_ok=True)
            (report / "report.html").write_text("<p>report</p>")
            exported = f"{len(entries)} image(s) exported to {img} ({len(entries)} written)"
            if captioning:
                return {"2": "captioned", "3": exported, "4": f"report: {report / 'report.html'}"}
            return {"6": exported, "7": f"report: {report / 'report.html'}"}
        return {"10": "scored", "11": "kept 1"}


class Client(ComfyClient):
    def object_info(self, refresh: bool = False):
        return {"CharForgeTrainLoRA": {}}


def _stand_ins(monkeypatch: pytest.MonkeyPatch, side: ServerSide, server: pipeline.Server) -> None:
    class Runner(pipeline.Runner):
        def run(self, prompt, out_dir, previews=None):
            texts = side(prompt)
            files = []
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                files = [out_dir / "file.png"]
                files[0].write_bytes(b"png")
            return None, texts, files

    monkeypatch.setattr(pipeline, "ComfyClient", Client)
    monkeypatch.setattr(pipeline, "Runner", Runner)
    monkeypatch.setattr(pipeline, "acquire_server", lambda opts, say: server)
    monkeypatch.setattr(pipeline, "choose_models", lambda *a: tiny_models(pipeline))


def _photos(tmp_path: Path) -> Path:
    return sample_photos(tmp_path)


def _pipeline(photos: Path, out: Path, url: str, *extra: str) -> tuple[int, str, str]:
    return cli(
        "pipeline",
        str(photos),
        "--out",
        str(out),
        "--server",
        url,
        "--character",
        "pip",
        "--trigger",
        "zqx",
        "--class",
        "cartoon boy",
        "--no-face-check",
        "--no-install",
        "--progress",
        "plain",
        "--train-on",
        f"replicate:{TRAINER}",
        "--destination",
        "me/pip",
        *extra,
    )


def _trainings(replicate: FakeReplicate) -> int:
    return sum(
        1 for method, path, _ in replicate.requests if method == "POST" and path.endswith("/trainings")
    )


def test_remote_server_trains_on_replicate_uploads_the_lora_and_a_rerun_skips(
    replicate: FakeReplicate, comfy_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos, out = _photos(tmp_path), tmp_path / "out"
    with transfer_server(comfy_env) as fake:
        side = ServerSide(fake.output_dir)
        _stand_ins(monkeypatch, side, pipeline.Server(fake.url))
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
    photos, out, base = _photos(tmp_path), tmp_path / "out", tmp_path / "base"
    with FakeComfyServer() as fake:
        side = ServerSide(fake.output_dir)
        _stand_ins(monkeypatch, side, pipeline.Server(fake.url, base_dir=base))
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
    photos, out = _photos(tmp_path), tmp_path / "out"
    with FakeComfyServer() as fake:  # no CharForge transfer routes
        _stand_ins(monkeypatch, ServerSide(fake.output_dir), pipeline.Server(fake.url))
        code, stdout, stderr = _pipeline(photos, out, fake.url)
    assert code != 0
    assert "cannot receive the LoRA trained on Replicate" in stderr and "Nothing was trained" in stderr
    assert _trainings(replicate) == 0
    assert replicate.token not in stdout + stderr


def test_train_on_needs_a_destination(replicate: FakeReplicate, tmp_path: Path) -> None:
    code, _, stderr = cli(
        "pipeline",
        str(_photos(tmp_path)),
        "--out",
        str(tmp_path / "out"),
        "--train-on",
        f"replicate:{TRAINER}",
    )
    assert code == 2 and "--destination" in stderr
