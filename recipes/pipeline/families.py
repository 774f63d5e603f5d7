"""The base model's family (SD1.5, SDXL, Flux.1 dev/schnell, SD3/SD3.5) and what the pipeline does per family.

The family is read from the base model's tensor names and shapes (the safetensors header of a file on this
machine; for a server elsewhere, the family the server reads from its own file and reports in the transfer
routes' model listing), never from the file's name. The architecture rules are the trainer's
(``charforge.engine.train.models.arch_from_keys``), so the pipeline and Train LoRA agree on what a file is.

Per family: where the base model lives (``checkpoints`` or ``diffusion_models``), the text encoders and VAE
the shipped workflows load beside it, the generation workflow (``<family>_best_of_n``) with the sampling
defaults of the character-preset schema (``family_generation``), the dataset buckets and the training preset.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charforge.common.characters import FLUX_FAMILIES, SD3_FAMILIES

from .options import PipelineError

SD_FAMILIES = ("sd15", "sdxl")
FAMILY_NAMES = {
    "sd15": "SD1.5",
    "sdxl": "SDXL",
    "flux-dev": "FLUX.1-dev",
    "flux-schnell": "FLUX.1-schnell",
    "sd3-medium": "SD3 Medium",
    "sd35-medium": "SD3.5 Medium",
    "sd35-large": "SD3.5 Large",
}
SUPPORTED = ", ".join(FAMILY_NAMES.values())
# The shipped generation workflow per group of families (workflows/api/<name>.json).
IMAGES_WORKFLOW = {"flux": "flux_best_of_n", "sd3": "sd35_best_of_n"}
# The largest safetensors header read (a checkpoint's header is well under a megabyte per thousand tensors).
MAX_HEADER = 100_000_000


def group(family: str) -> str:
    """``sd`` (SD1.5/SDXL: U-Net, CheckpointLoaderSimple, AnimateDiff), ``flux`` or ``sd3``."""
    if family in FLUX_FAMILIES:
        return "flux"
    if family in SD3_FAMILIES:
        return "sd3"
    return "sd"


def header_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from a ``.safetensors`` file's header (no tensor is read, no torch); None when the
    file is not a readable safetensors file."""
    if path.suffix.lower() not in (".safetensors", ".sft") or not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < MAX_HEADER:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return {
        name: tuple(entry.get("shape") or ())
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict)
    }


def _looks_like_flow(shapes: dict[str, tuple[int, ...]]) -> bool:
    return any(".double_blocks." in f".{k}" or ".joint_blocks." in f".{k}" for k in shapes)


def family_from_shapes(shapes: dict[str, tuple[int, ...]], name: str) -> str:
    """The family id of a base model from its tensor names and shapes; a clear refusal for anything else.

    SD1.5/SDXL files are recognised by their text encoders alone, as the pipeline always has (a file whose VAE
    was stripped still renders with one from elsewhere); Flux, SD3/SD3.5 and the refusals are the trainer's
    (``arch_from_keys``)."""
    if not _looks_like_flow(shapes):
        if any(k.startswith("conditioner.embedders.1.") for k in shapes):
            return "sdxl"
        if any(k.startswith("cond_stage_model.transformer.") for k in shapes) or (
            any(k.startswith("model.diffusion_model.input_blocks.") for k in shapes)
            and not any(k.startswith("cond_stage_model.model.") for k in shapes)
        ):
            return "sd15"
    from charforge.engine.train.models import UnsupportedModelError, arch_from_keys

    try:
        family = arch_from_keys(shapes)
    except UnsupportedModelError as exc:
        raise PipelineError(
            f"base model {name!r} is not a model the pipeline can use: {exc} (supported: {SUPPORTED})"
        ) from None
    if family not in FAMILY_NAMES:
        raise PipelineError(f"base model {name!r} is a {family} model; the pipeline supports {SUPPORTED}")
    return family


def family_from_name(name: str) -> str:
    """Last resort for a file whose tensors cannot be read here or on the server (an old CharForge there):
    SD1.5 or SDXL by the name, as the pipeline did before it read tensors."""
    return "sdxl" if re.search(r"xl", name, re.IGNORECASE) else "sd15"


# ------------------------------------------------------------------------------------------------------------
# The files beside the base model


@dataclass
class FamilyFiles:
    """The text encoders (loader input name -> file) and VAE the family's workflows load beside the model."""

    text_encoders: dict[str, str]
    vae: str | None = None


