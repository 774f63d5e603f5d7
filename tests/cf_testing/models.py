"""Tiny, randomly initialised Stable Diffusion models for CPU tests.

The models keep the real architectures (block types, number of levels, res blocks per level, conv vs
Linear projections, SDXL's text_time embedding, the 4-level VAE), so every key name matches the real
SD1.5 / SDXL ones; only widths and depths shrink (docs/model-configs.md §10.2). Each build
is seeded and writes the same bytes every time.

- `build_tiny_sd15` / `build_tiny_sdxl`: a complete diffusers folder plus the single-file checkpoint our
  writer (`charforge.engine.models.single_file`) makes from it. Seconds on CPU.
- `write_tiny_clip_tokenizer`: a small byte-level BPE vocabulary in the CLIP tokenizer's file format.
- `build_sd15_comfy_checkpoint`: a full-width but shallow SD1.5 single file that ComfyUI's own
  checkpoint loader detects as SD1.5 (§10.3), with a full-size VAE and CLIP-L, in fp16.

Two deviations from §10.2, both forced by diffusers' single-file loader: the text encoders use the
tiny vocabulary (not 49408 entries) and SDXL's second text encoder is wider (64) than the first (32),
because diffusers tells the two apart by the width of their position embeddings.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from charforge.engine import tiny
from charforge.engine.models.single_file import pipeline_to_single_file_state_dict, save_single_file

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"

# A few merges, enough to exercise multi-character tokens ("a photo of sks person" -> a, photo, of, sks, ...).
TINY_MERGES = (
    ("t", "h"),
    ("th", "e</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("o", "f</w>"),
    ("o", "n</w>"),
    ("e", "r</w>"),
    ("p", "h"),
    ("ph", "o"),
    ("t", "o</w>"),
    ("pho", "to</w>"),
    ("s", "k"),
    ("sk", "s</w>"),
)


def _byte_symbols() -> list[str]:
    """The 256 symbols byte-level BPE uses for the bytes 0..255, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are shifted to
    code points from 256 up so that every byte has a visible, non-whitespace symbol.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def tiny_clip_vocab() -> dict[str, int]:
    """Token -> id: every byte symbol, the same with the end-of-word mark, the merges, then BOS/EOS.

    As in CLIP, "!" is id 0 (SDXL's second tokenizer pads with it) and ``<|endoftext|>`` is the
    highest id, so the legacy argmax pooling of ``CLIPTextModel`` finds the end token.
    """
    symbols = _byte_symbols()
    tokens = (
        symbols + [s + "</w>" for s in symbols] + [a + b for a, b in TINY_MERGES] + [START_TOKEN, END_TOKEN]
    )
    return {token: i for i, token in enumerate(tokens)}


TINY_VOCAB_SIZE = len(tiny_clip_vocab())


def write_tiny_clip_tokenizer(directory: str | Path, pad_token: str = END_TOKEN) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs of the tiny CLIP tokenizer.

    Loadable offline with ``transformers.CLIPTokenizer.from_pretrained(directory)``. ``pad_token`` is
    ``<|endoftext|>`` for CLIP-L and ``"!"`` for SDXL's ``tokenizer_2``; the context stays 77 tokens.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(
        json.dumps(tiny_clip_vocab(), ensure_ascii=False, indent=1), encoding="utf-8"
    )
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in TINY_MERGES)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    special = {
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": pad_token,
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


# --------------------------------------------------------------------------------------------------
# Shrunken configs (docs/model-configs.md §10.2): same block types and key names, narrow widths.

_SCHEDULER_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

TINY_SD15_UNET = {  # the engine's SD1.5-layout U-Net (tiny.SD15_UNET), narrower and smaller
    **tiny.SD15_UNET,
    "sample_size": 16,
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 2,
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}

TINY_SDXL_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 2,
    # Two transformer blocks at the last level (and so in the mid block) keep `transformer_blocks.1` keys.
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 8],
    "cross_attention_dim": 96,  # text encoder 32 + text encoder 2 64
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # text encoder 2 projection 32 + 6 x 8
    "use_linear_projection": True,
    "norm_num_groups": 32,
}

TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}

TINY_CLIP_L = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "layer_norm_eps": 1e-5,
    # The legacy ids of the real configs; pooling then takes the position of the highest id (the end token).
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

TINY_CLIP_G = {
    **TINY_CLIP_L,
    "hidden_size": 64,  # must differ from TINY_CLIP_L's: diffusers' single-file loader picks the encoder by width
    "intermediate_size": 128,
    "hidden_act": "gelu",
    "projection_dim": 32,
}

# Full width (SD1.5's model_channels 320, context 768, 8 heads, conv projections), two levels with one
# res block each: the smallest U-Net ComfyUI still detects as SD1.5 (docs/model-configs.md §10.3).
SD15_COMFY_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 320],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "use_linear_projection": False,
}

