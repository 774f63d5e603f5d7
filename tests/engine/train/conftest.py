"""Fixtures of the training tests: the tiny Flux.1 (built once per session, only when asked for)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny random Flux.1-dev (`cf_testing.flow_models.TinyFlux`): diffusers folder + ComfyUI files."""
    from cf_testing.flow_models import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))
