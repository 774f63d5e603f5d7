"""Scoring: is it still the same character? Identity similarity, CLIP score, and what acts on them.

- `identity`: reference identities (centroid of ArcFace embeddings, calibration baseline, saved files)
- `scoring`: identity similarity per image (`score_identity`)
- `clip`: CLIP image-prompt similarity (`ClipScorer`, `clip_sheet`)
- `sheet`: `ScoreSheet`, the per-image scores every step passes on
- `select`: filter, best-of-N, identity drift, combined ranking, per-set summaries (checkpoints, ablations)
- `render`: table and plot images
"""

from .identity import (
    ARCFACE_SAME_PERSON,
    DEFAULT_THRESHOLD,
    ReferenceFace,
    ReferenceIdentity,
    build_identity,
    identity_folder,
    identity_from_embeddings,
    list_identities,
    load_identity,
    save_identity,
)
from .scoring import FACE_CHOICES, check_same_model, score_identity
from .select import (
    CLIPSCORE_SCALE,
    DriftReport,
    FilterResult,
    Pick,
    SetSummary,
    best_of_n,
    best_of_n_report,
    best_set,
    combine,
    filter_passing,
    identity_drift,
    rank,
    rejudge,
    summarise_set,
)
from .sheet import ImageScore, ScoreSheet, judge

__all__ = [
    "ARCFACE_SAME_PERSON",
    "DEFAULT_THRESHOLD",
    "ReferenceFace",
    "ReferenceIdentity",
    "build_identity",
    "identity_folder",
    "identity_from_embeddings",
    "list_identities",
    "load_identity",
    "save_identity",
    "FACE_CHOICES",
    "check_same_model",
    "score_identity",
    "CLIPSCORE_SCALE",
    "DriftReport",
    "FilterResult",
    "Pick",
    "SetSummary",
    "best_of_n",
    "best_of_n_report",
    "best_set",
    "combine",
    "filter_passing",
    "identity_drift",
    "rank",
    "rejudge",
    "summarise_set",
    "ImageScore",
    "ScoreSheet",
    "judge",
]
