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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


#: the side of the tiny clips the video tests make
CLIP_SIZE = 64


def tiny_video_spec(
    assets: VideoAssets, motion_module: str | Path, arch: str = "sd15", single_file: bool = True
):
    """A CPU fp32 ``VideoModelSpec`` on the tiny `arch` base (its single file, or its diffusers folder) with
    `motion_module`; configs and tokenizer from the base's diffusers folder."""
    from charforge.engine.video import RuntimeOptions, VideoModelSpec

    tiny: Any = assets.sdxl if arch == "sdxl" else assets.sd15  # a cf_testing.models.TinyPipeline
    return VideoModelSpec(
        base=str(tiny.single_file if single_file else tiny.diffusers_dir),
        motion_module=str(motion_module),
        config_dir=str(tiny.diffusers_dir),
        tokenizer_dirs=(str(tiny.diffusers_dir / "tokenizer"),),
        options=RuntimeOptions(device="cpu", dtype="fp32"),
    )


def tiny_clip_request(**fields):
    """A ``VideoRequest`` for an 8-frame CLIP_SIZE clip of "a photo of sks person"; `fields` go on top."""
    from charforge.engine.video import VideoRequest

    return VideoRequest(
        **{"prompt": "a photo of sks person", "frames": 8, "width": CLIP_SIZE, "height": CLIP_SIZE, **fields}
    )


# --------------------------------------------------------------------------------------------------
# HotShot-XL


def hotshot_layout(widths: tuple[int, ...] = (320, 640, 1280), table: int = 24) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a HotShot-XL temporal-layer file (``hsxl_temporal_layers.safetensors``)
    for an SDXL U-Net of `widths`, written out from the published layout (not from CharForge's converter):
    ``down_blocks.{0,1,2}.temporal_attentions.{0,1}`` and ``up_blocks.{0,1,2}.temporal_attentions.{0,1,2}``,
    no mid block; each a GroupNorm, in/out projections and one transformer block of two temporal self-attention
    blocks (no q/k/v bias, a [1, table, C] positional table each), two LayerNorms, a GEGLU feed-forward and its
    LayerNorm."""
    modules = [
        (f"down_blocks.{i}.temporal_attentions.{j}", c) for i, c in enumerate(widths) for j in range(2)
    ]
    modules += [
        (f"up_blocks.{i}.temporal_attentions.{j}", c)
        for i, c in enumerate(reversed(widths))
        for j in range(3)
    ]
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, c in modules:
        shapes.update({f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)})
        for name in ("proj_in", "proj_out"):
            shapes.update({f"{prefix}.{name}.weight": (c, c), f"{prefix}.{name}.bias": (c,)})
        block = f"{prefix}.transformer_blocks.0"
        for n in (0, 1):
            attention = f"{block}.attention_blocks.{n}"
            shapes.update({f"{attention}.{p}.weight": (c, c) for p in ("to_q", "to_k", "to_v")})
            shapes.update({f"{attention}.to_out.0.weight": (c, c), f"{attention}.to_out.0.bias": (c,)})
            shapes[f"{attention}.pos_encoder.positional_encoding"] = (1, table, c)
            shapes.update({f"{block}.norms.{n}.weight": (c,), f"{block}.norms.{n}.bias": (c,)})
        shapes.update({f"{block}.ff.net.0.proj.weight": (8 * c, c), f"{block}.ff.net.0.proj.bias": (8 * c,)})
        shapes.update({f"{block}.ff.net.2.weight": (c, 4 * c), f"{block}.ff.net.2.bias": (c,)})
        shapes.update({f"{block}.ff_norm.weight": (c,), f"{block}.ff_norm.bias": (c,)})
    return shapes


def sinusoid_table(length: int, channels: int) -> torch.Tensor:
    """The [1, length, channels] sine / cosine table HotShot-XL stores for each attention block."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, channels, 2, dtype=torch.float32) * (-math.log(10000.0) / channels))
    table = torch.zeros(1, length, channels)
    table[0, :, 0::2] = torch.sin(position * rate)
    table[0, :, 1::2] = torch.cos(position * rate)
    return table


def build_tiny_hotshot_module(path: str | Path, seed: int = 0) -> Path:
    """A HotShot-XL temporal-layer file for the tiny SDXL U-Net: the published names, random weights (output
    projections included, so the layers change the frames), sinusoid tables of 24 frames."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hotshot_layout(tuple(TINY_SDXL_UNET["block_out_channels"])).items():
        if name.endswith("positional_encoding"):
            tensors[name] = sinusoid_table(shape[1], shape[2])
        elif name.endswith(".weight") and len(shape) == 1:  # norms
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            tensors[name] = 0.1 * torch.randn(shape, generator=generator)
        else:
            tensors[name] = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"charforge.test_model": "tiny_hsxl_temporal_layers"})
    return path
