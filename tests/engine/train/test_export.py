"""LoRA layers (peft) and the kohya-style export: names, shapes, metadata, and what other loaders do with it.

The LoRA weights here are random (not trained) so that every layer, text encoders included, changes
the output; the file must then reproduce exactly the peft model's output when merged back (our own
reader) and when loaded by diffusers' ``load_lora_weights``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from charforge.engine.library.formats import read_lora
from charforge.engine.train.export import (
    export_lora,
    kohya_module_map,
    kohya_name,
    lora_metadata,
    merge_lora,
)
from charforge.engine.train.lora import (
    LoraSettings,
    add_lora,
    text_encoder_target_modules,
    unet_target_modules,
)
from charforge.engine.train.models import PromptEmbeddings, encode_prompts, load_base_model

SETTINGS = LoraSettings(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, train_text_encoder=True)
MINIMUM_SS_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)


pytestmark = pytest.mark.usefixtures("one_thread")  # cf_testing/threads.py


def _unet_output(model, embeds: PromptEmbeddings, unet=None):
    unet = unet or model.unet
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    kwargs = {}
    if model.is_sdxl:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": embeds.pooled,
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    with torch.no_grad():
        return unet(sample, torch.tensor([400]), encoder_hidden_states=embeds.hidden, **kwargs).sample


def _encode(model):
    with torch.no_grad():
        return encode_prompts(model, ["sks person, smiling"])


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def exported(request, tiny_sd15, tiny_sdxl, tmp_path_factory):
    """A model with random LoRA weights on U-Net (+LoCon) and text encoders, its output, and its file."""
    tiny = tiny_sd15 if request.param == "sd15" else tiny_sdxl
    model = load_base_model(tiny.diffusers_dir)
    base_components = copy.deepcopy(model.components())
    base_output = _unet_output(model, _encode(model))
    network = add_lora(model.components(), SETTINGS, seed=7)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    lora_output = _unet_output(model, _encode(model))
    metadata = lora_metadata(
        arch=model.arch,
        settings=SETTINGS,
        title="alice",
        trigger_phrase="sks person",
        resolution=(64, 64),
        training={"learning_rate": 1e-4, "steps": 10},
        tag_frequency={"10_sks person": {"sks person": 1, "smiling": 1}},
    )
    path = export_lora(
        tmp_path_factory.mktemp("lora") / f"{model.arch}.safetensors",
        network,
        model.arch,
        model.unet_config,
        metadata,
        dtype=torch.float32,
    )
    return {
        "tiny": tiny,
        "model": model,
        "network": network,
        "base_components": base_components,
        "base_output": base_output,
        "lora_output": lora_output,
        "path": path,
    }


def test_lora_changes_the_model(exported):
    assert (exported["lora_output"] - exported["base_output"]).abs().max() > 1e-2


def test_every_exported_key_maps_onto_a_module_of_the_base_model(exported):
    """Checked against the single-file checkpoint's own tensors: names and shapes."""
    model, tiny = exported["model"], exported["tiny"]
    tensors, _ = read_lora(exported["path"])
    with safe_open(str(tiny.single_file), "pt") as handle:
        checkpoint = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    sd15 = model.arch == "sd15"
    # The base model's weights by kohya stem: the LDM/SGM file for the U-Net (SDXL's names are LDM ones; SD1.5's
    # are diffusers ones, so they are looked up in the clean diffusers U-Net), CLIP-L from the file.
    unet_sd = exported["base_components"]["unet"].state_dict()
    te2_sd = exported["base_components"].get("text_encoder_2")
    te2_sd = te2_sd.state_dict() if te2_sd is not None else {}
    stems = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors})
    assert len(tensors) == 3 * len(stems)
    for stem in stems:
        down, up = tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"]
        assert tensors[stem + ".alpha"].ndim == 0
        if stem.startswith("lora_unet_"):
            body = stem.removeprefix("lora_unet_")
            if sd15:
                matches = [k for k in unet_sd if k.endswith(".weight") and k[:-7].replace(".", "_") == body]
                shape = tuple(unet_sd[matches[0]].shape) if len(matches) == 1 else None
            else:
                matches = [
                    k
                    for k in checkpoint
                    if k.startswith("model.diffusion_model.")
                    and k.endswith(".weight")
                    and k[len("model.diffusion_model.") : -7].replace(".", "_") == body
                ]
                shape = checkpoint[matches[0]] if len(matches) == 1 else None
        elif stem.startswith(("lora_te_", "lora_te1_")):
            body = stem.split("_", 2)[2]
            prefix = "cond_stage_model.transformer." if sd15 else "conditioner.embedders.0.transformer."
            matches = [
                k
                for k in checkpoint
                if k.startswith(prefix)
                and k.endswith(".weight")
                and k[len(prefix) : -7].replace(".", "_") == body
            ]
            shape = checkpoint[matches[0]] if len(matches) == 1 else None
        else:
            assert stem.startswith("lora_te2_") and not sd15
            body = stem.removeprefix("lora_te2_")
            matches = [k for k in te2_sd if k.endswith(".weight") and k[:-7].replace(".", "_") == body]
            shape = tuple(te2_sd[matches[0]].shape) if len(matches) == 1 else None
        assert shape is not None, f"{stem} matches {len(matches)} base weights"
        assert up.shape[0] == shape[0] and down.shape[1] == shape[1], (stem, down.shape, up.shape, shape)
        assert down.shape[0] == up.shape[1]
        if len(shape) == 4:  # conv: down carries the kernel, up is 1x1
            assert tuple(down.shape[2:]) == shape[2:] and tuple(up.shape[2:]) == (1, 1)
        else:
            assert down.ndim == 2 and up.ndim == 2


