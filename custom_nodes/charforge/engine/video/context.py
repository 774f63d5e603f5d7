"""Context windows: clips longer than a motion module's window, denoised in overlapping pieces.

A motion module attends over the frames it is given and was trained on 16 of them; longer clips go
through the U-Net one window of ``length`` frames at a time. Windows overlap by ``overlap`` frames and
every denoising step blends the windows' noise predictions frame by frame with weights that fall off
towards a window's edges (``pyramid``), so a frame near a seam is mostly decided by the window it sits
in the middle of. The last window is aligned to the clip's end, so no window is short. With ``loop``
the windows wrap around the end of the clip and the last frames blend into the first, for clips that
play in a loop.

Memory stays that of one window whatever the clip length: only the latents grow with the frame count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FUSE_METHODS = ("pyramid", "flat")


@dataclass(frozen=True)
class ContextOptions:
    """How a long clip is split. ``length`` 0 means the motion module's own window (16)."""

    length: int = 16
    overlap: int = 4
    fuse: str = "pyramid"
    loop: bool = False

    def __post_init__(self):
        if self.fuse not in FUSE_METHODS:
            raise ValueError(f"context fuse {self.fuse!r}: choose one of {FUSE_METHODS}")
        if self.length < 0 or self.overlap < 0:
            raise ValueError("context length and overlap must not be negative")


def context_windows(frames: int, length: int, overlap: int, loop: bool = False) -> list[list[int]]:
    """Frame indices of each window covering `frames` frames (one window when the clip fits in one)."""
    if frames < 1:
        raise ValueError(f"frames must be at least 1 (got {frames})")
    if length < 1:
        raise ValueError(f"context length must be at least 1 (got {length})")
    if frames <= length:
        return [list(range(frames))]
    if overlap >= length:
        raise ValueError(f"context overlap ({overlap}) must be smaller than the context length ({length})")
    stride = length - overlap
    if loop:
        starts = list(range(0, frames, stride))
        return [[(start + i) % frames for i in range(length)] for start in starts]
    starts = list(range(0, frames - length, stride)) + [frames - length]
    return [list(range(start, start + length)) for start in dict.fromkeys(starts)]


def window_weights(length: int, fuse: str = "pyramid") -> torch.Tensor:
    """Blend weight of each position in a window: a triangle peaking in the middle, or all ones."""
    if fuse == "flat":
        return torch.ones(length)
    if fuse == "pyramid":
        positions = torch.arange(length, dtype=torch.float32)
        return torch.minimum(positions + 1, length - positions)
    raise ValueError(f"context fuse {fuse!r}: choose one of {FUSE_METHODS}")
