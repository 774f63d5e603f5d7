"""The video engine on tiny models of the real structure: single-file SD1.5 + AnimateDiff modules in both
layouts, kohya character LoRAs, motion LoRAs, long clips through context windows, init frames, SDXL."""

import pytest
import torch

from cf_testing.video_models import CLIP_SIZE, tiny_clip_request, tiny_video_spec
from charforge import bridge
from charforge.engine.control import Cancelled, Control
from charforge.engine.video import (
    ContextOptions,
    VideoModelError,
    VideoModelSpec,
    VideoRequest,
    generate_video,
    load_video_model,
)
from charforge.engine.video.generate import _fit_frames, encode_schedule
from charforge.engine.video.prompts import parse_prompt_schedule

SIZE = CLIP_SIZE


pytestmark = pytest.mark.usefixtures("one_thread")  # cf_testing/threads.py


def spec_for(assets, version="v3", layout="original", arch="sd15", single_file=True):
    module = assets.modules[version]
    motion = module.original_file if layout == "original" else module.diffusers_dir
    return tiny_video_spec(assets, motion, arch, single_file)


def clip(spec, **changes):
    model, report = load_video_model(spec)
    request = tiny_clip_request(**{"steps": 2, "seed": 3, **changes})
    calls = []
    result = generate_video(
        model, request, Control(on_progress=lambda done, total, text: calls.append((done, total)))
    )
    return result, calls, report


def test_a_clip_generates_and_is_reproducible(assets):
    result, calls, _ = clip(spec_for(assets))
    frames = result.frames
    assert frames.shape == (8, SIZE, SIZE, 3) and frames.dtype == torch.float32
    assert float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0 and float(frames.std()) > 0.01
    assert calls[:2] == [(1, 3), (2, 3)] and calls[-1] == (3, 3)  # 2 steps + one decode chunk
    again, _, _ = clip(spec_for(assets))
    assert torch.equal(frames, again.frames)
    other_seed, _, _ = clip(spec_for(assets), seed=4)
    assert not torch.equal(frames, other_seed.frames)


def test_original_and_diffusers_layouts_make_the_same_clip(assets):
    """The same weights in the two layouts (and a diffusers-folder base) give identical frames: the
    conversion loses nothing, positional tables included."""
    original, _, _ = clip(spec_for(assets, layout="original"))
    diffusers_layout, _, _ = clip(spec_for(assets, layout="diffusers", single_file=False))
    assert torch.allclose(original.frames, diffusers_layout.frames, atol=1e-5)


def test_motion_module_changes_the_frames(assets):
    v3, _, _ = clip(spec_for(assets, "v3"))
    v2, _, _ = clip(spec_for(assets, "v2"))
    assert (v3.frames - v2.frames).abs().max() > 0.05


def test_kohya_character_lora_changes_the_frames_and_comes_off_again(assets):
    spec = spec_for(assets)
    plain, _, _ = clip(spec)
    with_lora, _, report = clip(spec.with_lora(str(assets.character_lora), 1.0))
    assert report == ["LoRA tiny_character.safetensors x1 (192 layers)"]  # every kohya module found
    assert (with_lora.frames - plain.frames).abs().max() > 0.05
    half, _, _ = clip(spec.with_lora(str(assets.character_lora), 0.5))
    assert 0 < (half.frames - plain.frames).abs().mean() < (with_lora.frames - plain.frames).abs().mean()
    back, _, report = clip(spec)
    assert report == [] and torch.allclose(back.frames, plain.frames, atol=1e-6)


def test_motion_lora_changes_the_frames(assets):
    spec = spec_for(assets, "v2")
    plain, _, _ = clip(spec)
    moved, _, report = clip(spec.with_motion_lora(str(assets.motion_lora), 1.0))
    assert report[0].startswith("motion LoRA tiny_zoom.safetensors x1 (")
    assert (moved.frames - plain.frames).abs().max() > 0.02


def test_clip_three_times_the_window_is_made_in_windows(assets):
    result, calls, _ = clip(spec_for(assets), frames=24, context=ContextOptions(length=8, overlap=2), steps=1)
    assert result.frames.shape[0] == 24
    assert result.windows == [list(range(0, 8)), list(range(6, 14)), list(range(12, 20)), list(range(16, 24))]
    assert calls[0] == (1, 4)  # one step, three decode chunks
    # Neighbouring frames across a seam are no further apart than neighbours inside a window.
    steps = (result.frames[1:] - result.frames[:-1]).abs().mean(dim=(1, 2, 3))
    assert float(steps[[5, 6, 7, 12, 13]].max()) < 3 * float(steps.median()) + 1e-3
    looped, _, _ = clip(
        spec_for(assets), frames=24, context=ContextOptions(length=8, overlap=2, loop=True), steps=1
    )
    assert looped.frames.shape[0] == 24 and any(0 in w and 23 in w for w in looped.windows)


def test_context_longer_than_the_positional_table_is_refused(assets):
    with pytest.raises(ValueError, match="positional table"):
        clip(spec_for(assets, "v1"), frames=30, context=ContextOptions(length=30))


