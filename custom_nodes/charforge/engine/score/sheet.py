"""Score sheets: one number (or none, with the reason) per image of a batch, plus pass/fail.

Every scoring step produces a `ScoreSheet` and every step that acts on scores (filter, best-of-N,
drift, checkpoint ranking) reads one, so identity scores, CLIP scores and their combination are
interchangeable there.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ImageScore:
    """The score of one image. `value` is None when the image could not be scored; `reason` says why."""

    index: int  # position in the batch
    value: float | None
    passed: bool
    reason: str = ""  # why there is no score, or why the image failed; empty when it passed
    label: str = ""  # what the user calls the image: a file name, "frame 12", "image 3"
    details: dict[str, Any] = field(default_factory=dict)  # metric-specific: face box, faces found, prompt

    @property
    def scored(self) -> bool:
        return self.value is not None


@dataclass
class ScoreSheet:
    """Scores of a batch for one metric (``identity``, ``clip`` or ``combined``)."""

    metric: str
    rows: list[ImageScore]
    threshold: float | None = None  # the pass mark the rows were judged against
    source: str = ""  # what produced the scores: identity name and face model, CLIP model
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def values(self) -> list[float | None]:
        return [row.value for row in self.rows]

    @property
    def scored_values(self) -> list[float]:
        return [row.value for row in self.rows if row.value is not None]

    @property
    def passed_indices(self) -> list[int]:
        return [row.index for row in self.rows if row.passed]

    @property
    def unscored(self) -> list[ImageScore]:
        return [row for row in self.rows if row.value is None]

    def stats(self) -> dict[str, Any]:
        """Count, scored count, pass count and rate, mean / min / max of the scored values."""
        values = self.scored_values
        passed = len(self.passed_indices)
        return {
            "images": len(self.rows),
            "scored": len(values),
            "passed": passed,
            "pass_rate": round(passed / len(self.rows), 4) if self.rows else 0.0,
            "mean": round(sum(values) / len(values), 4) if values else None,
            "min": round(min(values), 4) if values else None,
            "max": round(max(values), 4) if values else None,
        }

    def summary(self) -> str:
        s = self.stats()
        text = f"{s['passed']} of {s['images']} image(s) pass"
        if self.threshold is not None:
            text += f" ({self.metric} >= {self.threshold:.2f})"
        if s["scored"]:
            text += f"; mean {s['mean']:.3f}, min {s['min']:.3f}, max {s['max']:.3f}"
        if self.unscored:
            text += f"; not scored: {len(self.unscored)} (" + ", ".join(
                f"{row.label or row.index}: {row.reason}" for row in self.unscored[:5]
            )
            text += ", ...)" if len(self.unscored) > 5 else ")"
        return text

    def subset(self, indices: list[int]) -> ScoreSheet:
        """The rows at `indices` (batch positions), renumbered 0.. in that order, as a new sheet."""
        by_index = {row.index: row for row in self.rows}
        rows = []
        for new, old in enumerate(indices):
            row = by_index[old]
            rows.append(
                ImageScore(
                    new, row.value, row.passed, row.reason, row.label, {**row.details, "original_index": old}
                )
            )
        return ScoreSheet(self.metric, rows, self.threshold, self.source, list(self.notes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "threshold": self.threshold,
            "source": self.source,
            "summary": self.stats(),
            "notes": self.notes,
            "images": [json_safe(asdict(row)) for row in self.rows],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreSheet:
        rows = [
            ImageScore(
                r["index"],
                r.get("value"),
                bool(r.get("passed")),
                r.get("reason", ""),
                r.get("label", ""),
                dict(r.get("details") or {}),
            )
            for r in data.get("images", [])
        ]
        return cls(
            data.get("metric", "score"),
            rows,
            data.get("threshold"),
            data.get("source", ""),
            list(data.get("notes", [])),
        )


def json_safe(value: Any) -> Any:
    """JSON-safe copy: keys as strings, numpy scalars to Python numbers, floats rounded to 4 places, NaN to None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def judge(value: float | None, threshold: float | None) -> bool:
    """Pass when there is a value and it reaches the threshold (no threshold: every value passes)."""
    return value is not None and (threshold is None or value >= threshold)
