"""The WebSocket of one client (``/ws?clientId=<id>``): connects, reconnects with the same id, and hands each job's
events to whoever follows that job.

Messages are hints (progress, node starts, previews); completion is decided by the history (see
:mod:`charforge.driver.client`), so a dropped socket or a full queue loses nothing that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from ..config import REPLY_LIMIT_SETTING, ServerURL, mib
from ..events import Event, parse_binary_message, parse_text_message
from .http import TIMEOUT_ERRORS, describe_error

RECONNECT_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0, 5.0)


class EventSocket:
    """The listener task and the per-job event queues of one client."""

    def __init__(
        self,
        url: ServerURL,
        client_id: str,
        *,
        session: Callable[[], Awaitable[aiohttp.ClientSession]],
        redact: Callable[[str], str],
        max_message_bytes: int,
        ping_interval: float,
        connect_timeout: float | None,
    ) -> None:
        self.url = url
        self.client_id = client_id
        self._session = session
        self._redact = redact
        self.max_message_bytes = max_message_bytes
        self.ping_interval = ping_interval
        self.connect_timeout = connect_timeout
        #: True while the socket is connected (the client polls the history faster when it is not)
        self.ok = False
        self.error: str | None = None
        #: what the server announced in its ``feature_flags`` message
        self.server_features: dict[str, Any] = {}
        self._task: asyncio.Task | None = None
        self._ready: asyncio.Event | None = None
        self._closing = False
        self._subs: dict[str, asyncio.Queue[Event]] = {}
        self._running_prompt: str | None = None

    async def ensure(self) -> None:
        """Start the listener and wait (briefly) for its first connection attempt."""
        if self._task is None or self._task.done():
            self._closing = False
            self._ready = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name=f"comfy-ws-{self.client_id[:8]}")
        assert self._ready is not None
        with contextlib.suppress(*TIMEOUT_ERRORS):
            await asyncio.wait_for(self._ready.wait(), (self.connect_timeout or 10.0) + 1.0)

    async def close(self) -> None:
        """Stop the listener (a later :meth:`ensure` starts it again)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    def subscribe(self, prompt_id: str) -> asyncio.Queue[Event]:
        """The queue that receives the events of job ``prompt_id`` (created on first use)."""
        if prompt_id not in self._subs:
            self._subs[prompt_id] = asyncio.Queue(maxsize=10000)
        return self._subs[prompt_id]

    def forget(self, prompt_id: str) -> None:
        """Stop buffering events of a job nobody will wait for."""
        self._subs.pop(prompt_id, None)

    async def _loop(self) -> None:
        failures = 0
        connected_before = False
        lost_reported = False
        while not self._closing:
            try:
                session = await self._session()
                ws = await session.ws_connect(
                    self.url.ws(self.client_id),
                    heartbeat=self.ping_interval,
                    autoping=True,
                    max_msg_size=self.max_message_bytes,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means "retry later, poll meanwhile"
                self.ok = False
                self.error = self._redact(describe_error(exc))
                assert self._ready is not None
                self._ready.set()
                if not lost_reported:
                    lost_reported = True
                    self._broadcast(Event("connection_lost", {"reason": self.error, "reconnecting": True}))
                await asyncio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)])
                failures += 1
                continue
            failures = 0
            self.ok = True
            self.error = None
            with contextlib.suppress(Exception):  # a socket that dies at once is handled below
                await ws.send_str(
                    json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
                )
            assert self._ready is not None
            self._ready.set()
            if connected_before or lost_reported:
                self._broadcast(Event("reconnected", {"client_id": self.client_id}))
            connected_before = True
            lost_reported = False
            reason = "closed by the server"
            try:
                error: BaseException | None = None
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        event = parse_text_message(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        event = parse_binary_message(msg.data)
                    else:
                        if msg.type == aiohttp.WSMsgType.ERROR and isinstance(msg.data, BaseException):
                            error = msg.data
                        break
                    if event is not None:
                        self._dispatch(event)
                error = error or ws.exception()
                if ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG or (
                    isinstance(error, aiohttp.WebSocketError)
                    and error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
                ):
                    reason = (
                        f"the server sent a WebSocket message larger than {mib(self.max_message_bytes)}"
                        f", the limit ({REPLY_LIMIT_SETTING})"
                    )
                elif error is not None:
                    reason = describe_error(error)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await ws.close()
                raise
            except Exception as exc:  # noqa: BLE001
                reason = describe_error(exc)
            finally:
                self.ok = False
            with contextlib.suppress(Exception):
                await ws.close()
            if self._closing:
                break
            lost_reported = True
            self._broadcast(Event("connection_lost", {"reason": self._redact(reason), "reconnecting": True}))
            await asyncio.sleep(RECONNECT_DELAYS[0])

    def _dispatch(self, event: Event) -> None:
        if event.type == "feature_flags":
            self.server_features = dict(event.data)
            return
        if event.type == "status":
            self._broadcast(event)
            return
        if event.type == "execution_start" and event.prompt_id in self._subs:
            self._running_prompt = event.prompt_id
        prompt_id = event.prompt_id
        if prompt_id is None and event.type != "status":
            prompt_id = self._running_prompt
            event.prompt_id = prompt_id
        if prompt_id is not None and prompt_id in self._subs:
            self._put(self._subs[prompt_id], event)
        ends_prompt = event.is_finished_marker or event.type in ("execution_error", "execution_interrupted")
        if ends_prompt and self._running_prompt == prompt_id:
            self._running_prompt = None

    @staticmethod
    def _put(q: asyncio.Queue[Event], event: Event) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # history is the truth; a lost hint does no harm
            q.put_nowait(event)

    def _broadcast(self, event: Event) -> None:
        for q in self._subs.values():
            self._put(q, Event(event.type, dict(event.data), event.prompt_id, event.time))
