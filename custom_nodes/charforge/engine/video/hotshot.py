"""HotShot-XL temporal layers: the published file read into diffusers' motion U-Net.

HotShot-XL is an SDXL text-to-video model made of SDXL's own U-Net plus 15 temporal transformers, published
as one file of only those layers (``hsxl_temporal_layers.safetensors``, which goes into
``models/animatediff_models``). Its layout, per temporal transformer ``<block>.temporal_attentions.<j>``
(``down_blocks.{0,1,2}`` two each, ``up_blocks.{0,1,2}`` three each, none in the mid block):

===================================================================  ====================================
HotShot-XL                                                           diffusers ``MotionAdapter``
===================================================================  ====================================
``norm`` (GroupNorm, 32 groups) / ``proj_in`` / ``proj_out``          the same, under ``motion_modules.<j>``
``transformer_blocks.0.attention_blocks.{0,1}.{to_q,to_k,to_v,to_out.0}``  ``transformer_blocks.0.attn{1,2}.…``
``transformer_blocks.0.attention_blocks.{0,1}.pos_encoder.positional_encoding``  ``transformer_blocks.0.pos_embed.pe``
``transformer_blocks.0.norms.{0,1}`` / ``ff_norm`` / ``ff.net.{0.proj,2}``    ``norm1`` / ``norm2`` / ``norm3`` / ``ff``
===================================================================  ====================================

Everything else matches AnimateDiff's temporal transformer as diffusers builds it (``AnimateDiffTransformer3D``):
8 heads of C/8, both attention blocks self-attention over the frames of one pixel with the sinusoidal table
added to the normalised input of each, GEGLU feed-forward, LayerNorms, residuals around each part and around
the whole module. One thing differs: HotShot-XL's GroupNorm normalises **each frame on its own** (it folds the
frames into the batch first), where diffusers' AnimateDiff module computes the group statistics over all
frames of the clip together. `FrameGroupNorm` is that per-frame norm under the same parameter names; the
video model swaps it in for every temporal module of a HotShot-XL U-Net (`use_per_frame_norms`), so the
rest of the engine (context windows, prompt travel, video to video, LoRA adapters) runs unchanged.

Each attention block stores its own copy of the positional table ([1, 24, C]: HotShot-XL's ``max_length``);
they are the same sinusoids, and diffusers keeps one per transformer block, so the loader checks that the
two copies agree and uses the first. The model was trained on 8-frame clips (1 s at 8 fps): its native
context window is 8 frames, and at most 24 fit its table. It was trained with SDXL's own noise schedule
(diffusers' ``scaled_linear``), not AnimateDiff's ``linear`` one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.nn import functional as F

from ...deps import require
from .motion import MotionModuleError, original_to_diffusers, read_weights, shown_keys

StateDict = Mapping[str, torch.Tensor]

HOTSHOT_WINDOW = 8  # the clip length HotShot-XL was trained on
HOTSHOT_TABLE = "pos_encoder.positional_encoding"

_KEY = re.compile(
    r"(?P<block>down_blocks\.\d+|up_blocks\.\d+|mid_block)\.temporal_attentions\.(?P<module>\d+)\.(?P<rest>.+)"
)


def is_hotshot_layout(keys) -> bool:
    """True when the tensor names are HotShot-XL's (``temporal_attentions`` with ``positional_encoding``)."""
    keys = list(keys)
    return any(".temporal_attentions." in k for k in keys) and any(k.endswith(HOTSHOT_TABLE) for k in keys)


