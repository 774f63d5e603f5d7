"""Showing a job's progress: rich bars on a terminal, plain lines otherwise, NDJSON with ``--json``.

Renderers only consume :class:`~charforge.driver.events.Event` objects; the client never prints.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from .events import Event
from .secrets import mask, mask_data
from .terminal import safe_json_line, safe_text


class JobView:
    """What the user wants to know about a running job, updated from events."""

    def __init__(self, prompt: dict[str, Any], nodes_to_run: list[str]) -> None:
        self.prompt = prompt
        self.nodes_to_run = list(nodes_to_run) or list(prompt)
        self.done: set[str] = set()
        self.current: str | None = None
        self.step: tuple[float, float] | None = None
        self.state = "submitting"
        self.ahead: int | None = None
        self.connection = "ok"

    @property
    def total(self) -> int:
        return len(self.nodes_to_run)

    def label(self, node_id: str | None) -> str:
        if node_id is None:
            return ""
        node = self.prompt.get(node_id) or {}
        cls = node.get("class_type", "?")
        title = (node.get("_meta") or {}).get("title")
        text = f'{node_id} "{title}" ({cls})' if title and title != cls else f"{node_id} ({cls})"
        return safe_text(text, one_line=True)  # ids, titles and types come from the workflow or the server

    def update(self, event: Event) -> None:
        kind = event.type
        if kind == "submitted":
            self.state = "queued"
        elif kind == "queue":
            self.state = "queued" if event.data.get("state") == "pending" else self.state
            self.ahead = event.data.get("ahead")
        elif kind == "execution_start":
            self.state = "running"
        elif kind == "execution_cached":
            self.done |= {str(n) for n in event.data.get("nodes") or []} & set(self.nodes_to_run)
        elif kind == "executing" and event.node is not None:
            if self.current is not None and self.current != event.node:
                self.done.add(self.current)
            self.state = "running"
            self.current = event.node
            self.step = None
        elif kind == "executed" and event.node is not None:
            self.done.add(event.node)
        elif kind == "progress":
            self.step = (float(event.data.get("value") or 0), float(event.data.get("max") or 0))
        elif kind in ("execution_success", "finished") or event.is_finished_marker:
            self.current = None
            self.step = None
            if self.state not in ("failed", "interrupted"):
                self.done |= set(self.nodes_to_run)
                self.state = "finished"
        elif kind == "execution_error":
            self.state = "failed"
        elif kind == "execution_interrupted":
            self.state = "interrupted"
        elif kind == "connection_lost":
            self.connection = "reconnecting"
        elif kind == "reconnected":
            self.connection = "ok"

    def status_text(self) -> str:
        if self.state == "queued":
            return "queued" + (f" ({self.ahead} ahead)" if self.ahead else "")
        if self.state == "running" and self.current:
            return f"running {self.label(self.current)}"
        return self.state


class Renderer:
    """Base renderer: override :meth:`handle`; :meth:`message` shows a one-off line."""

    def __init__(self, view: JobView | None = None) -> None:
        self.view = view

    def start(self) -> None:
        """Called before the first event."""

    def handle(self, event: Event) -> None:
        raise NotImplementedError

    def message(self, text: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Called when the job is over (also on errors)."""


class JsonRenderer(Renderer):
    """Newline-delimited JSON events on ``stream`` (stdout); progress throttled to 10 per second per node."""

    def __init__(self, stream: IO[str] | None = None, view: JobView | None = None) -> None:
        super().__init__(view)
        self.stream = stream or sys.stdout
        self._last: dict[tuple[str, str | None], float] = {}

    def emit(self, record: dict[str, Any]) -> None:
        line = json.dumps(mask_data(record), default=str, ensure_ascii=False)
        self.stream.write(safe_json_line(mask(line)) + "\n")
        self.stream.flush()

    def handle(self, event: Event) -> None:
        if self.view is not None:
            self.view.update(event)
        if event.type in ("progress", "progress_state", "preview"):
            key = (event.type, event.node)
            now = time.monotonic()
            last_step = event.data.get("value") == event.data.get("max")
            if not last_step and now - self._last.get(key, 0.0) < 0.1:
                return
            self._last[key] = now
        self.emit(event.to_json())

    def message(self, text: str) -> None:
        self.emit({"event": "message", "time": round(time.time(), 3), "data": {"text": text}})


