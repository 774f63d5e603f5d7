"""Memory and time before a Flux.1 / SD3.x run, the memory options that fit, or a refusal with numbers.

These transformers are regular enough to count by formula instead of tracing (the SD trainer traces its
U-Net on the meta device; ``engine.train.preflight``):

- **FLOPs** (FLOP = 2 × multiply-add). Every block applies ``12·d²`` weights per token it sees (Flux: a
  double block's q/k/v, projection and 4× MLP on each stream's own tokens; a single block's fused
  ``linear1`` (7·d²) and ``linear2`` (5·d²) on all tokens; SD3: the same per stream, the last context
  block only q/k/v (3·d²) on text tokens, SD3.5 Medium's dual blocks 4·d² more per image token) and
  attention costs ``4·L²·d`` (scores and weighted sum over the L tokens it joins). A LoRA step with a
  frozen base costs about 2 × the linear forward (backward to the activations only) + 3 × the
  attention forward, plus one more forward with gradient checkpointing. Flux.1-dev at 1024² (4,096
  image + 512 text tokens): 74.4 TFLOP forward, 163.6 TFLOP per step.
- **Memory**: the transformer's weights on the device (bf16, or 1 byte per block-linear weight with
  ``fp8_base``), the text encoders only while their outputs are not cached (then they are dropped, and the
  cached outputs, fp32, one set per caption, are counted instead), the LoRA with its gradients and optimizer state, and the activations autograd keeps: about
  `ACTIVATIONS_PER_TOKEN` × d values per token per block without checkpointing, one block input per block
  plus one block's activations with it; a backward transient and 10 % allocator slack on top. The caching
  phase (VAE + text encoders, one image) is checked on its own.
- **Time**: FLOPs per step / (the device's measured bf16 matmul rate × `EFFICIENCY`).

``ACTIVATIONS_PER_TOKEN`` and ``EFFICIENCY`` are estimates for ``benchmarks/bench_flux_train.py`` to
calibrate on a GPU (docs/flux.md says what was measured).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..config import TrainConfig
from ..preflight import (
    OPTIMIZER_BYTES_PER_PARAM,
    SLACK,
    DeviceInfo,
    Estimate,
    PreflightError,
    _gb,
    add_smaller_batches,
    device_info,
    first_fitting,
)

ACTIVATIONS_PER_TOKEN = 34  # values of width d autograd keeps per token per block (bf16), no checkpointing
EFFICIENCY = {"cuda": 0.5, "cpu": 0.5}
VAE_ENCODE_FLOPS_1024 = 4.879e12  # one 1024² image through the 16-channel VAE encoder (as SD's, scaled)


def _shape(model) -> dict[str, Any]:
    """Width, block counts and text tokens of a flow model's transformer."""
    config = dict(model.transformer.config)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    if model.family == "flux":
        return {
            "d": heads * head_dim,
            "double": config["num_layers"],
            "single": config["num_single_layers"],
            "dual": 0,
        }
    return {
        "d": heads * head_dim,
        "double": config["num_layers"],
        "single": 0,
        "dual": len(config.get("dual_attention_layers") or ()),
    }


def text_tokens(model, config: TrainConfig) -> int:
    return model.t5_length(config.flow) + (77 if model.family == "sd3" else 0)


