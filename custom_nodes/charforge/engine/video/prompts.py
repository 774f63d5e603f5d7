"""Prompt travel: a prompt schedule by frame index, turned into one text embedding per frame.

A schedule is written one keyframe per line, ``<frame>: <prompt>``; quotes and a trailing comma are
allowed, so the JSON-like form other packs use (``"0": "smiling", "16": "waving",``) reads the same::

    0: ohwx woman standing on a beach, smiling
    16: ohwx woman waving at the camera
    32: ohwx woman walking away
    masterpiece, golden hour            <- a line without a frame number is added to every keyframe

Frames before the first keyframe use the first prompt, frames after the last the last one. Between two
keyframes the embeddings are blended linearly by frame position (or switch at the next keyframe when
blending is off). Text without any keyframe line is one prompt for the whole clip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_KEYFRAME = re.compile(r'\s*"?(\d+)"?\s*:\s*(.*?)\s*,?\s*')


@dataclass(frozen=True)
class Keyframe:
    frame: int
    prompt: str


@dataclass(frozen=True)
class FrameBlend:
    """Frame `frame` shows ``(1 - t) * keyframes[first] + t * keyframes[second]``."""

    frame: int
    first: int
    second: int
    t: float


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return text.strip()


def parse_prompt_schedule(text: str) -> list[Keyframe]:
    """Keyframes of a prompt text, sorted by frame (a later line for the same frame wins).

    Without keyframe lines the whole text is one keyframe at frame 0.
    """
    keyframes: dict[int, str] = {}
    shared: list[str] = []
    for line in (text or "").splitlines():
        if not line.strip() or line.strip() in ("{", "}"):
            continue
        m = _KEYFRAME.fullmatch(line)
        if m:
            keyframes[int(m.group(1))] = _unquote(m.group(2))
        else:
            shared.append(_unquote(line.strip().rstrip(",")))
    if not keyframes:
        return [Keyframe(0, ", ".join(p for p in shared if p))]
    suffix = ", ".join(p for p in shared if p)
    return [
        Keyframe(frame, ", ".join(p for p in (prompt, suffix) if p))
        for frame, prompt in sorted(keyframes.items())
    ]


def frame_blends(keyframes: list[Keyframe], frames: int, blend: bool = True) -> list[FrameBlend]:
    """For each of `frames` frames, which two keyframes it mixes and how much of the second."""
    if not keyframes:
        raise ValueError("a prompt schedule needs at least one keyframe")
    out = []
    for frame in range(frames):
        after = next((i for i, k in enumerate(keyframes) if k.frame > frame), None)
        if after is None:
            last = len(keyframes) - 1
            out.append(FrameBlend(frame, last, last, 0.0))
        elif after == 0:
            out.append(FrameBlend(frame, 0, 0, 0.0))
        else:
            a, b = keyframes[after - 1], keyframes[after]
            t = (frame - a.frame) / (b.frame - a.frame) if blend else 0.0
            out.append(FrameBlend(frame, after - 1, after, t))
    return out


def describe_schedule(keyframes: list[Keyframe], frames: int) -> str:
    """One line per keyframe that is inside the clip, for the node's report."""
    shown = [k for k in keyframes if k.frame < frames] or keyframes[:1]
    return "\n".join(f"frame {k.frame}: {k.prompt}" for k in shown)
