"""CharForge's transfer routes (nodes/transfer.py) served by the fake ComfyUI, on the ComfyUI stand-in's
folders: what a ComfyUI with the pack installed answers, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from fakes.comfy_server import FakeComfyServer, png_bytes


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


@contextlib.contextmanager
def lying_checksums() -> Iterator[None]:
    """While inside: the transfer routes' file index gives every file a wrong sha256 (a download must refuse it)."""
    from charforge.nodes import transfer

    real_index = transfer._index

    def lying_index(folder):
        index = real_index(folder)
        for meta in index["files"].values():
            meta["sha256"] = "0" * 64
        return index

    transfer._index = lying_index
    try:
        yield
    finally:
        transfer._index = real_index


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def tiny_models(pipeline: Any) -> Any:
    """The pipeline's model choice for a run on tiny models (what the remote-pipeline tests patch in)."""
    return pipeline.Models(
        tiny=True,
        checkpoint="tiny.safetensors",
        train_base="[diffusers] tiny",
        arch="sd15",
        tagger="t",
        clip="c",
        motion=None,
        faces=False,
    )


def sample_photos(tmp_path: Any) -> Any:
    """Two small photos of 'pip' in ``tmp_path/photos``."""

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, color in (("pip_1.png", (200, 0, 0)), ("pip_2.png", (0, 200, 0))):
        (photos / name).write_bytes(png_bytes(8, 8, color))
    return photos
