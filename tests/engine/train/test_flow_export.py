"""A Flux.1 LoRA from the trainer loads in diffusers with every key used and does what merging it by hand does."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from charforge.engine.library.formats import read_lora
from charforge.engine.train.config import TrainConfig, with_overrides
from charforge.engine.train.data import TrainingData, items_from_pairs
from charforge.engine.train.export import lora_metadata
from charforge.engine.train.flow.export import export_flow_lora
from charforge.engine.train.flow.flux import load_flux
from charforge.engine.train.flow.trainer import FlowTrainer

pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def trained(tiny_flux, tmp_path_factory):
    """A few steps with a large learning rate, so every LoRA matrix is far from its start."""
    folder = tmp_path_factory.mktemp("flow_export")
    yy, xx = np.mgrid[0:64, 0:64]
    rgb = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "a.png")
    overrides = {
        "steps": 3,
        "resolution": 64,
        "bucket_step": 32,
        "min_bucket": 32,
        "rank": 4,
        "alpha": 2.0,
        "mixed_precision": "no",
        "learning_rate": 5e-2,
        "warmup_steps": 0,
        "schedule": "constant",
        "sample_every": 0,
        "checkpoint_every": 0,
    }
    config = with_overrides(TrainConfig(), overrides)
    model = load_flux(tiny_flux.diffusers_dir, dtype="fp32")
    data = TrainingData.prepare(items_from_pairs([(str(folder / "a.png"), "sks person")]), config.data)
    trainer = FlowTrainer(model, data, config)
    trainer.setup()
    trainer.train()
    meta = lora_metadata(arch=model.arch, settings=config.lora, title="alice", trigger_phrase="sks")
    files = {
        layout: export_flow_lora(
            folder / f"{layout}.safetensors", trainer.network, "flux", meta, torch.float32, layout
        )
        for layout in ("kohya", "peft")
    }
    return trainer, files


def _inputs(transformer):
    generator = torch.Generator().manual_seed(5)
    config = transformer.config
    return {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=generator),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([1.0]),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "encoder_hidden_states": torch.randn(1, 7, config.joint_attention_dim, generator=generator),
        "txt_ids": torch.zeros(7, 3),
        "img_ids": torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(-1, 3),
        "return_dict": False,
    }


def test_kohya_layout_names_and_metadata(trained):
    _, files = trained
    tensors, meta = read_lora(files["kohya"])
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in stems
    assert "lora_unet_double_blocks_0_txt_attn_qkv" in stems
    assert "lora_unet_single_blocks_0_linear1" in stems
    assert "lora_unet_single_blocks_0_linear2" in stems
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.trigger_phrase"] == "sks"


def _hand_merged(trainer, tiny_flux, inputs):
    """(base output, output with every trained LoRA delta added to the diffusers weights by hand)."""
    from diffusers import FluxTransformer2DModel

    merged = FluxTransformer2DModel.from_pretrained(str(tiny_flux.diffusers_dir / "transformer"))
    modules = dict(merged.named_modules())
    with torch.no_grad():
        base = merged(**inputs)[0]
        for m in trainer.network.modules():
            modules[m.name].weight += (m.alpha / m.rank) * (m.up.float() @ m.down.float())
        return base, merged(**inputs)[0]


def test_kohya_file_patches_the_single_file_weights_like_a_hand_merge(trained, tiny_flux):
    """What ComfyUI does with a kohya Flux LoRA: add each fused module's delta to the single-file weight.

    (diffusers' own kohya converter assumes Flux.1's full width, 3072, so it cannot read a tiny model's
    kohya file; the full-width file is checked in ComfyUI by the library's tests.)
    """
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from charforge.engine.library.flow_layouts import target_from_kohya
    from charforge.engine.models.flux_files import bfl_to_diffusers, diffusers_to_bfl

    trainer, files = trained
    tensors = load_file(str(files["kohya"]))
    bfl = diffusers_to_bfl(
        load_file(str(tiny_flux.diffusers_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    )
    stems = sorted({k.split(".")[0] for k in tensors})
    for stem in stems:
        target = target_from_kohya("flux", stem)
        assert target is not None, stem
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        bfl[f"{target.name}.weight"] = bfl[f"{target.name}.weight"] + float(
            tensors[f"{stem}.alpha"]
        ) / down.shape[0] * (up @ down)
    patched = FluxTransformer2DModel.from_pretrained(str(tiny_flux.diffusers_dir / "transformer"))
    patched.load_state_dict(bfl_to_diffusers(bfl))
    inputs = _inputs(patched)
    with torch.no_grad():
        got = patched(**inputs)[0]
    base, want = _hand_merged(trainer, tiny_flux, inputs)
    assert float((want - base).abs().max()) > 1e-3  # the LoRA does change the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_diffusers_loads_the_peft_file_with_every_key_and_matches_a_hand_merge(trained, tiny_flux, caplog):
    from diffusers import FluxPipeline

    trainer, files = trained
    pipe = FluxPipeline.from_pretrained(str(tiny_flux.diffusers_dir), local_files_only=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(files["peft"]))
    complaints = [r.getMessage() for r in caplog.records if "unexpected key" in r.getMessage().lower()]
    assert not complaints, complaints
    inputs = _inputs(pipe.transformer)
    with torch.no_grad():
        loaded = pipe.transformer(**inputs)[0]
    base, want = _hand_merged(trainer, tiny_flux, inputs)
    assert float((want - base).abs().max()) > 1e-3  # the LoRA does change the output
    torch.testing.assert_close(loaded, want, rtol=1e-4, atol=1e-5)
