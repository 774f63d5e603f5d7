"""The synthesis engine (charforge.engine.synth) on tiny models of the real signatures.

- the swapper is an ONNX file with inswapper_128's inputs, output and emap (tests/cf_testing/synth_models.py),
  loaded through insightface's own model zoo;
- GFPGAN, CodeFormer and RestoreFormer are spandrel's own architecture classes with random weights, saved
  as the released .pth files hold them, and detected by spandrel's ModelLoader;
- the upscaler is spandrel's ESRGAN (RRDB) class, saved as .safetensors;
- faces are planted for the test face pack (tests/cf_testing/face_models.py): the detector finds red cells,
  the recogniser tells "persons" apart by the texture around them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("insightface")
pytest.importorskip("spandrel")

from cf_testing.face_models import blank_image, face_image, write_face_pack  # noqa: E402
from cf_testing.synth_models import build_restorer, build_swapper_onnx, build_upscaler  # noqa: E402
from charforge.engine.control import Cancelled, Control  # noqa: E402
from charforge.engine.dataset import CropSettings, DatasetManifest, build_report, crop_dataset, load_folder  # noqa: E402
from charforge.engine.dataset.images import write_rgb  # noqa: E402
from charforge.engine.faces import FaceAnalyzer  # noqa: E402
from charforge.engine.score import build_identity  # noqa: E402
from charforge.engine.synth import (  # noqa: E402
    FaceSwapper,
    RestoreSettings,
    SwapperNotFoundError,
    SynthSettings,
    UnsupportedModelFile,
    cap_synthetic,
    check_identity,
    load_face_restorer,
    load_upscaler,
    restore_faces,
    synthesize,
    synthetic_allowance,
    upscale_tiled,
    upscale_to,
)
from charforge.engine.synth import models as synth_models  # noqa: E402
from charforge.engine.synth.paste import feather_mask  # noqa: E402

SIZE = (320, 320)
FACE = ((160, 160, 102),)  # a ~112 px face: the swap crop is nearly 1:1 with the photo


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A ComfyUI-style models folder: face pack, swappers (identity-preserving and random), an upscaler."""
    models = tmp_path_factory.mktemp("synth") / "models"
    write_face_pack(models / "insightface", "buffalo_l")
    build_swapper_onnx(models / "insightface" / "inswapper_128.onnx", mode="identity")
    build_swapper_onnx(models / "insightface" / "inswapper_random.onnx", mode="random", seed=3)
    build_upscaler(models / "upscale_models" / "4x-tiny-esrgan.safetensors", scale=4)
    return models


@pytest.fixture
def models(no_comfy, synth_root, monkeypatch):
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(synth_root))
    yield synth_root
    FaceAnalyzer.clear_cache()
    FaceSwapper.clear_cache()
    synth_models.clear_cache()


@pytest.fixture
def analyzer(models):
    return FaceAnalyzer.load("buffalo_l", det_size=320)


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.relative_to(folder).as_posix().encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ swap


def test_the_swapper_loads_through_insightfaces_model_zoo(models):
    import onnx
    from insightface import model_zoo
    from insightface.model_zoo.inswapper import INSwapper
    from onnx import numpy_helper

    path = models / "insightface" / "inswapper_random.onnx"
    model = model_zoo.get_model(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(model, INSwapper)  # routed by its signature, as the real inswapper_128 is
    assert [i.name for i in model.session.get_inputs()] == ["target", "source"]
    assert [i.shape for i in model.session.get_inputs()] == [[1, 3, 128, 128], [1, 512]]
    assert model.session.get_outputs()[0].shape == [1, 3, 128, 128]
    emap = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[-1])
    assert emap.shape == (512, 512) and np.array_equal(model.emap, emap)

    swapper = FaceSwapper.load("inswapper_random.onnx", providers=["CPUExecutionProvider"])
    assert (
        swapper.size == 128
        and FaceSwapper.load("inswapper_random.onnx", providers=["CPUExecutionProvider"]) is swapper
    )


