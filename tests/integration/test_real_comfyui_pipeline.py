"""Opt-in: the end-to-end pipeline (``charforge pipeline``) against a real ComfyUI with tiny models.

The pipeline starts ComfyUI from COMFYUI_DIR itself (base directory under tmp, CharForge linked in by
install.py, a loopback port in 18500-18549), writes the tiny models of the real architectures, and runs
dataset -> captions -> LoRA -> scored images -> video on the shipped sample drawings through the driver. Checks:
a dataset report, one caption per kept photo (trigger first), a LoRA with kohya keys that ComfyUI's own
LoraLoader loaded without a "lora key not loaded" warning, CLIP scores, an mp4 that decodes; then a second run
skips every stage. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

import cf_testing.real_comfyui as real
from cf_testing.comfyui import REPO_ROOT

pytestmark = real.suite_marks()

PORTS = range(18500, 18550)


def test_pipeline_runs_end_to_end_on_tiny_models(tmp_path, monkeypatch):
    from safetensors import safe_open

    from charforge.driver import local
    from charforge.engine.video import read_video
    from charforge.recipes import pipeline
    from charforge.recipes.pipeline import server as pipeline_server
    from charforge.recipes.story_retry import attempt_seed

    comfy = real.comfyui_dir()
    python = real.comfyui_python(comfy)
    probe = "import av, diffusers, peft, cv2, onnxruntime, transformers"
    if subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        pytest.skip("ComfyUI's Python lacks the pack's requirements (pip install -r requirements.txt)")
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))
    monkeypatch.setenv("COMFYUI_PYTHON", python)
    # A ComfyUI someone runs on 8188 must not be picked up: this test starts its own.
    monkeypatch.setattr(
        pipeline_server,
        "probe",
        lambda url, timeout=1.5: url != local.DEFAULT_LOCAL_URL and local.probe(url, timeout),
    )
    out = tmp_path / "out"
    said: list[str] = []

    def options():
        return pipeline.PipelineOptions(
            photos=REPO_ROOT / "samples" / "character",
            out=out,
            character="pip",
            trigger="zqx",
            class_tokens="cartoon boy",
            face_check=False,
            tiny=True,
            port=real.free_port(PORTS),
            install=False,
            progress="plain",
            stage_timeout=900,
        )

    state = pipeline.run_pipeline(options(), said.append)
    stages = state["stages"]
    assert any("TINY RANDOM MODELS" in line for line in said)

    # The photo selection's report, copied next to its contact sheets
    report = Path(stages["dataset"]["report_html"])
    assert report == out / "dataset" / "selection" / "report.html"
    assert report.is_file() and (report.parent / "report.json").is_file()
    assert (report.parent / "contact_sheet_001.png").is_file()
    data = json.loads((report.parent / "report.json").read_text())
    assert data["counts"]["accepted"] == stages["dataset"]["accepted"] >= 8

    # Captions: one per kept photo, trigger first, tags after it
    captions = sorted((out / "captions").glob("*.txt"))
    assert len(captions) == stages["dataset"]["accepted"]
    photos = {p.stem for p in (REPO_ROOT / "samples" / "character").glob("*.jpg")}
    assert {c.stem for c in captions} <= photos  # named after the photo each one describes
    assert Path(stages["captions"]["report_html"]) == out / "dataset" / "report.html"
    after = json.loads((out / "dataset" / "report.json").read_text())  # the dataset report, after captioning
    assert after["counts"]["accepted"] == len(captions)
    assert "0 of" not in (out / "dataset" / "report.html").read_text().split("have a caption")[0][-20:]
    for caption in captions:
        text = caption.read_text().strip()
        assert text.startswith("zqx, ") and len(text.split(", ")) > 2, text

    # The LoRA: kohya keys for U-Net and text encoder, loaded by ComfyUI's LoraLoader in the images stage
    lora = Path(stages["lora"]["lora_path"])
    assert lora == out / "lora" / "pip_tiny_random.safetensors"
    assert (out / "lora" / "loss.png").is_file()
    with safe_open(str(lora), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    log = (out / "comfyui" / "comfyui.log").read_text(errors="replace")
    assert "LoraLoader" not in re.findall(r"Failed to validate prompt for output (\S+)", log)
    assert "lora key not loaded" not in log

    # Scores and images
    scores = Path(stages["images"]["scores"]).read_text()
    assert re.search(r"mean \d\.\d+", scores), scores
    pngs = list((out / "images").rglob("*.png"))
    assert all(p.parent == out / "images" for p in pngs)  # flat, no ComfyUI subfolders or temp/
    # Retries (on by default): every round's 4 candidates were CLIP-scored through the score node's "scores"
    # UI output; noise rarely reaches CLIPScore 0.70, so there are usually 3 rounds, each with its own seed
    retries = stages["images"]["retries"]
    rounds = retries["rounds"]
    assert 1 <= len(rounds) <= 3 and [r["seed"] for r in rounds] == [
        attempt_seed(42, k) for k in range(len(rounds))
    ]
    assert all(len(r["candidates"]) == 4 and r["pick"] is not None for r in rounds)
    assert all(c["text"] is not None and c["identity"] is None for r in rounds for c in r["candidates"])
    assert retries["passed"] == any(r["passed"] for r in rounds) and len(retries["rounds"][-1]["best"]) == 1
    assert all(Path(p).is_file() for r in rounds for p in r["best"])
    assert len([p for p in pngs if p.name.startswith("tiny_random_candidate_")]) == 4 * len(rounds)
    assert (
        any(p.name.startswith("tiny_random_best_") for p in pngs)
        and (out / "images" / "score_table.png").is_file()
    )

    # Video
    video = Path(stages["video"]["video"])
    assert video.parent == out / "video" and video.name.startswith("tiny_random_video_")
    decoded = read_video(video)
    assert video.suffix == ".mp4" and decoded.frame_count == 8 and (decoded.width, decoded.height) == (64, 64)

    # The layout README.txt and docs/pipeline.md describe; nothing else beside the ComfyUI base directory
    assert {p.name for p in out.iterdir()} == {
        "README.txt",
        "dataset",
        "captions",
        "lora",
        "images",
        "video",
        "comfyui",
        "pipeline_state.json",
    }
    for stage in (
        "dataset",
        "captions",
        "lora",
        "images",
        "video",
    ):  # comfyui/ is ComfyUI's own base directory
        assert not (out / stage / "temp").exists() and not (out / stage / "charforge").exists(), stage
    assert (out / "README.txt").read_text().startswith("TINY RANDOM MODELS")

    # Second run: everything is skipped, nothing is written again
    said.clear()
    mtime = lora.stat().st_mtime
    pipeline.run_pipeline(options(), said.append)
    assert sum("finished in an earlier run, skipped" in line for line in said) == len(pipeline.STAGES)
    assert lora.stat().st_mtime == mtime
