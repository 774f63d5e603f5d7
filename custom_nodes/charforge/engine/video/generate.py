"""Generate a clip: text (with prompt travel) to video, image to video, video to video.

The denoising loop is written out here rather than taken from diffusers' ``AnimateDiffPipeline.__call__``
because three things need it: one text embedding per frame (prompt travel), overlapping context windows
whose noise predictions are blended each step (clips of any length at the memory of one window), and
progress plus cancel between steps and windows. diffusers supplies the parts: the motion U-Net, the
text encoders (``encode_prompt``), the VAE and the schedulers.

Per step and window the U-Net sees the window's latents twice (negative and positive prompt, one batch)
and classifier-free guidance mixes the two predictions; the blended prediction of all windows then takes
one scheduler step for the whole clip.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..control import Control, or_default
from .context import ContextOptions, context_windows, window_weights
from .controlnet import VideoControl, WindowControl, control_residuals, fit_control_frames, window_controls
from .lora_schedule import LoraSchedule, scheduled_loras
from .models import VideoModel
from .prompts import Keyframe, frame_blends, parse_prompt_schedule
from .schedulers import make_scheduler

MAX_FRAMES = 4096


@dataclass
class VideoRequest:
    """One clip to make. ``init_frames`` (N, H, W, 3) float 0..1 turns it into image / video to video:
    one frame is used for every frame of the clip, N frames are resampled to ``frames``; ``strength``
    says how much of them is redrawn (1.0 = all, like no init)."""

    prompt: str
    negative_prompt: str = ""
    frames: int = 16
    width: int = 512
    height: int = 512
    steps: int = 25
    cfg: float = 7.5
    scheduler: str = "ddim"
    beta_schedule: str = "auto"
    seed: int = 0
    clip_skip: int = 1
    blend_prompts: bool = True
    context: ContextOptions = field(default_factory=ContextOptions)
    init_frames: torch.Tensor | None = None
    strength: float = 0.75
    # With init frames: one strength per frame instead of `strength` (e.g. from music, engine/video/audio_features).
    frame_strengths: list[float] | None = None
    # ControlNets with per-frame control images, applied in every U-Net call (engine/video/controlnet.py).
    controls: list[VideoControl] = field(default_factory=list)
    # Per-frame multipliers of the LoRAs' strengths, applied per context window (engine/video/lora_schedule.py).
    lora_schedule: LoraSchedule | None = None

    def validate(self, scale: int = 8) -> None:
        if not 1 <= self.frames <= MAX_FRAMES:
            raise ValueError(f"frames must be between 1 and {MAX_FRAMES} (got {self.frames})")
        for name, value in (("width", self.width), ("height", self.height)):
            if value < scale or value % scale:
                raise ValueError(f"{name} must be a positive multiple of {scale} (got {value})")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1] (got {self.strength})")
        if self.frame_strengths is not None:
            if len(self.frame_strengths) != self.frames:
                raise ValueError(
                    f"frame_strengths has {len(self.frame_strengths)} values for {self.frames} frames (one per frame)"
                )
            bad = [s for s in self.frame_strengths if not 0.0 < s <= 1.0]
            if bad:
                raise ValueError(f"frame strengths must be in (0, 1]; got {bad[:5]}")
        if self.clip_skip < 1:
            raise ValueError(f"clip_skip counts from 1 (the last layer); got {self.clip_skip}")
        for control in self.controls:
            control.validate()
        if self.lora_schedule is not None:
            self.lora_schedule.validate(self.frames)


@dataclass
class VideoResult:
    """Frames (F, H, W, 3) float32 0..1 on the CPU (a ComfyUI IMAGE batch) and how they were made."""

    frames: torch.Tensor
    seed: int
    keyframes: list[Keyframe]
    windows: list[list[int]]
    steps_run: int
    seconds: float
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Text


@dataclass
class FrameConditioning:
    """Per-frame text conditioning: ``positive``/``negative`` (F, 77, D); SDXL adds pooled (F, P)."""

    positive: torch.Tensor
    negative: torch.Tensor
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


def encode_schedule(
    model: VideoModel,
    keyframes: list[Keyframe],
    negative_prompt: str,
    frames: int,
    clip_skip: int = 1,
    blend: bool = True,
) -> FrameConditioning:
    """Encode each keyframe prompt once and blend them into one embedding per frame."""
    pipe = model.pipe
    encoders = model.text_encoders()
    model.bring(*encoders)
    skip = None if clip_skip <= 1 else clip_skip - 1  # diffusers counts skipped layers: 1 = penultimate
    try:
        with torch.inference_mode():
            prompts = [k.prompt for k in keyframes]
            if model.is_sdxl:
                pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                    prompt=prompts,
                    device=model.device,
                    num_videos_per_prompt=1,
                    do_classifier_free_guidance=True,
                    negative_prompt=[negative_prompt] * len(prompts),
                    clip_skip=skip,
                )
            else:
                pos, neg = pipe.encode_prompt(
                    prompts, model.device, 1, True, [negative_prompt] * len(prompts), clip_skip=skip
                )
                pooled = neg_pooled = None
    finally:
        model.park(*encoders)
    blends = frame_blends(keyframes, frames, blend)
    first = torch.tensor([b.first for b in blends], device=pos.device)
    second = torch.tensor([b.second for b in blends], device=pos.device)
    t = torch.tensor([b.t for b in blends], device=pos.device, dtype=torch.float32)

    def per_frame(table: torch.Tensor) -> torch.Tensor:
        weight = t.view(-1, *([1] * (table.dim() - 1)))
        mixed = table[first].float() * (1 - weight) + table[second].float() * weight
        return mixed.to(model.dtype)

    return FrameConditioning(
        per_frame(pos),
        neg[:1].expand(frames, *neg.shape[1:]).to(model.dtype),
        None if pooled is None else per_frame(pooled),
        None if neg_pooled is None else neg_pooled[:1].expand(frames, -1).to(model.dtype),
    )


# --------------------------------------------------------------------------------------------------
# Images <-> latents


def _fit_frames(images: torch.Tensor, frames: int, width: int, height: int) -> torch.Tensor:
    """(N, H, W, 3) 0..1 -> (frames, 3, height, width) -1..1: resampled in time, scaled to cover, centre-cropped
    (the same fitting as the control frames)."""
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[-1] < 3:
        raise ValueError(f"init frames must be an IMAGE batch (N, H, W, 3); got shape {tuple(images.shape)}")
    return fit_control_frames(images, frames, width, height) * 2 - 1


def _chunk(model: VideoModel) -> int:
    return 8 if model.options.vae_slicing else 1_000_000


def encode_frames(model: VideoModel, pixels: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) -1..1 -> latents (1, 4, F, H/8, W/8), scaled for the U-Net."""
    vae = model.vae
    model.bring(vae)
    try:
        out = []
        with torch.inference_mode():
            for start in range(0, pixels.shape[0], _chunk(model)):
                batch = pixels[start : start + _chunk(model)].to(model.device, vae.dtype)
                out.append(vae.encode(batch).latent_dist.mean)
        latents = torch.cat(out) * vae.config.scaling_factor
    finally:
        model.park(vae)
    return latents.permute(1, 0, 2, 3)[None].to(model.dtype)


