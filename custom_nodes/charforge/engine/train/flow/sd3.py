"""SD3 Medium, SD3.5 Medium and SD3.5 Large for training: loading, the three text encoders, the model call.

Sources, fully offline (`engine.models.sd3_files` reads and converts the files):

- a **checkpoint** (ComfyUI's ``checkpoints`` folder) with the MMDiT and VAE, with or without the text
  encoders inside; missing encoders come from their own files;
- **separate files**: the MMDiT alone (``diffusion_models``), ``clip_l``, ``clip_g`` and ``t5xxl``
  (``text_encoders`` / ``clip``; fp16, bf16, fp8 or ComfyUI's scaled fp8) and the VAE (``vae``);
- a **diffusers folder** (``model_index.json`` of a ``StableDiffusion3Pipeline``).

The MMDiT's shape and variant come from its tensors; the text encoders and the VAE use the configs shipped
in ``configs/sd3`` (``config_dir`` replaces them for shrunken test models). Tokenizers: the CLIP vocabulary
as for SD (`models.find_tokenizer_dir`; the second CLIP pads with ``!``), T5's ``tokenizer.json`` as for
Flux.1 (`flux.load_t5_tokenizer`).

Conditioning as diffusers' ``StableDiffusion3Pipeline`` builds it: CLIP-L's and CLIP-G's penultimate hidden
states (77 tokens each) side by side on the channels (768 + 1280), zero-padded to T5's 4096, followed on the
sequence by T5-XXL's last hidden states padded to ``t5_max_length`` tokens (default 256, the pipeline's
default, so a LoRA trains on the sequence length it is sampled with: 77 + 256 = 333 tokens); the pooled
vector is CLIP-L's projected pooled output (768) then CLIP-G's (1280). Each encoder's outputs are separate
entries (``clip_l``, ``clip_l_pooled``, ``clip_g``, ``clip_g_pooled``, ``t5``) so the trainer caches what the
frozen encoders make and recomputes only an encoder that has LoRA; `joint_conditioning` assembles them.

The model call passes σ·1000 as the timestep (the scheduler's timesteps are σ·1000) and returns the
velocity. Noise levels default to SD3's: logit-normal σ shifted by 3.0 (`DEFAULT_SHIFT`, the shift of the
released models' scheduler and of ComfyUI's ModelSamplingSD3).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ....deps import require
from ...models import sd3_files, tensor_files
from ..models import (
    CONFIG_ROOT,
    UnsupportedModelError,
    _dtype_argument,
    find_tokenizer_dir,
    resolve_dtype,
)
from . import flux
from .family import FlowModel, token_ids
from .flux import MissingPartError, load_t5_tokenizer

ARCHS = sd3_files.VARIANTS  # sd3-medium, sd35-medium, sd35-large
CONFIG_DIR = CONFIG_ROOT / "sd3"
T5_LENGTH = 256  # diffusers' StableDiffusion3Pipeline default max_sequence_length
DEFAULT_SHIFT = 3.0
CLIP_ENCODERS = ("clip_l", "clip_g")
TEXT_ENCODER_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}
TOKENIZER_FOLDERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}

# LoRA presets over the joint blocks' diffusers names. The last block's context stream is "pre-only" (no
# to_add_out, no ff_context, its queries unused) and only SD3.5 Medium's first 13 blocks have attn2.
# The joint blocks' names are Flux.1's double blocks' (both diffusers joint-attention blocks).
ATTENTION_LEAVES = (
    *flux.ATTENTION_LEAVES["double"],
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)
MLP_LEAVES = flux.MLP_LEAVES["double"]


@dataclass(frozen=True)
class SD3Files:
    """Where an SD3-family model's parts are: the model (checkpoint, bare MMDiT or diffusers folder) and
    the parts a checkpoint may lack."""

    model: str
    clip_l: str | None = None
    clip_g: str | None = None
    t5: str | None = None
    vae: str | None = None


# --------------------------------------------------------------------------------------------------
# The model


@dataclass
class SD3Model(FlowModel):
    """SD3 / SD3.5: MMDiT, 16-channel VAE, CLIP-L (``clip_l``), CLIP-G (``clip_g``) and T5-XXL (``t5``).

    ``negative`` is the empty caption's conditioning (the pipeline's negative prompt for classifier-free
    guidance in samples), kept from the first encoding that runs all three encoders, before they are dropped.
    """

    negative: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _pipeline: Any = field(default=None, repr=False)

    def __post_init__(self):
        self.family = "sd3"
        self.default_sampling = "shift"
        self.default_shift = DEFAULT_SHIFT
        self.text_outputs = {
            "clip_l": "clip_l",
            "clip_l_pooled": "clip_l",
            "clip_g": "clip_g",
            "clip_g_pooled": "clip_g",
            "t5": "t5",
        }
        self.lora_text_encoder = "clip_l"
        self.default_t5_length = T5_LENGTH

    def encode_text(self, captions, device, settings, encoders=None) -> dict[str, torch.Tensor]:
        encoders = tuple(dict.fromkeys(self.text_outputs.values())) if encoders is None else tuple(encoders)
        if not self.negative and set(encoders) == set(self.text_encoders):
            with torch.no_grad():
                self.negative = {
                    k: v.detach().cpu() for k, v in self._encode([""], device, settings, encoders).items()
                }
        return self._encode(list(captions), device, settings, encoders)

    def _encode(self, captions: list[str], device, settings, encoders) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in CLIP_ENCODERS:
            if name not in encoders:
                continue
            ids = token_ids(self.tokenizers[name], captions, device)
            result = self.text_encoders[name](ids, output_hidden_states=True)
            out[name] = result.hidden_states[-2]
            out[name + "_pooled"] = result[0]  # the projected pooled output (text_embeds)
        if "t5" in encoders:
            ids = token_ids(self.tokenizers["t5"], captions, device, self.t5_length(settings))
            out["t5"] = self.text_encoders["t5"](ids)[0]
        return out

    def predict(self, noisy, sigmas, text, settings) -> torch.Tensor:
        dtype = noisy.dtype
        hidden, pooled = joint_conditioning(text)
        return self.transformer(
            hidden_states=noisy,
            encoder_hidden_states=hidden.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=sigmas.float() * 1000.0,  # fp32 like the scheduler's timesteps (bf16 would round them)
            return_dict=False,
        )[0]

    def lora_targets(self, preset: str) -> list[str]:
        return sd3_lora_targets(self.transformer, preset)

    def sample(self, text, seed, size, settings, device):
        """One image through diffusers' ``StableDiffusion3Pipeline`` on these modules (no text encoders: the
        prompt's cached conditioning goes in), with classifier-free guidance ``settings.guidance`` against the
        empty caption, ``settings.steps`` Euler steps on the 3.0-shifted schedule."""
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        if self._pipeline is None:
            scheduler_config = json.loads((CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())
            # No text encoders: the conditioning comes cached.
            names = (
                "text_encoder",
                "tokenizer",
                "text_encoder_2",
                "tokenizer_2",
                "text_encoder_3",
                "tokenizer_3",
            )
            absent: dict[str, Any] = dict.fromkeys(names)
            self._pipeline = StableDiffusion3Pipeline(
                transformer=self.transformer,
                scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
                vae=self.vae,
                **absent,
            )
            self._pipeline.set_progress_bar_config(disable=True)
        dtype = self.transformer.dtype
        context, pooled = joint_conditioning(text)
        negative: dict[str, Any] = {}
        if settings.guidance > 1:
            if not self.negative:
                raise RuntimeError(
                    "SD3 samples with guidance need the empty caption's conditioning (encode first)"
                )
            negative_context, negative_pooled = joint_conditioning(self.negative)
            negative = {
                "negative_prompt_embeds": negative_context.to(device, dtype),
                "negative_pooled_prompt_embeds": negative_pooled.to(device, dtype),
            }
        vae_dtype = self.vae.dtype
        self.vae.to(dtype)  # the pipeline decodes in the transformer's dtype
        try:
            out = self._pipeline(
                prompt_embeds=context.to(device, dtype),
                pooled_prompt_embeds=pooled.to(device, dtype),
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                height=size,
                width=size,
                generator=torch.Generator().manual_seed(seed),
                output_type="pil",
                **negative,
            )
        finally:
            self.vae.to(vae_dtype)
        return out.images[0]


def joint_conditioning(text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) for the MMDiT from the encoders' outputs: [CLIP-L | CLIP-G | zeros] tokens, then
    the T5 tokens; pooled = CLIP-L pooled then CLIP-G pooled (as ``StableDiffusion3Pipeline.encode_prompt``)."""
    clip = torch.cat([text["clip_l"], text["clip_g"]], dim=-1)
    t5 = text["t5"]
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    hidden = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
    pooled = torch.cat([text["clip_l_pooled"], text["clip_g_pooled"]], dim=-1)
    return hidden, pooled


