"""Pytest fixtures for tiny models (session-scoped, built once per test run).

Each fixture builds on first use only, so a run that asks for none of them pays nothing (not even the
torch import: `cf_testing.models` is imported inside the fixtures). Tests must treat the returned files
as read-only: they are shared by every test of the session.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    """A tiny random SD1.5 (`cf_testing.models.TinyPipeline`): diffusers folder + single file, ~1 s."""
    from .models import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny random SDXL (`cf_testing.models.TinyPipeline`): diffusers folder + single file, ~1 s."""
    from .models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture
def train_env(comfy_env, tiny_sd15):
    """The ComfyUI stand-in (`comfy_env`) with the tiny SD1.5 as the diffusers model ``tiny_sd15`` and a kohya
    dataset of two photos in input/img/3_sks person."""
    import numpy as np

    from charforge import bridge

    from .photos import write_training_folder

    shutil.copytree(tiny_sd15.diffusers_dir, comfy_env.base_dir / "models" / "diffusers" / "tiny_sd15")
    write_training_folder(Path(bridge.input_directory()) / "img" / "3_sks person", np.random.default_rng(0))
    return comfy_env


def train_inputs(**changes):
    """Train LoRA's inputs for `train_env` (four steps of the tiny SD1.5 on its two photos, a sample at step 2),
    with `changes`."""
    overrides = {"sample_steps": 2, "mixed_precision": "no", "bucket_step": 32, "min_bucket": 32}
    inputs = {
        "base_model": "[diffusers] tiny_sd15",
        "dataset_folder": "img",
        "trigger_word": "sks",
        "output_name": "alice",
        "preset": "fast",
        "steps": 4,
        "learning_rate": 0.0,
        "rank": 4,
        "resolution": 64,
        "batch_size": 1,
        "seed": 0,
        "resume": "auto",
        "memory_profile": "off",
        "overrides": json.dumps(overrides),
    }
    return {**inputs, **changes}


@pytest.fixture(scope="session")
def sd15_comfy_checkpoint(tmp_path_factory):
    """A full-width, shallow SD1.5 single file ComfyUI detects as SD1.5 (`cf_testing.models.ComfyCheckpoint`;
    about 490 MB in fp16, 5-10 s to build). Only built when a test asks for it; mark such tests slow."""
    from .models import build_sd15_comfy_checkpoint

    return build_sd15_comfy_checkpoint(tmp_path_factory.mktemp("sd15_comfy") / "sd15_comfy.safetensors")


@pytest.fixture(scope="session")
def tiny_sd35(tmp_path_factory):
    """A tiny SD3.5 Medium of the real architecture in every layout (`cf_testing.sd3_models.TinySD3`): the
    diffusers folder, ComfyUI's separate files and the shipped configs."""
    from .sd3_models import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd35"), "sd35-medium")