def test_key_layout_per_architecture(exported):
    tensors, _ = read_lora(exported["path"])
    keys = set(tensors)
    if exported["model"].arch == "sd15":
        stem = "lora_unet_down_blocks_0_attentions_0_proj_in"  # diffusers path; a 1x1 conv in SD1.5
        assert tensors[stem + ".lora_down.weight"].shape == (4, 32, 1, 1)
        assert tensors[stem + ".lora_up.weight"].shape == (32, 4, 1, 1)
        assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys  # LoCon, 3x3
        assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
        assert not any(k.startswith(("lora_te1_", "lora_te2_")) or "input_blocks" in k for k in keys)
    else:
        stem = "lora_unet_input_blocks_4_1_proj_in"  # LDM path; Linear in SDXL
        assert tensors[stem + ".lora_down.weight"].shape == (4, 64)
        assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k.alpha" in keys
        assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in keys  # upsampler after attention
        assert "lora_te1_text_model_encoder_layers_1_mlp_fc2.lora_down.weight" in keys
        assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight" in keys
        assert not any("down_blocks" in k or k.startswith("lora_te_text") for k in keys)
    assert float(tensors[stem + ".alpha"]) == 2.0


def test_metadata_is_all_strings_with_kohya_and_modelspec_keys(exported):
    _, metadata = read_lora(exported["path"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    for key in MINIMUM_SS_KEYS:
        assert key in metadata, key
    sdxl = exported["model"].arch == "sdxl"
    assert metadata["ss_base_model_version"] == ("sdxl_base_v1-0" if sdxl else "sd_v1")
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert json.loads(metadata["ss_tag_frequency"]) == {"10_sks person": {"sks person": 1, "smiling": 1}}
    assert metadata["ss_learning_rate"] == "0.0001" and metadata["ss_steps"] == "10"
    assert metadata["modelspec.trigger_phrase"] == "sks person"
    assert metadata["modelspec.architecture"] == (
        "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora"
    )
    assert metadata["modelspec.resolution"] == "64x64" and metadata["modelspec.title"] == "alice"
    assert metadata["modelspec.hash_sha256"].startswith("0x") and len(metadata["sshs_model_hash"]) == 64


def test_reloaded_file_reproduces_the_trained_effect(exported):
    """Merging the file into a clean copy of the base model gives the peft model's output."""
    model = exported["model"]
    base = copy.deepcopy(exported["base_components"])
    tensors, _ = read_lora(exported["path"])
    assert merge_lora(base, tensors, model.arch, model.unet_config) == []
    clean = copy.copy(model)
    clean.unet = base["unet"]
    clean.text_encoders = [base["text_encoder"]] + ([base["text_encoder_2"]] if model.is_sdxl else [])
    merged = _unet_output(clean, _encode(clean))
    torch.testing.assert_close(merged, exported["lora_output"], rtol=1e-4, atol=1e-5)


def test_diffusers_load_lora_weights_loads_every_key_and_matches(exported):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model = exported["model"]
    cls = StableDiffusionXLPipeline if model.is_sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(exported["tiny"].diffusers_dir, local_files_only=True)
    pipe.load_lora_weights(str(exported["path"]))
    loaded = copy.copy(model)
    loaded.unet = pipe.unet
    loaded.text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if model.is_sdxl else [])
    output = _unet_output(loaded, _encode(loaded))
    assert (output - exported["base_output"]).abs().max() > 1e-2
    torch.testing.assert_close(output, exported["lora_output"], rtol=1e-4, atol=1e-5)


def test_module_map_covers_every_adapted_layer(exported):
    model = exported["model"]
    modules = kohya_module_map(exported["base_components"], model.arch, model.unet_config)
    tensors, _ = read_lora(exported["path"])
    stems = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_down." in k}
    assert stems <= set(modules)


# --------------------------------------------------------------------------------------------------
# Target sets and names at full size (meta device: no memory)


@pytest.fixture(scope="module")
def full_unets():
    from diffusers import UNet2DConditionModel

    from charforge.engine.train.models import shipped_config_dir

    out = {}
    for arch in ("sd15", "sdxl"):
        with torch.device("meta"):
            out[arch] = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(shipped_config_dir(arch) / "unet")
            )
    return out