def sd3_lora_targets(transformer: Any, preset: str) -> list[str]:
    """The MMDiT's module names for a preset: ``attention`` (q/k/v/out of both streams and SD3.5 Medium's
    second image attention) or ``all_linear`` (also both streams' MLPs). Modulation and embedding layers
    are never adapted (as for Flux.1)."""
    if preset not in ("attention", "all_linear"):
        raise ValueError(f"LoRA target preset {preset!r}: choose 'attention' or 'all_linear'")
    leaves = ATTENTION_LEAVES + (MLP_LEAVES if preset == "all_linear" else ())
    # The last block's text queries make outputs the model throws away (its context stream is pre-only):
    # a LoRA there never gets a gradient.
    dead = f"transformer_blocks.{transformer.config.num_layers - 1}.attn.add_q_proj"
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".lora_" in name or ".base_layer" in name:
            continue
        parts = name.split(".", 2)
        if parts[0] == "transformer_blocks" and len(parts) == 3 and parts[2] in leaves and name != dead:
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# Loading


def _config(config_dir: Path, sub: str) -> dict:
    return json.loads((config_dir / sub / "config.json").read_text())


def _clip_tokenizers(candidates: Sequence[str | os.PathLike | None], folder: Path | None = None) -> dict:
    """CLIP-L's and CLIP-G's tokenizers: a diffusers folder's own, else the CLIP vocabulary found elsewhere,
    configured as the shipped ``configs/sd3/tokenizer*`` say (CLIP-G pads with ``!``)."""
    from transformers import CLIPTokenizer

    out = {}
    for name in CLIP_ENCODERS:
        sub = TOKENIZER_FOLDERS[name]
        if folder is not None and (folder / sub / "vocab.json").is_file():
            out[name] = CLIPTokenizer.from_pretrained(str(folder / sub))
            continue
        config = json.loads((CONFIG_DIR / sub / "tokenizer_config.json").read_text())
        vocab = find_tokenizer_dir(list(candidates))
        out[name] = CLIPTokenizer.from_pretrained(
            str(vocab), pad_token=config["pad_token"], model_max_length=config["model_max_length"]
        )
    return out


