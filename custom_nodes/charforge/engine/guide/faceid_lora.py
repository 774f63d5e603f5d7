"""The LoRA that FaceID IP-Adapter files carry, as weight changes of named U-Net weights.

FaceID, FaceID-Plus and FaceID-Plus-v2 files hold, besides the image projection and the ``to_k_ip`` /
``to_v_ip`` pairs, rank-128 LoRA factors for the query, key, value and output projections of *every*
attention layer (``{i}.to_q_lora.down.weight`` / ``.up.weight`` ...). The index ``i`` counts the U-Net's
attention layers in diffusers' attention-processor order: per transformer block its self-attention
(``attn1``) then its cross-attention (``attn2``); the down blocks, then the up blocks, then the middle
block. `attention_layers` lists those layers for a diffusers ``UNet2DConditionModel`` config, and
`faceid_lora_weights` names each LoRA pair after the weight it changes, in diffusers names
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``) or in the original (LDM) layout
ComfyUI's U-Net uses (``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``, through
`charforge.engine.models.single_file.unet_module_names`). The weight changes by ``scale · up @ down``
(no alpha: the files are trained at alpha = rank).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import torch

from ..models.single_file import unet_module_names
from .ipadapter import IPAdapterLayoutError, LayerLoRA, LoRAPair

__all__ = ["attention_layers", "faceid_lora_weights", "family_unet_config"]

_CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
# The LoRA's factor name -> the projection it changes (diffusers names the output projection to_out.0).
_TARGET = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_CROSS_ATTENTION_BLOCKS = {"CrossAttnDownBlock2D", "CrossAttnUpBlock2D"}


def family_unet_config(family: str) -> dict:
    """The full-size diffusers U-Net config of ``"sd15"`` or ``"sdxl"`` (shipped with the pack)."""
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"the FaceID LoRA is mapped for sd15 and sdxl U-Nets, not {family!r}")
    return json.loads((_CONFIGS / family / "unet" / "config.json").read_text(encoding="utf-8"))


def _per_level(value, levels: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    values = list(value)
    if len(values) != levels or not all(isinstance(v, int) for v in values):
        raise ValueError(f"unet config: {name} {value!r} is not one number per level ({levels} levels)")
    return values


def attention_layers(unet_config: Mapping) -> list[str]:
    """Diffusers module paths of every attention layer of a ``UNet2DConditionModel`` with this config
    (``...transformer_blocks.0.attn1``), in the order of its ``attn_processors``."""
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    levels = len(down_types)
    layers = _per_level(unet_config.get("layers_per_block", 2), levels, "layers_per_block")
    depth = _per_level(
        unet_config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block"
    )
    up_depth = list(reversed(depth))
    if unet_config.get("reverse_transformer_layers_per_block") is not None:
        up_depth = _per_level(
            unet_config["reverse_transformer_layers_per_block"],
            levels,
            "reverse_transformer_layers_per_block",
        )

    def block(place: str, transformers: int) -> list[str]:
        return [
            f"{place}.transformer_blocks.{t}.{attn}"
            for t in range(transformers)
            for attn in ("attn1", "attn2")
        ]

    names: list[str] = []
    for level, kind in enumerate(down_types):
        if kind in _CROSS_ATTENTION_BLOCKS:
            for n in range(layers[level]):
                names += block(f"down_blocks.{level}.attentions.{n}", depth[level])
    for level, kind in enumerate(up_types):
        if kind in _CROSS_ATTENTION_BLOCKS:
            for n in range(list(reversed(layers))[level] + 1):
                names += block(f"up_blocks.{level}.attentions.{n}", up_depth[level])
    if (unet_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        names += block("mid_block.attentions.0", depth[-1])
    return names


def faceid_lora_weights(
    lora: Mapping[int, LayerLoRA], unet_config: Mapping, ldm: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{weight name: (up, down)}`` for a FaceID file's LoRA (``IPAdapter.lora``) on a U-Net of this
    config; the weight changes by ``scale · up @ down``. ``ldm``: names in the original layout (ComfyUI's
    ``diffusion_model`` keys without that prefix) instead of diffusers'. A LoRA whose attention layers
    are not exactly the U-Net's is refused."""
    layers = attention_layers(unet_config)
    indices = sorted(lora)
    if indices != list(range(len(layers))):
        shown = f"{indices[0]}..{indices[-1]}" if indices else "none"
        raise IPAdapterLayoutError(
            f"the FaceID LoRA has {len(indices)} attention layers (indices {shown}), but this U-Net has "
            f"{len(layers)} (0..{len(layers) - 1}): the IP-Adapter file is for another base model"
        )
    modules = unet_module_names(unet_config) if ldm else {}
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, name in enumerate(layers):
        if ldm:
            place, _, rest = name.partition(".transformer_blocks.")
            name = f"{modules[place]}.transformer_blocks.{rest}"
        for factor, pair in lora[index].named_children():
            pair = cast(LoRAPair, pair)
            weights[f"{name}.{_TARGET[factor]}.weight"] = (pair.up.weight.detach(), pair.down.weight.detach())
    return weights
