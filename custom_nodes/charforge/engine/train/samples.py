"""Sample images during training: fixed prompts and seeds, so images at different steps compare."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import SampleSettings
from .models import BaseModel, PromptEmbeddings, encode_prompts


def sample_prompts(settings: SampleSettings, trigger_word: str, captions: Sequence[str]) -> list[str]:
    """The prompts to render: the configured ones (trigger word added where missing), else the trigger word
    (or the first caption when there is none)."""
    prompts = [p for p in settings.prompts if p.strip()]
    if not prompts:
        prompts = [trigger_word.strip() or (captions[0] if captions else "")]
    if trigger_word.strip():
        prompts = [p if trigger_word.strip() in p else f"{trigger_word.strip()}, {p}" for p in prompts]
    return prompts


@dataclass
class SamplePlan:
    """Prompts encoded once at the start (text encoders may leave the device afterwards)."""

    prompts: list[str]
    seeds: list[int]
    positive: PromptEmbeddings
    negative: PromptEmbeddings
    settings: SampleSettings
    size: int
    pipeline: Any = None  # built on first use, then reused


def plan_samples(
    model: BaseModel,
    settings: SampleSettings,
    prompts: list[str],
    resolution: int,
    device: torch.device,
    clip_skip: int = 1,
    max_tokens: int = 75,
) -> SamplePlan:
    """Encode the sample prompts (and the empty negative prompt) now, with the base text encoders."""
    with torch.no_grad():
        devices = [next(te.parameters()).device for te in model.text_encoders]
        for te in model.text_encoders:
            te.to(device)
        try:
            positive = encode_prompts(model, prompts, device, clip_skip, max_tokens)
            if model.is_sdxl:  # SDXL pipelines use zeros for an empty negative prompt
                negative = PromptEmbeddings(
                    torch.zeros_like(positive.hidden), torch.zeros_like(positive.sdxl_pooled())
                )
            else:
                negative = encode_prompts(model, [""] * len(prompts), device, clip_skip, max_tokens)
        finally:
            for te, original in zip(model.text_encoders, devices, strict=True):
                te.to(original)
    return SamplePlan(
        prompts,
        list(settings.seeds) or [0],
        positive.to("cpu"),
        negative.to("cpu"),
        settings,
        settings.size or resolution,
    )


def render_samples(
    model: BaseModel, plan: SamplePlan, device: torch.device, autocast_dtype: torch.dtype | None
):
    """One PIL image per (prompt, seed), rendered with the model as it is now (LoRA included).

    Runs in a forked RNG, so sampling never changes what training draws next.
    """
    if plan.pipeline is None:
        plan.pipeline = model.pipeline()
    pipe = plan.pipeline
    unet_training = model.unet.training
    model.unet.eval()
    vae_device = next(model.vae.parameters()).device
    model.vae.to(device)
    images = []
    dtype = model.unet.dtype
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    )
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), autocast:
            for index in range(len(plan.prompts)):
                for seed in plan.seeds:
                    kwargs = {
                        "prompt_embeds": plan.positive.hidden[index : index + 1].to(device, dtype),
                        "negative_prompt_embeds": plan.negative.hidden[index : index + 1].to(device, dtype),
                    }
                    if model.is_sdxl:
                        kwargs["pooled_prompt_embeds"] = plan.positive.sdxl_pooled()[index : index + 1].to(
                            device, dtype
                        )
                        kwargs["negative_pooled_prompt_embeds"] = plan.negative.sdxl_pooled()[
                            index : index + 1
                        ].to(device, dtype)
                    out = pipe(
                        num_inference_steps=plan.settings.steps,
                        guidance_scale=plan.settings.guidance,
                        height=plan.size,
                        width=plan.size,
                        generator=torch.Generator().manual_seed(seed),
                        output_type="pil",
                        **kwargs,
                    )
                    images.append(out.images[0])
    finally:
        model.vae.to(vae_device)
        model.unet.train(unet_training)
    return images
