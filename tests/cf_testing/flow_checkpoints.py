"""Flux and SD3.5 transformer files in the single-file layout ComfyUI loads, for the real-ComfyUI LoRA tests.

- `write_shallow_flux`: Flux.1-dev at its real width (hidden 3072, 24 heads of 128, T5 context 4096, CLIP
  pooled 768, guidance embedder) but only 1 double + 1 single block: 545 M random parameters, about 1.09 GB
  in bf16. ComfyUI hard-codes Flux's width and reads only the depth from the file, so this is the smallest
  Flux its loader accepts. Written straight from the layout's shape table (`flow_layouts.lora_targets` plus
  biases and q/k norm scales), without building a model.
- `write_tiny_sd35`: an SD3.5 Medium-shaped MMDiT (rms q/k norm, block 0 with the second attention, a
  pre-only last block) at depth 2. ComfyUI builds ``depth`` blocks of width 64 * depth with ``depth`` heads,
  so the file keeps width = 64 * blocks (128); it is a diffusers ``SD3Transformer2DModel`` converted with
  `flow_layouts.single_file_state`.

Both are random and large or slow enough to be written once per session into a temporary cache, never into
the repository (`cached`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from charforge.engine.library import flow_layouts as fl

from .sd3_models import TINY_SD3_TRANSFORMERS

SHALLOW_FLUX = fl.FlowVariant("flux-shallow", "flux", 3072, 1, 1, guidance=True)
FLUX_HEAD_DIM = 128
# the trainer tests' tiny SD3.5 Medium MMDiT, with 16x16 latents and 64-wide text conditioning
TINY_SD35_CONFIG = {
    **TINY_SD3_TRANSFORMERS["sd35-medium"],
    "sample_size": 16,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
}
TINY_SD35 = fl.FlowVariant(
    "sd35-tiny", "sd3", 128, 2, dual_blocks=(0,), context_dim=64, pooled_dim=64, latent_channels=16
)


def cached(name: str, write: Callable[[Path], None]) -> Path:
    """``<tmp>/charforge-test-models/<name>``, written by `write` the first time (atomically)."""
    folder = Path(tempfile.gettempdir()) / "charforge-test-models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.is_file():
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        write(partial)
        os.replace(partial, path)
    return path


def shallow_flux_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the shallow Flux file (BFL names, no prefix) with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in fl.lora_targets(SHALLOW_FLUX).items():
        shapes[f"{name}.weight"] = shape
        shapes[f"{name}.bias"] = (shape[0],)
    for i in range(SHALLOW_FLUX.depth):
        for stream in ("img", "txt"):
            for norm in ("query_norm", "key_norm"):
                shapes[f"double_blocks.{i}.{stream}_attn.norm.{norm}.scale"] = (FLUX_HEAD_DIM,)
    for i in range(SHALLOW_FLUX.depth_single):
        for norm in ("query_norm", "key_norm"):
            shapes[f"single_blocks.{i}.norm.{norm}.scale"] = (FLUX_HEAD_DIM,)
    return shapes


def write_shallow_flux(path: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> None:
    """The shallow full-width Flux.1-dev transformer as ComfyUI's ``diffusion_models`` file."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in sorted(shallow_flux_shapes().items()):
        if key.endswith(".scale"):
            tensors[key] = torch.ones(shape, dtype=dtype)
        elif key.endswith(".bias"):
            tensors[key] = torch.zeros(shape, dtype=dtype)
        else:
            tensors[key] = (torch.randn(shape, generator=generator) / shape[1] ** 0.5).to(dtype)
    save_file(tensors, str(path))


def tiny_sd35_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny SD3.5 Medium-shaped transformer's tensors in ComfyUI's MMDiT names (no prefix)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**TINY_SD35_CONFIG)
    return {k: v.contiguous() for k, v in fl.single_file_state("sd3", model.state_dict()).items()}


def write_tiny_sd35(path: Path, seed: int = 0) -> None:
    from safetensors.torch import save_file

    save_file(tiny_sd35_state(seed), str(path))


def comfy_flux_folders(root: Path) -> tuple[Path, Path, Path]:
    """ComfyUI-style ``diffusion_models`` and ``loras`` folders in `root`, the shallow full-width Flux.1 file
    (written once, cached) linked into the first as ``flux_shallow.safetensors``: (models, loras, the file)."""
    models, loras = root / "diffusion_models", root / "loras"
    models.mkdir()
    loras.mkdir()
    flux = cached("flux1-dev-shallow-1x1-bf16.safetensors", write_shallow_flux)
    (models / "flux_shallow.safetensors").symlink_to(flux)
    return models, loras, flux
