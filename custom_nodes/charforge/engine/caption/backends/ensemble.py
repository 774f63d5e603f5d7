"""Ensemble: several backends caption the same images; their outputs are joined into one caption.

The members' outputs are joined in the order the members are given (e.g. a Florence-2 sentence, then
WD14 tags), split into comma-separated parts, and each part is kept once: repeated parts are dropped
case-insensitively with underscores read as spaces (``long_hair`` = ``Long hair``), and, with
`drop_contained`, a short part (a tag) whose words already appear in an earlier part (a sentence) is
dropped too (``woman`` after ``a woman with long hair``). A member that gives an empty caption for an
image simply contributes nothing to it.
"""

from __future__ import annotations

import re
from typing import Any

from .base import Captioner, CaptionerError

TAG_WORDS = 4  # parts of at most this many words count as tags for `drop_contained`


def _key(part: str) -> str:
    return " ".join(part.replace("_", " ").lower().split())


def _contains(sentence: str, tag: str) -> bool:
    return (
        re.search(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in tag.split()) + r"(?!\w)", sentence)
        is not None
    )


def merge_captions(captions: list[str], drop_contained: bool = True) -> str:
    """One caption from several, in order, each part once (see the module docstring)."""
    kept: list[str] = []
    keys: list[str] = []
    for caption in captions:
        for part in (" ".join(p.split()) for p in (caption or "").split(",")):
            if not part:
                continue
            key = _key(part)
            if key in keys:
                continue
            if (
                drop_contained
                and len(key.split()) <= TAG_WORDS
                and any(len(k.split()) > len(key.split()) and _contains(k, key) for k in keys)
            ):
                continue
            kept.append(part)
            keys.append(key)
    return ", ".join(kept)


class EnsembleCaptioner(Captioner):
    """Runs every member on each batch and merges their captions, members in the given order."""

    name = "ensemble"

    def __init__(self, members: list[Captioner], drop_contained: bool = True):
        if not members:
            raise CaptionerError("an ensemble needs at least one caption backend")
        self.members = list(members)
        self.drop_contained = drop_contained
        self.batch_size = max(1, min(m.batch_size for m in self.members))
        sides = [m.max_side for m in self.members if m.max_side is not None]
        self.max_side = max(sides) if len(sides) == len(self.members) else None

    def caption(self, images: list[Any]) -> list[str]:
        if not images:
            return []
        outputs = []
        for member in self.members:
            captions = member.caption(images)
            if len(captions) != len(images):
                raise CaptionerError(
                    f"{member.name} returned {len(captions)} captions for {len(images)} images"
                )
            outputs.append(captions)
        return [merge_captions([out[i] for out in outputs], self.drop_contained) for i in range(len(images))]

    def notes(self) -> list[str]:
        return [note for member in self.members for note in member.notes()]

    def close(self) -> None:
        for member in self.members:
            member.close()
