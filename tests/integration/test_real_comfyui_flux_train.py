"""Opt-in: a Flux.1 LoRA the trainer made, loaded by a real ComfyUI (COMFYUI_DIR set).

The full-width, shallow Flux.1-dev file (1 double + 1 single block, real key layout; cf_testing.flow_checkpoints)
is loaded by CharForge's Flux loader, trained for two steps by `FlowTrainer` (the text and latents come from a
stand-in of the real shapes: T5 width 4096, pooled 768, 16 latent channels; the step is the trainer's own),
and exported in the kohya layout with `export_flow_lora` — once with the ``all_linear`` preset and once with
``attention`` (where a single block's ``linear1`` carries a zero block for its MLP part). ComfyUI's stock
``UNETLoader`` + ``LoraLoaderModelOnly`` must report no key as not loaded, patch exactly the weights the preset
adapts, and add exactly the trained deltas. The expected deltas are assembled here by hand from the trainer's
own LoRA layers (each diffusers module's rows placed at its offset in the fused weight), not by the library.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cf_testing.comfyui import load_script
from cf_testing.flow_checkpoints import comfy_flux_folders
from cf_testing.real_comfyui import checkout, run_comfy_script, suite_marks

pytestmark = suite_marks()

H = 3072
# diffusers module (inside a block) -> (single-file weight inside the block, row offset, rows)
DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, H),
    "attn.to_k": ("img_attn.qkv", H, H),
    "attn.to_v": ("img_attn.qkv", 2 * H, H),
    "attn.add_q_proj": ("txt_attn.qkv", 0, H),
    "attn.add_k_proj": ("txt_attn.qkv", H, H),
    "attn.add_v_proj": ("txt_attn.qkv", 2 * H, H),
    "attn.to_out.0": ("img_attn.proj", 0, H),
    "attn.to_add_out": ("txt_attn.proj", 0, H),
    "ff.net.0.proj": ("img_mlp.0", 0, 4 * H),
    "ff.net.2": ("img_mlp.2", 0, H),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, 4 * H),
    "ff_context.net.2": ("txt_mlp.2", 0, H),
}
SINGLE = {
    "attn.to_q": ("linear1", 0, H),
    "attn.to_k": ("linear1", H, H),
    "attn.to_v": ("linear1", 2 * H, H),
    "proj_mlp": ("linear1", 3 * H, 4 * H),
    "proj_out": ("linear2", 0, H),
}
ROWS = {"img_attn.qkv": 3 * H, "txt_attn.qkv": 3 * H, "linear1": 7 * H}


def _trained_network(flux_file, preset: str, tmp_path):
    """Two trainer steps on the shallow full-width Flux with a stand-in for the text encoders and VAE."""
    import numpy as np
    from PIL import Image

    from charforge.engine.train.config import TrainConfig, with_overrides
    from charforge.engine.train.data import TrainingData, items_from_pairs
    from charforge.engine.train.flow.flux import FluxModel, _transformer_from_state
    from charforge.engine.train.flow.trainer import FlowTrainer

    class StandIn(FluxModel):
        def encode_images(self, pixels):
            g = torch.Generator().manual_seed(1)
            return torch.randn(pixels.shape[0], 16, pixels.shape[2] // 8, pixels.shape[3] // 8, generator=g)

        def encode_text(self, captions, device, settings, encoders=None):
            g = torch.Generator().manual_seed(2)
            return {
                "pooled": torch.randn(len(captions), 768, generator=g),
                "t5": torch.randn(len(captions), 8, 4096, generator=g),
            }

    transformer = _transformer_from_state(load_file(str(flux_file)), torch.float32)
    model = StandIn(
        arch="flux-dev",
        source=str(flux_file),
        transformer=transformer,
        vae=torch.nn.Module(),
        text_encoders={"clip_l": torch.nn.Identity(), "t5": torch.nn.Identity()},
        tokenizers={},
        dtype=torch.float32,
        fingerprints={"vae": "stand-in", "clip_l": "stand-in", "t5": "stand-in"},
    )
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / f"{preset}.png")
    overrides = {
        "steps": 2,
        "resolution": 64,
        "bucket_step": 32,
        "min_bucket": 32,
        "rank": 4,
        "alpha": 2.0,
        "targets": preset,
        "mixed_precision": "no",
        "learning_rate": 5e-2,
        "schedule": "constant",
        "warmup_steps": 0,
        "min_snr_gamma": 0.0,
    }
    config = with_overrides(TrainConfig(), overrides)
    data = TrainingData.prepare(items_from_pairs([(str(tmp_path / f"{preset}.png"), "sks")]), config.data)
    trainer = FlowTrainer(model, data, config)
    trainer.setup()
    trainer.train()
    return trainer.network


def _expected(network) -> dict[str, torch.Tensor]:
    """Each single-file weight's delta as factors up (rows x total rank) and down (total rank x in), by hand."""
    groups: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for m in network.modules():
        kind, index, leaf = m.name.split(".", 2)
        table, prefix = (
            (DOUBLE, "double_blocks") if kind == "transformer_blocks" else (SINGLE, "single_blocks")
        )
        weight, offset, rows = table[leaf]
        assert m.up.shape[0] == rows
        scaled = m.up.detach().float() * (m.alpha / m.rank)
        groups.setdefault(f"{prefix}.{index}.{weight}", []).append((offset, scaled, m.down.detach().float()))
    out = {}
    for name, parts in groups.items():
        total = ROWS.get(name.split(".", 2)[2], parts[0][1].shape[0])
        up = torch.zeros(total, sum(p[1].shape[1] for p in parts))
        column = 0
        for offset, scaled, _ in parts:
            up[offset : offset + scaled.shape[0], column : column + scaled.shape[1]] = scaled
            column += scaled.shape[1]
        out[name + ".up"] = up.contiguous()
        out[name + ".down"] = torch.cat([p[2] for p in parts]).contiguous()
    return out


