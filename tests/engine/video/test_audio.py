"""Audio for clips: decoding, beats and features of planted sounds, per-frame schedules, muxing in sync."""

from __future__ import annotations

import numpy as np
import pytest

from cf_testing.audio_files import click_track, tone, write_lossy, write_pcm
from charforge.engine.video.audio import Audio, AudioError, load_audio, media_durations, mux_audio
from charforge.engine.video.audio_features import (
    FEATURES,
    ScheduleMapping,
    analyse_audio,
    beat_prompt_schedule,
    feature_schedule,
    schedule_text,
)
from charforge.engine.video.encode import read_video, write_video
from charforge.engine.video.prompts import parse_prompt_schedule


@pytest.mark.parametrize(("rate", "fps"), [(44100, 24.0), (22050, 8.0), (48000, 12.5)])
def test_click_track_at_120_bpm_gives_beats_every_half_second_within_one_frame(tmp_path, rate, fps):
    samples, clicks = click_track(120.0, 6.0, rate)
    audio = load_audio(write_pcm(tmp_path / "clicks.wav", samples, rate))
    features = analyse_audio(audio, fps)
    assert features.tempo == pytest.approx(120.0, abs=1.0)
    beats = np.array(features.beat_times)
    assert len(beats) == len(clicks)
    assert np.max(np.abs(beats - clicks)) < 1.0 / fps  # the bound
    assert np.max(np.abs(beats - clicks)) < 0.01  # what the 10 ms analysis grid gives
    assert np.all(np.abs(np.diff(beats) - 0.5) < 1.0 / fps)
    assert features.beat_frames == [int(round(c * fps)) for c in clicks if round(c * fps) < features.frames]
    assert np.flatnonzero(features["beat"]).tolist() == features.beat_frames


def test_other_tempos_are_found_too():
    for bpm in (90.0, 150.0):
        samples, clicks = click_track(bpm, 8.0, 44100)
        features = analyse_audio(Audio(samples / 32768.0, 44100), 24.0)
        assert features.tempo == pytest.approx(bpm, abs=1.5)
        assert np.max(np.abs(np.array(features.beat_times) - clicks)) < 1.0 / 24


@pytest.mark.parametrize(("fps", "frames"), [(8.0, None), (24.0, None), (8.0, 7), (12.0, 100), (29.97, 1)])
def test_every_schedule_has_exactly_one_value_per_frame(fps, frames):
    samples, _ = click_track(120.0, 3.0, 22050)
    features = analyse_audio(Audio(samples / 32768.0, 22050), fps, frames)
    expected = frames if frames else int(3.0 * fps)
    assert features.frames == expected
    for name in FEATURES:
        values = feature_schedule(
            features, ScheduleMapping(name, 0.3, 0.9, smooth=0.2, attack=0.05, release=0.3)
        )
        assert values.shape == (expected,) and values.dtype == np.float32
        assert np.all((values >= 0.3 - 1e-6) & (values <= 0.9 + 1e-6))
    lines = schedule_text(values).splitlines()
    assert len(lines) == expected and lines[0].startswith("0: ")


def test_loudness_and_bands_follow_planted_sounds():
    rate, fps = 44100, 10.0
    # 1 s quiet bass, 1 s loud bass, 1 s loud treble.
    quiet_bass = tone(80, 1.0, rate, 0.02)
    loud_bass = tone(80, 1.0, rate, 0.5)
    treble = tone(5000, 1.0, rate, 0.5)
    features = analyse_audio(Audio(np.concatenate([quiet_bass, loud_bass, treble]), rate), fps)
    loud, low, high = features["loudness"], features["low"], features["high"]
    assert loud[12:18].mean() > 0.95 and loud[2:8].mean() == pytest.approx(1 - 28 / 48, abs=0.05)  # -28 dB
    assert low[12:18].mean() > 0.95 and low[22:28].mean() < 0.1
    assert high[22:28].mean() > 0.95 and high[12:18].mean() < 0.1
    # The loud bass starts at frame 10: the onset there is the sound's strongest.
    assert int(np.argmax(features["onset"])) in (9, 10, 20)


def test_attack_and_release_shape_a_beat_pulse():
    samples, _ = click_track(120.0, 4.0, 44100)
    features = analyse_audio(Audio(samples / 32768.0, 44100), 24.0)
    beat = features.beat_frames[1]
    held = feature_schedule(features, ScheduleMapping("beat", 0.2, 1.0, release=0.1))
    assert held[beat] == pytest.approx(1.0)
    assert held[beat - 1] == pytest.approx(0.2, abs=0.02)  # the previous beat has faded
    assert 0.2 < held[beat + 1] < held[beat] and held[beat + 2] < held[beat + 1]  # falls back by the release
    slow = feature_schedule(features, ScheduleMapping("beat", 0.2, 1.0, attack=0.2))
    assert 0.2 < slow[beat] < 0.5  # a slow attack only starts to rise on a one-frame pulse
    inverted = feature_schedule(features, ScheduleMapping("beat", 0.2, 1.0, invert=True))
    assert inverted[beat] == pytest.approx(0.2) and inverted[beat - 1] == pytest.approx(1.0)


