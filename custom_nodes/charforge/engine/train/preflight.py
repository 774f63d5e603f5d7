"""Before training: how much memory and time will this take, does it fit, and which memory options to use.

Out-of-memory halfway through is the most common complaint about every trainer (docs/ecosystem.md §9).
So a run is estimated first, and refused with a message that names the numbers and the options when
it cannot fit.

How the estimate is made, without a GPU and without weights:

- **Activations and FLOPs are measured, not guessed**: the U-Net is built on PyTorch's ``meta`` device
  (no memory) from its config, the LoRA layers are added, and one forward + backward pass at the run's
  batch and latent size is traced. Every tensor autograd saves for the backward pass is counted once
  (by storage), which is the activation memory of a step without gradient checkpointing. Attention
  is counted as a flash / memory-efficient kernel stores it (q, k, v, output, log-sum-exp), as SDPA
  does on a GPU. ``FlopCounterMode`` counts the FLOPs (attention added by hand, 2 x forward for its
  backward).
- **Gradient checkpointing** keeps only each checkpointed block's input (diffusers checkpoints every
  ``ResnetBlock2D`` and ``BasicTransformerBlock``) plus one block's activations at a time while
  recomputing: saved-outside-blocks + block inputs + the largest block.
- **Everything else is counted**: weights of what sits on the device (the U-Net; the VAE and text
  encoders unless their outputs are cached), LoRA parameters + gradients + optimizer state, a backward
  transient of twice the largest saved tensor, and 10 % allocator slack; the caching phase (VAE encode
  at full resolution) is checked too.
- **Time**: FLOPs per step divided by the device's measured matmul throughput in the training dtype,
  times an efficiency factor (`EFFICIENCY`) — a rough figure, calibrated with
  ``benchmarks/bench_train.py``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .config import TrainConfig
from .lora import LoraSettings, add_lora

# Fraction of the measured matmul throughput a LoRA training step reaches (assumed; see module doc).
EFFICIENCY = {"cuda": 0.35, "cpu": 0.5}
SAFETY = 0.92  # use at most this share of free memory
SLACK = 1.10  # allocator fragmentation
OPTIMIZER_BYTES_PER_PARAM = {
    "adamw": 16,
    "adamw8bit": 10,
    "prodigy": 24,
    "adafactor": 9,
}  # fp32 param+grad+state
CHECKPOINT_UNITS = ("ResnetBlock2D", "BasicTransformerBlock")


class PreflightError(RuntimeError):
    """The run would not fit (or is otherwise impossible); the message says why and what to change."""


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    total_bytes: int
    free_bytes: int
    matmul_tflops: float  # measured in the training dtype

    def describe(self) -> str:
        return f"{self.name} ({_gb(self.free_bytes)} free of {_gb(self.total_bytes)})"


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def _available_ram() -> tuple[int, int]:
    try:
        with open("/proc/meminfo") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total // 2


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """Throughput of a square matmul on `device` in `dtype`, TFLOP/s (a few repeats, best time)."""
    size = size or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        (a @ b).sum().item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def device_info(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, measure: bool = True
) -> DeviceInfo:
    """Name, memory and measured throughput of `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        dtype = dtype if dtype != torch.float32 else torch.float32
    else:
        total, free = _available_ram()
        name = "CPU"
        dtype = torch.float32 if dtype == torch.float16 else dtype
    tflops = measure_matmul_tflops(device, dtype) if measure else 0.0
    return DeviceInfo(device.type, name, int(total), int(free), tflops)


# --------------------------------------------------------------------------------------------------
# Measuring a U-Net on the meta device


@dataclass(frozen=True)
class UNetProfile:
    """One traced training step of the U-Net (with LoRA) at a batch and latent size."""

    flops: float  # forward + backward, no recompute
    forward_flops: float
    saved_bytes: int  # activations kept for backward, no gradient checkpointing
    saved_bytes_checkpointed: int  # with gradient checkpointing
    largest_saved_bytes: int
    lora_parameters: int
    unet_parameters: int


class _FlashAttention(torch.autograd.Function):
    """Shape-only attention that saves what a flash kernel saves (meta tracing only)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_like_sdpa(counter: list[float]):
    """A torch-function mode (thread-local: nothing else in the process is affected) that replaces
    ``scaled_dot_product_attention`` by `_FlashAttention` and counts its FLOPs into ``counter[0]``."""
    import torch.nn.functional as functional
    from torch.overrides import TorchFunctionMode

    class FlashLikeAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not functional.scaled_dot_product_attention:
                return func(*args, **kwargs)
            q, k, v = args[:3]
            # Two matmuls of 2 * B * H * Nq * Nk * d FLOPs each.
            counter[0] += 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
            return _FlashAttention.apply(q, k, v)

    return FlashLikeAttention()


@functools.lru_cache(maxsize=16)
def _profile_cached(
    config_json: str,
    lora_json: str,
    batch: int,
    height: int,
    width: int,
    dtype_name: str,
    context_tokens: int,
) -> UNetProfile:
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet_config = json.loads(config_json)
    lora = LoraSettings(**json.loads(lora_json))
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).to(dtype)
    unet.requires_grad_(False)
    network = add_lora({"unet": unet}, replace(lora, train_text_encoder=False), seed=0)
    param_storages = {p.untyped_storage()._cdata for p in unet.parameters()}

    saved: dict[int, int] = {}
    largest = [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in param_storages and key not in saved:
            saved[key] = storage.nbytes()
            largest[0] = max(largest[0], storage.nbytes())
        return tensor

    units: list[tuple[int, int]] = []  # (input bytes, bytes saved inside) per checkpointed block
    open_units: dict[int, tuple[int, int]] = {}

    def before(module, args):
        inputs = sum(a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor))
        open_units[id(module)] = (inputs, sum(saved.values()))

    def after(module, args, output):
        inputs, start = open_units.pop(id(module))
        units.append((inputs, sum(saved.values()) - start))

    hooks = []
    for module in unet.modules():
        if type(module).__name__ in CHECKPOINT_UNITS:
            hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    meta = {"device": "meta", "dtype": dtype}
    sample = torch.empty(batch, unet_config.get("in_channels", 4), height, width, **meta)
    context = torch.empty(batch, context_tokens, unet_config["cross_attention_dim"], **meta)
    kwargs: dict[str, Any] = {}
    if unet_config.get("addition_embed_type") == "text_time":
        pooled = (
            unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        )
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, **meta),
            "time_ids": torch.empty(batch, 6, **meta),
        }
    attention = [0.0]
    try:
        with (
            _flash_like_sdpa(attention),
            FlopCounterMode(display=False) as counter,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            out = unet(
                sample, torch.full((batch,), 500, device="meta"), encoder_hidden_states=context, **kwargs
            ).sample
            forward = counter.get_total_flops() + attention[0]
            out.float().square().mean().backward()
    finally:
        for hook in hooks:
            hook.remove()
    total_saved = sum(saved.values())
    inside = sum(b for _, b in units)
    checkpointed = total_saved - inside + sum(i for i, _ in units) + max((b for _, b in units), default=0)
    return UNetProfile(
        flops=counter.get_total_flops() + 3 * attention[0],  # attention backward = 2 x forward
        forward_flops=forward,
        saved_bytes=total_saved,
        saved_bytes_checkpointed=checkpointed,
        largest_saved_bytes=largest[0],
        lora_parameters=network.num_parameters(),
        unet_parameters=sum(p.numel() for p in unet.parameters() if not p.requires_grad),
    )


def profile_unet(
    unet_config: dict,
    lora: LoraSettings,
    batch: int,
    latent_hw: tuple[int, int],
    dtype: torch.dtype = torch.bfloat16,
    context_tokens: int = 77,
) -> UNetProfile:
    """Trace one training step of a U-Net with `unet_config` on the meta device (cached per arguments)."""
    config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    lora_fields = {k: v for k, v in lora.__dict__.items()}
    return _profile_cached(
        json.dumps(config, sort_keys=True, default=list),
        json.dumps(lora_fields, sort_keys=True),
        batch,
        latent_hw[0],
        latent_hw[1],
        str(dtype).removeprefix("torch."),
        context_tokens,
    )


# --------------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Estimate:
    """Peak memory (bytes) by part, the step time, and whether it fits the device."""

    parts: dict[str, int]
    peak_bytes: int
    caching_peak_bytes: int
    flops_per_step: float
    seconds_per_step: float
    total_seconds: float
    device: DeviceInfo
    config: TrainConfig
    notes: list[str] = field(default_factory=list)

    @property
    def budget_bytes(self) -> int:
        return int(self.device.free_bytes * SAFETY)

    @property
    def fits(self) -> bool:
        return max(self.peak_bytes, self.caching_peak_bytes) <= self.budget_bytes

    def summary(self) -> str:
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in self.parts.items())
        return (
            f"estimated peak {_gb(max(self.peak_bytes, self.caching_peak_bytes))} on {self.device.describe()} "
            f"({parts}); about {self.seconds_per_step:.2f} s/step, {self.total_seconds / 60:.1f} min in all "
            f"(gradient checkpointing {'on' if self.config.gradient_checkpointing else 'off'}, "
            f"optimizer {self.config.optim.optimizer}, batch {self.config.batch_size})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "parts": self.parts,
            "peak_bytes": self.peak_bytes,
            "caching_peak_bytes": self.caching_peak_bytes,
            "flops_per_step": self.flops_per_step,
            "seconds_per_step": self.seconds_per_step,
            "total_seconds": self.total_seconds,
            "fits": self.fits,
            "device": self.device.__dict__,
            "notes": list(self.notes),
        }


def training_dtype(config: TrainConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)


def profile_for(unet_config: dict, config: TrainConfig) -> UNetProfile:
    """The U-Net trace `estimate` uses for `config` (call it early, e.g. in a thread, to have it cached)."""
    latent = config.data.resolution // 8
    return profile_unet(unet_config, config.lora, config.batch_size, (latent, latent), training_dtype(config))


def estimate(
    model, config: TrainConfig, device: DeviceInfo, num_images: int = 1, unet_config: dict | None = None
) -> Estimate:
    """Estimate peak memory and time of training `model` (a `models.BaseModel`) with `config`.

    ``unet_config`` (default: the model's) is what the U-Net is traced from.
    """
    dtype = training_dtype(config)
    profile = profile_for(unet_config or model.unet_config, config)
    element = torch.finfo(dtype).bits // 8
    parts: dict[str, int] = {"unet weights": profile.unet_parameters * element}
    vae_bytes = sum(p.numel() for p in model.vae.parameters()) * (
        4 if model.vae.dtype == torch.float32 else element
    )
    te_bytes = sum(p.numel() for te in model.text_encoders for p in te.parameters() if p.ndim) * element
    parts["vae weights"] = vae_bytes
    cached_text = (
        config.data.cache_text_encoder_outputs
        and not config.data.shuffle_caption
        and not config.lora.train_text_encoder
    )
    if not cached_text:
        parts["text encoder weights"] = te_bytes
    lora_params = profile.lora_parameters
    if config.lora.train_text_encoder:
        lora_params += sum(
            te.config.num_hidden_layers * 6 * 2 * config.lora.rank * te.config.hidden_size
            for te in model.text_encoders
        )
    parts["lora + optimizer"] = lora_params * OPTIMIZER_BYTES_PER_PARAM[config.optim.optimizer]
    activations = profile.saved_bytes_checkpointed if config.gradient_checkpointing else profile.saved_bytes
    parts["activations"] = int(activations + 2 * profile.largest_saved_bytes)
    peak = int(sum(parts.values()) * SLACK)

    # Caching: the VAE encodes one full-resolution image (about eight 128-channel full-size tensors alive).
    pixels = config.data.resolution**2
    vae_element = 4 if model.vae.dtype == torch.float32 else element
    caching = (
        int((vae_bytes + te_bytes + 8 * 128 * pixels * vae_element) * SLACK)
        if config.data.cache_latents
        else 0
    )

    flops = profile.flops + (profile.forward_flops if config.gradient_checkpointing else 0.0)
    flops *= config.optim.grad_accumulation
    throughput = max(device.matmul_tflops, 1e-3) * 1e12 * EFFICIENCY.get(device.kind, 0.3)
    seconds = flops / throughput
    # VAE encode per image is about 4.9 TFLOP at 1024 px (docs/model-configs.md §9.2), scaled by area.
    cache_seconds = num_images * (2 if config.data.flip else 1) * 4.879e12 * pixels / 1024**2 / throughput
    total = seconds * config.steps + (cache_seconds if config.data.cache_latents else 0.0)
    return Estimate(parts, peak, caching, flops, seconds, total, device, config)


def add_smaller_batches(candidates: list[TrainConfig], config: TrainConfig, only_checkpointing: bool) -> None:
    """Append to `candidates` the last one with the batch halved down to 1 and gradient accumulation raised
    to keep `config`'s effective batch (none for a resumed run, ``only_checkpointing``: its batch is fixed)."""
    batch = config.batch_size if not only_checkpointing else 1
    while batch > 1:
        batch //= 2
        accumulation = config.optim.grad_accumulation * (config.batch_size // batch)
        candidates.append(
            replace(
                candidates[-1],
                batch_size=batch,
                optim=replace(candidates[-1].optim, grad_accumulation=accumulation),
            )
        )


def first_fitting(
    candidates: list[TrainConfig],
    config: TrainConfig,
    estimate_one: Callable[[TrainConfig], Estimate],
    options: Callable[[TrainConfig], str],
) -> tuple[Estimate | None, Estimate]:
    """(the estimate of the first candidate that fits, or None; the smallest estimate tried). A chosen candidate
    other than `config` gets a note: gradient checkpointing, `options` (what else it changed), batch."""
    tried = []
    for candidate in candidates:
        result = estimate_one(candidate)
        tried.append(result)
        if result.fits:
            if candidate != config:
                result.notes.append(
                    f"memory profile: gradient checkpointing {'on' if candidate.gradient_checkpointing else 'off'}, "
                    f"{options(candidate)}, batch {candidate.batch_size} x "
                    f"{candidate.optim.grad_accumulation} accumulation"
                )
            return result, result
    return None, min(tried, key=lambda e: max(e.peak_bytes, e.caching_peak_bytes))


def auto_profile(
    model,
    config: TrainConfig,
    device: DeviceInfo,
    num_images: int = 1,
    unet_config: dict | None = None,
    only_checkpointing: bool = False,
) -> Estimate:
    """Pick memory options that fit `device`, fastest first; the returned estimate holds the chosen config.

    Order: as given without gradient checkpointing; with it; 8-bit AdamW (if bitsandbytes is there);
    a smaller batch with gradient accumulation keeping the effective batch (``only_checkpointing``:
    the first two only, for a resumed run whose optimizer and batch are fixed). Raises
    `PreflightError` when none fits.
    """
    from .optim import optimizer_available

    candidates = [replace(config, gradient_checkpointing=False), replace(config, gradient_checkpointing=True)]
    if not only_checkpointing and config.optim.optimizer == "adamw" and optimizer_available("adamw8bit"):
        candidates.append(replace(candidates[-1], optim=replace(config.optim, optimizer="adamw8bit")))
    add_smaller_batches(candidates, config, only_checkpointing)
    chosen, best = first_fitting(
        candidates,
        config,
        lambda candidate: estimate(model, candidate, device, num_images, unet_config),
        lambda candidate: f"optimizer {candidate.optim.optimizer}",
    )
    if chosen is not None:
        return chosen
    raise PreflightError(
        f"this training does not fit: even with gradient checkpointing it needs about "
        f"{_gb(max(best.peak_bytes, best.caching_peak_bytes))}, and {best.device.describe()} allows "
        f"{_gb(best.budget_bytes)} ({', '.join(f'{k} {_gb(v)}' for k, v in best.parts.items())}). "
        "Lower the resolution or rank, train attention-only, cache text-encoder outputs, use 8-bit AdamW "
        "(pip install bitsandbytes), or free GPU memory (close other models)."
    )


def check(
    model, config: TrainConfig, device: DeviceInfo, num_images: int = 1, unet_config: dict | None = None
) -> Estimate:
    """Estimate `config` as it is and raise `PreflightError` if it does not fit (no options changed)."""
    result = estimate(model, config, device, num_images, unet_config)
    if not result.fits:
        raise PreflightError(
            f"this training does not fit: {result.summary()}; the device allows {_gb(result.budget_bytes)}. "
            "Turn on gradient checkpointing or the automatic memory profile, lower the resolution, rank or "
            "batch size, or free GPU memory."
        )
    return result
