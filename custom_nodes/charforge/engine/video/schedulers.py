"""Sampling schedulers for video, built from the base model's noise schedule.

AnimateDiff's motion modules were trained with a plain ``linear`` beta schedule (betas 0.00085 to
0.012), not the ``scaled_linear`` one of the SD1.5 / SDXL image models; its reference sampler is DDIM
with ``clip_sample`` off, ``linspace`` timestep spacing and ``steps_offset`` 1
(docs/model-configs.md §5). ``beta_schedule="auto"`` uses that; ``"base"`` keeps the base
model's own schedule (for motion modules fine-tuned on it).
"""

from __future__ import annotations

from typing import Any

SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
BETA_SCHEDULES = ("auto", "linear", "scaled_linear", "base")


def make_scheduler(name: str, base_config: dict[str, Any] | None = None, beta_schedule: str = "auto"):
    """A fresh diffusers scheduler `name` with the base model's betas and the chosen beta schedule."""
    import diffusers

    from ..train.models import NOISE_SCHEDULE_KEYS

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {SCHEDULERS}")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")
    # steps_offset and the beta schedule are set below; trained betas are not used
    base = {k: v for k, v in (base_config or {}).items() if k in NOISE_SCHEDULE_KEYS and v is not None}
    config = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "epsilon",
        **base,
    }
    config.pop("trained_betas", None)
    if beta_schedule in ("auto", "linear"):
        config["beta_schedule"] = "linear"
    elif beta_schedule == "scaled_linear":
        config["beta_schedule"] = "scaled_linear"
    else:
        config.setdefault("beta_schedule", "scaled_linear")
    config.update(timestep_spacing="linspace", steps_offset=1)
    if name == "ddim":
        return diffusers.DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=False)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**config)
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**config)
    if name in ("dpmpp_2m", "dpmpp_2m_karras"):
        return diffusers.DPMSolverMultistepScheduler(
            **config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=name.endswith("karras")
        )
    return diffusers.UniPCMultistepScheduler(**config)
