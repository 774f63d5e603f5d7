"""Photo folders uploaded in chunks into ``<input>/charforge/<dataset>/``: content-addressed and resumable.

A file is announced by its relative name, size and sha256. Its bytes are appended to a partial file named
after the sha256 (``<input>/charforge/.uploads/<sha256>.part``), so a chunk must start exactly where the
partial file ends (anything else is refused with the current length, which is how a client that lost a
reply learns where to go on). When the last byte arrives the checksum is verified, the content type checked
and the file moved into place; a file already present with the same checksum is never sent again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ...common.transfer import (
    CAPTION_TYPES,
    IMAGE_TYPES,
    MAX_UPLOAD_FILE,
    UPLOAD_TYPES,
    dataset_name_ok,
    is_sha256,
    relative_parts,
    sha256_file,
)
from .hashes import HashCache

_MAGIC = {  # the first bytes each image type starts with
    ".png": (b"\x89PNG\r\n\x1a\n",),
    ".jpg": (b"\xff\xd8\xff",),
    ".jpeg": (b"\xff\xd8\xff",),
    ".webp": (b"RIFF",),
    ".bmp": (b"BM",),
}


class UploadRefused(Exception):
    """A request the store will not take; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.extra = extra


@dataclass(frozen=True)
class Announced:
    """One file of an upload, as the client announced it."""

    dataset: str
    name: str
    size: int
    sha256: str


