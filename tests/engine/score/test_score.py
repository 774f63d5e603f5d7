"""The score engine on planted embeddings and planted scores (no face models needed)."""

import json
import math

import numpy as np
import pytest

from charforge.engine.faces import Face
from charforge.engine.score import (
    ARCFACE_SAME_PERSON,
    DEFAULT_THRESHOLD,
    ImageScore,
    ReferenceIdentity,
    ScoreSheet,
    best_of_n,
    best_set,
    combine,
    filter_passing,
    identity_drift,
    identity_from_embeddings,
    judge,
    list_identities,
    load_identity,
    rank,
    rejudge,
    save_identity,
    score_identity,
    summarise_set,
)
from charforge.engine.score.render import line_plot, table_image


def unit(vector):
    vector = np.asarray(vector, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def around(base, similarity, seed):
    """A unit vector with the given cosine similarity to the unit vector `base`."""
    noise = np.random.default_rng(seed).normal(size=base.shape).astype(np.float32)
    noise = unit(noise - (noise @ base) * base)
    return unit(similarity * base + math.sqrt(1 - similarity**2) * noise)


BASE = unit(np.random.default_rng(0).normal(size=512))


def sheet(values, threshold=0.5, metric="identity"):
    rows = []
    for i, v in enumerate(values):
        passed = judge(v, threshold)
        rows.append(
            ImageScore(i, v, passed, "no face found" if v is None else "" if passed else "low", f"img{i}")
        )
    return ScoreSheet(metric, rows, threshold, "planted")


# ---------------------------------------------------------------------------------------------- identity


def test_identity_centroid_baseline_and_suggested_threshold():
    refs = [(f"r{i}.jpg", around(BASE, 0.8, i), 1) for i in range(4)]
    identity = identity_from_embeddings("hero", "insightface:buffalo_l", refs)
    assert abs(float(np.linalg.norm(identity.centroid)) - 1) < 1e-6
    assert float(identity.centroid @ BASE) > 0.9  # the average is closer to the person than any single photo
    baseline = identity.baseline
    # Each reference against the centroid of the other three (leave-one-out): well above the ArcFace line.
    assert 0.5 < baseline["min"] <= baseline["mean"] <= baseline["max"] < 0.95
    expected = min((ARCFACE_SAME_PERSON + baseline["mean"]) / 2, baseline["min"])
    assert identity.suggested_threshold == pytest.approx(expected, abs=1e-3)
    assert not identity.outliers and "suggested threshold" in identity.summary()


def test_a_reference_of_another_person_is_an_outlier_left_out_of_the_centroid():
    other = unit(np.random.default_rng(99).normal(size=512))
    refs = [(f"r{i}.jpg", around(BASE, 0.8, i), 1) for i in range(4)] + [("stranger.jpg", other, 1)]
    identity = identity_from_embeddings("hero", "insightface:buffalo_l", refs)
    assert [r.source for r in identity.outliers] == ["stranger.jpg"]
    assert float(identity.centroid @ BASE) > 0.9
    assert identity.baseline["min"] > ARCFACE_SAME_PERSON  # the baseline ignores the outlier
    assert "stranger.jpg" in identity.summary() and "outlier" in identity.summary()


def test_one_reference_has_no_baseline_and_the_default_threshold():
    identity = identity_from_embeddings("solo", "insightface:buffalo_l", [("a.png", BASE, 1)])
    assert identity.baseline is None and identity.suggested_threshold == DEFAULT_THRESHOLD
    assert "add 3 or more" in identity.summary()


def test_no_usable_reference_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no usable reference face \(a.jpg: no face found\)"):
        identity_from_embeddings("x", "insightface:buffalo_l", [], [("a.jpg", "no face found")])


def test_identity_file_round_trip_in_the_charforge_folder(no_comfy, monkeypatch, tmp_path):
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(tmp_path / "models"))
    refs = [(f"r{i}.jpg", around(BASE, 0.8, i), 1) for i in range(3)]
    identity = identity_from_embeddings(
        "My Hero", "insightface:buffalo_l", refs, [("blank.png", "no face found")]
    )
    path = save_identity(identity)
    assert path == tmp_path / "models" / "charforge" / "identities" / "My_Hero.json"
    assert path.stat().st_size < 40_000  # small enough to share
    assert list_identities() == ["My_Hero"]
    loaded = load_identity("My_Hero")
    assert loaded.model == identity.model and loaded.skipped == [("blank.png", "no face found")]
    assert float(loaded.centroid @ identity.centroid) == pytest.approx(1.0, abs=1e-6)
    assert loaded.suggested_threshold == pytest.approx(identity.suggested_threshold, abs=1e-3)
    assert load_identity(str(path)).name == "My Hero"  # by path too
    with pytest.raises(FileNotFoundError, match="Saved identities: My_Hero"):
        load_identity("nobody")


