"""What a sound does frame by frame, and schedules with one value per video frame made from it.

`analyse_audio` measures the sound on a 10 ms grid, then gives every video frame ``i`` (the time
``[i / fps, (i + 1) / fps)``) its values, all 0..1:

- ``loudness``: RMS level in dB, mapped so the loudest frame is 1 and 48 dB below it is 0;
- ``onset``: spectral flux (how much the log-magnitude spectrum grew, summed over frequencies), the frame's
  strongest 10 ms step, divided by the sound's strongest;
- ``low`` / ``mid`` / ``high``: energy below 200 Hz, 200 - 2000 Hz and above 2000 Hz, each in dB mapped as
  loudness is (by its own loudest frame);
- ``beat``: 1 on the frames that hold a beat, else 0.

Beats: the tempo is the autocorrelation peak of the onset envelope between 40 and 240 BPM, weighted
towards 120 BPM by a log-normal prior one octave wide (music is more often felt near 120 than at half or
double that); beat times then come from dynamic programming over the onset envelope, which rewards
strong onsets and penalises gaps far from one beat period (log of the ratio, squared). A beat's frame is
``round(time * fps)``.

Schedules (`feature_schedule`) map a feature to ``[low, high]`` after optional smoothing (a centred moving
average) and an envelope follower (``attack``: seconds to rise, ``release``: seconds to fall, as in a
compressor). `beat_prompt_schedule` writes a prompt-travel text with a keyframe on every N-th beat.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .audio import Audio, AudioError

FEATURES = ("loudness", "onset", "beat", "low", "mid", "high")
BANDS = {"low": (0.0, 200.0), "mid": (200.0, 2000.0), "high": (2000.0, math.inf)}
ANALYSIS_RATE = 100  # envelope values per second (10 ms hop)
DYNAMIC_RANGE_DB = 48.0
MIN_BPM, MAX_BPM, PRIOR_BPM = 40.0, 240.0, 120.0
TIGHTNESS = 100.0  # how strongly beat gaps are held to one period (higher: steadier)
MAX_FRAMES = 100_000


@dataclass
class AudioFeatures:
    """Per-video-frame features (each (frames,) float32 0..1) plus the tempo and beat times."""

    fps: float
    frames: int
    duration: float
    values: dict[str, np.ndarray]
    tempo: float
    beat_times: list[float]
    envelope: np.ndarray = field(repr=False)  # the onset envelope on the ~10 ms grid, for plots and tests

    @property
    def beat_frames(self) -> list[int]:
        """Frame index of each beat inside the clip (one entry per frame even if two beats round onto it)."""
        frames = sorted({int(round(t * self.fps)) for t in self.beat_times})
        return [f for f in frames if 0 <= f < self.frames]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.values:
            raise KeyError(f"unknown audio feature {name!r}; choose one of {FEATURES}")
        return self.values[name]

    def describe(self) -> str:
        beats = self.beat_frames
        return (
            f"{self.duration:.2f} s of audio, {self.frames} frames at {self.fps:g} fps; tempo {self.tempo:.1f} BPM, "
            f"{len(beats)} beats in the clip"
            + (f" (frames {', '.join(map(str, beats[:12]))}" if beats else "")
            + (", ...)" if len(beats) > 12 else (")" if beats else ""))
        )


# --------------------------------------------------------------------------------------------------
# Analysis on the 10 ms grid


def _spectrogram(signal: np.ndarray, rate: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """Magnitudes (bins, hops) of centred Hann windows ~23 ms long every `hop` samples; bin frequencies."""
    n_fft = 1 << max(8, int(round(math.log2(rate * 0.023))))
    padded = np.pad(signal.astype(np.float32), (n_fft // 2, n_fft // 2))
    count = 1 + max(0, (len(padded) - n_fft) // hop)
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    out = np.empty((n_fft // 2 + 1, count), dtype=np.float32)
    step = 2048  # windows per batch: bounded memory for long songs
    for first in range(0, count, step):
        idx = np.arange(first, min(first + step, count))[:, None] * hop + np.arange(n_fft)[None]
        out[:, first : first + step] = np.abs(np.fft.rfft(padded[idx] * window, axis=1)).T / (n_fft / 2)
    return out, np.fft.rfftfreq(n_fft, 1.0 / rate)


def _level(values: np.ndarray) -> np.ndarray:
    """Energies -> 0..1: dB relative to the loudest, DYNAMIC_RANGE_DB below it at 0."""
    db = 10.0 * np.log10(np.maximum(values, 1e-12))
    top = float(db.max()) if db.size else 0.0
    if top <= -110.0:  # silence
        return np.zeros_like(db, dtype=np.float32)
    return np.clip((db - (top - DYNAMIC_RANGE_DB)) / DYNAMIC_RANGE_DB, 0.0, 1.0).astype(np.float32)


def onset_envelope(magnitudes: np.ndarray) -> np.ndarray:
    """Spectral flux: the positive growth of log magnitude from one hop to the next, summed over bins."""
    log_mag = np.log1p(100.0 * magnitudes)
    flux = np.maximum(np.diff(log_mag, axis=1, prepend=log_mag[:, :1]), 0.0).sum(axis=0)
    return flux.astype(np.float32)


def estimate_tempo(envelope: np.ndarray, rate: float = ANALYSIS_RATE) -> tuple[float, float]:
    """(BPM, beat period in envelope steps) from the envelope's autocorrelation with a prior around 120 BPM."""
    centred = envelope - envelope.mean()
    size = 1 << int(math.ceil(math.log2(max(len(centred) * 2, 2))))
    spectrum = np.fft.rfft(centred, size)
    corr = np.fft.irfft(spectrum * np.conj(spectrum), size)[: len(centred)]
    lags = np.arange(len(corr), dtype=np.float64)
    lo, hi = int(math.floor(60.0 * rate / MAX_BPM)), int(math.ceil(60.0 * rate / MIN_BPM))
    hi = min(hi, len(corr) - 2)
    if hi <= lo or corr[0] <= 0:
        return 0.0, 0.0
    bpm = 60.0 * rate / np.maximum(lags[lo : hi + 1], 1e-9)
    prior = np.exp(-0.5 * np.log2(bpm / PRIOR_BPM) ** 2)
    weighted = np.maximum(corr[lo : hi + 1], 0.0) * prior
    best = int(np.argmax(weighted)) + lo
    if weighted.max() <= 0:
        return 0.0, 0.0
    # A parabola through the raw correlation around the peak places the lag between grid steps.
    a, b, c = corr[best - 1], corr[best], corr[best + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) < 0 else 0.0
    period = best + float(np.clip(shift, -0.5, 0.5))
    return 60.0 * rate / period, period


