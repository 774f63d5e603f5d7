"""Learned frame interpolation with RIFE (Practical-RIFE's IFNet, the v4.7 architecture: RIFE 4.7, 4.8, 4.9).

The files users download (``rife47.pth`` / ``rife49.pth`` as ComfyUI-Frame-Interpolation stores them, or
Practical-RIFE's ``train_log/flownet.pkl``, whose keys carry a ``module.`` prefix) are plain state dicts of
this network; the version is read from the tensors (`detect_version`), never from the file name.

The network, as the real checkpoints define it:

- ``encode``: a 3 -> 16 channel 3x3 convolution with stride 2 and a 16 -> 4 channel 4x4 transposed convolution
  with stride 2 (no activation between them): 4 feature channels per frame at full resolution.
- ``block0`` .. ``block3`` (width 192, 128, 96, 64), each run at 1/8, 1/4, 1/2 and 1/1 of the (padded) frame
  size (`SCALES`, divided by the user's ``scale``): two stride-2 3x3 convolutions with LeakyReLU(0.2)
  (``conv0.0.0`` / ``conv0.1.0``), eight residual 3x3 convolutions whose branch is multiplied by a learned
  per-channel ``beta`` before the skip is added and LeakyReLU(0.2) applied (``convblock.N.conv`` / ``.beta``),
  and a 4x4 stride-2 transposed convolution to 24 channels followed by a 2x pixel shuffle (``lastconv.0``)
  giving 6 channels at the block's resolution: two flows (4), the blend mask's logit (1) and one unused channel.
  Block 0 sees both frames, both feature maps and the timestep (15 channels); later blocks see both frames
  and both feature maps warped by the current flow, the timestep, the previous mask (16) and the current flow
  (4, resized to the block's resolution and scaled with it) and predict a flow correction and a new mask.
- The output is frame A warped by the first flow and frame B warped by the second, blended by
  ``sigmoid(mask)``. Warping samples bilinearly (border padding, corner-aligned) at pixel + flow.

The timestep is an input, so any in-between time is one forward pass: x2 asks for t = 0.5, x4 for 0.25, 0.5 and
0.75 (no recursion). ``ensemble`` also runs every block on the reversed pair (B, A, 1 - t) and averages the
two predictions, as Practical-RIFE's ensemble option does (about twice the work).

Frames are padded with zeros to a multiple of 64 (of 64 / scale for scale < 1) so every level divides
evenly, and cropped back afterwards. On a GPU the network runs in fp16 by default (bf16 or fp32 on request);
warping always computes its sampling coordinates in fp32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..control import Control, or_default

ARCHITECTURE = "4.7"
SUPPORTED = "RIFE 4.7 / 4.8 / 4.9 (Practical-RIFE IFNet, v4.7 architecture)"
SCALES = (8.0, 4.0, 2.0, 1.0)
WIDTHS = (192, 128, 96, 64)
SCALE_CHOICES = (0.25, 0.5, 1.0, 2.0, 4.0)
RESBLOCKS = 8
FEATURES = 4  # channels of `encode`'s output per frame


class UnsupportedRIFEError(ValueError):
    """The file is not a RIFE IFNet state dict of a supported version (the message says what it is)."""


# --------------------------------------------------------------------------------------------------
# Network


def _conv_act(cin: int, cout: int, stride: int) -> nn.Sequential:
    # Sequential(conv, act) so the keys are `<name>.0.weight` / `<name>.0.bias`, as in the checkpoints.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2, inplace=True))


class ResidualConv(nn.Module):
    """LeakyReLU(conv(x) * beta + x), beta learned per channel (keys ``conv.*`` and ``beta``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        return F.leaky_relu(torch.addcmul(x, self.conv(x), self.beta), 0.2)


class FlowBlock(nn.Module):
    """One IFNet level: features at 1/scale of the input -> (flow at full size, mask logit)."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.conv0 = nn.Sequential(_conv_act(in_channels, width // 2, 2), _conv_act(width // 2, width, 2))
        self.convblock = nn.Sequential(*(ResidualConv(width) for _ in range(RESBLOCKS)))
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(width, 4 * 6, 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x, flow, scale: float):
        if scale != 1:
            x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        if flow is not None:
            small = (
                flow
                if scale == 1
                else F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
            )
            x = torch.cat((x, small / scale), 1)
        out = self.lastconv(self.convblock(self.conv0(x)))
        if scale != 1:
            out = F.interpolate(out, scale_factor=scale, mode="bilinear", align_corners=False)
        return out[:, :4] * scale, out[:, 4:5]


_grids: dict[tuple, torch.Tensor] = {}


def warp(image, flow):
    """Sample `image` (B, C, H, W) at each pixel + `flow` (B, 2, H, W, in pixels), bilinear, border padded.

    Always in float32: in a half-precision grid a coordinate near the right edge of a 1024-pixel frame is only
    good to about 4 pixels (bf16) or a quarter pixel (fp16).
    """
    b, _, h, w = flow.shape
    key = (flow.device, h, w)
    grid = _grids.get(key)
    if grid is None:
        ys = torch.linspace(-1.0, 1.0, h, device=flow.device, dtype=torch.float32)
        xs = torch.linspace(-1.0, 1.0, w, device=flow.device, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), 0).unsqueeze(0)
        if len(_grids) > 16:
            _grids.clear()
        _grids[key] = grid
    norm = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=flow.device, dtype=torch.float32)
    coords = (grid + flow.float() * norm.view(1, 2, 1, 1)).permute(0, 2, 3, 1)
    out = F.grid_sample(image.float(), coords, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(image.dtype)


def _swap(flow):
    """The flow pair seen from the other frame: (to A, to B) -> (to B, to A)."""
    return torch.cat((flow[:, 2:4], flow[:, :2]), 1)


class IFNet(nn.Module):
    """RIFE's IFNet, v4.7 architecture (RIFE 4.7 - 4.9 checkpoints load into it with ``strict=True``)."""

    def __init__(self):
        super().__init__()
        self.block0 = FlowBlock(3 + 3 + 2 * FEATURES + 1, WIDTHS[0])
        self.block1 = FlowBlock(3 + 3 + 2 * FEATURES + 1 + 1 + 4, WIDTHS[1])
        self.block2 = FlowBlock(3 + 3 + 2 * FEATURES + 1 + 1 + 4, WIDTHS[2])
        self.block3 = FlowBlock(3 + 3 + 2 * FEATURES + 1 + 1 + 4, WIDTHS[3])
        self.encode = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ConvTranspose2d(16, FEATURES, 4, 2, 1))

    def forward(self, img0, img1, timestep, scales: Sequence[float] = SCALES, ensemble: bool = False):
        """Frames (B, 3, H, W) in 0..1 with H, W multiples of 32 * max(scales) / 8; timestep (B, 1, 1, 1)."""
        n, _, h, w = img0.shape
        t = timestep.to(img0.dtype).expand(n, 1, h, w)
        feat0, feat1 = self.encode(img0), self.encode(img1)
        flow = mask = None
        warped0, warped1 = img0, img1
        for block, scale in zip((self.block0, self.block1, self.block2, self.block3), scales, strict=True):
            if flow is None:
                flow, mask = block(torch.cat((img0, img1, feat0, feat1, t), 1), None, scale)
                if ensemble:
                    back_flow, back_mask = block(torch.cat((img1, img0, feat1, feat0, 1 - t), 1), None, scale)
                    flow = (flow + _swap(back_flow)) / 2
                    mask = (mask - back_mask) / 2
            else:
                assert mask is not None  # the first block sets flow and mask together
                wfeat0, wfeat1 = warp(feat0, flow[:, :2]), warp(feat1, flow[:, 2:4])
                delta, new_mask = block(
                    torch.cat((warped0, warped1, wfeat0, wfeat1, t, mask), 1), flow, scale
                )
                if ensemble:
                    back_delta, back_mask = block(
                        torch.cat((warped1, warped0, wfeat1, wfeat0, 1 - t, -mask), 1), _swap(flow), scale
                    )
                    delta = (delta + _swap(back_delta)) / 2
                    new_mask = (new_mask - back_mask) / 2
                flow, mask = flow + delta, new_mask
            warped0, warped1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:4])
        assert mask is not None  # zip(strict=True) ran all four blocks
        weight = torch.sigmoid(mask)
        return warped0 * weight + warped1 * (1 - weight)


