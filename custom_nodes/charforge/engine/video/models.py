"""The video model: an SD1.5 / SDXL base, a motion module, LoRAs, and how it runs.

`VideoModelSpec` is a small frozen value that says what to load (node outputs carry it; chaining LoRA
nodes makes a new one). `load_video_model` turns it into a `VideoModel` and keeps the last one loaded,
so a second clip with the same base and motion module starts at once; changing only LoRAs or their
strengths swaps adapters on the loaded model.

The base model is read by the training stage's loader (`charforge.engine.train.models.load_base_model`):
a single-file checkpoint with the pack's shipped configs, offline, or a diffusers folder. The motion
module is merged into diffusers' ``UNetMotionModel``. Character LoRAs (kohya, diffusers/PEFT and the
other formats diffusers reads) and motion LoRAs load as named PEFT adapters through diffusers'
``load_lora_weights``; ``set_adapters`` sets their strengths.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ...deps import require
from ..control import Cancelled
from ..models.devices import best_device
from .motion import MotionModuleInfo, load_motion_adapter, load_motion_lora

log = logging.getLogger("charforge")

DTYPES = ("auto", "fp32", "fp16", "bf16")
ATTENTION = ("sdpa", "eager")


class VideoModelError(ValueError):
    """The chosen files do not make a working video model; the message says why and what to pick."""


@dataclass(frozen=True)
class LoraRef:
    """One LoRA file and its strength."""

    path: str
    strength: float = 1.0

    @property
    def adapter_name(self) -> str:
        """A PEFT adapter name unique to the file (names must be valid module attribute names)."""
        stem = re.sub(r"\W", "_", Path(self.path).stem)[:40] or "lora"
        digest = hashlib.sha1(os.path.abspath(self.path).encode()).hexdigest()[:8]
        return f"{stem}_{digest}"


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how the model runs.

    ``dtype`` auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU. ``attention`` sdpa is
    PyTorch's fused scaled-dot-product attention (flash / memory-efficient kernels), eager the plain
    matmul version. ``vae_slicing`` decodes a few frames at a time; ``vae_tiling`` also splits each frame
    into tiles (large sizes on small GPUs). ``offload`` keeps the text encoders and VAE in CPU memory
    until they are needed. ``compile`` runs the U-Net through ``torch.compile`` (slow first clip, faster
    after). ``channels_last`` stores convolution weights NHWC, which tensor cores prefer.
    """

    device: str = "auto"
    dtype: str = "auto"
    attention: str = "sdpa"
    vae_slicing: bool = True
    vae_tiling: bool = False
    offload: bool = False
    compile: bool = False
    channels_last: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {DTYPES}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention {self.attention!r}: choose one of {ATTENTION}")

    def resolve_device(self) -> torch.device:
        return torch.device(self.device if self.device != "auto" else best_device())

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32


@dataclass(frozen=True)
class VideoModelSpec:
    """What a video model is made of. Cheap to copy; nothing is loaded until `load_video_model`.

    ``base``: an SD1.5 / SDXL single-file checkpoint or diffusers folder. ``motion_module``: an
    AnimateDiff module file (original or diffusers layout) or a diffusers ``MotionAdapter`` folder.
    ``config_dir`` replaces the shipped diffusers configs for single files of non-standard size (the
    test models); ``tokenizer_dirs`` are extra places to look for the CLIP vocabulary.
    """

    base: str
    motion_module: str
    loras: tuple[LoraRef, ...] = ()
    motion_loras: tuple[LoraRef, ...] = ()
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    config_dir: str | None = None
    tokenizer_dirs: tuple[str, ...] = ()

    def with_lora(self, path: str, strength: float = 1.0) -> VideoModelSpec:
        """A copy with one more character LoRA."""
        return replace(self, loras=(*self.loras, LoraRef(str(path), float(strength))))

    def with_motion_lora(self, path: str, strength: float = 1.0) -> VideoModelSpec:
        """A copy with one more motion LoRA."""
        return replace(self, motion_loras=(*self.motion_loras, LoraRef(str(path), float(strength))))

    def with_options(self, **changes: Any) -> VideoModelSpec:
        return replace(self, options=replace(self.options, **changes))

    def describe(self) -> str:
        parts = [f"base {Path(self.base).name}", f"motion {Path(self.motion_module).name}"]
        parts += [f"LoRA {Path(r.path).name} x{r.strength:g}" for r in self.loras]
        parts += [f"motion LoRA {Path(r.path).name} x{r.strength:g}" for r in self.motion_loras]
        return ", ".join(parts)


