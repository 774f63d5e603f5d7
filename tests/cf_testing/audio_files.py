"""Sound files for the audio tests: planted click tracks and tones, written as real wav / flac / mp3 / m4a."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def click_track(
    bpm: float = 120.0, seconds: float = 6.0, rate: int = 44100, first: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Int16 mono samples with a 10 ms noise burst every beat from `first` on, and the click times (s)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(rate * seconds)) * 0.001
    clicks = np.arange(first, seconds - 0.05, 60.0 / bpm)
    n = int(0.01 * rate)
    decay = np.exp(-np.arange(n) / (0.002 * rate))
    for c in clicks:
        i = int(round(c * rate))
        x[i : i + n] += rng.standard_normal(len(x[i : i + n])) * decay[: len(x[i : i + n])] * 0.7
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16), clicks


def tone(freq: float, seconds: float, rate: int = 44100, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_pcm(path: Path, samples: np.ndarray, rate: int, codec: str = "pcm_s16le") -> Path:
    """Int16 samples ((n,) or (channels, n)) into a wav (pcm_s16le) or flac file."""
    samples = np.atleast_2d(samples).astype(np.int16)
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(samples.T.reshape(1, -1)), format="s16", layout=layout
    )
    return _encode(path, frame, codec, rate, layout)


def write_lossy(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Float mono samples as mp3 (LAME) or m4a (AAC), by the suffix, as a phone or an editor would save them."""
    codec = {".mp3": "libmp3lame", ".m4a": "aac"}[path.suffix]
    frame = av.AudioFrame.from_ndarray(
        np.atleast_2d(samples).astype(np.float32), format="fltp", layout="mono"
    )
    return _encode(path, frame, codec, rate, "mono", "mp4" if path.suffix == ".m4a" else None)


def _encode(
    path: Path, frame: av.AudioFrame, codec: str, rate: int, layout: str, container_format: str | None = None
) -> Path:
    """Encode one audio frame (all the samples) with `codec` into `path`, flushing the encoder."""
    frame.sample_rate = rate
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path
