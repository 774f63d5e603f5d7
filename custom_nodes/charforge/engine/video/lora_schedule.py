"""LoRA strengths that change over the clip: a per-frame schedule (e.g. from music) applied per context window.

A LoRA's strength is one number per U-Net call, and a U-Net call sees one context window, so the granularity is the
window: before each window's U-Net calls every targeted LoRA gets ``strength x m``, where ``m`` is the mean of the
schedule over that window's frames. Frames shared by two windows get the blend of both windows' predictions, so
the change is spread over the overlap. Short windows follow a schedule more closely; a clip made in one window
gets the schedule's mean. The text encoders keep the plain strengths (the prompt is encoded once per clip), and
the plain strengths are put back when the clip ends, also on cancel or error.

Targets: ``all`` LoRAs, the character ``lora``s only, or the ``motion`` LoRAs only. A schedule of 1.0 everywhere
sets exactly the plain strengths (x 1.0 is exact), so the clip is bit for bit the one without a schedule.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

TARGETS = ("all", "lora", "motion")


@dataclass
class LoraSchedule:
    """Per-frame multipliers (one per frame of the clip) for the LoRAs `target` names."""

    values: Sequence[float]
    target: str = "all"

    def window_means(self, windows: Sequence[Sequence[int]]) -> list[float]:
        return [sum(float(self.values[i]) for i in w) / len(w) for w in windows]

    def validate(self, frames: int) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"LoRA schedule target must be one of {TARGETS} (got {self.target!r})")
        if len(self.values) != frames:
            raise ValueError(f"the LoRA strength schedule has {len(self.values)} values for {frames} frames")

    def applies_to(self, kind: str) -> bool:
        return self.target == "all" or self.target == kind


@dataclass
class ScheduledLoras:
    """Sets the video model's adapter weights per window (only when they change) and restores them."""

    model: object
    schedule: LoraSchedule
    _current: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self.strengths = dict(self.model.lora_strengths)  # type: ignore[attr-defined]
        self.names = list(self.strengths)
        self._current = tuple(s for _, s in self.strengths.values())

    @property
    def active(self) -> bool:
        return any(self.schedule.applies_to(kind) for kind, _ in self.strengths.values())

    def weights(self, frames: Sequence[int]) -> tuple[float, ...]:
        (mean,) = self.schedule.window_means([frames])
        return tuple(
            strength * mean if self.schedule.applies_to(kind) else strength
            for kind, strength in self.strengths.values()
        )

    def set(self, weights: tuple[float, ...]) -> None:
        if weights != self._current:
            self.model.unet.set_adapters(self.names, list(weights))  # type: ignore[attr-defined]
            self._current = weights

    def enter(self, frames: Sequence[int]) -> None:
        """Set the weights for the window of `frames`."""
        self.set(self.weights(frames))

    def restore(self) -> None:
        self.set(tuple(s for _, s in self.strengths.values()))


@contextmanager
def scheduled_loras(model, schedule: LoraSchedule | None) -> Iterator[ScheduledLoras | None]:
    """`ScheduledLoras` for the clip (None without a schedule or a targeted LoRA); the plain strengths come back
    when the block ends, however it ends."""
    if schedule is None:
        yield None
        return
    scheduled = ScheduledLoras(model, schedule)
    if not scheduled.active:
        yield None
        return
    try:
        yield scheduled
    finally:
        scheduled.restore()
