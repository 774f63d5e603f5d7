"""Flux and SD3/SD3.5 LoRA key layouts: the fused single-file names and diffusers' split names, both ways.

(Over 600 lines on purpose: one name table per family read four ways (single-file, kohya, diffusers, whole
checkpoints) plus the fuse/split rules on it; split apart, each reader would need its own copy of the table.)

The single-file model (BFL's Flux files, Stability's SD3 files; what ComfyUI, Forge and kohya's tools load)
fuses layers that diffusers keeps apart (docs/flux.md, "LoRA key layouts"):

=====================================  ==============================================================
single-file weight (Flux)              diffusers modules, in row order
=====================================  ==============================================================
``double_blocks.N.img_attn.qkv``       ``transformer_blocks.N.attn.to_q``, ``to_k``, ``to_v``
``double_blocks.N.txt_attn.qkv``       ``transformer_blocks.N.attn.add_q_proj``, ``add_k_proj``, ``add_v_proj``
``single_blocks.N.linear1``            ``single_transformer_blocks.N.attn.to_q``, ``to_k``, ``to_v``, ``proj_mlp``
``final_layer.adaLN_modulation.1``     ``norm_out.linear`` with its two halves swapped
=====================================  ==============================================================

(every other layer is one-to-one: ``img_attn.proj`` = ``attn.to_out.0``, ``img_mlp.0`` = ``ff.net.0.proj``,
``img_mod.lin`` = ``norm1.linear``, ``linear2`` = ``proj_out``, ``modulation.lin`` = ``norm.linear`` ...).
SD3 works the same way on ``joint_blocks.N.{x_block,context_block}.attn.qkv`` and
``joint_blocks.N.x_block.attn2.qkv`` (SD3.5 Medium); its last context block is "pre-only" (adaLN with two
parts, swapped like the final layer; qkv but no projection or MLP).

A LoRA on a fused weight is one module: kohya names it ``lora_unet_`` + the single-file path with dots as
underscores. Split LoRAs are fused without changing their effect: the downs are stacked, the ups placed
block-diagonally (each part's rows see only its own rank), and alpha is set so ``alpha / rank`` stays each
part's scale. Parts a LoRA did not train get zero blocks of the same rank, which keeps the up matrix in the
equal-block form diffusers' kohya converter splits back into compact per-part LoRAs. Splitting inverts this
exactly: equal rank blocks are cut apart when the up matrix is block-diagonal; otherwise each part keeps the
rank columns its rows use (the product is unchanged either way).

Everything here is names and tensors: no model is built. `FlowVariant` tables give every adaptable weight's
shape in the full-size models (`lora_targets`), and `single_file_state` / `diffusers_state` convert whole
transformer checkpoints between the two layouts (used by test fixtures and loaders).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .formats import LowRank
from .safetensors_file import name_from_metadata

FAMILIES = ("flux", "sd3")
KOHYA_UNET = "lora_unet_"
PEFT_TRANSFORMER = "transformer."
COMFY_MODEL = "diffusion_model."


class FlowLayoutError(ValueError):
    """A name, shape or tensor that fits no Flux / SD3 layout; the message names it."""


# --------------------------------------------------------------------------------------------------
# Name tables: single-file path <-> diffusers paths ("{i}" = block index)


@dataclass(frozen=True)
class Target:
    """One weight of the single-file model that a LoRA adapts, with the diffusers modules it fuses."""

    family: str
    name: str  # single-file path, e.g. "double_blocks.0.img_attn.qkv"
    parts: tuple[str, ...]  # diffusers paths in row order (one for a one-to-one layer)
    units: tuple[int, ...]  # each part's rows in multiples of the hidden size (fused targets only)
    swap: str = ""  # "always": halves swapped against diffusers; "pre_only": only with two halves (SD3)

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    def swapped(self, rows: int, cols: int) -> bool:
        """Whether this weight's two halves are in the other order than diffusers' (rows x cols weight)."""
        return self.swap == "always" or (self.swap == "pre_only" and rows == 2 * cols)


_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")

# (single-file template, diffusers templates, units, swap)
_FLUX = (
    ("double_blocks.{i}.img_attn.qkv", tuple(f"transformer_blocks.{{i}}.{p}" for p in _QKV), (1, 1, 1), ""),
    (
        "double_blocks.{i}.txt_attn.qkv",
        tuple(f"transformer_blocks.{{i}}.{p}" for p in _ADD_QKV),
        (1, 1, 1),
        "",
    ),
    ("double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",), (), ""),
    ("double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",), (), ""),
    ("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.net.0.proj",), (), ""),
    ("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.net.2",), (), ""),
    ("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.net.0.proj",), (), ""),
    ("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.net.2",), (), ""),
    ("double_blocks.{i}.img_mod.lin", ("transformer_blocks.{i}.norm1.linear",), (), ""),
    ("double_blocks.{i}.txt_mod.lin", ("transformer_blocks.{i}.norm1_context.linear",), (), ""),
    (
        "single_blocks.{i}.linear1",
        (*(f"single_transformer_blocks.{{i}}.{p}" for p in _QKV), "single_transformer_blocks.{i}.proj_mlp"),
        (1, 1, 1, 4),
        "",
    ),
    ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",), (), ""),
    ("single_blocks.{i}.modulation.lin", ("single_transformer_blocks.{i}.norm.linear",), (), ""),
    ("img_in", ("x_embedder",), (), ""),
    ("txt_in", ("context_embedder",), (), ""),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), (), ""),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), (), ""),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), (), ""),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), (), ""),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), (), ""),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), (), ""),
    ("final_layer.linear", ("proj_out",), (), ""),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), (), "always"),
)

_SD3 = (
    (
        "joint_blocks.{i}.x_block.attn.qkv",
        tuple(f"transformer_blocks.{{i}}.{p}" for p in _QKV),
        (1, 1, 1),
        "",
    ),
    (
        "joint_blocks.{i}.context_block.attn.qkv",
        tuple(f"transformer_blocks.{{i}}.{p}" for p in _ADD_QKV),
        (1, 1, 1),
        "",
    ),
    (
        "joint_blocks.{i}.x_block.attn2.qkv",
        tuple(f"transformer_blocks.{{i}}.attn2.to_{p}" for p in "qkv"),
        (1, 1, 1),
        "",
    ),
    ("joint_blocks.{i}.x_block.attn.proj", ("transformer_blocks.{i}.attn.to_out.0",), (), ""),
    ("joint_blocks.{i}.context_block.attn.proj", ("transformer_blocks.{i}.attn.to_add_out",), (), ""),
    ("joint_blocks.{i}.x_block.attn2.proj", ("transformer_blocks.{i}.attn2.to_out.0",), (), ""),
    ("joint_blocks.{i}.x_block.mlp.fc1", ("transformer_blocks.{i}.ff.net.0.proj",), (), ""),
    ("joint_blocks.{i}.x_block.mlp.fc2", ("transformer_blocks.{i}.ff.net.2",), (), ""),
    ("joint_blocks.{i}.context_block.mlp.fc1", ("transformer_blocks.{i}.ff_context.net.0.proj",), (), ""),
    ("joint_blocks.{i}.context_block.mlp.fc2", ("transformer_blocks.{i}.ff_context.net.2",), (), ""),
    ("joint_blocks.{i}.x_block.adaLN_modulation.1", ("transformer_blocks.{i}.norm1.linear",), (), ""),
    (
        "joint_blocks.{i}.context_block.adaLN_modulation.1",
        ("transformer_blocks.{i}.norm1_context.linear",),
        (),
        "pre_only",
    ),
    ("x_embedder.proj", ("pos_embed.proj",), (), ""),
    ("context_embedder", ("context_embedder",), (), ""),
    ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), (), ""),
    ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), (), ""),
    ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), (), ""),
    ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), (), ""),
    ("final_layer.linear", ("proj_out",), (), ""),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), (), "always"),
)

TEMPLATES = {"flux": _FLUX, "sd3": _SD3}

# Parameters that are no LoRA target but that a whole-checkpoint conversion must carry (single-file suffix ->
# diffusers suffix, same tensor).
_EXTRA_PARAMS = {
    "flux": (
        ("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
        ("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
        (
            "double_blocks.{i}.txt_attn.norm.query_norm.scale",
            "transformer_blocks.{i}.attn.norm_added_q.weight",
        ),
        ("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
        ("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
        ("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
    ),
    "sd3": (
        ("joint_blocks.{i}.x_block.attn.ln_q.weight", "transformer_blocks.{i}.attn.norm_q.weight"),
        ("joint_blocks.{i}.x_block.attn.ln_k.weight", "transformer_blocks.{i}.attn.norm_k.weight"),
        (
            "joint_blocks.{i}.context_block.attn.ln_q.weight",
            "transformer_blocks.{i}.attn.norm_added_q.weight",
        ),
        (
            "joint_blocks.{i}.context_block.attn.ln_k.weight",
            "transformer_blocks.{i}.attn.norm_added_k.weight",
        ),
        ("joint_blocks.{i}.x_block.attn2.ln_q.weight", "transformer_blocks.{i}.attn2.norm_q.weight"),
        ("joint_blocks.{i}.x_block.attn2.ln_k.weight", "transformer_blocks.{i}.attn2.norm_k.weight"),
        ("pos_embed", "pos_embed.pos_embed"),
    ),
}


def _pattern(template: str, underscored: bool = False) -> re.Pattern[str]:
    text = template.replace(".", "_") if underscored else template
    return re.compile(re.escape(text).replace(r"\{i\}", r"(\d+)") + r"\Z")


@dataclass(frozen=True)
class _Compiled:
    single: tuple[tuple[re.Pattern[str], int], ...]  # single-file dotted path -> template index
    kohya: tuple[tuple[re.Pattern[str], int], ...]  # the same with underscores
    diffusers: tuple[tuple[re.Pattern[str], int, int], ...]  # diffusers path -> (template, part)


@functools.cache
def _compiled(family: str) -> _Compiled:
    if family not in TEMPLATES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    single, kohya, diffusers = [], [], []
    for index, (name, parts, _, _) in enumerate(TEMPLATES[family]):
        single.append((_pattern(name), index))
        kohya.append((_pattern(name, underscored=True), index))
        diffusers += [(_pattern(part), index, p) for p, part in enumerate(parts)]
    return _Compiled(tuple(single), tuple(kohya), tuple(diffusers))


def _target(family: str, index: int, block: str | None) -> Target:
    name, parts, units, swap = TEMPLATES[family][index]
    fill = (lambda t: t.replace("{i}", block)) if block is not None else (lambda t: t)
    return Target(family, fill(name), tuple(fill(p) for p in parts), units, swap)


def _block(match: re.Match[str]) -> str | None:
    return match.group(1) if match.groups() else None


def target_from_single_file(family: str, name: str) -> Target | None:
    """The target named by a single-file path (``double_blocks.0.img_attn.qkv``), or None."""
    for pattern, index in _compiled(family).single:
        match = pattern.match(name)
        if match:
            return _target(family, index, _block(match))
    return None


def target_from_kohya(family: str, base: str) -> Target | None:
    """The target of a kohya key stem (``lora_unet_double_blocks_0_img_attn_qkv``), or None."""
    if not base.startswith(KOHYA_UNET):
        return None
    stem = base[len(KOHYA_UNET) :]
    for pattern, index in _compiled(family).kohya:
        match = pattern.match(stem)
        if match:
            return _target(family, index, _block(match))
    return None


def target_from_diffusers(family: str, name: str) -> tuple[Target, int] | None:
    """The target a diffusers module path (``transformer_blocks.0.attn.to_k``) belongs to and its part index."""
    for pattern, index, part in _compiled(family).diffusers:
        match = pattern.match(name)
        if match:
            return _target(family, index, _block(match)), part
    return None


def kohya_base(target: Target) -> str:
    """The kohya key stem of a target: ``lora_unet_`` + its single-file path with dots as underscores."""
    return KOHYA_UNET + target.name.replace(".", "_")


# --------------------------------------------------------------------------------------------------
# Full-size variants: every adaptable weight and its shape


@dataclass(frozen=True)
class FlowVariant:
    """The numbers of one Flux / SD3 transformer that decide its LoRA targets and their shapes."""

    arch: str
    family: str
    hidden: int
    depth: int  # double blocks (Flux) / joint blocks (SD3)
    depth_single: int = 0  # Flux single blocks
    guidance: bool = False  # Flux.1-dev's guidance embedder
    dual_blocks: tuple[int, ...] = ()  # SD3.5 Medium's blocks with a second image attention (attn2)
    context_dim: int = 4096  # T5-XXL width
    pooled_dim: int = 768  # CLIP-L pooled (Flux) / CLIP-L + bigG pooled (SD3: 2048)
    latent_channels: int = 16
    mlp_ratio: int = 4


VARIANTS = {
    v.arch: v
    for v in (
        FlowVariant("flux-dev", "flux", 3072, 19, 38, guidance=True),
        FlowVariant("flux-schnell", "flux", 3072, 19, 38),
        FlowVariant("sd3-medium", "sd3", 1536, 24, pooled_dim=2048),
        FlowVariant("sd35-medium", "sd3", 1536, 24, pooled_dim=2048, dual_blocks=tuple(range(13))),
        FlowVariant("sd35-large", "sd3", 2432, 38, pooled_dim=2048),
    )
}


def lora_targets(variant: FlowVariant) -> dict[str, tuple[int, ...]]:
    """Every Linear / Conv2d weight of `variant` under its single-file path, with its shape."""
    h, m, c = variant.hidden, variant.mlp_ratio, variant.latent_channels
    out: dict[str, tuple[int, ...]] = {}
    if variant.family == "flux":
        for i in range(variant.depth):
            for stream in ("img", "txt"):
                p = f"double_blocks.{i}.{stream}"
                out |= {
                    f"{p}_mod.lin": (6 * h, h),
                    f"{p}_attn.qkv": (3 * h, h),
                    f"{p}_attn.proj": (h, h),
                    f"{p}_mlp.0": (m * h, h),
                    f"{p}_mlp.2": (h, m * h),
                }
        for i in range(variant.depth_single):
            p = f"single_blocks.{i}"
            out |= {
                f"{p}.linear1": ((3 + m) * h, h),
                f"{p}.linear2": (h, (1 + m) * h),
                f"{p}.modulation.lin": (3 * h, h),
            }
        embedders = ["time_in", "vector_in"] + (["guidance_in"] if variant.guidance else [])
        inputs = {"time_in": 256, "vector_in": variant.pooled_dim, "guidance_in": 256}
        for embedder in embedders:
            out |= {f"{embedder}.in_layer": (h, inputs[embedder]), f"{embedder}.out_layer": (h, h)}
        out |= {"img_in": (h, c * 4), "txt_in": (h, variant.context_dim)}
    else:
        last = variant.depth - 1
        for i in range(variant.depth):
            p = f"joint_blocks.{i}"
            dual = i in variant.dual_blocks
            out |= {
                f"{p}.x_block.adaLN_modulation.1": ((9 if dual else 6) * h, h),
                f"{p}.x_block.attn.qkv": (3 * h, h),
                f"{p}.x_block.attn.proj": (h, h),
                f"{p}.x_block.mlp.fc1": (m * h, h),
                f"{p}.x_block.mlp.fc2": (h, m * h),
                f"{p}.context_block.adaLN_modulation.1": ((2 if i == last else 6) * h, h),
                f"{p}.context_block.attn.qkv": (3 * h, h),
            }
            if dual:
                out |= {f"{p}.x_block.attn2.qkv": (3 * h, h), f"{p}.x_block.attn2.proj": (h, h)}
            if i != last:
                out |= {
                    f"{p}.context_block.attn.proj": (h, h),
                    f"{p}.context_block.mlp.fc1": (m * h, h),
                    f"{p}.context_block.mlp.fc2": (h, m * h),
                }
        out |= {
            "x_embedder.proj": (h, c, 2, 2),
            "context_embedder": (h, variant.context_dim),
            "t_embedder.mlp.0": (h, 256),
            "t_embedder.mlp.2": (h, h),
            "y_embedder.mlp.0": (h, variant.pooled_dim),
            "y_embedder.mlp.2": (h, h),
        }
    out |= {"final_layer.linear": (c * 4, h), "final_layer.adaLN_modulation.1": (2 * h, h)}
    return out


# --------------------------------------------------------------------------------------------------
# Detection


_FAMILY_HINTS = (
    # (family, pattern over key stems in any layout)
    (
        "flux",
        re.compile(
            r"(?:^|[._])(double_blocks|single_blocks|single_transformer_blocks|guidance_embedder)[._]"
        ),
    ),
    ("flux", re.compile(r"(?:^|[._])(img_in|txt_in|vector_in|time_in|guidance_in)(?:[._]|$)")),
    ("sd3", re.compile(r"(?:^|[._])(joint_blocks|pos_embed|t_embedder|y_embedder)(?:[._]|$)")),
    # SD3.5 Medium's second attention (the U-Nets' attn2 sits deeper, under down_blocks/input_blocks ...)
    ("sd3", re.compile(r"^(?:transformer\.|lora_transformer_)?transformer_blocks[._]\d+[._]attn2[._]")),
)
_SD_UNET = re.compile(
    r"(?:^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]"
)
_TRANSFORMER_BLOCK = re.compile(
    r"^(?:transformer\.|lora_transformer_|diffusion_model\.)?transformer_blocks[._](\d+)[._]"
)


def metadata_family(metadata: Mapping[str, str]) -> str | None:
    """``flux`` / ``sd3`` from ``modelspec.architecture`` or kohya's ``ss_base_model_version``, if present."""
    return name_from_metadata(
        metadata, {"flux": (("flux",), ("flux",)), "sd3": (("sd3",), ("stable-diffusion-3",))}, lower=True
    )


