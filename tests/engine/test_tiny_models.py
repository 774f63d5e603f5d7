"""Tiny test models and the diffusers -> single-file (LDM / SGM) writer.

The writer is proven right by diffusers' own single-file loader: it must read our file back into
identical tensors. Key names are also spot-checked against the real layout, and (opt-in, COMFYUI_DIR set)
against a real ComfyUI's model detection and checkpoint loader.

(Over 600 lines on purpose: it mirrors the one module it tests, cf_testing.models, whose builders and writer
every other test relies on.)
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cf_testing.models import (
    CLIP_L,
    SD15_VAE,
    TINY_VOCAB_SIZE,
    build_tiny_sd15,
    write_tiny_clip_tokenizer,
)
from cf_testing.real_comfyui import comfyui_dir, comfyui_python
from charforge.engine.models.single_file import (
    UnexpectedKeysError,
    clip_to_ldm,
    clip_to_open_clip,
    load_component_state_dict,
    pipeline_to_single_file_state_dict,
    save_single_file,
    unet_module_names,
    unet_to_ldm,
    vae_to_ldm,
)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# Full-size configs (docs/model-configs.md §1-§4), built on the meta device only.
SD15_UNET_FULL = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "sample_size": 64,
}
SDXL_UNET_FULL = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "sample_size": 128,
}
CLIP_G = {
    **CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def _pipeline_class(tiny):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if tiny.is_sdxl else StableDiffusionPipeline


@pytest.fixture(scope="module")
def loaded(tiny_sd15, tiny_sdxl):
    """Each tiny model loaded twice: from its diffusers folder and from its single file."""
    out = {}
    for tiny in (tiny_sd15, tiny_sdxl):
        cls = _pipeline_class(tiny)
        folder = cls.from_pretrained(tiny.diffusers_dir, local_files_only=True)
        single = cls.from_single_file(
            str(tiny.single_file), config=str(tiny.diffusers_dir), local_files_only=True
        )
        out[tiny.kind] = (tiny, folder, single)
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer


def test_tiny_tokenizer_loads_offline_and_matches_text_encoders(tmp_path, tiny_sd15, tiny_sdxl):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(tmp_path / "tok")))
    assert len(tokenizer) == TINY_VOCAB_SIZE
    assert tokenizer.model_max_length == 77
    ids = tokenizer("A photo of SKS person, 2 things!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:5] == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>"]
    end = tokens.index("<|endoftext|>")
    assert tokens[end:] == ["<|endoftext|>"] * (77 - end)  # CLIP-L pads with the end token
    assert tokenizer.eos_token_id == TINY_VOCAB_SIZE - 1  # highest id: legacy argmax pooling finds it

    for tiny in (tiny_sd15, tiny_sdxl):
        assert tiny.text_encoder_config["vocab_size"] == TINY_VOCAB_SIZE
        assert tiny.text_encoder_config["max_position_embeddings"] == 77
        assert sorted(p.name for p in (tiny.diffusers_dir / "tokenizer").iterdir()) == [
            "merges.txt",
            "special_tokens_map.json",
            "tokenizer_config.json",
            "vocab.json",
        ]

    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tiny_sdxl.diffusers_dir / "tokenizer_2"))
    assert tokenizer_2.pad_token == "!" and tokenizer_2.pad_token_id == 0
    assert tokenizer_2("hi", padding="max_length", max_length=6).input_ids[-2:] == [0, 0]


# --------------------------------------------------------------------------------------------------
# Diffusers folders


def test_tiny_sd15_folder_runs_forward(loaded):
    tiny, pipe, _ = loaded["sd15"]
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    with torch.no_grad():
        ids = pipe.tokenizer(
            "a photo of sks person", padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        hidden = pipe.text_encoder(ids).last_hidden_state
        assert hidden.shape == (1, 77, 32)

        sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        noise_pred = pipe.unet(sample, torch.tensor([500]), encoder_hidden_states=hidden).sample
        assert noise_pred.shape == sample.shape and torch.isfinite(noise_pred).all()

        image = torch.rand(1, 3, 64, 64) * 2 - 1
        latents = pipe.vae.encode(image).latent_dist.mean
        assert latents.shape == (1, 4, 8, 8)  # 8x spatial factor, 4 latent channels
        assert pipe.vae.decode(latents).sample.shape == image.shape
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)


def test_tiny_sdxl_folder_runs_forward(loaded):
    tiny, pipe, _ = loaded["sdxl"]
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "leading"
    with torch.no_grad():
        prompt = "a photo of sks person"
        ids_1 = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        ids_2 = pipe.tokenizer_2(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        out_1 = pipe.text_encoder(ids_1, output_hidden_states=True)
        out_2 = pipe.text_encoder_2(ids_2, output_hidden_states=True)
        context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # as SDXL conditions
        assert context.shape == (1, 77, tiny.unet_config["cross_attention_dim"])
        text_embeds = out_2.text_embeds
        assert text_embeds.shape == (1, tiny.text_encoder_2_config["projection_dim"])

        sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])
        noise_pred = pipe.unet(
            sample,
            torch.tensor([500]),
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
        ).sample
        assert noise_pred.shape == sample.shape and torch.isfinite(noise_pred).all()

        latents = pipe.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        assert latents.shape == (1, 4, 8, 8)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025) and pipe.vae.config.force_upcast


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_pipeline_generates_latents_end_to_end(loaded, kind):
    _, pipe, _ = loaded[kind]
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a photo of sks person",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 4, 8, 8) and torch.isfinite(out.images).all()


def test_tiny_builds_are_deterministic(tmp_path, tiny_sd15):
    again = build_tiny_sd15(tmp_path)

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(again.single_file) == digest(tiny_sd15.single_file)


# --------------------------------------------------------------------------------------------------
# Single file: diffusers reads ours back into identical tensors


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_single_file_round_trips_through_diffusers(loaded, kind):
    tiny, folder, single = loaded[kind]
    with safe_open(str(tiny.single_file), "pt") as handle:
        file_keys = set(handle.keys())
    expected_count = 0
    for name in COMPONENTS:
        if not hasattr(folder, name) or getattr(folder, name) is None:
            continue
        original = getattr(folder, name).state_dict()
        restored = getattr(single, name).state_dict()
        assert set(restored) == set(original), name
        for key, tensor in original.items():
            assert tensor.dtype == torch.float32
            assert torch.equal(restored[key], tensor), f"{name}: {key} differs after the round trip"
        expected_count += len(original)
        if name == "text_encoder_2":  # per layer, q/k/v weights and biases become in_proj_weight / _bias
            expected_count -= 4 * tiny.text_encoder_2_config["num_hidden_layers"]
    assert len(file_keys) == expected_count  # one file key per tensor: nothing extra, nothing lost
    assert type(single.scheduler) is type(folder.scheduler)


def test_single_file_key_names_follow_ldm_layout(tiny_sd15):
    sd = load_file(str(tiny_sd15.single_file))
    unet = "model.diffusion_model."
    expected_shapes = {
        unet + "input_blocks.0.0.weight": (32, 4, 3, 3),
        unet + "time_embed.0.weight": (128, 32),
        unet + "time_embed.2.weight": (128, 128),
        unet + "input_blocks.1.0.in_layers.0.weight": (32,),
        unet + "input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
        unet + "input_blocks.1.0.emb_layers.1.weight": (32, 128),
        unet + "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
        unet + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (32, 32),
        unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 32),
        unet + "input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),  # SD1.5: conv projection
        unet + "input_blocks.3.0.op.weight": (32, 32, 3, 3),  # level 0 downsampler
        unet + "input_blocks.4.0.skip_connection.weight": (64, 32, 1, 1),
        unet + "input_blocks.11.0.out_layers.3.weight": (64, 64, 3, 3),  # last level, no attention
        unet + "middle_block.0.in_layers.2.weight": (64, 64, 3, 3),
        unet + "middle_block.1.proj_out.weight": (64, 64, 1, 1),
        unet + "middle_block.2.out_layers.3.weight": (64, 64, 3, 3),
        unet + "output_blocks.2.1.conv.weight": (64, 64, 3, 3),  # upsampler of a level without attention
        unet + "output_blocks.5.2.conv.weight": (64, 64, 3, 3),  # ... and of a level with attention
        unet + "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": (32, 128),
        unet + "out.0.weight": (32,),
        unet + "out.2.weight": (4, 32, 3, 3),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
        "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight": (64, 32, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (64, 64, 1, 1),  # Linear -> 1x1 conv
        "first_stage_model.encoder.mid.attn_1.proj_out.weight": (64, 64, 1, 1),
        "first_stage_model.encoder.mid.attn_1.norm.weight": (64,),
        "first_stage_model.encoder.norm_out.weight": (64,),
        "first_stage_model.decoder.up.0.block.0.conv1.weight": (32, 32, 3, 3),  # last diffusers up block
        "first_stage_model.decoder.up.3.block.0.conv1.weight": (64, 64, 3, 3),  # first diffusers up block
        "first_stage_model.decoder.up.3.upsample.conv.weight": (64, 64, 3, 3),
        "first_stage_model.decoder.mid.block_2.conv2.weight": (64, 64, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (TINY_VOCAB_SIZE, 32),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 32),
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight": (32, 32),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (32,),
    }
    for key, shape in expected_shapes.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape))
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in sd
    assert not [k for k in sd if "label_emb" in k or k.startswith("conditioner.")]
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    with safe_open(str(tiny_sd15.single_file), "pt") as handle:
        assert handle.metadata() == {"charforge.test_model": "tiny_sd15"}


def test_single_file_key_names_follow_sgm_layout(tiny_sdxl):
    sd = load_file(str(tiny_sdxl.single_file))
    te2 = load_component_state_dict(tiny_sdxl.diffusers_dir / "text_encoder_2")
    unet = "model.diffusion_model."
    g = "conditioner.embedders.1.model."
    expected_shapes = {
        unet + "label_emb.0.0.weight": (128, 80),
        unet + "label_emb.0.2.weight": (128, 128),
        unet + "input_blocks.3.0.op.weight": (32, 32, 3, 3),  # level 0 has no attention
        unet + "input_blocks.4.1.proj_in.weight": (64, 64),  # SDXL: Linear projection
        unet + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (64, 96),
        unet + "input_blocks.8.1.transformer_blocks.1.attn1.to_q.weight": (128, 128),
        unet + "middle_block.1.transformer_blocks.1.ff.net.0.proj.weight": (1024, 128),
        unet + "output_blocks.2.2.conv.weight": (128, 128, 3, 3),  # upsampler after attention
        unet + "output_blocks.5.2.conv.weight": (64, 64, 3, 3),
        unet + "output_blocks.8.0.skip_connection.weight": (32, 64, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (32, 32),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 32),
        g + "token_embedding.weight": (TINY_VOCAB_SIZE, 64),
        g + "positional_embedding": (77, 64),
        g + "transformer.resblocks.0.attn.in_proj_weight": (192, 64),
        g + "transformer.resblocks.0.attn.in_proj_bias": (192,),
        g + "transformer.resblocks.1.attn.out_proj.weight": (64, 64),
        g + "transformer.resblocks.1.ln_1.weight": (64,),
        g + "transformer.resblocks.1.ln_2.bias": (64,),
        g + "transformer.resblocks.1.mlp.c_fc.weight": (128, 64),
        g + "transformer.resblocks.1.mlp.c_proj.weight": (64, 128),
        g + "ln_final.weight": (64,),
        g + "text_projection": (64, 32),
        "first_stage_model.decoder.up.0.block.0.conv1.weight": (32, 32, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape))
    assert not [
        k for k in sd if "transformer.resblocks.0.attn.q_proj" in k or k.startswith("cond_stage_model.")
    ]

    prefix = "" if "embeddings.token_embedding.weight" in te2 else "text_model."
    layer = f"{prefix}encoder.layers.0.self_attn."
    stacked = torch.cat(
        [te2[layer + "q_proj.weight"], te2[layer + "k_proj.weight"], te2[layer + "v_proj.weight"]]
    )
    assert torch.equal(sd[g + "transformer.resblocks.0.attn.in_proj_weight"], stacked)
    assert torch.equal(sd[g + "text_projection"], te2["text_projection.weight"].t())


def test_unet_module_names_for_the_real_configs():
    sd15 = unet_module_names(SD15_UNET_FULL)
    assert sd15["down_blocks.0.attentions.1"] == "input_blocks.2.1"
    assert sd15["down_blocks.1.attentions.0"] == "input_blocks.4.1"
    assert sd15["down_blocks.2.downsamplers.0.conv"] == "input_blocks.9.0.op"
    assert sd15["down_blocks.3.resnets.1"] == "input_blocks.11.0"
    assert sd15["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert sd15["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert sd15["up_blocks.3.attentions.2"] == "output_blocks.11.1"
    assert "up_blocks.3.upsamplers.0.conv" not in sd15

    sdxl = unet_module_names(SDXL_UNET_FULL)
    assert sdxl["down_blocks.1.attentions.0"] == "input_blocks.4.1"
    assert sdxl["down_blocks.2.attentions.1"] == "input_blocks.8.1"
    assert sdxl["up_blocks.0.attentions.2"] == "output_blocks.2.1"
    assert sdxl["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert sdxl["up_blocks.2.resnets.2"] == "output_blocks.8.0"
    assert max(int(v.split(".")[1]) for v in sdxl.values() if v.startswith("input_blocks")) == 8


def _full_size_single_file_shapes() -> dict[str, dict[str, list[int]]]:
    """Key -> shape of full-size SD1.5 and SDXL checkpoints written by our mapping (meta tensors, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = {}
    with torch.device("meta"):
        vae = AutoencoderKL(**SD15_VAE).state_dict()
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L)).state_dict()
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)).state_dict()
        for kind, config, te2 in (("sd15", SD15_UNET_FULL, None), ("sdxl", SDXL_UNET_FULL, clip_g)):
            unet = UNet2DConditionModel(**config)
            sd = pipeline_to_single_file_state_dict(
                unet.state_dict(), vae, clip_l, te2, unet_config=dict(unet.config)
            )
            out[kind] = {key: list(tensor.shape) for key, tensor in sd.items()}
    return out


