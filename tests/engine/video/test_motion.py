"""Motion modules and motion LoRAs: both layouts, version detection, conversion both ways; plus the
small pure pieces of the sampler (prompt schedules, context windows, schedulers)."""

import pytest
import torch

from cf_testing.video_models import video_assets
from charforge.engine.video.context import context_windows, window_weights
from charforge.engine.video.motion import (
    MotionModuleError,
    diffusers_to_original,
    inspect_motion_module,
    inspect_state_dict,
    load_motion_adapter,
    load_motion_lora,
    motion_lora_to_diffusers,
    motion_lora_to_original,
    original_to_diffusers,
    read_weights,
)
from charforge.engine.video.prompts import frame_blends, parse_prompt_schedule
from charforge.engine.video.schedulers import SCHEDULERS, make_scheduler


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return video_assets(tmp_path_factory.getbasetemp() / "video_assets")


@pytest.mark.parametrize(
    ("version", "mid", "frames", "levels"),
    [("v1", False, 24, 4), ("v2", True, 32, 4), ("v3", False, 32, 4), ("sdxl", False, 32, 3)],
)
def test_version_is_read_from_the_weights_in_both_layouts(assets, version, mid, frames, levels):
    module = assets.modules[version]
    for path, layout in ((module.original_file, "original"), (module.diffusers_dir, "diffusers")):
        info = inspect_motion_module(path)
        assert (info.version, info.layout, info.has_mid_block, info.max_frames) == (
            version,
            layout,
            mid,
            frames,
        )
        assert len(info.block_out_channels) == levels
        assert info.base == ("sdxl" if version == "sdxl" else "sd15")
    assert (
        inspect_motion_module(assets.modules["v2"].original_ckpt).version == "v2"
    )  # pickled .ckpt, as published


def test_original_layout_is_what_animatediff_evolved_reads(assets):
    """Every key under temporal_transformer (ADE drops keys without 'temporal'), one positional table per
    attention block of shape [1, L, C]."""
    state = read_weights(assets.modules["v2"].original_file)
    assert all("temporal" in key for key in state)
    assert any(key.startswith("mid_block.motion_modules.0.temporal_transformer.") for key in state)
    table = state[
        "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
        "attention_blocks.1.pos_encoder.pe"
    ]
    assert tuple(table.shape) == (1, 32, 32)
    for name in (
        "norms.0.weight",
        "norms.1.bias",
        "ff_norm.weight",
        "attention_blocks.0.to_q.weight",
        "attention_blocks.1.to_out.0.bias",
        "ff.net.0.proj.weight",
        "ff.net.2.weight",
    ):
        assert f"up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.{name}" in state


def test_conversion_round_trips_and_loads_every_tensor(assets):
    module = assets.modules["v3"]
    adapter_original, _ = load_motion_adapter(module.original_file)
    adapter_diffusers, _ = load_motion_adapter(module.diffusers_dir)
    a, b = adapter_original.state_dict(), adapter_diffusers.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    original = diffusers_to_original(b)
    back = original_to_diffusers(original)
    assert back.keys() == b.keys() and all(torch.equal(back[k], b[k]) for k in b)


def test_files_that_are_not_animatediff_modules_are_named(tmp_path):
    from safetensors.torch import save_file

    cases = {
        "hotshot.safetensors": {
            "down_blocks.0.temporal_attentions.0.positional_encoding": torch.zeros(1, 8, 4)
        },
        "checkpoint.safetensors": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
        "other.safetensors": {"encoder.weight": torch.zeros(2)},
    }
    messages = {
        "hotshot.safetensors": "not HotShot-XL's layout",
        "checkpoint.safetensors": "checkpoints folder",
        "other.safetensors": "no AnimateDiff",
    }
    for name, tensors in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(MotionModuleError, match=messages[name]):
            inspect_motion_module(tmp_path / name)
    # A module without positional tables (AnimateLCM style) is refused with the reason.
    prefix = "down_blocks.{}.motion_modules.0.temporal_transformer."
    no_pe = {prefix.format(i) + "norm.weight": torch.zeros(8) for i in range(4)}
    with pytest.raises(MotionModuleError, match="AnimateLCM"):
        inspect_state_dict(no_pe)
    with pytest.raises(MotionModuleError, match="do not belong"):
        original_to_diffusers(
            {prefix.format(0) + "transformer_blocks.0.attention_blocks.0.bogus.weight": torch.zeros(1)}
        )


def test_motion_lora_formats(assets):
    converted = load_motion_lora(assets.motion_lora)
    assert converted and all(k.startswith("unet.") and ".motion_modules." in k for k in converted)
    assert any(k.endswith("attn2.to_out.0.lora_B.weight") for k in converted)
    original = motion_lora_to_original(converted)
    assert any(k.endswith("attention_blocks.1.processor.to_out_lora.up.weight") for k in original)
    assert motion_lora_to_diffusers(original).keys() == converted.keys()
    with pytest.raises(MotionModuleError, match="not motion-LoRA keys"):
        motion_lora_to_diffusers({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------------------------
# Prompt schedules, windows, schedulers


def test_prompt_schedule_parsing_and_blending():
    keyframes = parse_prompt_schedule('"0": "smiling",\n"8": "waving",\nphoto, golden hour\n')
    assert [(k.frame, k.prompt) for k in keyframes] == [
        (0, "smiling, photo, golden hour"),
        (8, "waving, photo, golden hour"),
    ]
    blends = frame_blends(keyframes, 12)
    assert (blends[0].first, blends[0].t) == (0, 0.0)
    assert (blends[4].first, blends[4].second, blends[4].t) == (0, 1, 0.5)
    assert (blends[8].first, blends[8].second) == (1, 1) and blends[11].first == 1
    assert [k.prompt for k in parse_prompt_schedule("a cat\non a mat")] == ["a cat, on a mat"]
    hard = frame_blends(keyframes, 12, blend=False)
    assert hard[7].t == 0.0 and hard[7].first == 0


def test_context_windows_cover_every_frame_and_end_on_the_last():
    windows = context_windows(48, 16, 4)
    assert windows[0] == list(range(16)) and windows[-1] == list(range(32, 48))
    assert all(len(w) == 16 for w in windows) and {f for w in windows for f in w} == set(range(48))
    assert context_windows(10, 16, 4) == [list(range(10))]
    looped = context_windows(24, 8, 2, loop=True)
    assert looped[-1][-1] == (looped[-1][0] + 7) % 24 and any(0 in w and 23 in w for w in looped)
    weights = window_weights(8)
    assert weights.tolist() == [1, 2, 3, 4, 4, 3, 2, 1]
    with pytest.raises(ValueError, match="overlap"):
        context_windows(40, 8, 8)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedulers_use_the_animatediff_betas(name):
    scheduler = make_scheduler(
        name, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    )
    assert scheduler.config.beta_schedule == "linear"
    assert scheduler.config.timestep_spacing == "linspace"
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) >= 10
    assert (
        make_scheduler(name, {"beta_schedule": "scaled_linear"}, "base").config.beta_schedule
        == "scaled_linear"
    )
