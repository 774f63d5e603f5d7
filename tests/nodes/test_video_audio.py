"""Audio-reactive video nodes as ComfyUI runs them: load a sound, schedules on its beats, a clip saved with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cf_testing.audio_files import click_track, write_pcm
from cf_testing.comfyui import run_node
from charforge.engine.video import read_video
from charforge.engine.video.audio import AUDIO_SUFFIXES as ENGINE_SUFFIXES
from charforge.engine.video.audio import CODECS, load_audio, media_durations
from charforge.engine.video.audio_features import FEATURES as ENGINE_FEATURES
from charforge.engine.video.prompts import parse_prompt_schedule
from charforge.nodes import video as video_nodes
from charforge.nodes import video_audio
from charforge.nodes.video import SaveVideo
from charforge.nodes.video_audio import AudioPromptTravel, AudioSchedule, LoadAudio

RATE = 44100


@pytest.fixture
def song(comfy_env):
    """A 4 s click track at 120 BPM in the input folder's music/ subfolder; its int16 samples."""
    samples, _ = click_track(120.0, 4.0, RATE)
    folder = comfy_env.base_dir / "input" / "music"
    folder.mkdir(parents=True)
    write_pcm(folder / "clicks.wav", samples, RATE)
    return samples


def test_node_constants_match_the_engine():
    assert video_audio.FEATURES == ENGINE_FEATURES
    assert video_audio.AUDIO_SUFFIXES == ENGINE_SUFFIXES
    assert video_nodes.AUDIO_CODECS == CODECS


