"""The flow-matching objective: settings, noise levels (timestep sampling) and the noised input and target.

A clean latent x0 and noise ε are mixed at noise level σ in [0, 1]: x_σ = (1 − σ)·x0 + σ·ε. The model
predicts the velocity ε − x0 (what the rectified-flow models Flux.1 and SD3 were trained on); the loss is
the mean squared error to it. How σ is drawn decides which noise levels training spends its steps on:

===============  ==============================================================================
``uniform``      σ ~ U(0, 1)
``logit_normal`` σ = sigmoid(N(logit_mean, logit_std)): most steps at middle noise levels
``shift``        a logit-normal σ moved towards noise: σ' = sσ / (1 + (s − 1)σ), s = ``discrete_flow_shift``
                 (0: the family's, SD3's 3.0, otherwise kohya's 3.1582)
``flux_shift``   a logit-normal σ moved by the image size, the shift Flux.1 samples with:
                 σ' = e^μ / (e^μ + 1/σ − 1), μ from 0.5 at 256 image tokens to 1.15 at 4,096 (1024²)
``auto``         the family's choice (Flux.1: ``flux_shift``)
===============  ==============================================================================

Everything random comes from the generator the trainer seeds per micro-batch, so a resumed run draws
the same noise levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLINGS = ("auto", "uniform", "logit_normal", "shift", "flux_shift")

# Flux.1's resolution-dependent shift: μ is linear in the number of image tokens between these points.
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
BASE_TOKENS, MAX_TOKENS = 256, 4096
DEFAULT_DISCRETE_SHIFT = 3.1582  # ``shift``'s strength when neither settings nor family name one (kohya's)


@dataclass(frozen=True)
class FlowSettings:
    """What only flow-matching (transformer) bases use; SD1.5 / SDXL runs ignore it."""

    timestep_sampling: str = "auto"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    discrete_flow_shift: float = 0.0  # ``shift`` only; 0 = the family's (`FlowModel.default_shift`)
    guidance_scale: float = 1.0  # Flux.1-dev's guidance input while training (schnell has none)
    t5_max_length: int = 0  # T5 tokens; 0 = the family's (Flux.1-dev 512, schnell 256)
    fp8_base: bool = False  # store the frozen base's linear weights in float8 (e4m3), compute in bf16
    # Loss on the x0 estimate x_σ − σ·prediction against x0 instead of on the velocity (diffusers' SD3
    # --precondition_outputs): the same gradient direction per sample, weighted by σ².
    precondition_outputs: bool = False

    def __post_init__(self):
        if self.timestep_sampling not in SAMPLINGS:
            raise ValueError(f"timestep_sampling {self.timestep_sampling!r}: choose one of {SAMPLINGS}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be positive (got {self.logit_std})")
        if self.discrete_flow_shift < 0:
            raise ValueError(
                f"discrete_flow_shift must be positive, or 0 for the family's (got {self.discrete_flow_shift})"
            )
        if self.t5_max_length < 0 or self.t5_max_length > 512:
            raise ValueError(
                f"t5_max_length must be 0 (the family's) or up to 512 (got {self.t5_max_length})"
            )


def flux_mu(image_tokens: int) -> float:
    """μ of Flux.1's shift for an image of `image_tokens` tokens (latent h/2 · w/2)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return BASE_SHIFT + slope * (image_tokens - BASE_TOKENS)


def exponential_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """σ' = e^μ / (e^μ + 1/σ − 1) (σ = 0 stays 0, 1 stays 1)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def discrete_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = sσ / (1 + (s − 1)σ)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sample_sigmas(
    count: int,
    settings: FlowSettings,
    *,
    default: str,
    image_tokens: int,
    default_shift: float = DEFAULT_DISCRETE_SHIFT,
    generator: torch.Generator,
    device: torch.device | str,
) -> torch.Tensor:
    """`count` noise levels in (0, 1) as `settings` say (``auto`` = `default`; ``shift`` with the settings'
    strength, or `default_shift` when they leave it 0), float32 on `device`."""
    mode = default if settings.timestep_sampling == "auto" else settings.timestep_sampling
    if mode == "uniform":
        sigmas = torch.rand((count,), generator=generator, device=device)
    else:
        normal = torch.randn((count,), generator=generator, device=device)
        sigmas = torch.sigmoid(normal * settings.logit_std + settings.logit_mean)
        if mode == "shift":
            sigmas = discrete_shift(sigmas, settings.discrete_flow_shift or default_shift)
        elif mode == "flux_shift":
            sigmas = exponential_shift(sigmas, flux_mu(image_tokens))
        elif mode != "logit_normal":
            raise ValueError(f"timestep_sampling {mode!r}: choose one of {SAMPLINGS}")
    # Never exactly 0 or 1: the endpoints carry no training signal (and 1/σ above would divide by 0).
    return sigmas.clamp(1e-5, 1.0 - 1e-5)


def noised(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, σ per sample."""
    s = sigmas.reshape(-1, *([1] * (latents.dim() - 1)))
    return (1.0 - s) * latents + s * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The target: ε − x0."""
    return noise - latents
