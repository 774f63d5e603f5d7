"""CLIP score: cosine similarity between an image and its prompt, with a full (vision + text) CLIP model.

A CLIP score needs both towers, so the model is a Hugging Face folder of a ``CLIPModel`` (``config.json``,
weights, tokenizer files, ``preprocessor_config.json``), e.g. a download of openai/clip-vit-large-patch14.
It is found as an absolute path or as a folder inside ComfyUI's ``clip_vision`` model folder(s)
(``models/clip_vision/<name>/``). The single-file ``clip_vision`` checkpoints IPAdapter uses hold the
vision tower only and cannot score text.

Images are preprocessed on the model's device in batches (resize the short side with bicubic
antialiasing, centre crop, normalise with the folder's mean/std), which avoids a PIL round trip per
image. Reported values are raw cosines (typical matching pairs 0.25..0.35 for ViT-L/14).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import bridge
from ...deps import require
from ..control import Control
from ..models.devices import best_device
from .sheet import ImageScore, ScoreSheet, judge

log = logging.getLogger("charforge")

FOLDER_KIND = "clip_vision"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _is_clip_folder(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data.get("model_type") == "clip" or "CLIPModel" in (data.get("architectures") or [])


def list_clip_models() -> list[str]:
    """Full CLIP model folders (vision + text) inside the clip_vision model folder(s), as names."""
    return bridge.model_dirs(
        FOLDER_KIND, "config.json", lambda config: _is_clip_folder(config.parent), depths=(0, 1, 2)
    )


def resolve_clip_model(name: str) -> Path:
    """The folder of CLIP model `name`: an absolute path, or a folder name inside a clip_vision folder."""
    name = name.strip().strip('"')
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path(f) / name for f in bridge.model_folders(FOLDER_KIND)]
    for candidate in candidates:
        if candidate.is_file() and candidate.name == "config.json":
            candidate = candidate.parent
        if candidate.is_dir() and _is_clip_folder(candidate):
            return candidate
        if candidate.is_file():
            raise FileNotFoundError(
                f"{candidate} is a single file; a CLIP score needs a full CLIP model folder (vision + text towers) "
                f"such as a download of openai/clip-vit-large-patch14, placed in models/{FOLDER_KIND}/<name>/"
            )
    where = ", ".join(str(c) for c in candidates) or "(no clip_vision folder configured)"
    found = list_clip_models()
    hint = f" CLIP folders found: {', '.join(found)}." if found else ""
    raise FileNotFoundError(
        f"CLIP model {name!r} not found; looked for a folder with a CLIP config.json in: {where}. "
        f"Put a Hugging Face CLIP folder (config.json, model.safetensors, tokenizer and "
        f"preprocessor files) in models/{FOLDER_KIND}/<name>/ or give its absolute path.{hint}"
    )


def default_device() -> str:
    require("torch")
    return best_device()


@dataclass(frozen=True)
class _Preprocess:
    size: int  # short side after resizing
    crop: tuple[int, int]  # height, width
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _read_preprocess(folder: Path, image_size: int) -> _Preprocess:
    path = folder / "preprocessor_config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    size = data.get("size", image_size)
    if isinstance(size, dict):
        size = size.get("shortest_edge") or size.get("height") or image_size
    crop = data.get("crop_size", size)
    crop = (crop.get("height", size), crop.get("width", size)) if isinstance(crop, dict) else (crop, crop)
    return _Preprocess(
        int(size),
        (int(crop[0]), int(crop[1])),
        tuple(data.get("image_mean", OPENAI_MEAN)),
        tuple(data.get("image_std", OPENAI_STD)),
    )


class ClipScorer:
    """A loaded CLIP model that embeds images and prompts and scores image-prompt pairs."""

    _cache: dict[tuple, ClipScorer] = {}
    _lock = threading.Lock()

    def __init__(
        self, model: Any, tokenizer: Any, preprocess: _Preprocess, device: str, dtype: Any, name: str
    ):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.device, self.dtype, self.name = device, dtype, name
        self.max_tokens = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def load(cls, name: str, device: str | None = None, half: bool | None = None) -> ClipScorer:
        """Load (or reuse) the CLIP model `name` (see `resolve_clip_model`). fp16 on GPU unless `half` is False."""
        torch = require("torch")
        transformers = require("transformers")
        folder = resolve_clip_model(name)
        device = device or default_device()
        half = (device != "cpu") if half is None else half
        dtype = torch.float16 if half else torch.float32
        key = (str(folder.resolve()), device, str(dtype))
        with cls._lock:
            if key not in cls._cache:
                model = (
                    transformers.CLIPModel.from_pretrained(str(folder), dtype=dtype)
                    if _accepts_dtype(transformers)
                    else transformers.CLIPModel.from_pretrained(str(folder), torch_dtype=dtype)
                )
                model.eval().to(device)
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
                preprocess = _read_preprocess(folder, int(model.config.vision_config.image_size))
                cls._cache[key] = cls(model, tokenizer, preprocess, device, dtype, f"clip:{folder.name}")
                log.info("CharForge: loaded CLIP %s on %s (%s)", folder, device, dtype)
            return cls._cache[key]

    @classmethod
    def clear_cache(cls) -> None:
        with cls._lock:
            cls._cache.clear()

    # ----------------------------------------------------------------------------------------------

    def _pixels(self, images) -> Any:
        """[B, H, W, 3] floats in 0..1 (a ComfyUI IMAGE) -> normalised [B, 3, crop_h, crop_w] on the device."""
        torch = require("torch")
        functional = torch.nn.functional
        x = images.to(self.device, torch.float32).permute(0, 3, 1, 2)
        height, width = x.shape[-2:]
        scale = self.preprocess.size / min(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        if (new_h, new_w) != (height, width):
            x = functional.interpolate(
                x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
            )
        crop_h, crop_w = self.preprocess.crop
        top, left = max(0, (new_h - crop_h) // 2), max(0, (new_w - crop_w) // 2)
        x = x[:, :, top : top + crop_h, left : left + crop_w].clamp(0.0, 1.0)
        mean = torch.tensor(self.preprocess.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, device=self.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def embed_images(self, images, batch_size: int = 32, control: Control | None = None) -> Any:
        """Normalised image embeddings [B, D] (float32, on the device) of a [B, H, W, 3] 0..1 tensor.

        `control` advances by the images of each batch."""
        torch = require("torch")
        out = []
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                chunk = images[start : start + batch_size]
                features = _features(self.model.get_image_features(pixel_values=self._pixels(chunk)))
                out.append(torch.nn.functional.normalize(features.float(), dim=-1))
                if control is not None:
                    control.advance(int(chunk.shape[0]))
        return (
            torch.cat(out) if out else torch.zeros((0, self.model.config.projection_dim), device=self.device)
        )

    def embed_texts(self, texts: Sequence[str]) -> Any:
        """Normalised text embeddings [T, D]; prompts longer than the model's context are truncated."""
        torch = require("torch")
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        with torch.inference_mode():
            features = _features(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            )
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def truncated(self, texts: Sequence[str]) -> list[str]:
        """The prompts that are longer than the text context (their ends are ignored)."""
        return [t for t in texts if len(self.tokenizer(t)["input_ids"]) > self.max_tokens]

    def score(
        self, images, prompts: Sequence[str], batch_size: int = 32, control: Control | None = None
    ) -> list[float]:
        """Cosine similarity of image i with prompts[i] (or with the single prompt for every image)."""
        count = int(images.shape[0])
        if len(prompts) not in (1, count):
            raise ValueError(
                f"give one prompt for all images or one per image: got {len(prompts)} prompts for "
                f"{count} images"
            )
        unique = list(dict.fromkeys(prompts))
        text = self.embed_texts(unique)
        image = self.embed_images(images, batch_size, control)
        which = [unique.index(prompts[0 if len(prompts) == 1 else i]) for i in range(count)]
        sims = (image * text[which]).sum(dim=-1)
        return [float(v) for v in sims.cpu()]


