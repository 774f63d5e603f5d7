"""Preflight: FLOPs and activation memory traced on the meta device, the memory profile, clear refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from charforge.engine.train.config import preset_config, with_overrides
from charforge.engine.train.lora import LoraSettings
from charforge.engine.train.models import load_base_model, shipped_config_dir
from charforge.engine.train.preflight import (
    DeviceInfo,
    PreflightError,
    auto_profile,
    check,
    device_info,
    estimate,
    profile_unet,
)

GB = 2**30


pytestmark = pytest.mark.usefixtures("one_thread")  # cf_testing/threads.py


def _config(arch):
    return json.loads((shipped_config_dir(arch) / "unet" / "config.json").read_text())


def test_sd15_flops_match_the_reference_count():
    """docs/model-configs.md §9.2: SD1.5 LoRA step at 512 px = 1.726 TFLOP (frozen base, no adapter),
    forward 0.803; kohya-wide rank-16 adapters add a little."""
    profile = profile_unet(_config("sd15"), LoraSettings(rank=16, alpha=8), 1, (64, 64))
    assert profile.unet_parameters == 859_520_964
    assert profile.lora_parameters / 1e6 == pytest.approx(6.8, abs=0.06)
    assert profile.forward_flops / 1e12 == pytest.approx(0.803, rel=0.03)
    assert profile.flops / 1e12 == pytest.approx(1.726, rel=0.03)
    # Gradient checkpointing keeps far less: block inputs plus one block at a time.
    assert profile.saved_bytes_checkpointed < 0.5 * profile.saved_bytes
    assert profile.largest_saved_bytes < profile.saved_bytes_checkpointed


@pytest.fixture(scope="module")
def tiny_model(tiny_sdxl):
    return load_base_model(tiny_sdxl.diffusers_dir)


def _device(free_bytes, tflops=10.0):
    return DeviceInfo("cuda", "Test GPU", free_bytes, free_bytes, tflops)


def _tiny_config(**overrides):
    return with_overrides(
        preset_config("sdxl", "sdxl"),
        {"resolution": 64, "rank": 4, "alpha": 4.0, "mixed_precision": "no", **overrides},
    )


def test_estimate_parts_and_time(tiny_model):
    config = _tiny_config(steps=100)
    result = estimate(tiny_model, config, _device(8 * GB))
    assert set(result.parts) == {"unet weights", "vae weights", "lora + optimizer", "activations"}
    assert result.fits and result.peak_bytes > sum(result.parts.values())  # allocator slack on top
    assert result.seconds_per_step > 0 and result.total_seconds >= 100 * result.seconds_per_step
    uncached = estimate(
        tiny_model,
        replace(config, data=replace(config.data, cache_text_encoder_outputs=False)),
        _device(8 * GB),
    )
    assert "text encoder weights" in uncached.parts
    with_gc = estimate(tiny_model, replace(config, gradient_checkpointing=True), _device(8 * GB))
    assert with_gc.parts["activations"] < result.parts["activations"]
    assert with_gc.flops_per_step > result.flops_per_step  # the recomputed forward
    assert "estimated peak" in result.summary() and json.dumps(result.as_dict())


def test_auto_profile_turns_on_checkpointing_only_when_needed(tiny_model):
    config = _tiny_config()
    roomy = auto_profile(tiny_model, config, _device(8 * GB))
    assert not roomy.config.gradient_checkpointing and not roomy.notes
    plain = estimate(tiny_model, replace(config, gradient_checkpointing=False), _device(8 * GB))
    checkpointed = estimate(tiny_model, replace(config, gradient_checkpointing=True), _device(8 * GB))
    # A device with room for the checkpointed run only.
    budget = (
        max(checkpointed.peak_bytes, checkpointed.caching_peak_bytes)
        + max(plain.peak_bytes, plain.caching_peak_bytes)
    ) // 2
    tight = auto_profile(tiny_model, config, _device(int(budget / 0.92)))
    assert tight.config.gradient_checkpointing and "gradient checkpointing on" in tight.notes[0]


def test_refusal_names_the_numbers_and_the_options(tiny_model):
    with pytest.raises(PreflightError, match=r"does not fit.*Lower the resolution or rank"):
        auto_profile(tiny_model, _tiny_config(batch_size=4), _device(1024))
    with pytest.raises(PreflightError, match="gradient checkpointing"):
        check(tiny_model, _tiny_config(), _device(1024))


def test_cpu_device_info():
    info = device_info("cpu", torch.float32)
    assert info.kind == "cpu" and info.total_bytes >= info.free_bytes > 0 and info.matmul_tflops > 0
