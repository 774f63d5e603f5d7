"""Fixtures of the driver tests: a fresh loopback fake ComfyUI per test, and clients bound to it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakes.comfy_server import FakeComfyServer

from charforge.driver.client import ComfyClient


@pytest.fixture
def fake_comfy() -> Iterator[FakeComfyServer]:
    """A fake ComfyUI 0.3.64 on 127.0.0.1 (random port), with its own temporary folders."""
    with FakeComfyServer() as server:
        yield server


@pytest.fixture
def prefixed_comfy() -> Iterator[FakeComfyServer]:
    """The fake server mounted below ``/comfy`` like behind a reverse proxy."""
    with FakeComfyServer(prefix="comfy") as server:
        yield server


@pytest.fixture
def client(fake_comfy: FakeComfyServer) -> Iterator[ComfyClient]:
    """A blocking client with short polling intervals (keeps the suite fast)."""
    with ComfyClient(fake_comfy.url, poll_interval=0.5) as c:
        yield c
