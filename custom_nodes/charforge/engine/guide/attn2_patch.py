"""IP-Adapter in ComfyUI's cross-attention replacement calling convention, without importing ComfyUI.

ComfyUI's U-Net calls an ``attn2`` replacement registered for a (block name, block number, transformer
index) as ``patch(q, k, v, extra_options)`` with the layer's projected query and text keys / values, and
passes the result through the layer's output projection. `IPAttn2Patch` is such a callable; the bridge
registers one per slot of `comfy_attn2_slots` (the file's layer order) with
``model_patcher.set_model_attn2_replace``. From ``extra_options`` it reads ``n_heads``, ``sigmas`` (the
start / end gate), ``cond_or_uncond`` (which batch chunks are the positive and negative prompt) and
``activations_shape`` (the layer's token grid, for masks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from .ipadapter import IPAdapter, IPLayer, IPTerm, cross_attention, mask_for_layer

__all__ = ["AdapterInput", "IPAttn2Patch", "comfy_attn2_slots"]


def comfy_attn2_slots(family: str) -> list[tuple[str, int, int]]:
    """ComfyUI's ``(block name, block number, transformer index)`` of each IP-Adapter layer, in the
    file's layer order (down blocks, up blocks, middle block)."""
    if family == "sd15":
        return (
            [("input", n, 0) for n in (1, 2, 4, 5, 7, 8)]
            + [("output", n, 0) for n in range(3, 12)]
            + [("middle", 0, 0)]
        )
    if family == "sdxl":
        return (
            [("input", n, t) for n in (4, 5) for t in range(2)]
            + [("input", n, t) for n in (7, 8) for t in range(10)]
            + [("output", n, t) for n in (0, 1, 2) for t in range(10)]
            + [("output", n, t) for n in (3, 4, 5) for t in range(2)]
            + [("middle", 0, t) for t in range(10)]
        )
    raise ValueError(f"IP-Adapter layer slots are known for sd15 and sdxl, not {family!r}")


@dataclass
class AdapterInput:
    """One adapter applied to the model: its image tokens for the positive and the negative prompt
    ([1 or B, T, cross]; the negative ones are the projection of a zero embedding or of an all-black
    image, as the adapter was trained), strength, the sigma range where it acts (``sigma_end <= σ <=
    sigma_start``) and an optional region mask [1 or B, H, W] (1 = acts)."""

    adapter: IPAdapter
    cond_tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    weight: float = 1.0
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    mask: torch.Tensor | None = None


class IPAttn2Patch:
    """The replacement for the ``layer``-th IP-Adapter layer (0-based, file order) of every adapter."""

    def __init__(self, inputs: Sequence[AdapterInput], layer: int) -> None:
        self.inputs, self.layer = list(inputs), layer

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: Mapping[str, Any]):
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas.reshape(-1)[0]) if isinstance(sigmas, torch.Tensor) else None
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        if q.shape[0] % len(chunks):
            raise ValueError(f"batch {q.shape[0]} does not split into {len(chunks)} cond/uncond chunks")
        per_chunk = q.shape[0] // len(chunks)
        terms = []
        for item in self.inputs:
            active = sigma is None or item.sigma_end <= sigma <= item.sigma_start
            if not active or item.weight == 0:
                continue
            tokens = torch.cat(
                [_fit(item.uncond_tokens if kind == 1 else item.cond_tokens, per_chunk) for kind in chunks]
            ).to(q.device)
            mask = None
            if item.mask is not None:
                height, width = _grid(extra_options, q.shape[1])
                grid = mask_for_layer(item.mask.to(q.device), height, width)
                mask = torch.cat([_fit(grid, per_chunk) for _ in chunks])
            terms.append(IPTerm(tokens, cast(IPLayer, item.adapter.layers[self.layer]), item.weight, mask))
        return cross_attention(q, k, v, int(extra_options["n_heads"]), terms)


def _fit(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """A [1, ...] tensor repeated to ``batch`` rows; one of ``batch`` rows as it is."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"tokens or mask for {tensor.shape[0]} images, but the batch has {batch} per prompt")


def _grid(extra_options: Mapping[str, Any], tokens: int) -> tuple[int, int]:
    """The layer's token grid: from ``activations_shape`` [B, C, h, w], else from the latent shape."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] == tokens:
        return int(shape[2]), int(shape[3])
    latent = extra_options.get("original_shape")
    if latent is None:
        raise ValueError("a masked IP-Adapter needs the layer's shape (activations_shape or original_shape)")
    factor = math.sqrt(latent[2] * latent[3] / tokens)
    height = max(1, round(latent[2] / factor))
    return height, tokens // height