# --------------------------------------------------------------------------------------------------
# Files


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .pth / .pkl / .ckpt (``torch.load(weights_only=True)``) or .safetensors file.

    A ``state_dict`` / ``model`` wrapper is unwrapped and ``module.`` prefixes (DataParallel saves, as in
    Practical-RIFE's ``flownet.pkl``) are stripped.
    """
    path = Path(path)
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors.torch import load_file

        data: Any = load_file(str(path), device="cpu")
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            raise UnsupportedRIFEError(f"{path.name}: not a readable PyTorch weights file ({exc})") from exc
    for wrapper in ("state_dict", "model", "params"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict):
        raise UnsupportedRIFEError(f"{path.name}: holds a {type(data).__name__}, not a state dict")
    out = {}
    for key, value in data.items():
        if not torch.is_tensor(value):
            continue
        key = str(key)
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = IFNet()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def detect_version(state: dict[str, torch.Tensor]) -> str:
    """``"4.7"`` for a RIFE 4.7 - 4.9 IFNet state dict; else `UnsupportedRIFEError` saying what the file is."""
    keys = set(state)
    if not any(k.startswith("block0.") for k in keys):
        sample = ", ".join(sorted(keys)[:4]) or "no tensors"
        raise UnsupportedRIFEError(
            f"not a RIFE IFNet checkpoint (no block0.* tensors; keys start {sample}). Supported: {SUPPORTED}."
        )
    encode = state.get("encode.0.weight")
    if any(k.startswith("block4.") for k in keys):
        found = "RIFE 4.22 or later (5 flow blocks)"
    elif any(k.startswith("encode.cnn0.") for k in keys):
        found = "RIFE 4.13 or later (Head feature encoder)"
    elif encode is not None and encode.shape[0] == 32:
        found = "RIFE 4.10 - 4.12 (32-channel feature encoder)"
    elif encode is None:
        found = (
            "RIFE 4.6 or earlier (no feature encoder)"
            if not any(k.startswith(("contextnet.", "unet.")) for k in keys)
            else "RIFE 4.0 - 4.3 with refinement U-Net"
        )
    else:
        expected = _expected_shapes()
        missing = sorted(set(expected) - keys)
        extra = sorted(keys - set(expected))
        wrong = sorted(k for k in set(expected) & keys if tuple(state[k].shape) != expected[k])
        if not (missing or extra or wrong):
            return ARCHITECTURE
        details = []
        for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
            if names:
                details.append(f"{label}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''}")
        found = "an IFNet variant with a different layout (" + "; ".join(details) + ")"
    raise UnsupportedRIFEError(f"unsupported RIFE version: {found}. Supported: {SUPPORTED}.")


@dataclass
class LoadedRIFE:
    model: IFNet
    version: str
    path: str
    device: torch.device
    dtype: torch.dtype


_cache: dict[tuple, LoadedRIFE] = {}
_refused: dict[tuple, str] = {}  # (path, mtime, size) -> why it is not a supported RIFE file


def pick_device_dtype(
    device: str | torch.device | None = None, dtype: str = "auto"
) -> tuple[torch.device, torch.dtype]:
    """auto: CUDA if present, in fp16 (Practical-RIFE's own half-precision mode: more mantissa than bf16 for
    the flows); fp32 on CPU. bf16 on request."""
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype != "auto":
        if dtype not in names:
            raise ValueError(f"dtype must be auto, fp32, fp16 or bf16; got {dtype!r}")
        return dev, names[dtype]
    if dev.type != "cuda":
        return dev, torch.float32
    return dev, torch.float16


def load_rife(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: str = "auto"
) -> LoadedRIFE:
    """Read, check (`detect_version`) and load a RIFE file; the last one loaded stays cached."""
    dev, torch_dtype = pick_device_dtype(device, dtype)
    path = str(path)
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size, str(dev), torch_dtype)
    if key in _cache:
        return _cache[key]
    file_key = key[:3]
    if file_key in _refused:  # "auto" tries files in turn: do not re-read a refused one every run
        raise UnsupportedRIFEError(_refused[file_key])
    try:
        state = read_state_dict(path)
        version = detect_version(state)
    except UnsupportedRIFEError as exc:
        message = str(exc) if str(exc).startswith(Path(path).name) else f"{Path(path).name}: {exc}"
        _refused[file_key] = message
        raise UnsupportedRIFEError(message) from None
    with torch.device("meta"):  # no random initialisation of weights that are replaced right away
        model = IFNet()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    model.to(device=dev, dtype=torch_dtype).eval().requires_grad_(False)
    _cache.clear()
    _cache[key] = LoadedRIFE(model, version, path, dev, torch_dtype)
    return _cache[key]


def unload_rife() -> None:
    _cache.clear()
    _refused.clear()


# --------------------------------------------------------------------------------------------------
# Interpolation


def _pad_multiple(scale: float) -> int:
    return max(64, int(round(64 / scale)))


def interpolate_rife(
    frames,
    loaded: LoadedRIFE,
    multiplier: int = 2,
    loop: bool = False,
    *,
    scale: float = 1.0,
    ensemble: bool = False,
    batch_size: int = 4,
    control: Control | None = None,
) -> torch.Tensor:
    """`frames` (N, H, W, 3) in 0..1 (tensor or array) with ``multiplier - 1`` RIFE frames between each pair.

    Same frame layout as `interpolate.interpolate_frames`: ``(N - 1) * multiplier + 1`` frames
    (``N * multiplier`` with `loop`), originals unchanged at every ``multiplier``-th position. Returns a float32
    CPU tensor. `batch_size` in-between frames run per forward pass; `control` is checked before each batch and
    gets the progress after it.
    """
    if int(multiplier) != multiplier or multiplier < 2:
        raise ValueError(f"multiplier must be an integer >= 2; got {multiplier}")
    if scale not in SCALE_CHOICES:
        raise ValueError(f"scale must be one of {SCALE_CHOICES}; got {scale}")
    multiplier = int(multiplier)
    if not torch.is_tensor(frames):
        frames = torch.from_numpy(np.ascontiguousarray(np.asarray(frames, dtype=np.float32)))
    frames = frames.detach().to("cpu", torch.float32)[..., :3].contiguous()
    if frames.ndim != 4:
        raise ValueError(f"frames must be (N, H, W, 3); got shape {tuple(frames.shape)}")
    count, h, w = frames.shape[0], frames.shape[1], frames.shape[2]
    if count < 2:
        return frames.clone()

    pairs = [(i, i + 1) for i in range(count - 1)] + ([(count - 1, 0)] if loop else [])
    tasks = [(p, k) for p in range(len(pairs)) for k in range(1, multiplier)]
    out_count = count * multiplier if loop else (count - 1) * multiplier + 1
    out = torch.empty((out_count, h, w, 3), dtype=torch.float32)
    out[0::multiplier] = frames[: len(out[0::multiplier])]

    multiple = _pad_multiple(scale)
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    device, dtype = loaded.device, loaded.dtype
    # Padded channels-first copies of the frames, on the device, made once.
    source = F.pad(frames.permute(0, 3, 1, 2), (0, pw - w, 0, ph - h)).to(device, dtype).clamp_(0, 1)
    scales = tuple(s / scale for s in SCALES)
    batch_size = max(1, int(batch_size))
    control = or_default(control)
    control.progress(0, len(tasks))
    with torch.inference_mode():
        for start in range(0, len(tasks), batch_size):
            control.check()
            batch = tasks[start : start + batch_size]
            first = torch.tensor([pairs[p][0] for p, _ in batch], device=device)
            second = torch.tensor([pairs[p][1] for p, _ in batch], device=device)
            t = torch.tensor([k / multiplier for _, k in batch], device=device, dtype=dtype).view(-1, 1, 1, 1)
            result = loaded.model(source[first], source[second], t, scales, ensemble)
            result = result[:, :, :h, :w].float().clamp_(0, 1).permute(0, 2, 3, 1).cpu()
            for (p, k), image in zip(batch, result, strict=True):
                out[p * multiplier + k] = image
            control.progress(start + len(batch), len(tasks))
    return out
