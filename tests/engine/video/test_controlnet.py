"""ControlNets inside the video loop: the three file layouts load with every tensor used, and the clip equals
diffusers' AnimateDiffControlNetPipeline on the same tiny weights (guess mode off, conditioning scale,
control_guidance_start / end), also per context window with the window's own control frames."""

import pytest
import torch

from cf_testing.controlnet_models import tiny_video_controlnet, write_ldm_controlnet
from charforge.engine.video import (
    ContextOptions,
    RuntimeOptions,
    VideoModelSpec,
    VideoRequest,
    generate_video,
    load_video_model,
)
from charforge.engine.video.controlnet import ControlNetError, VideoControl, load_controlnet
from charforge.engine.video.schedulers import make_scheduler

SIZE, FRAMES = 64, 8
PROMPT, NEGATIVE = "a photo of sks person", "blurry"

pytestmark = pytest.mark.usefixtures("one_thread")


def spec_for(assets):
    tiny, module = assets.sd15, assets.modules["v3"]
    return VideoModelSpec(
        base=str(tiny.single_file),
        motion_module=str(module.original_file),
        config_dir=str(tiny.diffusers_dir),
        tokenizer_dirs=(str(tiny.diffusers_dir / "tokenizer"),),
        options=RuntimeOptions(device="cpu", dtype="fp32"),
    )


