"""Inspection: what our trainer writes, and hand-made files in each layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cf_testing.lora_files import TRAINED_SETTINGS, TRAINED_TAGS, random_state, write
from charforge.engine.library import formats
from charforge.engine.library import inspect as lora_inspect


@pytest.mark.parametrize("arch", formats.ARCHS)
def test_reads_what_our_trainer_writes(trained_loras, arch):  # noqa: F811 - fixture
    info = lora_inspect.inspect_lora(trained_loras[arch])
    assert info.format == "kohya"
    assert (info.base_model, info.base_model_from) == (arch, "metadata")
    assert info.trigger_words == ["sks person"]
    assert info.title == f"alice-{arch}"
    # rank 4 (alpha 2) for linears, rank 2 (alpha 1) for the LoCon 3x3 convs
    assert set(info.ranks) == {"4", "2"}
    assert info.alphas == [1.0, 2.0]
    assert info.conv_modules > 0 and info.ranks["2"] > 0
    assert info.modules_per_component["te1"] > 0
    assert ("te2" in info.modules_per_component) == (arch == "sdxl")
    assert info.training["learning_rate"] == "0.0001" and info.training["optimizer"] == "AdamW"
    assert info.training["network_dim"] == str(TRAINED_SETTINGS["rank"])
    tags = dict(info.tag_frequency)
    assert tags == TRAINED_TAGS["10_sks person"] and info.tag_frequency[0][0] == "sks person"
    # tiny test models: the names fit, the shapes are no full-size model's
    assert info.fits == []
    assert any("shapes match no full-size model" in n for n in info.notes)
    text = info.summary()
    assert "sks person" in text and "kohya" in text
    json.dumps(info.to_dict())


@pytest.mark.parametrize("arch", formats.ARCHS)
@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_hand_made_full_size_file_in_each_layout(tmp_path, arch, fmt):
    state = random_state(arch, seed=3, rank=2, alpha=1.0, every=211, full_size=True, dtype=torch.float16)
    state.metadata = {}
    path = write(state, tmp_path / f"{fmt}.safetensors", fmt)
    info = lora_inspect.inspect_lora(path)
    assert info.format == fmt
    assert info.base_model == arch and info.base_model_from in ("shapes", "keys")
    assert info.fits == [arch]
    assert info.ranks == {"2": len(state.modules)}
    assert info.alphas == [1.0]
    assert info.trigger_words == []
    assert info.dtypes == ["F16"]


def test_metadata_fallbacks_for_trigger_words(tmp_path):
    tensors = formats.state_to_tensors(random_state("sd15", every=97), "kohya")
    freq = {"5_ohwx": {"ohwx": 12, "smile": 3}, "3_ohwx": {"ohwx": 6, "hat": 5}}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"ss_tag_frequency": json.dumps(freq)})
    info = lora_inspect.inspect_lora(tmp_path / "a.safetensors")
    assert info.trigger_words == ["ohwx"]
    assert info.tag_frequency[:2] == [("ohwx", 18), ("hat", 5)]
    save_file(
        tensors, str(tmp_path / "b.safetensors"), metadata={"ss_training_comment": "trigger: zk man, zk"}
    )
    assert lora_inspect.inspect_lora(tmp_path / "b.safetensors").trigger_words == ["zk man", "zk"]


def test_bf16_alpha_and_no_alpha(tmp_path):
    state = random_state("sdxl", every=97, dtype=torch.bfloat16, alpha=3.0)
    info = lora_inspect.inspect_lora(write(state, tmp_path / "bf.safetensors"))
    assert info.alphas == [3.0]
    no_alpha = random_state("sdxl", every=97, alpha=None)
    info = lora_inspect.inspect_lora(write(no_alpha, tmp_path / "na.safetensors", "peft"))
    assert info.alphas == [] and any("no .alpha" in n for n in info.notes)


def test_without_torch_the_names_decide(tmp_path, monkeypatch):
    path = write(random_state("sdxl", every=97), tmp_path / "x.safetensors", "comfyui")

    def no_torch(arch):
        raise ImportError("No module named 'torch'")

    monkeypatch.setattr(lora_inspect, "module_table", no_torch)
    info = lora_inspect.inspect_lora(path)
    assert info.base_model == "sdxl" and info.fit_checks == []
    assert any("not installed" in n for n in info.notes)


def test_not_a_lora(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}abc")
    with pytest.raises(formats.LoraFormatError):
        lora_inspect.inspect_lora(tmp_path / "junk.safetensors")
    save_file({"model.diffusion_model.x.weight": torch.zeros(2)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(formats.LoraFormatError, match="no known LoRA layout"):
        lora_inspect.inspect_lora(tmp_path / "ckpt.safetensors")
    with pytest.raises(FileNotFoundError):
        lora_inspect.inspect_lora(tmp_path / "missing.safetensors")


def test_other_architectures_are_described_not_rejected(tmp_path):
    tensors = {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(2, 8),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(24, 2),
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_down.weight": torch.zeros(
            2, 8
        ),
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight": torch.zeros(
            8, 2
        ),
    }
    save_file(tensors, str(tmp_path / "flux.safetensors"))
    info = lora_inspect.inspect_lora(tmp_path / "flux.safetensors")
    # A Flux LoRA (named by its keys) for a toy-width model, with a T5 module no Flux layer table holds.
    assert info.format == "comfyui" and info.fits == [] and info.base_model == "flux"
    assert info.ranks == {"2": 2}
    assert any("1 module(s) match no Flux.1 layer: text_encoders.t5xxl" in n for n in info.notes)
