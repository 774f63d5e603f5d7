"""Opt-in: the face-driven video in a real ComfyUI, from ``charforge video --driving-video`` to the clip and the
identity-drift plot.

The pack is linked into a throwaway base directory with a tiny SD1.5 (diffusers folder), a tiny AnimateDiff v3
module, a kohya character LoRA for it, a tiny ControlNet of that SD1.5 in the original file layout
(cf_testing/controlnet_models.py) and the face pack of the face-motion tests: the planted detector and landmark
models whose points follow two coloured dots. Checks:

- the original file layout is ComfyUI's: for a full-width SD1.5 ControlNet written the same way, ComfyUI's
  ControlNet loader uses every tensor and its control outputs equal diffusers' ControlNetModel on the same weights
  (float tolerance), and the engine's loader (engine/video/controlnet.py) reads the same file into exactly those
  weights;
- ``charforge video --driving-video talking.mp4`` uploads the clip, runs the shipped video_face_motion workflow
  through ``/prompt`` (Face Motion -> Generate Video: AnimateDiff video to video of the driving frames with the
  face maps steering the ControlNet and the character LoRA -> Save Video, Build Identity + Identity Drift) and
  downloads the mp4; the mp4 served by ``/view`` is the downloaded file, with one frame per driving frame at the
  driving frame rate; the face maps Generate Video got have the planted points; the identity-drift plot was
  produced.

Runs when COMFYUI_DIR is set. Ports 19350-19399.
"""

from __future__ import annotations

import json
import math
import subprocess
import urllib.request

import numpy as np
import pytest
from PIL import Image

import cf_testing.real_comfyui as real
from cf_testing.cli import run_charforge
from cf_testing.controlnet_models import build_controlnet_model, build_sd15_controlnet
from cf_testing.face_models import face_image
from cf_testing.face_motion_models import motion_frame, planted_points, template_68, write_face_motion_pack

pytestmark = real.suite_marks()
PORTS = range(19350, 19400)
SIZE, FRAMES, FPS = (640, 640), 8, 8.0

COMPARE = """
import sys, json, numpy, torch
sys.argv = ['main.py', '--cpu']
import comfy.options; comfy.options.enable_args_parsing()
import comfy.controlnet
from safetensors.torch import load_file
path, inputs, target = sys.argv_cn, sys.argv_in, sys.argv_out
# float32: on a CPU ComfyUI would pick bf16 for the weights, which rounds them differently from the file's fp16
control = comfy.controlnet.load_controlnet(path, model_options={'dtype': torch.float32})
model = control.control_model
file_keys = {k[len('control_model.'):] for k in load_file(path)}
model_keys = set(model.state_dict())
data = numpy.load(inputs)
with torch.no_grad():
    model = model.float()
    out = model(x=torch.from_numpy(data['x']), hint=torch.from_numpy(data['hint']),
                timesteps=torch.from_numpy(data['t']), context=torch.from_numpy(data['context']))
arrays = {f'out{i}': o.numpy() for i, o in enumerate(out['output'])}
arrays['middle'] = out['middle'][0].numpy()
numpy.savez(target, **arrays)
print(json.dumps({'missing': sorted(model_keys - file_keys), 'unused': sorted(file_keys - model_keys),
                  'class': type(control).__name__}))
"""


def _driving_clip():
    """A face sliding right while it turns 0 -> 21 degrees (box fixed: cell at 304, 304)."""
    frames, truth = [], []
    for i in range(FRAMES):
        green = (300.0 + 2.0 * i, 330.0)
        roll = 3.0 * i
        blue = (green[0] + 36 * math.cos(math.radians(roll)), green[1] + 36 * math.sin(math.radians(roll)))
        frames.append(motion_frame(SIZE, (304, 304), green, blue))
        truth.append((green, blue, roll))
    return np.stack(frames), truth