def test_identity_files_are_checked():
    with pytest.raises(ValueError, match="not a CharForge identity"):
        ReferenceIdentity.from_dict({"format": "something else"})
    data = identity_from_embeddings("x", "m", [("a", BASE, 1)]).to_dict()
    data["version"] = 99
    with pytest.raises(ValueError, match="newer than this CharForge reads"):
        ReferenceIdentity.from_dict(data)


# ---------------------------------------------------------------------------------------------- scoring


class PlantedAnalyzer:
    """Stands in for FaceAnalyzer: each 'image' is the list of faces to return."""

    name = "insightface:buffalo_l"

    def detect(self, faces):
        return sorted(faces, key=lambda f: -f.area)


def face(size, embedding):
    return Face((0.0, 0.0, float(size), float(size)), 0.99, np.zeros((5, 2), np.float32), embedding)


def test_scoring_main_face_no_face_and_threshold():
    identity = identity_from_embeddings(
        "hero", "insightface:buffalo_l", [(f"r{i}", around(BASE, 0.9, i), 1) for i in range(3)]
    )
    same, stranger = around(BASE, 0.9, 10), unit(np.random.default_rng(7).normal(size=512))
    images = [("same", [face(100, same)]), ("none", []), ("group", [face(200, stranger), face(50, same)])]
    result = score_identity(PlantedAnalyzer(), identity, images)
    assert result.threshold == identity.suggested_threshold
    first, none, group = result.rows
    assert first.passed and first.value > 0.7 and first.details["faces"] == 1
    assert none.value is None and not none.passed and none.reason == "no face found"
    assert (
        not group.passed and group.value < 0.2 and "below" in group.reason
    )  # the largest face is the stranger
    best = score_identity(PlantedAnalyzer(), identity, images, threshold=0.5, face_choice="best_match").rows[
        2
    ]
    assert best.passed and best.details["face"] == 1
    assert "not scored: 1 (none: no face found)" in result.summary()


def test_identity_of_another_face_model_is_refused():
    identity = identity_from_embeddings("hero", "insightface:antelopev2", [("r", BASE, 1)])
    with pytest.raises(ValueError, match=r"built with insightface:antelopev2.*Load antelopev2"):
        score_identity(PlantedAnalyzer(), identity, [("a", [])])


# ---------------------------------------------------------------------------------------------- acting on scores


def test_filter_keeps_passing_and_reports_when_none_pass():
    result = filter_passing(sheet([0.7, None, 0.3, 0.55]))
    assert result.kept == [0, 3]
    assert "kept 2 of 4" in result.report and "img1 (no face found)" in result.report
    assert filter_passing(sheet([0.7, None, 0.3, 0.55]), threshold=0.6).kept == [0]
    none = filter_passing(sheet([0.1, None]))
    assert none.kept == [] and none.report.startswith("no image passed")


def test_rejudge_keeps_values_and_changes_verdicts():
    judged = rejudge(sheet([0.7, None, 0.3]), 0.2)
    assert [r.passed for r in judged.rows] == [True, False, True] and judged.rows[1].reason == "no face found"


def test_best_of_n_per_group():
    picks = best_of_n(sheet([0.2, 0.9, 0.4, None, None, None, 0.6, 0.61, 0.3]), 3)
    assert [p.index for p in picks] == [1, 3, 7]
    assert picks[0].passed and picks[0].note == ""
    assert picks[1].value is None and "no candidate could be scored" in picks[1].note
    short = best_of_n(sheet([0.2, 0.9, 0.4, 0.1]), 3)
    assert [p.index for p in short] == [1, 3] and "only 1 of 3 candidates" in short[1].note
    assert "best candidate fails" in short[1].note
    with pytest.raises(ValueError):
        best_of_n(sheet([0.1]), 0)


