"""Synthetic photos for dataset tests, and the folder of planted problems (tests/engine/dataset/test_planted.py
describes it; the real-ComfyUI suite runs the same folder).

Synthetic "photos" are smooth colour fields, shapes and fine grain, so sharpness and perceptual hashes behave
as on real photos, carrying face markers: upright black ellipses (a white band across one marks a different
person) or the red cells of the InsightFace-format test pack (cf_testing/face_models.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def synthetic_photo(
    seed: int, size=(1200, 900), faces=((0.5, 0.4, 0),), marker: str = "ellipse"
) -> np.ndarray:
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
            cv2.rectangle(
                image,
                (centre[0] - axes[0] // 2, centre[1] - 4),
                (centre[0] + axes[0] // 2, centre[1] + 4),
                (255, 255, 255),
                -1,
            )
    return image


def _draw_cell_face(image: np.ndarray, centre: tuple[int, int], person: int) -> None:
    from cf_testing.face_models import face_image

    x, y = (centre[0] // 32) * 32, (centre[1] // 32) * 32
    texture = np.kron(face_image(size=(160, 160), faces=(), person=person), np.ones((2, 2, 1), np.uint8))
    top, left = max(y - 160, 0), max(x - 160, 0)
    patch = texture[top - (y - 160) :, left - (x - 160) :][: image.shape[0] - top, : image.shape[1] - left]
    image[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    image[y : y + 32, x : x + 32] = (255, 0, 0)


def save_image(path: Path, rgb: np.ndarray, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **options)
    return path


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
        save_image(folder / name, rgb, quality=95)
    (folder / "good_01 copy.jpg").write_bytes((folder / "good_01.jpg").read_bytes())  # exact duplicate
    if marker == "cell":
        near = np.clip(good["good_02.jpg"].astype(int) + 4, 0, 255).astype(np.uint8)
        save_image(folder / "good_02_resized.jpg", near, quality=75)  # near duplicate: brighter, re-encoded
    else:
        near = cv2.resize(good["good_02.jpg"], (1000, 750), interpolation=cv2.INTER_AREA)
        save_image(folder / "good_02_resized.jpg", near, quality=80)  # near duplicate
    save_image(folder / "good_03_blurred.jpg", cv2.GaussianBlur(good["good_03.jpg"], (0, 0), 5), quality=95)
    save_image(folder / "tiny.png", photo(20, dims=(200, 150)))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    save_image(folder / "landscape.jpg", photo(21, faces=()), quality=95)  # no face
    save_image(folder / "group.jpg", photo(22, faces=((0.3, 0.4, 0), (0.7, 0.45, 0))), quality=95)
    save_image(folder / "someone_else.jpg", photo(23, faces=((0.5, 0.4, 1),)), quality=95)
    # Unicode names, including the caption sidecar the loader should pick up.
    save_image(folder / "Élodie_été_写真.jpg", photo(24), quality=95)
    (folder / "Élodie_été_写真.txt").write_text(
        "smiling at the beach, ohwx\nsecond line ignored\n", encoding="utf-8"
    )
    # Non-RGB PNGs: alpha (transparent border), palette, greyscale, 16-bit greyscale.
    rgba = np.dstack([photo(25), np.full((size[1], size[0]), 255, np.uint8)])
    rgba[:60, :, 3] = 0
    save_image(folder / "alpha.png", rgba)
    Image.fromarray(photo(26)).convert("P", palette=Image.ADAPTIVE, colors=255).save(folder / "palette.png")
    Image.fromarray(cv2.cvtColor(photo(27), cv2.COLOR_RGB2GRAY)).save(folder / "grey.png")
    grey16 = cv2.cvtColor(photo(29), cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
    Image.fromarray(grey16).save(folder / "grey16.png")
    # Stored sideways with EXIF orientation 6: displayed upright only when the rotation is applied.
    upright = photo(28, dims=(size[1], size[0]))
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # landscape as stored
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    save_image(folder / "rotated.jpg", stored, quality=95, exif=exif.tobytes())
    return folder


#: Filter Dataset's settings for the planted folder (make_planted_folder): each planted problem fails one of them
PLANTED_FILTER = {
    "min_side": 512,
    "min_sharpness": 50.0,
    "min_brightness": 0.1,
    "max_brightness": 0.92,
    "min_contrast": 0.03,
    "require_face": True,
    "max_people": 1,
    "min_face_size": 64,
    "max_identity_distance": 0.6,
}


def tree_hashes(folder: Path) -> dict[str, str]:
    """The SHA-256 of every file below `folder`, by relative path (to show a stage left its source untouched)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_training_folder(
    folder: Path, rng: np.random.Generator, size=(64, 80), caption: str = "sks person, smiling"
) -> Path:
    """A kohya-style training folder (``.../img/3_sks person``): two noise photos, a.png and b.png (`size` is
    height, width), each with its caption file."""
    folder.mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    return folder
