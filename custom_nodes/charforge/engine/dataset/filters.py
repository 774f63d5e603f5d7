"""Filter: reject photos that fail a threshold, with the measured value in the reason.

Filters never fail: when nothing passes, the result is a dataset with no accepted entry and a summary
saying which rule rejected how many. A rule whose measure is missing (Analyse did not run, or ran
without a face detector) is skipped and the summary says so.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from .load import UNUSABLE
from .manifest import DatasetManifest, ImageEntry


@dataclass
class FilterSettings:
    """Thresholds; 0 (or a negative value for max_people) switches a rule off."""

    min_side: int = 512  # shorter side in pixels
    min_sharpness: float = 50.0  # variance of the Laplacian at 512 px (quality.py)
    min_brightness: float = 0.1  # mean luminance 0..1
    max_brightness: float = 0.92
    min_contrast: float = 0.03  # standard deviation of luminance 0..1
    require_face: bool = True
    max_people: int = 1  # faces at least a quarter of the main face's area
    min_face_size: int = 64  # main face's shorter side in pixels
    max_identity_distance: float = 0.6  # cosine distance to the dataset's face centroid (InsightFace only)


# The reason each rule writes starts with one of these words; the report counts by it.
REASONS = (
    "too small",
    "blurry",
    "too dark",
    "too bright",
    "low contrast",
    "no face",
    "several people",
    "face too small",
    "different person",
    "exact duplicate",
    "near duplicate",
    "unreadable image",
    "too large",
)


def _check(entry: ImageEntry, s: FilterSettings, use_faces: bool) -> list[str]:
    reasons = []
    short = min(entry.width, entry.height)
    if s.min_side and short < s.min_side:
        reasons.append(f"too small: {entry.width}x{entry.height} (shorter side {short} < {s.min_side})")
    sc = entry.scores
    if s.min_sharpness and sc.sharpness is not None and sc.sharpness < s.min_sharpness:
        reasons.append(f"blurry: sharpness {sc.sharpness:.1f} < {s.min_sharpness:g}")
    if sc.brightness is not None:
        if s.min_brightness and sc.brightness < s.min_brightness:
            reasons.append(f"too dark: brightness {sc.brightness:.2f} < {s.min_brightness:g}")
        if s.max_brightness and s.max_brightness < 1 and sc.brightness > s.max_brightness:
            reasons.append(f"too bright: brightness {sc.brightness:.2f} > {s.max_brightness:g}")
    if s.min_contrast and sc.contrast is not None and sc.contrast < s.min_contrast:
        reasons.append(f"low contrast: {sc.contrast:.3f} < {s.min_contrast:g}")
    if use_faces and entry.faces is not None:
        faces = entry.faces
        if faces.count == 0:
            if s.require_face:
                reasons.append("no face found")
        else:
            if s.max_people > 0 and faces.people > s.max_people:
                reasons.append(f"several people: {faces.people} faces of similar size (max {s.max_people})")
            if s.min_face_size and faces.size is not None and faces.size < s.min_face_size:
                reasons.append(f"face too small: {faces.size:.0f} px < {s.min_face_size} px")
    distance = sc.identity_distance
    if s.max_identity_distance and distance is not None and distance > s.max_identity_distance:
        reasons.append(f"different person? identity distance {distance:.2f} > {s.max_identity_distance:g}")
    return reasons


def apply_filters(
    manifest: DatasetManifest, settings: FilterSettings | None = None
) -> tuple[DatasetManifest, str]:
    """A new manifest with failing entries rejected, and a summary of what each rule did."""
    settings = settings or FilterSettings()
    out = manifest.copy()
    use_faces = out.detector is not None
    hits: Counter[str] = Counter()
    before = len(out.accepted)
    for entry in out.entries:
        if any(reason.startswith(UNUSABLE) for reason in entry.rejected):
            continue
        for reason in _check(entry, settings, use_faces):
            entry.reject(reason)
            hits[_rule(reason)] += 1
    notes = []
    analysed = any(entry.scores.sharpness is not None for entry in out.entries)
    if not analysed and out.entries:
        notes.append(
            "sharpness, exposure and faces were not measured (run Analyse first): only size was checked"
        )
    elif not use_faces:
        notes.append("face rules skipped: Analyse ran without a face detector")
    rules = ", ".join(f"{rule}: {count}" for rule, count in hits.most_common()) or "nothing failed"
    summary = f"{len(out.accepted)} of {len(out.entries)} image(s) pass ({before} before filtering); {rules}"
    if not out.accepted and out.entries:
        summary += ". Nothing passed: loosen the thresholds that rejected most photos, or add better photos"
    if notes:
        summary += ". Note: " + "; ".join(notes)
    out.record("filter", asdict(settings), summary)
    return out, summary


def _rule(reason: str) -> str:
    for word in REASONS:
        if reason.startswith(word):
            return word
    return reason.split(":")[0]