def _controlnet_matches_diffusers(comfy, python, path, tmp_path):
    import torch

    from cf_testing.models import SD15_COMFY_UNET
    from charforge.engine.video.controlnet import load_controlnet

    reference = build_controlnet_model()
    with torch.no_grad():  # the file is fp16: compare on the same rounded weights
        for p in reference.parameters():
            p.copy_(p.half().float())
    ours = load_controlnet(path, dict(SD15_COMFY_UNET), torch.float32, torch.device("cpu")).state_dict()
    expected = reference.state_dict()
    assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in expected)
    del ours
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    hint = torch.rand(1, 3, 64, 64, generator=generator)
    t = torch.tensor([500.0])
    context = torch.randn(1, 77, SD15_COMFY_UNET["cross_attention_dim"], generator=generator)
    np.savez(tmp_path / "cn_in.npz", x=x.numpy(), hint=hint.numpy(), t=t.numpy(), context=context.numpy())
    script = (
        COMPARE.replace("sys.argv_cn", repr(str(path)))
        .replace("sys.argv_in", repr(str(tmp_path / "cn_in.npz")))
        .replace("sys.argv_out", repr(str(tmp_path / "cn_out.npz")))
    )
    run = subprocess.run([python, "-c", script], cwd=comfy, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"missing": [], "unused": [], "class": "ControlNet"}, report
    with torch.no_grad():
        down, mid = reference(x, t, context, controlnet_cond=hint, return_dict=False)
    theirs = np.load(tmp_path / "cn_out.npz")
    assert len(down) == len([k for k in theirs if k.startswith("out")])
    for i, ours in enumerate(down):
        np.testing.assert_allclose(theirs[f"out{i}"], ours.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(theirs["middle"], mid.numpy(), rtol=1e-3, atol=1e-4)


def test_face_driven_video_in_real_comfyui_from_the_charforge_command(tmp_path):
    import shutil

    from cf_testing.controlnet_models import tiny_video_controlnet, write_ldm_controlnet
    from cf_testing.video_models import video_assets
    from charforge.engine.video import read_video, write_video

    comfy = real.comfyui_dir()
    python = real.comfyui_python(comfy)
    real.require_module(python, "insightface")
    if subprocess.run([python, "-c", "import av, cv2, diffusers"], capture_output=True).returncode != 0:
        pytest.skip("ComfyUI's Python lacks av / cv2 / diffusers (pip install -r requirements.txt)")
    base = tmp_path / "base"
    real.link_pack(base)
    models = base / "models"
    write_face_motion_pack(models / "insightface", "buffalo_l")
    assets = video_assets(tmp_path / "assets")
    shutil.copytree(assets.sd15.diffusers_dir, models / "diffusers" / "tiny_sd15")
    (models / "animatediff_models").mkdir(parents=True)
    shutil.copy(assets.modules["v3"].original_file, models / "animatediff_models")
    (models / "loras").mkdir(parents=True)
    shutil.copy(assets.character_lora, models / "loras" / "hero.safetensors")
    unet_config = dict(assets.sd15.unet_config)
    write_ldm_controlnet(
        tiny_video_controlnet(unet_config), unet_config, models / "controlnet" / "face_cn.safetensors"
    )
    full_width = build_sd15_controlnet(tmp_path / "sd15_controlnet.safetensors")
    photos = base / "input" / "charforge" / "my_character"
    photos.mkdir(parents=True)
    for seed in range(3):
        Image.fromarray(face_image(person=0, noise=2, seed=seed)).save(photos / f"ref{seed}.png")
    frames, truth = _driving_clip()
    driving = write_video(frames, tmp_path / "talking.mp4", fps=FPS, quality=100)

    _controlnet_matches_diffusers(comfy, python, full_width, tmp_path)

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    try:
        info = server.get("/object_info")
        assert info["CharForgeFaceMotion"]["output"][0] == "IMAGE"
        assert "face_cn.safetensors" in info["CharForgeGenerateVideo"]["input"]["optional"]["controlnet"][0]

        out_dir = tmp_path / "video_out"
        code, stdout, stderr = run_charforge(
            "video", "--driving-video", str(driving), "--server", server.url, "--out", str(out_dir),
            "--base-model", "[diffusers] tiny_sd15", "--motion-module", assets.modules["v3"].original_file.name,
            "--lora", "hero.safetensors:0.8",
            "--controlnet", "face_cn.safetensors", "--prompt", "ohwx person talking",
            "--width", "64", "--height", "64", "--steps", "2", "--max-frames", "0",
            "--progress", "plain", "--json",
        )  # fmt: skip
        assert code == 0, (stdout[-3000:], stderr[-3000:], server.log()[-3000:])
        downloaded = sorted(out_dir.rglob("*.mp4"))
        assert [p.name for p in downloaded] == ["face_video_00001_.mp4"], list(out_dir.rglob("*"))
        clip = read_video(downloaded[0])
        assert (
            clip.frame_count == FRAMES
            and clip.fps == pytest.approx(FPS)
            and (clip.width, clip.height) == (64, 64)
        )

        manifest = json.loads((out_dir / "manifest.json").read_text())
        prompt_id = manifest["prompt_id"]
        history = server.get(f"/history/{prompt_id}")[prompt_id]
        assert history["status"]["status_str"] == "success"
        nodes = history["prompt"][2]

        def node_of(cls, title=None):
            return next(
                n
                for n in nodes
                if nodes[n]["class_type"] == cls and (title is None or nodes[n]["_meta"]["title"] == title)
            )

        motion = node_of("CharForgeFaceMotion")
        assert nodes[motion]["inputs"]["video"] != "driving.mp4"  # the uploaded file
        generate = nodes[node_of("CharForgeGenerateVideo")]["inputs"]
        assert generate["control_frames"] == [motion, 0] and generate["init_images"] == [motion, 1]
        assert generate["controlnet"] == "face_cn.safetensors" and generate["frames"] == [motion, 3]
        save = node_of("CharForgeSaveVideo")
        entry = history["outputs"][save]["images"][0]
        url = f"{server.url}/view?filename={entry['filename']}&subfolder={entry['subfolder']}&type=output"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.read() == downloaded[0].read_bytes()

        # The face maps Generate Video's ControlNet got (previewed by the workflow): the planted points, scaled 640 -> 64.
        maps = history["outputs"][node_of("PreviewImage", "Face maps")]["images"]
        assert len(maps) == FRAMES
        template = template_68()
        for (green, blue, _), item in zip(truth, maps, strict=True):
            url = f"{server.url}/view?filename={item['filename']}&subfolder={item['subfolder']}&type={item['type']}"
            with urllib.request.urlopen(url, timeout=30) as response:
                image = np.asarray(Image.open(response).convert("L"))
            ys, xs = np.nonzero(image > 127)
            points = planted_points(template, green, blue) / 10.0
            nearest = [np.min(np.hypot(xs - x, ys - y)) for x, y in points]
            assert max(nearest) < 1.5
        # The identity-drift plot was drawn (the tiny model draws no planted face: every frame "no face").
        plot = history["outputs"][node_of("PreviewImage", "Identity drift")]["images"]
        assert len(plot) == 1
        assert not real.pack_tracebacks(server.log()), server.log()[-4000:]
        assert "missing controlnet keys" not in server.log()
    finally:
        server.stop()
