"""Reading model files: tensor names and shapes without the data, the tensors a caller picks, fp8 unscaled.

Both ``.safetensors`` (``.sft``) files, read lazily through ``safe_open``, and PyTorch ``.ckpt`` / ``.pt`` files
(memory-mapped, weights only; a top-level ``state_dict`` is looked into) are read.

ComfyUI's "scaled fp8" files store a weight as fp8 with a per-tensor ``<name>.scale_weight`` (and an
``<name>.scale_input`` for its own fp8 matmuls, plus a ``scaled_fp8`` marker tensor); the real weight is the
stored one times its scale. `unscale_fp8` gives back the real weights and drops the markers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ...deps import require

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
FP8_MARKER = "scaled_fp8"


def _torch_state(path: Path) -> dict:
    state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a model file (a safetensors file's header only)."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        require("safetensors")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    return {k: tuple(v.shape) for k, v in _torch_state(path).items() if isinstance(v, torch.Tensor)}


def read_tensors(
    path: str | os.PathLike, keep: Callable[[str], bool] = lambda key: True
) -> dict[str, torch.Tensor]:
    """The tensors of one file whose names `keep` accepts (only those are read from a safetensors file)."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        require("safetensors")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys() if keep(k)}  # noqa: SIM118
    return {k: v for k, v in _torch_state(path).items() if isinstance(v, torch.Tensor) and keep(k)}


def unscale_fp8(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each scaled weight as ``weight * scale_weight`` (computed in fp32) and the scale and marker
    tensors dropped; every other tensor as it is (an unscaled fp8 file stays fp8: convert it afterwards)."""
    out = {}
    for key, tensor in state.items():
        if key == FP8_MARKER or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale = state.get(key[: -len("weight")] + "scale_weight") if key.endswith(".weight") else None
        out[key] = tensor.float() * scale.float() if scale is not None else tensor
    return out