def test_paste_back_changes_nothing_outside_the_face_mask(analyzer):
    import cv2

    swapper = FaceSwapper.load("inswapper_random.onnx")
    photo = face_image(SIZE, FACE, person=1)
    face = analyzer.detect(photo)[0]
    identity = analyzer.detect(face_image(SIZE, FACE, person=2))[0].embedding
    swapped, box = swapper.swap_face(photo, face, identity)
    changed = np.any(swapped != photo, axis=2)
    assert changed.sum() > 2000  # the random swapper really replaced the face
    # Where the feathered mask, warped into the photo, is zero, every pixel keeps its exact value.
    from insightface.app.common import Face as InsightFace

    _, matrix = swapper._model.get(
        photo[:, :, ::-1].copy(),
        InsightFace(kps=face.landmarks),
        InsightFace(embedding=identity),
        paste_back=False,
    )
    alpha = cv2.warpAffine(feather_mask(128), cv2.invertAffineTransform(matrix), (SIZE[0], SIZE[1]))
    assert not changed[alpha <= 0].any()
    x1, y1, x2, y2 = box
    assert (
        not changed[:y1].any()
        and not changed[y2:].any()
        and not changed[:, :x1].any()
        and not changed[:, x2:].any()
    )


def test_swap_main_or_all_faces(analyzer):
    swapper = FaceSwapper.load("inswapper_random.onnx")
    photo = face_image(SIZE, ((64, 64, 0), (224, 224, 0)), person=1)
    faces = analyzer.detect(photo)
    assert len(faces) == 2
    main = swapper.swap(photo, faces, faces[0].embedding, "main")
    every = swapper.swap(photo, faces, faces[0].embedding, "all")
    assert len(main.swapped) == 1 and len(every.swapped) == 2 and main.faces_found == 2
    with pytest.raises(ValueError, match="which must be"):
        swapper.swap(photo, faces, faces[0].embedding, "some")


def test_a_file_that_is_not_a_swapper_is_refused(models):
    with pytest.raises(SwapperNotFoundError, match="not a face swapper"):
        FaceSwapper.load("models/buffalo_l/w600k_tiny.onnx")
    with pytest.raises(SwapperNotFoundError, match="inswapper_128.onnx directly in"):
        FaceSwapper.load("nope.onnx")


# ------------------------------------------------------------------------------------------ restore


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["GFPGAN", "RestoreFormer", "CodeFormer"])
def test_restorers_are_detected_by_spandrel_and_restore_only_the_face(models, analyzer, kind):
    if kind == "CodeFormer":
        pytest.importorskip("spandrel_extra_arches")
    build_restorer(models / "facerestore_models" / f"{kind}-tiny.pth", kind)
    model = load_face_restorer(f"{kind}-tiny.pth")
    assert model.architecture == kind and model.purpose == "FaceSR" and model.scale == 1
    photo = face_image(SIZE, FACE, person=1)
    faces = analyzer.detect(photo)
    result = restore_faces(model, photo, faces, RestoreSettings(blend=1.0, fidelity=0.7))
    ((x1, y1, x2, y2),) = result.restored
    changed = np.any(result.rgb != photo, axis=2)
    assert changed[y1:y2, x1:x2].sum() > 5000
    outside = changed.copy()
    outside[y1:y2, x1:x2] = False
    assert not outside.any()
    if kind == "RestoreFormer":  # the quick one: blend mixes the restored face with the original
        half = restore_faces(model, photo, faces, RestoreSettings(blend=0.5))
        full_change = np.abs(result.rgb.astype(int) - photo).sum()
        half_change = np.abs(half.rgb.astype(int) - photo).sum()
        assert 0.3 * full_change < half_change < 0.7 * full_change


def test_an_upscaler_is_not_a_face_restorer_and_vice_versa(models):
    import shutil

    folder = models / "facerestore_models"
    folder.mkdir(exist_ok=True)
    shutil.copy(models / "upscale_models" / "4x-tiny-esrgan.safetensors", folder / "esrgan.safetensors")
    with pytest.raises(UnsupportedModelFile, match="not a face-restoration model"):
        load_face_restorer("esrgan.safetensors")
    (folder / "junk.pth").write_bytes(b"not a model")
    with pytest.raises(Exception, match="junk.pth|pickle|load"):
        load_face_restorer("junk.pth")


# ------------------------------------------------------------------------------------------ upscale


