"""The anchor for SDXL LoRA training speed: a step as diffusers' ``train_text_to_image_lora_sdxl.py`` takes it.

What the example (diffusers 0.42, default arguments, ``--mixed_precision bf16``, no ``--snr_gamma``, no separate
VAE) does per optimizer step, written out here without accelerate so it runs on the same random weights as our
trainer (benchmarks/gpu_suite.py):

- the frozen U-Net and text encoders in bf16, the VAE in float32; a peft adapter (``LoraConfig(r=rank,
  lora_alpha=rank, init_lora_weights="gaussian")`` on ``to_q/to_k/to_v/to_out.0``) whose parameters are cast
  to float32; ``torch.optim.AdamW`` (lr 1e-4, weight decay 1e-2); no ``torch.compile``;
- the batch's pixels come from the host (the data loader) every step and are encoded by the VAE
  (``latent_dist.sample()``); both text encoders run on the pre-tokenized caption (penultimate hidden states
  concatenated, the second encoder's pooled projection) every step;
- noise, uniform timesteps, ``add_noise``, the size conditioning ``(h, w, 0, 0, h, w)``, the U-Net under bf16
  autocast (what accelerate's mixed precision wraps the forward in), MSE to the noise, backward, gradient
  clipping at 1.0, the optimizer and schedule steps, ``zero_grad``;
- the loss read back to the host every step (the example adds it to its logged ``train_loss``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class ExampleSdxlLoraStep:
    """One training step of diffusers' SDXL LoRA example on `model`'s weights (`base_unet`: the U-Net's
    state dict before our LoRA went in). ``step()`` runs one; ``unet`` is the adapted U-Net."""

    def __init__(self, model, base_unet: dict, dataset: Path, resolution: int, rank: int, device):
        from diffusers import UNet2DConditionModel
        from peft import LoraConfig
        from PIL import Image

        self.device = torch.device(device)
        self.dtype = model.dtype
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(model.unet.config)
        unet = unet.to(self.dtype).to_empty(device=self.device)
        unet.load_state_dict(base_unet)
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
        self.params = [p for p in unet.parameters() if p.requires_grad]
        for param in self.params:  # the example's cast_training_params(unet, dtype=torch.float32)
            param.data = param.data.float()
        self.unet = unet.train()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)  # "constant"
        self.text_encoders = [te.to(self.device, self.dtype) for te in model.text_encoders]
        self.vae = copy.deepcopy(model.vae).to(self.device, torch.float32)
        self.noise_scheduler = copy.deepcopy(model.noise_scheduler)
        photo = sorted(p for p in Path(dataset).rglob("*.jpg"))[0]
        image = Image.open(photo).convert("RGB").resize((resolution, resolution))
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1
        self.pixels = pixels[None].pin_memory() if self.device.type == "cuda" else pixels[None]
        caption = photo.with_suffix(".txt").read_text()
        self.input_ids = [
            tok(
                caption,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            for tok in model.tokenizers
        ]
        self.time_ids = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]], device=self.device, dtype=self.dtype
        )
        self.train_loss = 0.0

    def _encode_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled = [], None
        for encoder, ids in zip(self.text_encoders, self.input_ids, strict=True):
            out = encoder(ids, output_hidden_states=True, return_dict=False)
            pooled = out[0]
            embeds.append(out[-1][-2])
        assert pooled is not None
        return torch.cat(embeds, dim=-1), pooled.view(pooled.shape[0], -1)

    def step(self) -> None:
        pixel_values = self.pixels.to(self.device, non_blocking=True)
        model_input = self.vae.encode(pixel_values).latent_dist.sample() * self.vae.config.scaling_factor
        model_input = model_input.to(self.dtype)
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (model_input.shape[0],), device=self.device
        ).long()
        noisy = self.noise_scheduler.add_noise(model_input, noise, timesteps)
        prompt_embeds, pooled = self._encode_prompt()
        added = {"time_ids": self.time_ids, "text_embeds": pooled}
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with autocast:
            prediction = self.unet(
                noisy, timesteps, prompt_embeds, added_cond_kwargs=added, return_dict=False
            )[0]
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.train_loss += loss.detach().item()
