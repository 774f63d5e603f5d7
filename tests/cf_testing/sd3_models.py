"""Tiny, randomly initialised SD3 / SD3.5 models in every file layout users have, for CPU tests.

The architecture is the real one (diffusers ``SD3Transformer2DModel`` with joint blocks, a pre-only last
context block, q/k RMSNorm and the second image attention of SD3.5 Medium where the variant has them; a
16-channel VAE; two ``CLIPTextModelWithProjection`` and a ``T5EncoderModel``); only depth and width shrink.
The MMDiT keeps ComfyUI's rule hidden = 64 x blocks with 64-wide heads (2 blocks, hidden 128), so its
head size needs no q/k norm to be read from the tensors.

`build_tiny_sd3` writes one model five ways: a diffusers folder, a single checkpoint with VAE and all text
encoders, one with the VAE only, and separate files (bare MMDiT, ``clip_l``, ``clip_g``, ``t5xxl``, an
LDM-named VAE). The tokenizers are real file formats: the tiny CLIP BPE vocabulary of `models` and a tiny
T5 Unigram ``tokenizer.json`` laid out as ComfyUI's ``t5_tokenizer`` folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from charforge.engine import tiny
from charforge.engine.models import sd3_files
from charforge.engine.models.single_file import vae_to_ldm

from .models import END_TOKEN, TINY_VAE, TINY_VOCAB_SIZE, write_tiny_clip_tokenizer

TINY_T5_PIECES = (
    "▁a",
    "▁photo",
    "▁of",
    "▁sks",
    "▁person",
    "▁in",
    "▁the",
    "▁park",
    "▁smiling",
    "▁woman",
    "▁man",
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _t5_vocab() -> list[tuple[str, float]]:
    pieces = ["<pad>", "</s>", "<unk>", "▁"] + list(TINY_T5_PIECES)
    pieces += list(_LETTERS) + ["▁" + c for c in _LETTERS]
    return [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]


TINY_T5_VOCAB_SIZE = len(_t5_vocab())


def write_tiny_t5_tokenizer(directory: str | Path) -> Path:
    """A T5 tokenizer folder (``tokenizer.json`` Unigram model + configs), loadable by ``T5Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.Unigram(_t5_vocab(), unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


# --------------------------------------------------------------------------------------------------
# Configs

_CLIP = {
    "vocab_size": TINY_VOCAB_SIZE,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
TINY_SD3_CLIP_L = {**_CLIP, "hidden_size": 32, "projection_dim": 32, "hidden_act": "quick_gelu"}
TINY_SD3_CLIP_G = {
    **_CLIP,
    "hidden_size": 64,
    "intermediate_size": 128,
    "projection_dim": 64,
    "hidden_act": "gelu",
}
TINY_T5 = {
    "vocab_size": TINY_T5_VOCAB_SIZE,
    "d_model": 128,  # at least CLIP-L + CLIP-G (96): the CLIP states are zero-padded to the T5 width
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
TINY_SD3_VAE = {  # the SD tiny VAE with SD3's 16 latent channels and scaling
    **TINY_VAE,
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
_TRANSFORMER = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 64,
    "num_attention_heads": 2,
    "joint_attention_dim": TINY_T5["d_model"],
    "caption_projection_dim": 128,
    "pooled_projection_dim": TINY_SD3_CLIP_L["projection_dim"] + TINY_SD3_CLIP_G["projection_dim"],
    "pos_embed_max_size": 16,
}
TINY_SD3_TRANSFORMERS = {
    "sd3-medium": {**_TRANSFORMER, "qk_norm": None, "dual_attention_layers": ()},
    "sd35-medium": {**_TRANSFORMER, "qk_norm": "rms_norm", "dual_attention_layers": (0,)},
    "sd35-large": {**_TRANSFORMER, "qk_norm": "rms_norm", "dual_attention_layers": ()},
}


@dataclass(frozen=True)
class TinySD3:
    """Where one tiny SD3-family model was written, in each layout."""

    variant: str
    diffusers_dir: Path
    checkpoint: Path  # MMDiT + VAE + clip_l + clip_g + t5xxl
    checkpoint_no_encoders: Path  # MMDiT + VAE
    mmdit: Path  # bare MMDiT (diffusion_models folder)
    clip_l: Path
    clip_g: Path
    t5xxl: Path
    vae: Path  # LDM names
    clip_vocab: Path  # CLIP vocab.json + merges.txt
    t5_tokenizer: Path  # tokenizer.json folder
    transformer_config: dict

    @property
    def config_dir(self) -> Path:
        """Configs for the tiny text encoders and VAE (the shipped ones describe the full-size models)."""
        return self.diffusers_dir


def _seeded(seed, build):
    return tiny.seeded(seed, build)


def build_tiny_sd3(directory: str | Path, variant: str = "sd35-medium", seed: int = 0) -> TinySD3:
    """Write a tiny `variant` model in every layout under `directory` (about a second on a CPU)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from safetensors.torch import save_file
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    directory = Path(directory)
    config = TINY_SD3_TRANSFORMERS[variant]
    transformer = _seeded(seed, lambda: SD3Transformer2DModel(**config).eval())
    # diffusers starts adaLN and output projections at zero; random values make every weight matter in tests.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 10)
        for param in transformer.parameters():
            if not param.abs().sum():
                param.normal_(0, 0.02)
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**TINY_SD3_VAE).eval())
    clip_l = _seeded(seed + 2, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SD3_CLIP_L)).eval())
    clip_g = _seeded(seed + 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SD3_CLIP_G)).eval())
    t5 = _seeded(seed + 4, lambda: T5EncoderModel(T5Config(**TINY_T5)).eval())

    clip_vocab = write_tiny_clip_tokenizer(directory / "clip_vocab")
    t5_tokenizer = write_tiny_t5_tokenizer(directory / "t5_tokenizer")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_vocab)),
        text_encoder_2=clip_g,
        tokenizer_2=CLIPTokenizer.from_pretrained(str(clip_vocab), pad_token="!"),
        text_encoder_3=t5,
        tokenizer_3=T5Tokenizer.from_pretrained(str(t5_tokenizer)),
    )
    diffusers_dir = directory / "diffusers"
    pipe.save_pretrained(str(diffusers_dir), safe_serialization=True)
    for name, pad in (("tokenizer", END_TOKEN), ("tokenizer_2", "!")):
        shutil.rmtree(diffusers_dir / name)
        write_tiny_clip_tokenizer(diffusers_dir / name, pad)
    shutil.rmtree(diffusers_dir / "tokenizer_3")
    write_tiny_t5_tokenizer(diffusers_dir / "tokenizer_3")

    transformer_state = transformer.state_dict()
    vae_ldm = vae_to_ldm(vae.state_dict())
    encoders = {"clip_l": clip_l.state_dict(), "clip_g": clip_g.state_dict(), "t5xxl": t5.state_dict()}
    meta = {"charforge.test_model": f"tiny_{variant}"}
    checkpoint = sd3_files.write_single_file(
        directory / f"tiny_{variant}.safetensors",
        transformer_state,
        vae_ldm=vae_ldm,
        encoders=encoders,
        metadata=meta,
    )
    no_encoders = sd3_files.write_single_file(
        directory / f"tiny_{variant}_no_encoders.safetensors",
        transformer_state,
        vae_ldm=vae_ldm,
        metadata=meta,
    )
    mmdit = sd3_files.write_single_file(
        directory / "diffusion_models" / f"tiny_{variant}_mmdit.safetensors", transformer_state, bare=True
    )
    separate = directory / "text_encoders"
    separate.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, state in encoders.items():
        paths[name] = separate / f"tiny_{name}.safetensors"
        save_file(
            {
                k: v.contiguous()
                for k, v in state.items()
                if not k.endswith("position_ids") and k != "encoder.embed_tokens.weight"
            },
            str(paths[name]),
        )
    vae_path = directory / "vae" / f"tiny_{variant}_vae.safetensors"
    vae_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae_ldm.items()}, str(vae_path))
    return TinySD3(
        variant=variant,
        diffusers_dir=diffusers_dir,
        checkpoint=checkpoint,
        checkpoint_no_encoders=no_encoders,
        mmdit=mmdit,
        clip_l=paths["clip_l"],
        clip_g=paths["clip_g"],
        t5xxl=paths["t5xxl"],
        vae=vae_path,
        clip_vocab=clip_vocab,
        t5_tokenizer=t5_tokenizer,
        transformer_config=dict(config),
    )
