"""Keeping synthetic images honest: an identity check per image and a cap on their share of a dataset.

Every swapped or restored image is scored against the character's identity (cosine similarity of its
main face's ArcFace embedding to the identity's centroid, as the score stage does) and rejected below the
threshold. Then at most `max_share` of the dataset may be synthetic: the best-scoring synthetic images are
kept up to that share of (real photos + synthetic images), and the rest are rejected with the reason, so a
LoRA is not trained mostly on swaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..score import ReferenceIdentity

DEFAULT_MAX_SHARE = 0.4


@dataclass
class IdentityCheck:
    """The verdict on one image: its main face's similarity to the identity (None: no face) and why it failed."""

    similarity: float | None
    passed: bool
    reason: str = ""
    faces: int = 0


def check_identity(analyzer, identity: ReferenceIdentity, rgb, threshold: float) -> IdentityCheck:
    """Score the main (largest) face of `rgb` against `identity`; pass at `threshold` or above."""
    faces = [face for face in analyzer.detect(rgb) if face.embedding is not None]
    if not faces:
        return IdentityCheck(None, False, "identity check: no face found in the result", 0)
    similarity = float(identity.similarity(faces[0].embedding))
    if similarity < threshold:
        return IdentityCheck(
            similarity,
            False,
            f"identity check: similarity {similarity:.3f} < {threshold:.3f} to {identity.name!r}",
            len(faces),
        )
    return IdentityCheck(similarity, True, "", len(faces))


def synthetic_allowance(real: int, max_share: float) -> int | None:
    """How many synthetic images `real` photos allow when synthetic images may be at most `max_share` of all
    (None: no limit, for a share of 1)."""
    if not 0.0 <= max_share <= 1.0:
        raise ValueError(f"max_share {max_share} must be between 0 and 1 (a share of the dataset)")
    if max_share >= 1.0:
        return None
    return math.floor(max_share * real / (1.0 - max_share) + 1e-9)


def cap_synthetic(candidates: list[tuple[Any, float]], allowance: int | None) -> tuple[list[Any], list[Any]]:
    """Split (item, similarity) candidates into (kept, over the cap): the `allowance` most similar are kept
    (all of them for None). Both lists keep the candidates' order."""
    if allowance is None or len(candidates) <= allowance:
        return [item for item, _ in candidates], []
    ranked = sorted(range(len(candidates)), key=lambda i: -candidates[i][1])
    keep = set(ranked[: max(allowance, 0)])
    kept = [item for i, (item, _) in enumerate(candidates) if i in keep]
    over = [item for i, (item, _) in enumerate(candidates) if i not in keep]
    return kept, over
