"""LoRA files for tests: random LoRAs on the real SD1.5 / SDXL layer names, and one per architecture written by
our trainer from a tiny model (the `trained_loras` fixture; registered as a plugin in tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from charforge.engine.library import formats
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
