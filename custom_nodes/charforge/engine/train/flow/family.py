"""The family interface: what a flow-matching base (Flux.1, SD3.x) gives the trainer.

A family is a subclass of `FlowModel` that loads its parts and knows three things the trainer does not:
how images become latents, how captions become conditioning, and how its transformer is called. The
trainer (`flow.trainer.FlowTrainer`) does the rest the same way for every family: noise levels, the
objective, caches, LoRA, fp8 storage, steps, state. See the package docstring for the contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import fingerprint
from .objective import FlowSettings


@dataclass
class FlowModel:
    """A flow-matching base model's parts, ready for training (subclass per family).

    ``text_encoders`` maps an encoder name (``"clip_l"``, ``"t5"``, ...) to its module; after the
    captions are cached the trainer calls `release_text_encoders` and the frozen ones are dropped.
    ``text_outputs`` maps each key `encode_text` returns to the encoder that makes it, so the trainer
    knows which outputs it may cache and which an encoder with LoRA must recompute every step.
    """

    arch: str
    source: str
    transformer: Any
    vae: Any
    text_encoders: dict[str, Any]
    tokenizers: dict[str, Any]
    dtype: torch.dtype
    fingerprints: dict[str, str] = field(default_factory=dict)

    # -------------------------------------------------------------- what each family sets
    family: str = ""  # "flux", "sd3"
    default_sampling: str = "logit_normal"  # FlowSettings.timestep_sampling "auto"
    default_shift: float = 3.1582  # the ``shift`` mode's strength when FlowSettings.discrete_flow_shift is 0
    text_outputs: dict[str, str] = field(default_factory=dict)  # output key -> encoder name
    lora_text_encoder: str = "clip_l"  # the encoder the optional text-encoder LoRA goes on
    default_t5_length: int = 256  # T5 tokens when FlowSettings.t5_max_length is 0

    # -------------------------------------------------------------- the contract

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> the latents the transformer is trained on (B, C, h, w), fp32,
        already shifted and scaled. Here: the VAE's latent mean, shifted and scaled by its config (Flux.1's
        and SD3's VAEs); a family with another VAE overrides it."""
        vae = self.vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean.float()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def encode_text(
        self,
        captions: Sequence[str],
        device: torch.device | str,
        settings: FlowSettings,
        encoders: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Captions -> conditioning tensors, batch first (keys as in ``text_outputs``); only the outputs of
        `encoders` (default: all). Gradients flow through an encoder that has trainable LoRA."""
        raise NotImplementedError

    def predict(
        self,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        text: dict[str, torch.Tensor],
        settings: FlowSettings,
    ) -> torch.Tensor:
        """The transformer's velocity prediction for latents `noisy` (B, C, h, w) at noise levels `sigmas`
        (B,), in the latent layout (B, C, h, w)."""
        raise NotImplementedError

    def lora_targets(self, preset: str) -> list[str]:
        """Module names of the transformer that get LoRA for a target preset (``"attention"``,
        ``"all_linear"``)."""
        raise NotImplementedError

    def sample(self, text: dict[str, torch.Tensor], seed: int, size: int, settings: Any, device) -> Any:
        """One sample image (PIL) for one prompt's conditioning `text` (batch of 1) at `size` x `size`, with
        ``settings`` a ``config.SampleSettings`` (steps, guidance). Families without a sampler leave it."""
        raise NotImplementedError

    @property
    def can_sample(self) -> bool:
        return type(self).sample is not FlowModel.sample

    def t5_length(self, settings: FlowSettings) -> int:
        """T5 tokens the captions are padded (and cut) to."""
        return settings.t5_max_length or self.default_t5_length

    def text_fingerprint(self, settings: FlowSettings) -> str:
        """What the cached caption outputs depend on (weights of the encoders, token lengths)."""
        encoders = ":".join(self.fingerprints.get(name, "") for name in sorted(self.text_encoders))
        return f"{encoders}:t5={self.t5_length(settings)}"

    # -------------------------------------------------------------- shared behaviour

    @property
    def transformer_config(self) -> dict:
        return dict(self.transformer.config)

    def components(self) -> dict[str, torch.nn.Module]:
        """The modules LoRA may go on, by the names the LoRA network and its export use."""
        out = {"transformer": self.transformer}
        if self.text_encoders.get(self.lora_text_encoder) is not None:
            out["text_encoder"] = self.text_encoders[self.lora_text_encoder]
        return out

    def frozen(self) -> FlowModel:
        """This model, just loaded, with every part frozen in eval mode and the fingerprints of its VAE and
        text encoders taken (what the caches are checked against)."""
        for module in (self.transformer, self.vae, *self.text_encoders.values()):
            module.requires_grad_(False)
            module.eval()
        self.fingerprints = {
            "vae": fingerprint(self.vae),
            **{name: fingerprint(module) for name, module in self.text_encoders.items()},
        }
        return self

    def release_text_encoders(self, keep: Sequence[str] = ()) -> None:
        """Drop the text encoders not in `keep` (their outputs are cached): frees their memory."""
        for name in list(self.text_encoders):
            if name not in keep:
                self.text_encoders[name] = None

    def image_tokens(self, latent_height: int, latent_width: int) -> int:
        """Image tokens the transformer sees for a latent of this size (2x2 patches)."""
        return (latent_height // 2) * (latent_width // 2)


def token_ids(tokenizer: Any, captions: Sequence[str], device, max_length: int | None = None) -> torch.Tensor:
    """Captions -> token ids padded (and cut) to `max_length` (default: the tokenizer's own), on `device`."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length if max_length is None else max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
