"""The shared face API (charforge.engine.faces): InsightFace packs from ComfyUI-style folders.

The models are InsightFace-format ONNX files built for the test (tests/cf_testing/face_models.py) and
load through insightface's own code (FaceAnalysis and its model router). Tests that need insightface
are skipped when it is not installed; the folder checks and error messages run without it.
"""

import shutil
import sys

import numpy as np
import pytest

from cf_testing.face_models import blank_image, face_image, write_face_pack
from cf_testing.fixtures import needs_insightface
from charforge.deps import MissingDependencyError
from charforge.engine.faces import (
    FaceAnalyzer,
    FaceModelsNotFoundError,
    available_face_packs,
    best_providers,
    locate_pack,
)


@pytest.fixture(scope="session")
def face_pack(tmp_path_factory):
    """A ComfyUI-style models folder with an InsightFace pack named buffalo_l."""
    models = tmp_path_factory.mktemp("faces") / "models"
    write_face_pack(models / "insightface", "buffalo_l")
    return models


@pytest.fixture
def models_dir(no_comfy, face_pack, monkeypatch):
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(face_pack))
    yield face_pack
    FaceAnalyzer.clear_cache()


@needs_insightface
def test_pack_loads_through_insightface_and_finds_planted_faces(models_dir):
    analyzer = FaceAnalyzer.load("buffalo_l", det_size=320)
    assert analyzer.name == "insightface:buffalo_l" and analyzer.providers[-1] == "CPUExecutionProvider"
    # insightface routed each file by its signature: the planted detector and the IResNet recogniser.
    assert type(analyzer._detector).__name__ in ("SCRFD", "RetinaFace")
    assert type(analyzer._recogniser).__name__ == "ArcFaceONNX"
    faces = analyzer.detect(face_image(faces=((64, 64, 0), (192, 160, 255))))
    assert len(faces) == 2
    big, small = faces
    assert big.area > small.area  # largest first
    # Blue 255 -> a 160 px box, blue 0 -> an 80 px box, centred on the anchor point of the red cell (its corner).
    np.testing.assert_allclose(big.box, (112, 80, 272, 240), atol=1)
    np.testing.assert_allclose(small.box, (24, 24, 104, 104), atol=1)
    assert big.score > 0.95 and big.landmarks.shape == (5, 2)
    assert big.embedding.shape == (512,) and abs(float(np.linalg.norm(big.embedding)) - 1.0) < 1e-5
    # The eyes lie in the upper half of the box, left eye left of the right eye.
    (lx, ly), (rx, ry) = big.landmarks[0], big.landmarks[1]
    assert lx < rx and 80 < ly < 160 and 80 < ry < 160


@needs_insightface
def test_identical_image_scores_one_and_other_persons_less(models_dir):
    analyzer = FaceAnalyzer.load("buffalo_l", det_size=320)
    image = face_image(person=3)
    a, b = analyzer.detect(image)[0], analyzer.detect(image.copy())[0]
    assert float(a.embedding @ b.embedding) == pytest.approx(1.0, abs=1e-5)
    other = analyzer.detect(face_image(person=4))[0]
    assert float(a.embedding @ other.embedding) < 0.9
    # Float images in 0..1 (ComfyUI's IMAGE values) give the same embedding as uint8.
    c = analyzer.detect(image.astype(np.float32) / 255.0)[0]
    assert float(a.embedding @ c.embedding) == pytest.approx(1.0, abs=1e-4)


@needs_insightface
def test_no_face_is_an_empty_list(models_dir):
    assert FaceAnalyzer.load("buffalo_l", det_size=320).detect(blank_image()) == []


@needs_insightface
def test_batched_embedding_of_aligned_crops_matches_detect(models_dir):
    analyzer = FaceAnalyzer.load("buffalo_l", det_size=320)
    images = [face_image(person=p) for p in range(3)]
    faces = [analyzer.detect(image)[0] for image in images]
    crops = [analyzer.aligned_crop(image, face) for image, face in zip(images, faces, strict=True)]
    assert crops[0].shape == (112, 112, 3) and crops[0].dtype == np.uint8
    batch = analyzer.embed_aligned(crops)
    assert batch.shape == (3, 512)
    for row, face in zip(batch, faces, strict=True):
        assert float(row @ face.embedding) == pytest.approx(1.0, abs=1e-4)