def _file_key(path: str) -> tuple[str, int, int]:
    p = Path(path)
    if p.is_dir():
        newest = max((f.stat().st_mtime_ns for f in p.rglob("*") if f.is_file()), default=0)
        return str(p.resolve()), newest, 0
    stat = p.stat()
    return str(p.resolve()), stat.st_mtime_ns, stat.st_size


@dataclass
class VideoModel:
    """A loaded video pipeline: diffusers' AnimateDiff pipeline object (components, prompt encoding) and
    what the sampler needs to know about it."""

    arch: str  # "sd15" or "sdxl"
    pipe: Any  # AnimateDiffPipeline / AnimateDiffSDXLPipeline
    motion: MotionModuleInfo
    device: torch.device
    dtype: torch.dtype
    options: RuntimeOptions
    scheduler_config: dict
    key: tuple
    adapters: dict[str, tuple] = field(default_factory=dict)  # adapter name -> file key
    unet2d_config: dict = field(default_factory=dict)  # the base's 2D U-Net (ControlNets are derived from it)
    lora_strengths: dict[str, tuple[str, float]] = field(
        default_factory=dict
    )  # active: name -> (kind, strength)
    _unet_call: Any = None

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    def text_encoders(self) -> list:
        return [self.pipe.text_encoder] + ([self.pipe.text_encoder_2] if self.is_sdxl else [])

    def unet_forward(self, *args, **kwargs):
        """The U-Net call the sampler makes (the compiled module when ``compile`` is on)."""
        unet = self.pipe.unet if self._unet_call is None else self._unet_call
        return unet(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # LoRAs

    def apply_loras(self, loras: tuple[LoraRef, ...], motion_loras: tuple[LoraRef, ...]) -> list[str]:
        """Make exactly these LoRAs active at these strengths; return one report line per LoRA."""
        wanted: dict[str, tuple[str, LoraRef]] = {}
        strengths: dict[str, float] = {}
        for kind, refs in (("lora", loras), ("motion", motion_loras)):
            for ref in refs:
                if not Path(ref.path).is_file():
                    raise FileNotFoundError(f"LoRA file not found: {ref.path}")
                name = ref.adapter_name
                wanted[name] = (kind, ref)
                strengths[name] = strengths.get(name, 0.0) + ref.strength  # the same file twice adds up
        stale = [
            n for n in self.adapters if n not in wanted or self.adapters[n] != _file_key(wanted[n][1].path)
        ]
        if stale:
            self.pipe.delete_adapters(stale)
            for name in stale:
                self.adapters.pop(name, None)
        report = []
        for name, (kind, ref) in wanted.items():
            if name in self.adapters:
                continue
            before = self._adapted_layers()
            try:
                if kind == "motion":
                    self.pipe.load_lora_weights(load_motion_lora(ref.path), adapter_name=name)
                else:
                    self.pipe.load_lora_weights(ref.path, adapter_name=name)
            except Exception as exc:
                if isinstance(exc, Cancelled):
                    raise
                with contextlib.suppress(Exception):  # a half-injected adapter must not stay behind
                    self.pipe.delete_adapters([name])
                raise VideoModelError(
                    f"{Path(ref.path).name}: could not be loaded as a "
                    f"{'motion ' if kind == 'motion' else ''}LoRA for this "
                    f"{self.arch.upper()} model: {exc}"
                ) from exc
            added = self._adapted_layers(name)
            if added == 0:
                self.pipe.delete_adapters([name])
                raise VideoModelError(
                    f"{Path(ref.path).name} matched no layer of this {self.arch.upper()} model "
                    "(a LoRA for another base model?)"
                )
            self.adapters[name] = _file_key(ref.path)
            log.debug("video: adapter %s (%d layers, %d before)", name, added, before)
        names = list(wanted)
        self.lora_strengths = {n: (wanted[n][0], strengths[n]) for n in names}
        if names:
            self.pipe.set_adapters(names, adapter_weights=[strengths[n] for n in names])
            self.pipe.enable_lora()
        elif self.adapters:
            self.pipe.disable_lora()
        for name, (kind, ref) in wanted.items():
            label = "motion LoRA" if kind == "motion" else "LoRA"
            report.append(
                f"{label} {Path(ref.path).name} x{strengths[name]:g} ({self._adapted_layers(name)} layers)"
            )
        return report

    def _adapted_layers(self, adapter: str | None = None) -> int:
        count = 0
        for module in [self.pipe.unet, *self.text_encoders()]:
            for sub in module.modules():
                lora_a = getattr(sub, "lora_A", None)
                if isinstance(lora_a, torch.nn.ModuleDict) and (
                    len(lora_a) > 0 if adapter is None else adapter in lora_a
                ):
                    count += 1
        return count

    # ----------------------------------------------------------------------------------------------
    # Offload

    def bring(self, *modules) -> None:
        """Move `modules` to the run device (a no-op without offload)."""
        if self.options.offload:
            for module in modules:
                module.to(self.device)

    def park(self, *modules) -> None:
        """Move `modules` back to CPU memory (a no-op without offload)."""
        if self.options.offload:
            for module in modules:
                module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Building


def motion_unet(unet2d, adapter):
    """diffusers' ``UNetMotionModel`` from a 2D U-Net and a motion adapter, in the 2D U-Net's dtype and device.

    The motion U-Net's weights are exactly the 2D U-Net's plus the adapter's, under the same names. It is
    built on the meta device (no random initialisation of 1.3 B parameters, no float32 copy) and filled from
    both state dicts with ``strict=True``, so nothing stays uninitialised. (diffusers' own
    ``UNetMotionModel.from_unet2d(..., load_weights=True)`` in 0.42 also forgets SDXL's ``add_embedding``, the
    size and pooled-text conditioning, and leaves it random.)
    """
    from diffusers import UNetMotionModel

    with torch.device("meta"):
        model = UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=False)
    model = torch.nn.Module.to(model, dtype=unet2d.dtype)
    model.to_empty(device=unet2d.device)
    weights = {**unet2d.state_dict(), **adapter.state_dict()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise VideoModelError(
            f"the base U-Net and the motion module do not make a motion U-Net: {exc}"
        ) from exc
    return model


def build_video_model(spec: VideoModelSpec) -> VideoModel:
    """Load everything `spec` names (no cache; see `load_video_model`)."""
    require("diffusers")
    from ..train.models import load_base_model

    device = spec.options.resolve_device()
    dtype = spec.options.resolve_dtype(device)
    adapter, info = load_motion_adapter(spec.motion_module)
    base = load_base_model(
        spec.base, dtype=dtype, config_dir=spec.config_dir, tokenizer_candidates=spec.tokenizer_dirs
    )
    if base.arch != info.base:
        need = "an SDXL checkpoint" if info.base == "sdxl" else "an SD1.5 checkpoint"
        raise VideoModelError(
            f"{Path(spec.motion_module).name} is an {info.describe()} module and needs {need}; "
            f"{Path(spec.base).name} is {base.arch.upper()}"
        )
    unet2d, base.unet = base.unet, None
    return assemble_video_model(
        base.arch,
        unet2d,
        adapter,
        info,
        vae=base.vae,
        text_encoders=base.text_encoders,
        tokenizers=base.tokenizers,
        scheduler_config=base.sample_scheduler_config,
        options=spec.options,
        key=_model_key(spec),
    )


def assemble_video_model(
    arch: str,
    unet2d,
    adapter,
    info: MotionModuleInfo,
    *,
    vae,
    text_encoders: list,
    tokenizers: list,
    scheduler_config: dict,
    options: RuntimeOptions,
    key: tuple = (),
) -> VideoModel:
    """A `VideoModel` from loaded parts (the base model's 2D U-Net, a ``MotionAdapter``, VAE, text
    encoders, tokenizers). `build_video_model` reads them from files; the benchmark builds them with
    random weights. The parts end up on the run device in the options' dtype."""
    import diffusers

    device = options.resolve_device()
    dtype = options.resolve_dtype(device)
    adapter_widths = tuple(info.block_out_channels)
    unet_widths = tuple(unet2d.config.block_out_channels)
    if adapter_widths != unet_widths:
        raise VideoModelError(
            f"motion module widths {adapter_widths} do not match the base U-Net's {unet_widths}"
        )
    unet = motion_unet(unet2d, adapter)
    # HotShot-XL: its temporal GroupNorm works frame by frame (engine/video/hotshot.py).
    if info.per_frame_norm:
        from .hotshot import use_per_frame_norms

        use_per_frame_norms(unet)
    if unet.dtype != dtype:
        unet = unet.to(dtype)
    unet.eval().requires_grad_(False)
    scheduler = diffusers.DDIMScheduler.from_config(scheduler_config)
    # motion_adapter=None: the U-Net already holds the motion layers. diffusers lists motion_adapter among the
    # optional components but annotates it without None, hence the two ignores.
    pipe: diffusers.AnimateDiffPipeline | diffusers.AnimateDiffSDXLPipeline
    if arch == "sdxl":
        pipe = diffusers.AnimateDiffSDXLPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=unet,
            motion_adapter=None,  # type: ignore[arg-type]
            scheduler=scheduler,
        )
    else:
        pipe = diffusers.AnimateDiffPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            tokenizer=tokenizers[0],
            unet=unet,
            motion_adapter=None,  # type: ignore[arg-type]
            scheduler=scheduler,
        )
    pipe.set_progress_bar_config(disable=True)
    if options.attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.offload:
        unet.to(device)
    else:
        pipe.to(device)
    model = VideoModel(
        arch=arch,
        pipe=pipe,
        motion=info,
        device=device,
        dtype=dtype,
        options=options,
        scheduler_config=dict(scheduler_config),
        key=key,
        unet2d_config=dict(unet2d.config),
    )
    if options.compile:
        model._unet_call = torch.compile(unet, dynamic=False)
    return model


def _model_key(spec: VideoModelSpec) -> tuple:
    return (
        _file_key(spec.base),
        _file_key(spec.motion_module),
        spec.options,
        spec.config_dir,
        spec.tokenizer_dirs,
    )


_cache_lock = threading.Lock()
_cached: VideoModel | None = None


def load_video_model(spec: VideoModelSpec) -> tuple[VideoModel, list[str]]:
    """The video model for `spec` with its LoRAs applied, and a report line per LoRA.

    The last model stays loaded: the same base, motion module and options reuse it. Anything else
    frees it first (so two models never sit in GPU memory together).
    """
    global _cached
    with _cache_lock:
        for path in (spec.base, spec.motion_module):
            if not Path(path).exists():
                raise FileNotFoundError(f"model not found: {path}")
        key = _model_key(spec)
        if _cached is None or _cached.key != key:
            unload_video_model()
            _cached = build_video_model(spec)
        report = _cached.apply_loras(spec.loras, spec.motion_loras)
        return _cached, report


def unload_video_model() -> None:
    """Forget the loaded model and give its memory back."""
    global _cached
    if _cached is not None:
        device = _cached.device
        _cached = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
