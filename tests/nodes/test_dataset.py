"""CharForge/Dataset nodes run as ComfyUI runs them."""

import os

import pytest
from PIL import Image

from cf_testing.comfyui import run_node
from charforge.nodes.dataset import ImageQuality, ListImages


def _photo(path, size=(64, 48), color="red", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, **save)
    return path


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    _photo(folder / "img10.png")
    _photo(folder / "img2.jpg", (30, 90), "blue")
    _photo(folder / "img1.webp", (100, 100), "green")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    (folder / "notes.txt").write_text("ignored")
    _photo(folder / "sub" / "deep.png")
    _photo(folder / ".thumbs" / "hidden.png")
    return folder


def test_lists_counts_and_previews(comfy_env, photos):
    run = run_node(
        ListImages, node_id="5", folder=str(photos), recursive=False, max_preview=8, preview_size=64
    )
    preview, count, paths = run.result
    assert count == 3
    assert [os.path.basename(p) for p in paths.splitlines()] == ["img1.webp", "img2.jpg", "img10.png"]
    assert tuple(preview.shape) == (3, 64, 64, 3)
    assert float(preview.min()) >= 0.0 and float(preview.max()) <= 1.0
    # img2 is tall and blue: letterboxed, so the centre is blue and the left edge is black padding.
    assert preview[1, 32, 32, 2] > 0.9 and preview[1, 32, 0].sum() == 0
    assert "broken.jpg" in run.ui["text"][0] and "rejected" in run.ui["text"][0]
    # One progress step per file, reported on this node.
    assert [c.value for c in comfy_env.progress] == [1, 2, 3, 4]
    assert {c.node_id for c in comfy_env.progress} == {"5"}


def test_recursive_skips_hidden_folders(comfy_env, photos):
    run = run_node(ListImages, folder=str(photos), recursive=True, max_preview=1, preview_size=64)
    names = [os.path.basename(p) for p in run.result[2].splitlines()]
    assert "deep.png" in names and "hidden.png" not in names
    assert run.result[0].shape[0] == 1  # only max_preview images are decoded for the preview


def test_exif_orientation_is_applied(comfy_env, tmp_path):
    img = Image.new("RGB", (80, 40), "white")
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: display rotated by 90 degrees
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    from charforge.engine.dataset import load_image

    assert load_image(tmp_path / "phone.jpg").size == (40, 80)


def test_relative_folder_is_under_comfy_input(comfy_env):
    _photo(comfy_env.base_dir / "input" / "hero" / "a.png")
    run = run_node(ListImages, folder="hero", recursive=False, max_preview=2, preview_size=64)
    assert run.result[1] == 1


def test_empty_folder_gives_zero_and_a_black_frame(comfy_env, tmp_path):
    (tmp_path / "empty").mkdir()
    run = run_node(
        ListImages, folder=str(tmp_path / "empty"), recursive=False, max_preview=2, preview_size=64
    )
    preview, count, paths = run.result
    assert count == 0 and paths == ""
    assert tuple(preview.shape) == (1, 64, 64, 3) and float(preview.max()) == 0.0


def test_missing_folder_is_a_clear_error(comfy_env, tmp_path):
    with pytest.raises(NotADirectoryError, match="nope"):
        run_node(ListImages, folder=str(tmp_path / "nope"), recursive=False, max_preview=2, preview_size=64)


def test_cancel_stops_the_listing(comfy_env, photos):
    comfy_env.interrupt()
    with pytest.raises(comfy_env.model_management.InterruptProcessingException):
        run_node(ListImages, folder=str(photos), recursive=False, max_preview=8, preview_size=64)
    assert comfy_env.progress == []


def test_is_changed_follows_folder_contents(comfy_env, photos):
    before = ListImages.IS_CHANGED(folder=str(photos), recursive=False)
    assert before == ListImages.IS_CHANGED(folder=str(photos), recursive=False)
    _photo(photos / "img3.png")
    assert ListImages.IS_CHANGED(folder=str(photos), recursive=False) != before


def test_runs_outside_comfyui(no_comfy, photos):
    run = run_node(ListImages, folder=str(photos), recursive=False, max_preview=2, preview_size=32)
    assert run.result[1] == 3


# ---------------------------------------------------------------------------- Image Quality


def _batch(*arrays):
    import numpy as np
    import torch

    return torch.from_numpy(np.stack(arrays).astype("float32"))


def _checkerboard(size, cell):
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size]
    board = (((yy // cell) + (xx // cell)) % 2).astype("float32")
    return np.repeat(board[:, :, None], 3, axis=2)


def test_quality_separates_sharp_from_blurred(comfy_env):
    import json

    import cv2
    import numpy as np

    sharp = _checkerboard(256, 16)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 6)
    flat = np.full((256, 256, 3), 0.5, dtype="float32")
    run = run_node(ImageQuality, node_id="3", images=_batch(sharp, blurred, flat), min_sharpness=60.0)
    report, sharp_count = run.result
    rows = json.loads(report)
    assert [row["sharp"] for row in rows] == [True, False, False]
    assert rows[0]["sharpness"] > 10 * rows[1]["sharpness"] and rows[2]["sharpness"] == 0
    assert sharp_count == 1 and run.ui["text"] == ["1 of 3 image(s) sharp (min_sharpness 60)"]
    assert abs(rows[2]["brightness"] - 0.5) < 0.01 and rows[2]["contrast"] < 0.01
    assert [c.value for c in comfy_env.progress] == [1, 2, 3]


def test_sharpness_does_not_depend_on_photo_size():
    import cv2

    from charforge.engine.dataset import measure_quality

    # The same photo at two camera resolutions (both above the analysis size, as real photos are).
    base = _checkerboard(768, 24)
    large = cv2.resize(base, (1536, 1536), interpolation=cv2.INTER_NEAREST)
    a, b = measure_quality(base).sharpness, measure_quality(large).sharpness
    assert abs(a - b) / a < 0.2

    def raw(img):
        return cv2.Laplacian(cv2.cvtColor((img * 255).astype("uint8"), cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()

    assert raw(base) > 1.5 * raw(large)  # unnormalised, the larger copy would look blurrier


def test_quality_without_opencv_says_what_to_install(comfy_env, monkeypatch):
    import sys

    from charforge.deps import MissingDependencyError

    monkeypatch.setitem(sys.modules, "cv2", None)  # as if opencv were not installed
    with pytest.raises(
        MissingDependencyError, match=r"opencv-python-headless.*pip install opencv-python-headless"
    ):
        run_node(ImageQuality, images=_batch(_checkerboard(32, 4)), min_sharpness=60.0)
