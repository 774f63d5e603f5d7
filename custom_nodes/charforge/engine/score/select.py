"""Acting on score sheets: filter, best-of-N, identity drift, combined ranking, per-set summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .sheet import ImageScore, ScoreSheet, judge

# CLIPScore (Hessel et al. 2021) rescales CLIP's image-text cosine as 2.5 * max(cos, 0), which puts typical
# matching pairs (cos 0.25..0.35) near the range of ArcFace same-person similarities before weighting.
CLIPSCORE_SCALE = 2.5


def rejudge(sheet: ScoreSheet, threshold: float | None) -> ScoreSheet:
    """The same scores judged against another threshold (None keeps the sheet's own)."""
    if threshold is None or threshold == sheet.threshold:
        return sheet
    rows = []
    for row in sheet.rows:
        passed = judge(row.value, threshold)
        reason = (
            row.reason
            if row.value is None
            else ("" if passed else f"{sheet.metric} {row.value:.3f} below {threshold:.3f}")
        )
        rows.append(ImageScore(row.index, row.value, passed, reason, row.label, dict(row.details)))
    return ScoreSheet(sheet.metric, rows, threshold, sheet.source, list(sheet.notes))


@dataclass
class FilterResult:
    kept: list[int]  # batch positions that pass, in batch order
    report: str


def filter_passing(sheet: ScoreSheet, threshold: float | None = None) -> FilterResult:
    """The images that pass (at `threshold`, or the sheet's own), and a report naming the ones dropped."""
    sheet = rejudge(sheet, threshold)
    kept = sheet.passed_indices
    dropped = [row for row in sheet.rows if not row.passed]
    report = f"kept {len(kept)} of {len(sheet.rows)} image(s)"
    if sheet.threshold is not None:
        report += f" ({sheet.metric} >= {sheet.threshold:.3f})"
    if dropped:
        report += "; dropped: " + ", ".join(
            f"{row.label or row.index} ({row.reason})" for row in dropped[:12]
        )
        if len(dropped) > 12:
            report += f", and {len(dropped) - 12} more"
    if not kept:
        report = "no image passed: " + report + ". Lower the threshold or check the identity's references."
    return FilterResult(kept, report)


@dataclass
class Pick:
    group: int
    index: int  # batch position of the chosen candidate
    value: float | None
    passed: bool
    candidates: int
    note: str = ""


def best_of_n(sheet: ScoreSheet, group_size: int) -> list[Pick]:
    """Per consecutive group of `group_size` candidates, the best-scoring one.

    A group where no candidate has a score (no face anywhere) still yields its first candidate, with a
    note, so a storyboard keeps one image per frame. A shorter last group is noted.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    picks = []
    for group, start in enumerate(range(0, len(sheet.rows), group_size)):
        rows = sheet.rows[start : start + group_size]
        scored = [(row.value, row) for row in rows if row.value is not None]
        note = ""
        if scored:
            best = max(scored, key=lambda pair: pair[0])[1]
            if not best.passed:
                note = f"best candidate fails ({best.reason})"
        else:
            best = rows[0]
            note = "no candidate could be scored (" + (rows[0].reason or "no score") + "); kept the first"
        if len(rows) < group_size:
            note = (note + "; " if note else "") + f"only {len(rows)} of {group_size} candidates"
        picks.append(Pick(group, best.index, best.value, best.passed, len(rows), note))
    return picks


def best_of_n_report(picks: list[Pick], metric: str) -> str:
    lines = [f"{len(picks)} group(s), {sum(p.passed for p in picks)} with a passing pick"]
    for pick in picks:
        value = "no score" if pick.value is None else f"{metric} {pick.value:.3f}"
        lines.append(
            f"group {pick.group + 1}: image {pick.index} of {pick.candidates} candidates, {value}"
            + (f" ({pick.note})" if pick.note else "")
        )
    return "\n".join(lines)


@dataclass
class DriftReport:
    frames: int
    scored: int
    mean: float | None
    min: float | None
    min_frame: int | None
    threshold: float
    drifting: list[int] = field(default_factory=list)  # scored frames below threshold
    no_face: list[int] = field(default_factory=list)

    def summary(self) -> str:
        if not self.scored:
            return f"no face found in any of {self.frames} frame(s)"
        text = (
            f"{self.frames} frame(s): mean similarity {self.mean:.3f}, min {self.min:.3f} at frame {self.min_frame}; "
            f"{len(self.drifting)} frame(s) drift below {self.threshold:.3f}"
        )
        if self.drifting:
            text += ": " + _ranges(self.drifting)
        if self.no_face:
            text += f"; no face in {len(self.no_face)} frame(s): {_ranges(self.no_face)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "scored": self.scored,
            "mean": self.mean,
            "min": self.min,
            "min_frame": self.min_frame,
            "threshold": self.threshold,
            "drifting_frames": self.drifting,
            "no_face_frames": self.no_face,
            "summary": self.summary(),
        }


def _ranges(frames: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    parts: list[str] = []
    start: int | None = None
    prev = 0  # the last frame of the current run (when start is set)
    for frame in frames:
        if start is None:
            start = prev = frame
        elif frame == prev + 1:
            prev = frame
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = frame
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts)


def identity_drift(sheet: ScoreSheet, threshold: float | None = None) -> DriftReport:
    """Per-frame identity over a video: mean and min similarity, the frames below `threshold`."""
    threshold = sheet.threshold if threshold is None else threshold
    if threshold is None:
        raise ValueError("identity drift needs a threshold")
    scored = [(row.value, row) for row in sheet.rows if row.value is not None]
    worst = min(scored, key=lambda pair: pair[0]) if scored else None
    return DriftReport(
        frames=len(sheet.rows),
        scored=len(scored),
        mean=round(sum(value for value, _ in scored) / len(scored), 4) if scored else None,
        min=round(worst[0], 4) if worst is not None else None,
        min_frame=worst[1].index if worst is not None else None,
        threshold=threshold,
        drifting=[row.index for value, row in scored if value < threshold],
        no_face=[row.index for row in sheet.rows if row.value is None],
    )


def combine(
    identity: ScoreSheet | None,
    text: ScoreSheet | None,
    identity_weight: float = 1.0,
    text_weight: float = 1.0,
    threshold: float | None = None,
) -> ScoreSheet:
    """Weighted mean of identity similarity and CLIPScore (2.5 x CLIP cosine, floored at 0) per image.

    An image missing a weighted component (no face) gets no combined score. Without `threshold`, an
    image passes when every weighted component passed its own threshold.
    """
    parts = [
        (s, w, name)
        for s, w, name in ((identity, identity_weight, "identity"), (text, text_weight, "clip"))
        if s is not None and w > 0
    ]
    if not parts:
        raise ValueError("combine needs identity or CLIP scores with a weight above 0")
    lengths = {len(s) for s, _, _ in parts}
    if len(lengths) > 1:
        raise ValueError(
            f"the score sheets cover different batches ({' vs '.join(str(len(s)) for s, _, _ in parts)} "
            f"images); score the same images"
        )
    total = sum(w for _, w, _ in parts)
    rows = []
    for index in range(lengths.pop()):
        value: float | None = 0.0
        passed = True
        reasons: list[str] = []
        details: dict[str, Any] = {}
        for sheet, weight, name in parts:
            row = sheet.rows[index]
            details[name] = None if row.value is None else round(row.value, 4)
            if row.value is None:
                value = None
                reasons.append(f"no {name} score ({row.reason})")
                continue
            if value is not None:
                component = CLIPSCORE_SCALE * max(row.value, 0.0) if name == "clip" else row.value
                value += weight * component / total
            if not row.passed:
                passed = False
                reasons.append(row.reason)
        label = parts[0][0].rows[index].label
        if value is not None and threshold is not None:
            passed = value >= threshold
            reasons = [] if passed else [f"combined {value:.3f} below {threshold:.3f}"]
        rows.append(
            ImageScore(
                index, value, value is not None and passed, "; ".join(r for r in reasons if r), label, details
            )
        )
    source = " + ".join(f"{w:g} x {name}" for _, w, name in parts)
    return ScoreSheet(
        "combined",
        rows,
        threshold,
        source,
        ["combined = weighted mean of identity similarity and 2.5 x max(CLIP cosine, 0)"],
    )


def rank(sheet: ScoreSheet) -> list[int]:
    """Batch positions from best to worst score; unscored images last, in batch order."""
    scored = sorted(
        ((row.value, row) for row in sheet.rows if row.value is not None), key=lambda pair: -pair[0]
    )
    return [row.index for _, row in scored] + [row.index for row in sheet.rows if row.value is None]


# --------------------------------------------------------------------------------------------------
# Sets: checkpoints of a training run, or variants of a workflow


@dataclass
class SetSummary:
    name: str
    images: int
    faces: int | None = None  # images with a scored face
    identity_mean: float | None = None
    identity_min: float | None = None
    identity_pass_rate: float | None = None
    clip_mean: float | None = None
    clip_min: float | None = None
    combined: float | None = None  # what sets are ranked by

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def summarise_set(
    name: str,
    identity: ScoreSheet | None = None,
    text: ScoreSheet | None = None,
    identity_weight: float = 1.0,
    text_weight: float = 1.0,
) -> SetSummary:
    """Mean/min identity similarity, pass rate and mean CLIP score of one set of images.

    The set's `combined` value is the weighted mean of its identity mean and CLIPScore mean (the identity
    mean counts images without a face as 0, so a set that loses the face is not rewarded for it).
    """
    images = len(identity) if identity is not None else len(text) if text is not None else 0
    summary = SetSummary(name, images)
    parts = []
    if identity is not None:
        stats = identity.stats()
        summary.faces = stats["scored"]
        summary.identity_mean, summary.identity_min = stats["mean"], stats["min"]
        summary.identity_pass_rate = stats["pass_rate"]
        if identity_weight > 0:
            parts.append((identity_weight, sum(identity.scored_values) / images if images else 0.0))
    if text is not None:
        stats = text.stats()
        summary.clip_mean, summary.clip_min = stats["mean"], stats["min"]
        if text_weight > 0 and stats["mean"] is not None:
            parts.append((text_weight, CLIPSCORE_SCALE * max(stats["mean"], 0.0)))
    if parts:
        summary.combined = round(sum(w * v for w, v in parts) / sum(w for w, _ in parts), 4)
    return summary


def best_set(summaries: list[SetSummary]) -> SetSummary | None:
    """The set with the highest combined value (ties: higher identity pass rate, then the earlier set, which
    for checkpoints is the less trained and so less likely overfitted one)."""
    ranked = [s for s in summaries if s.combined is not None]
    if not ranked:
        return None
    return max(ranked, key=lambda s: (s.combined, s.identity_pass_rate or 0.0))