def load_sd3(
    files: SD3Files | str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    config_dir: str | os.PathLike | None = None,
    tokenizer_candidates: Sequence[str | os.PathLike | None] = (),
    t5_tokenizer_candidates: Sequence[str | os.PathLike | None] = (),
) -> SD3Model:
    """Load an SD3-family model from `files` (or a checkpoint / diffusers folder path) on the CPU in `dtype`.

    Never touches the network. The VAE stays in fp32 (it is small and overflows in fp16).
    """
    require("diffusers")
    require("transformers")
    files = files if isinstance(files, SD3Files) else SD3Files(str(files))
    weight_dtype = resolve_dtype(dtype, torch.bfloat16)
    source = Path(files.model).expanduser()
    if source.is_dir():
        model = _load_folder(source, weight_dtype, tokenizer_candidates)
    elif source.is_file():
        configs = Path(config_dir) if config_dir else CONFIG_DIR
        model = _load_files(files, weight_dtype, configs, tokenizer_candidates, t5_tokenizer_candidates)
    else:
        raise FileNotFoundError(f"base model not found: {source}")
    model.frozen()
    return model


def _load_folder(source: Path, dtype: torch.dtype, tokenizer_candidates) -> SD3Model:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    index = source / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if name != "StableDiffusion3Pipeline":
        raise UnsupportedModelError(f"{source}: pipeline {name!r}, not a StableDiffusion3Pipeline folder")
    if not (source / TEXT_ENCODER_FOLDERS["t5"]).is_dir():
        raise MissingPartError(
            f"{source} has no text_encoder_3 (T5-XXL); SD3 training needs all three encoders"
        )
    offline = {"local_files_only": True}
    transformer = SD3Transformer2DModel.from_pretrained(
        str(source / "transformer"), **_dtype_argument(dtype), **offline
    )
    vae = AutoencoderKL.from_pretrained(str(source / "vae"), **_dtype_argument(torch.float32), **offline)
    encoders = {
        "clip_l": CLIPTextModelWithProjection.from_pretrained(
            str(source / "text_encoder"), dtype=dtype, local_files_only=True
        ),
        "clip_g": CLIPTextModelWithProjection.from_pretrained(
            str(source / "text_encoder_2"), dtype=dtype, local_files_only=True
        ),
        "t5": T5EncoderModel.from_pretrained(
            str(source / "text_encoder_3"), dtype=dtype, local_files_only=True
        ),
    }
    tokenizers = _clip_tokenizers(tokenizer_candidates, source)
    tokenizers["t5"] = load_t5_tokenizer([source / TOKENIZER_FOLDERS["t5"]])
    config = dict(transformer.config)
    shapes = {"joint_blocks.0.context_block.attn.qkv.weight": (0,)}  # structure flags only
    if config.get("qk_norm"):
        shapes["joint_blocks.0.x_block.attn.ln_q.weight"] = (0,)
    if config.get("dual_attention_layers"):
        shapes["joint_blocks.0.x_block.attn2.qkv.weight"] = (0,)
    return _model(sd3_files.sd3_variant(shapes), source, transformer, vae, encoders, tokenizers, dtype)


