"""Optimizers and learning-rate schedules.

``adamw`` is torch's AdamW (the fused kernel on CUDA). ``adamw8bit`` (bitsandbytes), ``prodigy``
(prodigyopt) and ``adafactor`` (transformers) are used when their package is installed; otherwise the
error names the package and the install command. Prodigy finds its own step size: give it a learning
rate of 1.0.

Schedules are plain functions of the step (`lr_factor`), wrapped in a ``LambdaLR`` so their state is
just the step count and resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...deps import MissingDependencyError, require
from .config import OptimSettings

_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "adafactor": ("transformers", "transformers"),
}


def optimizer_available(name: str) -> bool:
    """True when the package behind optimizer `name` imports."""
    if name not in _PACKAGES:
        return True
    try:
        require(_PACKAGES[name][0])
    except MissingDependencyError:
        return False
    return True


def build_optimizer(
    groups: Sequence[dict], settings: OptimSettings, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer for parameter `groups` (each ``{"params": [...], "lr": ...}``)."""
    name = settings.optimizer
    if name == "adamw":
        fused = device.type == "cuda"
        return torch.optim.AdamW(
            groups,
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
            betas=(0.9, 0.999),
            eps=1e-8,
            fused=fused or None,
        )
    if name in _PACKAGES:
        module_name, package = _PACKAGES[name]
        try:
            module = require(module_name)
        except MissingDependencyError as exc:
            raise MissingDependencyError(f"optimizer {name!r} needs {package}: {exc}") from exc
        if name == "adamw8bit":
            return module.optim.AdamW8bit(
                groups, lr=settings.learning_rate, weight_decay=settings.weight_decay
            )
        if name == "prodigy":
            return module.Prodigy(
                groups,
                lr=settings.learning_rate,
                weight_decay=settings.weight_decay,
                decouple=True,
                use_bias_correction=True,
                safeguard_warmup=True,
            )
        from transformers.optimization import Adafactor

        return Adafactor(
            groups,
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    raise ValueError(f"unknown optimizer {name!r}")


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """The learning-rate multiplier at `step` (0-based): linear warm-up, then constant / cosine / linear."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: OptimSettings, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over `lr_factor`; one ``step()`` per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, settings.schedule, settings.warmup_steps)
    )