def _features(output) -> Any:
    # transformers 4.x returns the projected features; 5.x a model output whose pooler_output holds them.
    return output if hasattr(output, "dim") else output.pooler_output


def _accepts_dtype(transformers) -> bool:
    major = int(str(transformers.__version__).split(".")[0])
    return major >= 5


def clip_sheet(
    scorer: ClipScorer,
    images,
    prompts: Sequence[str],
    threshold: float | None = None,
    labels: Sequence[str] | None = None,
    batch_size: int = 32,
    control: Control | None = None,
) -> ScoreSheet:
    """A `ScoreSheet` of CLIP scores (metric ``clip``) for a [B, H, W, 3] batch and its prompt(s)."""
    values = scorer.score(images, prompts, batch_size, control)
    rows = []
    for i, value in enumerate(values):
        passed = judge(value, threshold)
        reason = "" if passed else f"clip {value:.3f} below {threshold:.3f}"
        prompt = prompts[0 if len(prompts) == 1 else i]
        rows.append(
            ImageScore(
                i, value, passed, reason, labels[i] if labels else f"image {i}", {"prompt": prompt[:200]}
            )
        )
    notes = []
    long = scorer.truncated(list(dict.fromkeys(prompts)))
    if long:
        notes.append(f"{len(long)} prompt(s) longer than {scorer.max_tokens} tokens were truncated")
    return ScoreSheet("clip", rows, threshold, scorer.name, notes)


def prompt_lines(text: str) -> list[str]:
    """The non-empty lines of `text`, stripped: one prompt per line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def batch_prompts(text: str, one_per_line: bool, count: int) -> list[str]:
    """The prompt(s) `count` images were made from: `text` as one prompt, or with `one_per_line` one line per
    image (a single line serves all). Raises with what to fix when that does not fit the batch."""
    if not one_per_line:
        if not text.strip():
            raise ValueError("prompt is empty: type the prompt the images were generated from")
        return [text.strip()]
    lines = prompt_lines(text)
    if len(lines) not in (1, count):
        raise ValueError(f"one_per_line is on: give one prompt line per image ({count}), got {len(lines)}")
    return lines
