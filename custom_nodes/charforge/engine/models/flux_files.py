"""Flux.1 transformer weights: the BFL / ComfyUI single-file layout <-> diffusers' ``FluxTransformer2DModel``.

The files people have in ComfyUI's ``diffusion_models`` (or ``unet``) folder use Black Forest Labs' names
(``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``, ...), with or without the
``model.diffusion_model.`` prefix a full checkpoint puts in front. diffusers splits the fused layers:

=======================================  ==========================================================
BFL name                                 diffusers name(s)
=======================================  ==========================================================
``img_in`` / ``txt_in``                  ``x_embedder`` / ``context_embedder``
``time_in`` / ``vector_in`` /            ``time_text_embed.timestep_embedder`` / ``.text_embedder`` /
``guidance_in`` (``in_layer``,           ``.guidance_embedder`` (``linear_1``, ``linear_2``)
``out_layer``)
``double_blocks.N.img_mod.lin``          ``transformer_blocks.N.norm1.linear`` (``txt_mod``: ``norm1_context``)
``double_blocks.N.img_attn.qkv``         ``attn.to_q`` / ``to_k`` / ``to_v``: rows split in three equal parts
``double_blocks.N.txt_attn.qkv``         ``attn.add_q_proj`` / ``add_k_proj`` / ``add_v_proj``
``..img_attn.proj`` / ``txt_attn.proj``  ``attn.to_out.0`` / ``attn.to_add_out``
``..img_mlp.0`` / ``.2`` (``txt_mlp``)   ``ff.net.0.proj`` / ``ff.net.2`` (``ff_context``)
``..{img,txt}_attn.norm.{query,key}      ``attn.norm_q`` / ``norm_k`` (``norm_added_q`` / ``norm_added_k``),
_norm.scale``                            as ``.weight``
``single_blocks.N.linear1``              ``attn.to_q`` / ``to_k`` / ``to_v`` (hidden rows each) + ``proj_mlp``
``single_blocks.N.linear2`` /            ``proj_out`` / ``norm.linear``
``modulation.lin``
``final_layer.linear``                   ``proj_out``
``final_layer.adaLN_modulation.1``       ``norm_out.linear`` with its two halves swapped (BFL: shift, scale;
                                         diffusers: scale, shift)
=======================================  ==========================================================

The model's shape is read from the tensors (`flux_config`): depth from the block indices, width from
``img_in``, head size from the q/k norm scale, guidance from ``guidance_in``. So a full Flux.1 file and a
shrunken test model go through the same code. Values are never changed, only renamed, split or joined.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

PREFIX = "model.diffusion_model."
TRIGGER = "double_blocks.0.img_attn.norm.key_norm.scale"  # what ComfyUI detects Flux by (with img_in)

# BFL top-level stem -> diffusers stem (weight and bias).
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}

# Per double block: BFL stem -> diffusers stems (several = the rows split in equal parts).
_DOUBLE = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
# single_blocks.N.linear1: q, k, v (hidden rows each) then the MLP input (the rest).
_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")

_BLOCK = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")


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


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL / ComfyUI Flux transformer state (with or without the checkpoint prefix) in diffusers' names.

    Raises `FluxLayoutError` when a tensor has no place in the diffusers model (another architecture).
    """
    state = strip_prefix(state)
    if not is_bfl_flux(state):
        raise FluxLayoutError(f"not a Flux.1 transformer: no {TRIGGER!r} / 'img_in.weight'")
    hidden = state["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        stem, _, leaf = key.rpartition(".")
        if stem in _TOP:
            out[f"{_TOP[stem]}.{leaf}"] = value
            continue
        if stem in _SWAPPED:
            out[f"{_SWAPPED[stem]}.{leaf}"] = _swap_halves(value)
            continue
        match = _BLOCK.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        kind, index, rest = match.groups()
        block = f"{'transformer_blocks' if kind == 'double_blocks' else 'single_transformer_blocks'}.{index}"
        norms = _DOUBLE_NORMS if kind == "double_blocks" else _SINGLE_NORMS
        if rest in norms:
            out[f"{block}.{norms[rest]}"] = value
            continue
        stem, _, leaf = rest.rpartition(".")
        table = _DOUBLE if kind == "double_blocks" else _SINGLE
        if stem in table:
            names = table[stem]
            parts = value.chunk(len(names), dim=0) if len(names) > 1 else (value,)
        elif kind == "single_blocks" and stem == "linear1":
            names = _LINEAR1
            parts = value.split([hidden, hidden, hidden, value.shape[0] - 3 * hidden], dim=0)
        else:
            unknown.append(key)
            continue
        for name, part in zip(names, parts, strict=True):
            out[f"{block}.{name}.{leaf}"] = part.contiguous()
    if unknown:
        raise FluxLayoutError(
            f"{len(unknown)} tensor(s) of this file have no place in a Flux.1 transformer "
            f"(e.g. {sorted(unknown)[:3]}): a Flux variant this trainer does not know"
        )
    return out


def diffusers_to_bfl(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of `bfl_to_diffusers`: a diffusers Flux transformer state in BFL names (+ `prefix`)."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        return state.pop(name)

    for bfl, diff in _TOP.items():
        for leaf in ("weight", "bias"):
            if f"{diff}.{leaf}" in state:
                out[f"{bfl}.{leaf}"] = take(f"{diff}.{leaf}")
    for bfl, diff in _SWAPPED.items():
        for leaf in ("weight", "bias"):
            if f"{diff}.{leaf}" in state:
                out[f"{bfl}.{leaf}"] = _swap_halves(take(f"{diff}.{leaf}"))
    doubles = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    singles = sorted({int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")})
    for index in doubles:
        block = f"transformer_blocks.{index}"
        for bfl, names in _DOUBLE.items():
            for leaf in ("weight", "bias"):
                out[f"double_blocks.{index}.{bfl}.{leaf}"] = torch.cat(
                    [take(f"{block}.{n}.{leaf}") for n in names], dim=0
                )
        for bfl, diff in _DOUBLE_NORMS.items():
            out[f"double_blocks.{index}.{bfl}"] = take(f"{block}.{diff}")
    for index in singles:
        block = f"single_transformer_blocks.{index}"
        for bfl, names in {**_SINGLE, "linear1": _LINEAR1}.items():
            for leaf in ("weight", "bias"):
                out[f"single_blocks.{index}.{bfl}.{leaf}"] = torch.cat(
                    [take(f"{block}.{n}.{leaf}") for n in names], dim=0
                )
        for bfl, diff in _SINGLE_NORMS.items():
            out[f"single_blocks.{index}.{bfl}"] = take(f"{block}.{diff}")
    if state:
        raise FluxLayoutError(f"{len(state)} diffusers tensor(s) not converted (e.g. {sorted(state)[:3]})")
    return {prefix + k: v for k, v in out.items()}
