"""HotShot-XL on tiny models of the real architecture: the published temporal-layer file layout loads with every
tensor used (also at full size, on the meta device), and a clip from the engine equals a reference loop written
from diffusers' SDXL U-Net parts, a hand-written HotShot-XL temporal transformer following the published forward
and diffusers' DDIM scheduler, step by step, on the same weights."""

import math

import pytest
import torch
from torch.nn import functional as F

from cf_testing.video_models import (
    CLIP_SIZE,
    build_tiny_hotshot_module,
    hotshot_layout,
    sinusoid_table,
    tiny_clip_request,
    tiny_video_spec,
)
from charforge.engine.control import Control
from charforge.engine.video import (
    ContextOptions,
    MotionModuleError,
    VideoModelError,
    generate_video,
    inspect_motion_module,
    load_motion_adapter,
    load_video_model,
)
from charforge.engine.video.hotshot import FrameGroupNorm, hotshot_to_diffusers
from charforge.engine.video.motion import inspect_state_dict, read_weights

SIZE = CLIP_SIZE

pytestmark = pytest.mark.usefixtures("one_thread")  # cf_testing/threads.py


@pytest.fixture(scope="module")
def hotshot_file(tmp_path_factory):
    return build_tiny_hotshot_module(tmp_path_factory.mktemp("hotshot") / "hsxl_temporal_layers.safetensors")


def spec_for(assets, module, base="sdxl"):
    return tiny_video_spec(assets, module, arch=base)


def clip(spec, **changes):
    model, report = load_video_model(spec)
    # context length 0: the module's own window
    request = tiny_clip_request(**{"steps": 3, "seed": 5, "context": ContextOptions(length=0), **changes})
    return generate_video(model, request, Control()), report


# --------------------------------------------------------------------------------------------------
# The file


def test_full_size_file_layout_fits_the_motion_adapter_tensor_for_tensor():
    """The published file at full size (C = 320 / 640 / 1280, tables [1, 24, C]) is recognised and every one of
    its tensors has a place of the same shape in the motion adapter built from what was read, and vice versa
    (built on the meta device: no 0.5 GB of random weights)."""
    from diffusers import MotionAdapter

    shapes = hotshot_layout()
    assert len({".".join(k.split(".")[:4]) for k in shapes}) == 15
    state = {k: torch.empty(shape, device="meta", dtype=torch.float16) for k, shape in shapes.items()}
    info = inspect_state_dict(state)
    assert (info.version, info.base, info.layout) == ("hotshot", "sdxl", "hotshot")
    assert info.block_out_channels == (320, 640, 1280) and not info.has_mid_block
    assert (info.window, info.max_frames, info.auto_beta_schedule) == (8, 24, "base")
    converted = hotshot_to_diffusers(state)
    with torch.device("meta"):
        adapter = MotionAdapter(**info.adapter_config())
    own = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == own
    # Every file tensor is used: all but the second positional table of each block land in the adapter under
    # their own name (the second is checked equal to the first; diffusers shares one per block).
    assert len(converted) == len(shapes) - 15
    second_tables = sum(24 * shape[2] for k, shape in shapes.items() if "attention_blocks.1.pos_encoder" in k)
    assert (
        sum(v.numel() for v in converted.values())
        == sum(math.prod(s) for s in shapes.values()) - second_tables
    )


def test_tiny_file_loads_every_tensor_where_its_name_says(hotshot_file):
    adapter, info = load_motion_adapter(hotshot_file)  # raises on any missing / unexpected / misshapen key
    assert info.describe() == "HotShot-XL, hotshot layout, up to 24 frames"
    assert inspect_motion_module(hotshot_file).version == "hotshot"
    file = read_weights(hotshot_file)
    own = adapter.state_dict()
    pairs = {
        "up_blocks.1.temporal_attentions.2.norm.weight": "up_blocks.1.motion_modules.2.norm.weight",
        "down_blocks.2.temporal_attentions.1.transformer_blocks.0.attention_blocks.1.to_v.weight": (
            "down_blocks.2.motion_modules.1.transformer_blocks.0.attn2.to_v.weight"
        ),
        "down_blocks.0.temporal_attentions.0.transformer_blocks.0.norms.1.bias": (
            "down_blocks.0.motion_modules.0.transformer_blocks.0.norm2.bias"
        ),
        "up_blocks.0.temporal_attentions.0.transformer_blocks.0.ff_norm.weight": (
            "up_blocks.0.motion_modules.0.transformer_blocks.0.norm3.weight"
        ),
        "up_blocks.2.temporal_attentions.1.transformer_blocks.0.ff.net.0.proj.weight": (
            "up_blocks.2.motion_modules.1.transformer_blocks.0.ff.net.0.proj.weight"
        ),
        "up_blocks.2.temporal_attentions.1.transformer_blocks.0.attention_blocks.0.pos_encoder."
        "positional_encoding": "up_blocks.2.motion_modules.1.transformer_blocks.0.pos_embed.pe",
    }
    for hotshot_name, adapter_name in pairs.items():
        assert torch.equal(file[hotshot_name], own[adapter_name]), hotshot_name


