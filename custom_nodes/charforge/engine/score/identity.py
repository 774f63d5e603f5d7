"""Reference identity: who the character is, as the centroid of ArcFace embeddings of reference photos.

The spread among the references is the calibration baseline: each reference is compared with the
centroid of the *other* references (leave-one-out, the "three photos against a fourth" check), which
says how similar two genuine photos of this person are under this face model. The suggested threshold
is derived from it:

    suggested = min((ARCFACE_SAME_PERSON + baseline mean) / 2, lowest reference)   (2 or more references)
    suggested = DEFAULT_THRESHOLD                                                 (1 reference)

ARCFACE_SAME_PERSON (0.32) is the cosine similarity matching the published ArcFace cosine-distance
threshold (0.68) used for real photos. References below it are reported as outliers (another person,
or a poor photo) and left out of the baseline.

Identities are saved as small JSON files in ``<models>/charforge/identities/<name>.json``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import bridge
from ...deps import require
from ..control import Control

FORMAT = "charforge.identity"
VERSION = 1
FOLDER_KIND = "charforge"
SUBFOLDER = "identities"
ARCFACE_SAME_PERSON = 0.32  # cosine similarity = 1 - 0.68 (ArcFace cosine distance threshold)
DEFAULT_THRESHOLD = 0.36  # the stricter of the two published ArcFace rows (L2 on unit vectors: 1.13)


@dataclass
class ReferenceFace:
    source: str  # file name or "image 3"
    embedding: Any  # np.ndarray (512,), normalised
    similarity: float | None = None  # to the centroid of the other references (None with one reference)
    faces_found: int = 1
    outlier: bool = False


@dataclass
class ReferenceIdentity:
    """A character's face identity under one face model (embeddings of two models never compare)."""

    name: str
    model: str  # e.g. "insightface:buffalo_l"
    centroid: Any  # np.ndarray (512,), normalised
    references: list[ReferenceFace]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) of unusable references
    created: str = ""

    @property
    def baseline(self) -> dict[str, float] | None:
        """Leave-one-out similarity of the (non-outlier) references: mean, min, max, std; None with one."""
        np = require("numpy")
        sims = [r.similarity for r in self.references if r.similarity is not None and not r.outlier]
        if not sims:
            sims = [r.similarity for r in self.references if r.similarity is not None]
        if not sims:
            return None
        values = np.asarray(sims, dtype=np.float64)
        return {
            "mean": round(float(values.mean()), 4),
            "min": round(float(values.min()), 4),
            "max": round(float(values.max()), 4),
            "std": round(float(values.std()), 4),
        }

    @property
    def suggested_threshold(self) -> float:
        baseline = self.baseline
        if baseline is None:
            return DEFAULT_THRESHOLD
        return round(min((ARCFACE_SAME_PERSON + baseline["mean"]) / 2.0, baseline["min"]), 3)

    @property
    def outliers(self) -> list[ReferenceFace]:
        return [r for r in self.references if r.outlier]

    def similarity(self, embeddings) -> Any:
        """Cosine similarity of normalised embeddings (N x 512 or 512) to the centroid."""
        np = require("numpy")
        return np.asarray(embeddings, dtype=np.float32) @ self.centroid

    def summary(self) -> str:
        text = f"identity {self.name!r} from {len(self.references)} reference(s) ({self.model})"
        baseline = self.baseline
        if baseline:
            text += (
                f"; references agree at {baseline['mean']:.3f} on average (lowest {baseline['min']:.3f}); "
                f"suggested threshold {self.suggested_threshold:.3f}"
            )
        else:
            text += f"; one reference gives no baseline: add 3 or more; default threshold {DEFAULT_THRESHOLD}"
        if self.outliers:
            text += "; outliers (another person or a poor photo?): " + ", ".join(
                f"{r.source} ({r.similarity:.2f})" for r in self.outliers
            )
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: " + ", ".join(f"{s} ({why})" for s, why in self.skipped)
        return text

    # ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "model": self.model,
            "created": self.created,
            "embedding_size": int(len(self.centroid)),
            "suggested_threshold": self.suggested_threshold,
            "baseline": self.baseline,
            "centroid": [round(float(v), 6) for v in self.centroid],
            "references": [
                {
                    "source": r.source,
                    "similarity": None if r.similarity is None else round(r.similarity, 4),
                    "faces_found": r.faces_found,
                    "outlier": r.outlier,
                    "embedding": [round(float(v), 5) for v in r.embedding],
                }
                for r in self.references
            ],
            "skipped": [{"source": s, "reason": why} for s, why in self.skipped],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceIdentity:
        np = require("numpy")
        if data.get("format") != FORMAT:
            raise ValueError(f"not a CharForge identity (format {data.get('format')!r}, expected {FORMAT!r})")
        if int(data.get("version", 0)) > VERSION:
            raise ValueError(
                f"identity file version {data['version']} is newer than this CharForge reads ({VERSION}); "
                f"update CharForge"
            )
        refs = [
            ReferenceFace(
                r["source"],
                np.asarray(r["embedding"], np.float32),
                r.get("similarity"),
                int(r.get("faces_found", 1)),
                bool(r.get("outlier", False)),
            )
            for r in data.get("references", [])
        ]
        return cls(
            data["name"],
            data["model"],
            _normalise(np.asarray(data["centroid"], np.float32)),
            refs,
            [(s["source"], s["reason"]) for s in data.get("skipped", [])],
            data.get("created", ""),
        )


