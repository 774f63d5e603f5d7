"""Loading base models for training: shipped configs, architecture detection, offline loading, prompts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cf_testing.models import write_tiny_clip_tokenizer
from charforge.engine.train.models import (
    MissingTokenizerError,
    UnsupportedModelError,
    detect_arch,
    encode_prompts,
    find_tokenizer_dir,
    fingerprint,
    load_base_model,
    shipped_config_dir,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # cf_testing/threads.py


def _tokenizer_dir(tiny):
    return tiny.diffusers_dir / "tokenizer"


# --------------------------------------------------------------------------------------------------
# Shipped configs: the real SD1.5 / SDXL architectures (published parameter counts)


@pytest.mark.parametrize(
    ("arch", "unet", "vae", "text_encoders"),
    [
        ("sd15", 859_520_964, 83_653_863, [123_060_480]),
        ("sdxl", 2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
    ],
)
def test_shipped_configs_build_the_published_models(arch, unet, vae, text_encoders):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = shipped_config_dir(arch)
    index = json.loads((folder / "model_index.json").read_text())
    assert (
        index["_class_name"] == {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[arch]
    )
    with torch.device("meta"):
        built_unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        built_vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if arch == "sdxl":
            encoders.append(
                CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
            )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(built_unet) == unet
    assert count(built_vae) == vae
    assert [count(te) for te in encoders] == text_encoders
    # No vocabulary is shipped (ComfyUI has it), only the tokenizer settings.
    assert not list(folder.rglob("vocab.json")) and not list(folder.rglob("*.safetensors"))
    if arch == "sdxl":
        assert json.loads((folder / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"


# --------------------------------------------------------------------------------------------------
# Architecture detection


def test_detect_arch_of_single_files_and_folders(tiny_sd15, tiny_sdxl):
    assert detect_arch(tiny_sd15.single_file) == "sd15"
    assert detect_arch(tiny_sdxl.single_file) == "sdxl"
    assert detect_arch(tiny_sd15.diffusers_dir) == "sd15"
    assert detect_arch(tiny_sdxl.diffusers_dir) == "sdxl"


def _fake_file(path, keys):
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, "diffusion model only"),
        (
            {"model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3), "first_stage_model.x": (1,)},
            "inpainting",
        ),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
                "first_stage_model.x": (1,),
                "cond_stage_model.model.ln_final.weight": (4,),
            },
            "SD2",
        ),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
                "first_stage_model.x": (1,),
                "model.diffusion_model.label_emb.0.0.weight": (8, 2560),
                "conditioner.embedders.0.model.x": (1,),
            },
            "refiner",
        ),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "Flux"),
    ],
)
def test_unsupported_files_are_refused_with_the_reason(tmp_path, keys, message):
    path = _fake_file(tmp_path / "model.safetensors", keys)
    with pytest.raises(UnsupportedModelError, match=message):
        detect_arch(path)


def test_detect_arch_of_missing_or_foreign_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        detect_arch(tmp_path / "nope.safetensors")
    with pytest.raises(UnsupportedModelError, match="model_index.json"):
        detect_arch(tmp_path)


# --------------------------------------------------------------------------------------------------
# Loading offline


def test_single_file_and_folder_load_the_same_weights(tiny_sd15):
    single = load_base_model(
        tiny_sd15.single_file, config_dir=tiny_sd15.diffusers_dir, tokenizer_dir=_tokenizer_dir(tiny_sd15)
    )
    folder = load_base_model(tiny_sd15.diffusers_dir)
    assert single.arch == folder.arch == "sd15"
    for a, b in (
        (single.unet, folder.unet),
        (single.vae, folder.vae),
        (single.text_encoders[0], folder.text_encoders[0]),
    ):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert single.fingerprints == folder.fingerprints
    assert type(single.noise_scheduler).__name__ == "DDPMScheduler"
    assert single.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert not any(p.requires_grad for p in single.unet.parameters())


def test_tokenizer_is_found_through_the_environment(tmp_path, monkeypatch, tiny_sdxl):
    comfy = tmp_path / "ComfyUI"
    write_tiny_clip_tokenizer(comfy / "comfy" / "sd1_tokenizer")
    monkeypatch.delenv("CHARFORGE_CLIP_TOKENIZER", raising=False)
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))
    assert find_tokenizer_dir() == comfy / "comfy" / "sd1_tokenizer"
    model = load_base_model(tiny_sdxl.single_file, config_dir=tiny_sdxl.diffusers_dir)
    assert model.arch == "sdxl" and len(model.tokenizers) == 2
    assert model.tokenizers[0].pad_token == "<|endoftext|>" and model.tokenizers[1].pad_token == "!"

    monkeypatch.delenv("COMFYUI_DIR")
    with pytest.raises(MissingTokenizerError, match="sd1_tokenizer"):
        load_base_model(tiny_sdxl.single_file, config_dir=tiny_sdxl.diffusers_dir)


def test_dtype_control_keeps_the_sdxl_vae_in_fp32_for_fp16(tiny_sdxl):
    half = load_base_model(tiny_sdxl.diffusers_dir, dtype="fp16")
    assert half.unet.dtype == torch.float16 and half.text_encoders[1].dtype == torch.float16
    assert half.vae.dtype == torch.float32  # SDXL's VAE overflows in fp16
    bf16 = load_base_model(tiny_sdxl.diffusers_dir, dtype="bf16")
    assert bf16.unet.dtype == torch.bfloat16 and bf16.vae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        load_base_model(tiny_sdxl.diffusers_dir, dtype="int8")


def test_fingerprint_follows_the_weights(tiny_sd15):
    model = load_base_model(tiny_sd15.diffusers_dir)
    before = fingerprint(model.vae)
    assert fingerprint(model.vae) == before
    with torch.no_grad():
        next(model.vae.parameters()).add_(1.0)
    assert fingerprint(model.vae) != before


def test_prompt_encoding_shapes(tiny_sd15, tiny_sdxl):
    sd15 = load_base_model(tiny_sd15.diffusers_dir)
    with torch.no_grad():
        plain = encode_prompts(sd15, ["sks person", "a photo"])
        skip = encode_prompts(sd15, ["sks person", "a photo"], clip_skip=2)
    assert plain.hidden.shape == (2, 77, 32) and plain.pooled is None
    assert not torch.allclose(plain.hidden, skip.hidden)

    sdxl = load_base_model(tiny_sdxl.diffusers_dir)
    with torch.no_grad():
        embeds = encode_prompts(sdxl, ["sks person"])
    assert embeds.hidden.shape == (1, 77, tiny_sdxl.unet_config["cross_attention_dim"])
    assert embeds.pooled.shape == (1, tiny_sdxl.text_encoder_2_config["projection_dim"])


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])  # CLIP-L's padding and SDXL's second encoder's
def test_tokenize_in_windows(tmp_path, pad):
    from transformers import CLIPTokenizer

    from charforge.engine.train.models import tokenize

    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(tmp_path / "tok", pad_token=pad)))
    word_ids = tokenizer("sks", add_special_tokens=False).input_ids
    prompts = ["sks person", " ".join(["sks"] * 74), " ".join(["sks"] * 75), " ".join(["sks"] * 100)]
    reference = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = tokenize(tokenizer, prompts)  # one window: exactly the tokenizer's own padded, truncated ids
    assert ids.shape == (4, 1, 77)
    torch.testing.assert_close(ids[:, 0], reference.input_ids)

    long_ids = tokenize(tokenizer, prompts, 150)
    assert long_ids.shape == (4, 2, 77)
    torch.testing.assert_close(long_ids[:, 0], reference.input_ids)  # the first window is unchanged
    n = len(word_ids)
    tail = long_ids[3, 1].tolist()  # 100 words: the second window holds words 76-100, then EOS and padding
    assert tail[0] == tokenizer.bos_token_id and tail[1 : 1 + 25 * n] == word_ids * 25
    assert tail[1 + 25 * n] == tokenizer.eos_token_id and set(tail[2 + 25 * n :]) == {tokenizer.pad_token_id}
    assert long_ids[0, 1].tolist()[:2] == [tokenizer.bos_token_id, tokenizer.eos_token_id]  # an empty window
    with pytest.raises(ValueError, match="multiple of 75"):
        tokenize(tokenizer, prompts, 100)


def test_long_prompts_keep_their_tail(tiny_sd15, tiny_sdxl):
    head = " ".join(["sks"] * 75)
    prompts = [head + " person", head + " photo"]  # they differ only after token 75
    for tiny in (tiny_sd15, tiny_sdxl):
        model = load_base_model(tiny.diffusers_dir)
        with torch.no_grad():
            cut = encode_prompts(model, prompts)
            full = encode_prompts(model, prompts, max_tokens=150)
        assert full.hidden.shape[1] == 152
        torch.testing.assert_close(cut.hidden[0], cut.hidden[1])  # 75 tokens: the difference is cut off
        assert not torch.allclose(full.hidden[0], full.hidden[1])
        torch.testing.assert_close(full.hidden[:, :76], cut.hidden[:, :76])  # the first window is the same
        if model.is_sdxl:
            torch.testing.assert_close(full.pooled, cut.pooled)  # pooled from the first window
    with pytest.raises(ValueError, match="max_token_length"):
        from charforge.engine.train.config import TrainConfig

        TrainConfig(max_token_length=100)