def test_tiled_upscaling_matches_the_whole_image_and_stops_on_cancel(models):
    import torch

    model = load_upscaler("4x-tiny-esrgan.safetensors")
    assert model.architecture == "ESRGAN" and model.scale == 4
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    whole = model.descriptor(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0)
    whole = (whole[0].permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    tiled = upscale_tiled(model, rgb, tile=24, pad=24)
    assert tiled.shape == (200, 280, 3) and tiled.dtype == np.uint8
    assert np.abs(tiled.astype(int) - whole).max() <= 1  # enough context: no seams
    assert upscale_to(model, rgb, (260, 180)).shape == (180, 260, 3)
    with pytest.raises(Cancelled):
        upscale_tiled(model, rgb, tile=24, control=Control(should_stop=lambda: True))


def test_crop_uses_the_upscaler_for_small_photos_and_reports_by_how_much(models, tmp_path):
    photos = tmp_path / "photos"
    write_rgb(photos / "small.png", np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8))
    write_rgb(photos / "big.png", np.random.default_rng(2).integers(0, 256, (600, 600, 3), dtype=np.uint8))
    manifest = load_folder(photos, tmp_path / "ds")
    cropped = crop_dataset(
        manifest,
        CropSettings(bucket_set="sd15", square=True, format="png"),
        upscaler=load_upscaler("4x-tiny-esrgan.safetensors"),
    )
    big, small = cropped.entries  # natural order of the file names
    assert small.bucket == [512, 512] and small.upscaled == pytest.approx(3.41, abs=0.01)
    assert any("upscaled 3.41x with 4x-tiny-esrgan.safetensors" in note for note in small.flags)
    assert big.upscaled is None and big.bucket == [512, 512]
    report = build_report(cropped)
    assert report["upscaled"] == [{"name": "small.png", "factor": 3.41}]
    assert "1 upscaled with 4x-tiny-esrgan.safetensors" in cropped.history[-1].summary
    # No faces, no Analyse: no identity to score the enhanced crop against, and the report says so.
    assert small.enhanced is not None and small.enhanced["kept"] and "similarity" not in small.enhanced
    assert report["enhanced"]["check"].startswith("enhanced images not scored: the dataset has no identity")
    assert report["enhanced"]["images"][0]["source"] == small.source


class PlantedUpscaler:
    """A x2 'model' (a spandrel-like descriptor): nearest-neighbour enlargement, faithful to the face, except
    on the calls numbered in `destroy`, which return flat grey (the face is gone)."""

    scale = 2
    device = "cpu"

    def __init__(self, destroy=()):
        self.destroy, self.calls = set(destroy), 0

    def __call__(self, x):
        import torch

        out = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        self.calls += 1
        return torch.full_like(out, 0.35) if self.calls in self.destroy else out


def test_enhanced_crops_are_scored_against_the_datasets_identity(analyzer, tmp_path):
    from charforge.engine.dataset import analyse, write_report
    from charforge.engine.dataset.faces import InsightFaces
    from charforge.engine.synth import ImageModel

    photos = tmp_path / "photos"
    for i in range(3):
        write_rgb(photos / f"hero_{i}.png", face_image(SIZE, FACE, person=1, noise=6, seed=i))
    detector = InsightFaces(analyzer)
    manifest = analyse(load_folder(photos, tmp_path / "ds"), detector, detector.name, workers=1)
    assert manifest.identity["model"] == "insightface:buffalo_l" and manifest.identity["references"] == 3
    # The second photo's upscale destroys its face; the others are enlarged faithfully.
    upscaler = ImageModel(PlantedUpscaler(destroy={2}), "planted-x2", "")
    cropped = crop_dataset(
        manifest, CropSettings(bucket_set="sd15", square=True, format="png"), workers=1, upscaler=upscaler
    )
    first, destroyed, third = cropped.entries
    threshold = manifest.identity["threshold"]
    for kept in (first, third):
        assert kept.accepted and kept.upscaled == 1.6 and kept.bucket == [512, 512]
        assert kept.enhanced["kept"] and kept.enhanced["similarity"] >= threshold
        assert kept.enhanced["factor"] == 1.6 and kept.enhanced["source"] == kept.source
    # Refused: the photo stays, un-enhanced (at its own size, as without an upscaler), with the reason.
    assert destroyed.accepted and destroyed.upscaled is None and destroyed.bucket == [320, 320]
    assert not destroyed.enhanced["kept"] and destroyed.enhanced["similarity"] is None
    reason = destroyed.enhanced["reason"]
    assert (
        reason.startswith("enhanced image: no face found any more (") and destroyed.enhanced["before"] > 0.9
    )
    assert any(f"refused: {reason}; the un-enhanced crop is kept" in note for note in destroyed.flags)
    assert "1 upscale(s) refused by the identity check" in cropped.history[-1].summary

    report = build_report(cropped)
    enhanced = report["enhanced"]
    assert enhanced["check"].startswith("enhanced images scored against 'ds' (insightface:buffalo_l)")
    assert (enhanced["kept"], enhanced["refused"]) == (2, 1)
    assert [(i["name"], i["kept"], i["factor"]) for i in enhanced["images"]] == [
        ("hero_0.png", True, 1.6),
        ("hero_1.png", False, 1.6),
        ("hero_2.png", True, 1.6),
    ]
    assert enhanced["images"][1]["reason"] == reason and enhanced["images"][1]["source"] == destroyed.source
    assert report["upscaled"] == [
        {"name": "hero_0.png", "factor": 1.6},
        {"name": "hero_2.png", "factor": 1.6},
    ]
    page = Path(write_report(cropped)["html"]).read_text(encoding="utf-8")
    assert "kept, 1.6x with planted-x2, from hero_0.png, identity" in page
    assert "refused (enhanced image: no face found any more (" in page and "2 kept, 1 refused" in page


