"""Sample images while a flow-matching LoRA trains: fixed prompts and seeds, as for SD (``train.samples``).

The prompts are encoded once before training (`plan_flow_samples`), while the text encoders are still
loaded; the trainer drops them after caching, and sampling then needs only the transformer (with its LoRA)
and the VAE. A family renders with `FlowModel.sample`; one that has no sampler gives no plan.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..config import SampleSettings
from .family import FlowModel
from .objective import FlowSettings


@dataclass
class FlowSamplePlan:
    prompts: list[str]
    seeds: list[int]
    text: dict[str, torch.Tensor]  # the family's conditioning of every prompt, batch first, on the CPU
    settings: SampleSettings
    size: int


def plan_flow_samples(
    model: FlowModel,
    settings: SampleSettings,
    prompts: list[str],
    resolution: int,
    device: torch.device,
    flow: FlowSettings,
) -> FlowSamplePlan | None:
    """Encode the sample prompts now (None when the family cannot sample or an encoder has gone)."""
    if not model.can_sample or any(m is None for m in model.text_encoders.values()):
        return None
    encoders = list(model.text_encoders.values())
    devices = [next(m.parameters()).device for m in encoders]
    with torch.no_grad():
        try:
            for module in encoders:
                module.to(device)
            text = {k: v.float().cpu() for k, v in model.encode_text(prompts, device, flow).items()}
        finally:
            for module, original in zip(encoders, devices, strict=True):
                module.to(original)
    return FlowSamplePlan(prompts, list(settings.seeds) or [0], text, settings, settings.size or resolution)


def render_flow_samples(
    model: FlowModel, plan: FlowSamplePlan, device: torch.device, autocast_dtype: torch.dtype | None
) -> list:
    """One PIL image per (prompt, seed) with the model as it is now (LoRA included), in a forked RNG."""
    training = model.transformer.training
    model.transformer.eval()
    vae_device = next(model.vae.parameters()).device
    model.vae.to(device)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    )
    images = []
    try:
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.no_grad(),
            autocast,
        ):
            for index in range(len(plan.prompts)):
                row = {k: v[index : index + 1].to(device) for k, v in plan.text.items()}
                for seed in plan.seeds:
                    images.append(model.sample(row, seed, plan.size, plan.settings, device))
    finally:
        model.vae.to(vae_device)
        model.transformer.train(training)
    return images