def _normalise(vector):
    np = require("numpy")
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def identity_from_embeddings(
    name: str,
    model: str,
    references: list[tuple[str, Any, int]],
    skipped: list[tuple[str, str]] | None = None,
) -> ReferenceIdentity:
    """Build an identity from (source, normalised embedding, faces found) triples."""
    np = require("numpy")
    if not references:
        reasons = "; ".join(f"{s}: {why}" for s, why in (skipped or [])) or "no images given"
        raise ValueError(
            f"cannot build identity {name!r}: no usable reference face ({reasons}). Use clear, "
            f"front-facing photos where the face is at least ~100 px wide."
        )
    matrix = np.stack([_normalise(np.asarray(e, np.float32)) for _, e, _ in references])
    refs = []
    for i, (source, _, faces_found) in enumerate(references):
        similarity = None
        if len(references) > 1:
            others = _normalise(np.delete(matrix, i, axis=0).sum(axis=0))
            similarity = float(matrix[i] @ others)
        refs.append(
            ReferenceFace(
                source,
                matrix[i],
                similarity,
                faces_found,
                outlier=similarity is not None and similarity < ARCFACE_SAME_PERSON,
            )
        )
    centroid_refs = [r.embedding for r in refs if not r.outlier] or [r.embedding for r in refs]
    centroid = _normalise(np.stack(centroid_refs).mean(axis=0))
    return ReferenceIdentity(
        name, model, centroid, refs, list(skipped or []), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    )


def build_identity(
    name: str, analyzer, images: Iterable[tuple[str, Any]], control: Control | None = None
) -> ReferenceIdentity:
    """Detect the main (largest) face of each (source, RGB image) and build the identity from them.

    Images without a face are skipped and named in the identity's `skipped` list, never raised.
    `control` advances by one after each image (and may stop the work there).
    """
    references, skipped = [], []
    for source, rgb in images:
        faces = analyzer.detect(rgb)
        if not faces:
            skipped.append((source, "no face found"))
        elif faces[0].embedding is None:
            skipped.append((source, "the face model gave no embedding (detector without landmarks?)"))
        else:
            references.append((source, faces[0].embedding, len(faces)))
        if control is not None:
            control.advance()
    return identity_from_embeddings(name, analyzer.name, references, skipped)


# --------------------------------------------------------------------------------------------------
# Files


def safe_name(name: str) -> str:
    """A file-system-safe identity name: letters, digits, '-', '_' and '.'; spaces become '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()).strip("._")
    if not cleaned:
        raise ValueError(f"identity name {name!r} has no usable characters: use letters, digits, '-' or '_'")
    return cleaned


def identity_folder() -> Path:
    """Where identities are saved: ``identities`` in the first ``charforge`` model folder."""
    return bridge.first_model_folder(FOLDER_KIND) / SUBFOLDER


def save_identity(
    identity: ReferenceIdentity, folder: str | os.PathLike | None = None, overwrite: bool = True
) -> Path:
    """Write the identity as ``<folder>/<name>.json`` (default folder: `identity_folder()`); return the path."""
    target = Path(folder) if folder is not None else identity_folder()
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{safe_name(identity.name)}.json"
    if path.exists() and not overwrite:
        raise FileExistsError(f"identity {path} exists; choose another name or allow overwriting")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(identity.to_dict(), indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def list_identities() -> list[str]:
    """Saved identity names (file names without ``.json``) in every charforge model folder, sorted."""
    names = set()
    for entry in bridge.list_models(FOLDER_KIND):
        parts = entry.replace("\\", "/").split("/")
        if len(parts) == 2 and parts[0] == SUBFOLDER and parts[1].endswith(".json"):
            names.add(parts[1][: -len(".json")])
    return sorted(names)


def load_identity(name_or_path: str | os.PathLike) -> ReferenceIdentity:
    """Load a saved identity by name (from the charforge folders) or by the path of its JSON file."""
    path = Path(str(name_or_path)).expanduser()
    if not (path.is_absolute() and path.is_file()):
        name = str(name_or_path)
        name = name[: -len(".json")] if name.endswith(".json") else name
        try:
            path = Path(bridge.find_model(FOLDER_KIND, f"{SUBFOLDER}/{name}.json"))
        except bridge.ModelNotFoundError as exc:
            known = list_identities()
            hint = (
                f" Saved identities: {', '.join(known)}."
                if known
                else " No identity is saved yet: build one first."
            )
            raise FileNotFoundError(f"identity {name!r} not found ({exc}).{hint}") from exc
    return ReferenceIdentity.from_dict(json.loads(path.read_text(encoding="utf-8")))
