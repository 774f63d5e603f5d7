"""Tiny AnimateDiff motion modules, motion LoRAs and character LoRAs for CPU tests.

The motion adapters have the real structure (``diffusers.MotionAdapter`` with the tiny SD1.5 / SDXL
U-Net's widths, 2 motion layers per level, a mid-block module for v2, positional tables of 32 frames,
24 for v1) and are written both ways users meet them:

- the **original** AnimateDiff single-file layout (``down_blocks.0.motion_modules.0.temporal_transformer...``),
  what ``models/animatediff_models`` holds after a download;
- a diffusers ``MotionAdapter`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

They keep the published modules' 8 attention heads and 32 norm groups (docs/model-configs.md §10.2 shrinks both;
these two numbers are not stored in an original-layout file, so the loader assumes the published values and
the test modules must match them to go through the same path as a real download).

The output projections of every motion module are zero in a freshly initialised adapter (as in a
published one before training) and would make the modules a no-op; here they get small random values
so a wrong conversion changes the frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from charforge.engine.video.motion import diffusers_to_original, motion_lora_to_original, save_motion_module

from .models import TINY_SD15_UNET, TINY_SDXL_UNET


@dataclass(frozen=True)
class TinyMotionModule:
    """One tiny motion module written in both layouts."""

    version: str  # "v1", "v2", "v3", "sdxl"
    original_file: Path  # original AnimateDiff layout, .safetensors
    original_ckpt: Path | None  # the same as a pickled .ckpt (how v2/v3 are published)
    diffusers_dir: Path  # MotionAdapter.save_pretrained folder
    config: dict


VERSIONS = {
    "v1": {"use_motion_mid_block": False, "motion_max_seq_length": 24},
    "v2": {"use_motion_mid_block": True, "motion_max_seq_length": 32},
    "v3": {"use_motion_mid_block": False, "motion_max_seq_length": 32},
    "sdxl": {"use_motion_mid_block": False, "motion_max_seq_length": 32},
}


def tiny_motion_config(version: str) -> dict:
    """``MotionAdapter`` keyword arguments of the tiny module of `version`."""
    unet = TINY_SDXL_UNET if version == "sdxl" else TINY_SD15_UNET
    return {
        "block_out_channels": tuple(unet["block_out_channels"]),
        "motion_layers_per_block": unet["layers_per_block"],
        "motion_num_attention_heads": 8,
        "motion_norm_num_groups": 32,
        **VERSIONS[version],
    }


def build_tiny_motion_module(
    directory: str | Path, version: str = "v3", seed: int = 0, ckpt: bool = False
) -> TinyMotionModule:
    """Build, randomise and write one tiny motion module (well under a second)."""
    from diffusers import MotionAdapter

    directory = Path(directory)
    config = tiny_motion_config(version)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = MotionAdapter(**config).eval()
        with torch.no_grad():
            for name, param in adapter.named_parameters():
                if name.endswith("proj_out.weight"):
                    param.normal_(0.0, 0.2)
    state = adapter.state_dict()
    original = save_motion_module(
        state,
        directory / f"tiny_mm_{version}.safetensors",
        "original",
        metadata={"charforge.test_model": f"tiny_mm_{version}"},
    )
    ckpt_path = None
    if ckpt:
        ckpt_path = directory / f"tiny_mm_{version}.ckpt"
        torch.save(diffusers_to_original(state), ckpt_path)
    folder = directory / f"tiny_mm_{version}_diffusers"
    adapter.save_pretrained(str(folder), safe_serialization=True)
    return TinyMotionModule(version, original, ckpt_path, folder, config)


def build_tiny_motion_lora(
    path: str | Path, module: TinyMotionModule, rank: int = 4, seed: int = 0, scale: float = 0.5
) -> Path:
    """A motion LoRA in the original AnimateDiff format for `module` (every temporal attention projection)."""
    from diffusers import MotionAdapter
    from safetensors.torch import save_file

    adapter = MotionAdapter(**module.config)
    tensors = {}
    generator = torch.Generator().manual_seed(seed)
    for name, layer in adapter.named_modules():
        if (
            isinstance(layer, torch.nn.Linear)
            and ".attn" in name
            and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
        ):
            out_features, in_features = layer.weight.shape
            tensors[f"unet.{name}.lora_A.weight"] = (
                torch.randn(rank, in_features, generator=generator) * scale
            )
            tensors[f"unet.{name}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * scale
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(motion_lora_to_original(tensors), str(path))
    return path


def build_tiny_character_lora(
    path: str | Path, unet_config: dict, arch: str = "sd15", rank: int = 4, seed: int = 0, scale: float = 0.3
) -> Path:
    """A kohya-format character LoRA for the tiny U-Net, written by CharForge's own LoRA export.

    The trainer's LoRA starts with zero up-matrices (no change); here both matrices are random so the
    LoRA visibly changes what the model draws.
    """
    from diffusers import UNet2DConditionModel

    from charforge.engine.train.export import export_lora
    from charforge.engine.train.lora import LoraSettings, add_lora

    unet = UNet2DConditionModel(**unet_config)
    network = add_lora({"unet": unet}, LoraSettings(rank=rank, alpha=float(rank)), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
    }
    return export_lora(path, network, arch, unet_config, metadata, dtype=torch.float32)


@dataclass(frozen=True)
class VideoAssets:
    """Everything the video tests load: tiny SD1.5 / SDXL, motion modules of each version, LoRAs."""

    sd15: object  # cf_testing.models.TinyPipeline
    sdxl: object
    modules: dict[str, TinyMotionModule]
    motion_lora: Path
    character_lora: Path
    sdxl_character_lora: Path


_assets: VideoAssets | None = None


def video_assets(directory: str | Path) -> VideoAssets:
    """Build the video test assets once per process (a few seconds) under `directory`."""
    global _assets
    if _assets is None:
        from .models import build_tiny_sd15, build_tiny_sdxl

        directory = Path(directory)
        sd15 = build_tiny_sd15(directory / "sd15")
        sdxl = build_tiny_sdxl(directory / "sdxl")
        modules = {
            v: build_tiny_motion_module(directory / "motion", v, seed=i, ckpt=v == "v2")
            for i, v in enumerate(("v1", "v2", "v3", "sdxl"))
        }
        _assets = VideoAssets(
            sd15=sd15,
            sdxl=sdxl,
            modules=modules,
            motion_lora=build_tiny_motion_lora(
                directory / "motion_lora" / "tiny_zoom.safetensors", modules["v2"]
            ),
            character_lora=build_tiny_character_lora(
                directory / "loras" / "tiny_character.safetensors", TINY_SD15_UNET
            ),
            sdxl_character_lora=build_tiny_character_lora(
                directory / "loras" / "tiny_character_xl.safetensors", TINY_SDXL_UNET, arch="sdxl"
            ),
        )
    return _assets