def decode_latents(
    model: VideoModel, latents: torch.Tensor, progress: Callable[[], None] | None = None
) -> torch.Tensor:
    """Latents (1, 4, F, h, w) -> frames (F, H, W, 3) float32 0..1 on the CPU."""
    vae = model.vae
    model.bring(vae)
    try:
        frames = latents[0].permute(1, 0, 2, 3) / vae.config.scaling_factor
        out = []
        with torch.inference_mode():
            for start in range(0, frames.shape[0], _chunk(model)):
                batch = frames[start : start + _chunk(model)].to(vae.dtype)
                images = vae.decode(batch).sample
                out.append(((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu())
                if progress is not None:
                    progress()
    finally:
        model.park(vae)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# The loop


def _noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same clip on every device.
    generator = torch.Generator("cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@dataclass
class _WindowPlan:
    """What the U-Net gets for one window, prepared once per clip (no per-step host-to-device copies)."""

    index: torch.Tensor  # frame indices on the device
    weight: torch.Tensor  # blend weight per frame of the window
    text: torch.Tensor  # (2L or L, 77, D): negative then positive per frame
    kwargs: dict
    controls: list[WindowControl] = field(default_factory=list)  # the window's control frames per ControlNet


def _pooled(embeddings: torch.Tensor | None) -> torch.Tensor:
    """SDXL's pooled text embeddings (TypeError without them, as indexing None raised)."""
    if embeddings is None:
        raise TypeError("SDXL frame conditioning without pooled text embeddings")
    return embeddings


def _window_plan(
    model: VideoModel,
    cond: FrameConditioning,
    frames: list[int],
    weight: torch.Tensor,
    guidance: bool,
    request: VideoRequest,
) -> _WindowPlan:
    index = torch.tensor(frames, device=cond.positive.device)
    text = torch.cat([cond.negative[index], cond.positive[index]]) if guidance else cond.positive[index]
    kwargs = {}
    if model.is_sdxl:
        # SDXL's pooled text and size conditioning are per clip in the U-Net (one per batch entry, shared by the
        # window's frames): the window's frames' pooled embeddings are averaged.
        h, w = request.height, request.width
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=model.dtype, device=model.device)
        pooled = _pooled(cond.pooled)[index].mean(0, keepdim=True)
        if guidance:
            pooled = torch.cat([_pooled(cond.negative_pooled)[index].mean(0, keepdim=True), pooled])
            time_ids = torch.cat([time_ids, time_ids])
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return _WindowPlan(index.to(model.device), weight.to(model.device), text, kwargs)


def window_prediction(
    unet: Callable[..., Any],
    latents: torch.Tensor,
    timestep: torch.Tensor,
    plan: _WindowPlan,
    cfg: float,
    controls: list[WindowControl] | None = None,
) -> torch.Tensor:
    """The guided noise prediction for one window's `latents` (1, C, L, h, w) at `timestep` (a device tensor).

    With ``cfg > 1`` the U-Net sees the window twice in one batch (negative, then positive prompt) and the
    two predictions are mixed. All tensor work on the device: with the U-Net it is one graph for
    ``torch.compile`` (tests/engine/video/test_compile_ready.py). `controls`: the ControlNets acting at this step,
    called on the same batch first; their summed residuals go into the U-Net.
    """
    guidance = cfg > 1.0
    x = torch.cat([latents, latents]) if guidance else latents
    residuals = control_residuals(controls or [], x, timestep, plan.text, plan.kwargs)
    out = unet(x, timestep, encoder_hidden_states=plan.text, **plan.kwargs, **residuals).sample.float()
    if guidance:
        uncond, positive = out.chunk(2)
        out = uncond + cfg * (positive - uncond)
    return out


def generate_video(model: VideoModel, request: VideoRequest, control: Control | None = None) -> VideoResult:
    """Make the clip `request` describes with `model`.

    `control` gets progress after each denoising step and each decoded chunk and is checked before every
    window, so Cancel stops the clip within one U-Net call.
    """
    control = or_default(control)
    start_time = time.perf_counter()
    scale = model.pipe.vae_scale_factor
    request.validate(scale)
    info = model.motion
    context = request.context
    length = context.length or info.window
    if length > info.max_frames:
        raise ValueError(
            f"context length {length} is longer than this motion module's positional table "
            f"({info.max_frames} frames); use at most {info.max_frames}"
        )
    windows = context_windows(request.frames, length, context.overlap, context.loop)
    weights = [window_weights(len(w), context.fuse) for w in windows]

    keyframes = parse_prompt_schedule(request.prompt)
    cond = encode_schedule(
        model, keyframes, request.negative_prompt, request.frames, request.clip_skip, request.blend_prompts
    )

    betas = info.auto_beta_schedule if request.beta_schedule == "auto" else request.beta_schedule
    scheduler = make_scheduler(request.scheduler, model.scheduler_config, betas)
    # Timesteps stay on the CPU: the schedulers index their tables with them, which on the GPU would wait
    # for the device every step.
    scheduler.set_timesteps(request.steps)
    timesteps = scheduler.timesteps
    shape = (
        1,
        model.unet.config.in_channels,
        request.frames,
        request.height // scale,
        request.width // scale,
    )
    noise = _noise(request.seed, shape).to(model.device)
    per_frame = request.frame_strengths if request.init_frames is not None else None
    strength = max(per_frame) if per_frame else request.strength
    held: torch.Tensor | None = None  # per frame: timesteps it waits at the init frames before it is redrawn
    if request.init_frames is not None and (strength < 1.0 or per_frame):
        keep = min(int(request.steps * strength), request.steps)
        begin = (request.steps - keep) * scheduler.order
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        pixels = _fit_frames(request.init_frames, request.frames, request.width, request.height)
        init_latents = encode_frames(model, pixels).float()
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1]) if len(timesteps) else init_latents
        if per_frame:
            # A frame with less strength starts later: until its step it is the init frame noised to the current
            # timestep (as inpainting holds the unmasked area), and the frames being redrawn see it meanwhile.
            own = [min(int(request.steps * s), request.steps) for s in per_frame]
            held = torch.tensor([(keep - k) * scheduler.order for k in own])
    else:
        latents = noise * scheduler.init_noise_sigma
    # Latents and scheduler arithmetic stay in float32; only the U-Net runs in the model's dtype.

    decode_chunks = math.ceil(request.frames / _chunk(model))
    total = len(timesteps) + decode_chunks
    done = 0
    guidance = request.cfg > 1.0
    plans = [
        _window_plan(model, cond, frames, weight, guidance, request)
        for frames, weight in zip(windows, weights, strict=True)
    ]
    if request.controls:
        fitted = [
            fit_control_frames(c.frames, request.frames, request.width, request.height).to(
                model.device, model.dtype
            )
            for c in request.controls
        ]
        for plan in plans:
            plan.controls = window_controls(request.controls, fitted, plan.index, guidance)
    extra = {}
    if "generator" in inspect.signature(scheduler.step).parameters:  # ancestral samplers draw fresh noise
        extra["generator"] = torch.Generator("cpu").manual_seed(int(request.seed + 1) & 0xFFFF_FFFF_FFFF_FFFF)

    with torch.inference_mode(), scheduled_loras(model, request.lora_schedule) as scheduled:
        # The U-Net gets each timestep as a device tensor (a CPU one would be copied over, and wait, every call).
        for index, (t, t_device) in enumerate(zip(timesteps, timesteps.to(model.device), strict=True)):
            if held is not None and bool((held > index).any()):
                waiting = torch.nonzero(held > index).flatten().to(model.device)
                renoised = scheduler.add_noise(
                    init_latents.index_select(2, waiting), noise.index_select(2, waiting), t.reshape(1)
                )
                latents = latents.index_copy(2, waiting, renoised)
            scaled = scheduler.scale_model_input(latents, t).to(model.dtype)
            prediction = torch.zeros(latents.shape, dtype=torch.float32, device=model.device)
            coverage = torch.zeros(request.frames, dtype=torch.float32, device=model.device)
            acting = [c.active(index, len(timesteps)) for c in request.controls]
            for plan, frames_of_window in zip(plans, windows, strict=True):
                control.check()
                if scheduled is not None:
                    scheduled.enter(frames_of_window)
                out = window_prediction(
                    model.unet_forward,
                    scaled.index_select(2, plan.index),
                    t_device,
                    plan,
                    request.cfg,
                    [w for w, on in zip(plan.controls, acting, strict=True) if on],
                )
                prediction.index_add_(2, plan.index, out * plan.weight.view(1, 1, -1, 1, 1))
                coverage.index_add_(0, plan.index, plan.weight)
            prediction /= coverage.view(1, 1, -1, 1, 1)
            latents = scheduler.step(prediction, t, latents, **extra).prev_sample
            done += 1
            control.progress(done, total)
        if held is not None and bool(
            (held >= len(timesteps)).any()
        ):  # frames never redrawn stay the init frames
            kept = torch.nonzero(held >= len(timesteps)).flatten().to(model.device)
            latents = latents.index_copy(2, kept, init_latents.index_select(2, kept))

        def decoded_chunk() -> None:
            nonlocal done
            done += 1
            control.progress(done, total)

        frames = decode_latents(model, latents, decoded_chunk)
    return VideoResult(
        frames=frames,
        seed=request.seed,
        keyframes=keyframes,
        windows=windows,
        steps_run=len(timesteps),
        seconds=time.perf_counter() - start_time,
        info={
            "motion": info.describe(),
            "context_length": length,
            "dtype": str(model.dtype),
            "device": str(model.device),
            "controlnets": [c.name for c in request.controls],
            "lora_schedule": (
                None
                if request.lora_schedule is None
                else {
                    "target": request.lora_schedule.target,
                    "window_means": request.lora_schedule.window_means(windows),
                }
            ),
        },
    )
