"""Write a trained flow-matching LoRA: the kohya layout (default) or the diffusers / peft layout.

The trainer's peft layers sit on diffusers' split modules (``attn.to_q``, ``attn.to_k``, ``proj_mlp`` ...).
The files go through the library's layout code (``engine.library.flow_layouts`` / ``flow_formats``, the one
home of these key layouts):

- ``kohya``: one module per single-file weight, ``lora_unet_double_blocks_0_img_attn_qkv`` ...; split
  LoRAs fused without changing their effect (downs stacked, ups block-diagonal, ``.alpha`` per module);
  the CLIP-L LoRA as ``lora_te1_...``. What ComfyUI's LoraLoader, Forge and kohya's tools read;
- ``peft``: ``transformer.<diffusers module>.lora_A.weight`` / ``lora_B.weight`` (alpha / rank folded into
  B), ``text_encoder.<...>``: what ``FluxPipeline.load_lora_weights`` writes itself.

Metadata: the SD trainer's ``ss_*`` / ``modelspec.*`` (`export.lora_metadata`) with the family's
``ss_base_model_version``, ``ss_network_module`` and ``modelspec.architecture`` (``flux-1-dev/lora`` ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...library.flow_formats import state_to_tensors
from ...library.flow_layouts import Factors, fuse_modules
from ...library.formats import LoraModule, LoraState, save_lora
from ..lora import LoraNetwork

LAYOUTS = ("kohya", "peft")


def flow_lora_state(network: LoraNetwork, family: str) -> LoraState:
    """The trained network in the library's neutral form (transformer modules fused on single-file weights)."""
    split: dict[str, Factors] = {}
    modules: dict[tuple[str, str], LoraModule] = {}
    for module in network.modules():
        down = module.down.detach().float().cpu()
        up = module.up.detach().float().cpu()
        alpha = torch.tensor(module.alpha)
        if module.component == "transformer":
            split[module.name] = Factors(down, up, alpha)
        else:
            name = module.name if module.name.startswith("text_model.") else f"text_model.{module.name}"
            modules[("te1", name)] = LoraModule("te1", name, down, up, alpha)
    for name, factors in fuse_modules(family, split).items():
        modules[("unet", name)] = LoraModule("unet", name, factors.down, factors.up, factors.alpha)
    return LoraState(family, modules)


def export_flow_lora(
    path: str | os.PathLike,
    network: LoraNetwork,
    family: str,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float16,
    layout: str = "kohya",
) -> Path:
    """Write the network at `path` in `layout` (``kohya`` or ``peft``); returns the path."""
    if layout not in LAYOUTS:
        raise ValueError(f"LoRA layout {layout!r}: choose one of {LAYOUTS}")
    tensors = state_to_tensors(flow_lora_state(network, family), layout)
    tensors = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in tensors.items()}
    return save_lora(path, tensors, metadata)
