"""Run a per-image function over many images on a few threads, in order, with bounded memory.

Decoding (Pillow), OpenCV and torch release the GIL for the heavy parts, so threads give most of the
speed of processes without pickling images or re-importing torch in every worker. At most
``2 * workers`` images are in flight at once, so memory does not grow with the dataset.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """One worker per available core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int) -> int:
    return default_workers() if workers <= 0 else workers


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int = 0,
    on_result: Callable[[int, R], None] | None = None,
) -> Iterator[R]:
    """Yield ``fn(item)`` for each item in order, computed on `workers` threads (0: one per core).

    `on_result(index, result)` is called in the caller's thread as each result is taken, which is where
    progress is reported (and where a cancel raises): pending work is then dropped and the pool stopped.
    """
    workers = resolve_workers(workers)
    if workers == 1:
        for index, item in enumerate(items):
            result = fn(item)
            if on_result is not None:
                on_result(index, result)
            yield result
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="charforge-dataset")
    pending: deque[Future] = deque()
    limits = library_threads(1)  # one image per core already: no thread pools inside the libraries too
    limits.__enter__()
    try:
        iterator = iter(items)
        index = 0
        for item in iterator:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                result = pending.popleft().result()
                if on_result is not None:
                    on_result(index, result)
                index += 1
                yield result
        while pending:
            result = pending.popleft().result()
            if on_result is not None:
                on_result(index, result)
            index += 1
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        limits.__exit__(None, None, None)


@contextlib.contextmanager
def library_threads(count: int) -> Iterator[None]:
    """Limit OpenCV's and torch's own thread pools while dataset workers run, then restore them.

    The stages already run one image per core; the libraries' pools on top of that only add contention
    (the small face networks run several times slower). torch is only touched if already imported.
    Both settings are process-wide; ComfyUI runs one node at a time, and they are restored afterwards.
    """
    import sys

    torch: Any = sys.modules.get("torch")
    cv2: Any = sys.modules.get("cv2")
    before_torch = torch.get_num_threads() if torch is not None else None
    before_cv2 = cv2.getNumThreads() if cv2 is not None else None
    if torch is not None:
        torch.set_num_threads(count)
    if cv2 is not None:
        cv2.setNumThreads(count)
    try:
        yield
    finally:
        if torch is not None and before_torch is not None:
            torch.set_num_threads(before_torch)
        if cv2 is not None and before_cv2 is not None:
            cv2.setNumThreads(before_cv2)
