"""Opt-in: ``charforge story`` with FaceID guidance and a posed scene against a real ComfyUI, through /prompt.

Only CharForge and stock ComfyUI nodes: a tiny FaceID file whose 16 SD1.5 layers fit the shallow full-width
SD1.5 test checkpoint (text width 768; the layers it has -- input 1, output 3, middle -- are 320 wide), the test
face models, DWPose stand-ins and a tiny SD1.5 OpenPose ControlNet. The run makes the simple storyboard and
one reference storyboard per guidance kind (``--guidance faceid,img2img``). Checked: the metadata says FaceID
(its file and the identity) guided every frame, frames came out at the asked size, the posed scene went through
Pose Map and the pose ControlNet in every storyboard, the ablation has a row per kind, and FaceID changed the
picture (frame 1 is unguided in img2img mode, so it equals the simple storyboard's frame 1 pixel for pixel, and
FaceID's frame 1 differs from it). Ports 19600-19640.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

import cf_testing.real_comfyui as real
from cf_testing.controlnet_models import build_sd15_controlnet
from cf_testing.pose_models import write_pose_models

pytestmark = real.suite_marks()
PORTS = range(19600, 19640)
FACEID_FILE = "ip-adapter-faceid_sd15_tiny.safetensors"
CONTROLNET = "control_v11p_sd15_openpose.safetensors"
SCENES = [
    "close-up portrait of the character, face clearly visible",
    "the character reads a letter",
    "the character waves from the harbour",
    "the character boards a boat",
    "the character at sea at sunset",
    "the character arrives on an island",
]
POSED = 2  # scene 3 has a pose image


def write_tiny_faceid(path, width: int = 320, cross: int = 768, layers: int = 16) -> None:
    """A FaceID file in the published layout (image_proj: 512 -> 1024 -> 4 tokens of `cross`; ip_adapter: a
    key / value pair per cross-attention layer), random weights scaled to keep activations near 1."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    state = {
        "image_proj.proj.0.weight": rand(1024, 512),
        "image_proj.proj.0.bias": torch.zeros(1024),
        "image_proj.proj.2.weight": rand(4 * cross, 1024),
        "image_proj.proj.2.bias": torch.zeros(4 * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    for n in range(layers):
        for key in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * n + 1}.{key}.weight"] = rand(width, cross) * 4
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def test_story_faceid_pose_and_ablation_rows_in_real_comfyui(tmp_path, monkeypatch, sd15_comfy_checkpoint):
    from charforge.recipes import cli

    real.require_module(real.comfyui_python(real.checkout()), "onnxruntime")
    comfy, python, base = real.face_checkpoint_base(tmp_path, sd15_comfy_checkpoint, character_lora=True)
    models = base / "models"
    write_tiny_faceid(models / "ipadapter" / FACEID_FILE)
    write_pose_models(models / "dwpose", (160.0, 80.0, 480.0, 560.0), {0: (288, 384, 0.9)})
    build_sd15_controlnet(models / "controlnet" / CONTROLNET)
    refs, _ = real.story_inputs(tmp_path, monkeypatch, SCENES, references=3)
    pose = np.zeros((64, 64, 3), np.uint8)
    pose[8:56, 16:48] = 200
    Image.fromarray(pose).save(tmp_path / "pose.png")
    scenes = tmp_path / "scenes.json"
    scenes.write_text(
        json.dumps(
            [{"prompt": s, **({"pose": "pose.png"} if i == POSED else {})} for i, s in enumerate(SCENES)]
        )
    )

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    out = tmp_path / "story"
    try:
        stdout, stderr = io.StringIO(), io.StringIO()
        code = cli.main(
            [
                "story", "She sails to the island.", "--server", server.url, "--scenes", str(scenes),
                "--lora", "hero.safetensors:0.8", "--trigger", "ohwx woman", "--reference", str(refs),
                "--checkpoint", "sd15_tiny.safetensors", "--no-base", "--guidance", "faceid,img2img",
                "--clip", "none", "--retries", "0", "--candidates", "1", "--steps", "2", "--width", "64",
                "--height", "64", "--sampler", "euler", "--scheduler", "normal", "--timeout", "300",
                "--out", str(out),
            ],
            stdout=stdout,
            stderr=stderr,
        )  # fmt: skip
        log = server.log()
        assert code == 0, stderr.getvalue() + log[-4000:]
        assert not real.pack_tracebacks(log), log[-4000:]
    finally:
        server.stop()

    faceid = json.loads((out / "reference" / "faceid" / "metadata.json").read_text())
    guidance = faceid["models"]["guidance"]
    assert guidance["kind"] == "faceid" and guidance["ipadapter"] == FACEID_FILE, guidance
    assert guidance["reason"].startswith(f"FaceID ({FACEID_FILE}): identity from the reference photos"), (
        guidance
    )
    assert faceid["label"] == "reference-guided: IP-Adapter FaceID (the character's identity)"
    assert [f["guidance"] for f in faceid["frames"]] == ["faceid"] * 6
    img2img = json.loads((out / "reference" / "img2img" / "metadata.json").read_text())
    assert [f["guidance"] for f in img2img["frames"]] == [""] + ["img2img"] * 5
    frames = {}
    for key in ("simple", "reference/faceid", "reference/img2img"):
        data = json.loads((out / key / "metadata.json").read_text())
        assert [f["pose"] for f in data["frames"]] == ["pose.png" if i == POSED else "" for i in range(6)]
        assert data["models"]["pose"]["controlnet"] == CONTROLNET
        for frame in data["frames"]:
            with Image.open(out / key / frame["image"]) as picture:
                assert picture.size == (64, 64)
        with Image.open(out / key / "frame_01.png") as picture:
            frames[key] = np.asarray(picture.convert("RGB"), dtype=np.int16)
    assert np.array_equal(frames["simple"], frames["reference/img2img"])  # same unguided graph, same seed
    assert np.abs(frames["reference/faceid"] - frames["simple"]).mean() > 0.5, "FaceID did not change frame 1"
    ablation = json.loads((out / "ablation.json").read_text())
    assert [row["mode"] for row in ablation["modes"]] == ["simple", "reference/faceid", "reference/img2img"]
    assert (
        "| reference-guided: IP-Adapter FaceID (the character's identity) | 6 |"
        in (out / "ablation.md").read_text()
    )