def track_beats(envelope: np.ndarray, period: float) -> list[int]:
    """Envelope indices of the beats: dynamic programming over onset strength and period-like gaps."""
    if period <= 0 or not len(envelope) or envelope.std() == 0:
        return []
    strength = envelope / envelope.std()
    half = int(round(period))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) * 32.0 / period) ** 2)
    local = np.convolve(strength, kernel, mode="same")
    score = np.zeros_like(local)
    back = np.full(len(local), -1)
    near, far = int(round(period / 2)), int(round(2 * period))
    for i in range(len(local)):
        start, stop = max(0, i - far), i - near
        if stop <= start:
            score[i] = local[i]
            continue
        gaps = i - np.arange(start, stop + 1)
        candidates = score[start : stop + 1] - TIGHTNESS * np.log(gaps / period) ** 2
        j = int(np.argmax(candidates))
        if candidates[j] > 0:
            score[i] = local[i] + candidates[j]
            back[i] = start + j
        else:  # no predecessor worth its gap (the first beat, or after a break): the chain starts here
            score[i] = local[i]
    # The last beat: the last local maximum of the score that is clearly a beat (above half their median).
    peaks = [i for i in range(1, len(score) - 1) if score[i] >= score[i - 1] and score[i] > score[i + 1]]
    if not peaks:
        return []
    level = 0.5 * float(np.median(score[peaks]))
    last = max(i for i in peaks if score[i] >= level)
    beats = [last]
    while back[beats[-1]] >= 0:
        beats.append(int(back[beats[-1]]))
    beats.reverse()
    # Leading / trailing beats on near-silence are the chain's guesses, not beats.
    floor = 0.5 * float(np.sqrt(np.mean(local[beats] ** 2)))
    while beats and local[beats[0]] < floor:
        beats.pop(0)
    while beats and local[beats[-1]] < floor:
        beats.pop()
    return beats


