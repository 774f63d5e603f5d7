"""Reading what ComfyUI keeps about jobs: a history entry becomes a :class:`~.models.JobResult` or the job's
failure, and malformed ``/history`` and ``/queue`` answers are refused with a :class:`ProtocolError` (never a
``KeyError`` deep inside the client)."""

from __future__ import annotations

import time
from typing import Any

from ..errors import ExecutionError, Interrupted, ProtocolError
from ..events import TERMINAL_TYPES
from .models import JobResult, Timings


def result_from_history(
    prompt_id: str,
    entry: dict[str, Any],
    *,
    submitted_at: float | None = None,
    node_errors: dict[str, Any] | None = None,
) -> JobResult:
    """Turn a history entry into a :class:`JobResult`, or raise the job's failure.

    Raises :class:`ExecutionError` (a node failed) or :class:`Interrupted` (interrupted/cancelled), and
    :class:`ProtocolError` when the entry does not have the shape ComfyUI gives it.
    """
    check_history_entry(prompt_id, entry)
    status = entry.get("status") or {}
    messages = status.get("messages") or []
    item = entry.get("prompt") or []
    prompt = item[2] if len(item) > 2 and isinstance(item[2], dict) else {}
    timings = Timings(submitted_at=submitted_at, observed_at=time.time())
    cached: list[str] = []
    failure: tuple[str, dict[str, Any]] | None = None
    for message in messages:
        if not isinstance(message, (list, tuple)) or len(message) != 2 or not isinstance(message[1], dict):
            continue
        kind, data = message
        stamp = data.get("timestamp")
        seconds = stamp / 1000.0 if isinstance(stamp, (int, float)) else None
        if kind == "execution_start":
            timings.started_at = seconds
        elif kind == "execution_cached":
            cached = [str(n) for n in data.get("nodes") or []]
        elif kind in TERMINAL_TYPES:
            timings.finished_at = seconds
            if kind != "execution_success":
                failure = (kind, data)
    if failure is not None:
        kind, data = failure
        node_id = data.get("node_id")
        node_id = None if node_id is None else str(node_id)
        node = prompt.get(node_id or "", {})
        title = (node.get("_meta") or {}).get("title")
        if kind == "execution_interrupted":
            where = f" at node {node_id} ({data.get('node_type')})" if node_id else ""
            raise Interrupted(
                f"job {prompt_id} was interrupted{where}",
                prompt_id=prompt_id,
                node_id=node_id,
                node_type=data.get("node_type"),
            )
        raise ExecutionError(
            prompt_id=prompt_id,
            node_id=node_id,
            node_type=data.get("node_type"),
            title=title,
            exception_type=str(data.get("exception_type") or "Error"),
            exception_message=str(data.get("exception_message") or ""),
            traceback=data.get("traceback"),
            executed=data.get("executed"),
        )
    if status and status.get("status_str") == "error":
        raise ExecutionError(
            prompt_id=prompt_id,
            node_id=None,
            node_type=None,
            exception_type="Error",
            exception_message="the server reports the job failed without details",
        )
    return JobResult(
        prompt_id=prompt_id,
        outputs=entry.get("outputs") or {},
        prompt=prompt,
        timings=timings,
        status=status,
        cached_nodes=cached,
        node_errors=dict(node_errors or {}),
        history=entry,
    )


_KINDS: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}


def describe_kind(value: Any) -> str:
    return "null" if value is None else _KINDS.get(type(value), type(value).__name__)


def check_history_entry(prompt_id: str, entry: Any, where: str = "the server") -> None:
    """Raise :class:`ProtocolError` unless ``entry`` has the shape of a ComfyUI history entry."""

    def bad(what: str, value: Any, expected: str) -> ProtocolError:
        return ProtocolError(
            f"the history entry of job {prompt_id} from {where} is malformed: {what} is "
            f"{describe_kind(value)}, expected {expected}; is this a ComfyUI server?"
        )

    if not isinstance(entry, dict):
        raise bad("the entry", entry, "an object")
    for key, kind, expected in (
        ("status", dict, "an object"),
        ("prompt", list, "a list"),
        ("outputs", dict, "an object"),
    ):
        value = entry.get(key)
        if value is not None and not isinstance(value, kind):
            raise bad(f"'{key}'", value, expected)
    messages = (entry.get("status") or {}).get("messages")
    if messages is not None and not isinstance(messages, list):
        raise bad("'status.messages'", messages, "a list")


def check_queue_items(items: Any, key: str, where: str) -> list[list[Any]]:
    if items is None:
        return []
    if not isinstance(items, list) or not all(
        isinstance(item, list)
        and len(item) >= 2
        and isinstance(item[0], (int, float))
        and isinstance(item[1], str)
        for item in items
    ):
        raise ProtocolError(
            f"GET /queue at {where} is malformed: '{key}' must be a list of "
            "[number, prompt_id, ...] items; is this a ComfyUI server?"
        )
    return items