def step_flops(model, config: TrainConfig, image_tokens: int | None = None) -> tuple[float, float]:
    """(forward FLOPs, LoRA training-step FLOPs) at the run's resolution and batch."""
    shape = _shape(model)
    d, n_img = shape["d"], image_tokens or (config.data.resolution // 16) ** 2
    n_txt = text_tokens(model, config)
    tokens = n_img + n_txt
    blocks = shape["double"] + shape["single"]
    if model.family == "flux":
        linear = 2 * 12 * d * d * tokens * blocks
        attention = 4 * tokens**2 * d * blocks
    else:
        per_block = 12 * d * d * tokens
        linear = 2 * (per_block * shape["double"] - 9 * d * d * n_txt + 4 * d * d * n_img * shape["dual"])
        attention = 4 * tokens**2 * d * shape["double"] + 4 * n_img**2 * d * shape["dual"]
    forward = float(linear + attention) * config.batch_size
    step = float(2 * linear + 3 * attention) * config.batch_size
    if config.gradient_checkpointing:
        step += forward
    return forward, step * config.optim.grad_accumulation


def _params(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _lora_parameters(model, config: TrainConfig) -> int:
    names = set(model.lora_targets("attention" if config.lora.targets == "attention" else "all_linear"))
    total = 0
    for name, module in model.transformer.named_modules():
        if name in names and isinstance(module, torch.nn.Linear):
            total += config.lora.rank * (module.in_features + module.out_features)
    return total


def estimate(model, config: TrainConfig, device: DeviceInfo, num_images: int = 1) -> Estimate:
    """Peak memory and time of training `model` (a `family.FlowModel`) with `config` on `device`."""
    shape = _shape(model)
    d = shape["d"]
    blocks = shape["double"] + shape["single"]
    element = 2 if config.mixed_precision in ("bf16", "fp16") or model.dtype != torch.float32 else 4
    block_linear = sum(
        m.weight.numel()
        for n, m in model.transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
        and n.startswith(("transformer_blocks.", "single_transformer_blocks."))
    )
    total = _params(model.transformer)
    weights = (
        (block_linear * 1 + (total - block_linear) * element) if config.flow.fp8_base else total * element
    )
    parts: dict[str, int] = {"transformer weights": int(weights)}
    encoders = [m for m in model.text_encoders.values() if m is not None]
    encoder_bytes = sum(_params(m) for m in encoders) * element
    cached = not config.data.shuffle_caption
    if not cached:
        parts["text encoder weights"] = encoder_bytes
    parts["lora + optimizer"] = (
        _lora_parameters(model, config) * OPTIMIZER_BYTES_PER_PARAM[config.optim.optimizer]
    )
    if cached:  # every caption's cached conditioning sits on the device in fp32 (one per image at most, + "")
        width = model.transformer.config.joint_attention_dim
        parts["cached text"] = (num_images + 1) * text_tokens(model, config) * width * 4
    tokens = ((config.data.resolution // 16) ** 2 + text_tokens(model, config)) * config.batch_size
    block_activations = ACTIVATIONS_PER_TOKEN * tokens * d * element
    if config.gradient_checkpointing:
        activations = blocks * tokens * d * element + block_activations
    else:
        activations = blocks * block_activations
    parts["activations"] = int(activations + 2 * 4 * tokens * d * element)
    peak = int(sum(parts.values()) * SLACK)
    pixels = config.data.resolution**2
    vae_bytes = _params(model.vae) * 4
    caching = int((vae_bytes + encoder_bytes + 8 * 128 * pixels * 4) * SLACK)
    forward, flops = step_flops(model, config)
    throughput = max(device.matmul_tflops, 1e-3) * 1e12 * EFFICIENCY.get(device.kind, 0.3)
    seconds = flops / throughput
    cache_seconds = num_images * (2 if config.data.flip else 1) * VAE_ENCODE_FLOPS_1024 * pixels / 1024**2
    total_seconds = seconds * config.steps + cache_seconds / throughput
    return Estimate(parts, peak, caching, flops, seconds, total_seconds, device, config)


def flow_profile(
    model,
    config: TrainConfig,
    device: torch.device | str,
    num_images: int = 1,
    only_checkpointing: bool = False,
    check_only: bool = False,
    info: DeviceInfo | None = None,
) -> Estimate:
    """The fastest memory options that fit, as an `Estimate` holding the chosen config.

    Order: as given; gradient checkpointing; checkpointing + fp8 base; then smaller batches with
    gradient accumulation (not for a resumed run, whose batch is fixed: ``only_checkpointing``).
    ``check_only`` tries the config as given. Raises `PreflightError` with the numbers when none fits.
    """
    info = info or device_info(device, torch.bfloat16)
    candidates = [config]
    if not check_only:
        candidates = [
            replace(config, gradient_checkpointing=False),
            replace(config, gradient_checkpointing=True),
        ]
        if not config.flow.fp8_base and not only_checkpointing:
            candidates.append(replace(candidates[-1], flow=replace(config.flow, fp8_base=True)))
        add_smaller_batches(candidates, config, only_checkpointing)
    chosen, best = first_fitting(
        candidates,
        config,
        lambda candidate: estimate(model, candidate, info, num_images),
        lambda candidate: f"fp8 base {'on' if candidate.flow.fp8_base else 'off'}",
    )
    if chosen is not None:
        return chosen
    raise PreflightError(
        f"this {model.arch} training does not fit: the smallest option (gradient checkpointing "
        f"{'on' if best.config.gradient_checkpointing else 'off'}, fp8 base {'on' if best.config.flow.fp8_base else 'off'}) "
        f"needs about {_gb(max(best.peak_bytes, best.caching_peak_bytes))}, and {best.device.describe()} allows "
        f"{_gb(best.budget_bytes)} ({', '.join(f'{k} {_gb(v)}' for k, v in best.parts.items())}). Lower the "
        "resolution or rank, train attention-only, or free GPU memory (close other models)."
    )
