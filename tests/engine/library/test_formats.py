"""LoRA key layouts: detection, conversion between kohya / peft / comfyui, exact round trips.

Files are built from the real SD1.5 / SDXL layer names (the library's module tables) with small random
tensors (cf_testing/lora_files.py), plus one file per architecture written by our trainer from a tiny model
(its `trained_loras` fixture).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file, save_file

from cf_testing.lora_files import dense_deltas, random_state, write
from charforge.engine.library import formats
from charforge.engine.library.formats import LoraFormatError, LoraModule

HASH_KEYS = ("modelspec.hash_sha256", "sshs_model_hash", "charforge.lora_format")


def _same_file(a, b) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert torch.equal(ta[key], tb[key]), key
    ma, mb = formats.read_header(a)[0], formats.read_header(b)[0]
    assert {k: v for k, v in ma.items() if k not in HASH_KEYS} == {
        k: v for k, v in mb.items() if k not in HASH_KEYS
    }


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", formats.ARCHS)
def test_tables_cover_the_layers_comfyui_maps(arch):
    table = formats.module_table(arch)
    counts = {c: sum(1 for e in table.entries.values() if e.component == c) for c in formats.COMPONENTS}
    # docs/comfyui-contract.md §6: SDXL key maps patched 1058 modules (794 U-Net + 6 x (12 CLIP-L + 32 bigG) layers).
    expected = {"sd15": {"te1": 72, "te2": 0}, "sdxl": {"unet": 794, "te1": 72, "te2": 192}}[arch]
    for component, count in expected.items():
        assert counts[component] == count
    entry = table.by_kohya["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    assert entry.name == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("arch", formats.ARCHS)
@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_each_layout_is_detected_and_read_back(arch, fmt):
    state = random_state(arch, seed=1)
    tensors = formats.state_to_tensors(state, fmt)
    assert formats.detect_format(tensors) == fmt
    back = formats.state_from_tensors(tensors)
    assert back.arch == arch and back.source_format == fmt
    assert back.modules.keys() == state.modules.keys()
    for key, module in state.modules.items():
        assert torch.equal(back.modules[key].down, module.down)
        assert torch.equal(back.modules[key].up, module.up)


def test_key_spellings_per_layout():
    state = random_state("sdxl")
    key = ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    module = state.modules.get(key) or LoraModule(*key, torch.zeros(1, 2), torch.zeros(3, 1))
    assert (
        formats.module_key_base("sdxl", module, "kohya")
        == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert (
        formats.module_key_base("sd15", module, "kohya")
        == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert (
        formats.module_key_base("sdxl", module, "comfyui")
        == "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    )
    # ComfyUI maps diffusers attention projections only in the attention-processor spelling (docs/comfyui-contract.md §6).
    assert (
        formats.module_key_base("sdxl", module, "peft")
        == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q"
    )
    out = LoraModule(
        "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", module.down, module.up
    )
    assert formats.module_key_base("sdxl", out, "peft").endswith("attn1.processor.to_out")
    te2 = LoraModule("te2", "text_model.encoder.layers.3.mlp.fc1", module.down, module.up)
    assert formats.module_key_base("sdxl", te2, "kohya") == "lora_te2_text_model_encoder_layers_3_mlp_fc1"
    assert (
        formats.module_key_base("sdxl", te2, "comfyui")
        == "text_encoders.clip_g.transformer.text_model.encoder.layers.3.mlp.fc1"
    )


@pytest.mark.parametrize("arch", formats.ARCHS)
@pytest.mark.parametrize(("src", "dst"), list(itertools.permutations(formats.FORMATS, 2)))
def test_every_conversion_round_trips_exactly(arch, src, dst, tmp_path):
    original = write(random_state(arch, seed=2, dtype=torch.float16), tmp_path / "a.safetensors", src)
    there = formats.convert_file(original, tmp_path / "b.safetensors", dst)
    assert formats.detect_format(load_file(str(there))) == dst
    back = formats.convert_file(there, tmp_path / "c.safetensors", src)
    _same_file(original, back)
    # the effect is the same in every layout
    a, b = formats.read_state(original), formats.read_state(there)
    for key, delta in dense_deltas(a).items():
        assert torch.equal(dense_deltas(b)[key], delta)


def test_trainer_files_convert_through_every_layout(trained_loras, tmp_path):
    for arch, path in trained_loras.items():
        state = formats.read_state(path)
        assert state.arch == arch and state.source_format == "kohya"
        assert any(m.component == "te1" for m in state.modules.values())
        assert any(m.down.dim() == 4 and m.down.shape[-1] == 3 for m in state.modules.values())  # LoCon 3x3
        step = path
        for index, fmt in enumerate(("peft", "comfyui", "kohya")):
            step = formats.convert_file(step, tmp_path / f"{arch}_{index}_{fmt}.safetensors", fmt)
        _same_file(path, step)


def test_other_diffusers_spellings_and_missing_alpha(tmp_path):
    generator = torch.Generator().manual_seed(4)
    tensors = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.randn(
            2, 5, generator=generator
        ),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.randn(
            4, 2, generator=generator
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.down.weight": torch.randn(
            2, 5, generator=generator
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.up.weight": torch.randn(
            4, 2, generator=generator
        ),
        "text_encoder.encoder.layers.1.mlp.fc1.lora_A.weight": torch.randn(
            2, 5, generator=generator
        ),  # transformers 5
        "text_encoder.encoder.layers.1.mlp.fc1.lora_B.weight": torch.randn(4, 2, generator=generator),
    }
    save_file(tensors, str(tmp_path / "d.safetensors"))
    state = formats.read_state(tmp_path / "d.safetensors")
    assert state.source_format == "peft"
    assert ("te1", "text_model.encoder.layers.1.mlp.fc1") in state.modules
    assert all(m.alpha is None and m.scale == 1.0 for m in state.modules.values())
    kohya = formats.state_to_tensors(state, "kohya")
    assert not any(k.endswith(".alpha") for k in kohya)  # missing alpha stays missing (ComfyUI scale 1.0)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight" in kohya


def test_errors_name_the_keys(tmp_path):
    with pytest.raises(LoraFormatError, match="model.weird_key"):
        formats.detect_format(["model.weird_key.weight"])
    with pytest.raises(LoraFormatError, match="mix"):
        formats.detect_format(["lora_unet_x.lora_down.weight", "diffusion_model.x.lora_down.weight"])
    bad = {
        "lora_unet_not_a_layer.lora_down.weight": torch.zeros(1, 2),
        "lora_unet_not_a_layer.lora_up.weight": torch.zeros(2, 1),
    }
    with pytest.raises(LoraFormatError, match="lora_unet_not_a_layer"):
        formats.state_from_tensors(bad)
    half = {"lora_unet_input_blocks_0_0.lora_down.weight": torch.zeros(1, 4, 3, 3)}
    with pytest.raises(LoraFormatError, match="needs both up and down"):
        formats.state_from_tensors(half, arch="sdxl")


def test_comfyui_full_deltas_only_in_comfyui_layout(tmp_path):
    state = random_state("sdxl", seed=5)
    tensors = formats.state_to_tensors(state, "comfyui")
    tensors["diffusion_model.input_blocks.1.0.in_layers.0.diff"] = torch.ones(320)
    tensors["diffusion_model.input_blocks.1.0.in_layers.0.diff_b"] = torch.ones(320)
    back = formats.state_from_tensors(tensors)
    assert len(back.extras) == 2
    again = formats.state_to_tensors(back, "comfyui")
    assert again.keys() == tensors.keys()
    with pytest.raises(LoraFormatError, match="diff"):
        formats.state_to_tensors(back, "kohya")


def test_writing_never_replaces_a_file(tmp_path):
    state = random_state("sd15")
    path = write(state, tmp_path / "x.safetensors")
    with pytest.raises(FileExistsError):
        write(state, path)
    assert formats.unique_path(tmp_path, "x").name == "x_2.safetensors"
    formats.write_state(state, path, "kohya", overwrite=True)
