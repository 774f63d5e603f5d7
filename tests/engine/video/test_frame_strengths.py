"""Video to video with one strength per frame (e.g. an audio schedule): tiny SD1.5 + AnimateDiff v3, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cf_testing.video_models import tiny_video_spec, video_assets
from charforge.engine.video import (
    VideoRequest,
    generate_video,
    load_video_model,
)
from charforge.engine.video.audio_features import parse_value_schedule, schedule_text
from charforge.engine.video.generate import _fit_frames, _noise, encode_frames
from charforge.engine.video.models import unload_video_model
from charforge.engine.video.schedulers import make_scheduler

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_thread")  # cf_testing/threads.py


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    assets = video_assets(tmp_path_factory.getbasetemp() / "video_assets")
    yield load_video_model(tiny_video_spec(assets, assets.modules["v3"].original_file))[0]
    unload_video_model()


def _clip(model, scheduler="ddim", **changes):
    init = torch.rand(8, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    request = VideoRequest(
        prompt="a photo of sks person", frames=8, width=SIZE, height=SIZE, steps=4, seed=3,
        scheduler=scheduler, init_frames=init, **changes,
    )  # fmt: skip
    return generate_video(model, request).frames


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_the_same_strength_for_every_frame_is_the_plain_strength(model, scheduler):
    plain = _clip(model, scheduler, strength=0.5)
    per_frame = _clip(model, scheduler, frame_strengths=[0.5] * 8)
    assert torch.equal(plain, per_frame)


def test_a_weaker_frame_waits_at_its_noised_init_frame_until_its_step(model, monkeypatch):
    # 4 steps: frames are redrawn for 0, 1, 2, 2, 4, 4, 4, 4 steps, so they wait 4, 3, 2, 2, 0... U-Net calls.
    strengths = [0.1, 0.25, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    seen = []
    forward = model.unet_forward

    def recording(x, t, **kwargs):
        seen.append((x[0].clone(), int(t)))  # cfg > 1: the batch is (negative, positive) of the same latents
        return forward(x, t, **kwargs)

    monkeypatch.setattr(model, "unet_forward", recording)
    mixed = _clip(model, frame_strengths=strengths)
    monkeypatch.undo()
    init = torch.rand(8, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    init_latents = encode_frames(model, _fit_frames(init, 8, SIZE, SIZE)).float()[0]
    noise = _noise(3, (1, *init_latents.shape))[0]
    scheduler = make_scheduler("ddim", model.scheduler_config, "auto")  # its noise table, as the sampler's
    assert len(seen) == 4
    for call, (x, t) in enumerate(seen):
        a = scheduler.alphas_cumprod[t]
        noised_init = a.sqrt() * init_latents + (1 - a).sqrt() * noise
        waiting = [i for i in range(8) if [4, 3, 2, 2, 0, 0, 0, 0][i] > call]
        for frame in range(8):
            same = torch.allclose(x[:, frame], noised_init[:, frame], atol=1e-4)
            assert same == (frame in waiting or call == 0), (call, frame)
    # Frame 0 is never redrawn: it comes out as the init frame through the VAE and back.
    untouched = _clip(model, strength=0.1)
    assert torch.allclose(mixed[0], untouched[0], atol=1e-5)
    assert (mixed[1:] - untouched[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_wrong_schedules_are_refused(model):
    with pytest.raises(ValueError, match="3 values for 8 frames"):
        _clip(model, frame_strengths=[0.5] * 3)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        _clip(model, frame_strengths=[0.5] * 7 + [0.0])


def test_value_schedule_text_reads_back_and_fills_between_keyframes():
    values = np.array([0.2, 0.4, 0.9], dtype=np.float32)
    assert parse_value_schedule(schedule_text(values), 3) == pytest.approx([0.2, 0.4, 0.9])
    # Keyframes only: linear between them, held before the first and after the last.
    assert parse_value_schedule('"2": 0.5,\n6: (1.0)', 9) == pytest.approx(
        [0.5, 0.5, 0.5, 0.625, 0.75, 0.875, 1.0, 1.0, 1.0]
    )
    with pytest.raises(ValueError, match="line 2"):
        parse_value_schedule("0: 0.5\nloud", 4)
    with pytest.raises(ValueError, match="no keyframes"):
        parse_value_schedule("  ", 4)