def _comfy_side() -> str:
    """The ComfyUI-side script of test_real_comfyui_flux.py (UNETLoader, LoraLoaderModelOnly, patched deltas)."""
    return load_script(
        Path(__file__).with_name("test_real_comfyui_flux.py"), "cf_real_comfyui_flux"
    ).COMFY_SIDE


@pytest.fixture
def comfy():
    return checkout()


def test_trained_flux_loras_load_in_real_comfyui(comfy, tmp_path):
    from charforge.engine.train.flow.export import export_flow_lora

    models, loras, flux = comfy_flux_folders(tmp_path)
    tasks, expected_names = [], {}
    for preset in ("all_linear", "attention"):
        network = _trained_network(flux, preset, tmp_path)
        export_flow_lora(loras / f"{preset}.safetensors", network, "flux", {}, torch.float32, "kohya")
        expected = _expected(network)
        save_file(expected, str(tmp_path / f"{preset}_expected.safetensors"))
        expected_names[preset] = sorted(k[: -len(".up")] for k in expected if k.endswith(".up"))
        tasks.append(
            {
                "name": preset,
                "model": "flux_shallow.safetensors",
                "loras": [f"{preset}.safetensors"],
                "expected": str(tmp_path / f"{preset}_expected.safetensors"),
            }
        )
    job = {"models": str(models), "loras": str(loras), "tasks": tasks}
    results = run_comfy_script(comfy, tmp_path, _comfy_side(), job)
    assert len(expected_names["all_linear"]) == 10 and len(expected_names["attention"]) == 5
    for preset in ("all_linear", "attention"):
        result = results[preset]
        assert result["model_class"] == "Flux" and result["missing_or_unexpected"] == []
        loaded = result["loras"][f"{preset}.safetensors"]
        assert loaded["not_loaded"] == [], preset
        assert loaded["patched"] == expected_names[preset], preset
        worst = max(loaded["relative_error"].items(), key=lambda item: item[1])
        assert worst[1] < 1e-5, (preset, worst)
