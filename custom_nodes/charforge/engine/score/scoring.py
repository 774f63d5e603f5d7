"""Identity scoring: cosine similarity of each image's main face to a reference identity."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..control import Control
from .identity import ReferenceIdentity
from .sheet import ImageScore, ScoreSheet, judge

FACE_CHOICES = ("largest", "best_match")


def check_same_model(identity: ReferenceIdentity, analyzer) -> None:
    """Embeddings of two recognisers live in different spaces: refuse to compare them."""
    if identity.model != analyzer.name:
        raise ValueError(
            f"identity {identity.name!r} was built with {identity.model}, but the face models loaded are "
            f"{analyzer.name}; embeddings of different face models cannot be compared. Load "
            f"{identity.model.split(':', 1)[-1]} or rebuild the identity with {analyzer.name.split(':', 1)[-1]}."
        )


def score_identity(
    analyzer,
    identity: ReferenceIdentity,
    images: Iterable[tuple[str, Any]],
    threshold: float | None = None,
    face_choice: str = "largest",
    control: Control | None = None,
) -> ScoreSheet:
    """Score each (label, RGB image): similarity of its main face to `identity`, pass/fail at `threshold`.

    The main face is the largest one (``largest``) or the one most similar to the identity
    (``best_match``, for group shots). Images without a face get no score and the reason, never an error.
    `threshold` None means the identity's suggested threshold. `control` advances by one after each image.
    """
    if face_choice not in FACE_CHOICES:
        raise ValueError(f"face_choice must be one of {FACE_CHOICES}, got {face_choice!r}")
    check_same_model(identity, analyzer)
    if threshold is None:
        threshold = identity.suggested_threshold
    rows = []
    for index, (label, rgb) in enumerate(images):
        faces = [face for face in analyzer.detect(rgb) if face.embedding is not None]
        if not faces:
            rows.append(ImageScore(index, None, False, "no face found", label, {"faces": 0}))
        else:
            similarities = [float(identity.similarity(face.embedding)) for face in faces]
            chosen = 0 if face_choice == "largest" else max(range(len(faces)), key=similarities.__getitem__)
            value = similarities[chosen]
            passed = judge(value, threshold)
            reason = "" if passed else f"similarity {value:.3f} below {threshold:.3f}"
            details = {"faces": len(faces), "face": chosen, **faces[chosen].as_dict()}
            rows.append(ImageScore(index, value, passed, reason, label, details))
        if control is not None:
            control.advance()
    return ScoreSheet("identity", rows, threshold, f"{identity.name} ({identity.model})")
