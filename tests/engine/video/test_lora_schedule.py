"""LoRA strength schedules per context window: each window's U-Net calls run at strength x the mean of the
schedule over its frames, for character and motion LoRAs; a schedule of 1.0 is the plain clip bit for bit."""

import pytest
import torch

from charforge.engine.video import (
    ContextOptions,
    RuntimeOptions,
    VideoModelSpec,
    VideoRequest,
    generate_video,
    load_video_model,
)
from charforge.engine.video.lora_schedule import LoraSchedule

SIZE, FRAMES = 64, 8
pytestmark = pytest.mark.usefixtures("one_thread")


def spec(assets, motion_strength=1.0):
    tiny = assets.sd15
    return (
        VideoModelSpec(
            base=str(tiny.single_file),
            motion_module=str(assets.modules["v2"].original_file),
            config_dir=str(tiny.diffusers_dir),
            tokenizer_dirs=(str(tiny.diffusers_dir / "tokenizer"),),
            options=RuntimeOptions(device="cpu", dtype="fp32"),
        )
        .with_lora(str(assets.character_lora), 0.8)
        .with_motion_lora(str(assets.motion_lora), motion_strength)
    )


def _scale(unet, adapter: str, motion: bool) -> float:
    for name, module in unet.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter in scaling and ("motion_modules" in name) == motion:
            return float(scaling[adapter])
    raise AssertionError(f"no layer of adapter {adapter}")


def clip(assets, schedule=None, record=None, motion_strength=1.0):
    model, _ = load_video_model(spec(assets, motion_strength))
    names = {kind: name for name, (kind, _) in model.lora_strengths.items()}
    if record is not None:

        def recording(*args, **kwargs):
            record.append(
                (_scale(model.unet, names["lora"], False), _scale(model.unet, names["motion"], True))
            )
            return model.unet(*args, **kwargs)

        model._unet_call = recording
    try:
        request = VideoRequest(
            prompt="a photo of sks person", frames=FRAMES, width=SIZE, height=SIZE, steps=2, seed=3,
            context=ContextOptions(length=4, overlap=0), lora_schedule=schedule,
        )  # fmt: skip
        result = generate_video(model, request)
    finally:
        model._unet_call = None
    return result, model, names


def test_a_constant_schedule_is_the_plain_strength_bit_for_bit(assets):
    plain, _, _ = clip(assets)
    constant, _, _ = clip(assets, LoraSchedule([1.0] * FRAMES, "all"))
    assert torch.equal(plain.frames, constant.frames)
    # A constant 0.5 on the motion LoRA (no text-encoder layers) is the motion LoRA at half strength, exactly.
    half, _, _ = clip(assets, motion_strength=0.5)
    scheduled_half, _, _ = clip(assets, LoraSchedule([0.5] * FRAMES, "motion"))
    assert torch.equal(half.frames, scheduled_half.frames) and not torch.equal(half.frames, plain.frames)


def test_a_planted_schedule_sets_each_windows_scale_and_comes_off(assets):
    plain_calls: list = []
    plain, model, names = clip(assets, record=plain_calls)
    lora_base, motion_base = plain_calls[0]
    assert all(c == (lora_base, motion_base) for c in plain_calls) and lora_base != 0

    calls: list = []
    values = [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]  # window means 0.25 and 1.0
    scheduled, model, _ = clip(assets, LoraSchedule(values, "lora"), record=calls)
    # Two steps x two windows, in order: window 1 at 0.25 x the strength, window 2 at the plain strength.
    assert [round(c[0] / lora_base, 6) for c in calls] == [0.25, 1.0, 0.25, 1.0]
    assert all(c[1] == motion_base for c in calls)  # the motion LoRA is not targeted
    assert scheduled.info["lora_schedule"]["window_means"] == [0.25, 1.0]
    # Window 1 changed; window 2 (no overlap, the plain strength) is the plain clip's, exactly.
    assert (scheduled.frames[:4] - plain.frames[:4]).abs().max() > 0.01
    assert torch.equal(scheduled.frames[4:], plain.frames[4:])
    # The plain strengths are back on the model afterwards.
    assert _scale(model.unet, names["lora"], False) == lora_base

    motion_calls: list = []
    clip(assets, LoraSchedule([2.0] * 4 + [0.0] * 4, "motion"), record=motion_calls)
    assert [round(c[1] / motion_base, 6) for c in motion_calls] == [2.0, 0.0, 2.0, 0.0]
    assert all(c[0] == lora_base for c in motion_calls)


def test_a_schedule_of_the_wrong_length_is_refused(assets):
    with pytest.raises(ValueError, match="3 values for 8 frames"):
        clip(assets, LoraSchedule([1.0] * 3))