def _model(arch, source, transformer, vae, encoders, tokenizers, dtype) -> SD3Model:
    return SD3Model(
        arch=arch,
        source=str(source),
        transformer=transformer,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        dtype=dtype,
    )


def _part_file(path: str | None, what: str, folder: str) -> Path:
    missing = (
        f"SD3 training needs the {what}, which this checkpoint does not contain: put it in ComfyUI's "
        f"models/{folder} folder and choose it (or use a checkpoint that includes it)"
    )
    return Path(flux.required_file(path, what, missing))


def _encoder_state(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A separate text-encoder file's tensors, without a ComfyUI checkpoint prefix if it has one."""
    state = tensor_files.read_tensors(path)
    prefix = sd3_files.ENCODER_PREFIXES[name]
    if any(k.startswith(prefix) for k in state):
        return sd3_files.strip_prefix(state, prefix)
    # Hugging Face names under ``transformer.`` (OpenCLIP's ``transformer.resblocks`` stay as they are).
    if any(
        k.startswith(("transformer.text_model.", "transformer.encoder.", "transformer.shared."))
        for k in state
    ):
        return sd3_files.strip_prefix(state, "transformer.")
    return state


def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of `path` under `prefix` (only those are read), without it."""
    return sd3_files.strip_prefix(tensor_files.read_tensors(path, lambda key: key.startswith(prefix)), prefix)


def _load_files(
    files: SD3Files, dtype: torch.dtype, configs: Path, tokenizer_candidates, t5_candidates
) -> SD3Model:
    path = Path(files.model)
    shapes = tensor_files.tensor_shapes(path)
    prefix = sd3_files.transformer_prefix(shapes)
    if prefix is None:
        top = sorted({k.split(".")[0] for k in shapes})[:8]
        raise UnsupportedModelError(
            f"{path} is not an SD3 / SD3.5 model: no MMDiT ('{sd3_files.TRIGGER}'); top-level names: {top}"
        )
    arch = sd3_files.sd3_variant(shapes)
    transformer = sd3_files.build_transformer(_read_prefixed(path, prefix), dtype)
    inside = sd3_files.encoders_in(shapes)
    encoders = {}
    builders = {
        "clip_l": lambda s: sd3_files.build_clip(s, _config(configs, "text_encoder"), dtype, "CLIP-L"),
        "clip_g": lambda s: sd3_files.build_clip(s, _config(configs, "text_encoder_2"), dtype, "CLIP-G"),
        "t5": lambda s: sd3_files.build_t5(s, _config(configs, "text_encoder_3"), dtype),
    }
    given = {"clip_l": files.clip_l, "clip_g": files.clip_g, "t5": files.t5}
    titles = {
        "clip_l": "CLIP-L text encoder (clip_l)",
        "clip_g": "CLIP-G text encoder (clip_g)",
        "t5": "T5-XXL (t5xxl)",
    }
    for name, build in builders.items():
        file_name = "t5xxl" if name == "t5" else name
        if given[name]:  # a file the user chose wins over the checkpoint's copy
            state = _encoder_state(_part_file(given[name], titles[name], "text_encoders"), file_name)
        elif file_name in inside:
            state = _read_prefixed(path, sd3_files.ENCODER_PREFIXES[file_name])
        else:
            state = _encoder_state(_part_file(None, titles[name], "text_encoders"), file_name)
        encoders[name] = build(state)
    if files.vae:
        vae_state = tensor_files.read_tensors(_part_file(files.vae, "VAE", "vae"))
        vae_state = sd3_files.strip_prefix(vae_state, sd3_files.VAE_PREFIX) or vae_state
    elif sd3_files.has_vae(shapes):
        vae_state = _read_prefixed(path, sd3_files.VAE_PREFIX)
    else:
        vae_state = tensor_files.read_tensors(_part_file(None, "VAE", "vae"))
    vae = sd3_files.build_vae(vae_state, _config(configs, "vae"), torch.float32)
    tokenizers = _clip_tokenizers(tokenizer_candidates)
    tokenizers["t5"] = load_t5_tokenizer(list(t5_candidates))
    return _model(arch, path, transformer, vae, encoders, tokenizers, dtype)
