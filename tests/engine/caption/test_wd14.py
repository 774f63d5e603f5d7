"""WD14 tagger backend on a tiny ONNX model in the real on-disk format (<name>.onnx + <name>.csv)."""

import numpy as np
import pytest
from PIL import Image

from cf_testing.caption_models import TAGS, write_tiny_wd14
from charforge.engine.caption.backends.base import CaptionerError
from charforge.engine.caption.backends.wd14 import (
    WD14Settings,
    WD14Tagger,
    best_providers,
    find_tagger,
    list_taggers,
    preprocess,
    read_tags,
)

BLUE, RED, GREEN, WHITE = (0, 0, 255), (255, 0, 0), (0, 255, 0), (255, 255, 255)


@pytest.fixture
def tagger_dir(no_comfy, monkeypatch):
    folder = no_comfy / "models" / "wd14_tagger"
    write_tiny_wd14(folder)
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(no_comfy / "models"))
    return folder


def square(color, size=32):
    return Image.new("RGB", (size, size), color)


def test_preprocess_pads_white_bgr_float_nhwc():
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    array = preprocess(image, 40)
    assert array.shape == (40, 40, 3) and array.dtype == np.float32
    assert array[20, 20].tolist() == [30.0, 20.0, 10.0]  # BGR, 0..255
    assert array[0, 0].tolist() == [255.0, 255.0, 255.0]  # padded with white above and below
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert preprocess(rgba, 16).min() == 255.0  # transparent pixels become white
    assert preprocess(image, 448).shape == (448, 448, 3)


def test_finds_and_lists_taggers_with_both_files(tagger_dir):
    (tagger_dir / "orphan.onnx").write_bytes(b"")
    assert list_taggers() == ["tiny-tagger"]
    onnx_path, csv_path = find_tagger("tiny-tagger")
    assert onnx_path == tagger_dir / "tiny-tagger.onnx" and csv_path == tagger_dir / "tiny-tagger.csv"
    assert find_tagger(str(onnx_path))[0] == onnx_path  # absolute path works too
    assert [t.name for t in read_tags(csv_path)] == [t[1] for t in TAGS]


def test_missing_model_names_folder_and_files(tagger_dir):
    with pytest.raises(CaptionerError) as info:
        WD14Tagger("wd-v1-4-moat-tagger-v2")
    message = str(info.value)
    assert "wd-v1-4-moat-tagger-v2.onnx" in message and "wd-v1-4-moat-tagger-v2.csv" in message
    assert "wd14_tagger" in message and str(tagger_dir) in message
    (tagger_dir / "orphan.onnx").write_bytes(b"")
    with pytest.raises(CaptionerError, match="orphan.csv"):
        WD14Tagger("orphan")


def test_tags_from_the_real_onnx_model(tagger_dir):
    tagger = WD14Tagger("tiny-tagger")
    assert tagger.size == 64 and tagger.max_side == 64  # read from the model's input
    captions = tagger.caption([square(BLUE), square(RED), square(GREEN), square(WHITE)])
    assert captions[0] == "blue sky, ^_^"  # underscores replaced, short emoticon kept
    assert captions[1] == "red theme, ^_^"
    assert captions[2] == "hero (character), ^_^"  # character tags first (0.91 >= 0.85)
    assert captions[3] == "white background, ^_^"
    assert all("general" not in c and "explicit" not in c for c in captions)  # ratings left out
    assert "CPUExecutionProvider" in tagger.notes()[0]
    tagger.close()
    with pytest.raises(CaptionerError, match="closed"):
        tagger.caption([square(BLUE)])


def test_thresholds_exclusions_and_options(tagger_dir):
    strict = WD14Tagger(
        "tiny-tagger",
        WD14Settings(
            character_threshold=0.95, general_threshold=0.6, replace_underscore=False, include_rating=True
        ),
    )
    assert strict.caption([square(GREEN)]) == ["general"]  # hero 0.91 < 0.95; ^_^ 0.5 < 0.6; best rating
    assert strict.caption([square(BLUE)]) == ["blue_sky, general"]
    excluded = WD14Tagger("tiny-tagger", WD14Settings(exclude_tags=["blue_sky", "^_^"]))
    assert excluded.caption([square(BLUE)]) == [""]  # nothing left: the runner reports "no caption"


def test_probabilities_match_a_numpy_reimplementation(no_comfy):
    onnx_path = write_tiny_wd14(no_comfy / "rand", designed=False, seed=3)
    tagger = WD14Tagger(str(onnx_path))
    images = [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 50, 3), dtype=np.uint8))
        for i in range(3)
    ]
    got = tagger.probabilities(images)
    import onnx
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer}
    pooled = np.stack([preprocess(im, 64).mean(axis=(0, 1)) for im in images])
    expected = 1 / (1 + np.exp(-(pooled @ weights["W"] + weights["B"])))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_fixed_batch_models_run_one_image_at_a_time(no_comfy):
    onnx_path = write_tiny_wd14(no_comfy / "fixed", fixed_batch=1)
    tagger = WD14Tagger(str(onnx_path))
    assert tagger.caption([square(BLUE), square(RED)]) == ["blue sky, ^_^", "red theme, ^_^"]


def test_csv_of_another_model_is_refused(no_comfy):
    onnx_path = write_tiny_wd14(no_comfy / "bad")
    csv_path = onnx_path.with_suffix(".csv")
    csv_path.write_text("\n".join(csv_path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(CaptionerError, match="another model"):
        WD14Tagger(str(onnx_path))


def test_best_providers_prefers_gpu_and_ends_with_cpu():
    assert best_providers(["CPUExecutionProvider", "CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert best_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
