"""What the client hands back: network timeouts, a submitted :class:`Job`, a finished :class:`JobResult` with its
:class:`Timings`, and where an upload was stored (:class:`UploadedFile`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..outputs import NodeValues, OutputFile, collect_files, collect_values


@dataclass(frozen=True)
class Timeout:
    """Per-request network timeouts in seconds (``None`` = no limit). The *job* limit is separate."""

    connect: float | None = 10.0
    read: float | None = 60.0


@dataclass
class Job:
    """A submitted prompt."""

    prompt_id: str
    number: float | None
    client_id: str
    submitted_at: float
    prompt: dict[str, Any]
    node_errors: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timings:
    """Epoch seconds; ``started_at``/``finished_at`` come from the server's message timestamps."""

    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    observed_at: float | None = None

    @property
    def queued_seconds(self) -> float | None:
        if self.submitted_at is None or self.started_at is None:
            return None
        return max(0.0, self.started_at - self.submitted_at)

    @property
    def execution_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        def iso(t: float | None) -> str | None:
            if t is None:
                return None
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"

        return {
            "submitted_at": iso(self.submitted_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "queued_seconds": _round(self.queued_seconds),
            "execution_seconds": _round(self.execution_seconds),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class JobResult:
    """A finished, successful job, built from its history entry."""

    prompt_id: str
    outputs: dict[str, Any]
    prompt: dict[str, Any]
    timings: Timings
    status: dict[str, Any] = field(default_factory=dict)
    cached_nodes: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[OutputFile]:
        """Every file output (images, animations under ``images`` + ``animated``, gifs, audio, video...)."""
        return collect_files(self.outputs)

    @property
    def values(self) -> list[NodeValues]:
        """Text and number outputs."""
        return collect_values(self.outputs)

    def node_class(self, node_id: str) -> str | None:
        node = self.prompt.get(str(node_id)) or {}
        return node.get("class_type")

    def node_title(self, node_id: str) -> str | None:
        node = self.prompt.get(str(node_id)) or {}
        return (node.get("_meta") or {}).get("title")


@dataclass(frozen=True)
class UploadedFile:
    """Where the server stored an upload. ``reference`` is the value for a LoadImage-like input."""

    name: str
    subfolder: str = ""
    type: str = "input"

    @property
    def reference(self) -> str:
        ref = f"{self.subfolder}/{self.name}" if self.subfolder else self.name
        return ref if self.type == "input" else f"{ref} [{self.type}]"
