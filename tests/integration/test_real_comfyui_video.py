"""Opt-in: the video nodes in a real ComfyUI, used as a new user would, and the clip fetched by the driver.

The pack is linked into a throwaway base directory's custom_nodes; a tiny SD1.5 (diffusers folder in
models/diffusers), a tiny AnimateDiff v3 module in the original single-file layout (models/animatediff_models),
a motion LoRA and a kohya character LoRA go into the folders a user would use. The workflow loads the model,
adds both LoRAs, generates 8 frames, doubles them by interpolation and saves an MP4. Checks: the history
reports the file under ``images`` with ``animated: [true]`` (what the ComfyUI page previews), ``/view``
serves it and it decodes with the right frame count, size and fps, and ``charforge run`` downloads it.
Runs when COMFYUI_DIR is set.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid

import pytest

import cf_testing.real_comfyui as real
from cf_testing.video_models import video_assets

pytestmark = real.suite_marks()

FRAMES, SIZE, FPS = 8, 64, 8.0


PORTS = range(8800, 8900)


def video_workflow() -> dict:
    return {
        "1": {
            "class_type": "CharForgeLoadVideoModel",
            "inputs": {
                "base_model": "[diffusers] tiny_sd15",
                "motion_module": "tiny_mm_v3.safetensors",
                "dtype": "auto",
                "attention": "sdpa",
                "vae_slicing": True,
                "vae_tiling": False,
                "cpu_offload": False,
                "compile": False,
            },
        },
        "2": {
            "class_type": "CharForgeVideoLoRA",
            "inputs": {"model": ["1", 0], "lora_name": "tiny_character.safetensors", "strength": 0.8},
        },
        "3": {
            "class_type": "CharForgeMotionLoRA",
            "inputs": {"model": ["2", 0], "motion_lora": "tiny_zoom.safetensors", "strength": 1.0},
        },
        "4": {
            "class_type": "CharForgeGenerateVideo",
            "inputs": {
                "model": ["3", 0],
                "prompt": "0: a photo of sks person\n4: sks person smiling",
                "negative_prompt": "blurry",
                "frames": FRAMES,
                "fps": FPS,
                "width": SIZE,
                "height": SIZE,
                "steps": 2,
                "cfg": 7.5,
                "scheduler": "ddim",
                "seed": 7,
                "context_length": 16,
                "context_overlap": 4,
            },
        },
        "5": {
            "class_type": "CharForgeInterpolateFrames",
            "inputs": {"frames": ["4", 0], "multiplier": "2", "fps": ["4", 1], "loop": False},
        },
        "6": {
            "class_type": "CharForgeSaveVideo",
            "inputs": {
                "frames": ["5", 0],
                "fps": ["5", 1],
                "format": "mp4",
                "filename_prefix": "video/hero",
                "quality": 80,
                "loop_count": 0,
            },
        },
    }


def test_video_workflow_in_real_comfyui_and_driver_download(tmp_path, monkeypatch):
    from charforge.driver.outputs import collect_files
    from charforge.engine.video import read_video

    comfy = real.comfyui_dir()
    python = real.comfyui_python(comfy)
    real.require_packages(python, "av", "diffusers", "peft", "cv2")
    assets = video_assets(tmp_path / "assets")
    base = real.base_with_models(
        tmp_path,
        {"tiny_sd15": assets.sd15.diffusers_dir},
        [
            ("animatediff_models", assets.modules["v3"].original_file),
            ("animatediff_motion_lora", assets.motion_lora),
            ("loras", assets.character_lora),
        ],
    )

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    try:
        info = server.get("/object_info")
        assert info["CharForgeGenerateVideo"]["category"] == "CharForge/Video"
        assert info["CharForgeSaveVideo"]["output_node"] is True
        assert (
            "tiny_mm_v3.safetensors"
            in info["CharForgeLoadVideoModel"]["input"]["required"]["motion_module"][0]
        )
        assert (
            "[diffusers] tiny_sd15" in info["CharForgeLoadVideoModel"]["input"]["required"]["base_model"][0]
        )

        prompt_id = str(uuid.uuid4())
        reply = server.post(
            "/prompt", {"prompt": video_workflow(), "prompt_id": prompt_id, "client_id": "cf-video"}
        )
        assert reply["node_errors"] == {}, reply
        entry = server.wait_history(prompt_id, timeout=600)
        assert entry["status"]["status_str"] == "success", (entry["status"], server.log()[-4000:])
        outputs = entry["outputs"]
        saved = outputs["6"]
        assert saved["animated"] == [True]
        assert saved["images"] == [{"filename": "hero_00001_.mp4", "subfolder": "video", "type": "output"}]
        files = collect_files(outputs)
        assert [(f.filename, f.animated) for f in files] == [("hero_00001_.mp4", True)]

        url = f"{server.url}/view?filename=hero_00001_.mp4&subfolder=video&type=output"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
        assert body[4:8] == b"ftyp"  # an MP4 served to the page
        (tmp_path / "viewed.mp4").write_bytes(body)
        decoded = read_video(tmp_path / "viewed.mp4")
        assert (decoded.frame_count, decoded.width, decoded.height) == (2 * FRAMES - 1, SIZE, SIZE)
        assert decoded.fps == pytest.approx(2 * FPS)

        # The driver: a changed seed so ComfyUI does not answer from its cache, then the download.
        workflow_file = tmp_path / "video_api.json"
        workflow_file.write_text(json.dumps(video_workflow()))
        out_dir = tmp_path / "driver_out"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "charforge.driver.cli",
                "run",
                str(workflow_file),
                "--server",
                server.url,
                "--out",
                str(out_dir),
                "--set",
                "4.seed=8",
                "--progress",
                "plain",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:], server.log()[-3000:])
        downloaded = sorted(out_dir.rglob("*.mp4"))
        assert [p.name for p in downloaded] == ["hero_00002_.mp4"], (
            run.stdout[-2000:],
            list(out_dir.rglob("*")),
        )
        again = read_video(downloaded[0])
        assert (again.frame_count, again.width, again.height) == (2 * FRAMES - 1, SIZE, SIZE)
        log = server.log()
        assert not real.pack_tracebacks(log), log[-4000:]
    finally:
        server.stop()
