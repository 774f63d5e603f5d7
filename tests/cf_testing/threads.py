"""One torch thread for tests that run tiny models (registered as a plugin in tests/conftest.py).

Tiny models gain nothing from a second thread, and on a busy 2-core machine a second thread makes every
op wait for a descheduled worker (about 10x slower). A test module opts in with
``pytestmark = pytest.mark.usefixtures("one_thread")``; code inside a test uses ``one_torch_thread()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block with torch limited to one intra-op thread, then restore the previous count."""
    import torch  # imported here: the driver tests load this plugin too and never need torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Every test of the requesting module runs with one torch thread."""
    with one_torch_thread():
        yield
