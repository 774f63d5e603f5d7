"""The character-preset schema: what a preset holds, its defaults, validation and the prompt it builds.

One schema for every side: the engine reads and writes preset files with it (``charforge.engine.library.
characters``: the characters folder, YAML), the nodes show it, and the recipes (storyboards, LoRA
evaluation) render with it. Nothing here touches files or needs more than the standard library.

A preset::

    display_name: Alice
    trigger_words: [alice_cf]
    loras:                        # in the loras folder; weight = model strength, clip_weight defaults to it
      - {name: alice.safetensors, weight: 0.9}
      - {name: film_grain.safetensors, weight: 0.4, clip_weight: 0.2}
    prompt: photo of a woman, natural light
    negative_prompt: blurry, deformed
    identity: alice               # a saved identity (Build Identity) or the path of its .json
    reference_photos: /data/alice/photos    # optional: the photos the identity was built from
    threshold: 0.35               # identity similarity a render needs; 0 = the identity's own suggestion
    base_model: sdxl              # optional: sd15 / sdxl / flux-dev / flux-schnell / sd3-medium / sd35-medium /
                                  # sd35-large (the family ids of architecture detection)
    generation: {steps: 25, cfg: 6.5, width: 1024, height: 1024, sampler: euler, scheduler: normal}
    # Flux also reads generation.guidance (FluxGuidance, 3.5) and SD3/SD3.5 generation.shift (ModelSamplingSD3, 3.0)

A preset without ``width``/``height`` renders at 1024 px; what CharForge creates from a base model (``charforge
character new``, a finished training run, a storyboard from flags) sizes it with `default_size`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from .safe_yaml import short_repr

SUFFIXES = (".yaml", ".yml")
FLUX_FAMILIES = ("flux-dev", "flux-schnell")
SD3_FAMILIES = ("sd3-medium", "sd35-medium", "sd35-large")
BASE_MODELS = ("", "sd15", "sdxl", *FLUX_FAMILIES, *SD3_FAMILIES)


def default_size(base_model: str) -> int:
    """The square image size for a base model family: 512 for SD1.5 and unknown ones, else 1024 (SDXL, Flux,
    SD3/SD3.5)."""
    return 512 if base_model in ("", "sd15") or base_model not in BASE_MODELS else 1024


class CharacterError(ValueError):
    """A character preset that is missing or invalid; names the file and the field."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, field: str | None = None):
        self.path = str(path) if path is not None else None
        self.field = field
        where = f"{self.path}: " if self.path else ""
        what = f"field {short_repr(field)}: " if field else ""
        super().__init__(where + what + message)


@dataclass
class GenerationParams:
    """Defaults for rendering this character (ComfyUI's KSampler and EmptyLatentImage inputs).

    `guidance` is Flux's distilled guidance (ComfyUI's FluxGuidance; Flux samples at cfg 1.0) and `shift` the
    sampling shift of SD3/SD3.5 (ModelSamplingSD3); other families ignore them. `family_generation` gives each
    family's defaults."""

    steps: int = 25
    cfg: float = 7.0
    width: int = 1024
    height: int = 1024
    sampler: str = "euler"
    scheduler: str = "normal"
    seed: int | None = None
    guidance: float = 3.5
    shift: float = 3.0

    def to_dict(self) -> dict[str, Any]:
        data = {
            "steps": self.steps,
            "cfg": self.cfg,
            "width": self.width,
            "height": self.height,
            "sampler": self.sampler,
            "scheduler": self.scheduler,
        }
        if self.seed is not None:
            data["seed"] = self.seed
        # Only where they differ from the defaults: SD1.5/SDXL presets read as before.
        if self.guidance != GenerationParams.guidance:
            data["guidance"] = self.guidance
        if self.shift != GenerationParams.shift:
            data["shift"] = self.shift
        return data


# Per-family sampling defaults: Flux.1-dev is guidance-distilled (cfg 1.0, FluxGuidance 3.5, euler/simple as in
# ComfyUI's Flux examples); schnell is timestep-distilled (4 steps, no guidance input); SD3/SD3.5 use real
# classifier-free guidance with the flow-matching shift 3.0 (ModelSamplingSD3) and the sgm_uniform schedule.
_FAMILY_SAMPLING: dict[str, dict[str, Any]] = {
    "sd15": {"steps": 25, "cfg": 7.0, "sampler": "dpmpp_2m", "scheduler": "karras"},
    "sdxl": {"steps": 25, "cfg": 7.0, "sampler": "dpmpp_2m", "scheduler": "karras"},
    "flux-dev": {"steps": 20, "cfg": 1.0, "sampler": "euler", "scheduler": "simple", "guidance": 3.5},
    "flux-schnell": {"steps": 4, "cfg": 1.0, "sampler": "euler", "scheduler": "simple", "guidance": 3.5},
    "sd3-medium": {"steps": 28, "cfg": 5.0, "sampler": "euler", "scheduler": "sgm_uniform", "shift": 3.0},
    "sd35-medium": {"steps": 40, "cfg": 4.5, "sampler": "euler", "scheduler": "sgm_uniform", "shift": 3.0},
    "sd35-large": {"steps": 28, "cfg": 4.5, "sampler": "euler", "scheduler": "sgm_uniform", "shift": 3.0},
}


