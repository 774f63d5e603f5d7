"""Find the images of a folder and read them safely.

Source photos are read-only to CharForge: nothing here writes next to them. A file that cannot be read
is reported with the reason instead of stopping the scan.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str


@dataclass
class ScanResult:
    """Images found under `folder`, in a stable (sorted) order, and the files that were rejected."""

    folder: str
    images: list[str] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.images)


def _natural_key(path: str) -> list:
    # "img2" before "img10", as a file browser shows them.
    parts = []
    for chunk in _split_digits(path.lower()):
        parts.append((0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk))
    return parts


def _split_digits(text: str) -> list[str]:
    out, current = [], ""
    for ch in text:
        if current and ch.isdigit() != current[-1].isdigit():
            out.append(current)
            current = ""
        current += ch
    if current:
        out.append(current)
    return out


def scan_folder(
    folder: str | os.PathLike,
    recursive: bool = False,
    verify: bool = False,
    on_file: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """List the image files in `folder` (optionally its subfolders), naturally sorted.

    With `verify`, every file is opened and decoded; files that fail are moved to ``rejected`` with the
    reason. Hidden files and folders (starting with ".") are skipped. Raises `NotADirectoryError` with the
    path when `folder` is not a folder.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise NotADirectoryError(f"image folder not found: {str(root)!r} (give an existing folder)")
    pattern = root.rglob("*") if recursive else root.glob("*")
    candidates = []
    for found in pattern:
        rel = found.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if found.is_file() and found.suffix.lower() in IMAGE_EXTENSIONS:
            candidates.append(str(found))
    candidates.sort(key=_natural_key)
    result = ScanResult(folder=str(root))
    for index, path in enumerate(candidates):
        if verify:
            try:
                load_image(path)
            except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
                result.rejected.append(Rejected(path, rejection_reason(exc)))
            else:
                result.images.append(path)
        else:
            result.images.append(path)
        if on_file is not None:
            on_file(index + 1, len(candidates))
    return result


def rejection_reason(exc: BaseException) -> str:
    """Why a file was rejected: "too large: W x H (...)" for an image above the pixel limit, else
    "unreadable image: <the decoder's error>"."""
    from ..images import ImageTooLarge

    if isinstance(exc, ImageTooLarge):
        return exc.reason
    text = str(exc) or type(exc).__name__
    return f"unreadable image: {text if len(text) <= 160 else text[:157] + '...'}"


def load_image(path: str | os.PathLike):
    """Open an image as a PIL RGB image with its EXIF orientation applied (phone photos are often stored
    sideways); alpha is composited on white and 16-bit images are scaled to 8 bits (see images.read_rgb)."""
    from PIL import Image

    from .images import read_rgb

    return Image.fromarray(read_rgb(path).rgb)


def verify_image(path: str | os.PathLike) -> None:
    """Raise if `path` is not a readable image (or above the pixel limit); cheaper than decoding (checks
    headers and structure)."""
    from ..images import open_image

    with open_image(path) as img:
        img.verify()


def letterbox(img, size: int, fill: tuple[int, int, int] = (0, 0, 0)):
    """Fit `img` inside a `size` x `size` square without distortion, padding with `fill`."""
    from PIL import Image

    scale = size / max(img.width, img.height)
    resized = img.resize(
        (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS
    )
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return canvas