def test_prompt_travel_keyframes_land_on_beats():
    samples, _ = click_track(120.0, 4.0, 44100)
    features = analyse_audio(Audio(samples / 32768.0, 44100), 8.0)
    text = beat_prompt_schedule(features, ["smiling", "laughing", ""], every=2, shared="photo")
    keyframes = parse_prompt_schedule(text)
    assert [k.frame for k in keyframes] == [0, *features.beat_frames[0::2]]
    assert [k.prompt for k in keyframes[:3]] == ["smiling, photo", "laughing, photo", "smiling, photo"]
    with pytest.raises(AudioError, match="one prompt per line"):
        beat_prompt_schedule(features, ["", "  "])


def _clip(tmp_path, fmt, frames=20, fps=8.0):
    rng = np.random.default_rng(1)
    return write_video(rng.random((frames, 32, 48, 3)), tmp_path / f"clip.{fmt}", fps, fmt)


def test_lossless_mux_keeps_every_sample_and_both_durations_agree(tmp_path):
    rate = 44100
    left, _ = click_track(120.0, 4.0, rate, seed=2)
    right, _ = click_track(120.0, 4.0, rate, seed=3)
    source = write_pcm(tmp_path / "song.flac", np.stack([left, right]), rate, codec="flac")
    audio = load_audio(source)
    assert audio.bits == 16 and audio.channels == 2
    video = _clip(tmp_path, "mp4")
    muxed = mux_audio(video, audio, offset=0.75, codec="flac")
    video_seconds, audio_seconds = media_durations(video)
    assert video_seconds == pytest.approx(20 / 8.0)
    assert abs(audio_seconds - video_seconds) < 1 / 8.0 and muxed.audio_seconds == audio_seconds
    back = load_audio(video)
    first = int(0.75 * rate)
    expected = np.stack([left, right])[:, first : first + int(2.5 * rate)]
    assert np.array_equal(np.round(back.samples * 32768).astype(np.int16), expected)
    assert read_video(video).frame_count == 20  # the picture is untouched


@pytest.mark.parametrize(("fmt", "codec"), [("mp4", "aac"), ("webm", "opus")])
def test_lossy_mux_is_in_sync_and_as_long_as_the_video(tmp_path, fmt, codec):
    rate, fps = 44100, 12.0
    samples = np.zeros(int(rate * 5.0), np.float32)
    click = int(1.5 * rate)  # 1.0 s into the clip after the 0.5 s offset
    samples[click : click + 200] = 0.8
    video = _clip(tmp_path, fmt, frames=30, fps=fps)
    muxed = mux_audio(video, Audio(samples, rate), offset=0.5)
    assert muxed.codec == codec
    back = load_audio(video)
    assert abs(back.duration - 30 / fps) < 1 / fps
    heard = np.flatnonzero(np.abs(back.mono()) > 0.2)[0] / back.sample_rate
    assert heard == pytest.approx(1.0, abs=0.01)


def test_short_audio_is_padded_with_silence_to_the_videos_length(tmp_path):
    video = _clip(tmp_path, "mp4", frames=24, fps=8.0)
    mux_audio(video, Audio(tone(440, 1.0, 22050), 22050), codec="flac")
    back = load_audio(video)
    assert back.duration == pytest.approx(3.0)
    assert np.abs(back.samples[:, int(1.1 * 22050) :]).max() == 0


@pytest.mark.parametrize("suffix", [".mp3", ".m4a"])
def test_mp3_and_m4a_decode(tmp_path, suffix):
    rate = 44100
    path = write_lossy(tmp_path / f"tone{suffix}", tone(440, 2.0, rate), rate)
    audio = load_audio(path)
    assert audio.sample_rate == rate and audio.bits == 0
    assert audio.duration == pytest.approx(2.0, abs=0.06)
    spectrum = np.abs(np.fft.rfft(audio.mono()[rate // 2 : rate // 2 + rate]))
    assert np.argmax(spectrum) == pytest.approx(440, abs=1)  # 1 Hz bins over one second
    part = load_audio(path, start=0.5, duration=1.0)
    assert part.length == rate


def test_bad_input_names_the_file(tmp_path):
    missing = tmp_path / "nothere.wav"
    with pytest.raises(FileNotFoundError, match="nothere.wav"):
        load_audio(missing)
    garbage = tmp_path / "broken.mp3"
    garbage.write_bytes(b"this is not audio" * 100)
    with pytest.raises(AudioError, match="broken.mp3"):
        load_audio(garbage)
    silent_video = _clip(tmp_path, "mp4")
    with pytest.raises(AudioError, match=r"clip\.mp4 has no audio stream"):
        load_audio(silent_video)
    gif = write_video(np.zeros((2, 8, 8, 3)), tmp_path / "a.gif", 8.0, "gif")
    with pytest.raises(AudioError, match="gif and webp have no sound"):
        mux_audio(gif, Audio(tone(440, 1.0, 22050), 22050))
    with pytest.raises(AudioError, match="webm files cannot hold flac"):
        mux_audio(_clip(tmp_path, "webm"), Audio(tone(440, 1.0, 22050), 22050), codec="flac")
