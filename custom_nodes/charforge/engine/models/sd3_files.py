"""SD3 / SD3.5 model files: which model a file holds, its parts, and the diffusers modules built from them.

ComfyUI users keep an SD3-family model one of three ways, and all three load here without a network:

- one **single-file checkpoint** (``checkpoints`` folder) with the MMDiT under ``model.diffusion_model.``
  (ComfyUI / Stability layout: ``joint_blocks.N.x_block.attn.qkv`` ...), the VAE under ``first_stage_model.``
  and, in the "incl_clips" files, the text encoders under ``text_encoders.clip_l.transformer.``,
  ``text_encoders.clip_g.transformer.`` and ``text_encoders.t5xxl.transformer.`` (Hugging Face names);
- **separate files**: the MMDiT alone (``diffusion_models`` folder, no prefix), ``clip_l`` / ``clip_g`` /
  ``t5xxl`` (``text_encoders`` or ``clip`` folder; fp16 or fp8) and the VAE (diffusers or LDM names);
- a **diffusers folder** (read by diffusers itself, not here).

The variant is read from the tensors, never from a file name (`sd3_variant`):

==============  ======================  ========  ===============  =======================
variant         blocks x hidden         pos table  q/k norm         second image attention
==============  ======================  ========  ===============  =======================
``sd3-medium``  24 x 1536               192^2     none             none
``sd35-medium`` 24 x 1536               384^2     RMSNorm          blocks 0-12 (``attn2``)
``sd35-large``  38 x 2432               192^2     RMSNorm          none
==============  ======================  ========  ===============  =======================

The structure (q/k norm, ``attn2``) decides the variant; sizes come from the shapes, so a shrunken test
model and a full one take the same path (`transformer_config`). The MMDiT is converted with diffusers' own
single-file converter; `transformer_to_comfy` is its inverse (what a ComfyUI file holds for a diffusers
``SD3Transformer2DModel``), used to write single files.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ...deps import require
from ..library.flow_layouts import single_file_state
from .tensor_files import unscale_fp8

log = logging.getLogger(__name__)

VARIANTS = ("sd3-medium", "sd35-medium", "sd35-large")

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
ENCODER_PREFIXES = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
ENCODERS = tuple(ENCODER_PREFIXES)
TRIGGER = "joint_blocks.0.context_block.attn.qkv.weight"
HEAD_DIM = 64  # every released SD3 model; without q/k norm weights the tensors do not say it

Shapes = Mapping[str, tuple[int, ...]]
StateDict = dict[str, torch.Tensor]

_JOINT_BLOCK = re.compile(r"joint_blocks\.(\d+)\.")


class NotSD3Error(ValueError):
    """A file is not an SD3-family model (or part of one); the message says what was found."""


# --------------------------------------------------------------------------------------------------
# Reading files


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------
# What a file holds


def transformer_prefix(shapes: Shapes) -> str | None:
    """``"model.diffusion_model."`` for a checkpoint, ``""`` for a bare MMDiT file, None if there is none."""
    if TRANSFORMER_PREFIX + TRIGGER in shapes:
        return TRANSFORMER_PREFIX
    if TRIGGER in shapes:
        return ""
    return None


def is_sd3(shapes: Shapes) -> bool:
    """Whether the tensors hold an SD3-family MMDiT (ComfyUI's trigger: the first joint block's context qkv)."""
    return transformer_prefix(shapes) is not None


def encoders_in(shapes: Shapes) -> list[str]:
    """Which of ``clip_l``, ``clip_g``, ``t5xxl`` a single file carries (by their final weights)."""
    found = []
    for name, prefix in ENCODER_PREFIXES.items():
        probe = "shared.weight" if name == "t5xxl" else "text_model.final_layer_norm.weight"
        if prefix + probe in shapes:
            found.append(name)
    return found


def has_vae(shapes: Shapes) -> bool:
    return any(k.startswith(VAE_PREFIX) for k in shapes)


def _mmdit(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    prefix = transformer_prefix(shapes)
    if prefix is None:
        raise NotSD3Error(
            f"no SD3 MMDiT in these tensors: '{TRIGGER}' is missing (first names: {sorted(shapes)[:5]})"
        )
    return strip_prefix(shapes, prefix) if prefix else dict(shapes)


def _blocks(mmdit: Shapes) -> list[int]:
    return sorted({int(m.group(1)) for k in mmdit if (m := _JOINT_BLOCK.match(k))})


def sd3_variant(shapes: Shapes) -> str:
    """``sd3-medium``, ``sd35-medium`` or ``sd35-large`` from the MMDiT's tensors (see the module table)."""
    mmdit = _mmdit(shapes)
    dual = any(".x_block.attn2." in k for k in mmdit)
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in mmdit
    if dual:
        return "sd35-medium"
    return "sd35-large" if qk_norm else "sd3-medium"