def _per_frame(grid: np.ndarray, frames: int, fps: float, grid_rate: float, reduce) -> np.ndarray:
    """Values on the 10 ms grid -> one per video frame (the hops inside ``[i / fps, (i + 1) / fps)``)."""
    out = np.zeros(frames, dtype=np.float32)
    for i in range(frames):
        a = int(math.floor(i / fps * grid_rate))
        b = max(a + 1, int(math.floor((i + 1) / fps * grid_rate)))
        part = grid[a:b]
        out[i] = reduce(part) if len(part) else 0.0
    return out


def analyse_audio(audio: Audio, fps: float, frames: int | None = None) -> AudioFeatures:
    """Features of `audio` for a clip at `fps`; `frames` defaults to as many as the sound lasts (at least 1)."""
    if not 0 < fps <= 240:
        raise AudioError(f"fps must be in (0, 240]; got {fps}")
    if frames is None or frames <= 0:
        frames = max(1, int(math.floor(audio.duration * fps + 1e-6)))
    if frames > MAX_FRAMES:
        raise AudioError(f"{frames} frames is more than a schedule holds ({MAX_FRAMES}); shorten the clip")
    rate = audio.sample_rate
    hop = max(1, int(round(rate / ANALYSIS_RATE)))
    grid_rate = rate / hop  # 100 per second, or close to it for rates such as 22050 Hz
    signal = audio.mono()
    magnitudes, freqs = _spectrogram(signal, rate, hop)
    envelope = onset_envelope(magnitudes)
    tempo, period = estimate_tempo(envelope, grid_rate)
    beats = track_beats(envelope, period)

    # RMS per video frame straight from the samples (exact frame boundaries).
    bounds = [int(round(i * rate / fps)) for i in range(frames + 1)]
    power = np.array(
        [
            float(np.mean(signal[a:b] ** 2)) if b > a and a < len(signal) else 0.0
            for a, b in zip(bounds, bounds[1:], strict=False)
        ],
        dtype=np.float64,
    )
    values = {"loudness": _level(power)}
    flux = _per_frame(envelope, frames, fps, grid_rate, np.max)
    values["onset"] = (flux / flux.max()).astype(np.float32) if flux.max() > 0 else flux
    energy = magnitudes.astype(np.float64) ** 2
    for name, (lo, hi) in BANDS.items():
        band = energy[(freqs >= lo) & (freqs < hi)].sum(axis=0)
        values[name] = _level(_per_frame(band, frames, fps, grid_rate, np.mean))
    beat_times = [b / grid_rate for b in beats]
    pulse = np.zeros(frames, dtype=np.float32)
    for t in beat_times:
        f = int(round(t * fps))
        if 0 <= f < frames:
            pulse[f] = 1.0
    values["beat"] = pulse
    return AudioFeatures(float(fps), int(frames), audio.duration, values, float(tempo), beat_times, envelope)


# --------------------------------------------------------------------------------------------------
# Schedules


@dataclass(frozen=True)
class ScheduleMapping:
    """How one feature becomes a schedule: ``low + (high - low) * shaped(feature)``.

    ``smooth`` (seconds) averages the feature over a centred window first; ``attack`` / ``release``
    (seconds) limit how fast the result rises / falls (0 = follow at once); ``invert`` uses ``1 - feature``
    (loud = low value, e.g. less denoise on loud parts)."""

    feature: str = "loudness"
    low: float = 0.0
    high: float = 1.0
    smooth: float = 0.0
    attack: float = 0.0
    release: float = 0.0
    invert: bool = False

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise AudioError(f"unknown audio feature {self.feature!r}; choose one of {FEATURES}")
        for name in ("smooth", "attack", "release"):
            if getattr(self, name) < 0:
                raise AudioError(f"{name} must be 0 or more seconds; got {getattr(self, name)}")


