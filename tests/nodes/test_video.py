"""CharForge/Video nodes run as ComfyUI runs them, on tiny models placed in ComfyUI's model folders."""

import shutil
from pathlib import Path

import pytest
import torch

from cf_testing.comfyui import run_node
from cf_testing.video_models import video_assets
from charforge import bridge
from charforge.engine.video import read_video
from charforge.engine.video.models import unload_video_model
from charforge.nodes import video as video_nodes
from charforge.nodes.video import (
    GenerateVideo,
    InterpolateFrames,
    LoadVideoModel,
    MotionLoRA,
    SaveVideo,
    VideoLoRA,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # cf_testing/threads.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    yield video_assets(tmp_path_factory.getbasetemp() / "video_assets")
    unload_video_model()


@pytest.fixture
def comfy(comfy_env, assets):
    """The ComfyUI stand-in with a tiny SD1.5 (diffusers folder), motion modules and LoRAs in its folders."""
    bridge.register_model_folders()
    models = comfy_env.base_dir / "models"
    shutil.copytree(assets.sd15.diffusers_dir, models / "diffusers" / "tiny_sd15")
    (models / "animatediff_models").mkdir(parents=True)
    shutil.copy(assets.modules["v3"].original_file, models / "animatediff_models")
    shutil.copytree(
        assets.modules["v2"].diffusers_dir, models / "animatediff_models" / "tiny_mm_v2_diffusers"
    )
    (models / "animatediff_motion_lora").mkdir()
    shutil.copy(assets.motion_lora, models / "animatediff_motion_lora")
    (models / "loras").mkdir(exist_ok=True)
    shutil.copy(assets.character_lora, models / "loras")
    yield comfy_env


OPTIONS = {
    "dtype": "auto",
    "attention": "sdpa",
    "vae_slicing": True,
    "vae_tiling": False,
    "cpu_offload": False,
    "compile": False,
}


def test_node_constants_match_the_engine():
    from charforge.engine.video import BETA_SCHEDULES, FORMATS, SCHEDULERS

    assert video_nodes.SCHEDULERS == SCHEDULERS and video_nodes.BETA_SCHEDULES == BETA_SCHEDULES
    assert tuple(FORMATS) == video_nodes.FORMATS


def test_model_choices_list_files_and_diffusers_folders(comfy):
    required = LoadVideoModel.INPUT_TYPES()["required"]
    assert "[diffusers] tiny_sd15" in required["base_model"][0]
    assert required["motion_module"][0] == ["tiny_mm_v3.safetensors", "[diffusers] tiny_mm_v2_diffusers"]
    assert "tiny_character.safetensors" in VideoLoRA.INPUT_TYPES()["required"]["lora_name"][0]
    assert MotionLoRA.INPUT_TYPES()["required"]["motion_lora"][0] == ["(none)", "tiny_zoom.safetensors"]


def test_user_flow_model_loras_generate_interpolate_save(comfy):
    loaded = run_node(
        LoadVideoModel, base_model="[diffusers] tiny_sd15", motion_module="tiny_mm_v3.safetensors", **OPTIONS
    )
    model, info = loaded.result
    assert "AnimateDiff v3 (SD1.5), original layout" in info and "on cpu" in info
    model = run_node(VideoLoRA, model=model, lora_name="tiny_character.safetensors", strength=0.8).result[0]
    model = run_node(MotionLoRA, model=model, motion_lora="tiny_zoom.safetensors", strength=1.0).result[0]
    assert len(model.loras) == 1 and len(model.motion_loras) == 1

    generated = run_node(
        GenerateVideo,
        node_id="7",
        model=model,
        prompt="0: a photo\n4: sks person",
        negative_prompt="blurry",
        frames=8,
        fps=8.0,
        width=64,
        height=64,
        steps=2,
        cfg=7.5,
        scheduler="ddim",
        seed=5,
        context_length=16,
        context_overlap=4,
    )
    frames, fps, report = generated.result
    assert frames.shape == (8, 64, 64, 3) and fps == 8.0
    assert (
        "LoRA tiny_character.safetensors x0.8" in report and "motion LoRA tiny_zoom.safetensors x1" in report
    )
    assert "frame 4: sks person" in report
    node_progress = [p for p in comfy.progress if p.node_id == "7"]
    assert [p.value for p in node_progress] == [1, 2, 3] and node_progress[-1].total == 3

    doubled, fps2 = run_node(InterpolateFrames, frames=frames, multiplier="2", fps=fps, loop=False).result
    assert doubled.shape == (15, 64, 64, 3) and fps2 == 16.0

    saved = run_node(
        SaveVideo,
        frames=doubled,
        fps=fps2,
        format="mp4",
        filename_prefix="video/hero",
        quality=80,
        loop_count=0,
        prompt={"1": {"class_type": "CharForgeGenerateVideo"}},
    )
    entry = {"filename": "hero_00001_.mp4", "subfolder": "video", "type": "output"}
    assert saved.ui == {"images": [entry], "animated": [True]}
    path = comfy.base_dir / "output" / "video" / "hero_00001_.mp4"
    assert saved.result == (str(path),)
    decoded = read_video(path)
    assert (decoded.frame_count, decoded.width, decoded.height, decoded.fps) == (15, 64, 64, 16.0)
    assert "CharForgeGenerateVideo" in decoded.metadata.get("comment", "")
    again = run_node(
        SaveVideo,
        frames=frames,
        fps=8.0,
        format="webp",
        filename_prefix="video/hero",
        quality=80,
        loop_count=0,
    )
    assert again.ui["images"][0]["filename"] == "hero_00002_.webp"  # one counter across formats


def test_diffusers_motion_folder_and_cancel(comfy):
    model = run_node(
        LoadVideoModel,
        base_model="[diffusers] tiny_sd15",
        motion_module="[diffusers] tiny_mm_v2_diffusers",
        **OPTIONS,
    ).result[0]
    comfy.interrupt()
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node(
            GenerateVideo,
            model=model,
            prompt="a photo",
            negative_prompt="",
            frames=8,
            fps=8.0,
            width=64,
            height=64,
            steps=3,
            cfg=7.5,
            scheduler="ddim",
            seed=1,
            context_length=16,
            context_overlap=4,
        )
    assert comfy.progress == []


def test_missing_motion_module_says_where_to_put_it(comfy_env):
    bridge.register_model_folders()
    choices = LoadVideoModel.INPUT_TYPES()["required"]["motion_module"][0]
    assert choices == ["(no motion modules found)"]
    with pytest.raises(bridge.ModelNotFoundError, match="animatediff_models"):
        run_node(LoadVideoModel, base_model="x.safetensors", motion_module=choices[0], **OPTIONS)


def test_video_lora_takes_a_linked_lora_name_from_training(comfy):
    """The optional lora_name_from STRING (Train LoRA's lora_name) replaces the combo; old graphs keep working."""
    from charforge.engine.video.models import VideoModelSpec

    spec = VideoLoRA.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "lora_name", "strength"]
    assert (
        spec["optional"]["lora_name_from"][0] == "STRING"
        and spec["optional"]["lora_name_from"][1]["forceInput"]
    )
    model = VideoModelSpec(base="base", motion_module="mm")
    linked = run_node(
        VideoLoRA, model=model, lora_name="(none)", strength=0.6, lora_name_from="tiny_character"
    ).result[0]
    path = comfy.base_dir / "models" / "loras" / "tiny_character.safetensors"
    assert [(Path(r.path), r.strength) for r in linked.loras] == [(path, 0.6)]
    assert (
        run_node(VideoLoRA, model=model, lora_name="(none)", strength=1.0, lora_name_from="").result[0]
        is model
    )
    with pytest.raises(bridge.ModelNotFoundError, match="not in the loras folder"):
        run_node(VideoLoRA, model=model, lora_name="(none)", strength=1.0, lora_name_from="other.safetensors")


