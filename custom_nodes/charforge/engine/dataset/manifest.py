"""The dataset manifest: one entry per image, saved as ``manifest.json`` in the dataset's own folder.

Every dataset stage takes a manifest and returns a new one (ComfyUI shares a node's output between the
nodes wired to it, so nothing mutates a manifest it was given). Images are never held in the manifest:
each entry names its files and stages read them from disk when they need the pixels.

An entry is *accepted* while its ``rejected`` list is empty; stages append reasons instead of dropping
entries, so the report can show every photo and why it was left out.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class Scores:
    """Per-image measures written by Analyse (None until measured)."""

    sharpness: float | None = None  # variance of the Laplacian at 512 px long side (see quality.py)
    brightness: float | None = None  # mean luminance 0..1
    contrast: float | None = None  # standard deviation of luminance 0..1
    dark_fraction: float | None = None  # share of pixels at or below 2 % luminance
    bright_fraction: float | None = None  # share of pixels at or above 98 % luminance
    identity_distance: float | None = None  # 1 - cosine similarity to the dataset's face centroid


@dataclass
class FaceInfo:
    """The faces Analyse found: how many, and the main (largest) one, in source-image pixels."""

    count: int = 0  # every detection
    people: int = 0  # detections at least a quarter of the main face's area (other people, not background)
    box: list[float] | None = None  # main face [x1, y1, x2, y2] in the working file's pixels
    score: float | None = None  # detector confidence of the main face
    size: float | None = None  # main face's shorter side in pixels


@dataclass
class ImageEntry:
    """One photo of the dataset and everything the stages learnt about it."""

    id: str  # stable within the dataset ("0001", "0001-flip" for augmented copies)
    source: str  # the original file (never modified)
    file: str  # the working file stages read: the source until Crop writes its own copy
    width: int = 0  # of `file`, EXIF orientation applied
    height: int = 0
    sha256: str | None = None  # of the source file's bytes
    caption: str | None = None
    scores: Scores = field(default_factory=Scores)
    faces: FaceInfo | None = None  # None until Analyse ran with a detector
    hashes: dict[str, str] = field(default_factory=dict)  # perceptual hashes as hex ("phash", "dhash")
    duplicate_group: int | None = None
    bucket: list[int] | None = None  # [width, height] after Crop
    crop_box: list[int] | None = None  # [x1, y1, x2, y2] of the source that Crop kept
    augmentations: list[str] = field(default_factory=list)
    parent: str | None = None  # id of the entry an augmented copy was made from
    synthetic: bool = False  # made by the synthesis stage (face swap), not a photo of the character
    synthesized_from: str | None = None  # the source image a synthetic entry's face was swapped onto
    upscaled: float | None = None  # enlarged this many times by an upscale model (Crop), else None
    # Crop's enhancement and its identity check: {"by", "factor", "source", "kept", "similarity", "before",
    # "threshold", "reason"}; None when the working file was not enhanced (see engine.synth.identity)
    enhanced: dict[str, Any] | None = None
    flags: list[str] = field(default_factory=list)  # notes that do not reject ("alpha composited on white")
    rejected: list[str] = field(default_factory=list)  # reasons; empty means accepted

    @property
    def accepted(self) -> bool:
        return not self.rejected

    @property
    def name(self) -> str:
        """The source file's name, as the user knows the photo."""
        return os.path.basename(self.source)

    def reject(self, reason: str) -> None:
        if reason not in self.rejected:
            self.rejected.append(reason)

    def flag(self, note: str) -> None:
        if note not in self.flags:
            self.flags.append(note)


@dataclass
class StageRecord:
    """What a stage did, kept in the manifest so a dataset explains how it was made."""

    stage: str
    settings: dict[str, Any]
    summary: str


