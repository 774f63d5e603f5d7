"""Write frames as a video file the ComfyUI way, and read video files back.

Formats: ``mp4`` (H.264, yuv420p, ``+faststart``) and ``webm`` (VP9) through PyAV, whose wheels bundle
their own FFmpeg libraries (no system ffmpeg); ``gif`` and animated ``webp`` through Pillow. One
``quality`` number (0-100) sets every encoder: H.264 CRF ``35 - 0.2 q`` (80 gives 19, the usual
default), VP9 CRF ``50 - 0.25 q``, WebP quality ``q``; GIF is palette-based and ignores it.

File names follow ComfyUI's save convention (``folder_paths.get_save_image_path``), repeated here so the
engine runs without ComfyUI: the prefix may name a subfolder (``video/CharForge``) and use
``%width% %height% %year% %month% %day% %hour% %minute% %second%``; the file is
``<name>_<counter:05>_.<ext>`` where the counter is one more than the highest counter of any file
``<name>_NNNNN_*`` in that folder, whatever its extension; a prefix that leaves the output folder is
refused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ...deps import require
from ..images import open_image


@dataclass(frozen=True)
class VideoFormat:
    name: str
    extension: str
    mime: str
    writer: str  # "pyav" or "pillow"
    description: str


FORMATS: dict[str, VideoFormat] = {
    "mp4": VideoFormat(
        "mp4", "mp4", "video/mp4", "pyav", "H.264 MP4: plays everywhere (yuv420p, even sizes)"
    ),
    "webm": VideoFormat("webm", "webm", "video/webm", "pyav", "VP9 WebM: smaller files, browsers play it"),
    "gif": VideoFormat("gif", "gif", "image/gif", "pillow", "GIF: 256 colours, times in 1/100 s"),
    "webp": VideoFormat("webp", "webp", "image/webp", "pillow", "animated WebP: small, browsers show it"),
}


class SaveOutsideOutputError(ValueError):
    """A filename prefix points outside the output folder."""


@dataclass(frozen=True)
class SavePath:
    """Where the next file with a prefix goes (ComfyUI's ``get_save_image_path`` tuple, named)."""

    folder: str
    filename: str
    counter: int
    subfolder: str
    prefix: str

    def file(self, extension: str) -> str:
        return os.path.join(self.folder, f"{self.filename}_{self.counter:05}_.{extension}")


def _expand(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    values = {
        "%width%": str(width),
        "%height%": str(height),
        "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02}",
        "%day%": f"{now.tm_mday:02}",
        "%hour%": f"{now.tm_hour:02}",
        "%minute%": f"{now.tm_min:02}",
        "%second%": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(key, value)
    return prefix


def _counter_of(name: str, filename: str) -> int | None:
    """The counter of `name` if it is ``<filename>_<digits>_...`` (case as the file system compares)."""
    head = name[: len(filename) + 1]
    if os.path.normcase(head[:-1]) != os.path.normcase(filename) or head[-1:] != "_":
        return None
    digits = name[len(filename) + 1 :].split("_")[0]
    return int(digits) if digits.isdigit() else 0


def save_path(prefix: str, output_dir: str | os.PathLike, width: int = 0, height: int = 0) -> SavePath:
    """The folder, name and counter for the next file saved under `prefix` in `output_dir`."""
    output_dir = os.path.abspath(str(output_dir))
    if "%" in prefix:
        prefix = _expand(prefix, width, height)
    normal = os.path.normpath(prefix)
    subfolder, filename = os.path.dirname(normal), os.path.basename(normal)
    folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((output_dir, os.path.abspath(folder))) != output_dir:
        raise SaveOutsideOutputError(
            f"filename prefix {prefix!r} would save outside the output folder {output_dir}"
        )
    try:
        counters = [c for c in (_counter_of(n, filename) for n in os.listdir(folder)) if c is not None]
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        counters = []
    return SavePath(folder, filename, max(counters, default=0) + 1, subfolder, prefix)


# --------------------------------------------------------------------------------------------------
# Writing


def to_uint8(frames) -> np.ndarray:
    """(F, H, W, 3|4) float 0..1 (tensor or array) or uint8 -> contiguous uint8 RGB (F, H, W, 3)."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().float().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"frames must be (F, H, W, 3); got shape {frames.shape}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(frames[..., :3])


def _even(frames: np.ndarray) -> np.ndarray:
    # yuv420p stores colour per 2x2 block: odd sizes get one replicated edge row / column.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _check_fps(fps: float) -> Fraction:
    if not 0 < fps <= 240:
        raise ValueError(f"fps must be in (0, 240]; got {fps}")
    return Fraction(fps).limit_denominator(1001)


def _write_pyav(
    frames: np.ndarray, path: Path, fps: float, fmt: VideoFormat, quality: int, metadata: Mapping[str, str]
) -> None:
    av = require("av")
    rate = _check_fps(fps)
    frames = _even(frames)
    options = {"movflags": "+faststart"} if fmt.name == "mp4" else {}
    with av.open(str(path), mode="w", options=options) as container:
        if fmt.name == "mp4":
            stream = container.add_stream("libx264", rate=rate)
            stream.options = {"crf": str(round(35 - 0.2 * quality)), "preset": "medium"}
        else:
            stream = container.add_stream("libvpx-vp9", rate=rate)
            stream.options = {"crf": str(round(50 - 0.25 * quality)), "b": "0", "row-mt": "1"}
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for key, value in metadata.items():
            container.metadata[key] = value
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_pillow(
    frames: np.ndarray,
    path: Path,
    fps: float,
    fmt: VideoFormat,
    quality: int,
    loop: int,
    metadata: Mapping[str, str],
) -> None:
    from PIL import Image

    _check_fps(fps)
    images = [Image.fromarray(f) for f in frames]
    duration = max(round(1000.0 / fps), 1)
    if fmt.name == "gif":
        # GIF stores delays in 1/100 s: alternate the rounding so the clip keeps its length (8 fps: 120, 130, ...).
        ticks = [round(i * 100.0 / fps) for i in range(len(images) + 1)]
        durations = [max(b - a, 1) * 10 for a, b in zip(ticks, ticks[1:], strict=False)]
        images[0].save(
            str(path),
            save_all=True,
            append_images=images[1:],
            duration=durations,
            loop=loop,
            disposal=1,
            optimize=False,
            comment=metadata.get("comment", "").encode(),
        )
    else:
        images[0].save(
            str(path),
            format="WEBP",
            save_all=True,
            append_images=images[1:],
            duration=duration,
            loop=loop,
            quality=int(quality),
            method=4,
            lossless=False,
        )


def write_video(
    frames,
    path: str | os.PathLike,
    fps: float,
    fmt: str = "mp4",
    quality: int = 80,
    loop: int = 0,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `frames` ((F, H, W, 3) float 0..1 or uint8) to `path` as `fmt`; returns the path.

    ``loop`` is the GIF / WebP loop count (0 = forever). ``metadata`` (str -> str) goes into the MP4 /
    WebM container tags and the GIF comment.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown video format {fmt!r}; choose one of {sorted(FORMATS)}")
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be 0-100; got {quality}")
    video_format = FORMATS[fmt]
    array = to_uint8(frames)
    if not len(array):
        raise ValueError("no frames to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial." + video_format.extension)
    try:
        if video_format.writer == "pyav":
            _write_pyav(array, tmp, fps, video_format, quality, dict(metadata or {}))
        else:
            _write_pillow(array, tmp, fps, video_format, quality, loop, dict(metadata or {}))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@dataclass(frozen=True)
class SavedVideo:
    """A video written into an output folder, as ComfyUI's UI and history report it."""

    path: str
    filename: str
    subfolder: str
    type: str
    format: str
    fps: float
    frame_count: int
    width: int
    height: int

    def ui_entry(self) -> dict[str, str]:
        """The ``{"filename", "subfolder", "type"}`` entry of ``ui["images"]`` (what /view takes)."""
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


def save_video(
    frames,
    output_dir: str | os.PathLike,
    prefix: str = "video/CharForge",
    *,
    fps: float = 8.0,
    fmt: str = "mp4",
    quality: int = 80,
    loop: int = 0,
    metadata: Mapping[str, str] | None = None,
    folder_type: str = "output",
) -> SavedVideo:
    """Write `frames` under `output_dir` with the ComfyUI naming convention (see the module docstring)."""
    array = to_uint8(frames)
    height, width = array.shape[1:3]
    target = save_path(prefix, output_dir, width, height)
    path = write_video(array, target.file(FORMATS[fmt].extension), fps, fmt, quality, loop, metadata)
    return SavedVideo(
        str(path),
        path.name,
        target.subfolder.replace(os.sep, "/"),
        folder_type,
        fmt,
        float(fps),
        len(array),
        width,
        height,
    )


def generation_metadata(info: Mapping[str, object]) -> dict[str, str]:
    """Container tags describing how a clip was made (JSON in ``comment``)."""
    return {"comment": json.dumps(dict(info), default=str, sort_keys=True), "encoder": "CharForge"}


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: float
    width: int
    height: int
    metadata: dict

    @property
    def frame_count(self) -> int:
        return int(self.frames.shape[0])


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> DecodedVideo:
    """Decode a video or animated image file (mp4, webm, mov, mkv, gif, webp, apng) into RGB frames."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    if path.suffix.lower() in (".gif", ".webp", ".png", ".apng"):
        return _read_pillow(path, max_frames)
    av = require("av")
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or 0
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames and len(frames) >= max_frames:
                break
        metadata = dict(container.metadata)
    if not frames:
        raise ValueError(f"{path.name}: no video frames")
    array = np.stack(frames)
    return DecodedVideo(array, float(rate), array.shape[2], array.shape[1], metadata)


def _read_pillow(path: Path, max_frames: int | None) -> DecodedVideo:
    from PIL import ImageSequence

    frames, durations = [], []
    with open_image(path) as image:
        info = dict(image.info)
        for frame in ImageSequence.Iterator(image):
            frames.append(np.asarray(frame.convert("RGB")))
            durations.append(frame.info.get("duration", info.get("duration", 0)) or 0)
            if max_frames and len(frames) >= max_frames:
                break
    array = np.stack(frames)
    mean = float(np.mean(durations)) if durations else 0.0
    fps = 1000.0 / mean if mean > 0 else 0.0
    metadata = {
        k: v.decode(errors="replace") if isinstance(v, bytes) else str(v)
        for k, v in info.items()
        if k in ("comment", "loop")
    }
    return DecodedVideo(array, fps, array.shape[2], array.shape[1], metadata)
