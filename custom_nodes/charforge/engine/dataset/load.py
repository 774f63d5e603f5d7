"""Load: a folder of photos (or images from other nodes) becomes a dataset manifest.

Loading reads headers and bytes only (size, EXIF orientation, SHA-256, caption sidecar); pixels are
decoded by the stages that need them. A file that cannot be opened becomes an entry rejected with the
reason, so the report still lists it. Images handed over as arrays are written into the dataset folder
first, because every later stage reads from files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from .images import file_sha256, image_size, write_rgb
from .manifest import DatasetManifest, ImageEntry
from .parallel import ordered_map
from .scan import rejection_reason, scan_folder

ProgressFn = Callable[[int, int], None]
UNREADABLE = "unreadable image"
TOO_LARGE = "too large"  # above the pixel limit (engine.images); never decoded
UNUSABLE = (UNREADABLE, TOO_LARGE)  # reasons that mean "no stage can read this file"


def safe_name(name: str) -> str:
    """A dataset name usable as one folder name on every OS ("my hero" -> "my_hero")."""
    cleaned = re.sub(r"[^\w.-]+", "_", name.strip(), flags=re.UNICODE).strip("._")
    if not cleaned:
        raise ValueError(f"dataset name {name!r} has no usable characters: use letters, digits, - or _")
    return cleaned[:80]


def dataset_folder(root: str | os.PathLike, name: str) -> Path:
    """``<root>/<name>``: where a dataset keeps its manifest and every file its stages write."""
    return Path(root) / safe_name(name)


def read_caption(image_path: str | os.PathLike) -> str | None:
    """The caption in the ``.txt`` sidecar next to an image (kohya convention), if any.

    Reading a sidecar has one home, `caption.sidecars.read_sidecar`; this only says where the sidecar of a
    source photo is.
    """
    from ..caption import sidecars

    return sidecars.read_sidecar(Path(image_path).with_suffix(sidecars.EXTENSION))


def _inspect(path: str, read_captions: bool) -> ImageEntry:
    entry = ImageEntry(id="", source=path, file=path)
    try:
        entry.width, entry.height = image_size(path)
        entry.sha256 = file_sha256(path)
    except Exception as exc:  # noqa: BLE001 - any decoder or I/O failure: record it, keep going
        entry.reject(rejection_reason(exc))
    if read_captions:
        entry.caption = read_caption(path)
    return entry


def short_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def load_folder(
    folder: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    name: str | None = None,
    recursive: bool = False,
    read_captions: bool = True,
    workers: int = 0,
    on_image: ProgressFn | None = None,
) -> DatasetManifest:
    """A manifest of every image in `folder` (naturally sorted), stored in `dataset_dir`.

    The source folder is only read. Files inside `dataset_dir` are skipped, so a dataset folder placed
    inside the photo folder is not loaded into itself.
    """
    dataset_dir = Path(dataset_dir).resolve()
    scanned = scan_folder(folder, recursive=recursive)
    paths = [p for p in scanned.images if not inside(p, dataset_dir)]
    manifest = DatasetManifest(name=name or dataset_dir.name, folder=str(dataset_dir))
    add_files(manifest, paths, read_captions=read_captions, workers=workers, on_image=on_image)
    return manifest


def add_files(
    manifest: DatasetManifest,
    paths: Iterable[str],
    read_captions: bool = True,
    workers: int = 0,
    on_image: ProgressFn | None = None,
) -> DatasetManifest:
    """Append an entry per file to `manifest` (in place: used while building a new manifest)."""
    paths = [str(Path(p).resolve()) for p in paths]
    total = len(paths)
    start = len(manifest.entries)

    def report(index: int, _entry: ImageEntry) -> None:
        if on_image is not None:
            on_image(index + 1, total)

    for offset, entry in enumerate(ordered_map(lambda p: _inspect(p, read_captions), paths, workers, report)):
        entry.id = f"{start + offset + 1:04d}"
        manifest.entries.append(entry)
    return manifest


def add_arrays(
    manifest: DatasetManifest, arrays: Iterable, on_image: ProgressFn | None = None, total: int | None = None
) -> DatasetManifest:
    """Write RGB uint8 arrays into ``<dataset>/inputs/`` as PNG and append an entry for each (in place).

    File names come from the pixels' hash, so the same images loaded twice are written once.
    """
    import hashlib

    inputs = Path(manifest.folder) / "inputs"
    written = []
    for index, rgb in enumerate(arrays):
        digest = hashlib.sha256(rgb.tobytes() + repr(rgb.shape).encode()).hexdigest()[:16]
        path = inputs / f"image-{digest}.png"
        if not path.exists():
            write_rgb(path, rgb)
        written.append(str(path))
        if on_image is not None:
            on_image(index + 1, total or index + 1)
    return add_files(manifest, written, read_captions=False, workers=1)


def inside(path: str, folder: Path) -> bool:
    """Whether `path` (resolved) lies in `folder` (already resolved)."""
    try:
        Path(path).resolve().relative_to(folder)
    except ValueError:
        return False
    return True
