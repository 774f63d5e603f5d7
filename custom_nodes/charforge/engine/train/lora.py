"""Put LoRA layers on a base model with peft, choosing the modules the way kohya's ``networks.lora`` does.

Target sets for the U-Net (module names are diffusers'):

- ``kohya`` (default): every ``Linear`` and 1x1 ``Conv2d`` inside a ``Transformer2DModel``: attention
  ``to_q/to_k/to_v/to_out.0`` of ``attn1`` and ``attn2``, ``ff.net.0.proj``, ``ff.net.2``, ``proj_in``,
  ``proj_out``. About twice the parameters of diffusers' default (docs/model-configs.md §9.1).
- ``attention``: only ``to_q/to_k/to_v/to_out.0``.
- ``all_linear``: the same as ``kohya`` on a U-Net (the name the flow-matching transformers' presets use,
  see ``flow.flux.flux_lora_targets``).
- with ``conv_rank > 0`` (LoCon): also the convolutions of the res blocks, down- and upsamplers
  (3x3 ``conv1``/``conv2``/``conv``, 1x1 ``conv_shortcut``) and the res blocks' ``time_emb_proj``, at
  ``conv_rank`` / ``conv_alpha``.

Text encoders (optional; both for SDXL): ``q/k/v/out_proj`` and ``mlp.fc1/fc2`` of every layer.

The scale applied is ``alpha / rank`` (no rsLoRA), the same number kohya files store in ``.alpha``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ...deps import require

ADAPTER = "default"
TARGET_SETS = ("kohya", "attention", "all_linear")

_ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")
_TEXT_LEAVES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
_CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


@dataclass(frozen=True)
class LoraSettings:
    """What is trained and at which size."""

    rank: int = 32
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "kohya"  # "kohya" or "attention" ("all_linear": kohya's on a U-Net)
    conv_rank: int = 0  # > 0 adds LoCon layers on the res-block / sampler convolutions
    conv_alpha: float = 1.0
    train_text_encoder: bool = False
    text_encoder_rank: int = 0  # 0 = same as rank
    text_encoder_alpha: float = 0.0  # 0 = same as alpha

    def __post_init__(self):
        if self.targets not in TARGET_SETS:
            raise ValueError(f"LoRA targets {self.targets!r}: choose one of {TARGET_SETS}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1 (got {self.rank})")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1) (got {self.dropout})")


def _is_pointwise(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or (
        isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
    )


def unet_target_modules(unet: torch.nn.Module, targets: str = "kohya", conv: bool = False) -> dict[str, str]:
    """U-Net module name -> "linear" | "conv" for the chosen target set, in module order."""
    out: dict[str, str] = {}
    for name, module in unet.named_modules():
        kind = type(module).__name__
        if kind == "Transformer2DModel":
            for child, sub in module.named_modules(prefix=name):
                if child == name or not _is_pointwise(sub):
                    continue
                if targets == "attention" and not child.endswith(_ATTENTION_LEAVES):
                    continue
                out[child] = "linear"
        elif conv and kind in _CONV_PARENTS:
            for child, sub in module.named_modules(prefix=name):
                if isinstance(sub, (torch.nn.Conv2d, torch.nn.Linear)) and child != name:
                    out[child] = "conv"
    return out


def text_encoder_target_modules(text_encoder: torch.nn.Module) -> list[str]:
    """The six Linear layers of every CLIP encoder layer, by module name."""
    pattern = re.compile(r"(.*\.)?encoder\.layers\.\d+\.(" + "|".join(map(re.escape, _TEXT_LEAVES)) + r")")
    return [
        name
        for name, module in text_encoder.named_modules()
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)
    ]


def _inject(
    module: torch.nn.Module, names: dict[str, str], settings: LoraSettings, rank: int, alpha: float, seed: int
) -> None:
    peft = require("peft")
    conv_names = [n for n, kind in names.items() if kind == "conv"]
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=settings.dropout,
        target_modules=list(names),
        rank_pattern={re.escape(n): settings.conv_rank for n in conv_names},
        alpha_pattern={re.escape(n): settings.conv_alpha for n in conv_names},
        init_lora_weights=True,  # down: Kaiming-uniform, up: zeros -> the model starts unchanged
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    # peft creates the adapter in the base layer's dtype; train it in fp32 whatever the base dtype.
    for name, param in module.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
        else:
            param.requires_grad_(False)


def add_lora(components: dict[str, torch.nn.Module], settings: LoraSettings, seed: int = 0) -> LoraNetwork:
    """Add LoRA layers to ``components["unet"]`` (and the text encoders when asked); return the network.

    Without a ``unet`` entry only text encoders are adapted (``train_text_encoder`` must be set).

    `components` are named as in diffusers (``unet``, ``text_encoder``, ``text_encoder_2``); the modules are
    changed in place. The down matrices are drawn from `seed`, the up matrices start at zero.
    """
    injected: dict[str, torch.nn.Module] = {}
    if "unet" in components:
        unet_names = unet_target_modules(components["unet"], settings.targets, conv=settings.conv_rank > 0)
        _inject(components["unet"], unet_names, settings, settings.rank, settings.alpha, seed)
        injected["unet"] = components["unet"]
    if settings.train_text_encoder:
        rank = settings.text_encoder_rank or settings.rank
        alpha = settings.text_encoder_alpha or settings.alpha
        for offset, name in enumerate(n for n in ("text_encoder", "text_encoder_2") if n in components):
            module = components[name]
            names = dict.fromkeys(text_encoder_target_modules(module), "linear")
            _inject(module, names, settings, rank, alpha, seed + 1 + offset)
            injected[name] = module
    return LoraNetwork(injected, settings)


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: its component and module name, the two matrices, and its rank / alpha."""

    component: str
    name: str
    down: torch.Tensor  # (rank, in) or (rank, in, k, k)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


