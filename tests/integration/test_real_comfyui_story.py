"""Opt-in: ``charforge story`` against a real ComfyUI with tiny models, in both modes plus the base model.

The server gets the CharForge pack, a tiny SD1.5 checkpoint ComfyUI loads, a tiny character LoRA for it, the
InsightFace-format test face models and a tiny CLIP folder; the command runs headless through the driver
and must write every mode's frames, sheet and metadata.json and the ablation table. The test face models
find only planted faces, so generated frames show "no face" (reported, never raised) while text agreement
is measured on every frame. Ports 18550-18599.
"""

from __future__ import annotations

import io
import json
import os
import shutil

from PIL import Image

import cf_testing.real_comfyui as real
from cf_testing.comfyui import REPO_ROOT

pytestmark = real.suite_marks()
PORTS = range(18550, 18600)
SCENES = [
    "close-up portrait of the character, face clearly visible",
    "the character reads a letter",
    "the character walks to the harbour",
    "the character boards a boat",
    "the character at sea at sunset",
    "the character arrives on an island",
]


def test_story_both_modes_and_ablation_in_real_comfyui(tmp_path, monkeypatch, sd15_comfy_checkpoint):
    from charforge.recipes import cli

    comfy, python, base = real.face_checkpoint_base(
        tmp_path, sd15_comfy_checkpoint, clip_folder=True, character_lora=True
    )
    refs, scenes = real.story_inputs(tmp_path, monkeypatch, SCENES, references=3)

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    out_dir = tmp_path / "story"
    try:
        stdout, stderr = io.StringIO(), io.StringIO()
        code = cli.main(
            [
                "story",
                "She sails to the island.",
                "--server",
                server.url,
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
                "--candidates",
                "2",
                "--steps",
                "2",
                "--width",
                "64",
                "--height",
                "64",
                "--sampler",
                "euler",
                "--scheduler",
                "normal",
                "--retries",  # this test is about the storyboard: one attempt per frame, seeds 42 + i
                "0",
                "--timeout",
                "300",
                "--out",
                str(out_dir),
            ],
            stdout=stdout,
            stderr=stderr,
        )
        assert code == 0, stderr.getvalue() + server.log()[-4000:]
        editor_outputs = _run_storyboard_workflow(server)
        log = server.log()
        assert not real.pack_tracebacks(log), log[-4000:]
    finally:
        server.stop()

    for mode in ("simple", "reference", "base"):
        folder = out_dir / mode
        data = json.loads((folder / "metadata.json").read_text())
        assert data["mode"] == mode and len(data["frames"]) == 6
        assert (
            data["models"]["clip"] == "tiny_clip" and data["models"]["checkpoint"] == "sd15_tiny.safetensors"
        )
        for i, frame in enumerate(data["frames"]):
            assert frame["seed"] == 42 + i and frame["candidates"] == 2 and frame["text"] is not None
            # The test detector finds planted red cells only: a random frame rarely has one, and says so.
            assert frame["identity"] is not None or "no face" in frame["note"]
            with Image.open(folder / frame["image"]) as picture:
                assert picture.size == (64, 64)
        with Image.open(folder / "sheet.png") as sheet:
            assert sheet.width > 3 * 64
    reference = json.loads((out_dir / "reference" / "metadata.json").read_text())
    assert [f["guidance"] for f in reference["frames"]] == [""] + ["img2img"] * 5
    ablation = json.loads((out_dir / "ablation.json").read_text())
    assert [row["mode"] for row in ablation["modes"]] == ["simple", "reference", "base"]
    for row in ablation["modes"]:
        frames = json.loads((out_dir / row["mode"] / "metadata.json").read_text())["frames"]
        assert row["text_mean"] is not None and row["faces"] == sum(f["identity"] is not None for f in frames)
    assert (
        f"| base model without LoRA | 6 | {ablation['modes'][2]['faces']} |"
        in (out_dir / "ablation.md").read_text()
    )
    # The editor workflow (list fan-out through ComfyUI's own nodes, INPUT_IS_LIST selection) on the same server.
    sheet_ui = editor_outputs["13"]["images"][0]
    folder = base / "output" / sheet_ui["subfolder"]
    assert sheet_ui["filename"] == "sheet.png" and (folder / "sheet.png").is_file()
    board = json.loads((folder / "metadata.json").read_text())
    assert [f["seed"] for f in board["frames"]] == list(range(42, 48)) and board["models"][
        "clip"
    ] == "clip:tiny_clip"
    assert all(f["candidates"] == 2 and f["text"] is not None for f in board["frames"])
    assert len(editor_outputs["15"]["images"]) == 12  # the preview of every candidate: 6 frames x 2
    keep = os.environ.get("CHARFORGE_KEEP_STORY")  # to look at the sheets: a folder to copy the output to
    if keep:
        shutil.copytree(out_dir, keep, dirs_exist_ok=True)


def _run_storyboard_workflow(server) -> dict:
    """workflows/api/storyboard.json with the tiny models, the identity built from the uploaded photos."""
    prompt = json.loads((REPO_ROOT / "workflows" / "api" / "storyboard.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = "sd15_tiny.safetensors"
    prompt["2"]["inputs"]["lora_name"] = "hero.safetensors"
    prompt["6"]["inputs"].update(width=64, height=64, batch_size=2)
    prompt["7"]["inputs"].update(steps=2, sampler_name="euler", scheduler="normal")
    prompt["10"] = {
        "class_type": "CharForgeBuildIdentity",
        "inputs": {
            "face_models": ["9", 0],
            "name": "hero",
            "save": False,
            "folder": "charforge_story/hero_refs",
        },
    }
    prompt["11"]["inputs"]["model"] = "tiny_clip"
    return server.run_prompt(prompt, "cf-story", timeout=600)
