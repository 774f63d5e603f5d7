"""The best of a frame's N candidates, by identity and text agreement together.

Reuses the score stage: `combine` weighs identity similarity and CLIPScore (2.5 x CLIP cosine) per image.
A candidate without a face has no combined score, so a frame picks among the candidates with a face; when
none has one, it falls back to text agreement, and without that to the first candidate (the note says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..score import ScoreSheet, combine, rank


@dataclass
class FramePick:
    """Which candidate a frame keeps, with its scores (None when not measured or no face)."""

    index: int  # candidate position in the frame's batch
    candidates: int
    identity: float | None  # similarity to the identity the frame was selected by
    text: float | None  # CLIP cosine with the frame's prompt
    combined: float | None
    note: str = ""
    ranking: list[int] = field(default_factory=list)  # every candidate, best first

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "candidates": self.candidates,
            "identity": _round(self.identity),
            "text": _round(self.text),
            "combined": _round(self.combined),
            "note": self.note,
            "ranking": list(self.ranking),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def pick_frame(
    identity: ScoreSheet | None,
    text: ScoreSheet | None = None,
    identity_weight: float = 1.0,
    text_weight: float = 0.5,
) -> FramePick:
    """The best candidate of one frame from its identity and/or text score sheets (same candidates, same order)."""
    sheets = [s for s in (identity, text) if s is not None]
    if not sheets:
        raise ValueError("a frame needs identity or text scores to pick a candidate")
    count = len(sheets[0])
    if count == 0:
        raise ValueError("a frame has no candidate image")
    if any(len(s) != count for s in sheets):
        raise ValueError(
            f"the identity and text scores cover different candidates "
            f"({' vs '.join(str(len(s)) for s in sheets)})"
        )
    if identity_weight <= 0 and text_weight <= 0:  # no preference given: weigh what there is equally
        identity_weight = text_weight = 1.0
    use_identity = identity if identity_weight > 0 else None
    use_text = text if text_weight > 0 else None
    note = ""
    combined = None
    if use_identity is not None or use_text is not None:
        combined = combine(use_identity, use_text, identity_weight, text_weight)
    if combined is not None and combined.scored_values:
        order = rank(combined)
    elif text is not None and text.scored_values:
        combined = None
        order = rank(text)
        note = "no candidate shows a face; picked by text agreement"
    else:
        combined = None
        order = list(range(count))
        note = "no candidate could be scored (no face); kept the first"
    best = order[0]

    def value(sheet: ScoreSheet | None) -> float | None:
        return None if sheet is None else sheet.rows[best].value

    return FramePick(best, count, value(identity), value(text), value(combined), note, order)
