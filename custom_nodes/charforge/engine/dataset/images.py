"""Read photos as 8-bit RGB arrays (EXIF orientation, alpha, palette, 16-bit handled) and write results.

Reading is the expensive part of every dataset stage, so `read_rgb` decodes as little as it may: when
the caller only needs a smaller image, JPEGs are decoded at a reduced scale by the decoder itself
(``Image.draft``), which is several times faster than decoding fully and resizing.

Every file is opened through `engine.images.open_image`, so an image above the pixel limit
(``CHARFORGE_MAX_IMAGE_PIXELS``, 50 MP by default) is refused as "too large: W x H" before it is
decoded, and decoding holds a share of one budget shared by all worker threads (`decode_slot`), so memory
is bounded whatever the folder holds.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ...common.transfer import sha256_file
from ...deps import require
from ..images import decode_slot, open_image

if TYPE_CHECKING:
    import numpy as np

EXIF_ORIENTATION = 0x0112


@dataclass
class Decoded:
    """Pixels of one photo and what was done to make them plain RGB."""

    rgb: np.ndarray  # uint8, H x W x 3
    source_size: tuple[int, int]  # (width, height) of the full image, orientation applied
    notes: list[str] = field(default_factory=list)


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    # Orientations 5..8 are stored with width and height swapped.
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as the photo is displayed (EXIF orientation applied), from the header only."""
    with open_image(path) as img:
        return _oriented(img.size, _orientation(img))


def _orientation(img) -> int:
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
        return 1


def read_rgb(
    path: str | os.PathLike,
    max_side: int | None = None,
    min_scale: float | None = None,
    decode_side: int | None = None,
) -> Decoded:
    """Decode `path` as an 8-bit RGB array with its EXIF orientation applied.

    With `max_side`, the result's long side is at most `max_side` (smaller images are left as they are),
    and a JPEG is decoded at the largest reduced scale (1/2, 1/4, 1/8, done by the decoder itself) whose
    long side is still at least `decode_side` (default `max_side`). With `min_scale` instead, a JPEG may
    be decoded smaller as long as each side keeps at least that share of its full size (the result is
    not resized further: compare its shape with `source_size`). Alpha is composited on white, palette
    and greyscale images become RGB, 16-bit images are scaled to 8 bits. Raises whatever the decoder
    raises for a broken file.
    """
    from PIL import ImageOps

    np = require("numpy")
    notes: list[str] = []
    with open_image(path) as img, decode_slot(img.size[0] * img.size[1]):
        orientation = _orientation(img)
        full = _oriented(img.size, orientation)
        scale = min_scale
        if max_side and max(img.size) > max_side:
            scale = (decode_side or max_side) / max(img.size)
        if orientation != 1:
            notes.append(f"EXIF orientation {orientation} applied")
        rgb = None
        if img.format == "JPEG" and img.mode in JPEG_MODES:
            rgb = _decode_jpeg_with_opencv(path, img.size, scale)
            if rgb is not None and img.mode != "RGB":
                notes.append(f"{JPEG_MODES[img.mode]} image converted to RGB")
        if rgb is None:
            if scale is not None and scale < 1.0 and img.format == "JPEG":
                # The decoder picks the smallest of 1/2, 1/4, 1/8 that still covers the requested size.
                img.draft(
                    "RGB", (max(1, math.ceil(img.size[0] * scale)), max(1, math.ceil(img.size[1] * scale)))
                )
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            rgb = _to_rgb_array(img, notes, np)
    if max_side and max(rgb.shape[:2]) > max_side:
        rgb = resize_long_side(rgb, max_side)
    return Decoded(rgb=rgb, source_size=full, notes=notes)


JPEG_MODES = {"RGB": "RGB", "L": "greyscale", "CMYK": "CMYK"}
JPEG_END = b"\xff\xd9"


