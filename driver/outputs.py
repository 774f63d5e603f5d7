"""Outputs of a finished job: find every file and value in the history, choose safe local names.

ComfyUI reports outputs per node as the node's UI dict (history ``outputs[node_id]``): lists under keys such
as ``images``, ``gifs``, ``audio``, ``video``, ``latents`` whose items are ``{"filename", "subfolder",
"type"}``, an ``animated`` flag list for animations saved under ``images``, and lists of plain values
(``text`` and the like). Every list of dicts with a ``filename`` is treated as files, whatever its key.

File names come from the server and are not trusted: :func:`local_path_for` never lets a name or subfolder
leave the chosen output folder, and :func:`open_unique` never overwrites an existing file (it adds ``-1``,
``-2``, ... before the extension).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"|?*]')
_MAX_NAME = 180


@dataclass(frozen=True)
class OutputFile:
    """One file a node produced, as the server names it."""

    node_id: str
    key: str
    index: int
    filename: str
    subfolder: str = ""
    type: str = "output"
    animated: bool = False
    format: str | None = None

    @property
    def view_params(self) -> dict[str, str]:
        """Query parameters for ``GET /view``."""
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}
        if self.format:
            out["format"] = self.format
        return out


@dataclass
class DownloadedFile:
    """A file written locally, tied back to the node that produced it."""

    source: OutputFile
    path: Path
    size: int
    sha256: str
    class_type: str | None = None
    title: str | None = None


@dataclass
class NodeValues:
    """Non-file UI outputs of one node (``text``, numbers, ...)."""

    node_id: str
    values: dict[str, list[Any]] = field(default_factory=dict)


def _animated_flags(ui: dict[str, Any], key: str, count: int) -> list[bool]:
    flags = ui.get("animated")
    if key != "images" or not isinstance(flags, list) or not flags:
        return [key in ("gifs", "video", "videos")] * count
    if len(flags) == count:
        return [bool(f) for f in flags]
    return [any(bool(f) for f in flags)] * count


def collect_files(outputs: dict[str, Any]) -> list[OutputFile]:
    """Every file output of every node, in node then key order."""
    files: list[OutputFile] = []
    for node_id, ui in (outputs or {}).items():
        if not isinstance(ui, dict):
            continue
        for key, items in ui.items():
            if not isinstance(items, list):
                continue
            entries = [i for i in items if isinstance(i, dict) and isinstance(i.get("filename"), str)]
            if not entries:
                continue
            flags = _animated_flags(ui, key, len(entries))
            for index, (item, animated) in enumerate(zip(entries, flags, strict=True)):
                files.append(
                    OutputFile(
                        node_id=str(node_id),
                        key=key,
                        index=index,
                        filename=item["filename"],
                        subfolder=str(item.get("subfolder") or ""),
                        type=str(item.get("type") or "output"),
                        animated=animated,
                        format=item.get("format") if isinstance(item.get("format"), str) else None,
                    )
                )
    return files


def _is_plain(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return False


def collect_values(outputs: dict[str, Any]) -> list[NodeValues]:
    """Text/number outputs: every UI list that holds plain values (``animated`` flags excluded)."""
    found: list[NodeValues] = []
    for node_id, ui in (outputs or {}).items():
        if not isinstance(ui, dict):
            continue
        values = {
            k: v for k, v in ui.items() if k != "animated" and isinstance(v, list) and v and _is_plain(v)
        }
        if values:
            found.append(NodeValues(str(node_id), values))
    return found


def safe_name(name: str, fallback: str = "output") -> str:
    """A single, harmless path component made from a server-supplied name.

    Only the last path component survives (``a/../b.png`` -> ``b.png``, ``C:\\x\\y.png`` -> ``y.png``);
    control and reserved characters become ``_``; leading dots are replaced so nothing becomes hidden or
    ``..``; overly long names are shortened keeping the extension.
    """
    text = str(name).replace("\\", "/").split("/")[-1]
    text = _UNSAFE_CHARS.sub("_", text).strip().rstrip(".")
    text = re.sub(r"^\.+", lambda m: "_" * len(m.group()), text)
    if not text or set(text) <= {"_", "."}:
        text = fallback
    if len(text) > _MAX_NAME:
        stem, ext = os.path.splitext(text)
        text = stem[: _MAX_NAME - len(ext[:20])] + ext[:20]
    return text


def safe_subfolder(subfolder: str) -> list[str]:
    """Sanitised components of a server subfolder; ``..``, ``.``, empty parts and drive letters are dropped."""
    parts = []
    for part in str(subfolder or "").replace("\\", "/").split("/"):
        part = part.strip()
        if part in ("", ".", "..") or re.fullmatch(r"[A-Za-z]:", part):
            continue
        parts.append(safe_name(part, fallback="_"))
    return parts


def local_path_for(out_dir: Path, file: OutputFile) -> Path:
    """Where ``file`` goes under ``out_dir``: ``[<type>/]<subfolder>/<filename>`` (type only when not
    ``output``), guaranteed to stay inside ``out_dir`` even through symlinks."""
    root = out_dir.resolve()
    parts = [] if file.type == "output" else [safe_name(file.type, "other")]
    parts += safe_subfolder(file.subfolder)
    candidate = root.joinpath(*parts, safe_name(file.filename))
    try:
        candidate.parent.resolve().relative_to(root)
    except ValueError:  # a symlinked folder inside out_dir points elsewhere: flatten
        candidate = root / safe_name(file.filename)
    return candidate


def open_unique(path: Path) -> tuple[Path, IO[bytes]]:
    """Create ``path`` exclusively, or ``stem-1.ext``, ``stem-2.ext``... if it exists; never overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, ext = os.path.splitext(path.name)
    candidate = path
    n = 0
    while True:
        try:
            return candidate, open(candidate, "xb")  # noqa: SIM115 - the caller owns and closes the handle
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{stem}-{n}{ext}")


def check_out_dir(path: Path) -> None:
    """Refuse an output folder that cannot be created or written (checked before anything is submitted).

    Raises :class:`~charforge.driver.errors.UsageError` when ``path`` or one of its parents is an existing
    file, or the nearest existing folder is not writable.
    """
    from .errors import UsageError

    probe = Path(os.path.abspath(path))
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"--out {path}: {probe} is a file, not a folder; choose another output folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: the folder {probe} is not writable; choose another output folder")
