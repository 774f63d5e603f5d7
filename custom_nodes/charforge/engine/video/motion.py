"""AnimateDiff motion modules and motion LoRAs: files as users have them, read into diffusers.

Users download motion modules as single files in the **original** AnimateDiff layout
(``mm_sd_v15_v2.ckpt``, ``v3_sd15_mm.ckpt``, fp16 ``.safetensors`` re-uploads) and put them into
``models/animatediff_models``; diffusers publishes the same weights as ``MotionAdapter`` folders
(``config.json`` + ``diffusion_pytorch_model.safetensors``). Both are read here.

The two layouts name the same tensors differently (per motion module ``<block>.motion_modules.<j>``):

=========================================================  ===========================================
original                                                   diffusers ``MotionAdapter``
=========================================================  ===========================================
``temporal_transformer.norm`` / ``proj_in`` / ``proj_out``   ``norm`` / ``proj_in`` / ``proj_out``
``temporal_transformer.transformer_blocks.<k>.``             ``transformer_blocks.<k>.``
  ``attention_blocks.0.`` / ``attention_blocks.1.``            ``attn1.`` / ``attn2.``
  ``attention_blocks.<n>.pos_encoder.pe`` (one per block)      ``pos_embed.pe`` (one, used by both)
  ``norms.0`` / ``norms.1`` / ``ff_norm``                      ``norm1`` / ``norm2`` / ``norm3``
  ``ff.net.0.proj`` / ``ff.net.2``                             the same
=========================================================  ===========================================

The version is read from the tensors, never from the file name (the rules AnimateDiff-Evolved uses too):
3 resolution levels = SDXL, 4 = SD1.5; a ``mid_block`` motion module = v2; otherwise the positional
table length tells v3 (32) from v1 (24). Neither layout stores the attention head count or the
GroupNorm group count; every published module uses 8 heads and 32 groups, which is assumed for
original-layout files (a diffusers folder says so in its ``config.json``).

HotShot-XL's temporal-layer file (``temporal_attentions`` keys with ``positional_encoding`` tables) is read
here too and converted by `hotshot` (same tensors under other names; its GroupNorm works per frame).

Motion LoRAs (``models/animatediff_motion_lora``) in the original format adapt the temporal attention
projections: ``<attention block>.processor.to_{q,k,v,out}_lora.{down,up}.weight``, applied as
``W + strength * up @ down``. They are converted to diffusers' LoRA format (``unet.<module>.lora_A/B``)
so they load as named adapters next to the character LoRAs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...deps import require

StateDict = Mapping[str, torch.Tensor]

DEFAULT_HEADS = 8  # every published AnimateDiff module; not recoverable from the weights
DEFAULT_NORM_GROUPS = 32
WEIGHT_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")

_BLOCK = r"(?P<block>down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.(?P<module>\d+)"
_ORIGINAL_KEY = re.compile(_BLOCK + r"\.temporal_transformer\.(?P<rest>.+)")
_DIFFUSERS_KEY = re.compile(_BLOCK + r"\.(?P<rest>(?:norm|proj_in|proj_out|transformer_blocks)\..+)")
_ORIGINAL_IN_BLOCK = re.compile(r"transformer_blocks\.(?P<k>\d+)\.(?P<rest>.+)")

# Inside one temporal transformer block, original name -> diffusers name (parameter suffix kept).
_ORIGINAL_BLOCK_PARTS = {
    "attention_blocks.0.": "attn1.",
    "attention_blocks.1.": "attn2.",
    "norms.0.": "norm1.",
    "norms.1.": "norm2.",
    "ff_norm.": "norm3.",
    "ff.": "ff.",
}
_DIFFUSERS_BLOCK_PARTS = {v: k for k, v in _ORIGINAL_BLOCK_PARTS.items()}
_ATTENTION_LEAVES = re.compile(r"(to_q|to_k|to_v)\.weight|to_out\.0\.(weight|bias)")
_FF_LEAVES = re.compile(r"net\.0\.proj\.(weight|bias)|net\.2\.(weight|bias)")


class MotionModuleError(ValueError):
    """A file is not a motion module this loader can use; the message says what it is instead."""


@dataclass(frozen=True)
class MotionModuleInfo:
    """What a motion module file is, read from its tensors.

    ``version`` is ``"v1"``, ``"v2"``, ``"v3"`` (SD1.5) or ``"sdxl"`` (AnimateDiff-SDXL beta);
    ``"sd15-custom"`` for an SD1.5 module whose positional table has another length; ``"hotshot"`` for
    HotShot-XL (SDXL, its own file layout, an 8-frame window). ``window`` is
    the frame count the module was trained on (16 for all published ones); ``max_frames`` the length
    of its positional table, the most frames one context window may hold.
    """

    version: str
    base: str  # "sd15" or "sdxl"
    layout: str  # "original", "diffusers" or "hotshot"
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    transformer_layers: int
    has_mid_block: bool
    max_frames: int
    num_attention_heads: int = DEFAULT_HEADS
    norm_num_groups: int = DEFAULT_NORM_GROUPS
    window: int = 16
    # What beta_schedule "auto" means: AnimateDiff trained on "linear" betas, HotShot-XL on SDXL's own ("base").
    auto_beta_schedule: str = "linear"

    @property
    def per_frame_norm(self) -> bool:
        """HotShot-XL's temporal GroupNorm normalises each frame alone (AnimateDiff's: the whole window)."""
        return self.version == "hotshot"

    def adapter_config(self) -> dict:
        """Keyword arguments for ``diffusers.MotionAdapter``."""
        return {
            "block_out_channels": tuple(self.block_out_channels),
            "motion_layers_per_block": self.layers_per_block,
            "motion_transformer_layers_per_block": self.transformer_layers,
            "motion_mid_block_layers_per_block": 1,
            "motion_transformer_layers_per_mid_block": self.transformer_layers,
            "motion_num_attention_heads": self.num_attention_heads,
            "motion_norm_num_groups": self.norm_num_groups,
            "motion_max_seq_length": self.max_frames,
            "use_motion_mid_block": self.has_mid_block,
        }

    def describe(self) -> str:
        names = {
            "v1": "AnimateDiff v1 (SD1.5)",
            "v2": "AnimateDiff v2 (SD1.5)",
            "v3": "AnimateDiff v3 (SD1.5)",
            "sdxl": "AnimateDiff-SDXL beta",
            "sd15-custom": "AnimateDiff-style SD1.5 module",
            "hotshot": "HotShot-XL",
        }
        return (
            f"{names.get(self.version, self.version)}, {self.layout} layout, up to {self.max_frames} frames"
        )


# --------------------------------------------------------------------------------------------------
# Reading files


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - say which file and why, whatever the pickle problem is
        raise MotionModuleError(
            f"{path.name}: could not be read as a weights-only PyTorch checkpoint ({exc}). Use the .safetensors "
            "version of the file if there is one."
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MotionModuleError(f"{path.name}: holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    if path.suffix.lower() in (".safetensors", ".sft"):
        require("safetensors")
        from safetensors.torch import load_file

        return load_file(str(path))
    return _torch_load(path)


def _diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    return read_weights(diffusers_weight_file(folder))


def diffusers_weight_file(folder: Path) -> Path:
    """The weight file of a diffusers model folder (full precision preferred over fp16, safetensors over .bin)."""
    for name in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ):
        if (folder / name).is_file():
            return folder / name
    raise MotionModuleError(f"{folder}: a diffusers folder without diffusion_pytorch_model weights")


def is_diffusers_motion_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding a diffusers ``MotionAdapter`` (its ``config.json`` says so)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "MotionAdapter"
    except (OSError, json.JSONDecodeError):
        return False


# --------------------------------------------------------------------------------------------------
# Layout detection and conversion


def _layout(keys: list[str]) -> str:
    if any(_ORIGINAL_KEY.fullmatch(k) for k in keys):
        return "original"
    if any(_DIFFUSERS_KEY.fullmatch(k) for k in keys):
        return "diffusers"
    from .hotshot import is_hotshot_layout

    if is_hotshot_layout(keys):
        return "hotshot"
    if any("temporal_attentions" in k or "positional_encoding" in k for k in keys):
        raise MotionModuleError(
            "temporal_attentions / positional_encoding keys, but not HotShot-XL's layout (every "
            "<block>.temporal_attentions.<j> with transformer_blocks.0.attention_blocks.N.pos_encoder."
            "positional_encoding tables); AnimateDiff (v1, v2, v3, SDXL beta) and HotShot-XL modules are supported"
        )
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise MotionModuleError(
            "a Stable Diffusion checkpoint, not a motion module: it belongs in the checkpoints folder"
        )
    shown = ", ".join(sorted(keys)[:4])
    raise MotionModuleError(
        f"no AnimateDiff motion-module keys (down_blocks.N.motion_modules.M...) found; first keys: {shown}"
    )


def shown_keys(keys: list[str], limit: int) -> str:
    """The first `limit` of `keys` in order, then how many more there are, for an error message."""
    return ", ".join(sorted(keys)[:limit]) + (
        f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    )


def _unexpected(keys: list[str], what: str) -> MotionModuleError:
    return MotionModuleError(
        f"{len(keys)} {what} key(s) do not belong to an AnimateDiff motion module: {shown_keys(keys, 6)}"
    )


def original_to_diffusers(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """An original-layout motion module state dict in diffusers ``MotionAdapter`` names.

    The positional table of the first attention block becomes the transformer block's ``pos_embed.pe``;
    the second block's copy must be identical (it always is in published modules) and is dropped.
    Raises `MotionModuleError` listing keys that have no place in a ``MotionAdapter``.
    """
    out: dict[str, torch.Tensor] = {}
    second_tables: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        m = _ORIGINAL_KEY.fullmatch(key)
        if m is None:
            unexpected.append(key)
            continue
        prefix = f"{m['block']}.motion_modules.{m['module']}."
        rest = m["rest"]
        if rest.split(".")[0] in ("norm", "proj_in", "proj_out") and rest.count(".") == 1:
            out[prefix + rest] = tensor
            continue
        inner = _ORIGINAL_IN_BLOCK.fullmatch(rest)
        if inner is None:
            unexpected.append(key)
            continue
        block = f"{prefix}transformer_blocks.{inner['k']}."
        part = inner["rest"]
        if part == "attention_blocks.0.pos_encoder.pe":
            out[block + "pos_embed.pe"] = tensor
            continue
        if part == "attention_blocks.1.pos_encoder.pe":
            second_tables[block + "pos_embed.pe"] = tensor
            continue
        for old, new in _ORIGINAL_BLOCK_PARTS.items():
            if part.startswith(old):
                leaf = part[len(old) :]
                valid = (
                    _ATTENTION_LEAVES.fullmatch(leaf)
                    if new.startswith("attn")
                    else _FF_LEAVES.fullmatch(leaf)
                    if new == "ff."
                    else leaf in ("weight", "bias")
                )
                if valid:
                    out[block + new + leaf] = tensor
                    break
        else:
            unexpected.append(key)
    if unexpected:
        raise _unexpected(unexpected, "original-layout")
    for key, table in second_tables.items():
        first = out.get(key)
        if first is None:
            out[key] = table
        elif first.shape != table.shape or (
            not first.is_meta and not torch.allclose(first.float(), table.float(), atol=1e-3)
        ):  # meta tensors (shape checks of full-size layouts) have no values to compare
            raise MotionModuleError(
                f"{key}: the two attention blocks carry different positional tables; "
                "diffusers shares one table per transformer block, so this module cannot "
                "be loaded faithfully"
            )
    return out


def diffusers_to_original(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """A ``MotionAdapter`` state dict in the original AnimateDiff layout (what AnimateDiff-Evolved reads).

    The inverse of `original_to_diffusers`: ``pos_embed.pe`` is written to both attention blocks.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        m = _DIFFUSERS_KEY.fullmatch(key)
        if m is None:
            unexpected.append(key)
            continue
        prefix = f"{m['block']}.motion_modules.{m['module']}.temporal_transformer."
        rest = m["rest"]
        inner = _ORIGINAL_IN_BLOCK.fullmatch(rest)
        if inner is None:
            out[prefix + rest] = tensor
            continue
        block = f"{prefix}transformer_blocks.{inner['k']}."
        part = inner["rest"]
        if part == "pos_embed.pe":
            out[block + "attention_blocks.0.pos_encoder.pe"] = tensor
            out[block + "attention_blocks.1.pos_encoder.pe"] = tensor.clone()
            continue
        for new, old in _DIFFUSERS_BLOCK_PARTS.items():
            if part.startswith(new):
                out[block + old + part[len(new) :]] = tensor
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise _unexpected(unexpected, "diffusers")
    return out