def test_full_size_layouts_have_the_real_parameter_counts():
    shapes = _full_size_single_file_shapes()

    def params(kind, prefix=""):
        return sum(torch.Size(s).numel() for k, s in shapes[kind].items() if k.startswith(prefix))

    # docs/model-configs.md §9.1
    assert params("sd15", "model.diffusion_model.") == 859_520_964
    assert params("sdxl", "model.diffusion_model.") == 2_567_463_684
    assert params("sd15", "first_stage_model.") == 83_653_863
    assert params("sdxl", "conditioner.embedders.1.model.") == pytest.approx(694.66e6, abs=0.01e6)
    assert len(shapes["sd15"]) == 1130 and len(shapes["sdxl"]) == 2513


# --------------------------------------------------------------------------------------------------
# Errors


def test_unexpected_keys_are_named(tiny_sd15):
    unet_sd = load_component_state_dict(tiny_sd15.diffusers_dir / "unet")
    extra = {
        **unet_sd,
        "time_embedding.cond_proj.weight": torch.zeros(1),
        "down_blocks.0.resnets.0.mystery.weight": torch.zeros(1),
    }
    with pytest.raises(UnexpectedKeysError) as info:
        unet_to_ldm(extra, tiny_sd15.unet_config)
    assert info.value.component == "unet"
    assert info.value.keys == ["down_blocks.0.resnets.0.mystery.weight", "time_embedding.cond_proj.weight"]
    assert "time_embedding.cond_proj.weight" in str(info.value)

    vae_sd = load_component_state_dict(tiny_sd15.diffusers_dir / "vae")
    with pytest.raises(
        UnexpectedKeysError, match=r"vae: 1 key.*decoder\.mid_block\.resnets\.2\.conv1\.weight"
    ):
        vae_to_ldm({**vae_sd, "decoder.mid_block.resnets.2.conv1.weight": torch.zeros(1)})

    te_sd = load_component_state_dict(tiny_sd15.diffusers_dir / "text_encoder")
    with pytest.raises(UnexpectedKeysError, match="text_encoder: 1 key.*logit_scale"):
        clip_to_ldm({**te_sd, "logit_scale": torch.zeros(())})
    with pytest.raises(UnexpectedKeysError, match="text_encoder_2: 1 key.*vision_model"):
        clip_to_open_clip({**te_sd, "vision_model.post_layernorm.weight": torch.zeros(1)})

    bad_config = {**tiny_sd15.unet_config, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        unet_to_ldm(unet_sd, bad_config)


def test_wrong_component_sets_are_refused(tiny_sd15, tiny_sdxl, tmp_path):
    sd15 = {
        name: load_component_state_dict(tiny_sd15.diffusers_dir / name)
        for name in ("unet", "vae", "text_encoder")
    }
    te2 = load_component_state_dict(tiny_sdxl.diffusers_dir / "text_encoder_2")
    with pytest.raises(ValueError, match="must not get one"):
        pipeline_to_single_file_state_dict(
            sd15["unet"], sd15["vae"], sd15["text_encoder"], te2, unet_config=tiny_sd15.unet_config
        )

    sdxl_unet = load_component_state_dict(tiny_sdxl.diffusers_dir / "unet")
    with pytest.raises(ValueError, match="text_encoder_2=missing"):
        pipeline_to_single_file_state_dict(
            sdxl_unet, sd15["vae"], sd15["text_encoder"], unet_config=tiny_sdxl.unet_config
        )

    te2_missing_k = {k: v for k, v in te2.items() if "layers.1.self_attn.k_proj.weight" not in k}
    with pytest.raises(ValueError, match="layer 1 has no k_proj.weight"):
        clip_to_open_clip(te2_missing_k)

    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        save_single_file(tmp_path, tmp_path / "out.safetensors")


def test_text_encoder_keys_with_or_without_text_model_prefix(tiny_sd15):
    te_sd = load_component_state_dict(tiny_sd15.diffusers_dir / "text_encoder")
    bare = {k.removeprefix("text_model."): v for k, v in te_sd.items()}
    prefixed = {"text_model." + k: v for k, v in bare.items()}
    with_buffer = {**prefixed, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    assert clip_to_ldm(bare).keys() == clip_to_ldm(prefixed).keys() == clip_to_ldm(with_buffer).keys()
    assert all(k.startswith("text_model.") for k in clip_to_ldm(bare))


def test_save_single_file_casts_and_writes_metadata(tiny_sdxl, tmp_path):
    out = save_single_file(
        tiny_sdxl.diffusers_dir,
        tmp_path / "nested" / "xl.safetensors",
        dtype="fp16",
        metadata={"modelspec.title": "tiny"},
    )
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata() == {"modelspec.title": "tiny"}
        keys = handle.keys()
        assert {handle.get_tensor(k).dtype for k in keys} == {torch.float16}
    with pytest.raises(TypeError, match="str to str"):
        save_single_file(tiny_sdxl.diffusers_dir, tmp_path / "x.safetensors", metadata={"steps": 3})
    with pytest.raises(ValueError, match="unknown dtype"):
        save_single_file(tiny_sdxl.diffusers_dir, tmp_path / "x.safetensors", dtype="int3")


# --------------------------------------------------------------------------------------------------
# Full-width SD1.5 checkpoint for ComfyUI


@pytest.mark.slow
def test_sd15_comfy_checkpoint_has_what_comfyui_detects(sd15_comfy_checkpoint):
    ckpt = sd15_comfy_checkpoint
    unet = "model.diffusion_model."
    with safe_open(str(ckpt.path), "pt") as handle:
        keys = set(handle.keys())
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
        assert {handle.get_slice(k).get_dtype() for k in keys} == {"F16"}
    # What ComfyUI reads (docs/model-configs.md §10.3): model_channels 320, context 768, conv proj_in, no label_emb.
    assert shapes[unet + "input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert shapes[unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert len(shapes[unet + "input_blocks.1.1.proj_in.weight"]) == 4
    assert not [k for k in keys if "label_emb" in k or "temporal" in k]
    # ComfyUI builds the VAE and CLIP-L at full size: every tensor of the real ones is there.
    full = _full_size_single_file_shapes()["sd15"]
    for key, shape in full.items():
        if key.startswith(("first_stage_model.", "cond_stage_model.")):
            assert shapes.get(key) == tuple(shape), key
    assert ckpt.size_bytes < 600e6


# --------------------------------------------------------------------------------------------------
# Opt-in: a real ComfyUI (COMFYUI_DIR set)

_COMFY_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, ".")
    sys.argv = [sys.argv[0], "--cpu"]
    request = json.loads(sys.stdin.read())
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.model_detection
    import comfy.sd

    report = {"detected": {}, "loaded": {}}
    for kind, shapes in request.get("shapes", {}).items():
        sd = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
        config = comfy.model_detection.model_config_from_unet(sd, comfy.model_detection.unet_prefix_from_state_dict(sd))
        report["detected"][kind] = type(config).__name__ if config is not None else None
    for path in request.get("checkpoints", []):
        try:
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
                path, output_vae=True, output_clip=True, embedding_directory=None)
        except Exception as exc:
            report["loaded"][path] = {"error": str(exc)}
            continue
        cond = clip.encode_from_tokens(clip.tokenize("a photo of sks person")) if clip is not None else None
        report["loaded"][path] = {
            "model_config": type(model.model.model_config).__name__,
            "model_channels": model.model.model_config.unet_config["model_channels"],
            "clip": clip is not None,
            "vae": vae is not None,
            "cond_shape": list(cond.shape) if cond is not None else None,
            "cond_finite": bool(torch.isfinite(cond).all()) if cond is not None else None,
        }
    print("REPORT " + json.dumps(report))
""")


def _run_real_comfyui(request: dict) -> dict:
    comfy = comfyui_dir()
    assert (comfy / "main.py").exists(), f"COMFYUI_DIR={comfy} has no main.py"
    result = subprocess.run(
        [comfyui_python(comfy), "-c", _COMFY_SCRIPT],
        input=json.dumps(request),
        cwd=comfy,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT ") :])


@pytest.mark.comfyui
@pytest.mark.skipif(comfyui_dir() is None, reason="set COMFYUI_DIR (and optionally COMFYUI_PYTHON)")
def test_real_comfyui_detects_full_size_layouts():
    report = _run_real_comfyui({"shapes": _full_size_single_file_shapes()})
    assert report["detected"] == {"sd15": "SD15", "sdxl": "SDXL"}


@pytest.mark.slow
@pytest.mark.comfyui
@pytest.mark.skipif(comfyui_dir() is None, reason="set COMFYUI_DIR (and optionally COMFYUI_PYTHON)")
def test_real_comfyui_loads_the_sd15_checkpoint_and_rejects_tiny_ones(
    sd15_comfy_checkpoint, tiny_sd15, tiny_sdxl
):
    paths = [str(sd15_comfy_checkpoint.path), str(tiny_sd15.single_file), str(tiny_sdxl.single_file)]
    loaded = _run_real_comfyui({"checkpoints": paths})["loaded"]
    assert loaded[paths[0]] == {
        "model_config": "SD15",
        "model_channels": 320,
        "clip": True,
        "vae": True,
        "cond_shape": [1, 77, 768],
        "cond_finite": True,
    }
    for tiny in paths[1:]:
        assert "Could not detect model type" in loaded[tiny]["error"]


def test_component_weights_in_every_file_layout(tmp_path):
    from safetensors.torch import save_file

    a, b = {"a.weight": torch.ones(2)}, {"b.weight": torch.zeros(3)}
    variant_only = tmp_path / "variant_only"
    variant_only.mkdir()
    save_file(a, str(variant_only / "model.fp16.safetensors"))
    assert load_component_state_dict(variant_only).keys() == {"a.weight"}

    both = tmp_path / "both"
    both.mkdir()
    save_file(a, str(both / "diffusion_pytorch_model.safetensors"))
    save_file(b, str(both / "diffusion_pytorch_model.fp16.safetensors"))
    assert load_component_state_dict(both).keys() == {"a.weight"}  # the plain file wins

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file(a, str(sharded / "model-00001-of-00002.safetensors"))
    save_file(b, str(sharded / "model-00002-of-00002.safetensors"))
    index = {
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
        }
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load_component_state_dict(sharded).keys() == {"a.weight", "b.weight"}

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(b, pickled / "pytorch_model.bin")
    assert load_component_state_dict(pickled).keys() == {"b.weight"}

    with pytest.raises(FileNotFoundError, match="no weights"):
        load_component_state_dict(tmp_path)