def test_load_audio_lists_input_files_and_gives_comfyuis_audio_value(song):
    choices = LoadAudio.INPUT_TYPES()["required"]["audio"]
    assert choices[0] == ["music/clicks.wav"]
    audio, seconds, info = run_node(LoadAudio, audio="music/clicks.wav", start=0.5, duration=2.0).result
    assert set(audio) == {"waveform", "sample_rate"} and audio["sample_rate"] == RATE
    waveform = audio["waveform"]
    assert isinstance(waveform, torch.Tensor) and waveform.shape == (1, 1, 2 * RATE)
    assert waveform.dtype == torch.float32 and seconds == pytest.approx(2.0)
    expected = song[RATE // 2 : RATE // 2 + 2 * RATE] / 32768.0
    assert np.array_equal(waveform[0, 0].numpy(), expected.astype(np.float32))
    assert "clicks.wav: 2.00 s from 0.5 s, 1 channel(s) at 44100 Hz, about 120 BPM" in info


def test_load_audio_without_a_file_says_where_to_put_one(comfy_env):
    assert LoadAudio.INPUT_TYPES()["required"]["audio"][0] == [video_audio.NO_AUDIO]
    with pytest.raises(FileNotFoundError, match="input folder"):
        run_node(LoadAudio, audio=video_audio.NO_AUDIO, start=0.0, duration=0.0)
    with pytest.raises(ValueError, match="outside the input folder"):
        run_node(LoadAudio, audio="../secret.wav", start=0.0, duration=0.0)


def test_prompt_travel_puts_keyframes_on_beats_for_generate_video(song):
    audio = run_node(LoadAudio, audio="music/clicks.wav", start=0.0, duration=0.0).result[0]
    prompt, frames, fps, info = run_node(
        AudioPromptTravel,
        audio=audio,
        prompts="dancing\nspinning",
        shared="photo",
        fps=8.0,
        frames=0,
        beats_per_prompt=1,
        skip_beats=0,
    ).result
    assert frames == 32 and fps == 8.0  # 4 s at 8 fps
    keyframes = parse_prompt_schedule(prompt)
    # Clicks every 0.5 s from 0.25 s: beat frames round(0.25 * 8) = 2, then every 4 frames.
    assert [k.frame for k in keyframes] == [0, 2, 6, 10, 14, 18, 22, 26, 30]
    assert [k.prompt for k in keyframes[:3]] == ["dancing, photo", "spinning, photo", "dancing, photo"]
    assert "tempo 120.0 BPM" in info


def test_schedule_has_one_value_per_frame_as_list_text_and_average(song):
    audio = run_node(LoadAudio, audio="music/clicks.wav", start=0.0, duration=0.0).result[0]
    run = run_node(
        AudioSchedule,
        audio=audio,
        feature="beat",
        fps=8.0,
        frames=20,
        low=0.4,
        high=0.9,
        smooth=0.0,
        attack=0.0,
        release=0.0,
        invert=False,
    )
    values, text, average, frames, info = run.result
    assert AudioSchedule.OUTPUT_IS_LIST[0] is True
    assert frames == 20 and len(values) == 20 and len(text.splitlines()) == 20
    assert [i for i, v in enumerate(values) if v > 0.5] == [2, 6, 10, 14, 18]
    assert min(values) == pytest.approx(0.4) and average == pytest.approx(np.mean(values))
    assert text.splitlines()[2] == "2: 0.900"
    assert "beat -> [0.4, 0.9] over 20 frames" in info


def test_comfyuis_own_audio_value_is_accepted_too(song):
    # ComfyUI's LoadAudio gives (1, channels, n) float32 at the file's rate: a stereo one here.
    stereo = torch.from_numpy(np.stack([song, song]) / 32768.0).float()[None]
    audio = {"waveform": stereo, "sample_rate": RATE}
    prompt = run_node(
        AudioPromptTravel,
        audio=audio,
        prompts="a\nb",
        shared="",
        fps=8.0,
        frames=0,
        beats_per_prompt=2,
        skip_beats=1,
    ).result[0]
    assert [k.frame for k in parse_prompt_schedule(prompt)] == [0, 6, 14, 22, 30]


def test_save_video_muxes_the_audio_in_sync(song, comfy_env):
    audio = run_node(LoadAudio, audio="music/clicks.wav", start=0.0, duration=0.0).result[0]
    frames = torch.rand(12, 32, 32, 3)
    common = {"frames": frames, "fps": 8.0, "quality": 80, "loop_count": 0, "audio": audio}
    saved = run_node(
        SaveVideo, format="mp4", filename_prefix="video/song", audio_codec="flac", audio_offset=1.0, **common
    )
    path = comfy_env.base_dir / "output" / "video" / "song_00001_.mp4"
    assert saved.result == (str(path),) and saved.ui["images"][0]["filename"] == path.name
    video_seconds, audio_seconds = media_durations(path)
    assert video_seconds == pytest.approx(1.5) and abs(audio_seconds - video_seconds) < 1 / 8
    back = np.round(load_audio(path).samples[0] * 32768).astype(np.int16)
    assert np.array_equal(back, song[RATE : RATE + int(1.5 * RATE)])
    assert read_video(path).frame_count == 12

    webm = run_node(SaveVideo, format="webm", filename_prefix="video/song", audio_codec="auto", **common)
    video_seconds, audio_seconds = media_durations(webm.result[0])
    assert abs(audio_seconds - video_seconds) < 1 / 8
    with pytest.raises(ValueError, match="gif file has no sound"):
        run_node(SaveVideo, format="gif", filename_prefix="video/song", **common)
    silent = run_node(SaveVideo, format="mp4", filename_prefix="video/quiet", **{**common, "audio": None})
    with pytest.raises(ValueError, match="no audio stream"):
        load_audio(silent.result[0])


def test_an_audio_schedule_sets_generate_videos_strength_frame_by_frame(song, comfy_env, tmp_path):
    import shutil

    from cf_testing.video_models import video_assets
    from charforge import bridge
    from charforge.engine.video.models import unload_video_model
    from charforge.nodes.video import GenerateVideo, LoadVideoModel

    assets = video_assets(tmp_path / "assets")
    models = comfy_env.base_dir / "models"
    shutil.copytree(assets.sd15.diffusers_dir, models / "diffusers" / "tiny_sd15")
    (models / "animatediff_models").mkdir(parents=True)
    shutil.copy(assets.modules["v3"].original_file, models / "animatediff_models")
    bridge.register_model_folders()
    options = {"dtype": "fp32", "attention": "sdpa", "vae_slicing": True, "vae_tiling": False}
    model = run_node(
        LoadVideoModel,
        base_model="[diffusers] tiny_sd15",
        motion_module=assets.modules["v3"].original_file.name,
        cpu_offload=False,
        compile=False,
        **options,
    ).result[0]
    audio = run_node(LoadAudio, audio="music/clicks.wav", start=0.0, duration=1.0).result[0]
    schedule = run_node(
        AudioSchedule,
        audio=audio,
        feature="beat",
        fps=8.0,
        frames=8,
        low=0.3,
        high=0.9,
        smooth=0.0,
        attack=0.0,
        release=0.2,
        invert=False,
    ).result[1]
    settings = {
        "model": model, "prompt": "a photo", "negative_prompt": "", "frames": 8, "fps": 8.0, "width": 64,
        "height": 64, "steps": 4, "cfg": 7.5, "scheduler": "ddim", "seed": 1, "context_length": 16,
        "context_overlap": 4, "init_images": torch.rand(8, 64, 64, 3, generator=torch.Generator().manual_seed(0)),
    }  # fmt: skip
    try:
        plain = run_node(GenerateVideo, strength=0.6, **settings).result
        flat = run_node(GenerateVideo, strength_schedule="0: 0.6\n7: 0.6", **settings).result
        beats, _, info = run_node(GenerateVideo, strength_schedule=schedule, **settings).result
    finally:
        unload_video_model()
    assert torch.equal(plain[0], flat[0])  # the same strength on every frame is the plain strength
    assert not torch.equal(beats, plain[0]) and "strength per frame: 0.30 to 0.90" in info