def test_generate_video_with_control_frames_and_a_controlnet_file(comfy, assets):
    """A ControlNet from models/controlnet steers the clip as the engine does; control frames without a ControlNet
    are refused with a message; saved workflows without the new inputs still run."""
    import torch

    from cf_testing.controlnet_models import tiny_video_controlnet, write_ldm_controlnet

    unet_config = dict(assets.sd15.unet_config)
    write_ldm_controlnet(
        tiny_video_controlnet(unet_config),
        unet_config,
        comfy.base_dir / "models" / "controlnet" / "tiny_face.safetensors",
    )
    assert "tiny_face.safetensors" in GenerateVideo.INPUT_TYPES()["optional"]["controlnet"][0]
    model, _ = run_node(
        LoadVideoModel, base_model="[diffusers] tiny_sd15", motion_module="tiny_mm_v3.safetensors", **OPTIONS
    ).result
    common = dict(
        model=model,
        prompt="ohwx person",
        negative_prompt="",
        frames=4,
        fps=8.0,
        width=64,
        height=64,
        steps=2,
        cfg=7.5,
        scheduler="ddim",
        seed=1,
        context_length=0,
        context_overlap=0,
    )
    plain = run_node(GenerateVideo, **common).result[0]
    faces = torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    steered, _, info = run_node(
        GenerateVideo,
        **common,
        control_frames=faces,
        controlnet="tiny_face.safetensors",
        control_strength=0.8,
    ).result
    assert "ControlNet tiny_face.safetensors x0.8, steps 0 to 1" in info
    assert (steered - plain).abs().max() > 0.02
    weaker = run_node(
        GenerateVideo,
        **common,
        control_frames=faces,
        controlnet="tiny_face.safetensors",
        control_strength=0.2,
    ).result[0]
    assert 0 < (weaker - plain).abs().mean() < (steered - plain).abs().mean()
    with pytest.raises(ValueError, match="no ControlNet is chosen"):
        GenerateVideo().generate(**common, control_frames=faces)


