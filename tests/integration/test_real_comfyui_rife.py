"""Opt-in: Interpolate Frames with a RIFE file in a real ComfyUI, through /prompt.

A full-size RIFE 4.7-architecture IFNet with random weights is saved as ``models/frame_interpolation/rife49.pth``
(the key layout ComfyUI-Frame-Interpolation's files have) in a throwaway base directory with the pack linked into
custom_nodes. Two PNGs in the input folder become a 2-frame batch (LoadImage x2 -> ImageBatch), Interpolate
Frames (x4, interpolator = the file) makes 5 frames and SaveImage writes them. Checks: /object_info offers the
file, the history lists 5 images, the originals come back at positions 0 and 4, the in-betweens are new, and
the server log says RIFE ran. A rife47.pth in a ComfyUI-Frame-Interpolation stand-in's ckpts/rife folder is
offered too. Runs when COMFYUI_DIR is set.
"""

from __future__ import annotations

import uuid

import numpy as np
import torch
from PIL import Image

import cf_testing.real_comfyui as real
from charforge.engine.video import rife

pytestmark = real.suite_marks()

PORTS = range(18800, 18850)
SIZE = 64


def _workflow() -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {
            "class_type": "CharForgeInterpolateFrames",
            "inputs": {
                "frames": ["3", 0],
                "multiplier": "4",
                "fps": 8.0,
                "loop": False,
                "interpolator": "rife49.pth",
            },
        },
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "rife/frame"}},
    }


def test_interpolate_frames_with_rife_in_real_comfyui(tmp_path, monkeypatch):
    comfy = real.comfyui_dir()
    python = real.comfyui_python(comfy)
    base = tmp_path / "base"
    real.link_pack(base)
    folder = base / "models" / "frame_interpolation"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(rife.IFNet().state_dict(), folder / "rife49.pth")
    # A stand-in for ComfyUI-Frame-Interpolation that has downloaded its rife47.pth (a node pack with no nodes).
    vfi = base / "custom_nodes" / "ComfyUI-Frame-Interpolation"
    (vfi / "ckpts" / "rife").mkdir(parents=True)
    (vfi / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    (vfi / "ckpts" / "rife" / "rife47.pth").write_bytes((folder / "rife49.pth").read_bytes())
    (base / "input").mkdir()
    rng = np.random.default_rng(0)
    originals = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]
    for name, pixels in zip(("a.png", "b.png"), originals, strict=True):
        Image.fromarray(pixels).save(base / "input" / name)

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    try:
        info = server.get("/object_info/CharForgeInterpolateFrames")["CharForgeInterpolateFrames"]
        assert info["input"]["optional"]["interpolator"][0] == [
            "auto",
            "optical flow",
            "rife49.pth",
            "[ComfyUI-Frame-Interpolation] rife47.pth",
        ]
        prompt_id = str(uuid.uuid4())
        reply = server.post(
            "/prompt", {"prompt": _workflow(), "prompt_id": prompt_id, "client_id": "cf-rife"}
        )
        assert reply["node_errors"] == {}, reply
        entry = server.wait_history(prompt_id, timeout=300)
        assert entry["status"]["status_str"] == "success", (entry["status"], server.log()[-4000:])
        images = entry["outputs"]["5"]["images"]
        assert len(images) == 5
        frames = [
            np.asarray(Image.open(base / "output" / i["subfolder"] / i["filename"]).convert("RGB"))
            for i in images
        ]
        assert all(f.shape == (SIZE, SIZE, 3) for f in frames)
        assert np.array_equal(frames[0], originals[0]) and np.array_equal(frames[4], originals[1])
        for middle in frames[1:4]:
            assert not np.array_equal(middle, originals[0]) and not np.array_equal(middle, originals[1])
        log = server.log()
        assert "RIFE 4.7 (rife49.pth)" in log, log[-4000:]
        assert not real.pack_tracebacks(log), log[-4000:]
    finally:
        server.stop()
