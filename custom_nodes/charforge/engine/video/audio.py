"""Audio for clips: read a sound file into samples, and put audio into a saved mp4 / webm in sync.

Reading goes through PyAV (its wheels bundle FFmpeg, so wav, flac, mp3, m4a/aac, ogg/opus and the audio
track of a video all decode without a system ffmpeg). Samples become float32 in -1..1, channels first,
at the file's own rate: 16-bit PCM ``n`` becomes ``n / 32768`` exactly, so a lossless file read back from a
lossless encode compares bit for bit.

Muxing copies the video packets of a file ``save_video`` wrote (no re-encode) and adds one audio stream:
AAC for mp4, Opus for webm, or lossless FLAC in mp4. The audio used starts ``offset`` seconds into the
sound and is cut (or padded with silence) to the video's length, ``frames / fps``; the written file is
decoded again and its audio and video durations must agree within one frame.

What the features of a sound are and how they become per-frame schedules is ``audio_features``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ...deps import require

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".mp4", ".webm", ".mkv", ".mov")
# What each container's audio choice means: "auto" is the codec every player of that container knows.
CODECS = ("auto", "aac", "opus", "flac")
_CODEC_NAMES = {"aac": "aac", "opus": "libopus", "flac": "flac"}
_CONTAINER_CODECS = {".mp4": ("aac", "flac"), ".webm": ("opus",)}
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


class AudioError(ValueError):
    """A sound file that cannot be used; the message names the file and what to do."""


@dataclass
class Audio:
    """Samples (channels, n) float32 in -1..1 at `sample_rate`; `source` names where they came from."""

    samples: np.ndarray
    sample_rate: int
    source: str = ""
    # Bits of the integer PCM the samples came from (16, 24, 32), 0 for float or lossy sources; a lossless
    # encode at this depth gives the original integers back.
    bits: int = 0

    def __post_init__(self) -> None:
        samples = np.asarray(self.samples, dtype=np.float32)
        if samples.ndim == 1:
            samples = samples[None]
        if samples.ndim != 2 or samples.shape[0] < 1:
            raise AudioError(f"audio samples must be (channels, n); got shape {samples.shape}")
        if self.sample_rate <= 0:
            raise AudioError(f"sample rate must be positive; got {self.sample_rate}")
        self.samples = samples

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def length(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.length / self.sample_rate

    def mono(self) -> np.ndarray:
        """The channels averaged: (n,) float32."""
        return self.samples.mean(axis=0)

    def segment(self, start: float = 0.0, duration: float | None = None, pad: bool = False) -> Audio:
        """`duration` seconds from `start` (all of the rest when None). With `pad`, silence fills what the
        sound does not have, so the result is exactly ``round(duration * rate)`` samples long."""
        if start < 0:
            raise AudioError(f"audio start must be 0 or more seconds; got {start}")
        first = int(round(start * self.sample_rate))
        if duration is None:
            part = self.samples[:, first:]
        else:
            if duration < 0:
                raise AudioError(f"audio duration must be 0 or more seconds; got {duration}")
            count = int(round(duration * self.sample_rate))
            part = self.samples[:, first : first + count]
            if pad and part.shape[1] < count:
                part = np.pad(part, ((0, 0), (0, count - part.shape[1])))
        return Audio(np.ascontiguousarray(part), self.sample_rate, self.source, self.bits)


# --------------------------------------------------------------------------------------------------
# Reading

_INT_BITS = {"u8": 8, "s16": 16, "s32": 32, "s64": 64}


def _to_float(array: np.ndarray, format_name: str) -> np.ndarray:
    base = format_name.rstrip("p")
    if base in ("flt", "dbl"):
        return array.astype(np.float32)
    if base == "u8":
        return (array.astype(np.float32) - 128.0) / 128.0
    bits = _INT_BITS.get(base)
    if bits is None:
        raise AudioError(f"unsupported sample format {format_name!r}")
    return (array.astype(np.float64) / float(1 << (bits - 1))).astype(np.float32)


def _source_bits(stream, format_name: str) -> int:
    base = format_name.rstrip("p")
    if base not in ("s16", "s32"):
        return 0
    codec = stream.codec_context.name or ""
    if not (codec.startswith("pcm_") or codec in ("flac", "alac", "wavpack")):
        return 0  # a lossy codec that happens to decode to integers
    raw = getattr(stream.codec_context, "bits_per_raw_sample", 0) or 0
    return int(raw) if raw in (16, 24, 32) else _INT_BITS[base]


def load_audio(path: str | os.PathLike, start: float = 0.0, duration: float | None = None) -> Audio:
    """Decode the first audio stream of `path` (wav, flac, mp3, m4a, ogg, a video's sound...).

    `start` and `duration` (seconds) cut the part to use. Raises `AudioError` naming the file when it
    cannot be read or has no audio stream, `FileNotFoundError` when it does not exist.
    """
    av = require("av")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path} (put the sound file there, or pick another)")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
                raise AudioError(
                    f"{path} has no audio stream (it holds {kinds}); pick a sound file: "
                    f"{', '.join(s.lstrip('.') for s in AUDIO_SUFFIXES)}"
                )
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            format_name, bits = "", 0
            for frame in container.decode(stream):
                format_name = frame.format.name
                channels = frame.layout.nb_channels
                array = frame.to_ndarray()
                if not frame.format.is_planar:  # interleaved: (1, n * channels)
                    array = array.reshape(-1, channels).T
                chunks.append(_to_float(array, format_name))
                rate = frame.sample_rate or rate
            if chunks:
                bits = _source_bits(stream, format_name)
    except AudioError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise AudioError(f"could not read audio from {path}: {exc}") from exc
    if not chunks:
        raise AudioError(f"{path}: the audio stream holds no samples")
    audio = Audio(np.concatenate(chunks, axis=1), rate, str(path), bits)
    if start or duration is not None:
        audio = audio.segment(start, duration)
    return audio


def from_waveform(waveform, sample_rate: int, source: str = "") -> Audio:
    """ComfyUI's AUDIO value (``waveform`` (batch, channels, n) tensor, ``sample_rate``) -> `Audio` (first item)."""
    if hasattr(waveform, "detach"):
        waveform = waveform.detach().cpu().float().numpy()
    array = np.asarray(waveform, dtype=np.float32)
    if array.ndim == 3:
        array = array[0]
    return Audio(array, int(sample_rate), source)


# --------------------------------------------------------------------------------------------------
# Muxing


@dataclass(frozen=True)
class MuxedVideo:
    """A video file with its audio: the codec used and both streams' measured durations (seconds)."""

    path: str
    codec: str
    video_seconds: float
    audio_seconds: float
    fps: float
    frame_count: int


def pick_codec(suffix: str, codec: str = "auto") -> str:
    """The audio codec ("aac", "opus", "flac") for a container suffix (".mp4", ".webm") and a choice."""
    suffix = suffix.lower()
    allowed = _CONTAINER_CODECS.get(suffix)
    if allowed is None:
        raise AudioError(
            f"a {suffix or 'file without extension'} file cannot carry audio here: save the clip as mp4 or webm "
            "(gif and webp have no sound)"
        )
    if codec not in CODECS:
        raise AudioError(f"unknown audio codec {codec!r}; choose one of {CODECS}")
    if codec == "auto":
        return allowed[0]
    if codec not in allowed:
        raise AudioError(f"{suffix} files cannot hold {codec} audio; choose one of {allowed} (or auto)")
    return codec


def _layout(channels: int) -> str:
    return "mono" if channels == 1 else "stereo"


def _audio_frames(av, audio: Audio, codec: str, chunk: int = 4096):
    """AudioFrames of `audio` for `codec`: FLAC gets integers at the source depth, the lossy codecs floats."""
    samples = audio.samples[:2]
    channels = samples.shape[0]
    for first in range(0, samples.shape[1], chunk):
        part = samples[:, first : first + chunk]
        if codec == "flac":
            if audio.bits in (24, 32):
                ints = np.clip(np.round(part.astype(np.float64) * 2.0**31), -(2**31), 2**31 - 1).astype(
                    np.int32
                )
                frame = av.AudioFrame.from_ndarray(
                    ints.T.reshape(1, -1), format="s32", layout=_layout(channels)
                )
            else:
                ints = np.clip(np.round(part * 32768.0), -32768, 32767).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(
                    ints.T.reshape(1, -1), format="s16", layout=_layout(channels)
                )
        else:
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(part, dtype=np.float32), format="fltp", layout=_layout(channels)
            )
        frame.sample_rate = audio.sample_rate
        frame.pts = first
        frame.time_base = Fraction(1, audio.sample_rate)
        yield frame


