"""Batches from Python: :class:`Batch` builds or plans the jobs and runs them on a pool of servers, as an iterator
(in a background event loop) or an async iterator, exactly like ``charforge batch run`` (same folder, journal and
resume)."""

from __future__ import annotations

import asyncio
import contextlib
import queue as thread_queue
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from .plan import BatchPlan, Job, load_batch
from .run_types import JobOutcome, RunOptions
from .runner import BatchRunner
from .targets import ComfyTarget, Target


def make_targets(servers: list[Any], *, capacity: int = 2) -> list[Target]:
    """Targets from URLs, :class:`~charforge.driver.config.ServerConfig` objects or ready :class:`Target` s."""
    targets: list[Target] = []
    for server in servers:
        if isinstance(server, Target) and not isinstance(server, (str, bytes)):
            targets.append(server)
        else:
            targets.append(ComfyTarget(server, capacity=capacity))
    return targets


class _Handover(Enum):
    """What the batch's event-loop thread hands to the thread iterating :meth:`Batch.run`."""

    OUTCOME = "outcome"  # a job ended: its JobOutcome follows
    ERROR = "error"  # the run failed: the exception follows
    END = "end"  # the run is over


class Batch:
    """A batch you can build in code and run: ``for r in Batch.from_file("sweep.yaml").run(servers=[url],
    out="out"): print(r.folder, r.state)``.

    ``run`` yields a :class:`JobOutcome` per job as jobs end (jobs finished by an earlier run of the same
    ``out`` first, with ``skipped=True``); ``run_async`` is the same as an async iterator. Both write the
    journal, the per-job folders and ``summary.json`` exactly like ``charforge batch run``, and resume the same
    way.
    """

    def __init__(
        self, jobs: list[Job] | BatchPlan, *, source: str = "<python>", base: str | Path | None = None
    ):
        self.plan = jobs if isinstance(jobs, BatchPlan) else BatchPlan(source, "python", list(jobs))
        self.base = Path(base) if base is not None else None

    @classmethod
    def from_file(cls, path: str | Path, *, master_seed: int | None = None) -> Batch:
        """Plan a ``.jsonl`` batch or a sweep spec (see :func:`~charforge.driver.batch.plan.load_batch`)."""
        return cls(load_batch(path, master_seed=master_seed), base=Path(path).parent)

    @property
    def jobs(self) -> list[Job]:
        return self.plan.jobs

    def __len__(self) -> int:
        return len(self.plan.jobs)

    def runner(
        self,
        servers: list[Any],
        out: str | Path,
        *,
        capacity: int = 2,
        on_message: Callable[[str], None] | None = None,
        **options: Any,
    ) -> BatchRunner:
        return BatchRunner(
            self.plan,
            make_targets(servers, capacity=capacity),
            RunOptions(Path(out), **options),
            base=self.base,
            on_message=on_message,
        )

    async def run_async(
        self, servers: list[Any], out: str | Path, **options: Any
    ) -> AsyncGenerator[JobOutcome, None]:
        """Async version of :meth:`run`."""
        async with contextlib.aclosing(self.runner(servers, out, **options).run()) as outcomes:
            async for outcome in outcomes:
                yield outcome

    def run(self, servers: list[Any], out: str | Path, **options: Any) -> Iterator[JobOutcome]:
        """Run the batch (in a background event loop) and yield each job's outcome as it ends.

        Options: ``capacity`` (jobs per server at once, default 2), ``timeout`` (seconds per job), ``retries``,
        ``backoff``, ``force_replan``, ``retry_failed``, ``contact_sheet`` (``"auto"``, ``(x_axis, y_axis)`` or
        None), ``on_message`` (a callable for progress notes). Closing the iterator early stops the run cleanly.
        """
        results: thread_queue.Queue[tuple[_Handover, Any]] = thread_queue.Queue(maxsize=64)
        stop = threading.Event()
        loop = asyncio.new_event_loop()

        def hand_over(kind: _Handover, value: Any) -> bool:
            while not stop.is_set():
                try:
                    results.put((kind, value), timeout=0.1)
                    return True
                except thread_queue.Full:
                    continue
            return False

        async def main() -> None:
            try:
                async with contextlib.aclosing(self.run_async(servers, out, **options)) as outcomes:
                    async for outcome in outcomes:
                        while not stop.is_set():
                            try:
                                results.put_nowait((_Handover.OUTCOME, outcome))
                                break
                            except thread_queue.Full:
                                await asyncio.sleep(0.05)
                        if stop.is_set():
                            return
                hand_over(_Handover.END, None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
                hand_over(_Handover.ERROR, exc)

        task_holder: dict[str, asyncio.Task] = {}

        def thread_main() -> None:
            asyncio.set_event_loop(loop)
            task_holder["task"] = loop.create_task(main())
            with contextlib.suppress(BaseException):
                loop.run_until_complete(task_holder["task"])
            loop.close()

        thread = threading.Thread(target=thread_main, name="charforge-batch", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = results.get()
                if kind is _Handover.OUTCOME:
                    yield value
                elif kind is _Handover.ERROR:
                    raise value
                else:
                    return
        finally:
            stop.set()
            task = task_holder.get("task")
            if task is not None and not task.done():
                loop.call_soon_threadsafe(task.cancel)
            with contextlib.suppress(thread_queue.Empty):
                while True:
                    results.get_nowait()
            thread.join(30)
