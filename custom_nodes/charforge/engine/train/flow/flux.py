"""Flux.1 (dev / schnell) for training: loading from what ComfyUI users have, conditioning, the model call.

Sources, fully offline:

- a **diffusion-model file** (ComfyUI's ``diffusion_models`` / ``unet`` folder, BFL names, with or without
  ``model.diffusion_model.``; `engine.models.flux_files` renames it for diffusers) plus **CLIP-L** and
  **T5-XXL** files (``text_encoders`` / ``clip``; fp16, bf16 or fp8, ComfyUI's scaled fp8 too) and the
  **VAE** ``ae.safetensors`` (``vae``). A full ComfyUI checkpoint holding all four (``text_encoders.clip_l.
  transformer.``, ``text_encoders.t5xxl.transformer.``, ``vae.``) needs no other file;
- a **diffusers folder** (``model_index.json`` of a ``FluxPipeline``).

The transformer's shape comes from its tensors; CLIP-L, T5-XXL and the VAE use the configs shipped in
``configs/flux-dev`` (``config_dir`` replaces them for shrunken test models). Tokenizers: CLIP's vocabulary
as for SD (`models.find_tokenizer_dir`); T5's ``tokenizer.json`` from a diffusers folder's ``tokenizer_2``,
``$CHARFORGE_T5_TOKENIZER`` or ``$COMFYUI_DIR/comfy/text_encoders/t5_tokenizer`` (every ComfyUI has it).

Conditioning as diffusers' ``FluxPipeline`` does it: CLIP-L's pooled output (77 tokens, not projected)
and T5's last hidden states, padded to ``t5_max_length`` (dev 512, schnell 256). The model call packs the
latent's 2x2 patches into tokens, numbers them with (0, row, column) ids, gives the text zero ids, passes
σ as the timestep and, for dev, the guidance value (`FlowSettings.guidance_scale`) — then unpacks.
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
from ...models import flux_files
from ...models.tensor_files import unscale_fp8
from ..models import (
    CONFIG_ROOT,
    UnsupportedModelError,
    _dtype_argument,
    find_tokenizer_dir,
    resolve_dtype,
)
from .family import FlowModel, token_ids

ARCHS = ("flux-dev", "flux-schnell")
T5_LENGTH = {"flux-dev": 512, "flux-schnell": 256}
CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.clip_l.", "")
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl.", "")

ATTENTION_LEAVES = {
    "double": (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    ),
    "single": ("attn.to_q", "attn.to_k", "attn.to_v"),
}
MLP_LEAVES = {
    "double": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    "single": ("proj_mlp", "proj_out"),
}


class MissingPartError(FileNotFoundError):
    """A Flux.1 part (text encoder, VAE, tokenizer) was not given or found; the message says where to put it."""


@dataclass(frozen=True)
class FluxFiles:
    """Where a Flux.1 model's parts are: the transformer (file or diffusers folder) and the other three."""

    transformer: str
    clip_l: str | None = None
    t5: str | None = None
    vae: str | None = None


def t5_tokenizer_candidates(extra: Sequence[str | os.PathLike | None] = ()) -> list[Path]:
    out = [Path(p) for p in extra if p]
    if os.environ.get("CHARFORGE_T5_TOKENIZER"):
        out.append(Path(os.environ["CHARFORGE_T5_TOKENIZER"]).expanduser())
    if os.environ.get("COMFYUI_DIR"):
        out.append(Path(os.environ["COMFYUI_DIR"]).expanduser() / "comfy" / "text_encoders" / "t5_tokenizer")
    return out


def load_t5_tokenizer(candidates: Sequence[str | os.PathLike | None] = ()):
    """T5's tokenizer from the first folder with a ``tokenizer.json``; `MissingPartError` otherwise."""
    import transformers

    # tokenizers-backed T5 (reads tokenizer.json; transformers 5 names it T5Tokenizer, 4.x T5TokenizerFast)
    tokenizer_class = getattr(transformers, "T5TokenizerFast", transformers.T5Tokenizer)
    tried = t5_tokenizer_candidates(candidates)
    for folder in tried:
        if (folder / "tokenizer.json").is_file():
            return tokenizer_class.from_pretrained(str(folder))
    raise MissingPartError(
        "the T5 tokenizer (tokenizer.json) was not found; looked in: "
        + (", ".join(str(p) for p in tried) or "nowhere")
        + ". Inside ComfyUI it is comfy/text_encoders/t5_tokenizer; elsewhere set CHARFORGE_T5_TOKENIZER or "
        "COMFYUI_DIR, or train from a diffusers folder"
    )


