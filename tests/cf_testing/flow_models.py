"""Tiny, randomly initialised Flux.1 models for CPU tests of the flow-matching trainer.

The real architectures (diffusers ``FluxTransformer2DModel``, ``AutoencoderKL`` with 16 latent channels
and Flux's shift / scale, ``CLIPTextModel``, ``T5EncoderModel`` with gated GELU) at toy widths and depths,
in the real file formats:

- a diffusers folder (``FluxPipeline.save_pretrained``; tokenizers in their hub formats: CLIP's
  ``vocab.json`` + ``merges.txt``, T5's ``tokenizer.json``);
- the files a ComfyUI user has: the transformer in BFL names (``diffusion_models/flux.safetensors``), CLIP-L
  with ``text_model.`` names, T5 (also as fp8 e4m3), and ``ae.safetensors`` in the LDM VAE layout.

`write_tiny_t5_tokenizer` writes a small Unigram vocabulary in the T5 tokenizer's ``tokenizer.json``
format (what ComfyUI ships in ``comfy/text_encoders/t5_tokenizer``), built offline with ``tokenizers``.
"""

from __future__ import annotations

import json
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from charforge.engine import tiny
from charforge.engine.models.flux_files import diffusers_to_bfl
from charforge.engine.models.single_file import vae_to_ldm

from .models import END_TOKEN, _replace_tokenizer_folder, _tokenizer

TINY_FLUX = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}
TINY_FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TINY_CLIP_L = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
TINY_T5 = {
    "d_model": 32,
    "d_ff": 37,
    "d_kv": 8,
    "num_layers": 2,
    "num_heads": 4,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "tie_word_embeddings": False,
}
T5_WORDS = ("a", "photo", "of", "sks", "person", "red", "blue", "shirt", "smiling", "the", "and", "in")


def write_tiny_t5_tokenizer(directory: str | Path) -> Path:
    """``tokenizer.json`` + ``tokenizer_config.json`` of a tiny Unigram T5 tokenizer (pad 0, ``</s>`` 1, unk 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in T5_WORDS]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ",.!?'-"]
    pieces += [(f"▁{c}", -4.0) for c in string.ascii_lowercase]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "extra_ids": 0,
        "model_max_length": 512,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


@dataclass(frozen=True)
class TinyFlux:
    """Where a tiny Flux.1 was written."""

    arch: str  # "flux-dev" or "flux-schnell"
    diffusers_dir: Path
    transformer_file: Path  # BFL names, as in ComfyUI's diffusion_models folder
    clip_l_file: Path
    t5_file: Path
    t5_fp8_file: Path
    vae_file: Path  # ae.safetensors (LDM VAE names)
    clip_tokenizer_dir: Path
    t5_tokenizer_dir: Path


def build_tiny_flux(directory: str | Path, *, guidance: bool = True, seed: int = 0) -> TinyFlux:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    directory = Path(directory)
    vocab = len(_tokenizer())
    with tempfile.TemporaryDirectory() as scratch:
        t5_tokenizer = T5TokenizerFast.from_pretrained(str(write_tiny_t5_tokenizer(scratch)))
    transformer = tiny.seeded(
        seed, lambda: FluxTransformer2DModel(**TINY_FLUX, guidance_embeds=guidance).eval()
    )
    vae = tiny.seeded(seed + 1, lambda: AutoencoderKL(**TINY_FLUX_VAE).eval())
    clip = tiny.seeded(
        seed + 2,
        lambda: CLIPTextModel(
            CLIPTextConfig(**TINY_CLIP_L, vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1)
        ).eval(),
    )
    t5 = tiny.seeded(
        seed + 3,
        lambda: T5EncoderModel(
            T5Config(**TINY_T5, vocab_size=len(t5_tokenizer), pad_token_id=0, eos_token_id=1)
        ).eval(),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0 if guidance else 1.0,
        use_dynamic_shifting=guidance,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    folder = directory / "diffusers"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _replace_tokenizer_folder(folder / "tokenizer", END_TOKEN)
    (folder / "tokenizer_2").mkdir(exist_ok=True)
    for old in (folder / "tokenizer_2").iterdir():
        old.unlink()
    write_tiny_t5_tokenizer(folder / "tokenizer_2")

    files = directory / "comfyui"
    files.mkdir(parents=True, exist_ok=True)
    transformer_file = files / "flux.safetensors"
    save_file(
        {k: v.contiguous() for k, v in diffusers_to_bfl(transformer.state_dict()).items()},
        str(transformer_file),
    )
    clip_file = files / "clip_l.safetensors"
    save_file({f"text_model.{k}": v.contiguous() for k, v in clip.state_dict().items()}, str(clip_file))
    t5_state = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    t5_file = files / "t5xxl_fp16.safetensors"
    save_file({k: v.half() for k, v in t5_state.items()}, str(t5_file))
    t5_fp8_file = files / "t5xxl_fp8_e4m3fn.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in t5_state.items()}, str(t5_fp8_file))
    vae_file = files / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict()).items()}, str(vae_file))
    return TinyFlux(
        arch="flux-dev" if guidance else "flux-schnell",
        diffusers_dir=folder,
        transformer_file=transformer_file,
        clip_l_file=clip_file,
        t5_file=t5_file,
        t5_fp8_file=t5_fp8_file,
        vae_file=vae_file,
        clip_tokenizer_dir=folder / "tokenizer",
        t5_tokenizer_dir=folder / "tokenizer_2",
    )


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny random Flux.1-dev (`TinyFlux`): diffusers folder + ComfyUI files (import it into a test module
    or conftest to use it)."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))