def transformer_config(shapes: Shapes) -> dict[str, Any]:
    """``SD3Transformer2DModel`` arguments read from the MMDiT's tensor shapes (with or without prefix)."""
    mmdit = _mmdit(shapes)
    blocks = _blocks(mmdit)
    if blocks != list(range(len(blocks))):
        raise NotSD3Error(f"the MMDiT's joint blocks are not numbered 0..N-1: {blocks}")
    hidden, in_channels, patch, _ = mmdit["x_embedder.proj.weight"]
    ln_q = mmdit.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = int(ln_q[0]) if ln_q else HEAD_DIM
    if hidden % head_dim:
        raise NotSD3Error(f"hidden size {hidden} is not a multiple of the head size {head_dim}")
    qk_norm = None
    if ln_q:
        qk_norm = "layer_norm" if "joint_blocks.0.x_block.attn.ln_q.bias" in mmdit else "rms_norm"
    caption_dim, joint_dim = mmdit["context_embedder.weight"]
    positions = mmdit["pos_embed"][1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise NotSD3Error(f"pos_embed has {positions} positions, not a square table")
    dual = sorted({int(m.group(1)) for k in mmdit if (m := _JOINT_BLOCK.match(k)) and ".x_block.attn2." in k})
    return {
        "sample_size": 128,
        "patch_size": int(patch),
        "in_channels": int(in_channels),
        "out_channels": int(mmdit["final_layer.linear.weight"][0]) // (patch * patch),
        "num_layers": len(blocks),
        "attention_head_dim": head_dim,
        "num_attention_heads": int(hidden) // head_dim,
        "joint_attention_dim": int(joint_dim),
        "caption_projection_dim": int(caption_dim),
        "pooled_projection_dim": int(mmdit["y_embedder.mlp.0.weight"][1]),
        "pos_embed_max_size": side,
        "qk_norm": qk_norm,
        "dual_attention_layers": tuple(dual),
    }


# --------------------------------------------------------------------------------------------------
# diffusers <-> ComfyUI names of the MMDiT


def transformer_to_comfy(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A diffusers ``SD3Transformer2DModel`` state dict in ComfyUI's MMDiT names (no prefix): q/k/v fused
    into ``qkv``, the final and pre-only adaLN halves swapped (the library's key layouts, `flow_layouts`)."""
    return single_file_state("sd3", state)


def transformer_to_diffusers(mmdit: Mapping[str, torch.Tensor]) -> StateDict:
    """ComfyUI's MMDiT tensors (no prefix) in diffusers names, by diffusers' own single-file converter."""
    require("diffusers")
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit))  # it empties the dict it is given


# --------------------------------------------------------------------------------------------------
# Building diffusers / transformers modules


def _empty(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module without allocating its parameters (they are assigned from the file next)."""
    require("accelerate")
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _assign(module: torch.nn.Module, state: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str):
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(cast, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{what}: the file does not fit the model ({len(missing)} missing, e.g. {sorted(missing)[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {sorted(unexpected)[:3]})"
        )
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"{what}: no weights for {leftover[:3]}")
    return module.eval().requires_grad_(False)


def build_transformer(mmdit: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """A diffusers ``SD3Transformer2DModel`` from ComfyUI MMDiT tensors (prefix already removed)."""
    require("diffusers")
    from diffusers import SD3Transformer2DModel

    config = transformer_config({k: tuple(v.shape) for k, v in mmdit.items()})
    model = _empty(lambda: SD3Transformer2DModel(**config))
    return _assign(model, transformer_to_diffusers(mmdit), dtype, "SD3 transformer")


def build_vae(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], dtype: torch.dtype = torch.float32
):
    """An ``AutoencoderKL`` from VAE tensors in diffusers names or LDM names (``encoder.down.0...``)."""
    require("diffusers")
    from diffusers import AutoencoderKL

    state = dict(state)
    if any(k.startswith("encoder.down.") for k in state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, dict(config))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = _empty(lambda: AutoencoderKL(**config))
    return _assign(model, state, dtype, "SD3 VAE")


def _open_clip_prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    """The prefix of an OpenCLIP-layout text encoder (``transformer.resblocks...``), None for Hugging Face names."""
    for prefix in ("", "model.", "transformer."):
        if prefix + "transformer.resblocks.0.ln_1.weight" in state:
            return prefix
    return None


def _clip_state(state: Mapping[str, torch.Tensor], config: Any) -> StateDict:
    """CLIP text tensors in Hugging Face names under ``text_model.`` (files with or without that prefix, or in
    OpenCLIP's layout as bigG is sometimes stored: converted by diffusers), position ids dropped."""
    prefix = _open_clip_prefix(state)
    if prefix is not None:
        from types import SimpleNamespace

        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        state = convert_open_clip_checkpoint(SimpleNamespace(config=config), dict(state), prefix)
    out: StateDict = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            key = "text_model." + key
        out[key] = tensor
    return out


def build_clip(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    name: str = "CLIP",
):
    """A ``CLIPTextModelWithProjection`` from Hugging Face-named (or OpenCLIP-named) tensors.

    A file without ``text_projection.weight`` (CLIP-L files made for Flux have none) gets the identity,
    so its pooled output is the un-projected one, which is what ComfyUI feeds SD3 from CLIP-L anyway.
    """
    require("transformers")
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    state = _clip_state(state, text_config)
    if "text_projection.weight" not in state:
        if text_config.projection_dim != text_config.hidden_size:
            raise ValueError(
                f"{name}: the file has no text_projection and the config projects to another size"
            )
        log.warning("%s has no text projection: using the identity (the un-projected pooled output)", name)
        state["text_projection.weight"] = torch.eye(text_config.hidden_size)
    model = _empty(lambda: CLIPTextModelWithProjection(text_config))
    model = _assign(model, state, dtype, name)
    embeddings = model.text_model.embeddings
    if getattr(embeddings, "position_ids", None) is not None and embeddings.position_ids.is_meta:
        embeddings.position_ids = torch.arange(text_config.max_position_embeddings)[None]
    return model


def _t5_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    """T5 encoder tensors with scaled-fp8 files unscaled (``weight * scale_weight``) and the embedding tied."""
    out = unscale_fp8(state)
    if "shared.weight" not in out and "encoder.embed_tokens.weight" in out:
        out["shared.weight"] = out["encoder.embed_tokens.weight"]
    out.setdefault("encoder.embed_tokens.weight", out.get("shared.weight", torch.empty(0)))
    return out


def build_t5(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], dtype: torch.dtype = torch.float32
):
    """A ``T5EncoderModel`` from T5-XXL encoder tensors (fp16, bf16, fp8 or scaled-fp8 files)."""
    require("transformers")
    from transformers import T5Config, T5EncoderModel

    t5_config = T5Config(**{k: v for k, v in config.items() if not k.startswith("_")})
    model = _empty(lambda: T5EncoderModel(t5_config))
    model = _assign(model, _t5_state(state), dtype, "T5-XXL")
    model.tie_weights()
    return model


# --------------------------------------------------------------------------------------------------
# Writing a single file (tests, tools)


def write_single_file(
    path: str | os.PathLike,
    transformer_state: Mapping[str, torch.Tensor],
    *,
    vae_ldm: Mapping[str, torch.Tensor] | None = None,
    encoders: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    bare: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a diffusers SD3 transformer (plus an LDM-named VAE and HF-named text encoders) as ComfyUI does.

    ``bare`` writes the MMDiT alone without prefix (a ``diffusion_models`` file); ``encoders`` maps
    ``clip_l`` / ``clip_g`` / ``t5xxl`` to their state dicts.
    """
    require("safetensors")
    from safetensors.torch import save_file

    out = {
        ("" if bare else TRANSFORMER_PREFIX) + k: v
        for k, v in transformer_to_comfy(transformer_state).items()
    }
    for key, tensor in (vae_ldm or {}).items():
        out[VAE_PREFIX + key] = tensor
    for name, state in (encoders or {}).items():
        prefix = ENCODER_PREFIXES[name]
        for key, tensor in state.items():
            # T5's embedding is stored once, as ``shared`` (its ``encoder.embed_tokens`` is the same tensor).
            if not key.endswith("position_ids") and key != "encoder.embed_tokens.weight":
                out[prefix + key] = tensor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata=dict(metadata or {}) or None)
    return path