def family_generation(base_model: str) -> GenerationParams:
    """The generation defaults of a base model family (a `BASE_MODELS` id), at its `default_size`; an empty or
    unknown family gets the plain `GenerationParams` defaults at 512 px."""
    size = default_size(base_model)
    return GenerationParams(width=size, height=size, **_FAMILY_SAMPLING.get(base_model, {}))


@dataclass
class CharacterLora:
    name: str  # file name in the loras folder (or an absolute path)
    weight: float = 1.0  # model strength
    clip_weight: float | None = None  # text-encoder strength; None = same as weight

    @property
    def strength_clip(self) -> float:
        return self.weight if self.clip_weight is None else self.clip_weight

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "weight": self.weight}
        if self.clip_weight is not None:
            data["clip_weight"] = self.clip_weight
        return data


@dataclass
class Character:
    """One character preset (see the module docstring for the file format)."""

    name: str
    display_name: str = ""
    trigger_words: list[str] = field(default_factory=list)
    loras: list[CharacterLora] = field(default_factory=list)
    prompt: str = ""
    negative_prompt: str = ""
    identity: str = ""
    reference_photos: str = ""
    threshold: float = 0.0
    base_model: str = ""
    generation: GenerationParams = field(default_factory=GenerationParams)
    notes: str = ""
    path: str | None = None  # where it was loaded from (not saved)

    @property
    def lora_stack(self) -> list[tuple[str, float]]:
        """``[(lora file, model weight), ...]``."""
        return [(lora.name, lora.weight) for lora in self.loras]

    def prompt_text(self, extra: str = "") -> str:
        """Trigger words (those not already in the prompt), the base prompt, then `extra`, comma-joined."""
        return inject_trigger_words(join_prompt(self.prompt, extra), self.trigger_words)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "display_name": self.display_name or self.name,
            "trigger_words": list(self.trigger_words),
            "loras": [lora.to_dict() for lora in self.loras],
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "identity": self.identity,
            "reference_photos": self.reference_photos,
            "threshold": self.threshold,
            "base_model": self.base_model,
            "generation": self.generation.to_dict(),
        }
        if self.notes:
            data["notes"] = self.notes
        return data


# --------------------------------------------------------------------------------------------------
# Prompt helpers (also used for trigger-word injection from LoRA metadata)


def join_prompt(*parts: str) -> str:
    return ", ".join(p.strip().strip(",").strip() for p in parts if p and p.strip().strip(","))


def inject_trigger_words(prompt: str, words: list[str]) -> str:
    """`prompt` with the trigger `words` it does not already contain put in front (case-insensitive,
    whole words), so injecting twice changes nothing."""
    missing = []
    for word in words:
        word = word.strip()
        if not word:
            continue
        pattern = r"(?<![\w])" + re.escape(word) + r"(?![\w])"
        if not re.search(pattern, prompt, flags=re.IGNORECASE) and word not in missing:
            missing.append(word)
    return join_prompt(", ".join(missing), prompt)


# --------------------------------------------------------------------------------------------------
# Validation


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP_KEYS = {
    "name",
    "display_name",
    "trigger_words",
    "loras",
    "prompt",
    "negative_prompt",
    "identity",
    "reference_photos",
    "threshold",
    "base_model",
    "generation",
    "notes",
}
_GEN_KEYS = {"steps", "cfg", "width", "height", "sampler", "scheduler", "seed", "guidance", "shift"}


def safe_name(name: str) -> str:
    """A character name usable as a file name; raises `CharacterError` for anything else."""
    name = str(name).strip()
    if name.lower().endswith(SUFFIXES):
        name = name.rsplit(".", 1)[0]
    if not _NAME.match(name):
        raise CharacterError(
            f"{short_repr(name)} is not a usable character name: use letters, digits, '-', '_' or '.', "
            "starting with a letter or digit",
            field="name",
        )
    return name


def _number(value, kind, path, key, low, high):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise CharacterError(
            f"must be {'an integer' if kind is int else 'a number'} in {low}..{high}, "
            f"got {short_repr(value)}",
            path,
            key,
        )
    if not low <= value <= high:
        raise CharacterError(f"must be in {low}..{high}, got {short_repr(value)}", path, key)
    return kind(value)


def _text(value, path, key) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CharacterError(f"must be text, got {type(value).__name__} {short_repr(value)}", path, key)
    return value