def _count(keys: list[str], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := regex.match(k))}


def inspect_state_dict(state_dict: StateDict, layout: str | None = None) -> MotionModuleInfo:
    """Version and architecture of a motion module from its tensor names and shapes (either layout)."""
    keys = list(state_dict)
    layout = layout or _layout(keys)
    if layout == "hotshot":
        from .hotshot import hotshot_to_diffusers

        diffusers_sd = hotshot_to_diffusers(state_dict)
    elif layout == "original":
        diffusers_sd = original_to_diffusers(state_dict)
    else:
        diffusers_sd = dict(state_dict)
    dkeys = list(diffusers_sd)
    if any(k.startswith("conv_in.") for k in keys):
        raise MotionModuleError(
            "a PIA module (conv_in keys); only AnimateDiff text-to-video modules are supported"
        )
    levels = sorted(_count(dkeys, r"down_blocks\.(\d+)\.motion_modules\."))
    if levels != list(range(len(levels))) or len(levels) not in (3, 4):
        raise MotionModuleError(
            f"a motion module with {len(levels)} down levels; AnimateDiff modules have 4 (SD1.5) or 3 (SDXL)"
        )
    widths = []
    for level in levels:
        norm = diffusers_sd.get(f"down_blocks.{level}.motion_modules.0.norm.weight")
        if norm is None:
            raise MotionModuleError(f"down level {level} has no motion_modules.0 norm weight")
        widths.append(int(norm.shape[0]))
    layers = len(_count(dkeys, r"down_blocks\.0\.motion_modules\.(\d+)\."))
    transformer_layers = len(_count(dkeys, r"down_blocks\.0\.motion_modules\.0\.transformer_blocks\.(\d+)\."))
    tables = [v for k, v in diffusers_sd.items() if k.endswith("pos_embed.pe")]
    if not tables:
        raise MotionModuleError(
            "no positional tables (pos_encoder.pe): an AnimateLCM-style module, which this "
            "loader does not support"
        )
    max_frames = int(tables[0].shape[1])
    has_mid = any(k.startswith("mid_block.") for k in dkeys)
    base = "sdxl" if len(levels) == 3 else "sd15"
    hotshot: dict[str, Any] = {}  # HotShot-XL: its own window and SDXL's own noise schedule
    if layout == "hotshot":
        from .hotshot import HOTSHOT_WINDOW

        if base != "sdxl" or has_mid or layers != 2:
            raise MotionModuleError(
                f"HotShot-XL-style keys, but {len(levels)} down levels, {layers} modules per level"
                f"{' and a mid block' if has_mid else ''}; HotShot-XL has 3 levels of 2 and no mid block (SDXL)"
            )
        version = "hotshot"
        hotshot = {"window": HOTSHOT_WINDOW, "auto_beta_schedule": "base"}
    elif base == "sdxl":
        version = "sdxl"
    elif has_mid:
        version = "v2"
    elif max_frames == 32:
        version = "v3"
    elif max_frames == 24:
        version = "v1"
    else:
        version = "sd15-custom"
    return MotionModuleInfo(
        version=version,
        base=base,
        layout=layout,
        block_out_channels=tuple(widths),
        layers_per_block=layers,
        transformer_layers=max(transformer_layers, 1),
        has_mid_block=has_mid,
        max_frames=max_frames,
        **hotshot,
    )


