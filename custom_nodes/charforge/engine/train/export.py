"""Write a trained LoRA the way kohya's sd-scripts do, so every common loader reads all of it.

Key names (docs/ecosystem.md §2, docs/comfyui-contract.md §6), written by the library's format code
(``engine.library.formats``: `kohya_key_base`, `save_lora`, the one home of the LoRA key layouts):

==============  ===========================================  ===========================================
part            SD1.5                                        SDXL
==============  ===========================================  ===========================================
U-Net           ``lora_unet_<diffusers module path>``        ``lora_unet_<LDM/SGM module path>``
                (``down_blocks_1_attentions_0_...``)         (``input_blocks_4_1_transformer_blocks_...``)
text encoders   ``lora_te_text_model_encoder_layers_...``    ``lora_te1_...`` (CLIP-L), ``lora_te2_...`` (bigG)
==============  ===========================================  ===========================================

Dots in module paths become underscores. Per module: ``<name>.lora_down.weight`` (rank x in [x k x k]),
``<name>.lora_up.weight`` (out x rank [x 1 x 1]) and ``<name>.alpha`` (0-D); the applied delta is
``(alpha / rank) * up @ down``. transformers 5 names ``CLIPTextModel``'s layers without the
``text_model.`` prefix older versions (and every kohya file) use; it is added back.

Metadata (all values strings, structured ones JSON): the ``ss_*`` keys kohya tools read (the minimum set
``ss_v2``, ``ss_base_model_version``, ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``,
``ss_network_args`` plus training settings and ``ss_tag_frequency``) and ``modelspec.*`` (Stability AI's
model spec, with ``modelspec.trigger_phrase``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..library.formats import KOHYA_TE_PREFIX, kohya_key_base, save_lora
from ..models.single_file import unet_to_ldm
from .lora import LoraNetwork, LoraSettings

# The trained components under the library's names (``te1`` CLIP-L, ``te2`` SDXL's bigG).
LIBRARY_COMPONENT = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
BASE_MODEL_VERSION = {
    "sd15": "sd_v1",
    "sdxl": "sdxl_base_v1-0",
    "flux-dev": "flux1",
    "flux-schnell": "flux1",
    "sd3-medium": "sd3",
    "sd35-medium": "sd3",
    "sd35-large": "sd3",
}
MODELSPEC_ARCHITECTURE = {
    "sd15": "stable-diffusion-v1/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "flux-dev": "flux-1-dev/lora",
    "flux-schnell": "flux-1-schnell/lora",
    "sd3-medium": "stable-diffusion-3-medium/lora",
    "sd35-medium": "stable-diffusion-3.5-medium/lora",
    "sd35-large": "stable-diffusion-3.5-large/lora",
}
MODELSPEC_IMPLEMENTATION = {
    "sd15": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "flux-dev": "https://github.com/black-forest-labs/flux",
    "flux-schnell": "https://github.com/black-forest-labs/flux",
    "sd3-medium": "https://github.com/Stability-AI/sd3.5",
    "sd35-medium": "https://github.com/Stability-AI/sd3.5",
    "sd35-large": "https://github.com/Stability-AI/sd3.5",
}
# kohya's network module per family (the SD ones are networks.lora).
NETWORK_MODULE = {"flux-dev": "networks.lora_flux", "flux-schnell": "networks.lora_flux"}
NETWORK_MODULE.update(dict.fromkeys(("sd3-medium", "sd35-medium", "sd35-large"), "networks.lora_sd3"))
MODELSPEC_VERSION = "1.0.1"

_EMPTY = torch.empty(0)


def ldm_module_name(diffusers_name: str, unet_config: Mapping) -> str:
    """A diffusers U-Net module path in the LDM/SGM layout (``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``), using the single-file writer's own rename rules."""
    (key,) = unet_to_ldm({diffusers_name + ".weight": _EMPTY}, unet_config)
    return key.removesuffix(".weight")


def _has_component(arch: str, component: str) -> bool:
    library = LIBRARY_COMPONENT.get(component)
    return library == "unet" or (arch, library) in KOHYA_TE_PREFIX


def kohya_name(component: str, module_name: str, arch: str, unet_config: Mapping | None = None) -> str:
    """The kohya key stem of one adapted module of a trained model (without ``.lora_down.weight`` etc.).

    `component` is the diffusers name (``unet``, ``text_encoder``, ``text_encoder_2``); SDXL U-Net paths are
    numbered from `unet_config` (the trained model's own, so tiny test models name their layers right)."""
    if not _has_component(arch, component):
        expected = sorted(c for c in LIBRARY_COMPONENT if c != "unet" and _has_component(arch, c))
        raise ValueError(f"{arch} has no text encoder {component!r}; expected one of {expected}")
    ldm = None
    if component == "unet" and arch == "sdxl":
        if unet_config is None:
            raise ValueError("SDXL U-Net names need the U-Net config (for the LDM block numbering)")
        ldm = ldm_module_name(module_name, unet_config)
    return kohya_key_base(arch, LIBRARY_COMPONENT[component], module_name, ldm)


