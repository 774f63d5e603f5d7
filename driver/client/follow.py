"""Following a job to its end: :class:`AsyncWatch` and the loop behind it.

How a job is followed (the recipe of the contract, section 5):

1. the WebSocket ``/ws?clientId=<our id>`` is opened *before* submitting, and kept alive with pings;
2. ``POST /prompt`` carries the same ``client_id`` and a ``prompt_id`` we chose (uuid4), so a submission whose
   answer was lost can be recognised in the queue/history instead of being sent twice;
3. WebSocket messages are hints (progress, node starts, previews); the history entry ``/history/<id>`` is the
   source of truth. It is fetched after ``executing {node: null}`` (or ``execution_error``/``_interrupted``),
   retried while it is still ``{}``, and polled periodically anyway, faster while the socket is down;
4. a dropped socket is reopened with the same client id; nothing is lost because completion is decided by the
   history, never by a message;
5. the job timeout is a wall-clock limit for the whole job, queue wait included.

Nothing here prints; events are handed to the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from ..errors import (
    AuthenticationError,
    DriverError,
    JobLost,
    JobTimeout,
    ProtocolError,
    ServerError,
    ServerUnavailable,
)
from ..events import Event
from .history import result_from_history
from .http import TIMEOUT_ERRORS
from .models import Job, JobResult
from .websocket import EventSocket


class JobSource(Protocol):
    """What following a job needs from a client (:class:`~.async_client.AsyncComfyClient` has it)."""

    poll_interval: float
    events: EventSocket

    @property
    def url(self) -> str: ...

    async def history(self, prompt_id: str | None = None, *, max_items: int | None = None) -> Any: ...

    async def job_state(self, prompt_id: str) -> tuple[str, int | None]: ...

    def forget(self, prompt_id: str) -> None: ...


class AsyncWatch:
    """Async iterator over the events of one job; ``result`` is set when it ended successfully."""

    def __init__(self, client: JobSource, job: Job | str, timeout: float | None) -> None:
        self.client = client
        self.job = job if isinstance(job, Job) else None
        self.prompt_id = job.prompt_id if isinstance(job, Job) else str(job)
        self.timeout = timeout
        self.result: JobResult | None = None
        self.running_node: str | None = None
        self.cached_nodes: list[str] = []
        self._iter: AsyncIterator[Event] | None = None

    def _observe(self, event: Event) -> None:
        if event.type == "execution_cached" and event.prompt_id == self.prompt_id:
            self.cached_nodes = [str(n) for n in event.data.get("nodes") or []]
        elif event.type == "executing" and event.prompt_id == self.prompt_id:
            self.running_node = event.node

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._iter is None:
            self._iter = follow(self.client, self)
        return self._iter


async def follow(client: JobSource, watch: AsyncWatch) -> AsyncIterator[Event]:
    """The events of ``watch``'s job until it ends (see the module docstring); sets ``watch.result``."""
    prompt_id = watch.prompt_id
    loop = asyncio.get_running_loop()
    deadline = None if watch.timeout is None else loop.time() + watch.timeout
    q = client.events.subscribe(prompt_id)
    await client.events.ensure()
    finished_hint = False
    history_misses = 0
    lost_checks = 0
    polls = 0
    # A job we just submitted cannot be finished yet; one we attach to may be.
    next_poll = loop.time() + (1.0 if watch.job is not None else 0.0)
    try:
        if watch.job is not None:
            yield Event(
                "submitted",
                {
                    "prompt_id": prompt_id,
                    "number": watch.job.number,
                    "node_errors": watch.job.node_errors,
                    "nodes": len(watch.job.prompt),
                },
                prompt_id,
                time=watch.job.submitted_at,
            )
        while True:
            now = loop.time()
            if deadline is not None and now >= deadline:
                raise JobTimeout(
                    f"job {prompt_id} did not finish within {watch.timeout:g} s",
                    prompt_id=prompt_id,
                    seconds=float(watch.timeout or 0),
                )
            wait_s = max(0.0, next_poll - now)
            if deadline is not None:
                wait_s = min(wait_s, max(0.0, deadline - now))
            event: Event | None = None
            try:
                event = q.get_nowait() if wait_s <= 0 else await asyncio.wait_for(q.get(), wait_s)
            except (asyncio.QueueEmpty, *TIMEOUT_ERRORS):
                event = None
            if event is not None:
                watch._observe(event)
                yield event
                ours = event.prompt_id == prompt_id
                if ours and (
                    event.is_finished_marker or event.type in ("execution_error", "execution_interrupted")
                ):
                    finished_hint = True
                    next_poll = loop.time()
                elif ours and event.type == "execution_success":
                    # History is written after this message; executing{node:null} follows it.
                    next_poll = min(next_poll, loop.time() + 0.5)
                elif event.type == "connection_lost":
                    next_poll = min(next_poll, loop.time() + 0.2)
                elif event.type == "reconnected":
                    next_poll = loop.time()
                continue
            # Poll the source of truth.
            polls += 1
            try:
                entry = await client.history(prompt_id)
            except (ServerUnavailable, ServerError) as exc:
                if isinstance(exc, ProtocolError):
                    raise
                yield Event("server_unreachable", {"reason": str(exc)}, prompt_id)
                next_poll = loop.time() + 2.0
                continue
            if entry is not None:
                watch.result = result_from_history(
                    prompt_id,
                    entry,
                    submitted_at=watch.job.submitted_at if watch.job else None,
                    node_errors=watch.job.node_errors if watch.job else None,
                )
                yield Event(
                    "finished",
                    {
                        "status": "success",
                        "files": len(watch.result.files),
                        "cached_nodes": watch.result.cached_nodes,
                        "timings": watch.result.timings.to_dict(),
                    },
                    prompt_id,
                )
                return
            if finished_hint:
                history_misses += 1
                if history_misses > 40:
                    raise JobLost(
                        f"job {prompt_id} finished but its history entry never appeared", prompt_id=prompt_id
                    )
                if history_misses >= 3 and (await _safe_state(client, prompt_id))[0] == "unknown":
                    lost_checks += 1  # not even queued or running: the history was cleared (restart)
                    if lost_checks >= 3:
                        raise JobLost(
                            f"job {prompt_id} finished but {client.url} no longer knows it (was the "
                            "server restarted or its history cleared?)",
                            prompt_id=prompt_id,
                        )
                next_poll = loop.time() + min(0.05 * 2**history_misses, 1.0)
                continue
            # Without a socket, or for a job submitted by another client (its messages never reach us),
            # the history is all we have: poll it every second.
            fast = not client.events.ok or watch.job is None
            if fast or polls % 3 == 1 or lost_checks:
                state, ahead = await _safe_state(client, prompt_id)
                if state == "unknown":
                    lost_checks += 1
                    if lost_checks >= 3:
                        raise JobLost(
                            f"job {prompt_id} is not queued, running or in the history of {client.url} "
                            "(was the server restarted or the queue cleared?)",
                            prompt_id=prompt_id,
                        )
                    next_poll = loop.time() + 0.5
                    continue
                lost_checks = 0
                if state in ("pending", "running"):
                    yield Event("queue", {"state": state, "ahead": ahead}, prompt_id)
            next_poll = loop.time() + (min(1.0, client.poll_interval) if fast else client.poll_interval)
    finally:
        client.forget(prompt_id)


async def _safe_state(client: JobSource, prompt_id: str) -> tuple[str, int | None]:
    try:
        return await client.job_state(prompt_id)
    except (AuthenticationError, ProtocolError):
        raise
    except DriverError:
        return "unreachable", None