def test_identity_drift_over_frames():
    report = identity_drift(sheet([0.8, 0.75, 0.4, 0.35, None, 0.7, 0.2]), threshold=0.5)
    assert report.frames == 7 and report.scored == 6
    assert report.min == 0.2 and report.min_frame == 6
    assert report.mean == pytest.approx((0.8 + 0.75 + 0.4 + 0.35 + 0.7 + 0.2) / 6, abs=1e-4)
    assert report.drifting == [2, 3, 6] and report.no_face == [4]
    assert "drift below 0.500: 2-3, 6" in report.summary() and "no face in 1 frame(s): 4" in report.summary()
    assert identity_drift(sheet([None, None])).summary() == "no face found in any of 2 frame(s)"


def test_combine_weights_identity_and_clipscore():
    identity = sheet([0.6, None, 0.4], threshold=0.5)
    clip = sheet([0.30, 0.32, 0.20], threshold=None, metric="clip")
    combined = combine(identity, clip, identity_weight=1.0, text_weight=1.0)
    first, second, third = combined.rows
    assert first.value == pytest.approx((0.6 + 2.5 * 0.30) / 2)
    assert second.value is None and "no identity score" in second.reason
    assert third.value == pytest.approx((0.4 + 2.5 * 0.20) / 2) and not third.passed  # identity failed
    assert first.passed and rank(combined) == [0, 2, 1]
    only_text = combine(identity, clip, identity_weight=0.0, text_weight=1.0)
    assert only_text.rows[1].value == pytest.approx(0.8)
    judged = combine(identity, clip, threshold=0.6)
    assert [r.passed for r in judged.rows] == [True, False, False]
    with pytest.raises(ValueError, match="different batches"):
        combine(identity, sheet([0.3], metric="clip"))


def test_sets_are_summarised_and_the_best_named():
    steady = summarise_set("step 500", sheet([0.6, 0.62, 0.58]))
    lost_face = summarise_set("step 1000", sheet([0.9, None, None]))
    assert steady.identity_mean == pytest.approx(0.6) and steady.identity_min == pytest.approx(0.58)
    assert lost_face.faces == 1 and lost_face.combined == pytest.approx(0.3)  # no face counts as 0
    assert best_set([lost_face, steady]).name == "step 500"
    tie = summarise_set("step 1500", sheet([0.6, 0.62, 0.58]))
    assert best_set([steady, tie]).name == "step 500"  # the earlier checkpoint wins a tie
    with_clip = summarise_set("s", sheet([0.6]), sheet([0.3], None, "clip"), 1.0, 1.0)
    assert with_clip.clip_mean == pytest.approx(0.3) and with_clip.combined == pytest.approx((0.6 + 0.75) / 2)
    assert best_set([summarise_set("none", sheet([None]))]).name == "none"  # still ranked, at 0


def test_sheet_json_round_trip_and_subset():
    original = sheet([0.7, None, float("nan")])
    data = json.loads(original.to_json())
    assert data["summary"]["images"] == 3 and data["images"][2]["value"] is None
    back = ScoreSheet.from_dict(data)
    assert back.values[:2] == [0.7, None] and back.threshold == 0.5
    sub = original.subset([2, 0])
    assert [r.index for r in sub.rows] == [0, 1] and sub.rows[1].details["original_index"] == 0


# ---------------------------------------------------------------------------------------------- pictures


def test_table_and_plot_images():
    image = table_image("scores", ["#", "value"], [[0, 0.5], [1, None]], ["pass", "none"], footer="1 of 2")
    assert image.mode == "RGB" and image.width >= 200 and image.height > 60
    pixels = np.asarray(image)
    assert (pixels == (226, 244, 228)).all(axis=-1).any()  # the passing row is tinted green
    plot = line_plot("drift", [0.8, None, 0.3, 0.6], threshold=0.5, size=(400, 200))
    assert plot.size == (400, 200)
    assert (np.asarray(plot) == (210, 60, 50)).all(axis=-1).any()  # threshold line / low point in red
    many = table_image("many", ["#"], [[i] for i in range(200)])
    assert many.height < 200 * 24  # long tables are cut, with a note
