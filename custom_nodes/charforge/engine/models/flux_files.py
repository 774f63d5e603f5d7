"""Flux.1 transformer weights: the BFL / ComfyUI single-file layout <-> diffusers' ``FluxTransformer2DModel``.

The files people have in ComfyUI's ``diffusion_models`` (or ``unet``) folder use Black Forest Labs' names
(``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``, ...), with or without the
``model.diffusion_model.`` prefix a full checkpoint puts in front. diffusers splits the fused layers. The
name table between the two (fused rows, swapped halves, norms) is the library's Flux layout
(``engine/library/flow_layouts.py``, the one home of the Flux and SD3 key layouts); this module adds what the
trainer's file reader needs around it: the prefix, recognising either layout, and the model's config.

The model's shape is read from the tensors (`flux_config`): depth from the block indices, width from
``img_in``, head size from the q/k norm scale, guidance from ``guidance_in``. So a full Flux.1 file and a
shrunken test model go through the same code. Values are never changed, only renamed, split or joined.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..library import flow_layouts

PREFIX = "model.diffusion_model."
TRIGGER = "double_blocks.0.img_attn.norm.key_norm.scale"  # what ComfyUI detects Flux by (with img_in)


class FluxLayoutError(ValueError):
    """The tensors are not a Flux.1 transformer in either layout; the message names what is missing."""


def strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's tensors without ``model.diffusion_model.`` (a full checkpoint's other parts dropped)."""
    if any(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    return dict(state)


def is_bfl_flux(keys) -> bool:
    """Whether these (prefix-free) names are a Flux.1 transformer in the BFL layout (ComfyUI's test)."""
    keys = set(keys)
    return TRIGGER in keys and "img_in.weight" in keys


def is_diffusers_flux(keys) -> bool:
    """Whether these names are a Flux.1 transformer saved with diffusers' names (a single-file export)."""
    keys = set(keys)
    return "x_embedder.weight" in keys and "single_transformer_blocks.0.proj_mlp.weight" in keys


def _count(keys, pattern: str) -> int:
    """Blocks counted from 0 up to the first missing index (as ComfyUI counts them)."""
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    count = 0
    while count in indices:
        count += 1
    return count


def flux_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The diffusers ``FluxTransformer2DModel`` config of a BFL-layout transformer, from names and shapes.

    Rotary axes: Flux.1's (16, 56, 56) for its 128-wide heads; other head sizes (test models) keep the
    same proportions (1/8, 7/16, 7/16), rounded to even sizes.
    """
    shapes = strip_prefix(shapes)
    if not is_bfl_flux(shapes):
        raise FluxLayoutError(f"not a Flux.1 transformer: no {TRIGGER!r} / 'img_in.weight'")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes[TRIGGER][0]
    if head_dim == 128:
        axes = (16, 56, 56)
    else:
        first = max(2, (head_dim // 8) // 2 * 2)
        rest = (head_dim - first) // 2 // 2 * 2
        axes = (head_dim - 2 * rest, rest, rest)
    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": None,
        "num_layers": _count(shapes, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(shapes, r"single_blocks\.(\d+)\."),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden // head_dim),
        "joint_attention_dim": int(shapes["txt_in.weight"][1]),
        "pooled_projection_dim": int(shapes["vector_in.in_layer.weight"][1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": axes,
    }


def bfl_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL / ComfyUI Flux transformer state (with or without the checkpoint prefix) in diffusers' names.

    Raises `FluxLayoutError` when a tensor has no place in the diffusers model (another architecture).
    """
    state = strip_prefix(state)
    if not is_bfl_flux(state):
        raise FluxLayoutError(f"not a Flux.1 transformer: no {TRIGGER!r} / 'img_in.weight'")
    try:
        return flow_layouts.diffusers_state("flux", state)
    except flow_layouts.FlowLayoutError as error:
        raise FluxLayoutError(f"{error}: a Flux variant this trainer does not know") from error


def diffusers_to_bfl(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of `bfl_to_diffusers`: a diffusers Flux transformer state in BFL names (+ `prefix`)."""
    try:
        out = flow_layouts.single_file_state("flux", state)
    except flow_layouts.FlowLayoutError as error:
        raise FluxLayoutError(str(error)) from error
    return {prefix + k: v for k, v in out.items()}