def _video_stream_facts(av, path: Path) -> tuple[float, int]:
    """(fps, frame count) of the first video stream, counted from its packets."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise AudioError(f"{path} has no video stream to add audio to")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        frames = sum(1 for packet in container.demux(stream) if packet.size)
    if not rate or not frames:
        raise AudioError(f"{path}: could not read the video's frame rate and frames")
    return float(rate), frames


def media_durations(path: str | os.PathLike) -> tuple[float, float]:
    """(video seconds, audio seconds) of a file, both decoded: frames / fps and samples / rate."""
    av = require("av")
    fps, frames = _video_stream_facts(av, Path(path))
    audio = load_audio(path)
    return frames / fps, audio.duration


def mux_audio(
    video_path: str | os.PathLike,
    audio: Audio,
    *,
    offset: float = 0.0,
    codec: str = "auto",
    out_path: str | os.PathLike | None = None,
) -> MuxedVideo:
    """Add `audio` (from `offset` seconds on) to the mp4 / webm at `video_path`, cut or padded to its length.

    Writes `out_path` (default: replaces `video_path`) through a partial file, then decodes the result and
    raises `AudioError` if its audio and video durations differ by a frame or more.
    """
    av = require("av")
    source = Path(video_path)
    target = Path(out_path) if out_path is not None else source
    chosen = pick_codec(source.suffix, codec)
    if target.suffix.lower() != source.suffix.lower():
        raise AudioError(f"{target} must keep the video's container ({source.suffix})")
    fps, frame_count = _video_stream_facts(av, source)
    video_seconds = frame_count / fps
    part = audio.segment(offset, video_seconds, pad=True)
    if chosen == "opus" and part.sample_rate not in _OPUS_RATES:
        rate = 48000  # Opus encodes only these rates; the encoder's resampler converts
    else:
        rate = part.sample_rate
    tmp = target.with_name(target.stem + ".audio-partial" + target.suffix)
    options = {"movflags": "+faststart"} if target.suffix.lower() == ".mp4" else {}
    try:
        with av.open(str(source)) as inp, av.open(str(tmp), mode="w", options=options) as out:
            in_video = inp.streams.video[0]
            out_video = out.add_stream_from_template(in_video)
            out_audio = out.add_stream(_CODEC_NAMES[chosen], rate=rate, layout=_layout(min(part.channels, 2)))
            if chosen == "aac":
                out_audio.bit_rate = 192_000
            for key, value in inp.metadata.items():
                out.metadata[key] = value
            for packet in inp.demux(in_video):
                if packet.dts is None:
                    continue
                packet.stream = out_video
                out.mux(packet)
            for frame in _audio_frames(av, part, chosen):
                out.mux(out_audio.encode(frame))
            out.mux(out_audio.encode(None))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    decoded = load_audio(target)
    if abs(decoded.duration - video_seconds) >= 1.0 / fps:
        raise AudioError(
            f"{target}: the audio ({decoded.duration:.3f} s) and video ({video_seconds:.3f} s) came out more than "
            "one frame apart"
        )
    return MuxedVideo(str(target), chosen, video_seconds, decoded.duration, fps, frame_count)