def kohya_state_dict(
    network: LoraNetwork, arch: str, unet_config: Mapping, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The network's weights under kohya names, as contiguous CPU tensors in `dtype`."""
    out: dict[str, torch.Tensor] = {}
    for module in network.modules():
        name = kohya_name(module.component, module.name, arch, unet_config)
        if name + ".alpha" in out:
            raise ValueError(f"two modules map to the same LoRA key {name!r}")
        out[name + ".lora_down.weight"] = module.down.detach().to("cpu", dtype).contiguous()
        out[name + ".lora_up.weight"] = module.up.detach().to("cpu", dtype).contiguous()
        out[name + ".alpha"] = torch.tensor(module.alpha, dtype=dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Metadata


def _s(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    return json.dumps(value, sort_keys=True)


def network_args(settings: LoraSettings) -> dict[str, str]:
    """``ss_network_args``: kohya's ``--network_args`` for the options beyond rank / alpha."""
    args: dict[str, str] = {}
    if settings.conv_rank > 0:
        args.update(conv_dim=str(settings.conv_rank), conv_alpha=str(settings.conv_alpha))
    if settings.targets == "attention":
        args["targets"] = "attention"
    if settings.train_text_encoder and settings.text_encoder_rank:
        args["text_encoder_dim"] = str(settings.text_encoder_rank)
    return args


def lora_metadata(
    *,
    arch: str,
    settings: LoraSettings,
    title: str,
    trigger_phrase: str = "",
    resolution: tuple[int, int] = (1024, 1024),
    training: Mapping[str, Any] | None = None,
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    prediction_type: str = "epsilon",
    description: str = "",
) -> dict[str, str]:
    """``ss_*`` and ``modelspec.*`` metadata; every value is a string.

    ``training`` holds further ``ss_*`` values without the prefix (``learning_rate``, ``optimizer``,
    ``steps``, ...); ``tag_frequency`` is ``{dataset folder: {tag: count}}``.
    """
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()  # noqa: UP017 - Python 3.10
    width, height = resolution
    meta: dict[str, Any] = {
        "ss_v2": False,
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_network_module": NETWORK_MODULE.get(arch, "networks.lora"),
        "ss_network_dim": settings.rank,
        "ss_network_alpha": settings.alpha,
        "ss_network_args": network_args(settings) or None,
        "ss_network_dropout": settings.dropout,
        "ss_output_name": title,
        "ss_resolution": f"({width}, {height})",
        "ss_tag_frequency": dict(tag_frequency or {}),
        "ss_training_comment": f"trigger: {trigger_phrase}" if trigger_phrase else "",
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[arch],
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION[arch],
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": now,
        "modelspec.prediction_type": prediction_type,
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.description": description or f"{title}: character LoRA trained with CharForge",
        "modelspec.author": "CharForge",
    }
    if meta["ss_network_args"] is None:
        meta["ss_network_args"] = "null"
    for key, value in (training or {}).items():
        meta[f"ss_{key}"] = value
    return {k: _s(v) for k, v in meta.items()}


def export_lora(
    path: str | os.PathLike,
    network: LoraNetwork,
    arch: str,
    unet_config: Mapping,
    metadata: Mapping[str, str],
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the network as a kohya-style ``.safetensors`` LoRA at `path`; returns the path."""
    return save_lora(path, kohya_state_dict(network, arch, unet_config, dtype), metadata)


# --------------------------------------------------------------------------------------------------
# Merging into a model (previews, tests)


def kohya_module_map(
    components: Mapping[str, torch.nn.Module], arch: str, unet_config: Mapping
) -> dict[str, torch.nn.Module]:
    """kohya key stem -> the base model's Linear / Conv2d it adapts, for every such layer of `components`.

    Layers already wrapped by peft are looked through (their ``base_layer``).
    """
    out: dict[str, torch.nn.Module] = {}
    for component, root in components.items():
        if not _has_component(arch, component):
            continue
        for name, module in root.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if ".lora_" in name or ".base_layer" in name:
                continue
            base = getattr(module, "base_layer", module)
            try:
                out[kohya_name(component, name, arch, unet_config)] = base
            except ValueError:
                continue  # a U-Net layer with no single-file name (none in SD1.5 / SDXL)
    for component, root in components.items():  # peft wrappers are not Linear: map their base layers
        for name, module in root.named_modules():
            base = getattr(module, "base_layer", None)
            if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
                out[kohya_name(component, name, arch, unet_config)] = base
    return out


def merge_lora(
    components: Mapping[str, torch.nn.Module],
    tensors: Mapping[str, torch.Tensor],
    arch: str,
    unet_config: Mapping,
    multiplier: float = 1.0,
) -> list[str]:
    """Add a kohya LoRA's deltas into the base weights of `components` in place.

    Returns the key stems that matched no module (an empty list means every key was used).
    """
    modules = kohya_module_map(components, arch, unet_config)
    stems = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_down." in k})
    unmatched = []
    with torch.no_grad():
        for stem in stems:
            module = modules.get(stem)
            if module is None:
                unmatched.append(stem)
                continue
            down = tensors[stem + ".lora_down.weight"].float()
            up = tensors[stem + ".lora_up.weight"].float()
            rank = down.shape[0]
            alpha = float(tensors[stem + ".alpha"]) if stem + ".alpha" in tensors else float(rank)
            weight = module.weight
            assert isinstance(weight, torch.Tensor)  # the map holds Linear / Conv2d layers
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            weight += (multiplier * alpha / rank * delta).to(weight.dtype)
    return unmatched
