"""What the loopback fakes (ComfyUI, RunPod, Replicate) share: an aiohttp app served on 127.0.0.1 from its own
event loop in a background thread, started and stopped from the test's thread (or used as a context manager).

A fake calls :meth:`LoopbackServer._init_loopback` in its ``__init__``, builds its app in ``_startup`` and
serves it with :meth:`_listen`, and undoes its own work in ``_shutdown`` before :meth:`_cleanup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

T = TypeVar("T", bound="LoopbackServer")


class LoopbackServer:
    #: the background thread's name, and how a failed start names the fake
    thread_name = "fake-server"
    what = "fake server"

    def _init_loopback(self, port: int = 0) -> None:
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._session: aiohttp.ClientSession | None = None  # for fakes that call out (set by _startup)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self: T) -> T:
        self._thread = threading.Thread(target=self._main, name=self.thread_name, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError(f"{self.what} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            with contextlib.suppress(Exception):  # best effort in teardown
                fut.result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self: T) -> T:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._startup())
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _startup(self) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        await self._cleanup()

    async def _listen(self, app: web.Application, *, client_session: bool = False) -> None:
        """Serve `app` on 127.0.0.1 (``self.port``, or a free port when 0) and note the port; with
        `client_session`, open ``self._session`` first for the fake's own outgoing requests."""
        if client_session:
            self._session = aiohttp.ClientSession()
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _cleanup(self, tasks: Iterable[asyncio.Task | None] = ()) -> None:
        """Cancel `tasks` (a fake's jobs in flight), close the outgoing session (if any) and stop serving."""
        for task in tasks:
            if task is not None:
                task.cancel()
        if self._session is not None:
            await self._session.close()
        assert self._runner is not None
        await self._runner.cleanup()


def throttled(knobs: Any) -> dict[str, str] | None:
    """Spend one of ``knobs.rate_limit_next`` (the 429 answers still to give): the answer's headers
    (``Retry-After`` when ``knobs.retry_after`` is set, else {}); None when no 429 is due."""
    if knobs.rate_limit_next <= 0:
        return None
    knobs.rate_limit_next -= 1
    return {"Retry-After": f"{knobs.retry_after:g}"} if knobs.retry_after else {}


async def history_entry(session: aiohttp.ClientSession, base: str, prompt_id: str, interval: float) -> Any:
    """Poll a ComfyUI's ``/history/<prompt_id>`` every `interval` seconds until the job is there; its entry."""
    while True:
        async with session.get(f"{base}/history/{prompt_id}") as resp:
            history = await resp.json()
        if prompt_id in history:
            return history[prompt_id]
        await asyncio.sleep(interval)
