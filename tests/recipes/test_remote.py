"""``charforge pipeline --remote`` wiring against a server reached only over HTTP (the fake ComfyUI with
CharForge's transfer routes): the photo folder goes up, the stages get the server's paths, the dataset
folders, reports, captions, LoRA (byte-identical to the server's) and run folder come home; a run killed in the
middle of training and run again finishes without redoing the done stages, sending no photo and downloading
nothing it already has. The stages' ComfyUI side is a stand-in that writes what the real nodes write."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fakes.charforge_routes import sample_photos, transfer_server
from fakes.comfy_server import png_bytes
from fakes.pipeline_stand_ins import use_stand_ins

from charforge.recipes import pipeline

LORA = b"lora weights " * 2000


class ServerSide:
    """What the CharForge nodes write on the server for each stage workflow, with the texts they show."""

    def __init__(self, fake, kill_training: bool = False):
        self.fake = fake
        self.kill_training = kill_training
        self.root = fake.output_dir / "charforge"
        self.folders: list[str] = []
        self.prompts: list[set[str]] = []

    def __call__(self, prompt):
        classes = {n["class_type"] for n in prompt.values()}
        self.prompts.append(classes)
        ds = self.root / "datasets"
        if "CharForgeLoadDataset" in classes and "CharForgeCaptionDataset" not in classes:
            folder = Path(prompt["1"]["inputs"]["folder"])
            self.folders.append(str(folder))
            assert folder.is_dir() and folder.is_relative_to(self.fake.input_dir)  # the uploaded photos
            photos = sorted(p for p in folder.iterdir() if p.suffix == ".png")
            img = ds / "pip" / "kohya" / "img" / "10_zqx cartoon boy"
            img.mkdir(parents=True, exist_ok=True)
            entries = []
            for i, photo in enumerate(photos, 1):
                (img / f"{i:04d}.png").write_bytes(photo.read_bytes())
                entries.append(
                    {"id": f"{i:04d}", "source": str(photo), "file": f"img/10_zqx cartoon boy/{i:04d}.png"}
                )
            (ds / "pip" / "kohya" / "manifest.json").write_text(json.dumps({"entries": entries}))
            self._report(ds / "pip")
            return {
                "6": f"{len(photos)} image(s) exported to {img} ({len(photos)} written)",
                "7": f"report: {ds / 'pip' / 'report' / 'report.html'}",
            }
        if "CharForgeCaptionDataset" in classes:
            source = Path(prompt["1"]["inputs"]["folder"])
            img = ds / "pip_captioned" / "captioned" / "img" / "10_zqx cartoon boy"
            img.mkdir(parents=True, exist_ok=True)
            entries = []
            for i, picture in enumerate(sorted(source.rglob("*.png")), 1):
                (img / f"{i:04d}.png").write_bytes(picture.read_bytes())
                (img / f"{i:04d}.txt").write_text(f"zqx, cartoon boy, tag{i}")
                entries.append(
                    {"id": f"{i:04d}", "source": str(picture), "file": f"img/10_zqx cartoon boy/{i:04d}.png"}
                )
            (ds / "pip_captioned" / "captioned" / "manifest.json").write_text(
                json.dumps({"entries": entries})
            )
            self._report(ds / "pip_captioned")
            return {
                "2": "captioned",
                "3": f"{len(entries)} image(s) exported to {img} ({len(entries)} written)",
                "4": f"report: {ds / 'pip_captioned' / 'report' / 'report.html'}",
            }
        if "CharForgeTrainLoRA" in classes:
            run = self.root / "train_runs" / "pip_tiny_random"
            (run / "samples").mkdir(parents=True, exist_ok=True)
            (run / "loss.png").write_bytes(png_bytes(4, 4, (1, 1, 1)))
            (run / "samples" / "step_000002_0.png").write_bytes(png_bytes(4, 4, (2, 2, 2)))
            if self.kill_training:
                raise KeyboardInterrupt  # the driver is killed while the server trains
            (run / "pip_tiny_random.safetensors").write_bytes(LORA)
            loras = self.fake.root / "models" / "loras"
            loras.mkdir(parents=True, exist_ok=True)
            (loras / "pip_tiny_random.safetensors").write_bytes(LORA)
            return {"1": f"pip_tiny_random.safetensors: 4 steps, final loss 0.1; run folder {run}"}
        return {"10": "scored", "11": "kept 1"}

    def _report(self, folder: Path) -> None:
        report = folder / "report"
        report.mkdir(parents=True, exist_ok=True)
        (report / "report.html").write_text("<img src='contact_sheet_001.png'>")
        (report / "report.json").write_text("{}")
        (report / "contact_sheet_001.png").write_bytes(png_bytes(4, 4, (3, 3, 3)))


@pytest.fixture
def remote_run(comfy_env, tmp_path, monkeypatch):
    photos = sample_photos(tmp_path)
    with transfer_server(comfy_env) as fake:
        server = ServerSide(fake)
        use_stand_ins(monkeypatch, server)
        monkeypatch.setattr(pipeline, "acquire_server", lambda opts, say: pipeline.Server(fake.url))

        def run(said=None):
            opts = pipeline.PipelineOptions(
                photos=photos,
                out=tmp_path / "out",
                character="pip",
                trigger="zqx",
                class_tokens="cartoon boy",
                remote=True,
                face_check=False,
            )
            return pipeline.run_pipeline(opts, (said if said is not None else []).append)

        yield fake, server, run, tmp_path / "out"


def test_remote_run_brings_everything_home_and_resumes_after_a_kill(remote_run):
    fake, server, run, out = remote_run
    server.kill_training = True
    with pytest.raises(KeyboardInterrupt):
        run()
    assert server.folders == [str((fake.input_dir / "charforge" / "pip").resolve())]
    assert sorted(p.name for p in (out / "captions").iterdir()) == [
        "pip_1.txt",
        "pip_2.txt",
    ]  # named after photos
    assert (out / "dataset" / "report.html").is_file() and (
        out / "dataset" / "selection" / "report.html"
    ).is_file()

    server.kill_training = False
    fake.requests.clear()
    said: list[str] = []
    state = run(said)
    assert sum("finished in an earlier run, skipped" in line for line in said) == 2  # dataset, captions
    assert not [r for r in fake.requests if r.method == "PUT"]  # no photo sent again
    lora = state["stages"]["lora"]
    assert (
        Path(lora["lora_path"]).read_bytes()
        == (fake.root / "models" / "loras" / lora["lora_name"]).read_bytes()
    )
    assert lora["lora_sha256"] == hashlib.sha256(LORA).hexdigest()
    assert (out / "lora" / "run" / "samples" / "step_000002_0.png").is_file()
    assert (out / "lora" / "run" / "pip_tiny_random.safetensors").read_bytes() == LORA
    assert json.loads((out / pipeline.STATE_FILE).read_text())["remote"] is True


def test_a_fresh_state_sends_and_downloads_only_what_changed(remote_run):
    fake, server, run, out = remote_run
    run()
    (out / pipeline.STATE_FILE).unlink()
    fake.requests.clear()
    run()
    assert not [r for r in fake.requests if r.method == "PUT"]  # photos unchanged: nothing sent
    fetched = [r.path for r in fake.requests if "/outputs/files/" in r.path or "/loras/files/" in r.path]
    assert fetched == []  # every file at home already has the server's checksum


def test_on_a_runpod_pod_started_for_the_run_and_stopped_after(comfy_env, tmp_path, monkeypatch):
    """--server PROFILE naming a stopped pod: started, waited for, the whole run through its proxy (uploads in
    chunks, downloads), then stopped per on_finish with its time and cost in the state and the summary."""
    from fakes.runpod_api import FakeRunPod, RunPodKnobs

    photos = sample_photos(tmp_path)
    with transfer_server(comfy_env) as fake, FakeRunPod(knobs=RunPodKnobs(proxy_timeout=5.0)) as runpod:
        runpod.add_pod("pod1", fake)  # stopped
        for name, value in runpod.env().items():
            monkeypatch.setenv(name, value)
        config = tmp_path / "config.yaml"
        config.write_text(
            "profiles:\n  gpu:\n    server: runpod-pod:pod1\n"
            "    runpod: {on_finish: stop, ready_interval: 0.05}\n"
        )
        monkeypatch.setenv("CHARFORGE_CONFIG", str(config))
        server = ServerSide(fake)
        use_stand_ins(monkeypatch, server)
        said: list[str] = []
        opts = pipeline.PipelineOptions(
            photos=photos,
            out=tmp_path / "out",
            character="pip",
            trigger="zqx",
            class_tokens="cartoon boy",
            face_check=False,
            server="gpu",
        )
        state = pipeline.run_pipeline(opts, said.append)
        assert runpod.pods["pod1"].status == "EXITED"  # stopped again
        proxied = [r for r in fake.requests if r.method == "PUT"]
    assert proxied and state["remote"] is True
    assert (
        state["pod"]["id"] == "pod1" and state["pod"]["finish"] == "stopped" and state["pod"]["cost_usd"] >= 0
    )
    assert any(line.startswith("pod pod1:") and "/h = $" in line for line in said)
    assert any("RunPod pod" in line for line in pipeline.summary_lines(state, tmp_path / "out"))
    assert Path(state["stages"]["lora"]["lora_path"]).read_bytes() == LORA
