"""Caption sidecars: one-line UTF-8 ``.txt`` files for the dataset's working files.

The sidecar of an entry sits next to its *working* file (``entry.file``) when that file is inside the
dataset folder (Crop, Augment and images from other nodes write there). While the working file is still
the user's source photo (no Crop yet), the sidecar goes to ``<dataset>/captions/<id>.txt`` instead: the
source folder is never written to. Writes are atomic (a temporary file, then a rename).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..dataset.manifest import DatasetManifest, ImageEntry

CAPTIONS_FOLDER = "captions"
EXTENSION = ".txt"


def _inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True


def sidecar_path(manifest: DatasetManifest, entry: ImageEntry) -> Path:
    """Where `entry`'s caption sidecar lives (never next to a file outside the dataset folder)."""
    if _inside(entry.file, manifest.folder):
        return Path(entry.file).with_suffix(EXTENSION)
    return Path(manifest.folder) / CAPTIONS_FOLDER / f"{entry.id}{EXTENSION}"


def read_sidecar(path: str | os.PathLike) -> str | None:
    """The first non-empty line of a sidecar (BOM tolerated), or None when missing, empty or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def write_sidecar(path: str | os.PathLike, caption: str) -> Path:
    """Write `caption` as one UTF-8 line (newline-terminated) atomically; refuses an empty caption."""
    text = " ".join(caption.split())
    if not text:
        raise ValueError(
            f"refusing to write an empty caption to {path} (trainers reject empty caption files)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes((text + "\n").encode("utf-8"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def existing_caption(manifest: DatasetManifest, entry: ImageEntry) -> str | None:
    """The caption an entry already has: the manifest's, else its sidecar's."""
    if entry.caption and entry.caption.strip():
        return entry.caption.strip()
    return read_sidecar(sidecar_path(manifest, entry))
