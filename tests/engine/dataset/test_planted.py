"""The dataset pipeline on a folder with planted problems, node by node as ComfyUI runs it.

The folder is generated here (no binary fixtures): synthetic "photos" (smooth colour fields, shapes and
fine grain, so sharpness and perceptual hashes behave as on real photos) carrying a face marker, an
upright black ellipse; a white band across it marks a different person. A marker detector stands in for
InsightFace (connected through Analyse's `face_models` input, as Load Face Models would be): it finds
the ellipses only when they stand upright, so a photo whose EXIF rotation is ignored has no face.
Planted: exact and near duplicates, a blurred copy, a tiny image, a corrupt file, a photo without a face,
a group photo, a photo of someone else, alpha / palette / greyscale / 16-bit PNGs, an EXIF-rotated JPEG
and unicode file names.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cf_testing.comfyui import run_node
from charforge.engine.dataset import DatasetManifest, Face
from charforge.nodes.dataset import (
    AnalyseDataset,
    AugmentDataset,
    CropDataset,
    DatasetReport,
    DeduplicateDataset,
    ExportDataset,
    FilterDataset,
    LoadDataset,
)

# --------------------------------------------------------------------------------------------- photos


def synthetic_photo(seed: int, size=(1200, 900), faces=((0.5, 0.4, 0),), marker: str = "ellipse") -> np.ndarray:
    """An RGB uint8 'photo': smooth colour field, a few shapes, grain, and face markers.

    `faces`: (x, y, person) per marker, x and y as shares of the width and height. `marker`: "ellipse"
    for `MarkerFaces`; "cell" for the InsightFace-format test pack (tests/cf_testing/face_models.py): a
    32 px pure-red cell on a 32 px grid (a 16 px cell on the detector's grid once Analyse halves the
    photo) inside the person's texture, which is what that pack's recogniser tells people apart by.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    field = rng.uniform(90, 210, size=(6, 8, 3)).astype(np.float32)
    image = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(30):
        colour = tuple(float(c) for c in rng.uniform(70, 210, size=3))
        x, y = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        r = int(rng.uniform(0.03, 0.12) * width)
        if rng.uniform() < 0.5:
            cv2.circle(image, (x, y), r, colour, -1)
        else:
            cv2.rectangle(image, (x - r, y - r // 2), (x + r, y + r // 2), colour, -1)
    image = np.clip(image + rng.normal(0, 12, size=image.shape), 0, 255).astype(np.uint8)
    for fx, fy, person in faces:
        centre = (int(fx * width), int(fy * height))
        if marker == "cell":
            _draw_cell_face(image, centre, person)
            continue
        axes = (int(0.05 * width), int(0.09 * height))
        cv2.ellipse(image, centre, axes, 0, 0, 360, (0, 0, 0), -1)
        if person:
            cv2.rectangle(image, (centre[0] - axes[0] // 2, centre[1] - 4), (centre[0] + axes[0] // 2, centre[1] + 4),
                          (255, 255, 255), -1)
    return image


def _draw_cell_face(image: np.ndarray, centre: tuple[int, int], person: int) -> None:
    from cf_testing.face_models import face_image

    x, y = (centre[0] // 32) * 32, (centre[1] // 32) * 32
    texture = np.kron(face_image(size=(160, 160), faces=(), person=person), np.ones((2, 2, 1), np.uint8))
    top, left = max(y - 160, 0), max(x - 160, 0)
    patch = texture[top - (y - 160):, left - (x - 160):][: image.shape[0] - top, : image.shape[1] - left]
    image[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
    image[y:y + 32, x:x + 32] = (255, 0, 0)


class MarkerFaces:
    """Finds upright black ellipses; a white band inside gives the other of two 512-d 'identities'."""

    name = "test-markers"

    def detect(self, rgb):
        rgb = np.asarray(rgb)
        mask = (rgb.max(axis=2) < 40).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))  # across the white band
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask)
        faces = []
        for label in range(1, count):
            x, y, w, h, area = stats[label]
            if area < 150 or h < 1.2 * w:  # not a face, or a face lying on its side
                continue
            inside = rgb[y:y + h, x + w // 4:x + 3 * w // 4].min(axis=2)
            embedding = np.zeros(512, dtype=np.float32)
            embedding[1 if (inside > 220).mean() > 0.02 else 0] = 1.0
            faces.append(Face(box=(float(x), float(y), float(x + w), float(y + h)), score=0.99, embedding=embedding))
        return sorted(faces, key=lambda f: -f.area)


def _save(path: Path, rgb: np.ndarray, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **options)
    return path


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return make_planted_folder(tmp_path_factory.mktemp("planted") / "photos of Élodie")


def make_planted_folder(folder: Path, marker: str = "ellipse") -> Path:
    """Write the planted-problem photo folder (20 files; see the module docstring) and return it.

    `marker`: the face markers (see `synthetic_photo`); "cell" photos are 1280 x 960 so Analyse halves
    them exactly, and their near duplicate is a re-encode rather than a resize (which would move the
    cell off the test detector's grid).
    """
    size = (1280, 960) if marker == "cell" else (1200, 900)

    def photo(seed, faces=((0.5, 0.4, 0),), dims=None):
        return synthetic_photo(seed, size=dims or size, faces=faces, marker=marker)

    good = {f"good_{i:02d}.jpg": photo(i) for i in range(1, 7)}
    for name, rgb in good.items():
        _save(folder / name, rgb, quality=95)
    (folder / "good_01 copy.jpg").write_bytes((folder / "good_01.jpg").read_bytes())  # exact duplicate
    if marker == "cell":
        near = np.clip(good["good_02.jpg"].astype(int) + 4, 0, 255).astype(np.uint8)
        _save(folder / "good_02_resized.jpg", near, quality=75)  # near duplicate: brighter, re-encoded
    else:
        near = cv2.resize(good["good_02.jpg"], (1000, 750), interpolation=cv2.INTER_AREA)
        _save(folder / "good_02_resized.jpg", near, quality=80)  # near duplicate
    _save(folder / "good_03_blurred.jpg", cv2.GaussianBlur(good["good_03.jpg"], (0, 0), 5), quality=95)
    _save(folder / "tiny.png", photo(20, dims=(200, 150)))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    _save(folder / "landscape.jpg", photo(21, faces=()), quality=95)  # no face
    _save(folder / "group.jpg", photo(22, faces=((0.3, 0.4, 0), (0.7, 0.45, 0))), quality=95)
    _save(folder / "someone_else.jpg", photo(23, faces=((0.5, 0.4, 1),)), quality=95)
    # Unicode names, including the caption sidecar the loader should pick up.
    _save(folder / "Élodie_été_写真.jpg", photo(24), quality=95)
    (folder / "Élodie_été_写真.txt").write_text("smiling at the beach, ohwx\nsecond line ignored\n", encoding="utf-8")
    # Non-RGB PNGs: alpha (transparent border), palette, greyscale, 16-bit greyscale.
    rgba = np.dstack([photo(25), np.full((size[1], size[0]), 255, np.uint8)])
    rgba[:60, :, 3] = 0
    _save(folder / "alpha.png", rgba)
    Image.fromarray(photo(26)).convert("P", palette=Image.ADAPTIVE, colors=255).save(folder / "palette.png")
    Image.fromarray(cv2.cvtColor(photo(27), cv2.COLOR_RGB2GRAY)).save(folder / "grey.png")
    grey16 = cv2.cvtColor(photo(29), cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
    Image.fromarray(grey16).save(folder / "grey16.png")
    # Stored sideways with EXIF orientation 6: displayed upright only when the rotation is applied.
    upright = photo(28, dims=(size[1], size[0]))
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # landscape as stored
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    _save(folder / "rotated.jpg", stored, quality=95, exif=exif.tobytes())
    return folder


# --------------------------------------------------------------------------------------------- the run


def _reasons(manifest: DatasetManifest) -> dict[str, list[str]]:
    return {entry.name: entry.rejected for entry in manifest.entries if not entry.parent}


@pytest.fixture(scope="module")
def pipeline(planted, tmp_path_factory):
    """Load -> Analyse -> Filter -> Deduplicate -> Crop -> Augment -> Export -> Report, in a ComfyUI stand-in."""
    import importlib
    import sys

    from cf_testing.comfyui import STUBS_DIR
    from charforge import bridge

    base = tmp_path_factory.mktemp("comfy")
    sys.path.insert(0, str(STUBS_DIR))
    for name in ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "server"):
        sys.modules.pop(name, None)
    folder_paths = importlib.import_module("folder_paths")
    folder_paths.set_base_directory(base)
    bridge.reset()
    before = _tree_hashes(planted)
    try:
        runs = {}
        runs["load"] = run_node(LoadDataset, folder=str(planted), name="élodie test", recursive=False,
                                read_captions=True, workers=2)
        dataset = runs["load"].result[0]
        runs["analyse"] = run_node(AnalyseDataset, dataset=dataset, face_detector="none", insightface_pack="",
                                   workers=2, face_models=MarkerFaces())
        runs["filter"] = run_node(FilterDataset, dataset=runs["analyse"].result[0], min_side=512,
                                  min_sharpness=50.0, min_brightness=0.1, max_brightness=0.92, min_contrast=0.03,
                                  require_face=True, max_people=1, min_face_size=64, max_identity_distance=0.6)
        runs["dedup"] = run_node(DeduplicateDataset, dataset=runs["filter"].result[0], threshold=8, hash="phash",
                                 workers=2)
        runs["crop"] = run_node(CropDataset, dataset=runs["dedup"].result[0], buckets="sdxl", mode="face",
                                headroom=0.15, square=False, upscale=False, format="png", workers=2)
        runs["augment"] = run_node(AugmentDataset, dataset=runs["crop"].result[0], flip=True, color_jitter=0.0,
                                   seed=0, workers=2)
        runs["export"] = run_node(ExportDataset, dataset=runs["augment"].result[0], trigger="ohwx",
                                  class_tokens="woman", repeats=10, export_name="kohya",
                                  caption_mode="caption, trigger first")
        runs["report"] = run_node(DatasetReport, dataset=runs["export"].result[0], trigger="", thumbnail_size=128,
                                  per_sheet=48, workers=2)
        yield {"runs": runs, "base": base, "before": before, "planted": planted}
    finally:
        sys.path.remove(str(STUBS_DIR))
        for name in ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "server"):
            sys.modules.pop(name, None)
        bridge.reset()


EXPECTED_REJECTIONS = {
    "good_03_blurred.jpg": "blurry",
    "tiny.png": "too small",
    "corrupt.jpg": "unreadable image",
    "landscape.jpg": "no face found",
    "group.jpg": "several people",
    "someone_else.jpg": "different person",
}
EXPECTED_ACCEPTED = {"good_03.jpg", "good_04.jpg", "good_05.jpg", "good_06.jpg",
                     "Élodie_été_写真.jpg", "alpha.png", "palette.png", "grey.png", "grey16.png", "rotated.jpg"}


def test_each_planted_problem_is_caught_with_its_reason(pipeline):
    final = pipeline["runs"]["export"].result[0]
    reasons = _reasons(final)
    for name, expected in EXPECTED_REJECTIONS.items():
        assert reasons[name], f"{name} was not rejected"
        assert reasons[name][0].startswith(expected), (name, reasons[name])
    # Exactly one photo of each duplicate pair survives, and the other names it.
    kept = set()
    for pair, reason in (({"good_01.jpg", "good_01 copy.jpg"}, "exact duplicate of {}"),
                         ({"good_02.jpg", "good_02_resized.jpg"}, "near duplicate of {} (hash distance")):
        dropped = [n for n in pair if reasons[n]]
        assert len(dropped) == 1, (pair, [reasons[n] for n in pair])
        survivor = (pair - set(dropped)).pop()
        assert reasons[dropped[0]][0].startswith(reason.format(survivor)), reasons[dropped[0]]
        kept.add(survivor)
    # The larger original wins over its resized copy (equal sharpness would fall back to size).
    assert "good_02.jpg" in kept
    accepted = {name for name, why in reasons.items() if not why}
    assert accepted == EXPECTED_ACCEPTED | kept


def test_conversions_and_orientation_are_recorded(pipeline):
    analysed = pipeline["runs"]["analyse"].result[0]
    by_name = {e.name: e for e in analysed.entries}
    assert "transparent areas composited on white" in by_name["alpha.png"].flags
    assert "palette image converted to RGB" in by_name["palette.png"].flags
    assert "16-bit greyscale converted to 8-bit RGB" in by_name["grey16.png"].flags
    assert "EXIF orientation 6 applied" in by_name["rotated.jpg"].flags
    rotated = by_name["rotated.jpg"]
    assert (rotated.width, rotated.height) == (900, 1200)  # as displayed, not as stored
    assert rotated.faces.count == 1  # the marker stands upright only after the rotation
    # 16-bit greyscale keeps its tones (a naive 8-bit conversion would clip it to white).
    assert 0.3 < by_name["grey16.png"].scores.brightness < 0.8
    assert by_name["Élodie_été_写真.jpg"].caption == "smiling at the beach, ohwx"
    assert "face detector: insightface:test-markers" in pipeline["runs"]["analyse"].result[1]


def test_export_is_kohya_layout_with_captions(pipeline):
    export = pipeline["runs"]["export"]
    final, train_dir, _summary = export.result
    train_dir = Path(train_dir)
    assert train_dir.name == "img" and train_dir.parent.name == "kohya"
    subjects = [p for p in train_dir.iterdir()]
    assert [p.name for p in subjects] == ["10_ohwx woman"]
    images = sorted(p for p in subjects[0].iterdir() if p.suffix != ".txt")
    captions = sorted(p for p in subjects[0].iterdir() if p.suffix == ".txt")
    accepted = final.accepted
    assert len(images) == len(accepted) == 2 * (len(EXPECTED_ACCEPTED) + 2)  # originals + flipped copies
    assert [p.stem for p in images] == [p.stem for p in captions]
    for path in images:
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.width % 64 == 0 and img.height % 64 == 0
            assert img.width * img.height <= 1024 * 1024
    texts = {p.stem: p.read_text(encoding="utf-8") for p in captions}
    assert all(t.endswith("\n") and t.count("\n") == 1 and t.startswith("ohwx") for t in texts.values())
    unicode_id = next(e.id for e in accepted if e.name == "Élodie_été_写真.jpg" and not e.parent)
    assert texts[unicode_id] == "ohwx, smiling at the beach\n"
    assert texts[f"{unicode_id}-flip"] == "ohwx, smiling at the beach\n"
    assert texts[next(e.id for e in accepted if e.name == "grey.png" and not e.parent)] == "ohwx, woman\n"
    # The portrait (EXIF-rotated) photo went to a portrait bucket.
    rotated = next(e for e in accepted if e.name == "rotated.jpg" and not e.parent)
    assert rotated.bucket[1] > rotated.bucket[0]
    # The exported manifest names the exported files (relative to the export folder) and loads back.
    exported = DatasetManifest.load(train_dir.parent / "manifest.json")
    exported_files = {Path(e.file) for e in exported.accepted}
    assert exported_files == set(images)
    toml = (train_dir.parent / "dataset.toml").read_text(encoding="utf-8")
    assert 'caption_extension = ".txt"' in toml and "num_repeats = 10" in toml and "10_ohwx woman" in toml


def test_source_folder_is_untouched(pipeline):
    assert _tree_hashes(pipeline["planted"]) == pipeline["before"]


def test_everything_is_written_under_the_dataset_folder(pipeline):
    final = pipeline["runs"]["export"].result[0]
    output = pipeline["base"] / "output"
    folder = Path(final.folder)
    assert folder == output / "charforge" / "datasets" / "élodie_test"
    saved = DatasetManifest.load(folder / "manifest.json")
    assert saved.history[-1].stage == "export"
    assert {e.id: e.rejected for e in saved.entries} == {e.id: e.rejected for e in final.entries}
    for entry in final.accepted:
        assert Path(entry.file).is_relative_to(folder), entry.file


def test_contact_sheet_and_reports(pipeline):
    report = pipeline["runs"]["report"]
    sheet, html_path, summary = report.result
    assert sheet.ndim == 4 and sheet.shape[-1] == 3 and float(sheet.max()) <= 1.0
    images = report.ui["images"]
    assert images and all(i["type"] == "output" for i in images)
    for item in images:
        assert (pipeline["base"] / "output" / item["subfolder"] / item["filename"]).is_file()
    data = json.loads(Path(html_path).with_name("report.json").read_text(encoding="utf-8"))
    counts = data["counts"]
    assert counts["images"] == 20 + counts["augmented_copies"]
    assert counts["accepted_originals"] == len(EXPECTED_ACCEPTED) + 2
    reasons = data["rejection_reasons"]
    assert reasons["unreadable image"] == 1 and reasons["blurry"] == 1 and reasons["too small"] == 1
    assert reasons["no face"] == 1 and reasons["several people"] == 1 and reasons["different person"] == 1
    assert reasons["exact duplicate"] == 1 and reasons["near duplicate"] == 1
    assert len(data["duplicate_groups"]) == 2 and {g["kept"] for g in data["duplicate_groups"]} >= {"good_02.jpg"}
    assert sum(data["buckets"].values()) == counts["accepted"]
    assert data["trigger"]["word"] == "ohwx" and data["trigger"]["in_captions"] == 2  # unicode photo + its flip
    assert data["captions"]["with_caption"] == 2
    html = Path(html_path).read_text(encoding="utf-8")
    assert "Élodie_été_写真.jpg" in html and "contact_sheet_001.png" in html
    assert "rejected" in summary


def test_reexport_is_idempotent(pipeline):
    dataset = pipeline["runs"]["augment"].result[0]
    train_dir = Path(pipeline["runs"]["export"].result[1])
    before = _tree_hashes(train_dir.parent)
    mtimes = {p: p.stat().st_mtime_ns for p in train_dir.rglob("*") if p.is_file()}
    again = run_node(ExportDataset, dataset=dataset, trigger="ohwx", class_tokens="woman", repeats=10,
                     export_name="kohya", caption_mode="caption, trigger first")
    assert "0 written" in again.result[2] and "0 stale" in again.result[2]
    assert _tree_hashes(train_dir.parent) == before
    assert {p: p.stat().st_mtime_ns for p in train_dir.rglob("*") if p.is_file()} == mtimes
    # A new trigger renames the folder: the old one is removed, nothing stale is left behind.
    renamed = run_node(ExportDataset, dataset=dataset, trigger="sks", class_tokens="woman", repeats=5,
                       export_name="kohya", caption_mode="caption, trigger first")
    assert [p.name for p in train_dir.iterdir()] == ["5_sks woman"]
    assert "stale" in renamed.result[2]
    run_node(ExportDataset, dataset=dataset, trigger="ohwx", class_tokens="woman", repeats=10,
             export_name="kohya", caption_mode="caption, trigger first")
    assert _tree_hashes(train_dir.parent) == before


def test_filters_that_reject_everything_give_an_empty_dataset(pipeline):
    analysed = pipeline["runs"]["analyse"].result[0]
    run = run_node(FilterDataset, dataset=analysed, min_side=8000, min_sharpness=50.0, min_brightness=0.1,
                   max_brightness=0.92, min_contrast=0.03, require_face=True, max_people=1, min_face_size=64,
                   max_identity_distance=0.6)
    empty, accepted, summary = run.result
    assert accepted == 0 and empty.accepted == []
    assert "Nothing passed" in summary and "too small" in summary
    cropped = run_node(CropDataset, dataset=empty, buckets="sd15", mode="centre", headroom=0.1, square=True,
                       upscale=False, format="jpg", workers=1).result[0]
    export = run_node(ExportDataset, dataset=cropped, trigger="ohwx", class_tokens="woman", repeats=1,
                      export_name="empty", caption_mode="caption as is")
    assert export.result[2].startswith("0 image(s) exported")
    report = run_node(DatasetReport, dataset=cropped, trigger="ohwx", thumbnail_size=64, per_sheet=100, workers=1)
    assert report.result[0].shape[0] == 1
    # The manifest the filter was given is unchanged (ComfyUI shares node outputs between consumers).
    assert analysed.accepted and len(analysed.accepted) > 0


def test_cache_shared_inputs_are_not_mutated(pipeline):
    runs = pipeline["runs"]
    assert runs["load"].result[0].history[-1].stage == "load"
    assert all(e.scores.sharpness is None for e in runs["load"].result[0].entries)
    assert all(e.bucket is None for e in runs["dedup"].result[0].entries)


def test_progress_is_reported_per_image_and_cancel_stops(comfy_env, planted):
    run = run_node(LoadDataset, node_id="7", folder=str(planted), name="progress", recursive=False,
                   read_captions=False, workers=1)
    dataset = run.result[0]
    comfy_env.progress.clear()
    run_node(AnalyseDataset, node_id="8", dataset=dataset, face_detector="none", insightface_pack="", workers=2)
    readable = len([e for e in dataset.entries if e.accepted])
    assert [c.value for c in comfy_env.progress] == list(range(1, readable + 1))
    assert {c.node_id for c in comfy_env.progress} == {"8"}
    comfy_env.progress.clear()
    comfy_env.interrupt()
    with pytest.raises(comfy_env.model_management.InterruptProcessingException):
        run_node(AnalyseDataset, node_id="8", dataset=dataset, face_detector="none", insightface_pack="", workers=2)
    assert comfy_env.progress == []


def test_load_images_from_other_nodes(comfy_env):
    import torch

    batch = torch.from_numpy(np.stack([synthetic_photo(40, size=(320, 256)),
                                       synthetic_photo(41, size=(320, 256))]).astype(np.float32) / 255.0)
    run = run_node(LoadDataset, folder="", name="from nodes", recursive=False, read_captions=True, workers=1,
                   images=batch)
    dataset, count, _ = run.result
    assert count == 2
    for entry in dataset.entries:
        assert Path(entry.source).is_relative_to(comfy_env.base_dir / "output" / "charforge" / "datasets")
        with Image.open(entry.source) as img:
            assert img.size == (320, 256)
    # The same images again are the same files.
    again = run_node(LoadDataset, folder="", name="from nodes", recursive=False, read_captions=True, workers=1,
                     images=batch).result[0]
    assert [e.source for e in again.entries] == [e.source for e in dataset.entries]
    assert len(os.listdir(Path(dataset.folder) / "inputs")) == 2


def test_load_without_folder_or_images_says_what_to_do(comfy_env):
    with pytest.raises(ValueError, match="type the folder"):
        run_node(LoadDataset, folder="  ", name="x", recursive=False, read_captions=True, workers=1)
