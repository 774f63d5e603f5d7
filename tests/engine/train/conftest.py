"""Fixtures of the training tests: the tiny Flux.1 (built once per session, only when asked for)."""

from cf_testing.flow_models import tiny_flux  # noqa: F401 - a fixture
