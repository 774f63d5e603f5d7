"""Training settings as explicit dataclasses, the named presets, and overrides by name.

A `TrainConfig` is everything that decides what a run computes. It is saved as ``config.json`` in the
run folder; a run resumes only with a config that matches the saved one in every field that changes
the result (`RESUME_FREE_FIELDS` may differ: more steps, other sample / checkpoint intervals).

Presets (`preset_config`) are named for what users want:

=================  =============================================================================
``sdxl``           SDXL at 1024 px: rank 32 / alpha 16, AdamW 1e-4, cosine with warm-up, 1500 steps
``sd15``           SD1.5 at 512 px: the same recipe at SD1.5's resolution
``fast``           a usable LoRA quickly: rank 16, 2e-4 constant, 500 steps, samples at the end only
``high_quality``   slower and fuller: rank 64 / 32 plus LoCon convs (8 / 4), 1e-4 cosine, 2500 steps
=================  =============================================================================

``fast`` and ``high_quality`` follow the base model (1024 px for SDXL, 512 px for SD1.5). Every preset
uses min-SNR γ = 5, cached latents and text-encoder outputs, bf16 and gradient checkpointing chosen by
the memory profile (`preflight.auto_profile`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .data import DataSettings
from .flow.objective import FlowSettings
from .lora import LoraSettings
from .presets import BASIC_DEFAULTS, FLOW_ARCHS, PRESETS, RESOLUTION, basic_settings  # noqa: F401 - re-exported

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class OptimSettings:
    """Optimizer and learning-rate schedule."""

    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    text_encoder_lr: float = 0.0  # 0 = learning_rate / 10 (only used when text encoders are trained)
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 = no clipping
    grad_accumulation: int = 1

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: choose one of {SCHEDULES}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive (got {self.learning_rate})")
        if self.grad_accumulation < 1:
            raise ValueError(f"grad_accumulation must be at least 1 (got {self.grad_accumulation})")


@dataclass(frozen=True)
class SampleSettings:
    """Sample images rendered during training with fixed seeds (the trigger word goes in every prompt)."""

    every: int = 250  # steps; 0 = only at the end
    prompts: tuple[str, ...] = ()  # empty = "<trigger word>" / the first caption
    seeds: tuple[int, ...] = (42,)
    steps: int = 20
    guidance: float = 5.0
    size: int = 0  # 0 = the training resolution


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes."""

    steps: int = 1500
    batch_size: int = 1
    seed: int = 0
    trigger_word: str = ""
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    samples: SampleSettings = field(default_factory=SampleSettings)
    flow: FlowSettings = field(default_factory=FlowSettings)  # flow-matching bases (Flux.1, SD3.x) only
    min_snr_gamma: float = 5.0  # 0 = plain MSE
    noise_offset: float = 0.0
    mixed_precision: str = "bf16"  # "no", "bf16", "fp16"; "no" trains in fp32
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the step's forward and loss (CUDA only)
    loss_every: int = 10  # read the loss back to the host every N steps (the only sync of a step)
    clip_skip: int = 1
    max_token_length: int = 75  # 150 / 225: longer captions are encoded in 75-token windows (kohya's option)
    checkpoint_every: int = 0  # write a LoRA checkpoint every N steps (0 = only the final LoRA)
    state_every: int = 0  # write the resumable state every N steps (0 = with checkpoints; always on stop)
    save_dtype: str = "fp16"

    def __post_init__(self):
        if self.max_token_length not in (75, 150, 225):
            raise ValueError(f"max_token_length must be 75, 150 or 225 (got {self.max_token_length})")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if self.loss_every < 1:
            raise ValueError(f"loss_every must be at least 1 (got {self.loss_every})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {self.batch_size})")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: choose one of {PRECISIONS}")
        if self.lora.train_text_encoder and self.data.cache_text_encoder_outputs:
            # Trained text encoders change their outputs every step: nothing to cache.
            object.__setattr__(self, "data", replace(self.data, cache_text_encoder_outputs=False))

    # ---------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        for name, kind in NESTED_SETTINGS.items():
            if name in data:
                values = {k: v for k, v in data[name].items() if k in {f.name for f in fields(kind)}}
                for key, value in values.items():
                    if isinstance(value, list):
                        values[key] = tuple(value)
                data[name] = kind(**values)
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})

    def result_hash(self) -> str:
        """A hash of the fields that change the trained weights (resume requires it to match)."""
        data = self.to_dict()
        if self.flow == FlowSettings():
            data.pop("flow")  # runs saved before the flow settings existed keep their hash
        for dotted in RESUME_FREE_FIELDS:
            head, _, tail = dotted.partition(".")
            if tail:
                data[head].pop(tail, None)
            else:
                data.pop(head, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


#: TrainConfig's groups of settings: field name -> its dataclass
NESTED_SETTINGS: dict[str, type] = {
    "lora": LoraSettings,
    "data": DataSettings,
    "optim": OptimSettings,
    "samples": SampleSettings,
    "flow": FlowSettings,
}

# Fields a resumed run may change without changing what the steps so far computed (gradient
# checkpointing recomputes the same numbers). `steps` is one of them only for constant schedules; the
# run checks that (a cosine schedule depends on the total).
RESUME_FREE_FIELDS = (
    "steps",
    "samples",
    "checkpoint_every",
    "state_every",
    "compile",
    "loss_every",
    "trigger_word",
    "save_dtype",
    "gradient_checkpointing",
)


# --------------------------------------------------------------------------------------------------
# Overrides by name


def _field_paths() -> dict[str, str]:
    """Short name -> dotted path for every setting (``rank`` -> ``lora.rank``); dotted paths map to themselves."""
    paths: dict[str, str] = {}
    nested = NESTED_SETTINGS
    for f in fields(TrainConfig):
        if f.name in nested:
            for sub in fields(nested[f.name]):
                paths[f"{f.name}.{sub.name}"] = f"{f.name}.{sub.name}"
                short = f"sample_{sub.name}" if f.name == "samples" else sub.name
                paths.setdefault(short, f"{f.name}.{sub.name}")
        else:
            paths[f.name] = f.name
    return paths


def with_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A copy of `config` with settings replaced by name (``{"rank": 16, "optim.learning_rate": 2e-4}``).

    Short names work where they are unique (``rank``, ``learning_rate``, ``resolution``); unknown names
    raise with the list of valid ones.
    """
    paths = _field_paths()
    unknown = sorted(k for k in overrides if k not in paths)
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; valid names: {', '.join(sorted(paths))}")
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, tail = paths[key].partition(".")
        if isinstance(value, list):
            value = tuple(value)
        if tail:
            nested.setdefault(head, {})[tail] = value
        else:
            top[head] = value
    for head, values in nested.items():
        top[head] = replace(getattr(config, head), **values)
    return replace(config, **top)


# --------------------------------------------------------------------------------------------------
# Presets


def preset_config(preset: str, arch: str) -> TrainConfig:
    """The named preset for a base model of `arch` ("sd15" / "sdxl")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    if arch not in RESOLUTION:
        raise ValueError(f"unknown architecture {arch!r}")
    resolution = RESOLUTION[arch]
    data = DataSettings(resolution=resolution, min_bucket=resolution // 4, max_bucket=resolution * 2)
    base = TrainConfig(
        steps=1500,
        lora=LoraSettings(rank=32, alpha=16.0),
        data=data,
        optim=OptimSettings(optimizer="adamw", learning_rate=1e-4, schedule="cosine", warmup_steps=50),
        samples=SampleSettings(every=250),
        min_snr_gamma=5.0,
        checkpoint_every=500,
    )
    if arch in FLOW_ARCHS:
        return _flow_preset(preset, base)
    if preset in ("sdxl", "sd15"):
        return base
    if preset == "fast":
        return replace(
            base,
            steps=500,
            lora=LoraSettings(rank=16, alpha=16.0),
            optim=replace(base.optim, learning_rate=2e-4, schedule="constant", warmup_steps=0),
            samples=SampleSettings(every=0),
            checkpoint_every=0,
        )
    return replace(
        base,
        steps=2500,
        lora=LoraSettings(rank=64, alpha=32.0, conv_rank=8, conv_alpha=4.0),
        optim=replace(base.optim, warmup_steps=100),
        noise_offset=0.0357,
        samples=SampleSettings(every=250, seeds=(42, 7)),
    )


def _flow_preset(preset: str, base: TrainConfig) -> TrainConfig:
    """A preset on a Flux.1 / SD3.x base: the same names, a transformer's recipe.

    Every linear layer of the blocks at rank 16 / alpha 16 (LoCon convs do not exist there), no min-SNR
    weighting (a noise-prediction idea; flow matching samples its noise levels instead) and no noise offset.
    ``sdxl`` / ``sd15`` (balanced): 1500 steps, AdamW 1e-4 cosine; ``fast``: 500 steps at 2e-4 constant;
    ``high_quality``: rank 32 / alpha 32, 2500 steps.
    """
    flow = replace(
        base,
        lora=LoraSettings(rank=16, alpha=16.0, targets="all_linear"),
        min_snr_gamma=0.0,
        noise_offset=0.0,
    )
    if preset == "fast":
        return replace(
            flow,
            steps=500,
            optim=replace(flow.optim, learning_rate=2e-4, schedule="constant", warmup_steps=0),
            samples=SampleSettings(every=0),
            checkpoint_every=0,
        )
    if preset == "high_quality":
        return replace(
            flow,
            steps=2500,
            lora=LoraSettings(rank=32, alpha=32.0, targets="all_linear"),
            optim=replace(flow.optim, warmup_steps=100),
        )
    return flow


# --------------------------------------------------------------------------------------------------
# The four basic settings a user sets by hand (the Train LoRA node's widgets; see presets.basic_settings)


def ignored_basic_settings(
    config: TrainConfig, *, steps: int, learning_rate: float, rank: int, resolution: int
) -> list[str]:
    """The numbers that differ from `config` (built with the preset's values), for a note to the user."""
    used = {
        "steps": config.steps,
        "learning_rate": config.optim.learning_rate,
        "rank": config.lora.rank,
        "resolution": config.data.resolution,
    }
    given = {"steps": steps, "learning_rate": learning_rate, "rank": rank, "resolution": resolution}
    return [f"{name} {given[name]:g}" for name in used if given[name] and given[name] != used[name]]


def fit_warmup(config: TrainConfig) -> TrainConfig:
    """Shorten the warm-up to a tenth of a run that is shorter than twice the warm-up."""
    if config.steps < config.optim.warmup_steps * 2:
        return replace(config, optim=replace(config.optim, warmup_steps=config.steps // 10))
    return config
