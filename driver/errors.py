"""Typed exceptions of the driver.

Every error the driver raises derives from :class:`DriverError`; each class carries the process exit code the
``charforge`` command uses for it, so the CLI and the Python API agree on what went wrong:

==========================  ====  ===========================================================
exception                   exit  meaning
==========================  ====  ===========================================================
``ExecutionError``            1   a node raised while the server ran the workflow
``JobLost``                   1   the job vanished (server restarted, history cleared)
``UsageError`` and subclasses 2   bad arguments, config, workflow file, override, conversion
``ValidationError``           2   the workflow failed preflight or the server's validation
``ServerUnavailable``         3   the server cannot be reached
``AuthenticationError``       3   the server (or a proxy) refused our credentials
``ServerError``               3   the server answered something a ComfyUI server should not
``ProtocolError``             3   ... in the wrong shape, or more than the size limits allow
``JobTimeout``              124   the job did not finish within the wall-clock limit
``Interrupted``             130   the job was cancelled (by us or someone else)
==========================  ====  ===========================================================
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


class DriverError(Exception):
    """Base class of every error raised by ``charforge.driver``."""

    exit_code = 1


class UsageError(DriverError):
    """The request itself is wrong: arguments, configuration or a workflow file."""

    exit_code = 2


class ConfigError(UsageError):
    """A server URL, profile or config file is missing or malformed."""


class WorkflowError(UsageError):
    """A workflow file cannot be read or understood."""


class OverrideError(WorkflowError):
    """A ``--set``/``--input`` override does not address exactly one node input."""


class ConversionError(WorkflowError):
    """An editor (UI-format) workflow cannot be converted to the API format."""


class ServerUnavailable(DriverError):
    """The server cannot be reached (connection refused, DNS, TLS, proxy 502/503/504): worth trying again."""

    exit_code = 3


class AuthenticationError(DriverError):
    """The server (or the proxy in front of it) answered 401/403. A sibling of :class:`ServerUnavailable`, not a
    kind of it: asking again with the same credentials gets the same answer, so nothing retries it."""

    exit_code = 3


class ServerError(DriverError):
    """The server answered with an unexpected status or body."""

    exit_code = 3

    def __init__(self, message: str, *, status: int | None = None, body: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class ProtocolError(ServerError):
    """The server's answer breaks the ComfyUI protocol: JSON of the wrong shape, or a reply, file or WebSocket
    message over its size limit. Never retried: asking again would get the same answer."""


@dataclass
class NodeProblem:
    """One thing wrong with one node input (from preflight or from the server's validation)."""

    node_id: str
    class_type: str | None
    message: str
    input_name: str | None = None
    kind: str = "error"
    title: str | None = None
    severity: str = "error"
    details: dict[str, Any] = field(default_factory=dict)

    def node_label(self) -> str:
        """``node 3 "Title" (Class)`` as shown to users."""
        label = f"node {self.node_id}"
        if self.title and self.title != self.class_type:
            label += f' "{self.title}"'
        if self.class_type:
            label += f" ({self.class_type})"
        return label

    def __str__(self) -> str:
        where = f"{self.input_name}: " if self.input_name else ""
        return f"{self.node_label()}: {where}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "class_type": self.class_type,
            "title": self.title,
            "input": self.input_name,
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
        }


def format_problems(problems: Iterable[NodeProblem]) -> str:
    """Render problems grouped by node, one indented line per input."""
    lines: list[str] = []
    current = None
    for p in problems:
        if p.node_id != current:
            current = p.node_id
            lines.append(f"  {p.node_label()}:")
        where = f"{p.input_name}: " if p.input_name else ""
        marker = "-" if p.severity == "error" else "~ (warning)"
        lines.append(f"    {marker} {where}{p.message}")
    return "\n".join(lines)


class ValidationError(UsageError):
    """The workflow is invalid: found by preflight, or rejected by the server's ``POST /prompt`` validation.

    ``problems`` lists every per-node problem; ``error`` is the server's top-level error dict when the server
    rejected it; ``node_errors`` the server's raw ``node_errors``.
    """

    def __init__(
        self,
        summary: str,
        problems: list[NodeProblem] | None = None,
        *,
        error: dict[str, Any] | None = None,
        node_errors: dict[str, Any] | None = None,
        prompt_id: str | None = None,
        source: str = "server",
    ) -> None:
        self.summary = summary
        self.problems = list(problems or [])
        self.error = error
        self.node_errors = node_errors or {}
        self.prompt_id = prompt_id
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        if not self.problems:
            return self.summary
        return f"{self.summary}\n{format_problems(self.problems)}"

    @property
    def errors(self) -> list[NodeProblem]:
        return [p for p in self.problems if p.severity == "error"]


class JobError(DriverError):
    """Base of the outcomes of a submitted job that are not success."""

    def __init__(self, message: str, *, prompt_id: str) -> None:
        super().__init__(message)
        self.prompt_id = prompt_id


class ExecutionError(JobError):
    """A node raised while the server executed the workflow (``execution_error``)."""

    def __init__(
        self,
        *,
        prompt_id: str,
        node_id: str | None,
        node_type: str | None,
        exception_type: str,
        exception_message: str,
        traceback: list[str] | None = None,
        title: str | None = None,
        executed: list[str] | None = None,
    ) -> None:
        self.node_id = node_id
        self.node_type = node_type
        self.title = title
        self.exception_type = exception_type
        self.exception_message = exception_message
        self.traceback = list(traceback or [])
        self.executed = list(executed or [])
        where = f"node {node_id}"
        if title and title != node_type:
            where += f' "{title}"'
        if node_type:
            where += f" ({node_type})"
        super().__init__(
            f"{where} failed: {exception_type}: {exception_message.strip()}", prompt_id=prompt_id
        )


class Interrupted(JobError):
    """The job was interrupted or removed from the queue before finishing."""

    exit_code = 130

    def __init__(
        self, message: str, *, prompt_id: str, node_id: str | None = None, node_type: str | None = None
    ) -> None:
        super().__init__(message, prompt_id=prompt_id)
        self.node_id = node_id
        self.node_type = node_type


class JobTimeout(JobError):
    """The job did not finish within its wall-clock limit (queue wait included)."""

    exit_code = 124

    def __init__(self, message: str, *, prompt_id: str, seconds: float) -> None:
        super().__init__(message, prompt_id=prompt_id)
        self.seconds = seconds


class JobLost(JobError):
    """The job is neither queued, running nor in the history (the server restarted or history was cleared)."""


def close_matches(value: Any, choices: Iterable[Any], n: int = 3) -> list[str]:
    """Up to ``n`` choices that look like ``value`` (for "did you mean" hints)."""
    names = [str(c) for c in choices]
    text = str(value)
    found = difflib.get_close_matches(text, names, n=n, cutoff=0.5)
    if not found:
        lowered = text.lower()
        found = [c for c in names if lowered and (lowered in c.lower() or c.lower() in lowered)][:n]
    return found
