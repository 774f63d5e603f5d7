"""Pytest fixtures for tiny models (session-scoped, built once per test run).

Each fixture builds on first use only, so a run that asks for none of them pays nothing (not even the
torch import: `cf_testing.models` is imported inside the fixtures). Tests must treat the returned files
as read-only: they are shared by every test of the session.
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def sd15_comfy_checkpoint(tmp_path_factory):
    """A full-width, shallow SD1.5 single file ComfyUI detects as SD1.5 (`cf_testing.models.ComfyCheckpoint`;
    about 490 MB in fp16, 5-10 s to build). Only built when a test asks for it; mark such tests slow."""
    from .models import build_sd15_comfy_checkpoint

    return build_sd15_comfy_checkpoint(tmp_path_factory.mktemp("sd15_comfy") / "sd15_comfy.safetensors")
