"""Load an SD1.5 / SDXL base model for training, fully offline.

Two sources, as users have them:

- a **single-file checkpoint** (``.safetensors``, also ``.ckpt``) from ComfyUI's ``checkpoints`` folder,
  in the original LDM (SD1.5) / SGM (SDXL) layout. diffusers reads it with ``from_single_file``; the
  component configs come from ``configs/<arch>/`` shipped with the pack, so nothing is fetched from a hub;
- a **diffusers folder** (``model_index.json`` + one subfolder per component).

The architecture is read from the file's tensor names and shapes (`detect_arch`), never from its name.

Tokenizers need the CLIP BPE vocabulary (``vocab.json`` + ``merges.txt``, about 1.7 MB), which the pack
does not ship. A diffusers folder has its own; for single files it is looked up in this order: the
``tokenizer_dir`` argument, ``$CHARFORGE_CLIP_TOKENIZER``, ``$COMFYUI_DIR/comfy/sd1_tokenizer`` (every
ComfyUI ships the CLIP vocabulary there). SDXL's two text encoders share the vocabulary; the second pads
with ``"!"`` (id 0), as its shipped ``tokenizer_2`` config says.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...deps import require
from ..models.single_file import DTYPES
from ..models.tensor_files import tensor_shapes

ARCHS = ("sd15", "sdxl")
# Flow-matching transformer bases (engine.train.flow): detected here, loaded by their family's loader.
FLOW_ARCHS = ("flux-dev", "flux-schnell", "sd3-medium", "sd35-medium", "sd35-large")
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
TOKENIZER_FILES = ("vocab.json", "merges.txt")

# Pipeline classes (diffusers) and a human name per architecture.
_PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
ARCH_NAMES = {
    "sd15": "SD1.5",
    "sdxl": "SDXL",
    "flux-dev": "Flux.1-dev",
    "flux-schnell": "Flux.1-schnell",
    "sd3-medium": "SD3 Medium",
    "sd35-medium": "SD3.5 Medium",
    "sd35-large": "SD3.5 Large",
}


def is_flow_arch(arch: str) -> bool:
    """Whether `arch` is trained by the flow-matching trainer (``engine.train.flow``)."""
    return arch in FLOW_ARCHS


class UnsupportedModelError(ValueError):
    """The base model is not an SD1.5 / SDXL checkpoint this trainer can use; the message says what it is."""


class MissingTokenizerError(FileNotFoundError):
    """No CLIP vocabulary (vocab.json + merges.txt) was found for a single-file checkpoint."""


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """A torch dtype from a torch dtype or one of "fp32", "fp16", "bf16" (and their long names)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return DTYPES[dtype]


