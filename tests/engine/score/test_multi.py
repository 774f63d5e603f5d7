"""Several characters in one image: optimal one-to-one face assignment and per-character scores."""

import itertools
import json

import numpy as np
import pytest

from charforge.engine.faces import Face
from charforge.engine.score import identity_from_embeddings
from charforge.engine.score.multi import assign, score_characters, score_matrix


def brute_force(matrix):
    """Best total over every one-to-one pairing (reference for small matrices)."""
    m = np.asarray(matrix)
    rows, cols = m.shape
    if rows <= cols:
        return max(
            sum(m[r, c] for r, c in zip(range(rows), p, strict=True))
            for p in itertools.permutations(range(cols), rows)
        )
    return max(
        sum(m[r, c] for r, c in zip(p, range(cols), strict=True))
        for p in itertools.permutations(range(rows), cols)
    )


def greedy(matrix):
    m = np.asarray(matrix, dtype=float).copy()
    pairs = []
    for r in range(m.shape[0]):
        c = int(np.argmax(m[r]))
        pairs.append((r, c))
        m[:, c] = -np.inf
    return pairs


# A's best face (0) is B's only good face: greedy gives A face 0 and B face 1 (0.1); optimal crosses.
TRAP = [[0.80, 0.70], [0.75, 0.10]]


@pytest.mark.parametrize("use_scipy", [True, False])
def test_assignment_beats_greedy_on_trap(use_scipy):
    assert greedy(TRAP) == [(0, 0), (1, 1)]
    assert assign(TRAP, use_scipy) == [(0, 1), (1, 0)]


@pytest.mark.parametrize("use_scipy", [True, False])
@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (2, 4), (4, 2), (3, 5), (5, 3), (6, 6)])
def test_assignment_is_optimal_on_random_matrices(use_scipy, shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        m = rng.uniform(-0.3, 0.9, size=shape)
        pairs = assign(m, use_scipy)
        assert len(pairs) == min(shape)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == min(shape)
        assert sum(m[r, c] for r, c in pairs) == pytest.approx(brute_force(m))


def test_builtin_solver_matches_scipy_on_eight_faces():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(7)
    m = rng.uniform(size=(8, 8))
    assert assign(m, False) == assign(m, True)


def test_missing_character_reported():
    # three characters, two faces: the third is missing, the others keep their best pairing
    m = [[0.6, 0.1], [0.2, 0.7], [0.3, 0.25]]
    row = score_matrix(["ann", "bob", "cy"], [0.36] * 3, m, label="two")
    by = {c.name: c for c in row.characters}
    assert (by["ann"].face, by["bob"].face, by["cy"].face) == (0, 1, None)
    assert by["ann"].passed and by["bob"].passed
    assert not by["cy"].passed and "missing" in by["cy"].reason and by["cy"].similarity is None
    assert not row.passed
    none = score_matrix(["ann"], [0.36], np.zeros((1, 0)))
    assert none.characters[0].reason == "no face found" and not none.passed


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


class PlantedAnalyzer:
    name = "insightface:buffalo_l"

    def detect(self, faces):
        return sorted(faces, key=lambda f: -f.area)


def test_score_characters_end_to_end_on_planted_faces():
    rng = np.random.default_rng(3)
    a, b, other = (unit(rng.normal(size=512)) for _ in range(3))
    ann = identity_from_embeddings("ann", PlantedAnalyzer.name, [("a", a, 1)])
    bob = identity_from_embeddings("bob", PlantedAnalyzer.name, [("b", b, 1)])
    # bob's face is the larger one (index 0 after sorting); ann's is smaller: order must not matter
    face_b = Face((0, 0, 100, 100), 0.9, None, unit(b + 0.3 * other))
    face_a = Face((200, 0, 260, 60), 0.9, None, unit(a + 0.2 * other))
    images = [("both", [face_a, face_b]), ("only bob", [face_b]), ("nobody", [])]
    sheet = score_characters(PlantedAnalyzer(), [ann, bob], images)
    both, only_bob, nobody = sheet.rows
    assert [c.face for c in both.characters] == [1, 0] and both.passed
    assert both.characters[0].box == [200.0, 0.0, 260.0, 60.0]
    assert both.characters[0].similarity == pytest.approx(float(a @ unit(a + 0.2 * other)), abs=1e-5)
    assert only_bob.characters[0].face is None and only_bob.characters[1].passed
    assert not any(c.passed for c in nobody.characters)
    summary = sheet.per_character()
    assert summary["ann"]["missing"] == 2 and summary["bob"]["missing"] == 1 and summary["bob"]["passed"] == 2
    data = json.loads(sheet.to_json())
    assert data["names"] == ["ann", "bob"] and len(data["images"]) == 3
    assert "FAIL: missing" in sheet.table() and "ann: mean similarity" in sheet.table()


def test_score_characters_refuses_other_model_and_duplicate_names():
    ann = identity_from_embeddings("ann", "insightface:antelopev2", [("a", unit(np.ones(512)), 1)])
    with pytest.raises(ValueError, match="cannot be compared"):
        score_characters(PlantedAnalyzer(), [ann], [])
    same = identity_from_embeddings("ann", PlantedAnalyzer.name, [("a", unit(np.ones(512)), 1)])
    with pytest.raises(ValueError, match="must differ"):
        score_characters(PlantedAnalyzer(), [same, same], [])
