"""ControlNets inside the video denoising loop: per-frame control images steering every U-Net call.

Loading. A ControlNet file from ComfyUI's ``models/controlnet`` comes in two layouts: the original one
(``control_model.input_blocks...``, ``zero_convs.N.0``, ``middle_block_out.0``, ``input_hint_block.N``, as the
control_v11p_sd15_*.pth files are) and diffusers' (``controlnet_cond_embedding...``, ``controlnet_down_blocks.N``,
one ``diffusion_pytorch_model.safetensors``); a diffusers folder (``config.json`` + weights) loads as it is. For a
single file the configuration is derived offline, with no hub: the U-Net half is the video model's own 2D U-Net
configuration (a ControlNet is a copy of its base's encoder), and the conditioning embedding's widths are read from
the file's ``input_hint_block`` / ``controlnet_cond_embedding`` tensor shapes. Every tensor of the file must be
used and every parameter filled; a ControlNet for another base is refused, naming the file.

Applying. Each window's U-Net call is preceded by one ControlNet call per ControlNet on the same latents (the
window's frames as a batch, negative then positive prompt when CFG is on), with the window's control frames; the
residuals of several ControlNets are summed and added to the U-Net's skip connections and middle block, as
diffusers' ``AnimateDiffControlNetPipeline`` does (guess mode off). A ControlNet acts on step ``i`` of ``n`` when
``start <= i / n`` and ``(i + 1) / n <= end``; outside it is not run (its residuals would be multiplied by 0).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.single_file import unet_to_ldm
from ..models.tensor_files import read_tensors

LDM_PREFIX = "control_model."
DIFFUSERS_MARK = "controlnet_cond_embedding.conv_in.weight"
LDM_MARK = "input_hint_block.0.weight"


class ControlNetError(ValueError):
    """A ControlNet file that cannot be used with this video model."""


@dataclass
class VideoControl:
    """One ControlNet steering a clip. ``frames`` (N, H, W, 3) float 0..1, resampled to the clip's frames and
    scaled to cover its size; ``strength`` multiplies its residuals; it acts from ``start`` to ``end`` (fractions
    of the steps run)."""

    net: Any  # diffusers ControlNetModel
    frames: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    name: str = ""

    def validate(self) -> None:
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(
                f"ControlNet {self.name or ''} start/end must satisfy 0 <= start < end <= 1 "
                f"(got {self.start}, {self.end})"
            )
        if self.frames.dim() not in (3, 4) or self.frames.shape[-1] < 3:
            raise ValueError(
                f"control frames must be an IMAGE batch (N, H, W, 3); got shape {tuple(self.frames.shape)}"
            )

    def active(self, step: int, steps: int) -> bool:
        return not (step / steps < self.start or (step + 1) / steps > self.end)


# --------------------------------------------------------------------------------------------------
# Loading


def _ldm_names(keys: list[str], unet_config: dict) -> dict[str, str]:
    """diffusers ControlNetModel parameter name -> its name in the original layout (no prefix)."""
    unet_part = [k for k in keys if not k.startswith(("controlnet_", "controlnet_cond_embedding"))]
    converted = unet_to_ldm({k: k for k in unet_part}, unet_config)
    names = {diffusers: ldm for ldm, diffusers in converted.items()}
    embedding = sorted(
        {int(k.split(".")[2]) for k in keys if k.startswith("controlnet_cond_embedding.blocks.")}
    )
    for key in keys:
        module, _, param = key.rpartition(".")
        if module.startswith("controlnet_down_blocks."):
            names[key] = f"zero_convs.{module.split('.')[1]}.0.{param}"
        elif module == "controlnet_mid_block":
            names[key] = f"middle_block_out.0.{param}"
        elif module == "controlnet_cond_embedding.conv_in":
            names[key] = f"input_hint_block.0.{param}"
        elif module.startswith("controlnet_cond_embedding.blocks."):
            names[key] = f"input_hint_block.{2 * (int(module.split('.')[2]) + 1)}.{param}"
        elif module == "controlnet_cond_embedding.conv_out":
            names[key] = f"input_hint_block.{2 * (len(embedding) + 1)}.{param}"
    return names


def _embedding_widths(state: dict[str, torch.Tensor], ldm: bool) -> tuple[int, ...]:
    """The conditioning embedding's widths from its convolutions: conv_in, then pairs (same width, stride 2)."""
    if ldm:
        convs = sorted(
            (int(k.split(".")[1]), v.shape[0])
            for k, v in state.items()
            if k.startswith("input_hint_block.") and k.endswith(".weight")
        )
        outs = [width for _, width in convs][:-1]  # the last one is conv_out (the U-Net's first width)
    else:
        blocks = sorted(
            (int(k.split(".")[2]), v.shape[0])
            for k, v in state.items()
            if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight")
        )
        outs = [state["controlnet_cond_embedding.conv_in.weight"].shape[0], *[w for _, w in blocks]]
    return tuple(outs[0::2])


def controlnet_config(unet_config: dict, state: dict[str, torch.Tensor], ldm: bool) -> dict:
    """A ControlNetModel configuration for `state` on a base whose 2D U-Net has `unet_config`."""
    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in unet_config.items() if k in accepted}
    config["conditioning_embedding_out_channels"] = _embedding_widths(state, ldm)
    hint = state[LDM_MARK if ldm else DIFFUSERS_MARK]
    config["conditioning_channels"] = int(hint.shape[1])
    return config