def detect_family(
    keys: Iterable[str],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str | None:
    """``flux``, ``sd3``, ``sd`` (an SD1.5 / SDXL U-Net LoRA) or None, from a LoRA file's tensor names.

    Names decide where they can (single-file block names, Flux's single blocks, SD3's attn2 and embedders);
    a diffusers file adapting only ``transformer_blocks`` (whose names Flux and SD3 share) is told apart by
    metadata, then by a block index Flux does not have (>= 19) or a hidden size (3072 Flux; 1536 / 2432 SD3).
    """
    keys = list(keys)
    found = set()
    for key in keys:
        for family, pattern in _FAMILY_HINTS:
            if pattern.search(key):
                found.add(family)
        if _SD_UNET.search(key) and key.startswith(("lora_unet_", "unet.", "diffusion_model.")):
            found.add("sd")
    if len(found) == 1:
        return found.pop()
    if found:
        raise FlowLayoutError(f"the keys mix model families {sorted(found)}; e.g. {keys[:3]}")
    blocks = [m for m in (_TRANSFORMER_BLOCK.match(k) for k in keys) if m]
    if not blocks:
        return None
    hint = metadata_family(metadata or {})
    if hint:
        return hint
    if max(int(m.group(1)) for m in blocks) >= VARIANTS["flux-dev"].depth:
        return "sd3"
    for key, shape in (shapes or {}).items():
        # a down tensor [rank, in] or a module's weight shape [out, in]: the in size is the hidden size
        if re.search(r"[._]to_q(?:[._](?:lora_A|lora_down|lora[._]down)|$)", key) and len(shape) == 2:
            if shape[1] == VARIANTS["flux-dev"].hidden:
                return "flux"
            if shape[1] in (VARIANTS["sd3-medium"].hidden, VARIANTS["sd35-large"].hidden):
                return "sd3"
    raise FlowLayoutError(
        "the LoRA adapts only transformer_blocks, whose names Flux and SD3 share, and its metadata and shapes "
        "do not say which: give the base model (flux or sd3) explicitly"
    )


# --------------------------------------------------------------------------------------------------
# Fusing split LoRAs and splitting fused ones


@dataclass
class Factors(LowRank):
    """One LoRA module's tensors: ``delta = alpha / rank * up @ down`` (alpha None: scale 1)."""

    down: Any  # torch.Tensor [rank, in] or [rank, in, kh, kw]
    up: Any  # torch.Tensor [out, rank] or [out, rank, 1, 1]
    alpha: Any = None  # 0-D tensor or None


def _swap_halves(up):
    import torch

    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _alpha_tensor(value: float, like):
    """`value` as a 0-D tensor in `like`'s dtype, or float32 when that dtype cannot hold it exactly."""
    import torch

    dtype = like.dtype if like is not None else torch.float32
    tensor = torch.tensor(value, dtype=dtype)
    return tensor if float(tensor) == value else torch.tensor(value, dtype=torch.float32)


def part_rows(target: Target, total_rows: int) -> list[int]:
    """Rows of each part in a fused weight with `total_rows` rows."""
    if not target.fused:
        return [total_rows]
    hidden, rest = divmod(total_rows, sum(target.units))
    if rest or hidden < 1:
        raise FlowLayoutError(
            f"{target.name}: {total_rows} rows do not divide into its parts {target.parts} "
            f"(in units of the hidden size {target.units})"
        )
    return [u * hidden for u in target.units]


def fuse(target: Target, parts: Mapping[int, Factors]) -> Factors:
    """One LoRA module on the fused weight from LoRAs on some of its parts (part index -> factors).

    The effect is the same: the fused delta's rows of part i are part i's delta, zero for parts not given.
    """
    import torch

    if not parts:
        raise FlowLayoutError(f"{target.name}: no part to fuse")
    unknown = sorted(set(parts) - set(range(len(target.parts))))
    if unknown:
        raise FlowLayoutError(f"{target.name}: part index {unknown} out of range for {target.parts}")
    if not target.fused:
        only = parts[0]
        up = only.up
        if target.swapped(up.shape[0], only.down.shape[1]):
            up = _swap_halves(up)
        return Factors(only.down, up, only.alpha)
    present = [parts[i] for i in sorted(parts)]
    first = present[0]
    sizes = {tuple(f.down.shape[1:]) for f in present}
    if len(sizes) > 1:
        raise FlowLayoutError(f"{target.name}: the parts' input sizes differ {sorted(sizes)}")
    hidden = None
    for index, factors in parts.items():
        rows, rest = divmod(int(factors.up.shape[0]), target.units[index])
        if rest or (hidden is not None and rows != hidden):
            raise FlowLayoutError(
                f"{target.name}: part {target.parts[index]} has {factors.up.shape[0]} rows, which does not fit "
                f"the other parts (units of the hidden size {target.units})"
            )
        hidden = rows
    assert hidden is not None
    ranks = {f.rank for f in present}
    fill_rank = first.rank if len(ranks) > 1 else ranks.pop()
    scale = first.scale
    downs, ups = [], []
    for index, units in enumerate(target.units):
        given = parts.get(index)
        if given is None:
            downs.append(first.down.new_zeros((fill_rank, *first.down.shape[1:])))
            ups.append(first.up.new_zeros((units * hidden, fill_rank, *first.up.shape[2:])))
            continue
        up = given.up
        if given.scale != scale:  # fold the ratio into the up block so alpha / rank can be shared
            up = (up.to(torch.float64) * (given.scale / scale)).to(up.dtype)
        downs.append(given.down)
        ups.append(up)
    rank = sum(d.shape[0] for d in downs)
    down = torch.cat(downs, dim=0)
    up = first.up.new_zeros((sum(u.shape[0] for u in ups), rank, *first.up.shape[2:]))
    row = col = 0
    for block in ups:
        up[row : row + block.shape[0], col : col + block.shape[1]] = block
        row += block.shape[0]
        col += block.shape[1]
    alphas = [f.alpha for f in present]
    alpha = (
        None
        if all(a is None for a in alphas)
        else _alpha_tensor(scale * rank, next(a for a in alphas if a is not None))
    )
    return Factors(down, up, alpha)


def split(target: Target, fused: Factors) -> dict[int, Factors]:
    """The per-part LoRAs of a LoRA on a fused weight (part index -> factors); parts with no effect are left out.

    Equal rank blocks on a block-diagonal up matrix (what `fuse` writes, and what diffusers' kohya converter
    recognises) are cut apart; any other fused LoRA gives each part the rank columns its rows use.
    """
    up = fused.up
    if not target.fused:
        if target.swapped(up.shape[0], fused.down.shape[1]):
            up = _swap_halves(up)
        return {0: Factors(fused.down, up, fused.alpha)}
    rows = part_rows(target, int(up.shape[0]))
    starts = [sum(rows[:i]) for i in range(len(rows))]
    rank, n = fused.rank, len(target.parts)
    scale = fused.scale

    def alpha_for(r: int):
        return None if fused.alpha is None else _alpha_tensor(scale * r, fused.alpha)

    out: dict[int, Factors] = {}
    if rank % n == 0:
        width = rank // n
        diagonal = all(
            not bool(up[starts[i] : starts[i] + rows[i], j * width : (j + 1) * width].any())
            for i in range(n)
            for j in range(n)
            if i != j
        )
        if diagonal:
            for i in range(n):
                down = fused.down[i * width : (i + 1) * width]
                block = up[starts[i] : starts[i] + rows[i], i * width : (i + 1) * width]
                if bool(down.any()) or bool(block.any()):
                    out[i] = Factors(down.contiguous(), block.contiguous(), alpha_for(width))
            return out
    for i in range(n):
        block = up[starts[i] : starts[i] + rows[i]]
        used = (
            block.flatten(2).abs().sum(dim=(0, 2)).nonzero().flatten()
            if block.dim() > 2
            else block.abs().sum(0).nonzero().flatten()
        )
        if used.numel() == 0:
            continue
        out[i] = Factors(
            fused.down.index_select(0, used).contiguous(),
            block.index_select(1, used).contiguous(),
            alpha_for(int(used.numel())),
        )
    return out if out else {}


def _column_owners(target: Target, factors: Factors) -> list[set[int]]:
    """For each rank column of a fused LoRA, the parts whose rows use it (non-zero up entries)."""
    up = factors.up.flatten(1) if factors.up.dim() > 2 else factors.up
    rows = part_rows(target, int(up.shape[0]))
    used = []
    start = 0
    for size in rows:
        used.append(up[start : start + size].abs().sum(0) != 0)
        start += size
    return [{i for i in range(len(rows)) if bool(used[i][c])} for c in range(int(up.shape[1]))]


def block_structured(target: Target, factors: Factors) -> bool:
    """Whether every rank column of a fused LoRA serves one part at most (split LoRAs fused, not kohya's own
    fused training): then its parts can be treated as separate LoRAs without growing its rank."""
    return not target.fused or all(len(owners) <= 1 for owners in _column_owners(target, factors))


def group_columns(target: Target, factors: Factors) -> Factors:
    """The same LoRA with its rank columns ordered by the part they serve (part 0's first; shared or unused
    columns last), so the up matrix is block-diagonal wherever the LoRA allows; the product is unchanged."""
    if not target.fused:
        return factors
    owners = _column_owners(target, factors)
    order = sorted(
        range(len(owners)), key=lambda c: (min(owners[c]) if len(owners[c]) == 1 else len(target.parts), c)
    )
    if order == list(range(len(owners))):
        return factors
    import torch

    index = torch.tensor(order)
    return Factors(factors.down.index_select(0, index), factors.up.index_select(1, index), factors.alpha)


# --------------------------------------------------------------------------------------------------
# Whole state dicts: diffusers-named LoRA modules <-> fused single-file modules


def fuse_modules(family: str, modules: Mapping[str, Factors]) -> dict[str, Factors]:
    """Diffusers-named transformer LoRA modules -> modules on the single-file weights (keyed by their path).

    Raises `FlowLayoutError` naming any module that is no layer of `family`'s transformer.
    """
    grouped: dict[str, tuple[Target, dict[int, Factors]]] = {}
    unknown = []
    for name, factors in modules.items():
        found = target_from_diffusers(family, name)
        if found is None:
            unknown.append(name)
            continue
        target, part = found
        entry = grouped.setdefault(target.name, (target, {}))
        if part in entry[1]:
            raise FlowLayoutError(f"{name}: adapted twice")
        entry[1][part] = factors
    if unknown:
        raise FlowLayoutError(
            f"{len(unknown)} module(s) are no layer of the {family} transformer: {', '.join(sorted(unknown)[:5])}"
        )
    return {name: fuse(target, parts) for name, (target, parts) in grouped.items()}


def split_modules(family: str, modules: Mapping[str, Factors]) -> dict[str, Factors]:
    """Modules on single-file weights (keyed by path) -> diffusers-named LoRA modules."""
    out: dict[str, Factors] = {}
    for name, factors in modules.items():
        target = target_from_single_file(family, name)
        if target is None:
            raise FlowLayoutError(f"{name!r} is no LoRA-adaptable weight of the {family} single-file model")
        for index, part in split(target, factors).items():
            out[target.parts[index]] = part
    return out


def kohya_tensors(family: str, modules: Mapping[str, Factors], dtype=None) -> dict[str, Any]:
    """The kohya state dict (``lora_unet_<fused path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``)
    of diffusers-named transformer LoRA modules, e.g. a trained peft network's; `dtype` converts the
    matrices (alpha stays exact)."""
    out: dict[str, Any] = {}
    for name, factors in sorted(fuse_modules(family, modules).items()):
        target = target_from_single_file(family, name)
        assert target is not None
        base = kohya_base(target)
        out[base + ".lora_down.weight"] = _cast(factors.down, dtype)
        out[base + ".lora_up.weight"] = _cast(factors.up, dtype)
        if factors.alpha is not None:
            out[base + ".alpha"] = factors.alpha
    return out


def _cast(tensor, dtype):
    return (tensor if dtype is None else tensor.to(dtype)).contiguous()


def diffusers_modules_from_kohya(family: str, tensors: Mapping[str, Any]) -> dict[str, Factors]:
    """Diffusers-named transformer LoRA modules of a kohya state dict (the inverse of `kohya_tensors`);
    keys that are not ``lora_unet_`` modules are refused by name."""
    fused: dict[str, Factors] = {}
    stems = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors})
    for stem in stems:
        target = target_from_kohya(family, stem)
        if target is None:
            raise FlowLayoutError(f"{stem!r} is no kohya {family} transformer module")
        try:
            fused[target.name] = Factors(
                tensors[stem + ".lora_down.weight"],
                tensors[stem + ".lora_up.weight"],
                tensors.get(stem + ".alpha"),
            )
        except KeyError as exc:
            raise FlowLayoutError(f"{stem}: missing {exc.args[0]}") from None
    return split_modules(family, fused)