def _decode_jpeg_with_opencv(path, stored_size: tuple[int, int], scale: float | None):
    """A complete JPEG decoded by OpenCV (faster than Pillow, EXIF orientation applied), or None.

    None means "use Pillow": OpenCV could not decode it, or the file is truncated (OpenCV would fill the
    missing part with grey where Pillow raises, and a broken photo must be reported, not trained on).
    """
    np = require("numpy")
    cv2 = require("cv2")
    data = np.fromfile(path, dtype=np.uint8)  # np.fromfile: unicode paths work on every OS
    tail = bytes(data[-64:]).rstrip(b"\x00\r\n ")
    if not tail.endswith(JPEG_END):
        return None
    reduction = 1
    if scale is not None and scale < 1.0:
        need = max(math.ceil(stored_size[0] * scale), math.ceil(stored_size[1] * scale))
        for factor in (8, 4, 2):
            if max(stored_size) // factor >= need:
                reduction = factor
                break
    flag = {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    }[reduction]
    bgr = cv2.imdecode(data, flag)
    if bgr is None or bgr.ndim != 3:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _to_rgb_array(img, notes: list[str], np):
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        notes.append(f"{'16-bit' if top > 255 else mode} greyscale converted to 8-bit RGB")
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        if alpha.min(initial=255) < 255:
            notes.append("transparent areas composited on white")
        if mode[0] in "LP":
            notes.append(f"{'greyscale' if mode[0] == 'L' else 'palette'} image converted to RGB")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode != "RGB":
        labels = {
            "P": "palette",
            "L": "greyscale",
            "1": "black-and-white",
            "CMYK": "CMYK",
            "YCbCr": "YCbCr",
            "LAB": "Lab",
            "HSV": "HSV",
        }
        notes.append(f"{labels.get(mode, mode)} image converted to RGB")
        return np.asarray(img.convert("RGB"))
    return np.asarray(img)


def resize(image, size: tuple[int, int]):
    """Resize an array to (width, height), choosing the interpolation by how much it shrinks.

    Below 2x, bilinear is 5-8 times faster than area averaging and within 40-53 dB PSNR of it on
    1-4 MP photos (no visible difference); from 2x on, bilinear starts to alias, so area is used.
    Enlarging uses Lanczos.
    """
    cv2 = require("cv2")
    ratio = max(image.shape[1] / size[0], image.shape[0] / size[1])
    if ratio >= 2.0:
        interpolation = cv2.INTER_AREA
    elif ratio >= 1.0:
        interpolation = cv2.INTER_LINEAR
    else:
        interpolation = cv2.INTER_LANCZOS4
    return cv2.resize(image, size, interpolation=interpolation)


def resize_long_side(rgb, max_side: int):
    """Shrink an array so its long side is `max_side` (never enlarges)."""
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return rgb
    return resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    return sha256_file(path, chunk)


def encode_rgb(rgb, suffix: str, quality: int = 95) -> bytes:
    """An RGB array encoded as PNG or JPEG (by `suffix`).

    PNG is written with light compression: training data is written once and read a few times, and
    the heaviest compression levels cost several times the encode time for a few percent of size.
    """
    cv2 = require("cv2")
    suffix = suffix.lower()
    if suffix == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    elif suffix in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    else:
        raise ValueError(f"cannot write {suffix!r} images: use .png or .jpg")
    ok, data = cv2.imencode(suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise OSError(f"could not encode a {rgb.shape} image as {suffix}")
    return data.tobytes()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, only_if_changed: bool = False) -> bool:
    """Write `data` through a temporary file; with `only_if_changed`, leave an identical file alone.

    Returns True when the file was written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if only_if_changed and path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def write_rgb(path: str | os.PathLike, rgb, quality: int = 95) -> str:
    """Write an RGB array as PNG or JPEG (by extension) atomically; return the path."""
    write_bytes_atomic(path, encode_rgb(rgb, Path(path).suffix, quality))
    return str(path)