# ComfyUI builds its VAE and CLIP-L at fixed sizes, so these are the real configs (the demo's), CLIP-L with the
# legacy token ids.
SD15_VAE = tiny.SD15_VAE
CLIP_L = {**tiny.CLIP_L, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


@dataclass(frozen=True)
class TinyPipeline:
    """Where a tiny model was written and the configs it was built from."""

    kind: str  # "sd15" or "sdxl"
    diffusers_dir: Path  # model_index.json + component folders
    single_file: Path  # the same weights in the single-file (LDM / SGM) layout
    unet_config: dict
    vae_config: dict
    text_encoder_config: dict
    text_encoder_2_config: dict | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.kind == "sdxl"


@dataclass(frozen=True)
class ComfyCheckpoint:
    """The full-width SD1.5 single file for ComfyUI, with what it took to build."""

    path: Path
    size_bytes: int
    build_seconds: float
    unet_config: dict
    text_encoder_layers: int


_seeded = tiny.seeded  # each component gets its own seed


def _text_encoder(config: dict, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _seeded(seed, lambda: cls(CLIPTextConfig(**config)).eval())


def _unet(config: dict, seed: int):
    from diffusers import UNet2DConditionModel

    return _seeded(seed, lambda: UNet2DConditionModel(**config).eval())


def _vae(config: dict, seed: int, **extra):
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(**config, **extra).eval())


def _tokenizer(pad_token: str = END_TOKEN):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        return CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(scratch, pad_token)))


def _replace_tokenizer_folder(folder: Path, pad_token: str) -> None:
    # save_pretrained writes whatever the installed transformers prefers (tokenizer.json in 5.x);
    # the folder keeps the classic four files the hub's SD repositories ship instead.
    shutil.rmtree(folder)
    write_tiny_clip_tokenizer(folder, pad_token)


def build_tiny_sd15(directory: str | Path, seed: int = 0) -> TinyPipeline:
    """A tiny SD1.5: diffusers folder ``<directory>/diffusers`` and ``<directory>/tiny_sd15.safetensors``.

    PNDM scheduler with SD1.5's betas; no safety checker (``requires_safety_checker`` false).
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    directory = Path(directory)
    pipe = StableDiffusionPipeline(
        vae=_vae(TINY_VAE, seed + 1, scaling_factor=0.18215),
        text_encoder=_text_encoder(TINY_CLIP_L, False, seed + 2),
        tokenizer=_tokenizer(),
        unet=_unet(TINY_SD15_UNET, seed),
        scheduler=PNDMScheduler(**_SCHEDULER_BETAS, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipe, directory, "sd15", TINY_SD15_UNET, TINY_CLIP_L, None)


def build_tiny_sdxl(directory: str | Path, seed: int = 0) -> TinyPipeline:
    """A tiny SDXL: diffusers folder ``<directory>/diffusers`` and ``<directory>/tiny_sdxl.safetensors``.

    Euler scheduler as on the hub (leading spacing, steps_offset 1); ``tokenizer_2`` pads with "!".
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    directory = Path(directory)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(TINY_VAE, seed + 1, scaling_factor=0.13025, force_upcast=True),
        text_encoder=_text_encoder(TINY_CLIP_L, False, seed + 2),
        text_encoder_2=_text_encoder(TINY_CLIP_G, True, seed + 3),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(pad_token="!"),
        unet=_unet(TINY_SDXL_UNET, seed),
        scheduler=EulerDiscreteScheduler(
            **_SCHEDULER_BETAS,
            interpolation_type="linear",
            timestep_spacing="leading",
            use_karras_sigmas=False,
        ),
        force_zeros_for_empty_prompt=True,
    )
    return _save(pipe, directory, "sdxl", TINY_SDXL_UNET, TINY_CLIP_L, TINY_CLIP_G)


def _save(pipe, directory: Path, kind: str, unet_config: dict, te_config: dict, te2_config: dict | None):
    diffusers_dir = directory / "diffusers"
    pipe.save_pretrained(str(diffusers_dir), safe_serialization=True)
    _replace_tokenizer_folder(diffusers_dir / "tokenizer", END_TOKEN)
    if te2_config is not None:
        _replace_tokenizer_folder(diffusers_dir / "tokenizer_2", "!")
    single_file = save_single_file(
        diffusers_dir,
        directory / f"tiny_{kind}.safetensors",
        metadata={"charforge.test_model": f"tiny_{kind}"},
    )
    return TinyPipeline(
        kind,
        diffusers_dir,
        single_file,
        dict(unet_config),
        dict(TINY_VAE),
        dict(te_config),
        dict(te2_config) if te2_config else None,
    )


def build_sd15_comfy_checkpoint(
    path: str | Path, seed: int = 0, text_encoder_layers: int = 12
) -> ComfyCheckpoint:
    """A single-file SD1.5 that ComfyUI's ``CheckpointLoaderSimple`` loads and detects as SD1.5.

    U-Net at full width but two levels with one res block each (`SD15_COMFY_UNET`), the full-size VAE
    and CLIP-L (ComfyUI builds both at fixed sizes), random weights, saved in fp16 (about 0.5 GB,
    a few seconds). ``text_encoder_layers`` below 12 makes the file smaller, but ComfyUI then leaves the
    missing layers uninitialised ("clip missing" warning), so text conditioning becomes garbage.
    """
    from safetensors.torch import save_file

    start = time.perf_counter()
    path = Path(path)
    unet = _unet(SD15_COMFY_UNET, seed)
    vae = _vae(SD15_VAE, seed + 1, scaling_factor=0.18215)
    text_encoder = _text_encoder({**CLIP_L, "num_hidden_layers": text_encoder_layers}, False, seed + 2)
    state_dict = pipeline_to_single_file_state_dict(
        unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), unet_config=dict(unet.config)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(torch.float16).contiguous() for k, v in state_dict.items()},
        str(path),
        metadata={"charforge.test_model": "sd15_comfy"},
    )
    return ComfyCheckpoint(
        path, path.stat().st_size, time.perf_counter() - start, dict(SD15_COMFY_UNET), text_encoder_layers
    )
