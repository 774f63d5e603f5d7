"""LoRA file formats: detect which one a file uses, read it into one neutral form, write it in another.

(Over 600 lines on purpose: the three key layouts are one mapping read both ways, detect, read and write;
splitting the module table from its readers and writers would scatter each format's rules.)

Three key layouts are understood (docs/comfyui-contract.md §6, docs/ecosystem.md §2):

==========  ==================================================  ==============================================
format      U-Net                                               text encoders
==========  ==================================================  ==============================================
kohya       ``lora_unet_<path, dots -> _>`` + ``.lora_down/     ``lora_te_`` (SD1.5) / ``lora_te1_``,
            .lora_up.weight`` + ``.alpha``. SD1.5 uses the      ``lora_te2_`` (SDXL) + ``text_model_encoder_...``
            diffusers path, SDXL the LDM path (as sd-scripts)
peft        ``unet.<diffusers path>.lora_A/.lora_B.weight``     ``text_encoder.text_model.<...>``,
            (+ ``.alpha``). Attention projections are written   ``text_encoder_2.text_model.<...>``
            in the ``.processor.to_q`` spelling, the only
            diffusers spelling ComfyUI 0.3.64 maps for them
comfyui     ``diffusion_model.<LDM path>.lora_up/.lora_down     ``text_encoders.clip_l.transformer.<...>``,
            .weight`` + ``.alpha`` (ComfyUI's own savers)       ``text_encoders.clip_g.transformer.<...>``
==========  ==================================================  ==============================================

Reading also accepts the other up/down suffix spellings ComfyUI accepts (``lora.down.weight``,
``lora_linear_layer.down.weight``, ``lora_A.default.weight``) and both kohya U-Net spellings. A file's
modules are resolved against a table of every Linear / Conv2d of the real SD1.5 and SDXL models (built on
the meta device from the shipped configs), so names convert exactly and an unknown name is an error that
names the key. A missing ``.alpha`` stays missing (ComfyUI then scales by 1.0) so conversions round-trip.

Full-weight deltas (``.diff``, ``.diff_b``: ComfyUI's trainer writes them for norms and biases) are kept
only when the output format is ``comfyui``; converting them to another format is refused with the keys.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import safetensors_file
from .safetensors_file import FileProblem, Header, SafetensorsError, TensorInfo, name_from_metadata

FORMATS = ("kohya", "peft", "comfyui")
ARCHS = ("sd15", "sdxl")
COMPONENTS = ("unet", "te1", "te2")

# Suffix spellings ComfyUI accepts for the two LoRA matrices (docs/comfyui-contract.md §6), longest first.
DOWN_SUFFIXES = (
    ".lora_linear_layer.down.weight",
    ".lora_A.default.weight",
    ".lora_down.weight",
    ".lora.down.weight",
    ".lora_A.weight",
)
UP_SUFFIXES = (
    ".lora_linear_layer.up.weight",
    ".lora_B.default.weight",
    ".lora_up.weight",
    ".lora.up.weight",
    ".lora_B.weight",
)
FULL_DELTA_SUFFIXES = (".diff", ".diff_b", ".dora_scale")

KOHYA_TE_PREFIX = {("sd15", "te1"): "lora_te_", ("sdxl", "te1"): "lora_te1_", ("sdxl", "te2"): "lora_te2_"}
KOHYA_UNET_PREFIX = "lora_unet_"
PEFT_PREFIX = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
COMFY_TE_PREFIX = {"te1": "text_encoders.clip_l.transformer.", "te2": "text_encoders.clip_g.transformer."}
CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"


class LoraFormatError(ValueError):
    """A LoRA file (or state dict) that cannot be read or converted; the message names the keys."""


class InvalidLoraFile(FileProblem, LoraFormatError):
    """A LoRA refused when opened or before writing: `path`, `key` (None: the whole file) and `reason`."""


class LowRank:
    """The arithmetic of a LoRA module with ``down``, ``up`` and ``alpha``: ``delta = scale * up @ down``,
    ``scale = alpha / rank`` (1.0 without alpha)."""

    down: Any
    up: Any
    alpha: Any

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self, dtype=None):
        """The dense weight change this module adds at strength 1 (shape of the adapted weight), in `dtype`
        (float64 by default)."""
        import torch

        dtype = dtype or torch.float64
        up = self.up.to(dtype).flatten(1)
        down = self.down.to(dtype).flatten(1)
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (self.scale * (up @ down)).reshape(shape)


@dataclass
class LoraModule(LowRank):
    """One adapted layer: ``delta = scale * up @ down`` with ``scale = alpha / rank`` (1.0 without alpha)."""

    component: str  # "unet", "te1" (CLIP-L) or "te2" (SDXL's bigG)
    name: str  # diffusers path (U-Net) or ``text_model.encoder.layers.<i>.<...>`` (text encoders)
    down: Any  # torch.Tensor [rank, in] or [rank, in, kh, kw]
    up: Any  # torch.Tensor [out, rank] or [out, rank, 1, 1]
    alpha: Any = None  # 0-D torch.Tensor as stored, or None when the file has none


@dataclass
class LoraState:
    """A LoRA in neutral form: modules keyed by ``(component, name)``, extras, metadata and where it came from."""

    arch: str
    modules: dict[tuple[str, str], LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = ""
    extras: dict[str, Any] = field(default_factory=dict)  # full-delta tensors, keyed as in the file (comfyui)


# --------------------------------------------------------------------------------------------------
# Reading and checking safetensors headers without numpy or torch (inspection works in a driver-only install)


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Metadata and per-tensor dtype/shape of a ``.safetensors`` LoRA, reading only its header.

    The header is checked (`safetensors_file.read_header`) and so is the LoRA structure of its shapes
    (`check_structure`); a file failing either raises `InvalidLoraFile`.
    """
    return read_checked_header(path)[:2]


