"""How a long stage reports progress and learns that it should stop: one small object for every stage.

Training, video, scoring (and any other long engine function) take a `Control` and call

- ``control.progress(done, total, text=None)`` (or ``control.advance()``) as work gets done,
- ``control.check()`` where stopping is safe; it raises `Cancelled` when the user asked to stop,
- ``control.event(name, data)`` for structured updates a UI may show (training's loss and ETA).

`progress` checks too, so a loop that reports progress stops promptly. `Cancelled` is the one
cancellation type: broad ``except`` blocks re-raise it, and a stage that saves state on stop (training)
catches it, saves, and re-raises.

Inside ComfyUI the bridge builds the control (``bridge.control(...)``): progress goes to ComfyUI's
progress bar, events to the browser, and Cancel raises an exception that is both `Cancelled` and
ComfyUI's ``InterruptProcessingException``, so ComfyUI reports the run as interrupted. In plain Python
build one directly::

    control = Control(on_progress=lambda done, total, text: print(done, total, text),
                      should_stop=stop_event.is_set)

No ComfyUI and no torch here: the module is imported by the bridge and by every stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ProgressHook = Callable[[int, int, "str | None"], None]
EventHook = Callable[[str, dict[str, Any]], None]


class Cancelled(Exception):
    """The user stopped the work. Work that saves its state on stop (training) can be queued again to resume."""

    def __init__(self, message: str = "cancelled by request"):
        super().__init__(message)


class Control:
    """Progress reporting and the stop check of one long piece of work.

    `total` is what `advance` counts towards (a stage that knows its total calls `progress` with it).
    `should_stop()` is asked by `check`; `on_progress(done, total, text)` and `on_event(name, data)` get the
    updates. Every hook is optional: ``Control()`` reports nothing and never stops.
    """

    def __init__(
        self,
        on_progress: ProgressHook | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_event: EventHook | None = None,
        total: int = 0,
    ):
        self._on_progress = on_progress
        self._should_stop = should_stop
        self._on_event = on_event
        self.done = 0
        self.total = max(int(total), 0)

    def check(self) -> None:
        """Raise `Cancelled` when the user asked to stop."""
        if self._should_stop is not None and self._should_stop():
            raise Cancelled()

    def progress(self, done: int, total: int | None = None, text: str | None = None) -> None:
        """`done` of `total` units are finished (`total` defaults to the last one given); then `check`."""
        if total is not None:
            self.total = max(int(total), 1)
        self.done = min(int(done), self.total) if self.total else int(done)
        self._report(self.done, max(self.total, 1), text)
        self.check()

    def advance(self, n: int = 1, text: str | None = None) -> None:
        """`n` more units are finished."""
        self.progress(self.done + n, text=text)

    def event(self, name: str, data: dict[str, Any]) -> None:
        """A structured update (e.g. ``train.progress`` with step, loss, ETA) for whoever shows the work."""
        if self._on_event is not None:
            self._on_event(name, data)

    def _report(self, done: int, total: int, text: str | None) -> None:
        if self._on_progress is not None:
            self._on_progress(done, total, text)


def or_default(control: Control | None) -> Control:
    """`control`, or one that reports nothing and never stops."""
    return control if control is not None else Control()


__all__ = ["Cancelled", "Control", "or_default"]