def load_controlnet(path: str | Path, unet_config: dict, dtype: torch.dtype, device: torch.device):
    """A diffusers ``ControlNetModel`` from a file (original or diffusers layout) or a diffusers folder, for a base
    whose 2D U-Net has `unet_config`; never touches the network."""
    from diffusers import ControlNetModel

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ControlNetError(f"{path} is a folder without config.json (not a diffusers ControlNet)")
        net = ControlNetModel.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
        _check_base(net, unet_config, path)
        return net.to(device).eval().requires_grad_(False)
    if not path.is_file():
        raise FileNotFoundError(
            f"ControlNet not found: {path} (put it into ComfyUI's models/controlnet folder)"
        )
    state = read_tensors(path)
    if any(k.startswith(LDM_PREFIX) for k in state):
        state = {k[len(LDM_PREFIX) :]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    ldm = LDM_MARK in state
    if not ldm and DIFFUSERS_MARK not in state:
        raise ControlNetError(
            f"{path.name} is not a ControlNet this pack reads (neither the original layout with "
            "input_hint_block nor diffusers' controlnet_cond_embedding); T2I adapters and control LoRAs are not supported"
        )
    config = controlnet_config(unet_config, state, ldm)
    with torch.device("meta"):
        net = ControlNetModel(**config)
    keys = list(net.state_dict())
    if ldm:
        names = _ldm_names(keys, unet_config)
        weights = {k: state[names[k]] for k in keys if k in names and names[k] in state}
        used = {names[k] for k in weights}
    else:
        weights = {k: state[k] for k in keys if k in state}
        used = set(weights)
    missing = [k for k in keys if k not in weights]
    unused = sorted(set(state) - used)
    shapes = [k for k in weights if tuple(weights[k].shape) != tuple(net.state_dict()[k].shape)]
    if missing or unused or shapes:
        raise ControlNetError(
            f"{path.name} does not fit this base model's U-Net ({len(missing)} parameters missing, "
            f"{len(unused)} file tensors unused, {len(shapes)} of another shape; e.g. "
            f"{(missing or unused or shapes)[:3]}): a ControlNet for another base (SD1.5 vs SDXL)?"
        )
    net.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _check_base(net, unet_config: dict, path: Path) -> None:
    for key in ("block_out_channels", "cross_attention_dim"):
        ours, theirs = unet_config.get(key), net.config.get(key)
        if ours is not None and theirs is not None and _listed(ours) != _listed(theirs):
            raise ControlNetError(
                f"{path.name}: {key} {theirs} does not match the base model's {ours} (a ControlNet for another base?)"
            )


def _listed(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------------------------------
# Frames and the U-Net call


def fit_control_frames(images: torch.Tensor, frames: int, width: int, height: int) -> torch.Tensor:
    """(N, H, W, 3) 0..1 -> (frames, 3, height, width) 0..1: resampled in time, scaled to cover, centre-cropped."""
    if images.dim() == 3:
        images = images[None]
    count = images.shape[0]
    index = (
        [0] * frames if count == 1 else [round(i * (count - 1) / max(frames - 1, 1)) for i in range(frames)]
    )
    chosen = images[index, :, :, :3].permute(0, 3, 1, 2).float()
    h, w = chosen.shape[-2:]
    scale = max(width / w, height / h)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        chosen = F.interpolate(
            chosen, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return chosen[:, :, top : top + height, left : left + width].clamp(0, 1)


@dataclass
class WindowControl:
    """One ControlNet's input for one window: its control frames (2L or L, 3, H, W) in the model's dtype."""

    net: Any
    cond: torch.Tensor
    strength: float


def window_controls(
    controls: list[VideoControl], fitted: list[torch.Tensor], index: torch.Tensor, guidance: bool
) -> list[WindowControl]:
    """The window's slice of each ControlNet's frames (twice with CFG: negative and positive halves)."""
    out = []
    for control, frames in zip(controls, fitted, strict=True):
        cond = frames.index_select(0, index)
        out.append(
            WindowControl(control.net, torch.cat([cond, cond]) if guidance else cond, control.strength)
        )
    return out


def control_residuals(
    active: list[WindowControl], x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, kwargs: dict
) -> dict:
    """The U-Net keyword arguments carrying the summed residuals of the `active` ControlNets for the batch `x`
    (B, C, L, h, w); empty without any."""
    if not active:
        return {}
    batch, channels, length = x.shape[:3]
    flat = x.transpose(1, 2).reshape(batch * length, channels, *x.shape[3:])
    extra = {}
    added = kwargs.get("added_cond_kwargs")
    if added is not None:  # SDXL: per-clip pooled text and size ids, one per frame for the 2D ControlNet
        extra["added_cond_kwargs"] = {k: v.repeat_interleave(length, dim=0) for k, v in added.items()}
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for item in active:
        d, m = item.net(
            flat,
            timestep,
            encoder_hidden_states=text,
            controlnet_cond=item.cond,
            conditioning_scale=item.strength,
            guess_mode=False,
            return_dict=False,
            **extra,
        )
        down = list(d) if down is None else [a + b for a, b in zip(down, d, strict=True)]
        mid = m if mid is None else mid + m
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


_LOADED: dict[tuple, Any] = {}


def controlnet_for(model, path: str | Path):
    """`load_controlnet` for a loaded `VideoModel`, kept while the file, the model and its dtype stay the same
    (the last two ControlNets loaded are kept)."""
    from .models import _file_key

    key = (
        _file_key(str(path)),
        model.arch,
        tuple(model.unet2d_config.get("block_out_channels", ())),
        str(model.dtype),
        str(model.device),
    )
    if key not in _LOADED:
        while len(_LOADED) >= 2:
            _LOADED.pop(next(iter(_LOADED)))
        if not model.unet2d_config:
            raise ControlNetError("this video model does not record its base U-Net configuration")
        _LOADED[key] = load_controlnet(path, model.unet2d_config, model.dtype, model.device)
    return _LOADED[key]