def test_prompt_travel_blends_embeddings_per_frame(assets):
    model, _ = load_video_model(spec_for(assets))
    keyframes = parse_prompt_schedule("0: a photo\n4: sks person")
    cond = encode_schedule(model, keyframes, "", 8)
    assert torch.allclose(cond.positive[2], (cond.positive[0] + cond.positive[4]) / 2, atol=1e-5)
    assert torch.equal(cond.positive[4], cond.positive[7]) and not torch.equal(
        cond.positive[0], cond.positive[4]
    )
    travel, _, _ = clip(spec_for(assets), prompt="0: a photo\n4: sks person")
    assert travel.frames.shape[0] == 8


def test_init_image_and_video(assets):
    image = torch.zeros(1, 40, 80, 3)
    image[:, :, 40:] = 1.0
    fitted = _fit_frames(image, 4, SIZE, SIZE)
    assert (
        fitted.shape == (4, 3, SIZE, SIZE)
        and fitted[:, :, :, :30].max() <= -0.9
        and fitted[:, :, :, 34:].min() >= 0.9
    )
    txt, _, _ = clip(spec_for(assets), steps=4)
    img2vid, calls, _ = clip(spec_for(assets), steps=4, init_frames=image, strength=0.5)
    assert img2vid.steps_run == 2 and calls[0] == (1, 3)
    assert (img2vid.frames - txt.frames).abs().max() > 0.05
    video = torch.rand(5, SIZE, SIZE, 3)
    vid2vid, _, _ = clip(spec_for(assets), steps=4, init_frames=video, strength=0.5)
    assert vid2vid.frames.shape[0] == 8 and not torch.equal(vid2vid.frames, img2vid.frames)


def test_cancel_stops_between_steps(assets, no_comfy):
    model, _ = load_video_model(spec_for(assets))
    request = VideoRequest(prompt="a photo", frames=8, width=SIZE, height=SIZE, steps=5, seed=1)
    seen = []

    def progress(done, total, text):
        seen.append(done)
        if done == 2:
            bridge.request_cancel()

    with pytest.raises(Cancelled):
        generate_video(model, request, bridge.control(on_progress=progress))
    assert seen == [1, 2]


def test_wrong_base_for_the_module_is_explained(assets):
    spec = spec_for(assets, "sdxl")  # SDXL module on an SD1.5 base
    with pytest.raises(VideoModelError, match="needs an SDXL checkpoint"):
        load_video_model(spec)


def test_sdxl_clip_with_a_kohya_lora(assets):
    from charforge.engine.train.models import load_base_model

    spec = spec_for(assets, "sdxl", arch="sdxl")
    plain, _, _ = clip(spec, scheduler="euler_a")
    assert plain.frames.shape == (8, SIZE, SIZE, 3)
    model, _ = load_video_model(spec)
    base = load_base_model(spec.base, config_dir=spec.config_dir, tokenizer_candidates=spec.tokenizer_dirs)
    # diffusers' from_unet2d leaves add_embedding random; the engine copies it from the base U-Net.
    assert torch.equal(model.unet.add_embedding.linear_1.weight, base.unet.add_embedding.linear_1.weight)
    with_lora, _, report = clip(spec.with_lora(str(assets.sdxl_character_lora)), scheduler="euler_a")
    assert report[0].startswith("LoRA tiny_character_xl.safetensors x1 (")
    assert (with_lora.frames - plain.frames).abs().max() > 0.05


def test_kohya_lora_strength_matches_the_trainers_own_merge(assets):
    """diffusers' kohya conversion (alpha / rank scaling) gives what CharForge's exporter means: the adapter
    at strength 0.7 equals the LoRA merged into the weights at multiplier 0.7."""
    import copy

    from charforge.engine.library.formats import read_lora
    from charforge.engine.train.export import merge_lora

    spec = spec_for(assets)
    plain, _ = load_video_model(spec)
    merged = copy.deepcopy(plain.unet)
    tensors, _ = read_lora(assets.character_lora)
    assert merge_lora({"unet": merged}, tensors, "sd15", assets.sd15.unet_config, 0.7) == []
    with_lora, _ = load_video_model(spec.with_lora(str(assets.character_lora), 0.7))
    sample = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(8, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = merged(sample, torch.tensor(500), encoder_hidden_states=text).sample
        got = with_lora.unet(sample, torch.tensor(500), encoder_hidden_states=text).sample
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())


def test_two_character_loras_at_once(assets, tmp_path):
    from cf_testing.models import TINY_SD15_UNET
    from cf_testing.video_models import build_tiny_character_lora

    second = build_tiny_character_lora(tmp_path / "second.safetensors", TINY_SD15_UNET, seed=7)
    spec = spec_for(assets)
    first_only, _, _ = clip(spec.with_lora(str(assets.character_lora), 0.6))
    both, _, report = clip(spec.with_lora(str(assets.character_lora), 0.6).with_lora(str(second), 0.6))
    assert len(report) == 2 and report[1].startswith("LoRA second.safetensors x0.6")
    assert (both.frames - first_only.frames).abs().max() > 0.02


def test_memory_options_give_the_same_clip(assets):
    from charforge.engine.video import RuntimeOptions

    reference, _, _ = clip(spec_for(assets))
    spec = spec_for(assets)
    options = RuntimeOptions(
        device="cpu",
        dtype="fp32",
        attention="eager",
        vae_slicing=False,
        vae_tiling=True,
        offload=True,
        channels_last=True,
    )
    other, _, _ = clip(VideoModelSpec(**{**spec.__dict__, "options": options}))
    assert torch.allclose(reference.frames, other.frames, atol=1e-4)
