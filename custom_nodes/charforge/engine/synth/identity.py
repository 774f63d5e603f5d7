"""Keeping synthetic and enhanced images honest: an identity check per image and a cap on synthetic ones.

Every swapped or restored image is scored against the character's identity (cosine similarity of its
main face's ArcFace embedding to the identity's centroid, as the score stage does) and rejected below the
threshold. Then at most `max_share` of the dataset may be synthetic: the best-scoring synthetic images are
kept up to that share of (real photos + synthetic images), and the rest are rejected with the reason, so a
LoRA is not trained mostly on swaps.

Enhanced photos (a crop enlarged by an upscale model) get the same check through `EnhanceCheck`, against the
identity the dataset already has: the one Analyse builds from its embeddings (`dataset_identity`, stored in
the manifest) or one given explicitly. An enhanced crop is refused when it scores below the threshold *and*
below the un-enhanced crop (the photo was judged by Filter; only what enhancement changed is judged here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...deps import require
from ..score import ReferenceIdentity, check_same_model, identity_from_embeddings

DEFAULT_MAX_SHARE = 0.4
DEFAULT_DET_SIZE = 640  # FaceAnalyzer's


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


# ------------------------------------------------------------------------------------------ enhanced images


def identity_record(identity: ReferenceIdentity) -> dict[str, Any]:
    """The compact, JSON-ready form of an identity a manifest keeps (no per-reference embeddings)."""
    return {
        "name": identity.name,
        "model": identity.model,
        "centroid": [round(float(v), 6) for v in identity.centroid],
        "threshold": identity.suggested_threshold,
        "references": len(identity.references),
        "outliers": [r.source for r in identity.outliers],
    }


def identity_from_record(record: dict[str, Any]) -> ReferenceIdentity:
    """The identity a manifest's record describes (its threshold is ``record["threshold"]``)."""
    np = require("numpy")
    centroid = np.asarray(record["centroid"], np.float32)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    return ReferenceIdentity(str(record["name"]), str(record["model"]), centroid, [])


def dataset_identity(
    name: str, model: str, references: list[tuple[str, Any, int]], det_size: int | None = None
) -> dict[str, Any] | None:
    """The record of the identity (source, embedding, faces found) references make, built as Build Identity
    builds one (`score.identity_from_embeddings`: outliers left out of the centroid); None without any.
    `det_size` is the face models' detection size, so later checks detect faces as the references were."""
    if not references:
        return None
    return {**identity_record(identity_from_embeddings(name, model, references)), "det_size": det_size}


@dataclass
class EnhanceCheck:
    """Scores enhanced images against `identity` with `analyzer` (a face model of the identity's kind)."""

    analyzer: Any
    identity: ReferenceIdentity
    threshold: float

    def describe(self) -> str:
        return (
            f"enhanced images scored against {self.identity.name!r} ({self.identity.model}) "
            f"at threshold {self.threshold:.3f}"
        )

    def judge(self, before, after) -> tuple[IdentityCheck, float | None]:
        """(verdict on the enhanced `after`, similarity of the un-enhanced `before` when it was needed).

        `after` passes at the threshold or above, or when it scores no lower than `before` (enhancement did
        not make it worse). `before` is only scored when `after` falls below the threshold.
        """
        after_check = check_identity(self.analyzer, self.identity, after, self.threshold)
        if after_check.passed:
            return after_check, None
        before_check = check_identity(self.analyzer, self.identity, before, self.threshold)
        was = before_check.similarity
        if after_check.similarity is None:
            if was is None:  # no face before either: nothing enhancement could have changed
                return IdentityCheck(None, True, "", 0), None
            reason = f"enhanced image: no face found any more ({was:.3f} before)"
            return IdentityCheck(None, False, reason, 0), was
        now = after_check.similarity
        if was is not None and now >= was:
            return IdentityCheck(now, True, "", after_check.faces), was
        reason = f"enhanced image no longer matches the identity ({now:.3f} < {self.threshold:.3f}"
        reason += f"; {was:.3f} before)" if was is not None else "; no face before)"
        return IdentityCheck(now, False, reason, after_check.faces), was


def enhance_check(
    manifest, analyzer=None, identity: ReferenceIdentity | None = None, threshold: float | None = None
) -> tuple[EnhanceCheck | None, str]:
    """The check for a dataset's enhanced images, or None and a sentence saying why there is none.

    The identity is `identity`, else the dataset's own (``manifest.identity``, from Analyse with InsightFace).
    Without `analyzer` the identity's face pack is loaded (``insightface:<pack>``, at the detection size
    Analyse used; cached).
    """
    det_size = DEFAULT_DET_SIZE
    if identity is None:
        if not manifest.identity:
            return None, (
                "enhanced images not scored: the dataset has no identity (Analyse ran without InsightFace "
                "face models, found no faces, or face checks are off)"
            )
        identity = identity_from_record(manifest.identity)
        det_size = int(manifest.identity.get("det_size") or DEFAULT_DET_SIZE)
        if threshold is None:
            threshold = float(manifest.identity["threshold"])
    if analyzer is None:
        pack = identity.model.split(":", 1)[-1]
        try:
            from ..faces import FaceAnalyzer

            analyzer = FaceAnalyzer.load(pack, det_size=det_size)
        except Exception as exc:  # noqa: BLE001 - no face models: say so, never fail the crop
            return None, f"enhanced images not scored: face pack {pack} did not load ({exc})"
    check_same_model(identity, analyzer)
    if threshold is None:
        threshold = identity.suggested_threshold
    return EnhanceCheck(analyzer, identity, float(threshold)), ""