def shipped_config_dir(arch: str) -> Path:
    """The shipped diffusers configs (no weights, no vocabulary) for `arch` ("sd15" or "sdxl")."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")
    return CONFIG_ROOT / arch


# --------------------------------------------------------------------------------------------------
# Architecture detection


def _flow_arch(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """A flow-matching arch id from a file's tensors (Flux.1 in BFL or diffusers names, SD3.x), or None;
    raises `UnsupportedModelError` for the Flux relatives this trainer does not handle."""
    from ..models import flux_files, sd3_files

    bare = flux_files.strip_prefix(shapes)
    if any(k.startswith("single_stream_modulation.") for k in bare):
        raise UnsupportedModelError("a Flux.2 model: only Flux.1 (dev, schnell) is supported")
    if any(k.startswith("distilled_guidance_layer.") for k in bare):
        raise UnsupportedModelError("a Chroma model (Flux-derived): only Flux.1 (dev, schnell) is supported")
    if not flux_files.is_bfl_flux(bare) and flux_files.is_diffusers_flux(bare):
        guided = any(k.startswith("time_text_embed.guidance_embedder.") for k in bare)
        bare = {"img_in.weight": bare["x_embedder.weight"], flux_files.TRIGGER: (0,)}
        if guided:
            bare["guidance_in.in_layer.weight"] = (0,)
    if flux_files.is_bfl_flux(bare):
        channels = bare["img_in.weight"][1]
        if channels != 64:
            raise UnsupportedModelError(
                f"a Flux.1 model with {channels // 4} latent input channels (Fill / Depth / Canny, or Kontext): "
                "train on the base Flux.1-dev or schnell"
            )
        return "flux-dev" if "guidance_in.in_layer.weight" in bare else "flux-schnell"
    if sd3_files.is_sd3(shapes):
        return sd3_files.sd3_variant(shapes)
    return None


def arch_from_keys(shapes: dict[str, tuple[int, ...]]) -> str:
    """The architecture id of a single file from its tensor names and shapes; raises `UnsupportedModelError`.

    ``flux-dev`` / ``flux-schnell``: a Flux.1 transformer (``double_blocks.0.img_attn.norm.key_norm.scale`` +
    ``img_in``, with or without ``model.diffusion_model.``; dev has ``guidance_in``), or the same in
    diffusers names. ``sd3-medium`` / ``sd35-medium`` / ``sd35-large``: an SD3 MMDiT (``models.sd3_files``).
    SDXL base: an SGM U-Net with ``label_emb`` and both ``conditioner.embedders`` (CLIP-L, bigG).
    SD1.5: an LDM U-Net with 4 input channels and a CLIP-L text encoder under ``cond_stage_model.transformer``.
    """
    flow = _flow_arch(shapes)
    if flow is not None:
        return flow
    unet = "model.diffusion_model."
    has_unet = any(k.startswith(unet) for k in shapes)
    has_vae = any(k.startswith("first_stage_model.") for k in shapes)
    label = shapes.get(unet + "label_emb.0.0.weight")
    conv_in = shapes.get(unet + "input_blocks.0.0.weight")
    if not has_unet:
        prefixes = sorted({k.split(".")[0] for k in shapes})[:8]
        raise UnsupportedModelError(
            f"not a model this trainer knows: no SD1.5 / SDXL U-Net ('model.diffusion_model.'), Flux.1 or SD3 "
            f"transformer keys (top-level names: {prefixes}). Supported: {', '.join(ARCH_NAMES.values())}"
        )
    if conv_in is not None and conv_in[1] != 4:
        raise UnsupportedModelError(
            f"the U-Net takes {conv_in[1]} input channels (an inpainting or instruct model); train on a regular "
            "4-channel SD1.5 / SDXL checkpoint"
        )
    if not has_vae:
        raise UnsupportedModelError(
            "this file holds a U-Net but no VAE / text encoder (a 'diffusion model only' file); training needs a "
            "full checkpoint from the checkpoints folder, or a diffusers folder"
        )
    if label is not None:
        has_te1 = any(k.startswith("conditioner.embedders.0.transformer.") for k in shapes)
        has_te2 = any(k.startswith("conditioner.embedders.1.model.") for k in shapes)
        if not (has_te1 and has_te2):
            raise UnsupportedModelError(
                "an SDXL-family file without both SDXL base text encoders (CLIP-L and bigG): the SDXL refiner "
                "and other variants are not supported"
            )
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        raise UnsupportedModelError(
            "an SD2.x checkpoint (OpenCLIP text encoder); only SD1.5 and SDXL are supported"
        )
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd15"
    raise UnsupportedModelError(
        "a U-Net and VAE but no SD1.5 (cond_stage_model) or SDXL (conditioner) text encoder"
    )


_FLOW_PIPELINES = {"FluxPipeline", "StableDiffusion3Pipeline"}


def _flow_folder_arch(source: Path, pipeline: str) -> str:
    config = json.loads((source / "transformer" / "config.json").read_text())
    if pipeline == "FluxPipeline":
        return "flux-dev" if config.get("guidance_embeds") else "flux-schnell"
    if config.get("dual_attention_layers"):
        return "sd35-medium"
    return "sd35-large" if config.get("qk_norm") else "sd3-medium"


def detect_arch(source: str | os.PathLike) -> str:
    """The architecture id (`ARCHS`, `FLOW_ARCHS`) of a single-file checkpoint or a diffusers folder."""
    source = Path(source)
    if source.is_dir():
        index = source / "model_index.json"
        if not index.is_file():
            raise UnsupportedModelError(
                f"{source} is a folder without model_index.json: not a diffusers model"
            )
        name = json.loads(index.read_text()).get("_class_name", "")
        if name in _FLOW_PIPELINES:
            return _flow_folder_arch(source, name)
        for arch, pipeline in _PIPELINES.items():
            if name == pipeline:
                return arch
        raise UnsupportedModelError(
            f"{source}: pipeline {name!r}; expected one of {sorted([*_PIPELINES.values(), *_FLOW_PIPELINES])}"
        )
    if not source.is_file():
        raise FileNotFoundError(f"base model not found: {source}")
    return arch_from_keys(tensor_shapes(source))


# --------------------------------------------------------------------------------------------------
# Tokenizers


def tokenizer_candidates(extra: Iterable[str | os.PathLike | None] = ()) -> list[Path]:
    """Folders that may hold the CLIP vocabulary, in the order they are tried."""
    out = [Path(p) for p in extra if p]
    if os.environ.get("CHARFORGE_CLIP_TOKENIZER"):
        out.append(Path(os.environ["CHARFORGE_CLIP_TOKENIZER"]).expanduser())
    if os.environ.get("COMFYUI_DIR"):
        out.append(Path(os.environ["COMFYUI_DIR"]).expanduser() / "comfy" / "sd1_tokenizer")
    return out


def find_tokenizer_dir(candidates: Sequence[str | os.PathLike | None] = ()) -> Path:
    """The first candidate folder with ``vocab.json`` and ``merges.txt``; raises `MissingTokenizerError`."""
    tried = tokenizer_candidates(candidates)
    for folder in tried:
        if all((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    raise MissingTokenizerError(
        "the CLIP tokenizer vocabulary (vocab.json + merges.txt) was not found; looked in: "
        + (", ".join(str(p) for p in tried) or "nowhere")
        + ". Inside ComfyUI it is comfy/sd1_tokenizer; elsewhere set CHARFORGE_CLIP_TOKENIZER or COMFYUI_DIR, "
        "or train from a diffusers folder (it has its own tokenizer)"
    )


def load_tokenizers(arch: str, vocab_dir: str | os.PathLike) -> list:
    """The CLIP tokenizer(s) for `arch` from a vocabulary folder, configured as the shipped configs say."""
    from transformers import CLIPTokenizer

    names = ["tokenizer", "tokenizer_2"] if arch == "sdxl" else ["tokenizer"]
    tokenizers = []
    for name in names:
        config = json.loads((shipped_config_dir(arch) / name / "tokenizer_config.json").read_text())
        tokenizers.append(
            CLIPTokenizer.from_pretrained(
                str(vocab_dir), pad_token=config["pad_token"], model_max_length=config["model_max_length"]
            )
        )
    return tokenizers


# --------------------------------------------------------------------------------------------------
# The loaded model


@dataclass
class BaseModel:
    """An SD1.5 / SDXL pipeline's parts, ready for training.

    ``text_encoders`` / ``tokenizers`` hold one entry for SD1.5 and two (CLIP-L, bigG) for SDXL.
    ``noise_scheduler`` is a ``DDPMScheduler`` with the model's betas (what training adds noise with).
    ``fingerprints`` identify the weights of each component for cache keys (see `fingerprint`).
    """

    arch: str
    source: str
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    sample_scheduler_config: dict
    dtype: torch.dtype
    fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    @property
    def unet_config(self) -> dict:
        return dict(self.unet.config)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    def components(self) -> dict[str, torch.nn.Module]:
        """``unet``, ``text_encoder`` (and ``text_encoder_2`` for SDXL) by their diffusers names."""
        out = {"unet": self.unet, "text_encoder": self.text_encoders[0]}
        if self.is_sdxl:
            out["text_encoder_2"] = self.text_encoders[1]
        return out

    def pipeline(self, scheduler: Any = None):
        """A diffusers pipeline over these components (for samples); shares the modules, copies nothing."""
        import diffusers

        cls = getattr(diffusers, _PIPELINES[self.arch])
        if scheduler is None:
            scheduler = diffusers.EulerDiscreteScheduler.from_config(self.sample_scheduler_config)
        parts: dict[str, Any] = {
            "vae": self.vae,
            "unet": self.unet,
            "scheduler": scheduler,
            "text_encoder": self.text_encoders[0],
            "tokenizer": self.tokenizers[0],
        }
        if self.is_sdxl:
            parts.update(text_encoder_2=self.text_encoders[1], tokenizer_2=self.tokenizers[1])
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def fingerprint(module: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A short hash that changes when the module's weights change (names, shapes and sampled values).

    Hashing every byte of a 2.8 GB text encoder would add seconds to every run; evenly spaced samples of
    each tensor (plus names, shapes, dtypes) tell different models apart just as well for cache keys.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to(device="cpu", dtype=torch.float32)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` where diffusers renamed ``torch_dtype`` (it warns about the old name), else ``torch_dtype=``."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}


#: the keys of a base model's scheduler config that describe its noise schedule: what a training or sampling
#: scheduler built for that model takes over from it
NOISE_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "steps_offset",
)


def _training_scheduler(scheduler_config: dict):
    from diffusers import DDPMScheduler

    schedule = {k: scheduler_config[k] for k in NOISE_SCHEDULE_KEYS if k in scheduler_config}
    return DDPMScheduler(**schedule, clip_sample=False)


def load_base_model(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    config_dir: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    tokenizer_candidates: Sequence[str | os.PathLike | None] = (),
) -> BaseModel:
    """Load `source` (a single-file checkpoint or a diffusers folder) on the CPU in `dtype`.

    ``config_dir`` replaces the shipped configs for single files (a diffusers folder with the configs of a
    non-standard model, e.g. the tiny test models). ``tokenizer_dir`` / ``tokenizer_candidates`` say where
    the CLIP vocabulary is (see the module docstring). The VAE of an SDXL model is kept in fp32 when
    `dtype` is fp16 (it overflows in fp16). Never touches the network.
    """
    require("diffusers")
    require("transformers")
    import diffusers

    source = Path(source).expanduser()
    arch = detect_arch(source)
    if is_flow_arch(arch):
        raise UnsupportedModelError(
            f"{source.name} is {ARCH_NAMES[arch]}, a flow-matching base: load it with "
            "engine.train.flow.load_flow_model (the Train LoRA node does)"
        )
    weight_dtype = resolve_dtype(dtype)
    cls = getattr(diffusers, _PIPELINES[arch])
    offline = {"local_files_only": True}
    if source.is_dir():
        extra = {}
        if arch == "sd15":
            extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if not (source / "tokenizer" / "vocab.json").is_file():
            vocab = find_tokenizer_dir([tokenizer_dir, *tokenizer_candidates])
            extra.update(zip(("tokenizer", "tokenizer_2"), load_tokenizers(arch, vocab), strict=False))
        pipe = cls.from_pretrained(str(source), **_dtype_argument(weight_dtype), **offline, **extra)
    else:
        vocab = find_tokenizer_dir([tokenizer_dir, *tokenizer_candidates])
        tokenizers = dict(zip(("tokenizer", "tokenizer_2"), load_tokenizers(arch, vocab), strict=False))
        if arch == "sd15":
            tokenizers.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        config = str(config_dir or shipped_config_dir(arch))
        pipe = cls.from_single_file(
            str(source), config=config, **_dtype_argument(weight_dtype), **offline, **tokenizers
        )
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    tokenizers_out = [pipe.tokenizer] + ([pipe.tokenizer_2] if arch == "sdxl" else [])
    vae = pipe.vae
    if weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae = vae.to(torch.float32)
    for module in (pipe.unet, vae, *text_encoders):
        module.requires_grad_(False)
        module.eval()
    scheduler_config = dict(pipe.scheduler.config)
    model = BaseModel(
        arch=arch,
        source=str(source),
        unet=pipe.unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers_out,
        noise_scheduler=_training_scheduler(scheduler_config),
        sample_scheduler_config=scheduler_config,
        dtype=weight_dtype,
    )
    model.fingerprints = {
        "vae": fingerprint(vae),
        **{f"text_encoder{'_2' if i else ''}": fingerprint(te) for i, te in enumerate(text_encoders)},
    }
    return model


# --------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class PromptEmbeddings:
    """What the U-Net is conditioned on: ``hidden`` (B, 2 + max tokens, D), 77 positions by default,
    and, for SDXL, ``pooled`` (B, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def sdxl_pooled(self) -> torch.Tensor:
        """``pooled``, which SDXL prompts have (TypeError otherwise, as using None as a tensor raises)."""
        if self.pooled is None:
            raise TypeError("these prompt embeddings have no pooled output (SDXL prompts have one)")
        return self.pooled

    def to(self, device=None, dtype=None) -> PromptEmbeddings:
        return PromptEmbeddings(
            self.hidden.to(device=device, dtype=dtype),
            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
        )

    def index(self, items) -> PromptEmbeddings:
        return PromptEmbeddings(self.hidden[items], None if self.pooled is None else self.pooled[items])

    @staticmethod
    def cat(parts: Sequence[PromptEmbeddings]) -> PromptEmbeddings:
        pooled = None if parts[0].pooled is None else torch.cat([p.sdxl_pooled() for p in parts])
        return PromptEmbeddings(torch.cat([p.hidden for p in parts]), pooled)


TOKEN_LENGTHS = (75, 150, 225)  # kohya's max_token_length choices: 1, 2 or 3 CLIP windows


def tokenize(tokenizer, prompts: Sequence[str], max_tokens: int = 75) -> torch.Tensor:
    """Token ids (B, windows, 77): each prompt cut to `max_tokens` tokens and split into 75-token windows.

    Every window is ``[BOS] + 75 tokens + [end]`` as CLIP expects: the end is EOS when the window's text
    runs to its edge, else padding (the tokenizer's own pad token, which is EOS for CLIP-L and ``!`` for
    SDXL's second encoder). With 75 tokens this is exactly the tokenizer's own padded, truncated output.
    """
    window = tokenizer.model_max_length - 2
    if max_tokens % window:
        raise ValueError(f"max_token_length must be a multiple of {window} (got {max_tokens})")
    windows = max_tokens // window
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for prompt in prompts:
        content = tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False).input_ids[
            :max_tokens
        ]
        body = content + [eos] + [pad] * (max_tokens - len(content))  # max_tokens + 1 tokens
        chunks = []
        for i in range(windows):
            part = body[i * window : (i + 1) * window]
            if part[0] == pad and i > 0:  # a window past the text: starts with EOS, like the first one ends
                part = [eos] + part[1:]
            end = eos if part[-1] not in (eos, pad) else pad  # text cut at the window's edge: close it
            chunks.append([bos] + part + [end])
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.long)