# --------------------------------------------------------------------------------------------------
# Reading files


def _read(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    require("safetensors")
    from safetensors.torch import load_file

    return load_file(str(path))


def _part(state: dict[str, torch.Tensor], prefixes: Sequence[str], marker: str) -> dict[str, torch.Tensor]:
    """The tensors under the first prefix that holds `marker` (the prefix removed); {} if none does."""
    for prefix in prefixes:
        if prefix + marker in state:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return {}


def _dequantise(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fp8 (and ComfyUI's scaled fp8: ``<name>.scale_weight``) tensors in `dtype`; markers dropped."""
    return {key: value.to(dtype) for key, value in unscale_fp8(state).items()}


def _config(config_dir: Path, sub: str) -> dict:
    return json.loads((config_dir / sub / "config.json").read_text())


def _clip_from_state(state: dict[str, torch.Tensor], config_dir: Path, dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    state = {k.removeprefix("text_model."): v for k, v in _dequantise(state, dtype).items()}
    for extra in ("text_projection.weight", "logit_scale", "embeddings.position_ids"):
        state.pop(extra, None)
    model = CLIPTextModel(CLIPTextConfig(**_config(config_dir, "text_encoder")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UnsupportedModelError(
            f"not a CLIP-L text encoder: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}) tensors"
        )
    return torch.nn.Module.to(model, dtype)


def _t5_from_state(state: dict[str, torch.Tensor], config_dir: Path, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    state = _dequantise(state, dtype)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    if "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**_config(config_dir, "text_encoder_2")))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UnsupportedModelError(
            f"not a T5-XXL encoder: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}) tensors"
        )
    model.encoder.embed_tokens = model.shared
    return torch.nn.Module.to(model, dtype)


def _vae_from_state(state: dict[str, torch.Tensor], config_dir: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = _config(config_dir, "vae")
    converted = convert_ldm_vae_checkpoint(_dequantise(state, torch.float32), config)
    model = AutoencoderKL.from_config(config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise UnsupportedModelError(
            f"not the Flux.1 VAE (ae.safetensors): {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}) tensors"
        )
    return model.to(dtype)


def _transformer_from_state(state: dict[str, torch.Tensor], dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    config = flux_files.flux_config({k: tuple(v.shape) for k, v in state.items()})
    converted = {k: v.to(dtype) for k, v in flux_files.bfl_to_diffusers(_dequantise(state, dtype)).items()}
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model


def required_file(path: str | None, what: str, missing: str) -> str:
    """`path` when it names a file; else MissingPartError: `missing` when none was given."""
    if not path:
        raise MissingPartError(missing)
    if not Path(path).is_file():
        raise MissingPartError(f"the {what} file was not found: {path}")
    return path


def _required(path: str | None, what: str, folder: str) -> str:
    missing = (
        f"Flux.1 training needs the {what}: put it in ComfyUI's models/{folder} folder and choose it "
        "(the diffusion-model file holds only the transformer)"
    )
    return required_file(path, what, missing)


# --------------------------------------------------------------------------------------------------
# The model


@dataclass
class FluxModel(FlowModel):
    """Flux.1 dev / schnell: transformer, ae VAE, CLIP-L (``clip_l``) and T5-XXL (``t5``)."""

    scheduler_config: dict = field(default_factory=dict)  # the sampling scheduler (samples during training)
    _pipeline: Any = field(default=None, repr=False)

    def __post_init__(self):
        self.family = "flux"
        self.default_sampling = "flux_shift"
        self.text_outputs = {"pooled": "clip_l", "t5": "t5"}
        self.lora_text_encoder = "clip_l"
        self.default_t5_length = T5_LENGTH.get(self.arch, 512)

    @property
    def has_guidance(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def encode_text(self, captions, device, settings, encoders=None) -> dict[str, torch.Tensor]:
        encoders = tuple(self.text_outputs.values()) if encoders is None else tuple(encoders)
        out: dict[str, torch.Tensor] = {}
        if "clip_l" in encoders:
            ids = token_ids(self.tokenizers["clip_l"], captions, device)
            out["pooled"] = self.text_encoders["clip_l"](ids, output_hidden_states=False).pooler_output
        if "t5" in encoders:
            ids = token_ids(self.tokenizers["t5"], captions, device, self.t5_length(settings))
            out["t5"] = self.text_encoders["t5"](ids, output_hidden_states=False)[0]
        return out

    def predict(self, noisy, sigmas, text, settings) -> torch.Tensor:
        batch, channels, height, width = noisy.shape
        packed = pack_latents(noisy)
        dtype = packed.dtype
        guidance = None
        if self.has_guidance:
            guidance = torch.full((batch,), settings.guidance_scale, device=noisy.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=packed,
            timestep=sigmas.to(dtype),
            guidance=guidance,
            pooled_projections=text["pooled"].to(dtype),
            encoder_hidden_states=text["t5"].to(dtype),
            txt_ids=torch.zeros(text["t5"].shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=image_ids(height, width, noisy.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, channels, height, width)

    def lora_targets(self, preset: str) -> list[str]:
        return flux_lora_targets(self.transformer, preset)

    def sample(self, text, seed, size, settings, device):
        """One image through diffusers' ``FluxPipeline`` on these modules (no text encoders: the prompt's
        cached conditioning goes in). Guidance: dev's distilled guidance, the samples' ``guidance`` (its SD
        default 5.0 means Flux's usual 3.5 here); schnell has none."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        from ..config import SampleSettings

        if self._pipeline is None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
            parts: dict[str, Any] = {  # no text encoders: the prompts' conditioning is cached
                "text_encoder": None,
                "tokenizer": None,
                "text_encoder_2": None,
                "tokenizer_2": None,
            }
            self._pipeline = FluxPipeline(
                scheduler=scheduler, vae=self.vae, transformer=self.transformer, **parts
            )
            self._pipeline.set_progress_bar_config(disable=True)
        guidance = 3.5 if settings.guidance == SampleSettings().guidance else settings.guidance
        dtype = self.transformer.dtype
        vae_dtype = self.vae.dtype
        self.vae.to(dtype)  # the pipeline decodes in the transformer's dtype
        try:
            out = self._pipeline(
                prompt_embeds=text["t5"].to(device, dtype),
                pooled_prompt_embeds=text["pooled"].to(device, dtype),
                num_inference_steps=settings.steps,
                guidance_scale=guidance,
                height=size,
                width=size,
                max_sequence_length=text["t5"].shape[1],
                generator=torch.Generator().manual_seed(seed),
                output_type="pil",
            )
        finally:
            self.vae.to(vae_dtype)
        return out.images[0]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 · W/2, 4C): each 2x2 patch one token, rows first."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents`."""
    b = tokens.shape[0]
    patches = tokens.reshape(b, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(H/2 · W/2, 3) position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def flux_lora_targets(transformer: torch.nn.Module, preset: str) -> list[str]:
    """The transformer's module names for a preset: ``attention`` (q/k/v/out of both streams) or
    ``all_linear`` (also the MLPs; the single blocks' fused output ``proj_out``). Modulation and embedding
    layers are never adapted."""
    if preset not in ("attention", "all_linear"):
        raise ValueError(f"LoRA target preset {preset!r}: choose 'attention' or 'all_linear'")
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".lora_" in name or ".base_layer" in name:
            continue
        if name.startswith("transformer_blocks."):
            kind = "double"
        elif name.startswith("single_transformer_blocks."):
            kind = "single"
        else:
            continue
        leaf = name.split(".", 2)[2]
        if leaf in ATTENTION_LEAVES[kind] or (preset == "all_linear" and leaf in MLP_LEAVES[kind]):
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# Loading


def flux_arch(transformer_config: dict[str, Any]) -> str:
    return "flux-dev" if transformer_config.get("guidance_embeds") else "flux-schnell"


def load_flux(
    files: FluxFiles | str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    config_dir: str | os.PathLike | None = None,
    tokenizer_candidates: Sequence[str | os.PathLike | None] = (),
    t5_tokenizer_candidates: Sequence[str | os.PathLike | None] = (),
) -> FluxModel:
    """Load Flux.1 from `files` (or a diffusers folder / full checkpoint path) on the CPU in `dtype`.

    Never touches the network. The VAE is kept in fp32 below bf16 precision needs (it is small).
    """
    require("diffusers")
    require("transformers")
    files = files if isinstance(files, FluxFiles) else FluxFiles(str(files))
    weight_dtype = resolve_dtype(dtype, torch.bfloat16)
    source = Path(files.transformer).expanduser()
    if source.is_dir():
        model = _load_folder(source, weight_dtype, tokenizer_candidates)
    else:
        model = _load_files(
            files,
            weight_dtype,
            Path(config_dir) if config_dir else None,
            tokenizer_candidates,
            t5_tokenizer_candidates,
        )
    model.frozen()
    return model


def _load_folder(source: Path, dtype: torch.dtype, tokenizer_candidates) -> FluxModel:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel

    transformer = FluxTransformer2DModel.from_pretrained(
        str(source / "transformer"), **_dtype_argument(dtype), local_files_only=True
    )
    vae = AutoencoderKL.from_pretrained(
        str(source / "vae"), **_dtype_argument(torch.float32), local_files_only=True
    )
    clip = CLIPTextModel.from_pretrained(str(source / "text_encoder"), dtype=dtype, local_files_only=True)
    t5 = T5EncoderModel.from_pretrained(str(source / "text_encoder_2"), dtype=dtype, local_files_only=True)
    if (source / "tokenizer" / "vocab.json").is_file():
        clip_tokenizer = CLIPTokenizer.from_pretrained(str(source / "tokenizer"))
    else:
        clip_tokenizer = CLIPTokenizer.from_pretrained(str(find_tokenizer_dir(list(tokenizer_candidates))))
    t5_tokenizer = load_t5_tokenizer([source / "tokenizer_2"])
    return FluxModel(
        scheduler_config=json.loads((source / "scheduler" / "scheduler_config.json").read_text()),
        arch=flux_arch(dict(transformer.config)),
        source=str(source),
        transformer=transformer,
        vae=vae,
        text_encoders={"clip_l": clip, "t5": t5},
        tokenizers={"clip_l": clip_tokenizer, "t5": t5_tokenizer},
        dtype=dtype,
    )


def _load_files(
    files: FluxFiles, dtype: torch.dtype, config_dir: Path | None, tokenizer_candidates, t5_candidates
) -> FluxModel:
    from transformers import CLIPTokenizer

    state = _read(files.transformer)
    transformer_state = flux_files.strip_prefix(state)
    if flux_files.is_diffusers_flux(transformer_state):  # a transformer saved with diffusers' names
        transformer_state = flux_files.diffusers_to_bfl(transformer_state)
    if not flux_files.is_bfl_flux(transformer_state):
        raise UnsupportedModelError(f"{files.transformer} is not a Flux.1 diffusion model")
    # A full ComfyUI checkpoint carries the other parts; otherwise each comes from its own file (checked
    # before the transformer is built, so a missing one is named at once).
    clip_state = _part(state, CLIP_PREFIXES[:2], "text_model.final_layer_norm.weight")
    t5_state = _part(state, T5_PREFIXES[:2], "encoder.final_layer_norm.weight")
    vae_state = _part(state, ("vae.",), "decoder.conv_out.weight")
    clip_file = None if clip_state else _required(files.clip_l, "CLIP-L text encoder", "text_encoders")
    t5_file = None if t5_state else _required(files.t5, "T5-XXL text encoder", "text_encoders")
    vae_file = None if vae_state else _required(files.vae, "VAE (ae.safetensors)", "vae")
    transformer = _transformer_from_state(transformer_state, dtype)
    arch = flux_arch(dict(transformer.config))
    configs = config_dir or CONFIG_ROOT / arch
    del state, transformer_state
    clip_state = clip_state if clip_file is None else _read(clip_file)
    t5_state = t5_state if t5_file is None else _read(t5_file)
    vae_state = vae_state if vae_file is None else _read(vae_file)
    clip_tokenizer = CLIPTokenizer.from_pretrained(str(find_tokenizer_dir(list(tokenizer_candidates))))
    scheduler = configs / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        scheduler = CONFIG_ROOT / arch / "scheduler" / "scheduler_config.json"
    return FluxModel(
        scheduler_config=json.loads(scheduler.read_text()),
        arch=arch,
        source=str(files.transformer),
        transformer=transformer,
        vae=_vae_from_state(vae_state, configs, torch.float32),
        text_encoders={
            "clip_l": _clip_from_state(clip_state, configs, dtype),
            "t5": _t5_from_state(t5_state, configs, dtype),
        },
        tokenizers={"clip_l": clip_tokenizer, "t5": load_t5_tokenizer(list(t5_candidates))},
        dtype=dtype,
    )
