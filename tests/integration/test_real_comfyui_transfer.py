"""Opt-in: ``charforge pipeline --remote`` against a real ComfyUI on loopback treated as remote, beside a local
run of the same command.

The remote server has its own base directory (CharForge linked in by install.py, no models at all) and is
reached only over HTTP: the photos go up through CharForge's transfer routes, the server writes the tiny demo
models itself (``--tiny``), every stage runs there, and the reports, captions, LoRA, run folder, images and
video come home. Checks: the same outputs as the local run (dataset counts, caption files and texts, images,
video), the LoRA byte-identical to the server's copy, and a second run skipping every stage. Several minutes
on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

import cf_testing.real_comfyui as real
from cf_testing.comfyui import REPO_ROOT

pytestmark = real.suite_marks(pytest.mark.timeout(2700))  # two whole pipeline runs on CPU

PORTS = range(18550, 18599)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _options(pipeline, out: Path, **kw):
    return pipeline.PipelineOptions(
        photos=REPO_ROOT / "samples" / "character",
        out=out,
        character="pip",
        trigger="zqx",
        class_tokens="cartoon boy",
        face_check=False,
        tiny=True,
        install=False,
        progress="plain",
        stage_timeout=900,
        **kw,
    )


def test_remote_pipeline_gives_the_local_outputs(tmp_path, monkeypatch):
    from charforge.driver import local
    from charforge.engine.video import read_video
    from charforge.recipes import pipeline

    comfy = real.comfyui_dir()
    python = real.comfyui_python(comfy)
    if (
        subprocess.run(
            [python, "-c", "import av, diffusers, peft, cv2, onnxruntime, transformers"], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("ComfyUI's Python lacks the pack's requirements (pip install -r requirements.txt)")
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))
    monkeypatch.setenv("COMFYUI_PYTHON", python)
    monkeypatch.setattr(
        pipeline.server,
        "probe",
        lambda url, timeout=1.5: url != local.DEFAULT_LOCAL_URL and local.probe(url, timeout),
    )
    said: list[str] = []

    # The remote server: its own base directory, the pack installed, no model
    base = tmp_path / "pod"
    pipeline.install_pack(comfy, base, python, said.append)
    server = real.start_comfyui(comfy, base, python)
    try:
        remote_out = tmp_path / "remote"
        remote = pipeline.run_pipeline(
            _options(pipeline, remote_out, server=server.url, remote=True), said.append
        )
        said.clear()
        again = pipeline.run_pipeline(
            _options(pipeline, remote_out, server=server.url, remote=True), said.append
        )
        assert sum("finished in an earlier run, skipped" in line for line in said) == len(pipeline.STAGES)
        assert again["stages"] == remote["stages"]
    finally:
        server.stop()
    assert not list(remote_out.rglob("comfyui*.log"))  # nothing of the server's folders but what came home

    local_out = tmp_path / "local"
    here = pipeline.run_pipeline(_options(pipeline, local_out, port=real.free_port(PORTS)), said.append)

    r, h = remote["stages"], here["stages"]
    # the LoRA: byte-identical to the server's copy
    lora = Path(r["lora"]["lora_path"])
    assert lora == remote_out / "lora" / r["lora"]["lora_name"]
    assert _sha(lora) == _sha(base / "models" / "loras" / r["lora"]["lora_name"]) == r["lora"]["lora_sha256"]
    assert (remote_out / "lora" / "run" / "loss.png").is_file()
    # the same outputs as the local run
    assert r["dataset"]["accepted"] == h["dataset"]["accepted"] >= 8
    for name in ("selection/report.json", "report.json"):
        a = json.loads((remote_out / "dataset" / name).read_text())
        b = json.loads((local_out / "dataset" / name).read_text())
        assert a["counts"] == b["counts"], name
    remote_captions = {p.name: p.read_text() for p in (remote_out / "captions").glob("*.txt")}
    local_captions = {p.name: p.read_text() for p in (local_out / "captions").glob("*.txt")}
    assert remote_captions == local_captions and len(remote_captions) == r["dataset"]["accepted"]
    assert sorted(p.name for p in (remote_out / "images").glob("*.png")) == sorted(
        p.name for p in (local_out / "images").glob("*.png")
    )
    video = read_video(Path(r["video"]["video"]))
    assert video.frame_count == 8 and (video.width, video.height) == (64, 64)
    same_lora = _sha(lora) == _sha(Path(h["lora"]["lora_path"]))
    print(f"remote LoRA {'is' if same_lora else 'is NOT'} byte-identical to the local run's")