@dataclass
class DatasetManifest:
    """A dataset: its folder, its entries, and the stages that made it.

    `folder` is the dataset's own output folder; every file a stage writes goes below it.
    """

    name: str
    folder: str
    entries: list[ImageEntry] = field(default_factory=list)
    history: list[StageRecord] = field(default_factory=list)
    detector: str | None = None  # the face detector Analyse used ("insightface:buffalo_l", "mtcnn", ...)
    duplicate_groups: list[list[str]] = field(default_factory=list)  # entry ids, the kept one first
    export_dir: str | None = None  # the kohya `img` folder of the last export (pass it as train_data_dir)
    # The dataset's own identity, from Analyse's embeddings (InsightFace only): what enhanced images are
    # scored against. {"name", "model", "centroid", "threshold", "references", "outliers"}; see
    # engine.synth.identity.identity_record
    identity: dict[str, Any] | None = None
    version: int = FORMAT_VERSION

    # ---------------------------------------------------------------------------- views

    @property
    def accepted(self) -> list[ImageEntry]:
        return [entry for entry in self.entries if entry.accepted]

    @property
    def rejected(self) -> list[ImageEntry]:
        return [entry for entry in self.entries if not entry.accepted]

    def by_id(self) -> dict[str, ImageEntry]:
        return {entry.id: entry for entry in self.entries}

    def copy(self) -> DatasetManifest:
        """A deep copy a stage may change (the manifest it was given stays as it was)."""
        return copy.deepcopy(self)

    def record(self, stage: str, settings: dict[str, Any], summary: str) -> None:
        self.history.append(StageRecord(stage, dict(settings), summary))

    def summary(self) -> str:
        return f"{len(self.accepted)} accepted, {len(self.rejected)} rejected of {len(self.entries)} image(s)"

    def __repr__(self) -> str:  # ComfyUI may log values; keep it short
        return f"DatasetManifest({self.name!r}, {self.summary()}, folder={self.folder!r})"

    # ---------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data. Paths inside the dataset folder are stored relative to it."""
        data = asdict(self)
        data.pop("folder")
        for entry in data["entries"]:
            entry["file"] = self._relative(entry["file"])
        if data["export_dir"]:
            data["export_dir"] = self._relative(data["export_dir"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], folder: str | os.PathLike) -> DatasetManifest:
        folder = str(Path(folder).resolve())
        entries = []
        for raw in data.get("entries", []):
            raw = dict(raw)
            raw["scores"] = Scores(**_known(Scores, raw.get("scores") or {}))
            raw["faces"] = FaceInfo(**_known(FaceInfo, raw["faces"])) if raw.get("faces") else None
            raw["file"] = _absolute(folder, raw["file"])
            entries.append(ImageEntry(**_known(ImageEntry, raw)))
        history = [StageRecord(**_known(StageRecord, h)) for h in data.get("history", [])]
        export_dir = data.get("export_dir")
        return cls(
            name=data.get("name", Path(folder).name),
            folder=folder,
            entries=entries,
            history=history,
            detector=data.get("detector"),
            duplicate_groups=[list(g) for g in data.get("duplicate_groups", [])],
            export_dir=_absolute(folder, export_dir) if export_dir else None,
            identity=data.get("identity"),
            version=int(data.get("version", FORMAT_VERSION)),
        )

    def save(self, path: str | os.PathLike | None = None) -> str:
        """Write the manifest (default ``<folder>/manifest.json``) atomically; return its path.

        Paths inside the dataset folder are stored relative to it; a copy saved elsewhere (an export)
        keeps the same relative paths, so read it with `from_dict` and the dataset folder.
        """
        target = Path(path) if path is not None else Path(self.folder) / MANIFEST_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")
        return str(target)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DatasetManifest:
        """Read a ``manifest.json`` written by `save` (the folder is the file's own folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls.from_dict(data, path.parent)

    def _relative(self, path: str) -> str:
        try:
            rel = Path(path).resolve().relative_to(Path(self.folder).resolve())
        except ValueError:
            return path
        return rel.as_posix()


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    # Newer manifests may carry fields this version does not know: ignore them rather than fail.
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


def _absolute(folder: str, path: str) -> str:
    return path if os.path.isabs(path) else str(Path(folder) / path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