@pytest.fixture(scope="module")
def controlnets(assets, tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("controlnet")
    unet_config = dict(assets.sd15.unet_config)
    nets = {}
    for seed in (1, 2):
        net = tiny_video_controlnet(unet_config, seed)
        ldm = write_ldm_controlnet(net, unet_config, folder / f"control_{seed}.safetensors")
        flat = folder / f"diffusers_{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, flat)
        net.save_pretrained(folder / f"folder_{seed}")
        nets[seed] = (net, ldm, flat, folder / f"folder_{seed}")
    return nets


def control_frames(count=FRAMES, seed=0):
    # Values on the 1/255 grid: the pipeline's PIL input carries them exactly.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, SIZE, SIZE, 3), generator=g).float() / 255


def pipeline_clip(model, net, frames, noise, steps, scale, start, end):
    """diffusers' AnimateDiffControlNetPipeline on the video model's own parts."""
    from diffusers import AnimateDiffControlNetPipeline
    from PIL import Image

    scheduler = make_scheduler("ddim", model.scheduler_config, model.motion.auto_beta_schedule)
    pipe = AnimateDiffControlNetPipeline(
        vae=model.vae,
        text_encoder=model.pipe.text_encoder,
        tokenizer=model.pipe.tokenizer,
        unet=model.unet,
        motion_adapter=None,
        controlnet=net,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    images = [Image.fromarray((f * 255).round().byte().numpy()) for f in frames]
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_frames=frames.shape[0],
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=7.5,
        conditioning_frames=images,
        controlnet_conditioning_scale=scale,
        control_guidance_start=start,
        control_guidance_end=end,
        latents=noise,
        output_type="pt",
    ).frames[0]
    return out.permute(0, 2, 3, 1).float()  # (F, H, W, 3)


def our_clip(model, controls, **changes):
    request = VideoRequest(
        **{
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE,
            "frames": FRAMES,
            "width": SIZE,
            "height": SIZE,
            "steps": 4,
            "seed": 5,
            "controls": controls,
            **changes,
        }
    )
    return generate_video(model, request).frames


def noise_for(model, frames=FRAMES, seed=5):
    from charforge.engine.video.generate import _noise

    return _noise(seed, (1, 4, frames, SIZE // 8, SIZE // 8))


def test_the_three_layouts_load_the_same_weights(assets, controlnets):
    model, _ = load_video_model(spec_for(assets))
    net, ldm, flat, folder = controlnets[1]
    reference = net.state_dict()
    for source in (ldm, flat, folder):
        loaded = load_controlnet(source, model.unet2d_config, torch.float32, torch.device("cpu"))
        state = loaded.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), source


def test_a_controlnet_for_another_base_is_refused(assets, controlnets, tmp_path):
    from safetensors.torch import save_file

    model, _ = load_video_model(spec_for(assets))
    _, ldm, _, _ = controlnets[1]
    from safetensors.torch import load_file

    state = load_file(ldm)
    state.pop(next(k for k in state if "zero_convs.1.0.weight" in k))
    broken = tmp_path / "broken.safetensors"
    save_file(state, broken)
    with pytest.raises(ControlNetError, match="broken.safetensors does not fit"):
        load_controlnet(broken, model.unet2d_config, torch.float32, torch.device("cpu"))
    junk = tmp_path / "junk.safetensors"
    save_file({"a.weight": torch.zeros(2)}, junk)
    with pytest.raises(ControlNetError, match="not a ControlNet"):
        load_controlnet(junk, model.unet2d_config, torch.float32, torch.device("cpu"))


def test_clip_equals_diffusers_animatediff_controlnet_pipeline(assets, controlnets):
    model, _ = load_video_model(spec_for(assets))
    net, ldm, _, _ = controlnets[1]
    loaded = load_controlnet(ldm, model.unet2d_config, torch.float32, torch.device("cpu"))
    frames = control_frames()
    plain = our_clip(model, [])
    ours = our_clip(model, [VideoControl(loaded, frames, strength=0.8, start=0.25, end=0.75)])
    theirs = pipeline_clip(model, net, frames, noise_for(model), 4, 0.8, 0.25, 0.75)
    assert (ours - plain).abs().max() > 0.02  # the control acts
    assert torch.allclose(ours, theirs, atol=2e-5), float((ours - theirs).abs().max())
    # Off for every step (start/end exclude all of them): the plain clip, exactly.
    off = our_clip(model, [VideoControl(loaded, frames, strength=0.8, start=0.0, end=0.2)])
    assert torch.equal(off, plain)


def test_two_controlnets_are_summed_as_diffusers_multicontrolnet(assets, controlnets):
    from diffusers.models import MultiControlNetModel

    model, _ = load_video_model(spec_for(assets))
    (net1, ldm1, _, _), (net2, _, _, folder2) = controlnets[1], controlnets[2]
    first = load_controlnet(ldm1, model.unet2d_config, torch.float32, torch.device("cpu"))
    second = load_controlnet(folder2, model.unet2d_config, torch.float32, torch.device("cpu"))
    frames = control_frames()
    ours = our_clip(model, [VideoControl(first, frames, 0.7), VideoControl(second, frames, 0.5)])

    multi = MultiControlNetModel([net1, net2])
    theirs = _multi_pipeline(model, multi, frames, [0.7, 0.5])
    assert torch.allclose(ours, theirs, atol=2e-5), float((ours - theirs).abs().max())


def _multi_pipeline(model, multi, frames, scales):
    from diffusers import AnimateDiffControlNetPipeline
    from PIL import Image

    scheduler = make_scheduler("ddim", model.scheduler_config, model.motion.auto_beta_schedule)
    pipe = AnimateDiffControlNetPipeline(
        vae=model.vae,
        text_encoder=model.pipe.text_encoder,
        tokenizer=model.pipe.tokenizer,
        unet=model.unet,
        motion_adapter=None,
        controlnet=multi,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    images = [Image.fromarray((f * 255).round().byte().numpy()) for f in frames]
    return (
        pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_frames=FRAMES,
            height=SIZE,
            width=SIZE,
            num_inference_steps=4,
            guidance_scale=7.5,
            conditioning_frames=[images, images],
            controlnet_conditioning_scale=scales,
            latents=noise_for(model),
            output_type="pt",
        )
        .frames[0]
        .permute(0, 2, 3, 1)
        .float()
    )


def test_context_windows_take_their_own_control_frames(assets, controlnets):
    """Two windows without overlap: each is the pipeline run on its own frames' noise and control frames."""
    model, _ = load_video_model(spec_for(assets))
    net, ldm, _, _ = controlnets[1]
    loaded = load_controlnet(ldm, model.unet2d_config, torch.float32, torch.device("cpu"))
    frames = control_frames()
    ours = our_clip(model, [VideoControl(loaded, frames, 1.0)], context=ContextOptions(length=4, overlap=0))
    noise = noise_for(model)
    for window in (range(0, 4), range(4, 8)):
        part = slice(window.start, window.stop)
        theirs = pipeline_clip(model, net, frames[part], noise[:, :, part].contiguous(), 4, 1.0, 0.0, 1.0)
        assert torch.allclose(ours[part], theirs, atol=2e-5), (
            window,
            float((ours[part] - theirs).abs().max()),
        )


def test_an_sdxl_clip_takes_an_sdxl_controlnet(assets, tmp_path):
    """SDXL: the ControlNet gets the window's pooled text and size ids once per frame; its control acts."""
    from charforge.engine.video import VideoModelSpec as Spec

    tiny = assets.sdxl
    spec = Spec(
        base=str(tiny.single_file),
        motion_module=str(assets.modules["sdxl"].original_file),
        config_dir=str(tiny.diffusers_dir),
        tokenizer_dirs=(str(tiny.diffusers_dir / "tokenizer"),),
        options=RuntimeOptions(device="cpu", dtype="fp32"),
    )
    model, _ = load_video_model(spec)
    unet_config = dict(tiny.unet_config)
    path = write_ldm_controlnet(tiny_video_controlnet(unet_config), unet_config, tmp_path / "xl.safetensors")
    net = load_controlnet(path, model.unet2d_config, torch.float32, torch.device("cpu"))
    plain = our_clip(model, [], steps=2)
    steered = our_clip(model, [VideoControl(net, control_frames(), 1.0)], steps=2)
    assert steered.shape == plain.shape and (steered - plain).abs().max() > 0.02
    sd15, _ = load_video_model(spec_for(assets))
    with pytest.raises(ControlNetError, match="xl.safetensors does not fit"):
        load_controlnet(path, sd15.unet2d_config, torch.float32, torch.device("cpu"))
