"""Opt-in: the shipped controlnet_pose_depth workflow in a real ComfyUI (COMFYUI_DIR set), through /prompt.

Tiny models of the real kinds: DWPose stand-ins with the real files' I/O (one planted person), a tiny Depth
Anything folder (DINOv2 backbone) saved with transformers, two tiny SD1.5 ControlNets in the LDM layout
ComfyUI's ControlNetLoader detects, a random character LoRA and the shallow full-width SD1.5 test checkpoint.
Checked: the workflow as shipped (sizes and steps shrunk) runs, both maps are previewed at the reference's
size with the planted nose drawn in the first OpenPose colour, and the ControlNets change the picture (the
same seed with both strengths at 0 gives another image).
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

import cf_testing.real_comfyui as real
from cf_testing import lora_files
from cf_testing.controlnet_models import build_sd15_controlnet
from cf_testing.pose_models import write_pose_models

pytestmark = real.suite_marks()

PORTS = range(19520, 19560)
WORKFLOW = real.REPO_ROOT / "workflows" / "api" / "controlnet_pose_depth.json"
SIZE = 64
DEPTH_FOLDER = "depth_tiny"


def _tiny_depth_anything(folder):
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=14,
        image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False,
    )  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8,
    )  # fmt: skip
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)


def _shipped(strength_scale: float, prefix: str) -> dict:
    prompt = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = "sd15_tiny.safetensors"
        elif kind == "LoadImage":
            inputs["image"] = "reference.png"
        elif kind == "CharForgeDepthMap":
            inputs.update(model=DEPTH_FOLDER, resolution=56)
        elif kind == "ControlNetLoader":  # the test files are safetensors; ComfyUI reads .pth with torch.load
            inputs["control_net_name"] = inputs["control_net_name"].replace(".pth", ".safetensors")
        elif kind == "ControlNetApplyAdvanced":
            inputs["strength"] = inputs["strength"] * strength_scale
        elif kind == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE, batch_size=1)
        elif kind == "KSampler":
            inputs.update(steps=2, sampler_name="euler", scheduler="normal")
        elif kind == "SaveImage":
            inputs["filename_prefix"] = prefix
    return prompt


def _read(base, entry) -> np.ndarray:
    folder = "temp" if entry.get("type") == "temp" else "output"
    with Image.open(base / folder / entry.get("subfolder", "") / entry["filename"]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_pose_depth_workflow_in_real_comfyui(tmp_path, sd15_comfy_checkpoint):
    comfy = real.comfyui_dir()
    python = real.comfyui_python(comfy)
    real.require_module(python, "onnxruntime")
    real.require_module(python, "cv2")
    base = tmp_path / "base"
    real.link_pack(base)
    models = base / "models"
    # The 64 x 64 reference letterboxes at ratio 10: the box (16, 8)-(48, 56) has its crop centre, where the
    # nose is planted, at (32, 32).
    write_pose_models(models / "dwpose", (160.0, 80.0, 480.0, 560.0), {0: (288, 384, 0.9)})
    _tiny_depth_anything(models / "depth_anything" / DEPTH_FOLDER)
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "sd15_tiny.safetensors").symlink_to(sd15_comfy_checkpoint.path)
    (models / "loras").mkdir(parents=True)
    lora_files.write(
        lora_files.random_state("sd15", seed=0, full_size=True), models / "loras" / "my_character.safetensors"
    )
    (models / "controlnet").mkdir(parents=True)
    for seed, name in enumerate(
        ("control_v11p_sd15_openpose.safetensors", "control_v11f1p_sd15_depth.safetensors")
    ):
        build_sd15_controlnet(models / "controlnet" / name, seed=seed)
    (base / "input").mkdir(parents=True)
    rng = np.random.default_rng(0)
    reference = np.zeros((SIZE, SIZE, 3), np.uint8)
    reference[8:56, 16:48] = rng.integers(60, 255, (48, 32, 3))
    Image.fromarray(reference).save(base / "input" / "reference.png")

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    try:
        images = {}
        for scale in (1.0, 0.0):
            prompt = _shipped(scale, f"pose_depth_{scale:g}")
            outputs = server.run_prompt(prompt, "cf-pose-depth")
            previews = {
                v["_meta"]["title"]: outputs[k]["images"][0]
                for k, v in prompt.items()
                if v["class_type"] == "PreviewImage"
            }
            pose_map = _read(base, previews["Pose map"])
            depth_map = _read(base, previews["Depth map"])
            assert pose_map.shape == depth_map.shape == (SIZE, SIZE, 3)
            assert tuple(pose_map[32, 32]) == (255, 0, 0)  # the nose, first OpenPose colour
            assert pose_map[:, :10].max() == 0
            assert depth_map.max() == 255 and depth_map.min() == 0
            (save,) = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
            images[scale] = _read(base, outputs[save]["images"][0])
            assert images[scale].shape == (SIZE, SIZE, 3)
        assert np.abs(images[1.0] - images[0.0]).mean() > 0.5, "the ControlNets did not change the picture"
    finally:
        server.stop()
