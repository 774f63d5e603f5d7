"""Flux and SD3/SD3.5 LoRA files in the library's three layouts, read into and written from a `LoraState`.

The neutral form keys transformer modules by their single-file path (``("unet", "double_blocks.0.img_attn.qkv")``:
one module per weight ComfyUI patches) and text-encoder modules by their ``text_model.`` path, as for SD1.5 /
SDXL. Per layout (docs/flux.md, "LoRA key layouts"):

==========  =============================================  ============================================
format      transformer                                    text encoders (CLIP-L; SD3 also CLIP-G)
==========  =============================================  ============================================
kohya       ``lora_unet_<single-file path, _>`` fused      ``lora_te1_...`` / ``lora_te2_...``
peft        ``transformer.<diffusers path>.lora_A/B``      ``text_encoder.text_model...`` /
            split (to_q, to_k, to_v, proj_mlp ...)         ``text_encoder_2.text_model...``
comfyui     ``diffusion_model.<single-file path>`` fused   ``text_encoders.clip_l.transformer...`` /
                                                           ``text_encoders.clip_g.transformer...``
==========  =============================================  ============================================

Reading a peft file fuses its split modules (`flow_layouts.fuse`); writing one splits them again. peft files
carry no ``.alpha`` (diffusers' SD3 loader refuses the key, and ComfyUI applies a LoRA without one at scale
1), so each module's ``alpha / rank`` is folded into its up matrix: the effect is unchanged, only the factors
differ. T5 LoRA modules are not supported and are refused by name.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from . import flow_layouts as layouts
from .flow_layouts import Factors, FlowLayoutError
from .formats import (
    LoraFormatError,
    LoraModule,
    LoraState,
    _group,
    _te_layer_entries,
    check_structure,
    refuse_extras,
)

FLOW_FAMILIES = layouts.FAMILIES
FAMILY_NAMES = {"flux": "Flux.1", "sd3": "Stable Diffusion 3 / 3.5"}
# Text encoders that take LoRAs: (layers, width, MLP width) of CLIP-L and OpenCLIP bigG.
_TEXT_ENCODERS = {"flux": {"te1": (12, 768, 3072)}, "sd3": {"te1": (12, 768, 3072), "te2": (32, 1280, 5120)}}
TE_PREFIX = {
    "kohya": {"te1": "lora_te1_", "te2": "lora_te2_"},
    "peft": {"te1": "text_encoder.", "te2": "text_encoder_2."},
    "comfyui": {"te1": "text_encoders.clip_l.transformer.", "te2": "text_encoders.clip_g.transformer."},
}
UNET_PREFIX = {"kohya": layouts.KOHYA_UNET, "peft": layouts.PEFT_TRANSFORMER, "comfyui": layouts.COMFY_MODEL}
_WRITE_SUFFIX = {
    "kohya": (".lora_down.weight", ".lora_up.weight"),
    "peft": (".lora_A.weight", ".lora_B.weight"),
    "comfyui": (".lora_down.weight", ".lora_up.weight"),
}


@functools.cache
def _te_names(family: str) -> dict[str, dict[str, str]]:
    """component -> {spelling: text_model path} for every text-encoder linear ComfyUI maps (all spellings)."""
    out: dict[str, dict[str, str]] = {}
    for component, (layers, width, ff) in _TEXT_ENCODERS[family].items():
        names = {}
        for entry in _te_layer_entries(component, layers, width, ff):
            names[entry.name] = entry.name
            names[entry.name.removeprefix("text_model.")] = entry.name  # transformers >= 5 flat names
            names[entry.name.replace(".", "_")] = entry.name  # kohya
        out[component] = names
    return out


def locate(family: str, fmt: str, base: str) -> tuple[str, str, int | None] | None:
    """``(component, name, part)`` of one key stem: name is the single-file path (part None) or, for a
    peft transformer module, the diffusers path with its part index; None when it names nothing known."""
    unet = UNET_PREFIX[fmt]
    if base.startswith(unet):
        rest = base[len(unet) :]
        if fmt == "kohya":
            target = layouts.target_from_kohya(family, base)
            return ("unet", target.name, None) if target else None
        if fmt == "comfyui":
            target = layouts.target_from_single_file(family, rest)
            return ("unet", target.name, None) if target else None
        found = layouts.target_from_diffusers(family, rest)
        return ("unet", rest, found[1]) if found else None
    for component, prefix in TE_PREFIX[fmt].items():
        if base.startswith(prefix) and component in _TEXT_ENCODERS[family]:
            name = _te_names(family)[component].get(base[len(prefix) :])
            return (component, name, None) if name else None
    return None


def _refusal(family: str, fmt: str, bases: list[str]) -> str:
    t5 = [b for b in bases if "t5" in b.lower() or b.startswith(("lora_te3_", "text_encoder_3."))]
    if t5:
        return f"T5 text-encoder LoRA modules are not supported ({', '.join(t5[:3])})"
    return f"{len(bases)} module(s) match no {FAMILY_NAMES[family]} layer in the {fmt} layout: " + ", ".join(
        bases[:5]
    )


def state_from_tensors(
    tensors: Mapping[str, Any], metadata: Mapping[str, str], family: str, fmt: str, source: str
) -> LoraState:
    """Parse a Flux / SD3 LoRA state dict in layout `fmt` into a `LoraState` (arch = `family`)."""
    check_structure({k: tuple(v.shape) for k, v in tensors.items()}, source)
    groups, stray = _group(tensors.keys(), fmt)
    if stray:
        raise LoraFormatError(f"{source}: {len(stray)} key(s) are not LoRA tensors: {', '.join(stray[:5])}")
    modules: dict[tuple[str, str], LoraModule] = {}
    split: dict[str, Factors] = {}
    extras: dict[str, Any] = {}
    unknown = []
    for base, roles in groups.items():
        if any(r in roles for r in ("diff", "diff_b", "dora_scale")):
            extras.update({k: tensors[k] for k in roles.values()})
            continue
        found = locate(family, fmt, base)
        if found is None:
            unknown.append(base)
            continue
        component, name, part = found
        factors = Factors(
            tensors[roles["down"]],
            tensors[roles["up"]],
            tensors.get(roles["alpha"]) if "alpha" in roles else None,
        )
        if part is not None:
            split[name] = factors
            continue
        if (component, name) in modules:
            raise LoraFormatError(f"{source}: module {base!r} repeats {component} {name}")
        modules[(component, name)] = LoraModule(component, name, factors.down, factors.up, factors.alpha)
    if unknown:
        raise LoraFormatError(f"{source}: {_refusal(family, fmt, unknown)}")
    if extras and fmt != "comfyui":
        keys = sorted(extras)
        raise LoraFormatError(
            f"{source}: {len(keys)} full-weight delta tensor(s) (.diff/.diff_b/.dora_scale) are kept only in the "
            f"comfyui layout: {', '.join(keys[:5])}"
        )
    try:
        fused = layouts.fuse_modules(family, split)
    except FlowLayoutError as exc:
        raise LoraFormatError(f"{source}: {exc}") from None
    for name, factors in fused.items():
        if ("unet", name) in modules:
            raise LoraFormatError(f"{source}: {name} is adapted both fused and split")
        modules[("unet", name)] = LoraModule("unet", name, factors.down, factors.up, factors.alpha)
    return LoraState(family, modules, dict(metadata), fmt, extras)


def _folded(factors: Factors) -> tuple[Any, Any]:
    """down, up with ``alpha / rank`` folded into up (what a layout without alpha needs)."""
    import torch

    if factors.alpha is None or factors.scale == 1.0:
        return factors.down, factors.up
    up = (factors.up.to(torch.float64) * factors.scale).to(factors.up.dtype)
    return factors.down, up


def state_to_tensors(state: LoraState, fmt: str) -> dict[str, Any]:
    """The state dict of a Flux / SD3 `state` in layout `fmt` (kohya, peft or comfyui)."""
    family = state.arch
    if fmt not in _WRITE_SUFFIX:
        raise ValueError(f"unknown LoRA format {fmt!r}; expected one of {tuple(_WRITE_SUFFIX)}")
    refuse_extras(state, fmt)
    down_suffix, up_suffix = _WRITE_SUFFIX[fmt]
    out: dict[str, Any] = {}

    def put(base: str, factors: Factors) -> None:
        if fmt == "peft":
            down, up = _folded(factors)
            out[base + down_suffix], out[base + up_suffix] = down, up
            return
        out[base + down_suffix], out[base + up_suffix] = factors.down, factors.up
        if factors.alpha is not None:
            out[base + ".alpha"] = factors.alpha

    fused: dict[str, Factors] = {}
    for (component, name), module in state.modules.items():
        factors = Factors(module.down, module.up, module.alpha)
        if component == "unet":
            target = layouts.target_from_single_file(family, name)
            if target is None:
                raise LoraFormatError(f"{name!r} is no {FAMILY_NAMES[family]} transformer layer")
            if fmt == "peft":
                fused[name] = factors
            else:
                put(layouts.kohya_base(target) if fmt == "kohya" else UNET_PREFIX[fmt] + name, factors)
            continue
        if component not in _TEXT_ENCODERS[family]:
            raise LoraFormatError(f"{FAMILY_NAMES[family]} has no text encoder {component!r}")
        spelled = name.replace(".", "_") if fmt == "kohya" else name
        put(TE_PREFIX[fmt][component] + spelled, factors)
    for name, factors in layouts.split_modules(family, fused).items():
        put(UNET_PREFIX["peft"] + name, factors)
    out.update(state.extras)
    return out


def split_view(state: LoraState) -> dict[tuple[str, str], Factors]:
    """The state's modules with fused transformer modules split into diffusers-named parts."""
    out: dict[tuple[str, str], Factors] = {}
    for (component, name), module in state.modules.items():
        factors = Factors(module.down, module.up, module.alpha)
        if component != "unet":
            out[(component, name)] = factors
            continue
        for part, piece in layouts.split_modules(state.arch, {name: factors}).items():
            out[("unet", part)] = piece
    return out
