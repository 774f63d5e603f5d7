"""Opt-in: the HotShot-XL workflow in a real ComfyUI, from ``charforge video --hotshot`` and ``charforge run`` to the mp4.

The pack is linked into a throwaway base directory; a tiny SDXL (diffusers folder in models/diffusers), a tiny
HotShot-XL temporal-layer file in the published layout (models/animatediff_models/hsxl_temporal_layers.safetensors)
and a kohya SDXL character LoRA go into the folders a user would use. Checks: the server lists the HotShot-XL file
as a motion module; ``charforge video --hotshot`` runs the shipped video_hotshot_xl workflow through ``/prompt``
(16 frames in 8-frame windows, prompt travel, the LoRA) and downloads the mp4, which ``/view`` serves byte for byte
and which decodes to 16 frames at 8 fps; ``charforge run`` of the same workflow file downloads the next clip.
Runs when COMFYUI_DIR is set.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

import cf_testing.real_comfyui as real
from cf_testing.cli import run_charforge
from cf_testing.video_models import build_tiny_hotshot_module, video_assets

pytestmark = real.suite_marks()

PORTS = range(8950, 9000)
FRAMES, SIZE, FPS = 16, 64, 8.0
HOTSHOT = "hsxl_temporal_layers.safetensors"


def test_hotshot_xl_workflow_in_real_comfyui_from_the_charforge_commands(tmp_path):
    from charforge.engine.video import read_video
    from charforge.recipes.cli.video import HOTSHOT_WORKFLOW, WORKFLOWS

    comfy = real.comfyui_dir()
    python = real.comfyui_python(comfy)
    real.require_packages(python, "av", "diffusers", "peft")
    assets = video_assets(tmp_path / "assets")
    base = real.base_with_models(
        tmp_path, {"tiny_sdxl": assets.sdxl.diffusers_dir}, [("loras", assets.sdxl_character_lora)]
    )
    build_tiny_hotshot_module(base / "models" / "animatediff_models" / HOTSHOT)
    lora = assets.sdxl_character_lora.name

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    try:
        info = server.get("/object_info")
        assert HOTSHOT in info["CharForgeLoadVideoModel"]["input"]["required"]["motion_module"][0]

        out_dir = tmp_path / "video_out"
        code, stdout, stderr = run_charforge(
            "video", "--hotshot", "--server", server.url, "--out", str(out_dir),
            "--base-model", "[diffusers] tiny_sdxl", "--lora", f"{lora}:0.8",
            "--prompt", "ohwx smiling", "--prompt", "ohwx waving", "--frames", str(FRAMES),
            "--width", str(SIZE), "--height", str(SIZE), "--steps", "2", "--progress", "plain", "--json",
        )  # fmt: skip
        assert code == 0, (stdout[-3000:], stderr[-3000:], server.log()[-3000:])
        downloaded = sorted(out_dir.rglob("*.mp4"))
        assert [p.name for p in downloaded] == ["hotshot_xl_00001_.mp4"], list(out_dir.rglob("*"))
        clip = read_video(downloaded[0])
        assert (clip.frame_count, clip.width, clip.height) == (FRAMES, SIZE, SIZE)
        assert clip.fps == pytest.approx(FPS)

        manifest = json.loads((out_dir / "manifest.json").read_text())
        prompt_id = manifest["prompt_id"]
        history = server.get(f"/history/{prompt_id}")[prompt_id]
        nodes = history["prompt"][2]
        by_class = {node["class_type"]: (node_id, node["inputs"]) for node_id, node in nodes.items()}
        generate = by_class["CharForgeGenerateVideo"][1]
        assert generate["prompt"] == "0: ohwx smiling\n8: ohwx waving"
        assert (generate["frames"], generate["context_length"]) == (FRAMES, 8)
        assert by_class["CharForgeLoadVideoModel"][1]["motion_module"] == HOTSHOT
        assert by_class["CharForgeVideoLoRA"][1]["lora_name"] == lora
        saved = history["outputs"][by_class["CharForgeSaveVideo"][0]]
        assert saved["animated"] == [True]
        entry = saved["images"][0]
        url = f"{server.url}/view?filename={entry['filename']}&subfolder={entry['subfolder']}&type=output"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.read() == downloaded[0].read_bytes()

        # charforge run of the shipped file, with its settings changed by --set (another seed: not from the cache).
        run_dir = tmp_path / "run_out"
        code, stdout, stderr = run_charforge(
            "run", str(WORKFLOWS / f"{HOTSHOT_WORKFLOW}.json"), "--server", server.url, "--out", str(run_dir),
            "--set", "CharForgeLoadVideoModel.base_model=[diffusers] tiny_sdxl",
            "--set", f"CharForgeVideoLoRA.lora_name={lora}", "--set", "CharForgeGenerateVideo.width=64",
            "--set", "CharForgeGenerateVideo.height=64", "--set", "CharForgeGenerateVideo.steps=2",
            "--set", "CharForgeGenerateVideo.seed=9", "--progress", "plain", "--json",
        )  # fmt: skip
        assert code == 0, (stdout[-3000:], stderr[-3000:], server.log()[-3000:])
        [again] = sorted(run_dir.rglob("*.mp4"))
        assert again.name == "hotshot_xl_00002_.mp4"
        decoded = read_video(again)
        assert (decoded.frame_count, decoded.width, decoded.height) == (FRAMES, SIZE, SIZE)
        assert not real.pack_tracebacks(server.log()), server.log()[-4000:]
    finally:
        server.stop()