def inspect_motion_module(path: str | os.PathLike) -> MotionModuleInfo:
    """`MotionModuleInfo` of a motion-module file or diffusers folder (reads the weights)."""
    return load_motion_state(path)[1]


def load_motion_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], MotionModuleInfo]:
    """The motion module at `path` as a diffusers-named state dict plus what it is.

    `path` is an original-layout, diffusers-layout or HotShot-XL single file, a diffusers ``MotionAdapter``
    folder (its ``config.json`` then supplies heads and groups) or HotShot-XL's ``unet`` folder (or the
    pipeline folder holding it), whose temporal layers are used (`hotshot.load_hotshot_folder`).
    """
    path = Path(path)
    if path.is_dir():
        from .hotshot import hotshot_unet_folder, load_hotshot_folder

        if hotshot_unet_folder(path) is not None:
            return load_hotshot_folder(path)
        if not is_diffusers_motion_folder(path):
            raise MotionModuleError(
                f"{path}: a folder without a MotionAdapter config.json (nor HotShot-XL's unet folder)"
            )
        config = json.loads((path / "config.json").read_text())
        state = _diffusers_weights(path)
        info = inspect_state_dict(state, "diffusers")
        heads = config.get("motion_num_attention_heads", DEFAULT_HEADS)
        if isinstance(heads, (list, tuple)):
            heads = heads[0] if len(set(heads)) == 1 else DEFAULT_HEADS
        info = MotionModuleInfo(
            **{
                **info.__dict__,
                "num_attention_heads": int(heads),
                "norm_num_groups": int(config.get("motion_norm_num_groups", DEFAULT_NORM_GROUPS)),
            }
        )
        return state, info
    try:
        state = read_weights(path)
        info = inspect_state_dict(state)
    except MotionModuleError as exc:
        raise MotionModuleError(f"{path.name}: {exc}") from None
    if info.layout == "hotshot":
        from .hotshot import hotshot_to_diffusers

        state = hotshot_to_diffusers(state)
    elif info.layout == "original":
        state = original_to_diffusers(state)
    return state, info