def test_an_upscaler_that_changes_the_person_is_refused_with_the_similarity(analyzer, tmp_path):
    from charforge.engine.dataset import analyse
    from charforge.engine.dataset.faces import InsightFaces
    from charforge.engine.synth import EnhanceCheck, ImageModel, identity_from_record

    photos = tmp_path / "photos"
    for i in range(3):
        write_rgb(photos / f"hero_{i}.png", face_image(SIZE, FACE, person=1, noise=6, seed=i))
    detector = InsightFaces(analyzer)
    manifest = analyse(load_folder(photos, tmp_path / "ds"), detector, detector.name, workers=1)
    check = EnhanceCheck(analyzer, identity_from_record(manifest.identity), manifest.identity["threshold"])
    before = face_image(SIZE, FACE, person=1, noise=6, seed=5)
    stranger = face_image(SIZE, FACE, person=7)  # what a face-inventing upscaler could make of it
    verdict, was = check.judge(before, stranger)
    assert not verdict.passed and was is not None and was > check.threshold > verdict.similarity
    assert verdict.reason == (
        f"enhanced image no longer matches the identity ({verdict.similarity:.3f} < {check.threshold:.3f}; "
        f"{was:.3f} before)"
    )
    same, _ = check.judge(before, face_image(SIZE, FACE, person=1, noise=6, seed=6))
    assert same.passed
    # Not enhanced into a worse match: a photo already below the threshold is not the upscaler's fault.
    low = EnhanceCheck(analyzer, check.identity, 0.999)
    assert low.judge(before, before)[0].passed
    assert ImageModel(PlantedUpscaler(), "x", "").scale == 2


# ------------------------------------------------------------------------------------------ identity


def test_identity_check_rejects_a_planted_wrong_face(analyzer):
    identity = build_identity(
        "hero", analyzer, [(f"ref{i}", face_image(SIZE, FACE, person=1, noise=6, seed=i)) for i in range(3)]
    )
    threshold = identity.suggested_threshold
    same = check_identity(analyzer, identity, face_image(SIZE, FACE, person=1, noise=6, seed=9), threshold)
    wrong = check_identity(analyzer, identity, face_image(SIZE, FACE, person=7), threshold)
    nobody = check_identity(analyzer, identity, blank_image(SIZE), threshold)
    assert same.passed and same.similarity > threshold
    assert not wrong.passed and wrong.similarity < threshold and "similarity" in wrong.reason
    assert not nobody.passed and nobody.similarity is None and "no face" in nobody.reason


def test_the_synthetic_share_is_capped():
    assert synthetic_allowance(6, 0.4) == 4  # 4 of 10 = 40 %
    assert synthetic_allowance(10, 0.5) == 10 and synthetic_allowance(3, 0.0) == 0
    assert synthetic_allowance(3, 1.0) is None
    kept, over = cap_synthetic([("a", 0.5), ("b", 0.9), ("c", 0.7)], 2)
    assert kept == ["b", "c"] and over == ["a"]
    with pytest.raises(ValueError, match="between 0 and 1"):
        synthetic_allowance(3, 1.5)


# ------------------------------------------------------------------------------------------ synthesize


def _folders(tmp_path):
    photos, sources = tmp_path / "photos", tmp_path / "sources"
    for i in range(3):
        write_rgb(photos / f"hero_{i}.png", face_image(SIZE, FACE, person=1, noise=6, seed=i))
    # Sources: the identity-preserving test swapper keeps each source's face, so source "persons" decide
    # the identity check: person 1 passes, person 7 is the planted wrong face, a blank has no face.
    for i in range(3):
        write_rgb(sources / f"pose_{i}.png", face_image(SIZE, FACE, person=1, noise=6, seed=20 + i))
    write_rgb(sources / "wrong.png", face_image(SIZE, FACE, person=7))
    write_rgb(sources / "empty.png", blank_image(SIZE))
    (sources / "pose_0.txt").write_text("standing on a beach", encoding="utf-8")
    return photos, sources