def test_kohya_target_set_matches_the_reference_counts(full_unets):
    """docs/model-configs.md §9.1: 722 kohya layers on SDXL (560 attention-only); 85.1 M / 46.5 M at rank 32."""
    sdxl = full_unets["sdxl"]
    wide = unet_target_modules(sdxl, "kohya")
    attention = unet_target_modules(sdxl, "attention")
    assert (len(wide), len(attention)) == (722, 560)
    assert set(attention) < set(wide)
    for name in wide:
        leaf = (
            name.split(".transformer_blocks.")[-1]
            if ".transformer_blocks." in name
            else name.rsplit(".", 1)[-1]
        )
        assert leaf.endswith(
            ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
        )

    def lora_params(unet, names, rank):
        total = 0
        for name in names:
            layer = unet.get_submodule(name)
            fan_in = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels
            fan_out = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
            total += rank * (fan_in + fan_out)
        return total

    assert lora_params(sdxl, wide, 32) / 1e6 == pytest.approx(85.1, abs=0.06)
    assert lora_params(sdxl, attention, 32) / 1e6 == pytest.approx(46.5, abs=0.06)
    sd15 = full_unets["sd15"]
    assert lora_params(sd15, unet_target_modules(sd15, "kohya"), 16) / 1e6 == pytest.approx(6.8, abs=0.06)
    conv = unet_target_modules(sdxl, "kohya", conv=True)
    assert "down_blocks.0.resnets.1.conv2" in conv and "up_blocks.0.upsamplers.0.conv" in conv


@pytest.mark.parametrize(
    ("component", "module", "expected"),
    [
        # The worked examples of docs/comfyui-contract.md §6 (SDXL).
        (
            "unet",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        ),
        (
            "unet",
            "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0",
            "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_out_0",
        ),
        ("unet", "down_blocks.0.resnets.1.conv2", "lora_unet_input_blocks_2_0_out_layers_3"),
        (
            "text_encoder_2",
            "text_model.encoder.layers.31.mlp.fc2",
            "lora_te2_text_model_encoder_layers_31_mlp_fc2",
        ),
        (
            "text_encoder",
            "encoder.layers.3.self_attn.q_proj",
            "lora_te1_text_model_encoder_layers_3_self_attn_q_proj",
        ),
    ],
)
def test_sdxl_names_follow_the_reference(full_unets, component, module, expected):
    assert kohya_name(component, module, "sdxl", dict(full_unets["sdxl"].config)) == expected


def test_sd15_names_keep_diffusers_paths(full_unets):
    config = dict(full_unets["sd15"].config)
    assert (
        kohya_name("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "sd15", config)
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert (
        kohya_name("text_encoder", "encoder.layers.0.mlp.fc1", "sd15", config)
        == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    )


def test_text_encoder_targets_are_the_six_linears_per_layer(tiny_sdxl):
    model = load_base_model(tiny_sdxl.diffusers_dir)
    for te in model.text_encoders:
        names = text_encoder_target_modules(te)
        assert len(names) == 6 * te.config.num_hidden_layers
        assert all(n.rsplit(".", 2)[-2] in ("self_attn", "mlp") for n in names)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="targets"):
        LoraSettings(targets="everything")
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)
