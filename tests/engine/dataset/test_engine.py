"""The dataset engine without ComfyUI: decoding, hashes, buckets, crops, manifest, faces, workers."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cf_testing.photos import synthetic_photo
from charforge.engine.dataset import (
    DatasetManifest,
    FaceInfo,
    ImageEntry,
    bucket_list,
    closest_bucket,
    dhash,
    hamming,
    identity_distances,
    phash,
    read_rgb,
)
from charforge.engine.dataset import faces as faces_module
from charforge.engine.dataset.buckets import fit_without_upscale
from charforge.engine.dataset.crop import plan_crop
from charforge.engine.dataset.export import caption_for, subject_folder_name
from charforge.engine.dataset.hashing import group_near_duplicates
from charforge.engine.dataset.load import safe_name
from charforge.engine.dataset.parallel import ordered_map

# ------------------------------------------------------------------------------------------- decoding


def test_jpeg_analysis_decodes_at_reduced_scale(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(synthetic_photo(1, size=(2400, 1800), faces=())).save(path, quality=90)
    decoded = read_rgb(path, max_side=640)
    assert decoded.source_size == (2400, 1800)
    assert decoded.rgb.shape == (480, 640, 3) and decoded.rgb.dtype == np.uint8
    # decode_side: decoded at 1/4 (600 px, at least 512) and not resized, as it is under max_side.
    assert read_rgb(path, max_side=640, decode_side=512).rgb.shape == (450, 600, 3)
    # min_scale: the decoder's own reduction (1/2 here) without a resize afterwards.
    half = read_rgb(path, min_scale=0.45).rgb
    assert half.shape == (900, 1200, 3)
    full = read_rgb(path).rgb
    assert full.shape == (1800, 2400, 3)
    small = cv2.resize(full, (640, 480), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - decoded.rgb.astype(int)).mean() < 3  # same picture


def test_modes_become_plain_rgb(tmp_path):
    rgb = synthetic_photo(2, size=(64, 48), faces=())
    rgba = np.dstack([rgb, np.full((48, 64), 255, np.uint8)])
    rgba[:, :8, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    Image.fromarray(rgb).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    grey16 = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    Image.fromarray(rgb).convert("1").save(tmp_path / "bw.png")
    for name in ("alpha.png", "la.png", "cmyk.jpg", "grey16.png", "bw.png"):
        decoded = read_rgb(tmp_path / name)
        assert decoded.rgb.shape == (48, 64, 3) and decoded.rgb.dtype == np.uint8, name
        assert decoded.notes, name
    alpha = read_rgb(tmp_path / "alpha.png")
    assert (alpha.rgb[:, :8] == 255).all()  # transparent -> white
    assert alpha.notes == ["transparent areas composited on white"]
    assert read_rgb(tmp_path / "la.png").notes == ["greyscale image converted to RGB"]
    grey = read_rgb(tmp_path / "grey16.png").rgb[:, :, 0]
    assert grey.min() == 0 and grey.max() == 255 and 120 < grey.mean() < 135  # tones kept, not clipped


def test_exif_rotation_is_applied_at_reduced_scale_too(tmp_path):
    img = Image.fromarray(synthetic_photo(3, size=(1600, 1200), faces=()))
    exif = img.getexif()
    exif[0x0112] = 8
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=90)
    assert read_rgb(tmp_path / "phone.jpg").source_size == (1200, 1600)
    assert read_rgb(tmp_path / "phone.jpg", max_side=400).rgb.shape == (400, 300, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path, orientation):
    from PIL import ImageOps

    base = synthetic_photo(7, size=(80, 60), faces=())
    base[:20, :20] = (255, 0, 0)  # a marker in one corner shows which way the picture turned
    img = Image.fromarray(base)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.jpg", quality=98, exif=exif.tobytes())
    with Image.open(tmp_path / "o.jpg") as opened:
        expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB")).astype(int)
    decoded = read_rgb(tmp_path / "o.jpg")
    assert decoded.rgb.shape == expected.shape
    assert np.abs(decoded.rgb.astype(int) - expected).mean() < 1.0
    assert decoded.source_size == (expected.shape[1], expected.shape[0])


def test_truncated_jpeg_is_an_error_not_a_grey_photo(tmp_path):
    Image.fromarray(synthetic_photo(8, size=(400, 300), faces=())).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(OSError, match="truncated"):
        read_rgb(tmp_path / "cut.jpg")


# ------------------------------------------------------------------------------------------- hashes


def _reencode(rgb, quality=70, scale=1.0):
    if scale != 1.0:
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_perceptual_hashes_match_copies_and_separate_photos():
    photos = [synthetic_photo(seed, size=(480, 360)) for seed in range(8)]
    for photo in photos[:3]:
        copy = _reencode(photo, quality=60, scale=0.6)
        assert hamming(phash(photo), phash(copy)) <= 4
        assert hamming(dhash(photo), dhash(copy)) <= 6
        assert hamming(phash(photo), phash(cv2.GaussianBlur(photo, (0, 0), 3))) <= 6
    distances = [hamming(phash(a), phash(b)) for i, a in enumerate(photos) for b in photos[i + 1 :]]
    assert min(distances) > 12, distances
    assert len(phash(photos[0])) == 16 and int(phash(photos[0]), 16) >= 0


def test_grouping_is_transitive_and_respects_the_threshold():
    hashes = [["0000000000000000"], ["0000000000000007"], ["000000000000003f"], ["ffffffffffffffff"]]
    assert group_near_duplicates(hashes, threshold=3) == [[0, 1, 2]]  # 0~1 (3 bits), 1~2 (3 bits)
    assert group_near_duplicates(hashes, threshold=2) == []
    many = [[f"{i:016x}"] for i in range(3000)]  # larger than one block of rows
    assert len(group_near_duplicates(many, threshold=0)) == 0


# ------------------------------------------------------------------------------------------- buckets and crops


def test_bucket_lists():
    sdxl = bucket_list("sdxl")
    assert (1024, 1024) in sdxl and (832, 1216) in sdxl and (1216, 832) in sdxl and (896, 1152) in sdxl
    assert all(
        w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 and w * h > 0.85 * 1024 * 1024 / 1.2
        for w, h in sdxl
    )
    sd15 = bucket_list("sd15")
    assert (512, 512) in sd15 and all(w * h <= 512 * 512 for w, h in sd15)
    assert closest_bucket(4000, 3000, sdxl) == (1152, 896)
    assert closest_bucket(3000, 4000, sdxl) == (896, 1152)
    assert closest_bucket(1000, 1000, sd15) == (512, 512)
    with pytest.raises(ValueError, match="sdxl"):
        bucket_list("sd3")


def test_no_upscale_keeps_small_photos_small():
    assert fit_without_upscale((1024, 1024), 2000, 2000) == (1024, 1024)
    assert fit_without_upscale((1152, 896), 700, 544) == (640, 512)  # crop 680 x 544, then resize
    assert fit_without_upscale((1024, 1024), 30, 30) == (64, 64)


def test_face_crop_keeps_headroom_and_stays_inside():
    # A tall photo with the face near the top, cropped square: the crop starts headroom above the face.
    box = plan_crop(1000, 2000, (1024, 1024), [450, 300, 550, 420], headroom=0.15)
    assert box == (0, 150, 1000, 1150)
    # Face near the bottom edge: the crop is clamped to the photo.
    assert plan_crop(1000, 2000, (1024, 1024), [450, 1900, 550, 1990], headroom=0.15) == (0, 1000, 1000, 2000)
    # Wide photo: centred horizontally on the face.
    assert plan_crop(3000, 1000, (1024, 1024), [2400, 100, 2600, 300], headroom=0.1) == (2000, 0, 3000, 1000)
    # No face: centre crop.
    assert plan_crop(3000, 1000, (1024, 1024), None, headroom=0.1) == (1000, 0, 2000, 1000)


# ------------------------------------------------------------------------------------------- manifest


def test_manifest_round_trip_keeps_everything(tmp_path):
    folder = tmp_path / "ds"
    entry = ImageEntry(
        id="0001",
        source="/photos/a.jpg",
        file=str(folder / "crops-x" / "0001.png"),
        width=832,
        height=1216,
        sha256="ab" * 32,
        caption="ohwx, smiling",
        faces=FaceInfo(1, 1, [1, 2, 3, 4], 0.9, 2.0),
    )
    entry.reject("blurry: sharpness 3 < 50")
    entry.flag("EXIF orientation 6 applied")
    manifest = DatasetManifest(
        name="ds", folder=str(folder), entries=[entry], detector="mtcnn", duplicate_groups=[["0001", "0002"]]
    )
    manifest.record("analyse", {"face_detector": "mtcnn"}, "1 image(s) measured")
    path = manifest.save()
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    assert data["entries"][0]["file"] == "crops-x/0001.png"  # relative inside the dataset folder
    assert data["entries"][0]["source"] == "/photos/a.jpg"
    loaded = DatasetManifest.load(folder)
    assert loaded.to_dict() == manifest.to_dict()
    assert loaded.entries[0].file == str(folder.resolve() / "crops-x" / "0001.png")
    assert not loaded.entries[0].accepted and loaded.rejected == loaded.entries
    # Unknown fields from a newer version are ignored.
    data["entries"][0]["future_field"] = 1
    assert DatasetManifest.from_dict(data, folder).entries[0].id == "0001"


def test_copy_is_deep():
    manifest = DatasetManifest(name="x", folder="/tmp/x", entries=[ImageEntry(id="1", source="a", file="a")])
    other = manifest.copy()
    other.entries[0].reject("no")
    assert manifest.entries[0].accepted


def test_names_and_captions():
    assert safe_name(" my hero/v2 ") == "my_hero_v2"
    with pytest.raises(ValueError, match="usable"):
        safe_name("///")
    assert subject_folder_name(10, "ohwx", "woman") == "10_ohwx woman"
    with pytest.raises(ValueError, match="trigger"):
        subject_folder_name(10, " ", "")
    entry = ImageEntry(id="1", source="a", file="a", caption="a photo of a woman, ohwx, smiling\nline two")
    assert (
        caption_for(entry, "ohwx", "woman", "caption, trigger first")
        == "ohwx, a photo of a woman, smiling line two"
    )
    assert caption_for(entry, "ohwx", "woman", "trigger and class only") == "ohwx, woman"
    entry.caption = None
    assert caption_for(entry, "ohwx", "woman", "caption as is") == "ohwx, woman"


def test_identity_distance_flags_the_outlier():
    rng = np.random.default_rng(0)
    person = rng.normal(size=512)
    embeddings = {f"{i}": person + rng.normal(scale=0.3, size=512) for i in range(8)}
    embeddings["stranger"] = rng.normal(size=512)
    distances = identity_distances(embeddings)
    assert max(d for k, d in distances.items() if k != "stranger") < 0.2
    assert distances["stranger"] > 0.8
    assert identity_distances({"only": person}) == {}


# ------------------------------------------------------------------------------------------- faces


def test_detector_choice_without_any_detector_says_what_to_install(monkeypatch):
    monkeypatch.setattr(faces_module.mtcnn, "available", lambda: False)
    monkeypatch.setattr(faces_module, "haar_cascade_path", lambda: None)
    monkeypatch.setattr(faces_module, "insightface_packs", lambda: [])
    choice = faces_module.choose_detector("auto")
    assert choice.detector is None and choice.name == "none"
    assert "pip install mtcnn" in choice.note and "no InsightFace pack" in choice.note
    assert faces_module.choose_detector("none").note == "face detection switched off"
    with pytest.raises(ValueError, match="auto, insightface, fallback, none"):
        faces_module.choose_detector("yolo")


def test_detector_choice_prefers_insightface_then_falls_back(monkeypatch):
    class Analyzer:
        name = "insightface:buffalo_l"

        def detect(self, rgb):
            return []

    loaded = []

    def fake_load(pack, det_size):
        loaded.append(pack)
        if pack == "broken":
            raise OSError("bad onnx")
        return faces_module.InsightFaces(Analyzer())

    monkeypatch.setattr(faces_module, "_load_insightface", fake_load)
    monkeypatch.setattr(faces_module, "insightface_packs", lambda: ["antelopev2"])
    choice = faces_module.choose_detector("auto", pack="buffalo_l")
    assert choice.name == "insightface:buffalo_l" and loaded == ["antelopev2"]  # the installed pack
    monkeypatch.setattr(faces_module, "insightface_packs", lambda: ["broken"])
    monkeypatch.setattr(faces_module, "_load_fallback", lambda min_face: (None, "no fallback"))
    choice = faces_module.choose_detector("auto", pack="broken")
    assert choice.detector is None and "InsightFace pack broken did not load: bad onnx" in choice.note


def test_insightface_choice_without_models_raises_a_clear_error(no_comfy):
    from charforge.engine.faces import FaceModelsNotFoundError

    with pytest.raises(FaceModelsNotFoundError):
        faces_module.choose_detector("insightface", pack="buffalo_l")


def test_haar_cascade_is_used_when_this_opencv_ships_it():
    path = faces_module.haar_cascade_path()
    if not hasattr(cv2, "CascadeClassifier"):
        assert path is None  # OpenCV 5 wheels ship neither the class nor the cascades
        pytest.skip(f"OpenCV {cv2.__version__} has no Haar cascades")
    detector = faces_module.HaarFaces(path)
    assert detector.detect(synthetic_photo(5, size=(320, 240), faces=())) == []


def drawn_face(size: int = 400) -> np.ndarray:
    """A drawn face (skin, hair, eyes with pupils, brows, nose, mouth) that MTCNN finds at > 0.95."""
    img = np.full((size, size, 3), (70, 90, 110), np.uint8)
    c = size // 2
    cv2.ellipse(img, (c, c + 10), (95, 125), 0, 0, 360, (224, 172, 140), -1)
    cv2.ellipse(img, (c, c - 95), (100, 60), 0, 180, 360, (60, 40, 30), -1)
    for dx in (-40, 40):
        cv2.ellipse(img, (c + dx, c - 10), (20, 10), 0, 0, 360, (250, 250, 250), -1)
        cv2.circle(img, (c + dx, c - 10), 8, (60, 40, 30), -1)
        cv2.circle(img, (c + dx, c - 10), 4, (10, 10, 10), -1)
        cv2.line(img, (c + dx - 22, c - 35), (c + dx + 22, c - 38), (70, 50, 40), 5)
    cv2.polylines(
        img, [np.array([[c, c - 5], [c - 14, c + 40], [c + 14, c + 40]])], False, (180, 120, 100), 3
    )
    cv2.ellipse(img, (c, c + 70), (35, 12), 0, 0, 180, (160, 60, 60), -1)
    return cv2.GaussianBlur(img, (0, 0), 2)


def test_mtcnn_fallback_finds_a_drawn_face_and_nothing_in_a_landscape(tmp_path):
    if not faces_module.mtcnn.available():
        pytest.skip("the mtcnn package (weights of the fallback detector) is not installed")
    choice = faces_module.choose_detector("fallback")
    assert choice.name == "mtcnn"
    found = choice.detector.detect(drawn_face())
    assert len(found) == 1 and found[0].score > 0.9 and found[0].embedding is None
    x1, y1, x2, y2 = found[0].box
    assert 90 < x1 < 130 and 260 < x2 < 300 and 80 < y1 < 120 and 300 < y2 < 340
    eyes = found[0].landmarks[:2]
    assert np.allclose(eyes[:, 1], 190, atol=15) and abs(eyes[0, 0] - 160) < 15 and abs(eyes[1, 0] - 240) < 15
    assert choice.detector.detect(synthetic_photo(6, size=(640, 480), faces=())) == []
    assert choice.detector.detect(np.full((200, 300, 3), 128, np.uint8)) == []
    # Through Analyse: the face box comes back in the photo's own pixels (here twice the analysis size).
    from charforge.engine.dataset import analyse, load_folder

    photo = cv2.resize(drawn_face(), (1000, 1000), interpolation=cv2.INTER_CUBIC)
    Image.fromarray(photo).save(tmp_path / "face.jpg", quality=92)
    Image.fromarray(synthetic_photo(9, size=(1000, 750), faces=())).save(tmp_path / "scene.jpg", quality=92)
    manifest = analyse(load_folder(tmp_path, tmp_path / "ds"), choice.detector, choice.name, workers=2)
    face, scene = manifest.entries
    assert manifest.detector == "mtcnn" and face.faces.count == 1 and scene.faces.count == 0
    assert 230 < face.faces.box[0] < 330 and 630 < face.faces.box[2] < 750


# ------------------------------------------------------------------------------------------- workers


def test_ordered_map_keeps_order_and_bounds_work_in_flight():
    started = []
    lock = threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        return i * i

    seen = []
    results = list(ordered_map(work, range(50), workers=3, on_result=lambda i, r: seen.append((i, r))))
    assert results == [i * i for i in range(50)]
    assert seen == [(i, i * i) for i in range(50)]

    consumed = []

    def stop_at_five(index, _result):
        consumed.append(index)
        if index == 5:
            raise KeyboardInterrupt  # what a cancel looks like to the loop

    started.clear()
    with pytest.raises(KeyboardInterrupt):
        list(ordered_map(work, range(1000), workers=2, on_result=stop_at_five))
    assert consumed == list(range(6))
    assert len(started) <= 6 + 2 * 2  # nothing beyond the in-flight window was started


# ------------------------------------------------------------------------------------------- loading


def test_load_reads_every_format_and_never_loads_its_own_output(tmp_path):
    from charforge.engine.dataset import analyse, load_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    rgb = synthetic_photo(11, size=(160, 120), faces=())
    for name in ("a.webp", "b.bmp", "c.tiff", "d.gif", "e.PNG", "f.JPEG"):
        Image.fromarray(rgb).save(photos / name)
    (photos / "empty.jpg").write_bytes(b"")
    inside = photos / "charforge-out"  # a dataset folder inside the photo folder
    Image.fromarray(rgb).save(photos / "g.png")
    manifest = load_folder(photos, inside, recursive=True)
    (inside / "crops").mkdir(parents=True)
    Image.fromarray(rgb).save(inside / "crops" / "0001.png")
    again = load_folder(photos, inside, recursive=True)
    assert [e.name for e in again.entries] == [e.name for e in manifest.entries]
    assert "0001.png" not in {e.name for e in again.entries}
    by_name = {e.name: e for e in manifest.entries}
    assert by_name["empty.jpg"].rejected[0].startswith("unreadable image")
    analysed = analyse(manifest, None, workers=2)
    for entry in analysed.entries:
        if entry.name != "empty.jpg":
            assert entry.accepted and (entry.width, entry.height) == (160, 120), entry
            assert entry.scores.sharpness > 0 and len(entry.hashes["phash"]) == 16


def test_export_without_crop_copies_plain_photos_and_normalises_the_rest(tmp_path):
    from charforge.engine.dataset import export_kohya, load_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    rgb = synthetic_photo(12, size=(160, 120), faces=())
    Image.fromarray(rgb).save(photos / "plain.jpg", quality=90)
    Image.fromarray(np.dstack([rgb, np.full((120, 160), 128, np.uint8)])).save(photos / "alpha.png")
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(photos / "turned.jpg", exif=exif.tobytes(), quality=90)
    result = export_kohya(load_folder(photos, tmp_path / "ds"), trigger="ohwx", class_tokens="", repeats=3)
    subject = Path(result.subject_dir)
    assert subject.name == "3_ohwx"
    files = {p.name for p in subject.iterdir()}
    assert files == {"0001.png", "0001.txt", "0002.jpg", "0002.txt", "0003.png", "0003.txt"}
    assert (subject / "0002.jpg").read_bytes() == (photos / "plain.jpg").read_bytes()  # copied as it is
    with Image.open(subject / "0001.png") as alpha, Image.open(subject / "0003.png") as turned:
        assert alpha.mode == "RGB" and turned.size == (120, 160)  # alpha flattened, EXIF rotation applied
    assert (subject / "0002.txt").read_text(encoding="utf-8") == "ohwx\n"
    again = export_kohya(result.manifest, trigger="ohwx", class_tokens="", repeats=3)
    assert (again.written, again.unchanged, again.removed) == (0, 3, 0)
