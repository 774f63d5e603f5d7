"""Pytest fixtures for tiny models (session-scoped, built once per test run).

Each fixture builds on first use only, so a run that asks for none of them pays nothing. Tests must treat
the returned files as read-only: they are shared by every test of the session.
"""

from __future__ import annotations

import pytest

from .models import (
    ComfyCheckpoint,
    TinyPipeline,
    build_sd15_comfy_checkpoint,
    build_tiny_sd15,
    build_tiny_sdxl,
)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> TinyPipeline:
    """A tiny random SD1.5: diffusers folder + single-file checkpoint (about 1 s to build)."""
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> TinyPipeline:
    """A tiny random SDXL: diffusers folder + single-file checkpoint (about 1 s to build)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def sd15_comfy_checkpoint(tmp_path_factory) -> ComfyCheckpoint:
    """A full-width, shallow SD1.5 single file ComfyUI detects as SD1.5 (about 0.5 GB, ~10 s to build)."""
    return build_sd15_comfy_checkpoint(tmp_path_factory.mktemp("sd15_comfy") / "sd15_comfy.safetensors")
