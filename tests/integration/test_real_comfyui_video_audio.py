"""Opt-in: the audio-reactive video in a real ComfyUI, from ``charforge video --audio`` to the mp4 with music.

The pack is linked into a throwaway base directory; a tiny SD1.5 (diffusers folder), a tiny AnimateDiff v3 module
(original layout) and a kohya character LoRA go into the folders a user would use. Checks:

- ComfyUI's own audio decoding reads the file to the samples CharForge's does, and the loudness schedule Load
  Audio + Audio Schedule make in the server is the one made from ComfyUI's samples;
- ``charforge video --audio clicks.wav`` uploads the sound, runs the shipped video_audio_reactive workflow through
  ``/prompt`` and downloads the clip; the prompt changed on the planted clicks; the mp4 served by ``/view`` is the
  downloaded file, and its audio and video durations agree within one frame.

Runs when COMFYUI_DIR is set.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
import uuid

import numpy as np
import pytest

import cf_testing.real_comfyui as real
from cf_testing.audio_files import click_track, write_pcm
from cf_testing.cli import run_charforge
from cf_testing.video_models import video_assets

pytestmark = real.suite_marks()

PORTS = range(8900, 8950)
RATE, FPS = 44100, 8.0


def _schedule(loader: dict) -> dict:
    return {
        "1": loader,
        "2": {
            "class_type": "CharForgeAudioSchedule",
            "inputs": {
                "audio": ["1", 0],
                "feature": "loudness",
                "fps": FPS,
                "frames": 0,
                "low": 0.0,
                "high": 1.0,
                "smooth": 0.0,
                "attack": 0.0,
                "release": 0.0,
                "invert": False,
            },
        },
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }


def test_audio_reactive_video_in_real_comfyui_from_the_charforge_command(tmp_path):
    from charforge.engine.video.audio import Audio, load_audio, media_durations
    from charforge.engine.video.audio_features import (
        ScheduleMapping,
        analyse_audio,
        feature_schedule,
        schedule_text,
    )
    from charforge.engine.video.prompts import parse_prompt_schedule

    comfy = real.comfyui_dir()
    python = real.comfyui_python(comfy)
    real.require_packages(python, "av", "diffusers", "peft")
    assets = video_assets(tmp_path / "assets")
    base = real.base_with_models(
        tmp_path,
        {"tiny_sd15": assets.sd15.diffusers_dir},
        [("animatediff_models", assets.modules["v3"].original_file), ("loras", assets.character_lora)],
    )
    samples, _ = click_track(120.0, 4.0, RATE)  # clicks at 0.25, 0.75, ... s
    song = write_pcm(tmp_path / "clicks.wav", samples, RATE)
    (base / "input").mkdir(parents=True, exist_ok=True)
    shutil.copy(song, base / "input" / "clicks.wav")

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    try:
        info = server.get("/object_info")
        assert info["CharForgeLoadAudio"]["output"][0] == "AUDIO"
        assert "audio" in info["CharForgeSaveVideo"]["input"]["optional"]

        # ComfyUI's own audio decoding (comfy_extras/nodes_audio.load; its nodes need torchaudio, which this
        # ComfyUI may lack) reads the file to the samples ours reads, and the schedule our nodes make in the server
        # from them is the one made here from ComfyUI's samples.
        reference = _comfyui_load(comfy, python, base / "input" / "clicks.wav", tmp_path / "reference.npy")
        assert reference.shape == (1, len(samples)) and reference.dtype == np.float32
        assert np.array_equal(reference, load_audio(song).samples)
        features = analyse_audio(Audio(reference, RATE), FPS)
        expected = schedule_text(feature_schedule(features, ScheduleMapping("loudness")))
        prompt_id = str(uuid.uuid4())
        loader = {
            "class_type": "CharForgeLoadAudio",
            "inputs": {"audio": "clicks.wav", "start": 0.0, "duration": 0.0},
        }
        reply = server.post(
            "/prompt", {"prompt": _schedule(loader), "prompt_id": prompt_id, "client_id": "cf-a"}
        )
        assert reply["node_errors"] == {}, reply
        entry = server.wait_history(prompt_id, timeout=120)
        assert entry["status"]["status_str"] == "success", (entry["status"], server.log()[-3000:])
        assert (
            entry["outputs"]["3"]["text"][0] == expected and len(expected.splitlines()) == 32
        )  # 4 s at 8 fps

        out_dir = tmp_path / "video_out"
        code, stdout, stderr = run_charforge(
            "video", "--audio", str(song), "--server", server.url, "--out", str(out_dir),
            "--base-model", "[diffusers] tiny_sd15", "--motion-module", assets.modules["v3"].original_file.name,
            "--lora", f"{assets.character_lora.name}:0.8", "--prompt", "ohwx dancing", "--prompt", "ohwx spinning",
            "--start", "0.5", "--duration", "2", "--fps", "8", "--beats-per-prompt", "1",
            "--width", "64", "--height", "64", "--steps", "2", "--progress", "plain", "--json",
        )  # fmt: skip
        assert code == 0, (stdout[-3000:], stderr[-3000:], server.log()[-3000:])
        downloaded = sorted(out_dir.rglob("*.mp4"))
        assert [p.name for p in downloaded] == ["audio_video_00001_.mp4"], list(out_dir.rglob("*"))
        video_seconds, audio_seconds = media_durations(downloaded[0])
        assert video_seconds == pytest.approx(2.0) and abs(audio_seconds - video_seconds) < 1 / FPS

        manifest = json.loads((out_dir / "manifest.json").read_text())
        prompt_id = manifest["prompt_id"]
        history = server.get(f"/history/{prompt_id}")[prompt_id]
        nodes = history["prompt"][2]
        travel = next(n for n in nodes if nodes[n]["class_type"] == "CharForgeAudioPromptTravel")
        generate = next(n for n in nodes if nodes[n]["class_type"] == "CharForgeGenerateVideo")
        assert nodes[travel]["inputs"]["prompts"] == "ohwx dancing\nohwx spinning"
        loader = next(n for n in nodes if nodes[n]["class_type"] == "CharForgeLoadAudio")
        assert nodes[loader]["inputs"]["audio"] != "my_song.wav"  # the uploaded file
        assert nodes[generate]["inputs"]["prompt"] == [travel, 0]
        save = next(n for n in nodes if nodes[n]["class_type"] == "CharForgeSaveVideo")
        saved = history["outputs"][save]
        assert saved["animated"] == [True]
        entry = saved["images"][0]
        url = f"{server.url}/view?filename={entry['filename']}&subfolder={entry['subfolder']}&type=output"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.read() == downloaded[0].read_bytes()
        # The schedule the clip used: keyframes on the clicks (0.25, 0.75, ... s after the 0.5 s start).
        keyframes = parse_prompt_schedule(_travel_text(server, nodes, travel))
        assert [k.frame for k in keyframes] == [0, 2, 6, 10, 14]
        assert not real.pack_tracebacks(server.log()), server.log()[-4000:]
    finally:
        server.stop()


def _comfyui_load(comfy, python: str, path, target):
    """ComfyUI's own ``load()`` of a sound file, run in ComfyUI's Python, as a float32 array (channels, n)."""
    script = (
        (
            "import sys, types, numpy\n"
            "sys.argv = ['main.py', '--cpu']\n"
            "import comfy.options; comfy.options.enable_args_parsing()\n"
            "sys.modules.setdefault('torchaudio', types.ModuleType('torchaudio'))  # unused by load()\n"
            "import comfy_extras.nodes_audio as audio\n"
            "waveform, rate = audio.load(sys.argv_path)\n"
            "numpy.save(sys.argv_target, waveform.numpy())\n"
        )
        .replace("sys.argv_path", repr(str(path)))
        .replace("sys.argv_target", repr(str(target)))
    )
    run = subprocess.run([python, "-c", script], cwd=comfy, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return np.load(target)


def _travel_text(server, nodes: dict, travel: str) -> str:
    """Run the command's Load Audio + Audio Prompt Travel again, with a preview of the schedule they made."""
    loader = nodes[travel]["inputs"]["audio"][0]
    prompt = {
        loader: nodes[loader],
        travel: nodes[travel],
        "preview": {"class_type": "PreviewAny", "inputs": {"source": [travel, 0]}},
    }
    prompt_id = str(uuid.uuid4())
    reply = server.post("/prompt", {"prompt": prompt, "prompt_id": prompt_id, "client_id": "cf-a"})
    assert reply["node_errors"] == {}, reply
    entry = server.wait_history(prompt_id, timeout=120)
    return entry["outputs"]["preview"]["text"][0]