@needs_insightface
def test_loaded_packs_are_cached_per_settings(models_dir):
    first = FaceAnalyzer.load("buffalo_l", det_size=320)
    assert FaceAnalyzer.load("buffalo_l", det_size=320) is first
    other = FaceAnalyzer.load("buffalo_l", det_size=640)
    assert other is not first and other.det_size == 640
    detection_only = FaceAnalyzer.load("buffalo_l", det_size=320, with_embeddings=False)
    face = detection_only.detect(face_image())[0]
    assert face.embedding is None and face.landmarks is not None


@needs_insightface
def test_inside_comfyui_the_pack_comes_from_models_insightface(comfy_env, face_pack):
    from charforge import bridge

    bridge.register_model_folders()
    shutil.copytree(face_pack / "insightface", comfy_env.base_dir / "models" / "insightface")
    try:
        assert available_face_packs() == ["buffalo_l"]
        analyzer = FaceAnalyzer.load("buffalo_l", det_size=320)
        assert analyzer.folder.startswith(str(comfy_env.base_dir))
        assert len(analyzer.detect(face_image())) == 1
    finally:
        FaceAnalyzer.clear_cache()


def test_double_nested_pack_is_explained_with_the_fix(no_comfy, tmp_path, monkeypatch):
    models = tmp_path / "models"
    write_face_pack(models / "insightface", "antelopev2", nested=True)
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(models))
    assert available_face_packs() == []  # insightface could not load it, so it is not offered
    with pytest.raises(FaceModelsNotFoundError) as error:
        FaceAnalyzer.load("antelopev2")
    message = str(error.value)
    inner = models / "insightface" / "models" / "antelopev2" / "antelopev2"
    assert "nested one folder too deep" in message and str(inner) in message
    assert "mv" in message and "move the files up one level" in message


def test_pack_without_the_models_level_is_explained(no_comfy, tmp_path, monkeypatch):
    models = tmp_path / "models"
    pack = write_face_pack(models / "insightface", "buffalo_l")
    shutil.move(str(pack), str(models / "insightface" / "buffalo_l"))
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(models))
    with pytest.raises(FaceModelsNotFoundError, match="extra 'models' level"):
        locate_pack("buffalo_l")


def test_missing_pack_names_folder_and_expected_files(models_dir):
    with pytest.raises(FaceModelsNotFoundError) as error:
        FaceAnalyzer.load("antelopev2")
    message = str(error.value)
    assert str(models_dir / "insightface" / "models" / "antelopev2") in message
    assert (
        "scrfd_10g_bnkps.onnx" in message
        and "glintr100.onnx" in message
        and "Packs found: buffalo_l" in message
    )


def test_no_model_folder_configured(no_comfy):
    with pytest.raises(FaceModelsNotFoundError, match="CHARFORGE_MODELS_DIR"):
        FaceAnalyzer.load("buffalo_l")


def test_missing_insightface_says_what_to_install(models_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"insightface.*pip install insightface"):
        FaceAnalyzer.load("buffalo_l")


@needs_insightface
def test_pack_without_a_detector_is_explained(no_comfy, tmp_path, monkeypatch):
    models = tmp_path / "models"
    pack = write_face_pack(models / "insightface", "buffalo_l")
    (pack / "det_tiny.onnx").unlink()
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(models))
    with pytest.raises(FaceModelsNotFoundError, match=r"no face detector.*w600k_tiny.onnx.*det_10g.onnx"):
        FaceAnalyzer.load("buffalo_l")


def test_provider_choice_prefers_accelerators():
    assert best_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert best_providers(["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert best_providers(["DmlExecutionProvider", "CPUExecutionProvider"])[0] == "DmlExecutionProvider"
    assert best_providers(["CoreMLExecutionProvider", "CPUExecutionProvider"])[0] == "CoreMLExecutionProvider"


def test_bad_arguments_are_refused(models_dir):
    with pytest.raises(ValueError, match="multiple of 32"):
        FaceAnalyzer.load("buffalo_l", det_size=100)
    with pytest.raises(FaceModelsNotFoundError, match="invalid face model pack name"):
        FaceAnalyzer.load("../buffalo_l")
