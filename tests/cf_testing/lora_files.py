"""LoRA files for tests: random LoRAs on the real SD1.5 / SDXL layer names, and one per architecture written by
our trainer from a tiny model (the `trained_loras` fixture; registered as a plugin in tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from charforge.engine.library import formats
from charforge.engine.library.flow_layouts import Factors, FlowVariant, lora_targets
from charforge.engine.library.formats import LoraModule, LoraState


def pick_modules(arch: str, every: int = 23) -> list[formats.ModuleEntry]:
    """A spread of real layers: attention linears, convs (3x3 and 1x1), text-encoder linears."""
    entries = list(formats.module_table(arch).entries.values())
    chosen = entries[::every]
    for wanted in (
        "attn2.to_k",
        "attn1.to_out.0",
        "resnets.0.conv1",
        "proj_in",
        "self_attn.q_proj",
        "mlp.fc2",
    ):
        chosen += [e for e in entries if e.name.endswith(wanted)][:1]
    if arch == "sdxl":
        chosen += [e for e in entries if e.component == "te2"][:2]
    unique = {(e.component, e.name): e for e in chosen}
    return list(unique.values())


def random_state(
    arch: str,
    seed: int = 0,
    rank: int = 3,
    width: int = 6,
    alpha: float | None = 1.5,
    every: int = 23,
    full_size: bool = False,
    dtype=torch.float32,
) -> LoraState:
    """A LoRA on real layer names; tensors are `width` wide unless `full_size` (the model's real shapes)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for entry in pick_modules(arch, every):
        out_dim, in_dim = (entry.shape[0], entry.shape[1]) if full_size else (width + 1, width)
        kernel = tuple(entry.shape[2:]) if len(entry.shape) == 4 else ()
        down = torch.randn(rank, in_dim, *kernel, generator=generator).to(dtype)
        up = torch.randn(out_dim, rank, *([1, 1] if kernel else []), generator=generator).to(dtype)
        a = None if alpha is None else torch.tensor(alpha, dtype=dtype)
        modules[(entry.component, entry.name)] = LoraModule(entry.component, entry.name, down, up, a)
    return LoraState(arch, modules, {"ss_network_dim": str(rank), "modelspec.title": f"test-{arch}"}, "")


def write(state: LoraState, path, fmt: str = "kohya"):
    return formats.write_state(state, path, fmt)


def dense_deltas(state: LoraState) -> dict[tuple[str, str], torch.Tensor]:
    return {key: module.delta() for key, module in state.modules.items()}


TRAINED_SETTINGS = dict(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, train_text_encoder=True)
TRAINED_TAGS = {"10_sks person": {"sks person": 10, "smiling": 4, "outdoors": 7}}


@pytest.fixture(scope="session")
def trained_loras(tiny_sd15, tiny_sdxl, tmp_path_factory):
    """One LoRA per architecture written by our trainer's exporter (random weights, LoCon + text encoder)."""
    from charforge.engine.train.export import export_lora, lora_metadata
    from charforge.engine.train.lora import LoraSettings, add_lora
    from charforge.engine.train.models import load_base_model

    settings = LoraSettings(**TRAINED_SETTINGS)
    folder = tmp_path_factory.mktemp("trained")
    out = {}
    for tiny in (tiny_sd15, tiny_sdxl):
        model = load_base_model(tiny.diffusers_dir)
        network = add_lora(model.components(), settings, seed=7)
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for param in network.parameters():
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
        metadata = lora_metadata(
            arch=model.arch,
            settings=settings,
            title=f"alice-{model.arch}",
            trigger_phrase="sks person",
            resolution=(64, 64),
            training={"learning_rate": 1e-4, "steps": 10, "optimizer": "AdamW"},
            tag_frequency=TRAINED_TAGS,
        )
        out[model.arch] = export_lora(
            folder / f"{model.arch}.safetensors",
            network,
            model.arch,
            model.unet_config,
            metadata,
            dtype=torch.float32,
        )
    return out


# --------------------------------------------------------------------------------------------------
# Flux / SD3 LoRAs (engine/library/flow_layouts.py)

# Tiny diffusers configs with every kind of block (SD3: block 0 with attn2, block 1 the pre-only last one) and
# the matching `FlowVariant`s: the same weights and embedders as the full-size models at toy widths.
FLUX_TINY_CONFIG = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 12,
    "guidance_embeds": True,
    "axes_dims_rope": (2, 2, 4),
}
SD3_TINY_CONFIG = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 12,
    "out_channels": 4,
    "pos_embed_max_size": 8,
    "qk_norm": "rms_norm",
    "dual_attention_layers": (0,),
}


FLUX_TINY = FlowVariant(
    "flux-tiny", "flux", 16, 2, 2, guidance=True, context_dim=16, pooled_dim=12, latent_channels=1
)
SD3_TINY = FlowVariant(
    "sd3-tiny", "sd3", 16, 2, dual_blocks=(0,), context_dim=16, pooled_dim=12, latent_channels=4
)


def random_split_modules(
    names_shapes, seed: int = 0, rank: int = 2, alpha: float | None = 1.0, dtype=torch.float32
):
    """Random diffusers-named LoRA factors ({name: Factors}) for ``{name: (out, in[, kh, kw])}``."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in names_shapes.items():
        down = torch.randn(rank, *shape[1:], generator=generator).to(dtype)
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=generator).to(dtype)
        out[name] = Factors(down, up, None if alpha is None else torch.tensor(alpha, dtype=dtype))
    return out


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every Linear / Conv2d weight shape of a diffusers model by module path (the all-linear LoRA targets)."""
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


def random_flow_state(
    variant, seed: int = 0, rank: int = 2, alpha: float | None = 1.5, dtype=torch.float32
) -> LoraState:
    """A fused-layout LoRA on every adaptable weight of `variant` (`flow_layouts.lora_targets`)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, shape in lora_targets(variant).items():
        down = torch.randn(rank, *shape[1:], generator=generator).to(dtype)
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=generator).to(dtype)
        a = None if alpha is None else torch.tensor(alpha, dtype=dtype)
        modules[("unet", name)] = LoraModule("unet", name, down, up, a)
    meta = {"ss_network_dim": str(rank), "modelspec.title": f"test-{variant.arch}"}
    return LoraState(variant.family, modules, meta, "")
