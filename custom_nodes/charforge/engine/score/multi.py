"""Several characters in one image: which detected face is which character, and how similar it is.

Each image's faces are compared with every identity (cosine similarity of ArcFace embeddings), then
faces and characters are paired one-to-one so that the sum of the paired similarities is largest
(the assignment problem). Pairing each character with its best face in turn (greedy) can be wrong:
when character A's best face is the only good face for character B, greedy gives A that face and B a
poor one, while the optimal pairing gives both a good face. A character left without a face (fewer
faces than characters) is reported as missing and fails.

The assignment uses ``scipy.optimize.linear_sum_assignment`` when SciPy is installed. SciPy is not a
dependency of the pack, so without it an exact dynamic programme over subsets of the smaller side is
used (``2^k * n`` steps for k characters and n faces); it is exact and fast up to ``MAX_EXACT`` (12)
on the smaller side, which covers any realistic number of characters in one picture.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...deps import require
from ..control import Control
from .identity import ReferenceIdentity
from .scoring import check_same_model
from .sheet import judge

MAX_EXACT = 12  # largest smaller side the fallback solver accepts


def _assign_exact(matrix) -> list[tuple[int, int]]:
    """Maximum-sum one-to-one pairs (row, column) of a rows x columns matrix, rows <= columns."""
    rows, cols = len(matrix), len(matrix[0]) if len(matrix) else 0
    if rows > MAX_EXACT:
        raise ValueError(f"{rows} characters: the built-in solver handles up to {MAX_EXACT}; install scipy")
    # best[mask] over the first `c` columns: best total where `mask` is the set of rows used
    neg = float("-inf")
    best = [neg] * (1 << rows)
    best[0] = 0.0
    choice: list[list[int]] = []  # per column: for each mask, the row given that column (-1 none)
    for c in range(cols):
        new = best[:]
        pick = [-1] * (1 << rows)
        for mask in range(1 << rows):
            if best[mask] == neg:
                continue
            for r in range(rows):
                if mask & (1 << r):
                    continue
                total = best[mask] + float(matrix[r][c])
                target = mask | (1 << r)
                if total > new[target]:
                    new[target] = total
                    pick[target] = r
        choice.append(pick)
        best = new
    full = (1 << rows) - 1
    if best[full] == neg:
        raise ValueError("fewer columns than rows")
    pairs = []
    mask = full
    for c in range(cols - 1, -1, -1):
        r = choice[c][mask]
        if r >= 0:
            pairs.append((r, c))
            mask &= ~(1 << r)
    return sorted(pairs)


def assign(matrix, use_scipy: bool = True) -> list[tuple[int, int]]:
    """One-to-one (row, column) pairs with the largest total of ``matrix`` (rows: characters, columns: faces).

    Every row is paired when there are at least as many columns, otherwise every column is; pairs are
    sorted by row. ``use_scipy`` False forces the built-in exact solver (for tests).
    """
    np = require("numpy")
    values = np.asarray(matrix, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"similarity matrix must be 2-D, got shape {values.shape}")
    if values.size == 0:
        return []
    if use_scipy:
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            use_scipy = False
    if use_scipy:
        rows, cols = linear_sum_assignment(values, maximize=True)
        return sorted((int(r), int(c)) for r, c in zip(rows, cols, strict=True))
    if values.shape[0] <= values.shape[1]:
        return _assign_exact(values.tolist())
    return sorted((r, c) for c, r in _assign_exact(values.T.tolist()))


@dataclass
class CharacterScore:
    """One character in one image: the face paired with it (None: missing) and its similarity."""

    name: str
    similarity: float | None
    passed: bool
    threshold: float
    face: int | None = None  # index among the image's faces (largest first)
    box: list[float] | None = None
    reason: str = ""  # why it failed (missing, below threshold); empty when it passed


@dataclass
class MultiImageScore:
    index: int
    label: str
    faces: int
    characters: list[CharacterScore]
    matrix: list[list[float]] = field(default_factory=list)  # characters x faces similarities

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.characters)


@dataclass
class MultiScoreSheet:
    names: list[str]
    rows: list[MultiImageScore]
    model: str = ""

    def per_character(self) -> dict[str, dict[str, Any]]:
        """Per character over the batch: mean similarity (scored images), passed and missing counts."""
        out = {}
        for i, name in enumerate(self.names):
            sims = [s for r in self.rows if (s := r.characters[i].similarity) is not None]
            out[name] = {
                "mean_similarity": round(sum(sims) / len(sims), 4) if sims else None,
                "passed": sum(r.characters[i].passed for r in self.rows),
                "missing": sum(r.characters[i].face is None for r in self.rows),
                "images": len(self.rows),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": "characters",
            "model": self.model,
            "names": self.names,
            "summary": self.per_character(),
            "images": [
                {
                    "index": r.index,
                    "label": r.label,
                    "faces": r.faces,
                    "passed": r.passed,
                    "matrix": [[round(v, 4) for v in row] for row in r.matrix],
                    "characters": [
                        {
                            "name": c.name,
                            "similarity": None if c.similarity is None else round(c.similarity, 4),
                            "passed": c.passed,
                            "threshold": c.threshold,
                            "face": c.face,
                            "box": c.box,
                            "reason": c.reason,
                        }
                        for c in r.characters
                    ],
                }
                for r in self.rows
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self) -> str:
        """A plain-text table: one line per image and character."""
        lines = [f"{'image':<12} {'character':<16} {'face':>4} {'similarity':>10} {'threshold':>9}  result"]
        for r in self.rows:
            for c in r.characters:
                face = "-" if c.face is None else str(c.face)
                sim = "-" if c.similarity is None else f"{c.similarity:.3f}"
                result = "pass" if c.passed else f"FAIL: {c.reason}"
                lines.append(
                    f"{r.label[:12]:<12} {c.name[:16]:<16} {face:>4} {sim:>10} {c.threshold:>9.3f}  {result}"
                )
        for name, s in self.per_character().items():
            mean = "-" if s["mean_similarity"] is None else f"{s['mean_similarity']:.3f}"
            lines.append(
                f"{name}: mean similarity {mean}, passed {s['passed']}/{s['images']}, missing {s['missing']}"
            )
        return "\n".join(lines)


def score_matrix(
    names: Sequence[str],
    thresholds: Sequence[float],
    matrix,
    index: int = 0,
    label: str = "",
    boxes: Sequence[Any] | None = None,
    use_scipy: bool = True,
) -> MultiImageScore:
    """Pair characters (rows) with faces (columns) of one image and judge each character."""
    np = require("numpy")
    values = np.asarray(matrix, dtype=np.float64).reshape(len(names), -1)
    faces = values.shape[1]
    paired = dict(assign(values, use_scipy)) if faces else {}
    characters = []
    for i, name in enumerate(names):
        threshold = float(thresholds[i])
        j = paired.get(i)
        if j is None:
            why = "no face found" if faces == 0 else f"missing: {faces} face(s) went to other characters"
            characters.append(CharacterScore(name, None, False, threshold, reason=why))
            continue
        value = float(values[i, j])
        passed = judge(value, threshold)
        reason = "" if passed else f"similarity {value:.3f} below {threshold:.3f}"
        box = None if boxes is None else [round(float(v), 1) for v in boxes[j]]
        characters.append(CharacterScore(name, value, passed, threshold, j, box, reason))
    return MultiImageScore(index, label or f"image {index}", faces, characters, values.tolist())


def score_characters(
    analyzer,
    identities: Sequence[ReferenceIdentity],
    images: Iterable[tuple[str, Any]],
    threshold: float | None = None,
    control: Control | None = None,
) -> MultiScoreSheet:
    """Score each (label, RGB image) against several identities, one face per character.

    `threshold` None means each identity's suggested threshold. `control` advances by one per image.
    """
    np = require("numpy")
    if not identities:
        raise ValueError("give at least one identity")
    names = [identity.name for identity in identities]
    if len(set(names)) != len(names):
        raise ValueError(f"identity names must differ, got {names}")
    for identity in identities:
        check_same_model(identity, analyzer)
    thresholds = [identity.suggested_threshold if threshold is None else threshold for identity in identities]
    centroids = np.stack([np.asarray(identity.centroid, np.float32) for identity in identities])
    rows = []
    for index, (label, rgb) in enumerate(images):
        faces = [face for face in analyzer.detect(rgb) if face.embedding is not None]
        if faces:
            matrix = centroids @ np.stack([np.asarray(f.embedding, np.float32) for f in faces]).T
        else:
            matrix = np.zeros((len(names), 0))
        rows.append(score_matrix(names, thresholds, matrix, index, label, [f.box for f in faces]))
        if control is not None:
            control.advance()
    return MultiScoreSheet(names, rows, analyzer.name)