# --------------------------------------------------------------------------------------------------
# Whole transformer checkpoints (weights, biases, norms) between the layouts


def _extra_maps(family: str) -> list[tuple[re.Pattern[str], re.Pattern[str], str, str]]:
    return [(_pattern(a), _pattern(b), a, b) for a, b in _EXTRA_PARAMS[family]]


def single_file_state(family: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers transformer state dict (FluxTransformer2DModel / SD3Transformer2DModel) in the single-file
    layout: fused weights and biases concatenated in part order, swapped halves swapped, norms renamed."""
    import torch

    out: dict[str, Any] = {}
    pending: dict[tuple[str, str], tuple[Target, dict[int, Any]]] = {}
    extras = _extra_maps(family)
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".")
        found = target_from_diffusers(family, module) if kind in ("weight", "bias") else None
        if found is not None:
            target, part = found
            pending.setdefault((target.name, kind), (target, {}))[1][part] = tensor
            continue
        for _, diffusers, single_t, _ in extras:
            match = diffusers.match(key)
            if match:
                out[single_t.replace("{i}", match.group(1)) if match.groups() else single_t] = tensor
                break
        else:
            raise FlowLayoutError(f"{key!r} is no parameter of the {family} transformer this layout knows")
    for (name, kind), (target, parts) in pending.items():
        missing = [target.parts[i] for i in range(len(target.parts)) if i not in parts]
        if missing:
            raise FlowLayoutError(f"{name}.{kind}: the state dict lacks {missing}")
        tensor = torch.cat([parts[i] for i in range(len(target.parts))], dim=0)
        rows = tensor.shape[0]
        cols = state[target.parts[0] + ".weight"].shape[1]
        if target.swapped(rows, cols):
            tensor = _swap_halves(tensor)
        out[f"{name}.{kind}"] = tensor
    return out


def diffusers_state(family: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """A single-file transformer state dict (no ``model.diffusion_model.`` prefix) in diffusers' layout."""
    out: dict[str, Any] = {}
    extras = _extra_maps(family)
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".")
        target = target_from_single_file(family, module) if kind in ("weight", "bias") else None
        if target is not None:
            cols = state[module + ".weight"].shape[1]
            if target.swapped(tensor.shape[0], cols):
                tensor = _swap_halves(tensor)
            start = 0
            for part, rows in zip(target.parts, part_rows(target, int(tensor.shape[0])), strict=True):
                out[f"{part}.{kind}"] = tensor[start : start + rows].contiguous()
                start += rows
            continue
        for single, _, _, diffusers_t in extras:
            match = single.match(key)
            if match:
                out[diffusers_t.replace("{i}", match.group(1)) if match.groups() else diffusers_t] = tensor
                break
        else:
            raise FlowLayoutError(
                f"{key!r} is no parameter of the {family} single-file transformer this layout knows"
            )
    return out
