"""``charforge video --audio``: the options become the audio workflow's settings and the sound file's upload.

The run itself (upload, /prompt, the mp4 with the music downloaded) is checked against a real ComfyUI in
tests/integration/test_real_comfyui_video_audio.py.
"""

from __future__ import annotations

import pytest

from cf_testing.audio_files import click_track, write_pcm
from cf_testing.cli import run_charforge
from cf_testing.comfyui import REPO_ROOT, load_script
from charforge.driver.workflow.prepare import prepare_run
from charforge.recipes import cli
from charforge.recipes.cli.video import AUDIO_WORKFLOW, WORKFLOWS, video_settings

build_api = load_script(REPO_ROOT / "workflows" / "build_api.py", "charforge_workflows_build_api")


@pytest.fixture(scope="module")
def object_info():
    """The pack's node definitions, with the model files this test names on the "server"."""
    info = build_api.object_info()
    for cls, name, files in (
        ("CharForgeLoadVideoModel", "base_model", ["sd15.safetensors"]),
        ("CharForgeLoadVideoModel", "motion_module", ["v3.ckpt"]),
        ("CharForgeVideoLoRA", "lora_name", ["hero.safetensors"]),
    ):
        spec = info[cls]["input"]["required"][name]
        info[cls]["input"]["required"][name] = [spec[0] + files, *spec[1:]]
    return info


def _args(*argv: str):
    return cli.build_parser().parse_args(["video", *argv])


def test_options_set_the_workflow_and_upload_the_sound(tmp_path, object_info):
    song = write_pcm(tmp_path / "song.wav", click_track(120.0, 1.0, 22050)[0], 22050)
    args = _args(
        "--audio", str(song), "--prompt", "ohwx dancing", "--prompt", "ohwx: spinning", "--shared", "photo",
        "--start", "12.5", "--duration", "4", "--fps", "12", "--beats-per-prompt", "4", "--switch", "blend",
        "--lora", "hero.safetensors:0.7", "--base-model", "sd15.safetensors", "--motion-module", "v3.ckpt",
        "--width", "384", "--steps", "10", "--seed", "3", "--format", "webm",
    )  # fmt: skip
    assert args.func.__module__ == "charforge.recipes.cli.video"
    sets, inputs = video_settings(args)
    assert inputs == [f"CharForgeLoadAudio.audio={song}"]
    prepared = prepare_run(WORKFLOWS / f"{AUDIO_WORKFLOW}.json", object_info, sets=sets, inputs=inputs)
    nodes = {node["class_type"]: node["inputs"] for node in prepared.workflow.prompt.values()}
    assert nodes["CharForgeLoadAudio"]["start"] == 12.5 and nodes["CharForgeLoadAudio"]["duration"] == 4.0
    travel = nodes["CharForgeAudioPromptTravel"]
    assert travel["prompts"] == "ohwx dancing\nohwx: spinning" and travel["shared"] == "photo"
    assert travel["fps"] == 12.0 and travel["beats_per_prompt"] == 4
    assert nodes["CharForgeVideoLoRA"]["lora_name"] == "hero.safetensors"
    assert nodes["CharForgeVideoLoRA"]["strength"] == 0.7
    assert nodes["CharForgeLoadVideoModel"]["motion_module"] == "v3.ckpt"
    generate = nodes["CharForgeGenerateVideo"]
    assert (generate["width"], generate["steps"], generate["seed"], generate["blend_prompts"]) == (
        384,
        10,
        3,
        True,
    )
    assert nodes["CharForgeSaveVideo"]["format"] == "webm"
    [upload] = prepared.pending_uploads
    assert upload.path == song and upload.input == "audio"


def test_left_out_options_keep_the_workflows_values(tmp_path, object_info):
    song = write_pcm(tmp_path / "song.flac", click_track(120.0, 1.0, 22050)[0], 22050, codec="flac")
    sets, _ = video_settings(_args("--audio", str(song)))
    assert sets == []


def test_a_missing_or_wrong_audio_file_is_refused_before_any_server(tmp_path):
    code, _, err = run_charforge(
        "video", "--audio", str(tmp_path / "none.mp3"), "--server", "http://127.0.0.1:9"
    )
    assert code == 2 and "none.mp3: no such file" in err
    (tmp_path / "notes.txt").write_text("hi")
    code, _, err = run_charforge(
        "video", "--audio", str(tmp_path / "notes.txt"), "--server", "http://127.0.0.1:9"
    )
    assert code == 2 and "not a sound file" in err