def read_checked_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, TensorInfo], Header]:
    """`read_header` plus the `Header` (data offset) for reading values."""
    try:
        header = safetensors_file.read_header(path)
    except SafetensorsError as exc:
        raise InvalidLoraFile(exc.path, exc.reason, exc.key) from None
    check_structure({k: t.shape for k, t in header.tensors.items()}, path)
    return header.metadata, header.tensors, header


def read_small_tensor(path: str | os.PathLike, key: str) -> list[float]:
    """The values of one small tensor (an ``.alpha``) as floats, with the standard library only."""
    _, _, header = read_checked_header(path)
    try:
        return safetensors_file.read_values(path, header, key)
    except SafetensorsError as exc:
        raise InvalidLoraFile(exc.path, exc.reason, exc.key) from None


def check_structure(shapes: Mapping[str, tuple[int, ...]], source: str | os.PathLike) -> None:
    """Refuse (`InvalidLoraFile`) LoRA modules whose down/up/alpha shapes do not fit together.

    down is ``[rank, in]`` or ``[rank, in, kh, kw]``; up is ``[out, rank]`` or ``[out, rank, 1, 1]`` with the
    same number of dimensions and the same rank (at least 1); alpha holds one value. Keys that are not LoRA
    tensors are left to the format checks.
    """
    groups: dict[str, dict[str, str]] = {}
    for key in shapes:
        base, role = _split_suffix(key)
        if role:
            groups.setdefault(base, {})[role] = key
    for base, roles in groups.items():
        if "diff" in roles or "diff_b" in roles:  # full-weight deltas: no LoRA pair to check
            continue
        if "alpha" in roles and math.prod(shapes[roles["alpha"]]) != 1:
            raise InvalidLoraFile(
                source, f"alpha has shape {list(shapes[roles['alpha']])}; it is one number", roles["alpha"]
            )
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            raise InvalidLoraFile(
                source,
                f"module {base[:120]!r} has no {missing} weight (a LoRA module needs both up and down)",
                next(iter(roles.values())),
            )
        down, up = tuple(shapes[roles["down"]]), tuple(shapes[roles["up"]])
        if len(down) not in (2, 4) or len(up) != len(down):
            raise InvalidLoraFile(
                source,
                f"down {list(down)} and up {list(up)} must both be 2-D (linear) or 4-D (conv)",
                roles["down"],
            )
        if down[0] < 1 or up[1] != down[0]:
            raise InvalidLoraFile(
                source,
                f"rank mismatch: down {list(down)} has rank {down[0]} but up {list(up)} "
                f"has {up[1]}; the file is damaged or was written wrongly",
                roles["up"],
            )
        if len(up) == 4 and up[2:] != (1, 1):
            raise InvalidLoraFile(
                source, f"conv up weight has kernel {list(up[2:])}; LoRA up kernels are 1 x 1", roles["up"]
            )
        if min(*down[1:], up[0]) < 1:
            raise InvalidLoraFile(source, f"empty weight (down {list(down)}, up {list(up)})", roles["down"])