def test_audio_schedule_drives_the_lora_strength_per_window(comfy):
    """Audio Schedule's schedule output into Generate Video's lora_strength_schedule: the LoRA strength of each
    context window follows the music (the mean over its frames); a schedule of 1.0 leaves the clip unchanged."""
    import numpy as np

    from cf_testing.audio_files import click_track, write_pcm
    from charforge.nodes.video_audio import AudioSchedule, LoadAudio

    samples, _ = click_track(120.0, 2.0, 44100)  # the first second: beats give 2.0, the rest 0.0
    (comfy.base_dir / "input").mkdir(parents=True, exist_ok=True)
    write_pcm(comfy.base_dir / "input" / "clicks.wav", samples, 44100)
    audio = run_node(LoadAudio, audio="clicks.wav", start=0.0, duration=0.0).result[0]
    values, schedule, _, count, _ = run_node(
        AudioSchedule, audio=audio, feature="beat", fps=8.0, frames=8, low=0.0, high=2.0, smooth=0.0,
        attack=0.0, release=0.0, invert=False,
    ).result  # fmt: skip
    assert count == 8 and max(values) == pytest.approx(2.0) and min(values) == pytest.approx(0.0)
    model, _ = run_node(
        LoadVideoModel, base_model="[diffusers] tiny_sd15", motion_module="tiny_mm_v3.safetensors", **OPTIONS
    ).result
    (model,) = run_node(VideoLoRA, model=model, lora_name="tiny_character.safetensors", strength=0.8).result
    common = dict(
        model=model, prompt="ohwx person", negative_prompt="", frames=8, fps=8.0, width=64, height=64, steps=2,
        cfg=7.5, scheduler="ddim", seed=1, context_length=4, context_overlap=0,
    )  # fmt: skip
    plain = run_node(GenerateVideo, **common).result[0]
    steered, _, info = run_node(GenerateVideo, **common, lora_strength_schedule=schedule).result
    means = [float(np.mean(values[:4])), float(np.mean(values[4:]))]
    assert means != [1.0, 1.0]
    assert f"LoRA strength x per window (all): {means[0]:.2f}, {means[1]:.2f}" in info
    assert (steered - plain).abs().max() > 0.01
    ones = "\n".join(f"{i}: 1.0" for i in range(8))
    same = run_node(GenerateVideo, **common, lora_strength_schedule=ones).result[0]
    assert torch.equal(same, plain)