def content_ok(path: Path, suffix: str) -> bool:
    """Whether the bytes match the type the name claims: image signatures, UTF-8 captions."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if suffix in IMAGE_TYPES:
        return any(head.startswith(m) for m in _MAGIC[suffix]) and (
            suffix != ".webp" or head[8:12] == b"WEBP"
        )
    if suffix == ".safetensors":  # an 8-byte header length, then the JSON header
        size = int.from_bytes(head[:8], "little")
        return head[8:9] == b"{" and 0 < size < path.stat().st_size
    if suffix in CAPTION_TYPES:
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True
    return False


class UploadStore:
    """The upload area under `root` (``<ComfyUI input>/charforge``)."""

    def __init__(self, root: str | os.PathLike, max_file: int = MAX_UPLOAD_FILE):
        self.root = Path(root)
        self.partials = self.root / ".uploads"
        self.max_file = max_file
        self.hashes = HashCache(self.partials / "hashes.json")

    # ---- names -------------------------------------------------------------------------------------------

    def dataset_dir(self, dataset: str) -> Path:
        if not dataset_name_ok(dataset):
            raise UploadRefused(400, f"dataset name {dataset!r} is not allowed (letters, digits, '._-')")
        return self.root / dataset

    def target(self, dataset: str, name: str) -> Path:
        """Where `name` of `dataset` goes; refuses names outside the dataset folder and unsupported types."""
        folder = self.dataset_dir(dataset)
        parts = relative_parts(name)
        if parts is None:
            raise UploadRefused(
                400, f"file name {name!r} is not a plain relative name inside the dataset folder"
            )
        if Path(parts[-1]).suffix.lower() not in UPLOAD_TYPES:
            raise UploadRefused(
                415,
                f"{name!r}: only images ({', '.join(sorted(IMAGE_TYPES))}) and captions "
                f"({', '.join(sorted(CAPTION_TYPES))}) can be uploaded",
            )
        path = folder.joinpath(*parts)
        # a link inside the folder that points out of it is refused like '..'
        root = self.root.resolve()
        probe = path
        while probe != self.root and not probe.exists():
            probe = probe.parent
        if probe.exists() and not probe.resolve().is_relative_to(root):
            raise UploadRefused(403, f"{name!r} leads out of the dataset folder")
        return path

    def check(self, item: Announced) -> Path:
        if not is_sha256(item.sha256):
            raise UploadRefused(400, "sha256 must be 64 lower-case hex digits")
        if item.size < 0 or item.size > self.max_file:
            raise UploadRefused(
                413, f"{item.name!r} is {item.size} bytes; the limit for one file is {self.max_file}"
            )
        return self.target(item.dataset, item.name)

    # ---- state -------------------------------------------------------------------------------------------

    def partial_path(self, sha256: str) -> Path:
        return self.partials / f"{sha256}.part"

    def received(self, sha256: str) -> int:
        try:
            return self.partial_path(sha256).stat().st_size
        except OSError:
            return 0

    def listing(self, dataset: str) -> dict[str, Any]:
        """The files of a dataset folder with size and sha256, and the partial uploads with their length."""
        folder = self.dataset_dir(dataset)
        files: dict[str, dict[str, Any]] = {}
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder).as_posix()
                if path.is_file() and relative_parts(rel) is not None and path.suffix.lower() in UPLOAD_TYPES:
                    files[rel] = {"size": path.stat().st_size, "sha256": self.hashes.sha256(path)}
        partial = (
            {p.stem: p.stat().st_size for p in self.partials.glob("*.part")} if self.partials.is_dir() else {}
        )
        return {
            "dataset": dataset,
            "folder": str(folder.resolve()) if folder.is_dir() else str(folder),
            "files": files,
            "partial": partial,
        }

    def present(self, item: Announced, target: Path) -> bool:
        return (
            target.is_file()
            and target.stat().st_size == item.size
            and self.hashes.sha256(target) == item.sha256
        )

    # ---- writing -----------------------------------------------------------------------------------------

    def open_chunk(self, item: Announced, offset: int, length: int) -> BinaryIO:
        """The partial file opened for appending `length` bytes at `offset` (409 with the current length when
        `offset` is not where it ends)."""
        self.check(item)
        if offset + length > item.size:
            raise UploadRefused(
                400, f"bytes {offset}-{offset + length} go past the announced size {item.size}"
            )
        current = self.received(item.sha256)
        if offset != current:
            raise UploadRefused(
                409, f"expected the chunk at offset {current}, got {offset}", received=current
            )
        self.partials.mkdir(parents=True, exist_ok=True)
        return open(self.partial_path(item.sha256), "ab")

    def complete(self, item: Announced) -> Path:
        """Verify a fully received partial file and move it into place."""
        target = self.check(item)
        partial = self.partial_path(item.sha256)
        digest = sha256_file(partial)
        if digest != item.sha256:
            partial.unlink(missing_ok=True)
            raise UploadRefused(
                422,
                f"{item.name!r}: the received bytes have sha256 {digest}, not the announced "
                f"{item.sha256}; send the file again",
            )
        suffix = target.suffix.lower()
        if not content_ok(partial, suffix):
            partial.unlink(missing_ok=True)
            raise UploadRefused(415, f"{item.name!r}: the content is not a {suffix} file")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
        self.hashes.remember(target, digest)
        return target

    def prune(self, dataset: str, keep: set[str]) -> list[str]:
        """Remove the uploaded files of `dataset` not named in `keep` (a photo deleted locally goes away on the
        server too); returns their names."""
        removed = []
        for name in self.listing(dataset)["files"]:
            if name not in keep:
                self.target(dataset, name).unlink(missing_ok=True)
                removed.append(name)
        return removed


#: the largest LoRA the upload route accepts
MAX_LORA_FILE = 4 * 1024 * 1024 * 1024


class LoraStore(UploadStore):
    """A LoRA trained elsewhere (on Replicate) uploaded in chunks into a loras folder, the same way as photos:
    one plain ``.safetensors`` name, never replacing a different file of that name."""

    def __init__(self, loras_dir: str | os.PathLike, max_file: int = MAX_LORA_FILE):
        super().__init__(loras_dir, max_file)

    def target(self, dataset: str, name: str) -> Path:
        parts = relative_parts(name)
        if parts is None or len(parts) != 1 or Path(name).suffix.lower() != ".safetensors":
            raise UploadRefused(400, f"LoRA name {name!r}: one plain file name ending in .safetensors")
        path = self.root / name
        if path.is_symlink():
            raise UploadRefused(403, f"{name!r} is a link in the loras folder")
        return path

    def complete(self, item: Announced) -> Path:
        target = self.check(item)
        if target.is_file() and not self.present(item, target):
            self.partial_path(item.sha256).unlink(missing_ok=True)
            raise UploadRefused(403, f"another LoRA named {item.name!r} is in the loras folder; not replaced")
        return super().complete(item)
