"""CharForge/Score nodes run as ComfyUI runs them, on InsightFace-format test models."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cf_testing.comfyui import image_batch as batch
from cf_testing.comfyui import run_node
from cf_testing.face_models import blank_image, face_image
from cf_testing.fixtures import needs_insightface
from charforge import bridge
from charforge.deps import MissingDependencyError
from charforge.engine.faces import Face
from charforge.engine.score import ImageScore, ScoreSheet
from charforge.engine.score.sets import checkpoint_groups, natural_key, sample_prompts
from charforge.nodes.score import (
    BestOfN,
    BuildIdentity,
    CompareSets,
    FilterByScore,
    IdentityDrift,
    LoadFaceModels,
    LoadIdentity,
    PickCheckpoint,
    ScoreIdentity,
)


@pytest.fixture
def comfy(comfy_with_faces):
    return comfy_with_faces


def references():
    # Three photos of person 0 (slight noise) and one without a face.
    return [face_image(person=0, noise=2, seed=s) for s in range(3)] + [blank_image()]


@needs_insightface
def test_user_flow_build_score_filter_pick(comfy):
    (face_models,) = run_node(LoadFaceModels, pack="buffalo_l", det_size=320, provider="auto").result
    build = run_node(
        BuildIdentity,
        node_id="7",
        face_models=face_models,
        name="hero",
        save=True,
        images=batch(*references()),
    )
    identity, suggested, report, table = build.result
    assert len(identity.references) == 3 and identity.skipped == [("image 3", "no face found")]
    assert "saved to" in report and "image 3 (no face found)" in report
    saved = comfy.base_dir / "models" / "charforge" / "identities" / "hero.json"
    assert saved.is_file() and json.loads(saved.read_text())["model"] == "insightface:buffalo_l"
    assert 0 < suggested < 1 and table.shape[0] == 1 and table.shape[-1] == 3
    shown = build.ui["images"][0]
    assert shown["type"] == "temp" and (comfy.base_dir / "temp" / shown["filename"]).is_file()
    assert [c.value for c in comfy.progress if c.node_id == "7"] == [1, 2, 3, 4]

    # The saved identity is offered and loads by name.
    assert LoadIdentity.INPUT_TYPES()["required"]["name"][0] == ["hero"]
    (loaded, _, _) = run_node(LoadIdentity, name="hero").result

    generated = [
        face_image(person=0),
        face_image(person=5),
        blank_image(),
        face_image(person=0, noise=2, seed=9),
    ]
    scored = run_node(
        ScoreIdentity,
        face_models=face_models,
        identity=loaded,
        images=batch(*generated),
        threshold=0.0,
        face_choice="largest",
    )
    sheet, pass_count, mean, table, as_json = scored.result
    rows = json.loads(as_json)["images"]
    assert rows[2]["value"] is None and rows[2]["reason"] == "no face found"  # reported, not raised
    assert rows[0]["passed"] and rows[3]["passed"] and rows[0]["value"] > rows[1]["value"]
    assert pass_count == sum(r["passed"] for r in rows) and mean > 0
    assert scored.ui["images"] and "image(s) pass" in scored.ui["text"][0]
    # the job's history carries every value too (charforge pipeline's retries read it)
    assert [r["value"] for r in json.loads(scored.ui["scores"][0])["images"]] == [r["value"] for r in rows]

    images = batch(*generated)
    kept, count, report, kept_sheet, indices = run_node(
        FilterByScore, images=images, scores=sheet, threshold=0.0
    ).result
    assert count == kept.shape[0] == len(kept_sheet) and indices.split(",")[0] == "0"
    assert torch.equal(kept[0], images[0]) and "image 2 (no face found)" in report

    best, report, picks, indices = run_node(BestOfN, images=images, scores=sheet, group_size=2).result
    assert best.shape[0] == 2 and indices == "0,3"


@needs_insightface
def test_identical_image_scores_one_through_the_nodes(comfy):
    (face_models,) = run_node(LoadFaceModels, pack="buffalo_l", det_size=320, provider="CPU").result
    photo = face_image(person=2)
    identity = run_node(
        BuildIdentity, face_models=face_models, name="one", save=False, images=batch(photo)
    ).result[0]
    sheet = run_node(
        ScoreIdentity,
        face_models=face_models,
        identity=identity,
        images=batch(photo),
        threshold=0.5,
        face_choice="largest",
    ).result[0]
    assert sheet.rows[0].value == pytest.approx(1.0, abs=1e-4) and sheet.rows[0].passed


@needs_insightface
def test_identity_from_a_folder_of_photos(comfy):
    folder = comfy.base_dir / "input" / "refs"
    folder.mkdir(parents=True)
    for i, image in enumerate(references()):
        Image.fromarray(image).save(folder / f"ref{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a photo")
    (face_models,) = run_node(LoadFaceModels, pack="buffalo_l", det_size=320, provider="auto").result
    identity, _, report, _ = run_node(
        BuildIdentity, face_models=face_models, name="refs", save=False, folder="refs"
    ).result
    assert sorted(r.source for r in identity.references) == ["ref0.png", "ref1.png", "ref2.png"]
    assert "ref3.png (no face found)" in report and "broken.jpg" in report
    assert BuildIdentity.IS_CHANGED(folder="refs") != ""


@needs_insightface
def test_identity_drift_plots_frames(comfy):
    (face_models,) = run_node(LoadFaceModels, pack="buffalo_l", det_size=320, provider="auto").result
    identity = run_node(
        BuildIdentity, face_models=face_models, name="v", save=False, images=batch(*references())
    ).result[0]
    frames = [face_image(person=0)] * 3 + [face_image(person=6), blank_image(), face_image(person=0)]
    run = run_node(
        IdentityDrift,
        face_models=face_models,
        identity=identity,
        frames=batch(*frames),
        threshold=0.0,
        face_choice="largest",
    )
    plot, mean, low, drifting, report, sheet = run.result
    data = json.loads(report)
    assert data["no_face_frames"] == [4] and "3" in drifting.split(",") and low < mean
    assert plot.shape[1:] == (360, 800, 3) and run.ui["images"]


@needs_insightface
def test_checkpoint_picker_and_set_comparison(comfy):
    (face_models,) = run_node(LoadFaceModels, pack="buffalo_l", det_size=320, provider="auto").result
    identity = run_node(
        BuildIdentity, face_models=face_models, name="run", save=False, images=batch(*references())
    ).result[0]
    samples = comfy.base_dir / "input" / "run" / "sample"
    for name, persons in (("step_0500", [7, 8]), ("step_1000", [0, 0]), ("step_1500", [0, None])):
        (samples / name).mkdir(parents=True)
        for i, person in enumerate(persons):
            image = blank_image() if person is None else face_image(person=person, noise=2, seed=i)
            Image.fromarray(image).save(samples / name / f"s{i}.png")
    best, table, as_json = run_node(
        PickCheckpoint,
        face_models=face_models,
        identity=identity,
        samples_folder=str(samples),
        threshold=0.0,
        identity_weight=1.0,
        text_weight=0.5,
    ).result
    assert best == "step_1000"
    assert [c["name"] for c in json.loads(as_json)["checkpoints"]] == ["step_0500", "step_1000", "step_1500"]

    good, other = batch(face_image(person=0), face_image(person=0, noise=2)), batch(face_image(person=9))
    run = run_node(
        CompareSets,
        face_models=face_models,
        identity=identity,
        set_1=other,
        set_2=good,
        names="base model, reference-guided",
        threshold=0.0,
    )
    table, as_json, csv_path = run.result
    data = json.loads(as_json)
    assert data["best"] == "reference-guided" and [s["name"] for s in data["sets"]] == [
        "base model",
        "reference-guided",
    ]
    assert os.path.isfile(csv_path) and "identity_mean" in Path(csv_path).read_text()
    assert run.ui["images"]


def test_checkpoint_groups_from_trainer_sample_names(comfy_env, tmp_path):
    folder = tmp_path / "sample"
    folder.mkdir()
    for name in (
        "hero_e000002_00_20240101.png",
        "hero_e000002_01_20240101.png",
        "hero_e000004_00_20240101.png",
        "1712345678__000000500_0.jpg",
    ):
        Image.new("RGB", (8, 8)).save(folder / name)
    groups = checkpoint_groups(str(folder))
    assert sorted(groups) == ["000000500", "e000002", "e000004"] and len(groups["e000002"]) == 2
    Image.new("RGB", (8, 8)).save(folder / "random.png")
    with pytest.raises(ValueError, match="its own subfolder"):
        checkpoint_groups(str(folder))


def test_sample_prompts_follow_the_prompt_index_in_the_name():
    labels = ["hero_e000002_01_20240101.png", "1712345678__000000500_0.jpg", "other.png", "x.png"]
    assert sample_prompts(labels, ["a", "b"]) == ["b", "a", "a", "b"]  # index 1, index 0, then by position
    assert sample_prompts(labels, ["only"]) == ["only"]
    assert sorted(["step_10", "step_2", "step_1"], key=natural_key) == ["step_1", "step_2", "step_10"]


# ---------------------------------------------------------------------------------------------- without face models


def planted(values, threshold=0.5):
    rows = [
        ImageScore(
            i,
            v,
            v is not None and v >= threshold,
            "" if v is not None and v >= threshold else "low",
            f"image {i}",
        )
        for i, v in enumerate(values)
    ]
    return ScoreSheet("identity", rows, threshold, "planted")


def test_filter_with_none_passing_returns_a_black_frame_and_a_report(comfy_env):
    images = torch.rand(3, 24, 40, 3)
    run = run_node(FilterByScore, images=images, scores=planted([0.1, None, 0.2]), threshold=0.0)
    out, count, report, kept, indices = run.result
    assert count == 0 and tuple(out.shape) == (1, 24, 40, 3) and float(out.max()) == 0.0
    assert report.startswith("no image passed") and indices == "" and len(kept) == 0
    assert run.ui["text"] == [report]
    out, count, *_ = run_node(
        FilterByScore, images=images, scores=planted([0.1, None, 0.2]), threshold=0.15
    ).result
    assert count == 1 and torch.equal(out[0], images[2])


def test_best_of_n_and_filter_check_the_batch(comfy_env):
    images = torch.rand(6, 8, 8, 3)
    best, report, _, indices = run_node(
        BestOfN, images=images, scores=planted([0.2, 0.9, 0.4, None, 0.6, 0.3]), group_size=3
    ).result
    assert indices == "1,4" and torch.equal(best[1], images[4]) and "group 2: image 4" in report
    with pytest.raises(ValueError, match="scores are for 2 image"):
        run_node(FilterByScore, images=images, scores=planted([0.2, 0.3]), threshold=0.0)


def test_face_models_node_without_insightface_says_what_to_install(comfy, monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)
    with pytest.raises(MissingDependencyError, match="pip install insightface"):
        run_node(LoadFaceModels, pack="buffalo_l", det_size=640, provider="auto")


def test_face_models_node_lists_known_packs_even_when_none_is_installed(comfy_env):
    bridge.register_model_folders()
    choices = LoadFaceModels.INPUT_TYPES()["required"]["pack"][0]
    assert "buffalo_l" in choices and "antelopev2" in choices


class SlowAnalyzer:
    name = "insightface:buffalo_l"

    def detect(self, rgb):
        return [Face((0, 0, 10, 10), 0.9, None, np.ones(512, np.float32) / np.sqrt(512))]


def test_cancel_stops_scoring(comfy_env):
    from charforge.engine.score import identity_from_embeddings

    identity = identity_from_embeddings("x", "insightface:buffalo_l", [("a", np.ones(512) / np.sqrt(512), 1)])
    comfy_env.interrupt()
    with pytest.raises(comfy_env.model_management.InterruptProcessingException):
        run_node(
            ScoreIdentity,
            face_models=SlowAnalyzer(),
            identity=identity,
            images=torch.rand(4, 8, 8, 3),
            threshold=0.0,
            face_choice="largest",
        )
    assert comfy_env.progress == []
