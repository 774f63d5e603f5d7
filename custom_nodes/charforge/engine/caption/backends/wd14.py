"""WD14-style booru tagger: an ONNX image classifier plus its tag list, run with onnxruntime.

Model files live in the ``wd14_tagger`` model folder (ComfyUI's ``models/wd14_tagger``, the folder the
WD14 Tagger pack uses) as pairs ``<name>.onnx`` + ``<name>.csv`` (the hub's ``model.onnx`` and
``selected_tags.csv`` renamed), or are given as an absolute path to the ``.onnx`` file.

The CSV has a header and the columns ``tag_id,name,category,count``; one row per model output, in
output order. Categories: 0 general, 4 character, 9 rating. The model takes NHWC float32 images with
values 0..255 in BGR order, square (the photo padded with white, then resized to the model's input size,
448 for the published taggers) and returns one probability per tag.

Caption: character tags at or above `character_threshold`, then general tags at or above
`general_threshold`, each group by descending confidence; ratings are left out unless `include_rating`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Captioner, CaptionerError

MODEL_FOLDER = "wd14_tagger"
DEFAULT_MODEL = "wd-v1-4-moat-tagger-v2"
DEFAULT_SIZE = 448
GENERAL, CHARACTER, RATING = 0, 4, 9
PROVIDER_ORDER = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "CPUExecutionProvider",
)


@dataclass
class Tag:
    name: str
    category: int


@dataclass
class WD14Settings:
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    replace_underscore: bool = True
    exclude_tags: list[str] = field(default_factory=list)  # compared with and without underscores
    include_rating: bool = False
    batch_size: int = 8


def list_taggers() -> list[str]:
    """Names of the taggers in the wd14_tagger folders that have both files (without ``.onnx``)."""
    from .... import bridge

    names = []
    for rel in bridge.list_models(MODEL_FOLDER):
        if rel.lower().endswith(".onnx"):
            stem = rel[:-5]
            for folder in bridge.model_folders(MODEL_FOLDER):
                if (Path(folder) / f"{stem}.csv").is_file():
                    names.append(stem)
                    break
    return sorted(set(names))


def find_tagger(name: str) -> tuple[Path, Path]:
    """The ``.onnx`` and ``.csv`` of tagger `name` (a name in the wd14_tagger folders, or a path)."""
    from .... import bridge

    name = name.strip().strip('"')
    if not name:
        raise CaptionerError(f"no WD14 tagger named: give a model name from models/{MODEL_FOLDER}")
    candidate = Path(name).expanduser()
    if candidate.suffix.lower() == ".onnx" and candidate.is_absolute():
        onnx_path = candidate
    else:
        stem = name[:-5] if name.lower().endswith(".onnx") else name
        found: Path | None = None
        for folder in bridge.model_folders(MODEL_FOLDER):
            if (Path(folder) / f"{stem}.onnx").is_file():
                found = Path(folder) / f"{stem}.onnx"
                break
        if found is None:
            folders = bridge.model_folders(MODEL_FOLDER)
            where = (
                ", ".join(folders)
                if folders
                else "no folder configured (set CHARFORGE_MODELS_DIR or COMFYUI_DIR)"
            )
            raise CaptionerError(
                f"WD14 tagger {stem!r} not found. Put {stem}.onnx and {stem}.csv (the model's model.onnx and "
                f"selected_tags.csv, renamed) into the {MODEL_FOLDER} model folder; looked in: {where}"
            )
        onnx_path = found
    csv_path = onnx_path.with_suffix(".csv")
    if not onnx_path.is_file():
        raise CaptionerError(
            f"WD14 tagger file {onnx_path} does not exist (expected {onnx_path.name} and "
            f"{csv_path.name} in the {MODEL_FOLDER} folder)"
        )
    if not csv_path.is_file():
        raise CaptionerError(
            f"WD14 tagger {onnx_path.name} has no tag list: expected {csv_path.name} next to it "
            "(the model's selected_tags.csv, renamed)"
        )
    return onnx_path, csv_path


def read_tags(csv_path: str | os.PathLike) -> list[Tag]:
    """The tag list: ``tag_id,name,category,count`` with a header, one row per model output."""
    tags = []
    with open(csv_path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "name" not in reader.fieldnames or "category" not in reader.fieldnames:
            raise CaptionerError(f"{csv_path}: expected a header with tag_id,name,category,count")
        for row in reader:
            tags.append(Tag(row["name"], int(row["category"] or 0)))
    if not tags:
        raise CaptionerError(f"{csv_path} lists no tags")
    return tags


def best_providers(available: list[str]) -> list[str]:
    """onnxruntime providers to try, fastest first, CPU always last."""
    chosen = [p for p in PROVIDER_ORDER if p in available and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


def preprocess(image: Any, size: int):
    """A PIL image -> float32 (size, size, 3) array, BGR, 0..255, the photo centred on white and resized."""
    import numpy as np
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(array[:, :, ::-1])  # RGB -> BGR


class WD14Tagger(Captioner):
    """Booru tags for each image from a WD14-style ONNX tagger."""

    name = "wd14"

    def __init__(self, model: str, settings: WD14Settings | None = None, providers: list[str] | None = None):
        from ....deps import require

        ort = require("onnxruntime")
        self.settings = settings or WD14Settings()
        self.onnx_path, self.csv_path = find_tagger(model)
        self.tags = read_tags(self.csv_path)
        try:
            self._session = ort.InferenceSession(
                str(self.onnx_path), providers=providers or best_providers(ort.get_available_providers())
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; say which file and why
            hint = " (WD14 v3 taggers need a recent onnxruntime)" if "opset" in str(exc).lower() else ""
            raise CaptionerError(f"could not load {self.onnx_path}: {exc}{hint}") from exc
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        self._output_name = self._session.get_outputs()[0].name
        height = inp.shape[1] if len(inp.shape) == 4 else None
        self.size = height if isinstance(height, int) and height > 0 else DEFAULT_SIZE
        self.max_side = self.size
        self._fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        self.batch_size = max(1, self.settings.batch_size)
        outputs = self._session.get_outputs()[0].shape
        if len(outputs) == 2 and isinstance(outputs[1], int) and outputs[1] != len(self.tags):
            raise CaptionerError(
                f"{self.onnx_path.name} has {outputs[1]} outputs but {self.csv_path.name} lists "
                f"{len(self.tags)} tags: the .csv belongs to another model"
            )
        self.provider = self._session.get_providers()[0]
        self._excluded = {
            t.strip().lower().replace("_", " ") for t in self.settings.exclude_tags if t.strip()
        }

    def probabilities(self, images: list[Any]):
        """(N, tags) probabilities for PIL images."""
        import numpy as np

        if self._session is None:
            raise CaptionerError("this WD14 tagger was closed")
        batch = np.stack([preprocess(image, self.size) for image in images])
        step = self._fixed_batch or len(images)
        out = [
            self._session.run([self._output_name], {self._input_name: batch[i : i + step]})[0]
            for i in range(0, len(images), step)
        ]
        return np.concatenate(out, axis=0)

    def tags_for(self, scores) -> list[tuple[str, float]]:
        """The tags that pass their threshold, character tags first, by descending confidence."""
        s = self.settings
        chosen: dict[int, list[tuple[str, float]]] = {CHARACTER: [], GENERAL: [], RATING: []}
        ratings = []
        for tag, score in zip(self.tags, scores.tolist(), strict=False):
            if tag.category == RATING:
                ratings.append((tag.name, score))
                continue
            threshold = s.character_threshold if tag.category == CHARACTER else s.general_threshold
            if score >= threshold:
                chosen.setdefault(tag.category if tag.category == CHARACTER else GENERAL, []).append(
                    (tag.name, score)
                )
        result = sorted(chosen[CHARACTER], key=lambda t: -t[1]) + sorted(chosen[GENERAL], key=lambda t: -t[1])
        if s.include_rating and ratings:
            result.append(max(ratings, key=lambda t: t[1]))
        return [
            (self._display(name), score)
            for name, score in result
            if name.lower().replace("_", " ") not in self._excluded
        ]

    def _display(self, name: str) -> str:
        # Short emoticon tags (^_^, o_o, >_<) keep their underscores.
        if self.settings.replace_underscore and len(name) > 3:
            return name.replace("_", " ")
        return name

    def caption(self, images: list[Any]) -> list[str]:
        if not images:
            return []
        return [", ".join(name for name, _ in self.tags_for(row)) for row in self.probabilities(images)]

    def notes(self) -> list[str]:
        return [f"WD14 tagger {self.onnx_path.name} ({len(self.tags)} tags) on {self.provider}"]

    def close(self) -> None:
        self._session = None
