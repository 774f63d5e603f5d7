"""``charforge video --driving-video``: the options become the face-driven workflow's settings and the upload.

The run itself (upload, /prompt, the clip and the identity-drift plot) is checked against a real ComfyUI in
tests/integration/test_real_comfyui_video_face.py.
"""

from __future__ import annotations

import pytest

from cf_testing.cli import run_charforge
from cf_testing.comfyui import REPO_ROOT, load_script
from charforge.driver.workflow.prepare import prepare_run
from charforge.recipes import cli
from charforge.recipes.cli.video import FACE_WORKFLOW, WORKFLOWS, video_settings

build_api = load_script(REPO_ROOT / "workflows" / "build_api.py", "charforge_workflows_build_api")


@pytest.fixture(scope="module")
def object_info():
    """The pack's and ComfyUI's node definitions, with the model files this test names on the "server"."""
    info = build_api.object_info()
    for cls, section, name, files in (
        ("CharForgeLoadVideoModel", "required", "base_model", ["sd15.safetensors"]),
        ("CharForgeLoadVideoModel", "required", "motion_module", ["mm_v3.ckpt"]),
        ("CharForgeVideoLoRA", "required", "lora_name", ["hero.safetensors"]),
        ("CharForgeGenerateVideo", "optional", "controlnet", ["face_cn.safetensors"]),
    ):
        spec = info[cls]["input"][section][name]
        info[cls]["input"][section][name] = [spec[0] + files, *spec[1:]]
    return info


def _args(*argv: str):
    return cli.build_parser().parse_args(["video", *argv])


def test_options_set_the_face_workflow_and_upload_the_driving_video(tmp_path, object_info):
    clip = tmp_path / "talking.mp4"
    clip.write_bytes(b"\0" * 64)  # only its name and existence matter before the upload
    args = _args(
        "--driving-video", str(clip), "--prompt", "ohwx talking", "--prompt", "smiling", "--negative", "blurry",
        "--lora", "hero.safetensors:0.7", "--base-model", "sd15.safetensors", "--controlnet", "face_cn.safetensors",
        "--motion-module", "mm_v3.ckpt",
        "--width", "384", "--height", "448", "--max-frames", "24", "--steps", "10", "--seed", "3",
        "--denoise", "0.6", "--format", "webm",
    )  # fmt: skip
    sets, inputs = video_settings(args)
    assert inputs == [f"CharForgeFaceMotion.video={clip}"]
    prepared = prepare_run(WORKFLOWS / f"{FACE_WORKFLOW}.json", object_info, sets=sets, inputs=inputs)
    prompt = prepared.workflow.prompt
    nodes = {node["class_type"]: node["inputs"] for node in prompt.values()}
    motion = nodes["CharForgeFaceMotion"]
    assert (motion["width"], motion["height"], motion["max_frames"]) == (384, 448, 24)
    generate = nodes["CharForgeGenerateVideo"]
    assert (generate["prompt"], generate["negative_prompt"]) == ("ohwx talking, smiling", "blurry")
    assert (generate["width"], generate["height"]) == (384, 448)  # the face maps' size and the clip's
    assert (generate["steps"], generate["seed"], generate["strength"]) == (10, 3, 0.6)
    assert generate["controlnet"] == "face_cn.safetensors"
    assert (nodes["CharForgeVideoLoRA"]["lora_name"], nodes["CharForgeVideoLoRA"]["strength"]) == (
        "hero.safetensors",
        0.7,
    )
    model = nodes["CharForgeLoadVideoModel"]
    assert (model["base_model"], model["motion_module"]) == ("sd15.safetensors", "mm_v3.ckpt")
    # Frames, driving frames and face maps come from Face Motion: one clip, one face map per frame.
    motion_id = next(i for i, n in prompt.items() if n["class_type"] == "CharForgeFaceMotion")
    assert generate["frames"] == [motion_id, 3]
    assert generate["init_images"] == [motion_id, 1] and generate["control_frames"] == [motion_id, 0]
    assert nodes["CharForgeSaveVideo"]["format"] == "webm"
    [upload] = prepared.pending_uploads
    assert upload.path == clip and upload.input == "video"


def test_left_out_options_keep_the_workflows_values(tmp_path):
    clip = tmp_path / "talking.webm"
    clip.write_bytes(b"\0")
    sets, inputs = video_settings(_args("--driving-video", str(clip)))
    assert sets == [] and inputs == [f"CharForgeFaceMotion.video={clip}"]


def test_wrong_combinations_and_files_are_refused_before_any_server(tmp_path):
    clip = tmp_path / "talking.mp4"
    clip.write_bytes(b"\0")
    server = ("--server", "http://127.0.0.1:9")
    with pytest.raises(SystemExit):  # one source: music or a driving face
        _args("--driving-video", str(clip), "--audio", str(clip))
    code, _, err = run_charforge("video", "--driving-video", str(clip), "--beats-per-prompt", "2", *server)
    assert code == 2 and "--beats-per-prompt belongs to --audio" in err
    code, _, err = run_charforge("video", "--driving-video", str(clip), "--denoise", "1.5", *server)
    assert code == 2 and "--denoise 1.5" in err
    code, _, err = run_charforge("video", "--driving-video", str(tmp_path / "none.mp4"), *server)
    assert code == 2 and "none.mp4: no such file" in err
    (tmp_path / "notes.txt").write_text("hi")
    code, _, err = run_charforge("video", "--driving-video", str(tmp_path / "notes.txt"), *server)
    assert code == 2 and "not a video" in err
    code, _, err = run_charforge("video", "--audio", str(clip), "--controlnet", "x.pth", *server)
    assert code == 2 and "--controlnet belongs to --driving-video" in err