def _coefficient(seconds: float, fps: float) -> float:
    """Per-frame step of a one-pole follower that covers ~63 % of a change in `seconds`."""
    return 1.0 if seconds <= 0 else 1.0 - math.exp(-1.0 / (seconds * fps))


def feature_schedule(features: AudioFeatures, mapping: ScheduleMapping) -> np.ndarray:
    """One float per frame of the clip: `mapping` applied to the feature (see `ScheduleMapping`)."""
    x = features[mapping.feature].astype(np.float64)
    if mapping.invert:
        x = 1.0 - x
    width = int(round(mapping.smooth * features.fps))
    if width > 1:
        kernel = np.ones(width) / width
        x = np.convolve(np.pad(x, (width // 2, width - 1 - width // 2), mode="edge"), kernel, mode="valid")
    up, down = _coefficient(mapping.attack, features.fps), _coefficient(mapping.release, features.fps)
    shaped = np.empty_like(x)
    level = x[0] if len(x) else 0.0
    for i, value in enumerate(x):
        level += (value - level) * (up if value > level else down)
        shaped[i] = level
    out = mapping.low + (mapping.high - mapping.low) * shaped
    assert len(out) == features.frames
    return out.astype(np.float32)


def schedule_text(values: np.ndarray, decimals: int = 3) -> str:
    """``frame: value`` lines, one per frame (the keyframed-value form other schedule nodes read)."""
    return "\n".join(f"{i}: {float(v):.{decimals}f}" for i, v in enumerate(values))


_VALUE_LINE = re.compile(r'\s*"?(\d+)"?\s*:\s*\(?\s*(-?[0-9.]+(?:[eE]-?\d+)?)\s*\)?\s*,?\s*')


def parse_value_schedule(text: str, frames: int) -> list[float]:
    """One value per frame from ``frame: value`` lines (what `schedule_text` writes; ``"4": (0.5),`` too).

    Between keyframes the value changes linearly; before the first and after the last it is held."""
    points: dict[int, float] = {}
    for number, line in enumerate((text or "").splitlines(), 1):
        if not line.strip() or line.strip() in ("{", "}"):
            continue
        match = _VALUE_LINE.fullmatch(line)
        if not match:
            raise ValueError(f"value schedule line {number} is not '<frame>: <value>': {line.strip()!r}")
        points[int(match.group(1))] = float(match.group(2))
    if not points:
        raise ValueError("the value schedule has no keyframes ('<frame>: <value>' lines)")
    keys = sorted(points)
    return [float(v) for v in np.interp(np.arange(frames), keys, [points[k] for k in keys])]


def beat_keyframes(features: AudioFeatures, every: int = 1, offset: int = 0) -> list[int]:
    """Frames where a new prompt starts: frame 0, then every `every`-th beat (from beat `offset`)."""
    if every < 1:
        raise AudioError(f"every must be at least 1 beat; got {every}")
    chosen = features.beat_frames[offset::every]
    return [0, *[f for f in chosen if f > 0]]


def beat_prompt_schedule(
    features: AudioFeatures, prompts: list[str], every: int = 1, offset: int = 0, shared: str = ""
) -> str:
    """A prompt-travel text (``frame: prompt`` lines) whose keyframes fall on beats, cycling `prompts`.

    ``shared`` is added as a line without a frame number (appended to every keyframe's prompt)."""
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise AudioError("no prompts: write one prompt per line")
    lines = [
        f"{frame}: {prompts[i % len(prompts)]}"
        for i, frame in enumerate(beat_keyframes(features, every, offset))
    ]
    if shared.strip():
        lines.append(shared.strip())
    return "\n".join(lines)
