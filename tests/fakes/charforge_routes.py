"""CharForge's transfer routes (nodes/transfer.py) served by the fake ComfyUI, on the ComfyUI stand-in's
folders: what a ComfyUI with the pack installed answers, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from fakes.comfy_server import FakeComfyServer


@contextlib.contextmanager
def transfer_server(comfy_env: Any, **options: Any) -> Iterator[FakeComfyServer]:
    from charforge import bridge
    from charforge.nodes import transfer

    bridge.register_model_folders()
    assert transfer.register_routes()
    transfer._downloads.clear()
    transfer._hash_caches.clear()
    transfer._upload_locks.clear()
    routes = tuple(r for r in comfy_env.server.routes.registered if r[1].startswith("/charforge/transfer"))
    with FakeComfyServer(root=comfy_env.base_dir, extra_routes=routes, **options) as server:
        yield server


def run(coro: Any) -> Any:
    return asyncio.run(coro)