def test_synthesize_marks_scores_caps_and_never_touches_the_sources(analyzer, tmp_path):
    photos, sources = _folders(tmp_path)
    before = folder_hash(sources)
    manifest = load_folder(photos, tmp_path / "ds")
    identity = build_identity(
        "hero",
        analyzer,
        [(p.name, np.asarray(__import__("PIL.Image").Image.open(p))) for p in sorted(photos.glob("*.png"))],
    )
    swapper = FaceSwapper.load("inswapper_128.onnx")
    seen = []
    control = Control(on_progress=lambda done, total, text: seen.append((done, total)))
    out, summary = synthesize(
        manifest, sources, identity, analyzer, swapper, settings=SynthSettings(max_share=0.4), control=control
    )
    assert folder_hash(sources) == before  # the source folder is only read
    synthetic = [e for e in out.entries if e.synthetic]
    assert [Path(e.synthesized_from).name for e in synthetic] == [
        "pose_0.png",
        "pose_1.png",
        "pose_2.png",
        "wrong.png",
    ]
    assert all(Path(e.file).parent == tmp_path / "ds" / "synthetic" for e in synthetic)
    by_source = {Path(e.synthesized_from).name: e for e in synthetic}
    assert "identity check: similarity" in by_source["wrong.png"].rejected[0]
    # 3 photos allow 2 synthetic images at 40 %: the third good one is over the cap.
    capped = [e for e in synthetic if any(r.startswith("synthetic cap") for r in e.rejected)]
    assert len(capped) == 1 and sum(e.accepted for e in synthetic) == 2
    assert by_source["pose_0.png"].caption == "standing on a beach"
    assert (
        summary.sources == 5 and summary.made == 4 and summary.below_threshold == 1 and summary.over_cap == 1
    )
    assert summary.skipped == [(str(sources / "empty.png"), "no face found")]
    assert seen[-1] == (5, 5)
    # Marked in the manifest file and in the report, with the source image.
    reloaded = DatasetManifest.load(out.save())
    assert sum(e.synthetic for e in reloaded.entries) == 4
    report = build_report(reloaded)
    assert report["synthetic"]["accepted"] == 2 and report["synthetic"]["share"] == 0.4
    assert {s["source"] for s in report["synthetic"]["images"]} >= {str(sources.resolve() / "wrong.png")}
    row = next(r for r in report["images"] if r["synthetic"] and r["status"] == "accepted")
    assert row["synthesized_from"].endswith(".png")


@pytest.mark.slow
def test_synthesize_restores_and_stops_on_cancel(analyzer, models, tmp_path):
    photos, sources = _folders(tmp_path)
    manifest = load_folder(photos, tmp_path / "ds")
    identity = build_identity("hero", analyzer, [("a", face_image(SIZE, FACE, person=1))])
    build_restorer(models / "facerestore_models" / "RestoreFormer-tiny.pth", "RestoreFormer")
    restorer = load_face_restorer("RestoreFormer-tiny.pth")
    swapper = FaceSwapper.load("inswapper_128.onnx")
    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        synthesize(
            manifest,
            sources,
            identity,
            analyzer,
            swapper,
            restorer,
            control=Control(should_stop=stop_after_two),
        )
    out, summary = synthesize(
        manifest,
        sources,
        identity,
        analyzer,
        swapper,
        restorer,
        settings=SynthSettings(max_share=1.0, threshold=-1.0),
    )
    made = [e for e in out.entries if e.synthetic]
    assert summary.made == 4 and all(
        any("restored with RestoreFormer-tiny.pth" in n for n in e.flags) for e in made
    )
    # A random-weight restorer paints over the planted face: the identity check catches every one of them.
    assert summary.accepted == 0 and all(
        e.rejected == ["identity check: no face found in the result"] for e in made
    )
    assert (
        out.history[-1].stage == "synthesize"
        and out.history[-1].settings["restorer"] == "RestoreFormer-tiny.pth"
    )


def test_synthesis_settings_are_checked(analyzer, tmp_path):
    with pytest.raises(ValueError, match="max_share"):
        SynthSettings(max_share=2).validate()
    with pytest.raises(ValueError, match="which must be"):
        SynthSettings(which="left").validate()
