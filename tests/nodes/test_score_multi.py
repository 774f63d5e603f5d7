"""Score Characters runs as ComfyUI runs it, on InsightFace-format test models: two people in one image."""

import json

import numpy as np
import pytest

from cf_testing.comfyui import image_batch as batch
from cf_testing.comfyui import run_node
from cf_testing.face_models import blank_image, face_image
from cf_testing.fixtures import needs_insightface
from charforge.nodes.score import BuildIdentity, LoadFaceModels
from charforge.nodes.score_multi import ScoreCharacters

FACE = ((144, 144, 100),)


def portrait(person):
    return face_image(faces=FACE, person=person)


def pair(left, right):
    """Two people side by side (640 x 320): person `left` on the left half, `right` on the right (None: empty)."""
    halves = [blank_image() if p is None else portrait(p) for p in (left, right)]
    return np.concatenate(halves, axis=1)


@pytest.fixture
def comfy(comfy_with_faces):
    return comfy_with_faces


@needs_insightface
def test_two_characters_each_keep_their_face(comfy):
    (face_models,) = run_node(LoadFaceModels, pack="buffalo_l", det_size=640, provider="CPU").result

    def identity(name, person):
        return run_node(
            BuildIdentity, face_models=face_models, name=name, save=False, images=batch(pair(person, None))
        ).result[0]

    ann, bob = identity("ann", 0), identity("bob", 1)
    images = [pair(0, 1), pair(1, 0), pair(0, None)]
    out = run_node(
        ScoreCharacters,
        node_id="4",
        face_models=face_models,
        images=batch(*images),
        identity_1=ann,
        identity_2=bob,
        threshold=0.5,
    )
    table, as_json, pass_count, sim_ann, sim_bob, sim_3, sim_4 = out.result
    rows = json.loads(as_json)["images"]
    assert [r["faces"] for r in rows] == [2, 2, 1]
    # swapped sides: each character follows its own face, wherever it is
    for row, ann_left in zip(rows[:2], (True, False), strict=True):
        a, b = row["characters"]
        assert a["passed"] and b["passed"] and a["similarity"] == pytest.approx(1.0, abs=1e-3)
        assert (a["box"][0] < 320) == ann_left and (b["box"][0] < 320) != ann_left
    assert rows[2]["characters"][1]["face"] is None and "missing" in rows[2]["characters"][1]["reason"]
    assert pass_count == 2 and sim_ann == pytest.approx(1.0, abs=1e-3) and sim_bob > 0.99
    assert sim_3 == sim_4 == 0.0
    assert "FAIL: missing" in table and out.ui["text"] == [table]
    assert [c.value for c in comfy.progress if c.node_id == "4"] == [1, 2, 3]