def check_finite(tensors: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Refuse (`InvalidLoraFile`) torch tensors holding NaN or Inf: they would spread into every image."""
    import torch

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise InvalidLoraFile(
                source,
                "holds NaN or infinite values (a diverged training run?); use an earlier checkpoint of it",
                key,
            )


# --------------------------------------------------------------------------------------------------
# The kohya layout (what training writes and every common loader reads)


def kohya_key_base(arch: str, component: str, name: str, ldm: str | None = None) -> str:
    """The kohya key stem of one adapted module (before ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``).

    U-Net: ``lora_unet_`` + the diffusers path (SD1.5) or the LDM path `ldm` (SDXL, as sd-scripts writes it);
    text encoders (``te1``, ``te2``): ``lora_te_`` (SD1.5) / ``lora_te1_``, ``lora_te2_`` (SDXL) + the
    ``text_model.`` path (added when `name` lacks it: transformers 5 names CLIPTextModel's layers without it).
    Dots become underscores.
    """
    if component == "unet":
        path = name if arch != "sdxl" else ldm
        if path is None:
            raise ValueError("SDXL U-Net names need the LDM path of the module (its block numbering)")
        return KOHYA_UNET_PREFIX + path.replace(".", "_")
    prefix = KOHYA_TE_PREFIX.get((arch, component))
    if prefix is None:
        expected = sorted(c for a, c in KOHYA_TE_PREFIX if a == arch)
        raise ValueError(f"{arch} has no text encoder {component!r}; expected one of {expected}")
    if not name.startswith("text_model."):
        name = "text_model." + name
    return prefix + name.replace(".", "_")


# --------------------------------------------------------------------------------------------------
# Module tables of the real models


@dataclass(frozen=True)
class ModuleEntry:
    component: str
    name: str  # diffusers path / text_model path
    ldm: str  # LDM path (U-Net) or the same path (text encoders)
    shape: tuple[int, ...]  # the adapted weight's shape in the full-size model


@dataclass
class ModuleTable:
    arch: str
    entries: dict[tuple[str, str], ModuleEntry]
    by_kohya: dict[str, ModuleEntry]
    by_ldm: dict[str, ModuleEntry]


def _te_layer_entries(component: str, layers: int, width: int, ff: int) -> list[ModuleEntry]:
    """ComfyUI maps only the six linears of each text-encoder layer (docs/comfyui-contract.md §6)."""
    out = []
    shapes = {
        "self_attn.q_proj": (width, width),
        "self_attn.k_proj": (width, width),
        "self_attn.v_proj": (width, width),
        "self_attn.out_proj": (width, width),
        "mlp.fc1": (ff, width),
        "mlp.fc2": (width, ff),
    }
    for layer in range(layers):
        for part, shape in shapes.items():
            name = f"text_model.encoder.layers.{layer}.{part}"
            out.append(ModuleEntry(component, name, name, shape))
    return out


@functools.cache
def module_table(arch: str) -> ModuleTable:
    """Every LoRA-adaptable layer of the full-size `arch` model, with its names in each layout."""
    if arch not in ARCHS:
        raise ValueError(f"unknown base model {arch!r}; expected one of {ARCHS}")
    import torch
    from diffusers import UNet2DConditionModel

    from ..models.single_file import unet_to_ldm

    config = json.loads((CONFIGS / arch / "unet" / "config.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    entries: list[ModuleEntry] = []
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            (ldm,) = unet_to_ldm({name + ".weight": None}, config)
            entries.append(ModuleEntry("unet", name, ldm.removesuffix(".weight"), tuple(module.weight.shape)))
    del unet
    for component, folder in (("te1", "text_encoder"), ("te2", "text_encoder_2")):
        path = CONFIGS / arch / folder / "config.json"
        if path.is_file():
            te = json.loads(path.read_text(encoding="utf-8"))
            entries += _te_layer_entries(
                component, te["num_hidden_layers"], te["hidden_size"], te["intermediate_size"]
            )
    table = ModuleTable(arch, {}, {}, {})
    for entry in entries:
        table.entries[(entry.component, entry.name)] = entry
        if (
            entry.component == "unet"
        ):  # either spelling: the diffusers path (SD1.5's) or the LDM path (SDXL's)
            table.by_kohya[kohya_key_base("sd15", "unet", entry.name)] = entry
            table.by_kohya[kohya_key_base("sdxl", "unet", entry.name, entry.ldm)] = entry
            table.by_ldm[entry.ldm] = entry
        else:
            for a, comp in KOHYA_TE_PREFIX:
                if comp == entry.component and (a == arch or comp == "te1"):
                    table.by_kohya[kohya_key_base(a, comp, entry.name)] = entry
    return table


# --------------------------------------------------------------------------------------------------
# Detection


def _split_suffix(key: str) -> tuple[str, str]:
    """``(base, role)`` with role "down", "up", "alpha" or the full-delta suffix; ("", "") if none."""
    for suffix in DOWN_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], "down"
    for suffix in UP_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], "up"
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    for suffix in FULL_DELTA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    return "", ""


def key_format(key: str) -> str | None:
    """The format a single key belongs to, or None."""
    if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")):
        return "kohya"
    if key.startswith(("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.")):
        return "peft"
    if key.startswith(("diffusion_model.", "text_encoders.")):
        return "comfyui"
    return None


def detect_format(keys) -> str:
    """``kohya``, ``peft`` or ``comfyui`` for a file's tensor keys; raises `LoraFormatError` otherwise."""
    keys = list(keys)
    if not keys:
        raise LoraFormatError("the file holds no tensors")
    found: dict[str, int] = {}
    unknown = []
    for key in keys:
        kind = key_format(key)
        if kind is None:
            unknown.append(key)
        else:
            found[kind] = found.get(kind, 0) + 1
    if unknown:
        raise LoraFormatError(
            f"{len(unknown)} key(s) in no known LoRA layout (kohya lora_unet_/lora_te*, peft "
            f"unet./transformer./text_encoder., comfyui diffusion_model./text_encoders.): "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    if len(found) > 1:
        raise LoraFormatError(f"keys mix several layouts: {found}; convert the parts separately")
    return next(iter(found))


def _component_and_base(key_base: str, fmt: str) -> tuple[str, str]:
    """Component and format-specific module base (prefix stripped where the format has one per component)."""
    if fmt == "kohya":
        if key_base.startswith("lora_unet_"):
            return "unet", key_base
        if key_base.startswith("lora_te2_"):
            return "te2", key_base
        return "te1", key_base
    if fmt == "peft":
        for component in ("te2", "te1", "unet"):
            prefix = PEFT_PREFIX[component]
            if key_base.startswith(prefix):
                return component, key_base[len(prefix) :]
    if fmt == "comfyui":
        if key_base.startswith("diffusion_model."):
            return "unet", key_base[len("diffusion_model.") :]
        for component, prefix in COMFY_TE_PREFIX.items():
            if key_base.startswith(prefix):
                return component, key_base[len(prefix) :]
    raise LoraFormatError(f"key {key_base!r} has no known {fmt} component prefix")


def _peft_unet_name(name: str) -> str:
    # Old attention-processor spelling: ``attn1.processor.to_q`` / ``attn1.processor.to_out`` (= to_out.0).
    if ".processor." in name:
        name = name.replace(".processor.", ".")
        if name.endswith(".to_out"):
            name += ".0"
    return name


def _resolve(table: ModuleTable, component: str, base: str, fmt: str) -> ModuleEntry | None:
    if fmt == "kohya":
        return table.by_kohya.get(base)
    if component == "unet":
        if fmt == "peft":
            return table.entries.get(("unet", _peft_unet_name(base)))
        return table.by_ldm.get(base)
    name = base if base.startswith("text_model.") else "text_model." + base  # transformers >= 5 flat names
    return table.entries.get((component, name))


def _group(keys, fmt: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Module base -> {role: key}; and the keys with no LoRA role."""
    groups: dict[str, dict[str, str]] = {}
    stray = []
    for key in keys:
        base, role = _split_suffix(key)
        if not role:
            stray.append(key)
            continue
        groups.setdefault(base, {})[role] = key
    return groups, stray


def resolve_arch(
    keys, fmt: str, metadata: Mapping[str, str] | None = None
) -> tuple[str, dict[str, list[str]]]:
    """The base model (``sd15``/``sdxl``) whose layers every module of the file names; also, per arch,
    the module bases it does not know. Ties are broken by metadata, then by SDXL-only naming."""
    groups, _ = _group(keys, fmt)
    bases = [b for b, roles in groups.items() if "down" in roles or "up" in roles]
    missing: dict[str, list[str]] = {}
    for arch in ARCHS:
        table = module_table(arch)
        missing[arch] = [b for b in bases if _resolve(table, *_component_and_base(b, fmt), fmt) is None]
    candidates = [a for a in ARCHS if not missing[a]]
    if len(candidates) == 1:
        return candidates[0], missing
    if not candidates:
        best = min(ARCHS, key=lambda a: len(missing[a]))
        return best, missing
    hint = metadata_arch(metadata or {})
    if hint in candidates:
        return hint, missing
    if fmt == "kohya" and any(
        b.startswith(
            (
                "lora_unet_input_blocks",
                "lora_unet_output_blocks",
                "lora_unet_middle_block",
                "lora_te1_",
                "lora_te2_",
            )
        )
        for b in groups
    ):
        return "sdxl", missing
    return "sd15", missing


def metadata_arch(metadata: Mapping[str, str]) -> str | None:
    """``sd15``/``sdxl`` from kohya's ``ss_base_model_version`` or ``modelspec.architecture``, if present."""
    return name_from_metadata(
        metadata,
        {"sdxl": (("sdxl",), ("stable-diffusion-xl",)), "sd15": (("sd_v1",), ("stable-diffusion-v1",))},
    )


# --------------------------------------------------------------------------------------------------
# Reading and writing


def state_from_tensors(
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    arch: str | None = None,
    source: str = "state dict",
) -> LoraState:
    """Parse a LoRA state dict in any known format into a `LoraState` (SD1.5 / SDXL, or Flux / SD3: `arch`
    ``flux`` / ``sd3``, read by `flow_formats`)."""
    metadata = dict(metadata or {})
    fmt = detect_format(tensors.keys())
    family = flow_family(tensors, metadata, arch)
    if family is not None:
        from . import flow_formats

        return flow_formats.state_from_tensors(tensors, metadata, family, fmt, source)
    check_structure({k: tuple(v.shape) for k, v in tensors.items()}, source)
    if arch is None:
        arch, missing = resolve_arch(tensors.keys(), fmt, metadata)
        if missing[arch]:
            raise LoraFormatError(
                f"{source}: {len(missing[arch])} module(s) match no layer of SD1.5 or SDXL: "
                f"{', '.join(missing[arch][:5])}"
            )
    table = module_table(arch)
    groups, stray = _group(tensors.keys(), fmt)
    if stray:
        raise LoraFormatError(f"{source}: {len(stray)} key(s) are not LoRA tensors: {', '.join(stray[:5])}")
    modules: dict[tuple[str, str], LoraModule] = {}
    extras: dict[str, Any] = {}
    for base, roles in groups.items():
        full = [k for r, k in roles.items() if r in ("diff", "diff_b", "dora_scale")]
        if full:
            if fmt != "comfyui" or len(full) != len(roles):
                extras.update({k: tensors[k] for k in roles.values()})
                continue
            extras.update({k: tensors[k] for k in full})
            continue
        if "down" not in roles or "up" not in roles:
            raise LoraFormatError(f"{source}: module {base!r} has {sorted(roles)} but needs both up and down")
        component, name = _component_and_base(base, fmt)
        entry = _resolve(table, component, name, fmt)
        if entry is None:
            raise LoraFormatError(f"{source}: module {base!r} matches no {arch} layer")
        key = (entry.component, entry.name)
        if key in modules:
            raise LoraFormatError(f"{source}: module {base!r} repeats {entry.component} {entry.name}")
        modules[key] = LoraModule(
            entry.component,
            entry.name,
            tensors[roles["down"]],
            tensors[roles["up"]],
            tensors.get(roles["alpha"]) if "alpha" in roles else None,
        )
    return LoraState(arch, modules, metadata, fmt, extras)


def flow_family(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, arch: str | None = None
) -> str | None:
    """``flux`` / ``sd3`` when `tensors` are a LoRA for those transformers (or `arch` says so), else None."""
    from .flow_layouts import FAMILIES, FlowLayoutError, detect_family

    if arch is not None:
        return arch if arch in FAMILIES else None
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        family = detect_family(tensors.keys(), shapes, metadata)
    except FlowLayoutError as exc:
        raise LoraFormatError(str(exc)) from None
    return family if family in FAMILIES else None


def read_state(path: str | os.PathLike, arch: str | None = None) -> LoraState:
    """Read a ``.safetensors`` LoRA of any known format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    read_checked_header(path)  # header, offsets and shapes checked before torch reads a byte
    tensors, metadata = read_lora(path)
    check_finite(tensors, path)
    return state_from_tensors(tensors, metadata, arch=arch, source=str(path))


def module_key_base(state_arch: str, module: LoraModule, fmt: str) -> str:
    """The key base of `module` in `fmt` (the part before ``.lora_down.weight`` etc.)."""
    entry = module_table(state_arch).entries.get((module.component, module.name))
    if entry is None:
        raise LoraFormatError(f"{module.component} module {module.name!r} is not a {state_arch} layer")
    if fmt == "kohya":
        return kohya_key_base(state_arch, module.component, entry.name, entry.ldm)
    if fmt == "peft":
        name = entry.name
        if module.component == "unet" and ".to_" in name:
            name = name.replace(".to_", ".processor.to_")
            if name.endswith(".to_out.0"):
                name = name[:-2]
        return PEFT_PREFIX[module.component] + name
    if fmt == "comfyui":
        if module.component == "unet":
            return "diffusion_model." + entry.ldm
        return COMFY_TE_PREFIX[module.component] + entry.name
    raise ValueError(f"unknown LoRA format {fmt!r}; expected one of {FORMATS}")


_WRITE_SUFFIX = {
    "kohya": (".lora_down.weight", ".lora_up.weight"),
    "peft": (".lora_A.weight", ".lora_B.weight"),
    "comfyui": (".lora_down.weight", ".lora_up.weight"),
}


def refuse_extras(state: LoraState, fmt: str) -> None:
    """Full-weight deltas (.diff/.diff_b) can be written only in the comfyui layout: LoraFormatError else."""
    if state.extras and fmt != "comfyui":
        keys = sorted(state.extras)
        raise LoraFormatError(
            f"{len(keys)} full-weight delta tensor(s) (.diff/.diff_b, as ComfyUI's trainer writes) "
            f"exist only in the comfyui layout: {', '.join(keys[:5])}; convert to comfyui"
        )


def state_to_tensors(state: LoraState, fmt: str) -> dict[str, Any]:
    """The state dict of `state` in `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; expected one of {FORMATS}")
    if state.arch not in ARCHS:
        from . import flow_formats

        return flow_formats.state_to_tensors(state, fmt)
    refuse_extras(state, fmt)
    down_suffix, up_suffix = _WRITE_SUFFIX[fmt]
    out: dict[str, Any] = {}
    for module in state.modules.values():
        base = module_key_base(state.arch, module, fmt)
        out[base + down_suffix] = module.down
        out[base + up_suffix] = module.up
        if module.alpha is not None:
            out[base + ".alpha"] = module.alpha
    out.update(state.extras)
    return out


def write_state(
    state: LoraState,
    path: str | os.PathLike,
    fmt: str = "kohya",
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `state` as a ``.safetensors`` LoRA in `fmt`; refuses to replace an existing file unless asked."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: LoRA files are written as .safetensors")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; choose another name (or allow overwriting: --force on the command line)"
        )
    meta = dict(state.metadata if metadata is None else metadata)
    meta["charforge.lora_format"] = fmt
    tensors = state_to_tensors(state, fmt)
    # Never write a file that would be refused when read back.
    bad = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise InvalidLoraFile(path, f"metadata values must be text; not written (keys: {', '.join(bad[:5])})")
    check_structure({k: tuple(v.shape) for k, v in tensors.items()}, path)
    check_finite(tensors, path)
    return save_lora(path, tensors, meta)


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """``modelspec.hash_sha256``: 0x + SHA-256 over each tensor's raw bytes, in sorted key order."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "0x" + digest.hexdigest()


def _data_sha256(serialized: bytes) -> str:
    """SHA-256 of a safetensors file's tensor data (everything after the header), as ``sshs_model_hash``."""
    header_length = int.from_bytes(serialized[:8], "little")
    return hashlib.sha256(serialized[8 + header_length :]).hexdigest()


def save_lora(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> Path:
    """Write `tensors` with `metadata` (plus ``modelspec.hash_sha256`` and ``sshs_model_hash``) atomically."""
    from ...deps import require

    require("safetensors")
    from safetensors.torch import save

    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; offending keys: {bad}")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    header = dict(metadata)
    header["modelspec.hash_sha256"] = tensors_sha256(tensors)
    header["sshs_model_hash"] = _data_sha256(save(tensors))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(save(tensors, metadata=header))
    os.replace(tmp, path)
    return path


def read_lora(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors (torch) and metadata of a ``.safetensors`` LoRA, as stored (no checks: see `read_state`)."""
    from ...deps import require

    require("safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118


def convert_file(
    source: str | os.PathLike,
    target: str | os.PathLike,
    fmt: str,
    overwrite: bool = False,
    arch: str | None = None,
) -> Path:
    """Convert a LoRA file to `fmt` (``kohya``, ``peft`` or ``comfyui``); metadata is kept."""
    state = read_state(source, arch=arch)
    return write_state(state, target, fmt, overwrite=overwrite)


def unique_path(folder: str | os.PathLike, stem: str, suffix: str = ".safetensors") -> Path:
    """``folder/stem.safetensors``, or ``stem_2``, ``stem_3``... when taken: never an existing file."""
    folder = Path(folder)
    candidate = folder / f"{stem}{suffix}"
    index = 2
    while candidate.exists():
        candidate = folder / f"{stem}_{index}{suffix}"
        index += 1
    return candidate
