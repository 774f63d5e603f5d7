"""The four basic training settings (steps, learning rate, rank, resolution) and the node's defaults."""

from __future__ import annotations

from charforge.engine.train.config import fit_warmup, ignored_basic_settings, preset_config, with_overrides
from charforge.engine.train.presets import BASIC_DEFAULTS, basic_settings


def test_node_shows_the_default_presets_real_values():
    from charforge.nodes import train as node

    spec = node.TrainLoRA.INPUT_TYPES()
    required, optional = spec["required"], spec["optional"]
    assert required["preset"][1]["default"] == "sdxl"
    sdxl = preset_config("sdxl", "sdxl")
    shown = {name: required[name][1]["default"] for name in ("steps", "learning_rate", "rank", "resolution")}
    assert shown == {
        "steps": sdxl.steps,
        "learning_rate": sdxl.optim.learning_rate,
        "rank": sdxl.lora.rank,
        "resolution": sdxl.data.resolution,
    }
    assert shown == BASIC_DEFAULTS and all(value > 0 for value in shown.values())
    assert (
        optional["use_preset_values"][0] == "BOOLEAN" and optional["use_preset_values"][1]["default"] is True
    )
    # Saved editor workflows store widget values by position: newer widgets come after older ones.
    names = list(optional)
    assert names == ["dataset", "overrides", "save_character", "use_preset_values", *names[4:]]
    assert names[4:] == ["clip_l", "t5xxl", "clip_g", "vae", "lora_layout"]  # Flux.1 / SD3 parts (issue 18)


def test_preset_values_ignore_the_numbers():
    assert (
        basic_settings(steps=800, learning_rate=2e-4, rank=16, resolution=512, use_preset_values=True) == {}
    )


def test_own_values_and_what_follows_from_them():
    settings = basic_settings(steps=800, learning_rate=2e-4, rank=16, resolution=512, use_preset_values=False)
    assert settings == {
        "steps": 800,
        "learning_rate": 2e-4,
        "rank": 16,
        "alpha": 8.0,
        "resolution": 512,
        "min_bucket": 128,
        "max_bucket": 1024,
    }
    assert basic_settings(steps=0, learning_rate=0.0, rank=1, resolution=64, use_preset_values=False) == {
        "rank": 1,
        "alpha": 1.0,
        "resolution": 64,
        "min_bucket": 64,
        "max_bucket": 128,
    }


def test_prompts_without_the_choice_use_every_non_zero_number():
    # API prompts written before use_preset_values existed: 0 = the preset's, numbers win (as before).
    assert basic_settings(steps=4, learning_rate=0.0, rank=4, resolution=0) == {
        "steps": 4,
        "rank": 4,
        "alpha": 2.0,
    }
    assert basic_settings(steps=0, learning_rate=0.0, rank=0, resolution=0) == {}


def test_ignored_numbers_are_named():
    config = preset_config("fast", "sd15")
    assert ignored_basic_settings(config, steps=1500, learning_rate=1e-4, rank=32, resolution=1024) == [
        "steps 1500",
        "learning_rate 0.0001",
        "rank 32",
        "resolution 1024",
    ]
    assert ignored_basic_settings(config, steps=500, learning_rate=0.0, rank=16, resolution=512) == []


def test_short_runs_get_a_shorter_warmup():
    config = preset_config("sdxl", "sdxl")
    assert fit_warmup(config) is config
    short = fit_warmup(with_overrides(config, {"steps": 40}))
    assert short.optim.warmup_steps == 4
