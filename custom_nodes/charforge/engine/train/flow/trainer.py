"""`FlowTrainer`: LoRA steps on a flow-matching transformer (any `FlowModel` family).

Built on `engine.train.loop.Trainer`: the epoch order, micro-batch seeds, gradient accumulation,
clipping, optimizer and schedule, the resumable state and `train()` are the SD trainer's own, so a
stopped-and-resumed flow run is the same computation as an uninterrupted one. What differs is a step:

1. the latents of the batch (cached by `data.TrainingData`, shifted and scaled by the family);
2. noise ε and noise levels σ from the micro-batch's generator (in that order; `objective.sample_sigmas`);
3. x_σ = (1 − σ)x0 + σε, the family's prediction, MSE to ε − x0 (with ``precondition_outputs``: the x0
   estimate x_σ − σ·prediction against x0, the same error weighted by σ²) — per latent pixel, weighted by the
   image's mask / face box when set (the loss is taken in the latent layout, before packing, so a mask at
   latent size applies directly), averaged per sample then over the batch.

Captions: with text caching (the default) every caption the run can see (and "" when caption dropout is
on: the empty caption's embedding) is encoded once by the frozen encoders, then those encoders are
dropped (`FlowModel.release_text_encoders`: T5-XXL's 9 GB leave before the first step). With a
text-encoder LoRA the frozen encoders' outputs are still cached and the adapted one runs every step.
Shuffled captions need every encoder every step (nothing is cached or dropped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast

import torch

from ..config import TrainConfig
from ..data import TrainingData
from ..loop import Trainer, capture_rng, masked_mean
from ..lora import LoraNetwork, _inject, text_encoder_target_modules
from ..optim import build_optimizer, build_scheduler
from .family import FlowModel
from .fp8 import store_fp8
from .objective import noised, sample_sigmas, velocity


def flow_preset(targets: str) -> str:
    """The LoRA settings' target set as a transformer preset (kohya's default is every linear layer)."""
    return "attention" if targets == "attention" else "all_linear"


def add_flow_lora(model: FlowModel, config: TrainConfig) -> LoraNetwork:
    """LoRA on the transformer (and on the family's text encoder when asked), as peft layers."""
    settings = config.lora
    injected: dict[str, torch.nn.Module] = {}
    names = dict.fromkeys(model.lora_targets(flow_preset(settings.targets)), "linear")
    _inject(model.transformer, names, settings, settings.rank, settings.alpha, config.seed)
    injected["transformer"] = model.transformer
    if settings.train_text_encoder:
        encoder = model.components().get("text_encoder")
        if encoder is None:
            raise ValueError(
                f"this {model.arch} model has no {model.lora_text_encoder} text encoder to train"
            )
        te_names = dict.fromkeys(text_encoder_target_modules(encoder), "linear")
        _inject(
            encoder,
            te_names,
            settings,
            settings.text_encoder_rank or settings.rank,
            settings.text_encoder_alpha or settings.alpha,
            config.seed + 1,
        )
        injected["text_encoder"] = encoder
    return LoraNetwork(injected, settings)


class FlowTrainer(Trainer):
    """Trains a LoRA on a `FlowModel`. Create, `setup()`, then `train()` (as `loop.Trainer`)."""

    model: FlowModel  # type: ignore[assignment]

    def __init__(self, model: FlowModel, data: TrainingData, config: TrainConfig, device="cpu"):
        super().__init__(model, data, config, device)  # type: ignore[arg-type]

    # ---------------------------------------------------------------------------- what is cached

    @property
    def trained_encoders(self) -> tuple[str, ...]:
        return (self.model.lora_text_encoder,) if self.config.lora.train_text_encoder else ()

    @property
    def caches_text(self) -> bool:
        s = self.config.data
        wanted = s.cache_text_encoder_outputs or self.config.lora.train_text_encoder
        return wanted and not s.shuffle_caption

    def _frozen_encoders(self) -> list[str]:
        return [n for n in self.model.text_encoders if n not in self.trained_encoders]

    # ---------------------------------------------------------------------------- setup

    def setup(self, on_cache: Callable[[str, int, int], None] | None = None) -> None:
        config, model, device = self.config, self.model, self.device
        self._text_fingerprint = model.text_fingerprint(config.flow)
        if config.data.cache_latents:
            model.vae.to(device)
            self.data.cache_latents(
                self._encode_images,
                model.fingerprints["vae"],
                batch_size=1,
                on_item=(lambda d, t: on_cache("latents", d, t)) if on_cache else None,
            )
            model.vae.to("cpu")
        if self.caches_text:
            frozen = self._frozen_encoders()
            for name in frozen:
                model.text_encoders[name].to(device)
            with torch.no_grad():
                self.data.cache_text(self._encode_text_dict, self._text_fingerprint)
            if on_cache:
                on_cache("text", 1, 1)
            model.release_text_encoders(keep=self.trained_encoders)
        self.network = add_flow_lora(model, config)
        if config.flow.fp8_base:
            store_fp8(model.transformer)
        model.transformer.to(device)
        for module in model.text_encoders.values():
            if module is not None:
                module.to(device)
        if not config.data.cache_latents:
            model.vae.to(device)
        if config.gradient_checkpointing:
            model.transformer.enable_gradient_checkpointing()
            if config.lora.train_text_encoder:
                cast(Any, self.network.components["text_encoder"]).gradient_checkpointing_enable()
        groups = [{"params": self.network.parameters("transformer"), "lr": config.optim.learning_rate}]
        te_params = self.network.parameters("text_encoder")
        if te_params:
            groups.append(
                {"params": te_params, "lr": config.optim.text_encoder_lr or config.optim.learning_rate / 10}
            )
        self.optimizer = build_optimizer(groups, config.optim, device)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.steps)
        if config.mixed_precision == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)
        if self.autocast_dtype is not None:
            from peft.tuners.lora import LoraLayer

            for root in self.network.components.values():
                for module in root.modules():
                    if isinstance(module, LoraLayer):
                        module.cast_input_dtype_enabled = False
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._load_device_tables()
        torch.manual_seed(config.seed)  # LoRA dropout draws from the global RNG (resume restores it)
        self.rng_at_step = capture_rng()

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixels.to(self.device))

    def _encode_text_dict(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = self.model.encode_text(captions, self.device, self.config.flow, self._frozen_encoders())
        return {k: v.float() for k, v in out.items()}

    # ---------------------------------------------------------------------------- one step

    def _conditioning(self, captions: list[str]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        model, settings = self.model, self.config.flow
        if self.caches_text:
            rows = [self._text_table[c] for c in captions]
            text = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
            if self.trained_encoders:
                with self._autocast():
                    text.update(model.encode_text(captions, self.device, settings, self.trained_encoders))
            return text
        context = contextlib.nullcontext() if self.trained_encoders else torch.no_grad()
        with context, self._autocast():
            return model.encode_text(captions, self.device, settings)

    def micro_batch_loss(self, index: int) -> torch.Tensor:
        config, model = self.config, self.model
        items, flips, captions, latents, noise, generator = self._draw(index)
        sigmas = sample_sigmas(
            latents.shape[0],
            config.flow,
            default=model.default_sampling,
            default_shift=model.default_shift,
            image_tokens=model.image_tokens(latents.shape[-2], latents.shape[-1]),
            generator=generator,
            device=self.device,
        )
        noisy = noised(latents, noise, sigmas)
        target = velocity(latents, noise)
        text = self._conditioning(captions)
        with self._autocast():
            prediction = model.predict(noisy.to(model.transformer.dtype), sigmas, text, config.flow)
        prediction = prediction.float()
        if config.flow.precondition_outputs:  # compare x0 estimates: x_σ − σ·v against x0
            prediction = noisy - sigmas.reshape(-1, 1, 1, 1) * prediction
            target = latents
        per_pixel = torch.nn.functional.mse_loss(prediction, target, reduction="none")
        masks = None
        if config.data.uses_masks:
            masks = torch.stack([self._mask_table[(i, f)] for i, f in zip(items, flips, strict=True)])
        return masked_mean(per_pixel, masks).mean()

    def _evaluation_losses(self, index: int, latent, timesteps: list[Any], generator) -> list[float]:
        """Item `index`'s velocity MSE at noise levels σ = `timesteps` (floats in (0, 1)); `evaluate` averages."""
        model = self.model
        text = self._conditioning([self.data.items[index].caption])
        losses = []
        for sigma in timesteps:
            noise = torch.randn(latent.shape, generator=generator).to(self.device)
            sigmas = torch.tensor([float(sigma)], device=self.device)
            with self._autocast():
                prediction = model.predict(
                    noised(latent, noise, sigmas).to(model.transformer.dtype), sigmas, text, self.config.flow
                )
            losses.append(torch.nn.functional.mse_loss(prediction.float(), noise - latent).item())
        return losses