class PlainRenderer(Renderer):
    """One line per meaningful change, for logs and pipes (no cursor movement)."""

    def __init__(self, stream: IO[str] | None = None, view: JobView | None = None) -> None:
        super().__init__(view)
        self.stream = stream or sys.stderr
        self._last_progress: dict[str | None, float] = {}

    def message(self, text: str) -> None:
        self.stream.write(f"[{time.strftime('%H:%M:%S')}] {safe_text(mask(text))}\n")
        self.stream.flush()

    def handle(self, event: Event) -> None:
        view = self.view
        if view is not None:
            view.update(event)
        label = view.label(event.node) if view is not None else (event.node or "")
        kind = event.type
        if kind == "submitted":
            self.message(f"queued as {event.prompt_id}")
        elif kind == "queue" and event.data.get("state") == "pending" and event.data.get("ahead"):
            self.message(f"waiting: {event.data['ahead']} job(s) ahead")
        elif kind == "execution_start":
            self.message("started")
        elif kind == "execution_cached" and event.data.get("nodes"):
            self.message(f"{len(event.data['nodes'])} node(s) cached")
        elif kind == "executing" and event.node is not None:
            done = f"[{len(view.done) + 1}/{view.total}] " if view is not None else ""
            self.message(f"{done}running {label}")
        elif kind == "progress":
            value, top = event.data.get("value", 0), event.data.get("max", 0)
            now = time.monotonic()
            if value == top or now - self._last_progress.get(event.node, 0.0) >= 2.0:
                self._last_progress[event.node] = now
                self.message(f"  {label}: {value}/{top}")
        elif kind == "execution_error":
            self.message(f"failed in {label}")
        elif kind == "execution_interrupted":
            self.message(f"interrupted in {label}")
        elif kind == "connection_lost":
            self.message(f"connection lost ({event.data.get('reason')}); reconnecting, polling meanwhile")
        elif kind == "reconnected":
            self.message("reconnected")
        elif kind == "server_unreachable":
            self.message(f"server unreachable: {event.data.get('reason')}")


class RichRenderer(Renderer):
    """Progress bars on a terminal: the whole workflow, and the steps of the running node."""

    def __init__(self, view: JobView, console: Any = None) -> None:
        super().__init__(view)
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console or Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._overall = self.progress.add_task("queued", total=view.total)
        self._node = self.progress.add_task("", total=1, visible=False)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self.progress.start()
            self._started = True

    def message(self, text: str) -> None:
        """``text`` is rich markup written by us; server-supplied parts must go through :func:`_shown`."""
        self.progress.console.print(safe_text(mask(text)))

    def handle(self, event: Event) -> None:
        view = self.view
        assert view is not None
        view.update(event)
        note = " [yellow](reconnecting)[/]" if view.connection != "ok" else ""
        self.progress.update(
            self._overall, completed=len(view.done), description=_shown(view.status_text()) + note
        )
        if view.step is not None and view.current is not None:
            value, top = view.step
            self.progress.update(
                self._node,
                completed=value,
                total=top or 1,
                visible=True,
                description=f"  steps of {_shown(view.current)}",
            )
        elif event.type == "executing" or view.current is None:
            self.progress.update(self._node, visible=False)
        if event.type == "execution_error":
            self.message(f"[red]failed in {_shown(view.label(event.node))}[/]")
        elif event.type == "connection_lost":
            self.message(f"[yellow]connection lost ({_shown(event.data.get('reason'))}); reconnecting[/]")

    def close(self) -> None:
        if self._started:
            self.progress.stop()
            self._started = False


def _shown(text: Any) -> str:
    """Server-supplied text inside rich markup: masked, control characters visible, brackets escaped."""
    from rich.markup import escape

    return escape(safe_text(mask(str(text)), one_line=True))


def make_renderer(
    mode: str, view: JobView, *, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> Renderer:
    """``mode``: "json", "rich", "plain", or "auto" (rich on a terminal, else plain)."""
    if mode == "json":
        return JsonRenderer(stdout or sys.stdout, view)
    err = stderr or sys.stderr
    if mode == "auto":
        mode = "rich" if getattr(err, "isatty", lambda: False)() else "plain"
    if mode == "rich":
        from rich.console import Console

        return RichRenderer(view, Console(file=err))
    return PlainRenderer(err, view)
