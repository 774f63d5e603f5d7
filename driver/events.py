"""Events seen while following a job: ComfyUI's WebSocket messages plus a few of the driver's own.

ComfyUI message types keep their server names (``execution_start``, ``executing``, ``progress``,
``executed``, ``execution_success``, ...). Driver events:

``submitted``        the prompt was accepted (``data``: prompt_id, number, node_errors)
``preview``          a binary preview frame (``data``: node_id, image_type; ``image`` holds the bytes)
``text``             a binary text frame (``data``: node_id, text)
``connection_lost``  the WebSocket dropped; the driver polls ``/history`` until it is back
``reconnected``      the WebSocket is back (same client id)
``finished``         the job is over; ``data`` has status and the outputs summary
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

#: ComfyUI messages that end a prompt (``executing`` with ``node: None`` also does).
TERMINAL_TYPES = frozenset({"execution_success", "execution_error", "execution_interrupted"})

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
_IMAGE_TYPES = {1: "image/jpeg", 2: "image/png"}


@dataclass
class Event:
    """One event of a job. ``prompt_id`` is None for server-wide messages such as ``status``."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    prompt_id: str | None = None
    time: float = field(default_factory=time.time)
    image: bytes | None = None

    @property
    def node(self) -> str | None:
        """The node the event is about, when it names one."""
        value = self.data.get("node", self.data.get("node_id"))
        return None if value is None else str(value)

    @property
    def is_finished_marker(self) -> bool:
        """``executing`` with ``node: null``: the prompt is over and its history entry is written."""
        return self.type == "executing" and "node" in self.data and self.data["node"] is None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (preview bytes are replaced by their length)."""
        out: dict[str, Any] = {"event": self.type, "time": round(self.time, 3)}
        if self.prompt_id is not None:
            out["prompt_id"] = self.prompt_id
        data = dict(self.data)
        if self.image is not None:
            data["bytes"] = len(self.image)
        out["data"] = data
        return out


def parse_text_message(raw: str) -> Event | None:
    """Parse a JSON WebSocket frame ``{"type": ..., "data": {...}}``; None for garbage."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return None
    data = message.get("data")
    if not isinstance(data, dict):
        data = {"value": data}
    prompt_id = data.get("prompt_id")
    return Event(message["type"], data, str(prompt_id) if prompt_id is not None else None)


def parse_binary_message(payload: bytes) -> Event | None:
    """Parse a binary frame: 4-byte big-endian type, then the payload (types 1, 3 and 4)."""
    if len(payload) < 4:
        return None
    (kind,) = struct.unpack(">I", payload[:4])
    body = payload[4:]
    if kind == PREVIEW_IMAGE and len(body) >= 4:
        (image_kind,) = struct.unpack(">I", body[:4])
        return Event(
            "preview",
            {"image_type": _IMAGE_TYPES.get(image_kind, "application/octet-stream")},
            image=body[4:],
        )
    if kind == PREVIEW_IMAGE_WITH_METADATA and len(body) >= 4:
        (meta_len,) = struct.unpack(">I", body[:4])
        try:
            meta = json.loads(body[4 : 4 + meta_len])
        except ValueError:
            return None
        if not isinstance(meta, dict):
            return None
        prompt_id = meta.get("prompt_id")
        return Event("preview", meta, str(prompt_id) if prompt_id else None, image=body[4 + meta_len :])
    if kind == TEXT and len(body) >= 4:
        (id_len,) = struct.unpack(">I", body[:4])
        node_id = body[4 : 4 + id_len].decode("utf-8", "replace")
        text = body[4 + id_len :].decode("utf-8", "replace")
        return Event("text", {"node_id": node_id, "text": text})
    return None