def test_hotshot_xl_unet_folder_gives_the_same_temporal_layers(hotshot_file, tmp_path):
    """HotShot-XL's repository layout (``unet/config.json`` of its UNet3DConditionModel and the whole U-Net's
    weights): the temporal layers are taken, equal to the single file's; the spatial ones are left to the base."""
    import json

    from safetensors.torch import save_file

    unet = tmp_path / "Hotshot-XL" / "unet"
    unet.mkdir(parents=True)
    (tmp_path / "Hotshot-XL" / "model_index.json").write_text(
        json.dumps({"_class_name": "HotshotXLPipeline"})
    )
    (unet / "config.json").write_text(
        json.dumps({"_class_name": "UNet3DConditionModel", "down_block_types": ["DownBlock3D"]})
    )
    spatial = {
        "conv_in.weight": torch.ones(32, 4, 3, 3),
        "down_blocks.1.attentions.0.proj_in.weight": torch.ones(64, 64),
    }
    save_file({**read_weights(hotshot_file), **spatial}, str(unet / "diffusion_pytorch_model.safetensors"))
    expected = load_motion_adapter(hotshot_file)[0].state_dict()
    for folder in (unet, unet.parent):
        adapter, info = load_motion_adapter(folder)
        assert info.version == "hotshot" and info.window == 8
        got = adapter.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    modelscope = tmp_path / "text-to-video" / "unet"
    modelscope.mkdir(parents=True)
    (modelscope / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    save_file(
        {"down_blocks.0.temp_attentions.0.norm.weight": torch.ones(32)},
        str(modelscope / "diffusion_pytorch_model.safetensors"),
    )
    with pytest.raises(MotionModuleError, match="without HotShot-XL temporal layers"):
        inspect_motion_module(modelscope.parent)


def test_files_that_are_not_hotshot_xl_modules_are_named(hotshot_file, tmp_path):
    from safetensors.torch import save_file

    tensors = read_weights(hotshot_file)
    table = "down_blocks.1.temporal_attentions.0.transformer_blocks.0.attention_blocks.1.pos_encoder."
    table += "positional_encoding"
    tensors[table] = tensors[table] + 0.5
    save_file(tensors, str(tmp_path / "tables.safetensors"))
    with pytest.raises(MotionModuleError, match="different positional tables"):
        inspect_motion_module(tmp_path / "tables.safetensors")
    extra = {**read_weights(hotshot_file), "down_blocks.0.temporal_attentions.0.bogus.weight": torch.zeros(2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(MotionModuleError, match=r"extra.safetensors: .*bogus"):
        inspect_motion_module(tmp_path / "extra.safetensors")
    four_levels = {
        f"down_blocks.{i}.temporal_attentions.0.transformer_blocks.0.attention_blocks.0.pos_encoder."
        "positional_encoding": sinusoid_table(24, 32)
        for i in range(4)
    }
    four_levels.update(
        {f"down_blocks.{i}.temporal_attentions.0.norm.weight": torch.ones(32) for i in range(4)}
    )
    with pytest.raises(MotionModuleError, match="HotShot-XL has 3 levels"):
        inspect_state_dict(four_levels)
    with pytest.raises(MotionModuleError, match="not HotShot-XL's layout"):
        inspect_state_dict({"down_blocks.0.temporal_attentions.0.norm.weight": torch.ones(32)})


def test_hotshot_needs_an_sdxl_base(assets, hotshot_file):
    with pytest.raises(VideoModelError, match="HotShot-XL.*needs an SDXL checkpoint"):
        load_video_model(spec_for(assets, hotshot_file, base="sd15"))


# --------------------------------------------------------------------------------------------------
# The reference: HotShot-XL's forward, written here from its published description


def _linear(x, weights, name, bias=True):
    return F.linear(x, weights[f"{name}.weight"], weights[f"{name}.bias"] if bias else None)


def _temporal_transformer(hidden, frames, weights, prefix):
    """One HotShot-XL temporal transformer on (B*F, C, H, W): per-frame GroupNorm, projection in, one block of two
    temporal self-attentions (sinusoid table added to the normalised input, 8 heads) and a GEGLU feed-forward,
    each pre-normed with a residual, projection out, residual around all."""
    bf, c, h, w = hidden.shape
    w_ = {k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")}
    skip = hidden
    x = F.group_norm(hidden, 32, w_["norm.weight"], w_["norm.bias"], eps=1e-6)
    x = x.permute(0, 2, 3, 1).reshape(bf, h * w, c)
    x = _linear(x, w_, "proj_in")
    block = "transformer_blocks.0"
    heads, head_dim = 8, c // 8
    for n in (0, 1):
        normed = F.layer_norm(x, (c,), w_[f"{block}.norms.{n}.weight"], w_[f"{block}.norms.{n}.bias"], 1e-5)
        # (b f) s c -> (b s) f c: attention runs over the frames of each pixel
        seq = normed.reshape(bf // frames, frames, h * w, c).permute(0, 2, 1, 3).reshape(-1, frames, c)
        attention = f"{block}.attention_blocks.{n}"
        seq = seq + w_[f"{attention}.pos_encoder.positional_encoding"][:, :frames]
        q, k, v = (_linear(seq, w_, f"{attention}.{p}", bias=False) for p in ("to_q", "to_k", "to_v"))
        q, k, v = (t.reshape(t.shape[0], frames, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(-1, frames, c)
        mixed = _linear(mixed, w_, f"{attention}.to_out.0")
        mixed = mixed.reshape(bf // frames, h * w, frames, c).permute(0, 2, 1, 3).reshape(bf, h * w, c)
        x = mixed + x
    normed = F.layer_norm(x, (c,), w_[f"{block}.ff_norm.weight"], w_[f"{block}.ff_norm.bias"], 1e-5)
    value, gate = _linear(normed, w_, f"{block}.ff.net.0.proj").chunk(2, dim=-1)
    x = _linear(value * F.gelu(gate), w_, f"{block}.ff.net.2") + x
    x = _linear(x, w_, "proj_out").reshape(bf, h, w, c).permute(0, 3, 1, 2)
    return x + skip


def _reference_unet(unet2d, weights, sample, t, text, pooled, time_ids):
    """HotShot-XL's U-Net: SDXL's 2D blocks on every frame, a temporal transformer after each resnet (+ spatial
    attention) of every down and up block, none in the mid block. `sample` (B, C, F, H, W); `text` (B, 77, D)."""
    b, _, frames, hh, ww = sample.shape
    timesteps = t.reshape(1).expand(b)
    emb = unet2d.time_embedding(unet2d.time_proj(timesteps))
    size = unet2d.add_time_proj(time_ids.flatten()).reshape(b, -1)
    emb = emb + unet2d.add_embedding(torch.cat([pooled, size], dim=-1))
    emb = emb.repeat_interleave(frames, 0)
    text = text.repeat_interleave(frames, 0)
    x = unet2d.conv_in(sample.permute(0, 2, 1, 3, 4).reshape(b * frames, -1, hh, ww))
    skips = [x]
    for i, block in enumerate(unet2d.down_blocks):
        for j, resnet in enumerate(block.resnets):
            x = resnet(x, emb)
            if getattr(block, "attentions", None):
                x = block.attentions[j](x, encoder_hidden_states=text).sample
            x = _temporal_transformer(x, frames, weights, f"down_blocks.{i}.temporal_attentions.{j}")
            skips.append(x)
        for down in block.downsamplers or []:
            x = down(x)
            skips.append(x)
    mid = unet2d.mid_block
    x = mid.resnets[0](x, emb)
    for attention, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        x = resnet(attention(x, encoder_hidden_states=text).sample, emb)
    for i, block in enumerate(unet2d.up_blocks):
        for j, resnet in enumerate(block.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb)
            if getattr(block, "attentions", None):
                x = block.attentions[j](x, encoder_hidden_states=text).sample
            x = _temporal_transformer(x, frames, weights, f"up_blocks.{i}.temporal_attentions.{j}")
        for up in block.upsamplers or []:
            x = up(x)
    x = unet2d.conv_out(unet2d.conv_act(unet2d.conv_norm_out(x)))
    return x.reshape(b, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)


def test_denoising_equals_the_reference_loop(assets, hotshot_file):
    """The engine's clip (one 8-frame window, CFG 6, 4 DDIM steps on SDXL's own scaled_linear betas) equals the
    reference loop on the same weights; with AnimateDiff's whole-clip GroupNorm instead it does not."""
    import diffusers

    from charforge.engine.train.models import load_base_model

    spec = spec_for(assets, hotshot_file)
    frames, steps, cfg, seed, prompt = 8, 4, 6.0, 11, "a photo of sks person"
    ours, _ = clip(spec, frames=frames, steps=steps, cfg=cfg, seed=seed, prompt=prompt)

    base = load_base_model(spec.base, config_dir=spec.config_dir, tokenizer_candidates=spec.tokenizer_dirs)
    model, _ = load_video_model(spec)
    weights = read_weights(hotshot_file)
    with torch.inference_mode():
        pos, neg, pooled, neg_pooled = model.pipe.encode_prompt(
            prompt=[prompt],
            device="cpu",
            num_videos_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[""],
        )
        scheduler = diffusers.DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            timestep_spacing="linspace",
            steps_offset=1,
        )
        scheduler.set_timesteps(steps)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = (
            torch.randn((1, 4, frames, SIZE // 8, SIZE // 8), generator=generator)
            * scheduler.init_noise_sigma
        )
        time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps = _reference_unet(
                base.unet, weights, x, t, torch.cat([neg, pos]), torch.cat([neg_pooled, pooled]), time_ids
            )
            uncond, cond = eps.chunk(2)
            latents = scheduler.step(uncond + cfg * (cond - uncond), t, latents).prev_sample
        vae = base.vae
        images = vae.decode(latents[0].permute(1, 0, 2, 3) / vae.config.scaling_factor).sample
        expected = ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    difference = float((ours.frames - expected).abs().max())
    assert difference < 1e-5, difference
    assert float(expected.std()) > 0.01

    norms = [m for m in model.unet.modules() if isinstance(m, FrameGroupNorm)]
    assert len(norms) == 15
    try:
        for norm in norms:
            norm.__class__ = (
                torch.nn.GroupNorm
            )  # diffusers' AnimateDiff norm: statistics over the whole window
        whole_clip, _ = clip(spec, frames=frames, steps=steps, cfg=cfg, seed=seed, prompt=prompt)
    finally:
        for norm in norms:
            norm.__class__ = FrameGroupNorm
    whole_clip_difference = float((whole_clip.frames - expected).abs().max())
    assert whole_clip_difference > 100 * max(difference, 1e-6)


# --------------------------------------------------------------------------------------------------
# The clip features AnimateDiff has


def test_sixteen_frames_in_eight_frame_windows(assets, hotshot_file):
    result, _ = clip(
        spec_for(assets, hotshot_file), frames=16, steps=2, context=ContextOptions(length=0, overlap=4)
    )
    assert result.frames.shape == (16, SIZE, SIZE, 3)
    assert result.info["context_length"] == 8
    assert result.windows == [list(range(0, 8)), list(range(4, 12)), list(range(8, 16))]
    with pytest.raises(ValueError, match="positional table"):
        clip(spec_for(assets, hotshot_file), frames=30, context=ContextOptions(length=30))


def test_character_lora_prompt_travel_and_video_to_video(assets, hotshot_file):
    spec = spec_for(assets, hotshot_file)
    plain, _ = clip(spec)
    with_lora, report = clip(spec.with_lora(str(assets.sdxl_character_lora), 1.0))
    assert report[0].startswith("LoRA tiny_character_xl.safetensors x1 (")
    assert (with_lora.frames - plain.frames).abs().max() > 0.05
    travel, _ = clip(spec, prompt="0: a photo\n4: sks person")
    assert travel.frames.shape[0] == 8 and not torch.equal(travel.frames, plain.frames)
    video = torch.rand(5, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    vid2vid, _ = clip(spec, init_frames=video, strength=0.5, steps=4)
    assert vid2vid.steps_run == 2 and (vid2vid.frames - plain.frames).abs().max() > 0.05
