"""The training loop: noise-prediction loss on LoRA parameters, one optimizer step at a time.

(Over 600 lines on purpose: the step, the loop and the resumable state are one unit; exact resume
depends on all three drawing and saving the same randomness.)

What a step does: take the next batch of the epoch order (`TrainingData.epoch_batches`), add noise at
uniformly drawn timesteps, predict it with the U-Net, and minimise the MSE to the noise (or to the
velocity for v-prediction models), weighted per sample by min-SNR-γ when set and per pixel by the
image's mask with ``masked_loss`` and/or its face box with ``face_mask``. Noise offset adds a per-channel constant to the noise.

Determinism: all randomness of micro-batch ``m`` (noise, timesteps, flips, caption shuffle / dropout)
comes from generators seeded with ``(seed, m)``; only LoRA dropout draws from the global RNG, whose
state is saved with the resumable state. So a run stopped after step k and resumed is the same
computation as one that never stopped; on the CPU bit for bit.

Host and device: a step never waits for the device. Its inputs (cached latents, text outputs, size ids,
masks) are device tensors from `setup()` on, its noise is drawn on the device, and its loss stays there;
``train()`` reads the losses back every ``config.loss_every`` steps, in one copy (the one point where the
host waits for the device; fp16's loss scaler adds one per step, bf16 and fp32 have none). The tensor work
from the batch to the loss (`Trainer.denoising_loss`) is one graph without breaks for ``torch.compile``
(``compile``), checked by tests/engine/train/test_compile_ready.py.

Stopping: ``control.check()`` is asked between micro-batches and before every step, and ``on_step`` (the
progress report) may raise too. Either way (`Cancelled` or any error) the loop leaves the model at the
last completed step, and `Trainer.state_dict` returns that step's state (weights, optimizer, schedule, RNG,
data position).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from ..control import Control
from .config import TrainConfig
from .data import TrainingData, process_caption
from .lora import LoraNetwork, add_lora
from .models import BaseModel, PromptEmbeddings, encode_prompts
from .optim import build_optimizer, build_scheduler

STATE_VERSION = 1
REPORT_SECONDS = 2.0  # the longest `train` goes without reading the losses back (progress on slow GPUs)


@dataclass(frozen=True)
class StepReport:
    """Progress after an optimizer step."""

    step: int  # completed steps (1-based)
    total_steps: int
    loss: float
    lr: float
    steps_per_second: float
    eta_seconds: float
    epoch: int
    elapsed_seconds: float


@dataclass(frozen=True)
class _Unread:
    """A completed step whose loss is still on the device."""

    step: int
    loss: torch.Tensor
    lr: float
    elapsed: float  # seconds since `train` started, when the step was queued


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        # The global (legacy MT19937) generator gives the 5-tuple; numpy's stubs say a dict for this call.
        name, keys, position, has_gauss, cached = cast(
            tuple[str, Any, int, int, float], np.random.get_state()
        )
        # As plain values and a tensor, so the state file loads with torch.load(weights_only=True).
        state["numpy"] = (
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached),
        )
    except ImportError:
        pass
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-sample loss weights min(SNR, γ) / SNR (ε-prediction) or min(SNR, γ) / (SNR + 1) (v)."""
    alpha = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha / (1.0 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


def masked_mean(per_pixel: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of a (B, C, H, W) loss; with `masks` a weighted mean, so that a mask keeping a small
    region does not shrink the loss (and the step size)."""
    if masks is None:
        return per_pixel.mean(dim=(1, 2, 3))
    return (per_pixel * masks).mean(dim=(1, 2, 3)) / masks.mean(dim=(1, 2, 3)).clamp_min(1e-3)


class Trainer:
    """Trains a LoRA on `model` with `data` as `config` says. Create, `setup()`, then `train()`."""

    def __init__(
        self, model: BaseModel, data: TrainingData, config: TrainConfig, device: torch.device | str = "cpu"
    ):
        self.model = model
        self.data = data
        self.config = config
        self.device = torch.device(device)
        self.network: LoraNetwork | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.step = 0  # completed optimizer steps
        self.rng_at_step: dict[str, Any] = {}  # global RNG right after `step` completed
        self._last_loss = float("nan")
        self._unread_loss: torch.Tensor | None = None  # the last step's loss, still on the device
        self.updating = False  # inside the optimizer / schedule update (a state saved now could be torn)
        self._batches_cache: tuple[int, list[list[int]]] | None = None
        self._loss_fn: Callable[..., torch.Tensor] | None = None  # denoising_loss, compiled or not (setup)
        self._text_fingerprint = ""
        self._latent_table: dict[tuple[int, bool], torch.Tensor] = {}
        self._text_table: dict[str, dict[str, torch.Tensor]] = {}
        self._time_id_table: dict[tuple[int, bool], torch.Tensor] = {}
        self._mask_table: dict[tuple[int, bool], torch.Tensor] = {}

    def lora_network(self) -> LoraNetwork:
        """The LoRA layers `setup()` adds (AttributeError before it, as using ``network`` then raises)."""
        if self.network is None:
            raise AttributeError("the trainer has no LoRA network yet: call setup() first")
        return self.network

    def _built(self) -> tuple[LoraNetwork, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """The LoRA, optimizer and schedule `setup()` builds (AttributeError before it)."""
        if self.optimizer is None or self.scheduler is None:
            raise AttributeError("the trainer has no optimizer yet: call setup() first")
        return self.lora_network(), self.optimizer, self.scheduler

    # ---------------------------------------------------------------------------- setup

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.mixed_precision)

    def _autocast(self):
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def setup(self, on_cache: Callable[[str, int, int], None] | None = None) -> None:
        """Cache latents / text outputs, add the LoRA layers, move to the device, build the optimizer.

        ``on_cache(what, done, total)`` reports caching progress (``what`` is "latents" or "text").
        """
        config, model = self.config, self.model
        data_settings = config.data
        self._text_fingerprint = ":".join(
            [
                model.fingerprints.get("text_encoder", ""),
                model.fingerprints.get("text_encoder_2", ""),
                f"clip_skip={config.clip_skip}",
                f"max_tokens={config.max_token_length}",
            ]
        )
        # Caching first, with only the VAE / text encoders on the device: the peak stays low.
        if data_settings.cache_latents:
            model.vae.to(self.device)
            self.data.cache_latents(
                self._encode_images,
                model.fingerprints["vae"],
                batch_size=1,
                on_item=(lambda d, t: on_cache("latents", d, t)) if on_cache else None,
            )
        if self.caches_text:
            for te in model.text_encoders:
                te.to(self.device)
            with torch.no_grad():
                self.data.cache_text(self._encode_text_dict, self._text_fingerprint)
            if on_cache:
                on_cache("text", 1, 1)
            for te in model.text_encoders:
                te.to("cpu")  # not needed on the device again: samples use precomputed embeddings
        if data_settings.cache_latents and self.device.type == "cuda":
            model.vae.to(self.device)  # small; kept for sample decoding

        self.network = add_lora(model.components(), config.lora, seed=config.seed)
        model.unet.to(self.device)
        if not self.caches_text:
            for te in model.text_encoders:
                te.to(self.device)
        if not data_settings.cache_latents:
            model.vae.to(self.device)
        if config.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if config.lora.train_text_encoder:
                for te in model.text_encoders:
                    te.gradient_checkpointing_enable()
        groups = [{"params": self.network.parameters("unet"), "lr": config.optim.learning_rate}]
        te_params = [p for name in ("text_encoder", "text_encoder_2") for p in self.network.parameters(name)]
        if te_params:
            te_lr = config.optim.text_encoder_lr or config.optim.learning_rate / 10
            groups.append({"params": te_params, "lr": te_lr})
        self.optimizer = build_optimizer(groups, config.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.steps)
        if config.mixed_precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        if self.autocast_dtype is not None:
            # Under autocast peft's cast of every LoRA input to fp32 is wasted: autocast casts it back.
            from peft.tuners.lora import LoraLayer

            for root in self.network.components.values():
                for module in root.modules():
                    if isinstance(module, LoraLayer):
                        module.cast_input_dtype_enabled = False
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # few shapes (one per bucket): tuned once each
            model.unet.to(memory_format=torch.channels_last)
        self._load_device_tables()
        self._loss_fn = self.denoising_loss
        if config.compile and self.device.type == "cuda":
            self._loss_fn = torch.compile(self.denoising_loss)
        # LoRA dropout draws from the global RNG: start it from the run's seed (resume restores it).
        torch.manual_seed(config.seed)
        self.rng_at_step = capture_rng()

    def _load_device_tables(self) -> None:
        """Cached latents, text outputs and SDXL size ids as device tensors: a step then reads them
        without a host-to-device copy (each such copy would stall the GPU queue)."""
        vae_fingerprint = self.model.fingerprints["vae"]
        flips = (False, True) if self.config.data.flip else (False,)
        self._latent_table = {}
        if self.config.data.cache_latents:
            self._latent_table = {
                (i, f): self.data.latent(i, f, vae_fingerprint).to(self.device)
                for i in range(len(self.data.items))
                for f in flips
            }
        self._text_table = {}
        if self.caches_text:
            for caption in self.data.captions_to_cache():
                row = self.data.text(caption, self._text_fingerprint)
                self._text_table[caption] = {k: v.to(self.device) for k, v in row.items()}
        self._time_id_table = {
            (i, f): self.data.time_ids(i, f).to(self.device)
            for i in range(len(self.data.items))
            for f in flips
        }
        self._mask_table = {}
        if self.config.data.uses_masks:
            self._mask_table = {
                (i, f): self.data.mask(i, f).to(self.device)
                for i in range(len(self.data.items))
                for f in flips
            }

    @property
    def caches_text(self) -> bool:
        s = self.config.data
        return (
            s.cache_text_encoder_outputs and not s.shuffle_caption and not self.config.lora.train_text_encoder
        )

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.model.vae
        with torch.no_grad():
            pixels = pixels.to(self.device, dtype=vae.dtype)
            return vae.encode(pixels).latent_dist.mean.float() * self.model.vae_scaling_factor

    def _encode_text_dict(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds = encode_prompts(
            self.model, captions, self.device, self.config.clip_skip, self.config.max_token_length
        )
        out = {"hidden": embeds.hidden.float()}
        if embeds.pooled is not None:
            out["pooled"] = embeds.pooled.float()
        return out

    # ---------------------------------------------------------------------------- batches

    def micro_batches_per_epoch(self) -> int:
        return len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._batches_cache is None or self._batches_cache[0] != epoch:
            self._batches_cache = (
                epoch,
                self.data.epoch_batches(epoch, self.config.batch_size, self.config.seed),
            )
        return self._batches_cache[1]

    def micro_batch(self, index: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of the `index`-th micro-batch of the run."""
        per_epoch = self.micro_batches_per_epoch()
        epoch, position = divmod(index, per_epoch)
        return epoch, self._epoch(epoch)[position]

    def _generator(self, index: int) -> torch.Generator:
        # On the training device: noise is drawn where it is used (no copy), the same for the same seed.
        generator = torch.Generator(device=self.device)
        return generator.manual_seed((self.config.seed * 1_000_003 + index) % (2**63))

    # ---------------------------------------------------------------------------- one step

    def _conditioning(self, captions: list[str]) -> PromptEmbeddings:
        if self.caches_text:
            rows = [self._text_table[c] for c in captions]
            pooled = torch.stack([r["pooled"] for r in rows]) if "pooled" in rows[0] else None
            return PromptEmbeddings(torch.stack([r["hidden"] for r in rows]), pooled)
        context = contextlib.nullcontext() if self.config.lora.train_text_encoder else torch.no_grad()
        with context, self._autocast():
            return encode_prompts(
                self.model, captions, self.device, self.config.clip_skip, self.config.max_token_length
            )

    def _latents(self, items: list[int], flips: list[bool]) -> torch.Tensor:
        if self.config.data.cache_latents:
            return torch.stack([self._latent_table[(i, f)] for i, f in zip(items, flips, strict=True)])
        from .data import prepare_image

        pixels = torch.stack(
            [
                prepare_image(self.data.items[i].image, self.data.buckets[i], f).pixels
                for i, f in zip(items, flips, strict=True)
            ]
        )
        return self._encode_images(pixels)

    def _draw(self, index: int) -> tuple[list[int], list[bool], list[str], torch.Tensor, torch.Tensor, Any]:
        """Micro-batch `index`: (items, flips, processed captions, latents, noise, the step's generator for
        further draws). Flips and caption processing come from a per-step RNG, the noise from the step's
        generator, always in this order, so a resumed run draws exactly what the uninterrupted one drew."""
        config = self.config
        _, items = self.micro_batch(index)
        rng = random.Random(f"{config.seed}:{index}")
        generator = self._generator(index)
        flips = [config.data.flip and rng.random() < 0.5 for _ in items]
        captions = [process_caption(self.data.items[i].caption, config.data, rng) for i in items]
        latents = self._latents(items, flips).float()
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        return items, flips, captions, latents, noise, generator

    def micro_batch_loss(self, index: int) -> torch.Tensor:
        """The (weighted) loss of micro-batch `index`, with gradients."""
        config, model = self.config, self.model
        items, flips, captions, latents, noise, generator = self._draw(index)
        device = self.device
        if config.noise_offset:
            offset = torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=device
            )
            noise += config.noise_offset * offset
        timesteps = torch.randint(
            0,
            model.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=generator,
            device=device,
        )
        cond = self._conditioning(captions)
        pairs = list(zip(items, flips, strict=True))
        time_ids = torch.stack([self._time_id_table[p] for p in pairs]) if model.is_sdxl else None
        masks = torch.stack([self._mask_table[p] for p in pairs]) if config.data.uses_masks else None
        if self._loss_fn is None:
            raise AttributeError("the trainer has no loss function yet: call setup() first")
        return self._loss_fn(latents, noise, timesteps, cond.hidden, cond.pooled, time_ids, masks)

    def denoising_loss(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        hidden: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> torch.Tensor:
        """The tensor work of a micro-batch, from its latents, noise and conditioning to the loss.

        Noising, the U-Net with the LoRA and the weighted MSE: what ``compile`` compiles, as one graph.
        The batch choice and the random draws stay outside (`micro_batch_loss`).
        """
        config, model = self.config, self.model
        scheduler = model.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if model.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        kwargs: dict[str, Any] = {}
        if time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        weight_dtype = model.unet.dtype
        if self.device.type == "cuda":
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            prediction = model.unet(
                noisy.to(weight_dtype),
                timesteps,
                encoder_hidden_states=hidden.to(weight_dtype),
                **kwargs,
            ).sample
        per_pixel = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
        per_sample = masked_mean(per_pixel, masks)
        if config.min_snr_gamma > 0:
            per_sample = per_sample * min_snr_weights(
                scheduler.alphas_cumprod, timesteps, config.min_snr_gamma, model.prediction_type
            )
        return per_sample.mean()

    @property
    def last_loss(self) -> float:
        """The mean loss of the last completed step (read back from the device if `train` has not yet)."""
        if self._unread_loss is not None:
            self._last_loss, self._unread_loss = float(self._unread_loss), None
        return self._last_loss

    @last_loss.setter
    def last_loss(self, value: float) -> None:
        self._last_loss, self._unread_loss = value, None

    def train_step(self, control: Control | None = None) -> float:
        """One optimizer step (``grad_accumulation`` micro-batches); returns its mean loss (read back)."""
        self.device_step(control)
        return self.last_loss

    def device_step(self, control: Control | None = None) -> torch.Tensor:
        """One optimizer step without waiting for the device: its mean loss as a device tensor."""
        config = self.config
        accumulation = config.optim.grad_accumulation
        network, optimizer, scheduler = self._built()
        for module in network.components.values():
            if not module.training:
                module.train()
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro in range(accumulation):
            if control is not None and micro:
                control.check()
            loss = self.micro_batch_loss(self.step * accumulation + micro) / accumulation
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            losses.append(loss.detach())
        params = network.parameters()
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if config.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm)
        self.updating = True
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        self.step += 1
        self.rng_at_step = capture_rng()
        self.updating = False
        total = torch.stack(losses).double().sum()
        self._unread_loss = total
        return total

    # ---------------------------------------------------------------------------- the loop

    def train(
        self,
        until: int | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        control: Control | None = None,
        after_step: Callable[[int], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Run steps until `until` (default: ``config.steps``) completed steps; returns the step reached.

        `on_progress(step, until)` runs after every step without waiting for the device (a progress bar moves
        every step and a stop pressed there lands at the next step; the loss comes later, with `on_step`).

        `after_step(step)` runs after each step (checkpoints, samples). `on_step` gets each step's progress
        and loss, in order, when the losses are read back: after the first step, then every
        ``config.loss_every`` steps or `REPORT_SECONDS`, whichever comes first (a slow GPU still shows
        progress), at the last step and when the loop stops on an error. `control.check()` raises `Cancelled` when the user asked
        to stop; any exception leaves `state_dict()` at the last completed step.
        """
        until = self.config.steps if until is None else until
        start_time, start_step = time.perf_counter(), self.step
        unread: list[_Unread] = []
        last_read = start_time
        try:
            while self.step < until:
                if control is not None:
                    control.check()
                loss = self.device_step(control)
                unread.append(_Unread(self.step, loss, self.current_lr(), time.perf_counter() - start_time))
                if on_progress is not None:
                    on_progress(self.step, until)
                if (
                    len(unread) >= self.config.loss_every
                    or self.step >= until
                    or self.step == start_step + 1
                    or time.perf_counter() - last_read >= REPORT_SECONDS
                ):
                    self._report(unread, until, start_step, on_step)
                    last_read = time.perf_counter()
                if after_step is not None:
                    after_step(self.step)
        except BaseException:
            # The steps completed before the error still get their reports (a stopped run's metrics).
            with contextlib.suppress(Exception):
                self._report(unread, until, start_step, on_step)
            raise
        return self.step

    def _report(
        self,
        unread: list[_Unread],
        until: int,
        start_step: int,
        on_step: Callable[[StepReport], None] | None,
    ) -> None:
        """Read the losses of the `unread` steps back in one copy (emptying it), then report each step."""
        if not unread:
            return
        steps = list(unread)
        unread.clear()
        values = torch.stack([s.loss for s in steps]).tolist()
        for done, value in zip(steps, values, strict=True):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the loss became {value} at step {done.step}; lower the learning rate or use bf16 instead of fp16"
                )
            if on_step is None:
                continue
            count = done.step - start_step
            steps_per_second = count / done.elapsed if done.elapsed > 0 else 0.0
            on_step(
                StepReport(
                    step=done.step,
                    total_steps=until,
                    loss=value,
                    lr=done.lr,
                    steps_per_second=steps_per_second,
                    eta_seconds=(until - done.step) / steps_per_second
                    if steps_per_second > 0
                    else float("inf"),
                    epoch=self.micro_batch(max(0, done.step * self.config.optim.grad_accumulation - 1))[0],
                    elapsed_seconds=done.elapsed,
                )
            )

    def evaluate(self, timesteps: list[Any], seed: int = 1234, items: list[int] | None = None) -> float:
        """Plain MSE of the model's prediction over `items` (default all) at fixed `timesteps` and noise (no
        weighting): the same number for the same arguments, so it compares the model before and after
        training (or with the LoRA switched off via ``network.set_enabled(False)``)."""
        items = list(range(len(self.data.items))) if items is None else items
        generator = torch.Generator().manual_seed(seed)
        for module in self.lora_network().components.values():
            module.eval()
        losses = []
        with torch.no_grad():
            for index in items:
                latent = self._latents([index], [False]).to(self.device, torch.float32)
                losses += self._evaluation_losses(index, latent, timesteps, generator)
        return sum(losses) / len(losses)

    def _evaluation_losses(self, index: int, latent, timesteps: list[Any], generator) -> list[float]:
        """Item `index`'s denoising MSE at each of `timesteps` (noise drawn from `generator` in turn)."""
        model = self.model
        cond = self._conditioning([self.data.items[index].caption])
        kwargs: dict[str, Any] = {}
        if model.is_sdxl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond.pooled,
                "time_ids": self._time_id_table[(index, False)][None],
            }
        losses = []
        for timestep in timesteps:
            noise = torch.randn(latent.shape, generator=generator).to(self.device)
            t = torch.tensor([timestep], device=self.device)
            noisy = model.noise_scheduler.add_noise(latent, noise, t)
            target = (
                model.noise_scheduler.get_velocity(latent, noise, t)
                if model.prediction_type == "v_prediction"
                else noise
            )
            with self._autocast():
                prediction = model.unet(
                    noisy.to(model.unet.dtype),
                    t,
                    encoder_hidden_states=cond.hidden.to(model.unet.dtype),
                    **kwargs,
                ).sample
            losses.append(torch.nn.functional.mse_loss(prediction.float(), target).item())
        return losses

    def current_lr(self) -> float:
        if self.optimizer is None:
            raise AttributeError("the trainer has no optimizer yet: call setup() first")
        return float(self.optimizer.param_groups[0]["lr"])

    # ---------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after the last completed step."""
        micro = self.step * self.config.optim.grad_accumulation
        epoch, position = divmod(micro, self.micro_batches_per_epoch())
        network, optimizer, scheduler = self._built()
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "lora": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": self.rng_at_step,
            "data": {
                "seed": self.config.seed,
                "epoch": epoch,
                "position": position,
                "micro_batches_per_epoch": self.micro_batches_per_epoch(),
                "micro_batches_done": micro,
                "next_batch": self.micro_batch(micro)[1],
            },
            "loss": self.last_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state written by `state_dict` (same config, data and model)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"resumable state version {state.get('version')} is not {STATE_VERSION}")
        data = state["data"]
        if data["micro_batches_per_epoch"] != self.micro_batches_per_epoch():
            raise ValueError(
                f"the dataset changed since this run was saved ({data['micro_batches_per_epoch']} batches per epoch "
                f"then, {self.micro_batches_per_epoch()} now): start a new run"
            )
        network, optimizer, scheduler = self._built()
        network.load_state_dict(state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.last_loss = float(state.get("loss", float("nan")))
        self.rng_at_step = state["rng"]
        restore_rng(state["rng"])