def _final_layer_norm(text_encoder):
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def _join_windows(hidden: torch.Tensor, windows: int) -> torch.Tensor:
    """(B * windows, 77, D) -> (B, 2 + 75 * windows, D): BOS of the first window, every window's 75
    inner states, the end state of the last window (kohya's layout; identity for one window)."""
    hidden = hidden.reshape(-1, windows, *hidden.shape[1:])
    if windows == 1:
        return hidden[:, 0]
    parts = [hidden[:, 0, :1]] + [hidden[:, i, 1:-1] for i in range(windows)] + [hidden[:, -1, -1:]]
    return torch.cat(parts, dim=1)


def encode_prompts(
    model: BaseModel,
    prompts: Sequence[str],
    device: torch.device | str | None = None,
    clip_skip: int = 1,
    max_tokens: int = 75,
) -> PromptEmbeddings:
    """Encode `prompts` as the U-Net expects (gradients flow when a text encoder has trainable LoRA).

    SD1.5: the last hidden state of CLIP-L (``clip_skip`` 2: the layer before, through the final layer
    norm, as kohya / A1111 do). SDXL: the penultimate hidden states of both encoders concatenated, and
    the projected pooled output of the second. Prompts longer than 75 tokens keep up to `max_tokens`
    (150 or 225): each 75-token window is encoded on its own and the states are joined (`tokenize`,
    `_join_windows`), so the U-Net sees 2 + max_tokens positions; SDXL's pooled output is the first
    window's.
    """
    device = device or next(model.text_encoders[0].parameters()).device
    outputs, windows = [], 1
    for text_encoder, tokenizer in zip(model.text_encoders, model.tokenizers, strict=True):
        ids = tokenize(tokenizer, prompts, max_tokens).to(device)
        windows = ids.shape[1]
        outputs.append(text_encoder(ids.flatten(0, 1), output_hidden_states=True))
    if not model.is_sdxl:
        out = outputs[0]
        if clip_skip <= 1:
            return PromptEmbeddings(_join_windows(out.last_hidden_state, windows))
        skipped = _final_layer_norm(model.text_encoders[0])(out.hidden_states[-clip_skip])
        return PromptEmbeddings(_join_windows(skipped, windows))
    hidden = torch.cat([outputs[0].hidden_states[-2], outputs[1].hidden_states[-2]], dim=-1)
    pooled = outputs[1].text_embeds.reshape(-1, windows, outputs[1].text_embeds.shape[-1])[:, 0]
    return PromptEmbeddings(_join_windows(hidden, windows), pooled)


def sdxl_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's size/crop conditioning (6,): original (h, w), crop (top, left), target (h, w), in pixels."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
