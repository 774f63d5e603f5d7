"""The frozen base in float8: half the memory of bf16 for the transformer's linear layers.

`store_fp8` turns the ``Linear`` layers of the transformer's blocks (those peft wraps too: their
``base_layer``) into `Fp8Linear`: the weight is kept as ``torch.float8_e4m3fn`` with one fp32 scale per
output row (``weight ≈ fp8 · weight_scale``; e4m3's largest value is 448, so the row's largest
magnitude maps onto it and small rows keep their precision), and every forward call upcasts it to the
compute dtype (bf16) for the matmul. Only the weight storage changes: the LoRA layers, biases, norms and
embedders stay as they were, and gradients reach the LoRA through the upcast weight exactly as through a
bf16 one. The error is the rounding of each weight to 3 mantissa bits (about 6 % relative per weight,
averaging out over a layer); `tests/engine/train/test_flow.py` states the step-level tolerance.

Call it after the LoRA layers are added (so their initial values are drawn in full precision).
"""

from __future__ import annotations

from typing import cast

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class Fp8Linear(torch.nn.Linear):
    """A ``Linear`` whose weight is stored in float8 with per-row scales and computed in `compute_dtype`."""

    compute_dtype: torch.dtype = torch.bfloat16
    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return torch.nn.functional.linear(x.to(self.compute_dtype), weight, bias)


def quantise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, per-row fp32 scale) with ``fp8 · scale ≈ weight``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (w / scale).to(FP8), scale


def to_fp8(module: torch.nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> Fp8Linear:
    """Turn `module` into an `Fp8Linear` in place (same object, same parameter names)."""
    q, scale = quantise(module.weight)
    module.weight = torch.nn.Parameter(q, requires_grad=False)
    module.register_buffer("weight_scale", scale.to(q.device))
    module.__class__ = Fp8Linear
    fp8 = cast(Fp8Linear, module)
    fp8.compute_dtype = compute_dtype
    return fp8


def store_fp8(
    transformer: torch.nn.Module,
    prefixes: tuple[str, ...] = ("transformer_blocks.", "single_transformer_blocks."),
    compute_dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Store the block ``Linear`` weights of `transformer` in fp8; returns how many layers changed."""
    count = 0
    for name, module in list(transformer.named_modules()):
        if type(module) is not torch.nn.Linear or not name.startswith(prefixes):
            continue
        if ".lora_" in name:  # peft's adapter matrices are trained: they stay as they are
            continue
        to_fp8(module, compute_dtype)
        count += 1
    return count


def fp8_supported() -> bool:
    return hasattr(torch, "float8_e4m3fn")