class LoraNetwork:
    """The LoRA layers added to a model: their parameters, their state, and a per-layer view for export."""

    def __init__(self, components: dict[str, torch.nn.Module], settings: LoraSettings):
        self.components = components
        self.settings = settings

    def parameters(self, component: str | None = None) -> list[torch.nn.Parameter]:
        """Trainable LoRA parameters (of one component, or all), in a stable order."""
        out = []
        for name, module in self.components.items():
            if component is None or component == name:
                out += [p for n, p in module.named_parameters() if "lora_" in n]
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``<component>.<parameter name>`` -> a CPU copy of every LoRA parameter (for resumable state)."""
        return {
            f"{c}.{n}": p.detach().to("cpu", copy=True)
            for c, module in self.components.items()
            for n, p in module.named_parameters()
            if "lora_" in n
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy values saved by `state_dict` back into the layers; every parameter must be present."""
        own = {
            f"{c}.{n}": p
            for c, module in self.components.items()
            for n, p in module.named_parameters()
            if "lora_" in n
        }
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"LoRA state does not fit this network: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it saved with other "
                "rank / targets / text-encoder settings?"
            )
        with torch.no_grad():
            for key, param in own.items():
                if tuple(state[key].shape) != tuple(param.shape):
                    raise ValueError(
                        f"LoRA state: {key} has shape {tuple(state[key].shape)}, "
                        f"expected {tuple(param.shape)}"
                    )
                param.copy_(state[key])

    def modules(self) -> list[LoraModule]:
        """Every adapted layer with its matrices (live tensors, not copies) and alpha."""
        lora = require("peft").tuners.lora
        out = []
        for component, root in self.components.items():
            for name, module in root.named_modules():
                if isinstance(module, lora.LoraLayer) and ADAPTER in module.lora_A:
                    out.append(
                        LoraModule(
                            component,
                            name,
                            module.lora_A[ADAPTER].weight,
                            module.lora_B[ADAPTER].weight,
                            float(module.lora_alpha[ADAPTER]),
                        )
                    )
        return out

    def set_enabled(self, enabled: bool) -> None:
        """Switch the LoRA layers on or off (off = the base model, e.g. for a baseline loss)."""
        lora = require("peft").tuners.lora
        for root in self.components.values():
            for module in root.modules():
                if isinstance(module, lora.LoraLayer):
                    module.enable_adapters(enabled)

    def describe(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for module in self.modules():
            counts[module.component] = counts.get(module.component, 0) + 1
        return {"layers": counts, "parameters": self.num_parameters()}