def validate_character(data: Any, name: str, path: str | os.PathLike | None = None) -> Character:
    """Build a `Character` from parsed YAML, raising `CharacterError` naming the file and field."""
    if not isinstance(data, dict):
        raise CharacterError(f"a character file holds a mapping of fields, got {type(data).__name__}", path)
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        raise CharacterError(
            f"unknown field(s) {short_repr(unknown)}; known: {sorted(_TOP_KEYS)}", path, unknown[0]
        )
    triggers = data.get("trigger_words") or []
    if isinstance(triggers, str):
        triggers = [w.strip() for w in triggers.split(",") if w.strip()]
    if not isinstance(triggers, list) or not all(isinstance(w, str) and w.strip() for w in triggers):
        raise CharacterError(f"must be a list of words, got {short_repr(triggers)}", path, "trigger_words")
    loras = []
    raw_loras = data.get("loras") or []
    if not isinstance(raw_loras, list):
        raise CharacterError(
            f"must be a list of {{name, weight}}, got {short_repr(raw_loras)}", path, "loras"
        )
    for index, item in enumerate(raw_loras):
        key = f"loras[{index}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise CharacterError(
                f"must be a file name or {{name, weight, clip_weight}}, got {short_repr(item)}", path, key
            )
        extra = sorted(set(item) - {"name", "weight", "clip_weight"})
        if extra:
            raise CharacterError(f"unknown field(s) {short_repr(extra)}", path, key)
        lora_name = _text(item.get("name"), path, f"{key}.name").strip()
        if not lora_name:
            raise CharacterError("needs the LoRA's file name", path, f"{key}.name")
        weight = _number(item.get("weight", 1.0), float, path, f"{key}.weight", -10.0, 10.0)
        clip = item.get("clip_weight")
        clip = None if clip is None else _number(clip, float, path, f"{key}.clip_weight", -10.0, 10.0)
        loras.append(CharacterLora(lora_name, weight, clip))
    gen_data = data.get("generation") or {}
    if not isinstance(gen_data, dict):
        raise CharacterError(
            f"must be a mapping ({sorted(_GEN_KEYS)}), got {short_repr(gen_data)}", path, "generation"
        )
    unknown = sorted(set(map(str, gen_data)) - _GEN_KEYS)
    if unknown:
        raise CharacterError(
            f"unknown field(s) {short_repr(unknown)}; known: {sorted(_GEN_KEYS)}",
            path,
            f"generation.{unknown[0][:40]}",
        )
    defaults = GenerationParams()
    gen = GenerationParams(
        steps=_number(gen_data.get("steps", defaults.steps), int, path, "generation.steps", 1, 10000),
        cfg=_number(gen_data.get("cfg", defaults.cfg), float, path, "generation.cfg", 0.0, 100.0),
        width=_number(gen_data.get("width", defaults.width), int, path, "generation.width", 16, 16384),
        height=_number(gen_data.get("height", defaults.height), int, path, "generation.height", 16, 16384),
        sampler=_text(gen_data.get("sampler", defaults.sampler), path, "generation.sampler")
        or defaults.sampler,
        scheduler=_text(gen_data.get("scheduler", defaults.scheduler), path, "generation.scheduler")
        or defaults.scheduler,
        seed=None
        if gen_data.get("seed") is None
        else _number(gen_data["seed"], int, path, "generation.seed", 0, 2**64 - 1),
        guidance=_number(
            gen_data.get("guidance", defaults.guidance), float, path, "generation.guidance", 0.0, 100.0
        ),
        shift=_number(gen_data.get("shift", defaults.shift), float, path, "generation.shift", 0.0, 100.0),
    )
    for key in ("width", "height"):
        if getattr(gen, key) % 8:
            raise CharacterError(
                f"must be a multiple of 8 (latents are 1/8 size), got {getattr(gen, key)}",
                path,
                f"generation.{key}",
            )
    base_model = _text(data.get("base_model"), path, "base_model").strip().lower()
    if base_model not in BASE_MODELS:
        raise CharacterError(
            f"must be one of {', '.join(b for b in BASE_MODELS if b)} (or empty), got {short_repr(base_model)}",
            path,
            "base_model",
        )
    threshold = _number(data.get("threshold", 0.0) or 0.0, float, path, "threshold", 0.0, 1.0)
    display = _text(data.get("display_name"), path, "display_name").strip()
    return Character(
        name=name,
        display_name=display or name,
        trigger_words=[w.strip() for w in triggers],
        loras=loras,
        prompt=_text(data.get("prompt"), path, "prompt").strip(),
        negative_prompt=_text(data.get("negative_prompt"), path, "negative_prompt").strip(),
        identity=_text(data.get("identity"), path, "identity").strip(),
        reference_photos=_text(data.get("reference_photos"), path, "reference_photos").strip(),
        threshold=threshold,
        base_model=base_model,
        generation=gen,
        notes=_text(data.get("notes"), path, "notes"),
        path=str(path) if path else None,
    )
