"""Opt-in: ``charforge story --retries`` against a real ComfyUI with tiny models.

Same server set-up as test_real_comfyui_story.py (tiny SD1.5 checkpoint and LoRA, test face models, tiny CLIP
folder). The text-agreement threshold is planted where no frame can reach it (CLIPScore 2.5, a CLIP cosine of
1), so every frame is below threshold: each is regenerated once with the derived seed, both attempts and their scores are
in metadata.json, no attempt passes and the sheet marks every frame. A second run into the same folder queues
no job (the attempts are recorded). Ports 19470-19499.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

import cf_testing.real_comfyui as real

pytestmark = real.suite_marks()
PORTS = range(19470, 19500)
SCENES = [
    "close-up portrait of the character",
    "the character reads a letter",
    "the character walks to the harbour",
    "the character boards a boat",
    "the character at sea at sunset",
    "the character arrives on an island",
]


def test_story_retries_regenerate_low_scoring_frames_in_real_comfyui(
    tmp_path, monkeypatch, sd15_comfy_checkpoint
):
    from charforge.engine.story.sheet import NOT_PASSED
    from charforge.recipes import cli
    from charforge.recipes.story_retry import attempt_seed

    comfy, python, base = real.face_checkpoint_base(
        tmp_path, sd15_comfy_checkpoint, clip_folder=True, character_lora=True
    )
    refs, scenes = real.story_inputs(tmp_path, monkeypatch, SCENES, references=1)
    out_dir = tmp_path / "story"
    args = [
        "story",
        "--scenes",
        str(scenes),
        "--lora",
        "hero.safetensors:0.8",
        "--trigger",
        "ohwx woman",
        "--reference",
        str(refs),
        "--checkpoint",
        "sd15_tiny.safetensors",
        "--mode",
        "simple",
        "--no-base",
        "--candidates",
        "1",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--retries",
        "1",
        "--min-text",  # CLIPScore 2.5 needs a CLIP cosine of 1: every attempt fails
        "2.5",
        "--timeout",
        "300",
        "--out",
        str(out_dir),
    ]

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    try:
        runs = []
        for _ in range(2):
            stdout, stderr = io.StringIO(), io.StringIO()
            code = cli.main([*args, "--server", server.url], stdout=stdout, stderr=stderr)
            assert code == 0, stderr.getvalue() + server.log()[-4000:]
            runs.append(stdout.getvalue() + stderr.getvalue())
        log = server.log()
        assert not real.pack_tracebacks(log), log[-4000:]
    finally:
        server.stop()

    folder = out_dir / "simple"
    data = json.loads((folder / "metadata.json").read_text())
    assert data["settings"]["retries"]["min_text"] == 2.5
    for i, frame in enumerate(data["frames"]):
        attempts = frame["attempts"]
        assert [a["seed"] for a in attempts] == [42 + i, attempt_seed(42 + i, 1)]
        assert all(a["text"] is not None and a["clipscore"] < 2.5 and not a["passed"] for a in attempts)
        assert frame["passed"] is False and frame["seed"] in (42 + i, attempt_seed(42 + i, 1))
        kept = max(attempts, key=lambda a: (a["identity"] or 0.0) + a["text"])
        assert frame["seed"] == kept["seed"]
        with (
            Image.open(folder / f"frame_{i + 1:02d}_try1.png") as one,
            Image.open(folder / f"frame_{i + 1:02d}_try2.png") as two,
        ):
            assert np.abs(np.asarray(one, dtype=np.int16) - np.asarray(two, dtype=np.int16)).max() > 0
    assert "frame(s) 1, 2, 3, 4, 5, 6 never passed" in " ".join(data["notes"])
    with Image.open(folder / "sheet.png") as sheet:
        pixels = np.asarray(sheet.convert("RGB"))
    assert np.all(pixels == np.array(NOT_PASSED, dtype=np.uint8), axis=-1).sum() > 6 * 4 * 320
    # the second run queued nothing: every attempt came from the record of the first
    assert runs[1].count("recorded by an earlier run") == 12