_ENCODER_ROLES = {
    "flux": (("clip_name1", "clip_l"), ("clip_name2", "t5xxl")),
    "sd3": (("clip_name1", "clip_l"), ("clip_name2", "clip_g"), ("clip_name3", "t5xxl")),
}
# Train LoRA's label for a file of models/diffusion_models in its base_model list (nodes/train.py).
DIFFUSION_MODEL_LABEL = "[diffusion model] "


def encoders_by_role(family: str, text_encoders: dict[str, str]) -> dict[str, str]:
    """The chosen text encoders keyed by role (``clip_l``, ``clip_g``, ``t5xxl``: Train LoRA's part inputs)
    instead of by the loader's socket (``clip_name1`` ...)."""
    return {
        role: text_encoders[socket]
        for socket, role in _ENCODER_ROLES[group(family)]
        if socket in text_encoders
    }


_ROLE_HINTS = {
    "clip_l": r"clip[_-]?l\b|clip[_-]?l[_.]",
    "clip_g": r"clip[_-]?g\b|clip[_-]?g[_.]",
    "t5xxl": r"t5",
}


def encoder_role(shapes: dict[str, tuple[int, ...]] | None, name: str) -> str | None:
    """``clip_l``, ``clip_g`` or ``t5xxl`` for a text-encoder file: from its tensors when readable (a T5 encoder
    has ``encoder.block.N`` layers; CLIP-G has 32 layers of width 1280, CLIP-L 12 of width 768), else its name."""
    if shapes:
        keys = {k.split("transformer.", 1)[-1] for k in shapes}
        if any(k.startswith("encoder.block.") for k in keys):
            return "t5xxl"
        if "text_model.encoder.layers.30.mlp.fc1.weight" in keys:
            return "clip_g"
        fc1 = next(
            (v for k, v in shapes.items() if k.endswith("text_model.encoder.layers.0.mlp.fc1.weight")), None
        )
        width = fc1[-1] if fc1 else None
        if width in (768, 1280):  # else a model of another width: its name decides
            return "clip_l" if width == 768 else "clip_g"
    lowered = Path(name).name.lower()
    for role, pattern in _ROLE_HINTS.items():
        if re.search(pattern, lowered):
            return role
    return None


def choose_family_files(
    family: str,
    encoders: list[str],
    vaes: list[str],
    shapes_of: Any = lambda kind, name: None,
    base_has_vae: bool = True,
) -> FamilyFiles:
    """The text encoders and VAE for `family` among the server's files (`encoders`: the text_encoders /
    clip folders, `vaes`: the vae folder); `shapes_of(kind, name)` reads a file's header when it is local.
    Refuses naming the files to put in place."""
    kind = group(family)
    by_role: dict[str, str] = {}
    for name in encoders:
        role = encoder_role(shapes_of("text_encoders", name), name)
        if role and role not in by_role:
            by_role[role] = name
    chosen: dict[str, str] = {}
    missing = []
    for socket, role in _ENCODER_ROLES[kind]:
        if role in by_role:
            chosen[socket] = by_role[role]
        else:
            missing.append(role)
    if missing:
        examples = {
            "clip_l": "clip_l.safetensors",
            "clip_g": "clip_g.safetensors",
            "t5xxl": "t5xxl_fp16.safetensors",
        }
        raise PipelineError(
            f"a {FAMILY_NAMES[family]} base model needs its text encoders in ComfyUI's models/text_encoders (or "
            f"models/clip): {', '.join(examples[r] for r in missing)} missing (the server has: "
            f"{', '.join(encoders) or 'none'})"
        )
    vae = None
    if kind == "flux":
        vae = next((v for v in vaes if _flux_vae(shapes_of("vae", v), v)), None)
        if vae is None:
            raise PipelineError(
                "a FLUX.1 base model needs its autoencoder in ComfyUI's models/vae: ae.safetensors (the server "
                f"has: {', '.join(v for v in vaes if v != 'pixel_space') or 'none'})"
            )
    elif not base_has_vae:
        raise PipelineError(
            f"the {FAMILY_NAMES[family]} file holds no VAE: put the full checkpoint (with its VAE, as "
            "sd3.5_large.safetensors is published) into models/checkpoints"
        )
    return FamilyFiles(chosen, vae)


def _flux_vae(shapes: dict[str, tuple[int, ...]] | None, name: str) -> bool:
    """A 16-channel autoencoder (FLUX.1's ae): its decoder's first conv takes 16 channels; by name when the
    file is not local."""
    if shapes:
        conv = shapes.get("decoder.conv_in.weight") or shapes.get("vae.decoder.conv_in.weight") or ()
        return len(conv) == 4 and conv[1] == 16
    lowered = Path(name).name.lower()
    return lowered.startswith("ae.") or "flux" in lowered
