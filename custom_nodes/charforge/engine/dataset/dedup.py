"""Deduplicate: group exact and near duplicates and keep the best photo of each group.

Exact duplicates share the source file's SHA-256; near duplicates (resized, re-encoded, lightly edited
copies) have perceptual hashes within a Hamming threshold (hashing.py). Each group keeps its sharpest
photo (ties: the larger, then the first); the others are rejected naming the photo that was kept.
Only entries still accepted take part (augmented copies never do), so run Filter first if blurred
copies should be rejected as blurry rather than as duplicates.
"""

from __future__ import annotations

from collections.abc import Callable

from .hashing import dhash, group_near_duplicates, hamming, phash
from .images import read_rgb
from .manifest import DatasetManifest, ImageEntry
from .parallel import ordered_map
from .quality import analysis_grey
from .scan import rejection_reason

ProgressFn = Callable[[int, int], None]
HASH_KINDS = ("phash", "dhash", "both")
DEFAULT_THRESHOLD = 8


def _hashes(entry: ImageEntry) -> dict[str, str]:
    if {"phash", "dhash"} <= set(entry.hashes):
        return entry.hashes
    import cv2

    rgb = read_rgb(entry.file, max_side=512).rgb
    grey = analysis_grey(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    return {"phash": phash(grey), "dhash": dhash(grey)}


def _rank(entry: ImageEntry, order: int) -> tuple:
    sharpness = entry.scores.sharpness if entry.scores.sharpness is not None else float("-inf")
    return (sharpness, entry.width * entry.height, -order)


def deduplicate(
    manifest: DatasetManifest,
    threshold: int = DEFAULT_THRESHOLD,
    hash_kind: str = "phash",
    workers: int = 0,
    on_image: ProgressFn | None = None,
) -> DatasetManifest:
    """A new manifest where all but the best photo of each duplicate group are rejected."""
    if hash_kind not in HASH_KINDS:
        raise ValueError(f"hash {hash_kind!r} is not one of {', '.join(HASH_KINDS)}")
    out = manifest.copy()
    # Augmented copies are near duplicates of their originals on purpose: leave them out.
    candidates = [entry for entry in out.entries if entry.accepted and not entry.parent]
    total = len(candidates)

    def report(index: int, _hashes_: dict) -> None:
        if on_image is not None:
            on_image(index + 1, total)

    usable: list[ImageEntry] = []
    for entry, hashes in zip(candidates, ordered_map(_safe_hashes, candidates, workers, report), strict=True):
        if isinstance(hashes, str):
            entry.reject(hashes)
            continue
        entry.hashes = hashes
        usable.append(entry)

    kinds = ["phash", "dhash"] if hash_kind == "both" else [hash_kind]
    groups = group_near_duplicates([[e.hashes[k] for k in kinds] for e in usable], threshold)
    # Exact copies always group, even past the threshold (identical bytes hash identically anyway).
    groups = _merge_exact(usable, groups)
    out.duplicate_groups = []
    for number, members in enumerate(groups, start=1):
        entries = [usable[i] for i in members]
        keep = max(range(len(entries)), key=lambda i: _rank(entries[i], members[i]))
        kept = entries[keep]
        ordered = [kept] + [e for i, e in enumerate(entries) if i != keep]
        out.duplicate_groups.append([e.id for e in ordered])
        for entry in ordered:
            entry.duplicate_group = number
        for entry in ordered[1:]:
            if entry.sha256 and entry.sha256 == kept.sha256:
                entry.reject(f"exact duplicate of {kept.name}")
            else:
                distance = min(hamming(entry.hashes[k], kept.hashes[k]) for k in kinds)
                entry.reject(f"near duplicate of {kept.name} (hash distance {distance})")
    return out


def _safe_hashes(entry: ImageEntry):
    try:
        return _hashes(entry)
    except Exception as exc:  # noqa: BLE001 - unreadable here means rejected, never a crash
        return rejection_reason(exc)


def _merge_exact(entries: list[ImageEntry], groups: list[list[int]]) -> list[list[int]]:
    parent = list(range(len(entries)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        a, b = find(a), find(b)
        if a != b:
            parent[max(a, b)] = min(a, b)

    for group in groups:
        for other in group[1:]:
            union(group[0], other)
    by_sha: dict[str, int] = {}
    for index, entry in enumerate(entries):
        if entry.sha256:
            if entry.sha256 in by_sha:
                union(by_sha[entry.sha256], index)
            else:
                by_sha[entry.sha256] = index
    merged: dict[int, list[int]] = {}
    for index in range(len(entries)):
        merged.setdefault(find(index), []).append(index)
    return [sorted(g) for g in merged.values() if len(g) > 1]