def hotshot_to_diffusers(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """A HotShot-XL temporal-layer state dict in diffusers ``MotionAdapter`` names.

    The names are first brought to AnimateDiff's original layout (``temporal_attentions.<j>.`` ->
    ``motion_modules.<j>.temporal_transformer.``, ``positional_encoding`` -> ``pe``), which
    `motion.original_to_diffusers` then converts; keys that fit neither are refused by name.
    """
    renamed: dict[str, torch.Tensor] = {}
    foreign = []
    for key, tensor in state_dict.items():
        m = _KEY.fullmatch(key)
        if m is None:
            foreign.append(key)
            continue
        rest = m["rest"]
        if rest.endswith(HOTSHOT_TABLE):
            rest = rest[: -len("positional_encoding")] + "pe"
        renamed[f"{m['block']}.motion_modules.{m['module']}.temporal_transformer.{rest}"] = tensor
    if foreign:
        raise MotionModuleError(
            f"{len(foreign)} key(s) are not HotShot-XL temporal-layer keys "
            f"(<block>.temporal_attentions.<j>...): {shown_keys(foreign, 4)}"
        )
    try:
        return original_to_diffusers(renamed)
    except MotionModuleError as exc:
        # Say it in the file's own names.
        message = (
            str(exc).replace(".temporal_transformer.", ".").replace("motion_modules", "temporal_attentions")
        )
        raise MotionModuleError(
            message.replace("an AnimateDiff motion module", "a HotShot-XL module")
        ) from None


def diffusers_to_hotshot(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """A ``MotionAdapter`` state dict written in HotShot-XL's names (the inverse of `hotshot_to_diffusers`)."""
    from .motion import diffusers_to_original

    out = {}
    for key, tensor in diffusers_to_original(state_dict).items():
        key = key.replace(".temporal_transformer.", ".").replace(".motion_modules.", ".temporal_attentions.")
        if key.endswith("pos_encoder.pe"):
            key = key[: -len("pe")] + "positional_encoding"
        out[key] = tensor
    return out


class FrameGroupNorm(torch.nn.GroupNorm):
    """GroupNorm that normalises each frame of a (B, C, F, H, W) clip on its own, as HotShot-XL's temporal
    layers do; a 4-D input is normalised as usual. Same parameters as ``nn.GroupNorm``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.GroupNorm's argument name
        if input.dim() != 5:
            return super().forward(input)
        b, c, f, h, w = input.shape
        frames = input.transpose(1, 2).reshape(b * f, c, h, w)
        out = F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)
        return out.reshape(b, f, c, h, w).transpose(1, 2)


def use_per_frame_norms(unet: torch.nn.Module) -> int:
    """Give every temporal transformer of a motion U-Net HotShot-XL's per-frame GroupNorm; returns how many.

    The norms keep their parameters (the same tensor objects, names, dtype and device).
    """
    count = 0
    for name, module in list(unet.named_modules()):
        if ".motion_modules." not in f".{name}." or not name.rsplit(".", 1)[-1].isdigit():
            continue
        norm = getattr(module, "norm", None)
        if type(norm) is not torch.nn.GroupNorm:
            continue
        per_frame = FrameGroupNorm(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
        per_frame.weight, per_frame.bias = norm.weight, norm.bias  # the same parameters, nothing copied
        module.norm = per_frame
        count += 1
    return count


# --------------------------------------------------------------------------------------------------
# HotShot-XL's own diffusers-style folder

HOTSHOT_UNET_CLASS = "UNet3DConditionModel"  # HotShot-XL's own class name in its unet/config.json


def hotshot_unet_folder(path: str | os.PathLike) -> Path | None:
    """HotShot-XL's ``unet`` folder when `path` is it or the pipeline folder holding it (a clone of the
    published repository), else None. Recognised by ``config.json``'s ``_class_name``."""
    path = Path(path)
    for folder in (path, path / "unet"):
        config = folder / "config.json"
        if not config.is_file():
            continue
        try:
            if json.loads(config.read_text()).get("_class_name") == HOTSHOT_UNET_CLASS:
                return folder
        except (OSError, ValueError):
            continue
    return None


def temporal_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """The ``temporal_attentions`` tensors of a full HotShot-XL U-Net weight file (a safetensors file is read
    tensor by tensor, so the spatial layers are never loaded)."""
    if weights.suffix == ".safetensors":
        require("safetensors")
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt", device="cpu") as file:
            names = [k for k in file.keys() if ".temporal_attentions." in k]  # noqa: SIM118 - not a dict
            return {k: file.get_tensor(k) for k in names}
    return {k: v for k, v in read_weights(weights).items() if ".temporal_attentions." in k}


def load_hotshot_folder(path: str | os.PathLike):
    """The temporal layers of HotShot-XL's ``unet`` folder (at `path` or ``path/unet``) as a diffusers-named
    state dict plus its `MotionModuleInfo`.

    The folder holds the whole 3-D U-Net; HotShot-XL's own inference does the same with another SDXL
    (``--spatial_unet_base``): only the temporal layers are taken, the base checkpoint gives the rest.
    """
    from .motion import diffusers_weight_file, inspect_state_dict

    folder = hotshot_unet_folder(path)
    if folder is None:
        raise MotionModuleError(
            f"{path}: not HotShot-XL's unet folder (config.json _class_name {HOTSHOT_UNET_CLASS})"
        )
    temporal = temporal_tensors(diffusers_weight_file(folder))
    if not is_hotshot_layout(temporal):
        raise MotionModuleError(
            f"{folder}: a {HOTSHOT_UNET_CLASS} folder without HotShot-XL temporal layers "
            "(<block>.temporal_attentions.<j> with positional_encoding tables)"
        )
    try:
        info = inspect_state_dict(temporal, "hotshot")
    except MotionModuleError as exc:
        raise MotionModuleError(f"{folder}: {exc}") from None
    return hotshot_to_diffusers(temporal), info