def load_motion_adapter(path: str | os.PathLike):
    """A float32 ``diffusers.MotionAdapter`` with the weights at `path`, and its `MotionModuleInfo`.

    Every tensor of the file must land in the adapter and every adapter tensor must come from the file
    (positional tables included), so a truncated or foreign file fails loudly instead of animating noise.
    """
    require("diffusers")
    from diffusers import MotionAdapter

    state, info = load_motion_state(path)
    adapter = MotionAdapter(**info.adapter_config())
    own = adapter.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise MotionModuleError(
            f"{Path(path).name} ({info.describe()}) does not fit a MotionAdapter: {details}"
        )
    adapter.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return adapter.eval().requires_grad_(False), info


def save_motion_module(
    state_dict: StateDict,
    path: str | os.PathLike,
    layout: str = "original",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a diffusers-named motion module state dict as one ``.safetensors`` in `layout`."""
    require("safetensors")
    from safetensors.torch import save_file

    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original' or 'diffusers', not {layout!r}")
    tensors = diffusers_to_original(state_dict) if layout == "original" else dict(state_dict)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}) or None
    )
    return path


# --------------------------------------------------------------------------------------------------
# Motion LoRAs

_MOTION_LORA_ORIGINAL = re.compile(
    _BLOCK + r"\.temporal_transformer\.transformer_blocks\.(?P<k>\d+)\.attention_blocks\.(?P<n>[01])\."
    r"processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<side>down|up)\.weight"
)
_MOTION_LORA_DIFFUSERS = re.compile(
    r"(?:unet\.)?(?P<module>(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.\d+\.transformer_blocks\."
    r"\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))\.(?P<side>lora_A|lora_B|lora\.down|lora\.up)\.weight"
)


def motion_lora_to_diffusers(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """A motion LoRA (original AnimateDiff or diffusers format) in diffusers' LoRA names.

    Output keys are ``unet.<module>.lora_A.weight`` (down) and ``unet.<module>.lora_B.weight`` (up),
    with no alphas: the original format applies ``up @ down`` unscaled, which is what a missing alpha
    means to diffusers (alpha = rank).
    """
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        if m := _MOTION_LORA_ORIGINAL.fullmatch(key):
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            module = (
                f"{m['block']}.motion_modules.{m['module']}.transformer_blocks.{m['k']}."
                f"attn{int(m['n']) + 1}.{proj}"
            )
            side = "lora_A" if m["side"] == "down" else "lora_B"
        elif m := _MOTION_LORA_DIFFUSERS.fullmatch(key):
            module = m["module"]
            side = "lora_A" if m["side"] in ("lora_A", "lora.down") else "lora_B"
        else:
            unexpected.append(key)
            continue
        out[f"unet.{module}.{side}.weight"] = tensor
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:4])
        raise MotionModuleError(
            f"{len(unexpected)} key(s) are not motion-LoRA keys (expected "
            f"...attention_blocks.N.processor.to_q_lora.down.weight): {shown}"
        )
    if not out:
        raise MotionModuleError("no motion-LoRA tensors found")
    stems = {k.rsplit(".lora_", 1)[0] for k in out}
    incomplete = sorted(
        s for s in stems if f"{s}.lora_A.weight" not in out or f"{s}.lora_B.weight" not in out
    )
    if incomplete:
        raise MotionModuleError(
            f"{len(incomplete)} motion-LoRA layer(s) miss their down or up matrix, e.g. {incomplete[0]}"
        )
    return out


def load_motion_lora(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A motion-LoRA file in diffusers' LoRA names (see `motion_lora_to_diffusers`)."""
    try:
        return motion_lora_to_diffusers(read_weights(path))
    except MotionModuleError as exc:
        raise MotionModuleError(f"{Path(path).name}: {exc}") from None


def motion_lora_to_original(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Diffusers-named motion-LoRA tensors (from `motion_lora_to_diffusers`) in the original format."""
    out: dict[str, torch.Tensor] = {}
    pattern = re.compile(
        r"unet\.(?P<block>.+?)\.motion_modules\.(?P<module>\d+)\.transformer_blocks\.(?P<k>\d+)\."
        r"attn(?P<n>[12])\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.(?P<side>lora_A|lora_B)\.weight"
    )
    for key, tensor in state_dict.items():
        m = pattern.fullmatch(key)
        if m is None:
            raise MotionModuleError(f"not a diffusers motion-LoRA key: {key}")
        proj = "to_out" if m["proj"] == "to_out.0" else m["proj"]
        side = "down" if m["side"] == "lora_A" else "up"
        out[
            (
                f"{m['block']}.motion_modules.{m['module']}.temporal_transformer.transformer_blocks.{m['k']}."
                f"attention_blocks.{int(m['n']) - 1}.processor.{proj}_lora.{side}.weight"
            )
        ] = tensor
    return out
