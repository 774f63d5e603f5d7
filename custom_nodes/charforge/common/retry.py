"""One retry policy for everything that talks to a network: how many tries, and how long to wait between them.

`Backoff` waits ``base * 2**retry`` seconds (capped at `cap`) scaled by a random factor in ``[1 - jitter, 1]``,
so many clients failing at once do not come back at once; a server's ``Retry-After`` (parsed by
`retry_after_seconds`) replaces that wait, capped too, so no server can stall a run for hours. The policy only
computes; the caller decides what is worth retrying and sleeps (``time.sleep`` or ``asyncio.sleep``)::

    policy = Backoff(attempts=4)
    for attempt in range(policy.attempts):
        try:
            return send()
        except Transient as exc:
            if policy.is_last(attempt):
                raise
            time.sleep(policy.delay(attempt, retry_after_seconds(exc.retry_after)))
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff: at most `attempts` tries in all, the first one included."""

    attempts: int = 6
    base: float = 1.0  # seconds before the first retry, before jitter
    cap: float = 60.0  # no wait is longer, Retry-After included
    jitter: float = 0.5  # 0: exact delays; 0.5: scaled by 0.5..1; 1: anywhere from 0 ("full jitter")

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Backoff needs at least one attempt, got attempts={self.attempts}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"Backoff jitter is a fraction in 0..1, got {self.jitter}")

    @property
    def retries(self) -> int:
        """How many times a failed attempt is tried again."""
        return self.attempts - 1

    def is_last(self, attempt: int) -> bool:
        """Whether `attempt` (0-based) is the last one the policy allows."""
        return attempt >= self.attempts - 1

    def delay(
        self, retry: int, retry_after: float | None = None, rng: Callable[[], float] = random.random
    ) -> float:
        """Seconds to wait before retry number `retry` (0-based): the server's `retry_after` when it sent one,
        else jittered exponential; never more than `cap`. `rng` returns a float in [0, 1)."""
        if retry_after is not None:
            return min(self.cap, max(0.0, retry_after))
        return min(self.cap, self.base * 2**retry) * (1.0 - self.jitter + self.jitter * rng())


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header value (delta seconds or an HTTP date) as seconds from now; None when absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
