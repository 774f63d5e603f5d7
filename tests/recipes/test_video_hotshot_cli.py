"""``charforge video --hotshot``: the options become the HotShot-XL workflow's settings (prompt keyframes spread over
the clip); options of the other clips are refused.

The run itself (/prompt, the mp4 served by /view and downloaded) is checked against a real ComfyUI in
tests/integration/test_real_comfyui_video_hotshot.py.
"""

from __future__ import annotations

import pytest

from cf_testing.cli import run_charforge
from cf_testing.comfyui import REPO_ROOT, load_script
from charforge.driver.workflow.prepare import prepare_run
from charforge.recipes import cli
from charforge.recipes.cli.video import HOTSHOT_WORKFLOW, WORKFLOWS, video_settings

build_api = load_script(REPO_ROOT / "workflows" / "build_api.py", "charforge_workflows_build_api")


@pytest.fixture(scope="module")
def object_info():
    """The pack's node definitions, with the model files this test names on the "server"."""
    info = build_api.object_info()
    for cls, name, files in (
        ("CharForgeLoadVideoModel", "base_model", ["sdxl_512.safetensors"]),
        ("CharForgeLoadVideoModel", "motion_module", ["hsxl_temporal_layers.safetensors"]),
        ("CharForgeVideoLoRA", "lora_name", ["hero_xl.safetensors"]),
    ):
        spec = info[cls]["input"]["required"][name]
        info[cls]["input"]["required"][name] = [spec[0] + files, *spec[1:]]
    return info


def _args(*argv: str):
    return cli.build_parser().parse_args(["video", *argv])


def test_options_set_the_hotshot_workflow(object_info):
    args = _args(
        "--hotshot", "--prompt", "ohwx smiling", "--prompt", "ohwx waving", "--prompt", "ohwx laughing",
        "--shared", "photo, golden hour", "--frames", "24", "--fps", "12", "--negative", "blurry",
        "--lora", "hero_xl.safetensors:0.7", "--base-model", "sdxl_512.safetensors",
        "--width", "640", "--height", "384", "--steps", "20", "--seed", "3", "--format", "webm",
    )  # fmt: skip
    sets, inputs = video_settings(args)
    assert inputs == []
    prepared = prepare_run(WORKFLOWS / f"{HOTSHOT_WORKFLOW}.json", object_info, sets=sets, inputs=inputs)
    nodes = {node["class_type"]: node["inputs"] for node in prepared.workflow.prompt.values()}
    generate = nodes["CharForgeGenerateVideo"]
    assert generate["prompt"] == "0: ohwx smiling\n8: ohwx waving\n16: ohwx laughing\nphoto, golden hour"
    assert (generate["frames"], generate["fps"], generate["width"], generate["height"]) == (
        24,
        12.0,
        640,
        384,
    )
    assert (generate["steps"], generate["seed"], generate["negative_prompt"]) == (20, 3, "blurry")
    assert generate["context_length"] == 8  # the workflow's HotShot-XL window stays
    assert nodes["CharForgeLoadVideoModel"]["base_model"] == "sdxl_512.safetensors"
    assert nodes["CharForgeLoadVideoModel"]["motion_module"] == "hsxl_temporal_layers.safetensors"
    assert (nodes["CharForgeVideoLoRA"]["lora_name"], nodes["CharForgeVideoLoRA"]["strength"]) == (
        "hero_xl.safetensors",
        0.7,
    )
    assert nodes["CharForgeSaveVideo"]["format"] == "webm"
    assert prepared.pending_uploads == []


def test_left_out_options_keep_the_workflows_values():
    sets, inputs = video_settings(_args("--hotshot"))
    assert sets == [] and inputs == []
    sets, _ = video_settings(_args("--hotshot", "--prompt", "ohwx dancing"))
    assert [(s.node, s.input, s.value) for s in sets] == [
        ("CharForgeGenerateVideo", "prompt", "0: ohwx dancing")
    ]


def test_options_of_the_other_clips_are_refused_before_any_server(tmp_path):
    server = ("--server", "http://127.0.0.1:9")
    song = tmp_path / "song.wav"
    song.write_bytes(b"\0")
    with pytest.raises(SystemExit):  # one kind of clip at a time
        _args("--hotshot", "--audio", str(song))
    code, _, err = run_charforge("video", "--hotshot", "--beats-per-prompt", "2", *server)
    assert code == 2 and "--beats-per-prompt has no use in the HotShot-XL clip" in err
    code, _, err = run_charforge("video", "--hotshot", "--denoise", "0.5", *server)
    assert code == 2 and "--denoise has no use in the HotShot-XL clip" in err
    code, _, err = run_charforge("video", "--hotshot", "--shared", "photo", *server)
    assert code == 2 and "give at least one --prompt" in err
    code, _, err = run_charforge("video", "--audio", str(song), "--frames", "8", *server)
    assert code == 2 and "--frames belongs to --hotshot" in err
