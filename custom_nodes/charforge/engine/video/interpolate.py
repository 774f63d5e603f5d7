"""Frame interpolation by optical flow (OpenCV Farneback): x2 / x4 frames with no model download.

Between two frames A and B the dense flow is estimated both ways. A frame at time t (0 < t < 1) is
drawn twice, from A moved t of the way along A->B and from B moved (1 - t) of the way back along B->A,
and the two are mixed (1 - t) : t. Both warps sample their source at the target pixel's position minus
the scaled flow found *at the target pixel*, the usual backward-warping approximation: good for the
small, smooth motion between AnimateDiff frames, soft at occlusion edges.

``N`` frames become ``(N - 1) * multiplier + 1`` (the original frames stay, in place), or
``N * multiplier`` with ``loop`` (the last frame is also blended into the first), so playing at
``fps * multiplier`` keeps the clip's timing.

The learned interpolator (RIFE 4.7 - 4.9 files in ``models/frame_interpolation``) is `rife.py`; it returns
the same frame layout.
"""

from __future__ import annotations

import numpy as np

from ...deps import require
from ..control import Control

MULTIPLIERS = (2, 3, 4, 8)


def _flow(cv2, a_gray: np.ndarray, b_gray: np.ndarray) -> np.ndarray:
    # More pyramid levels for larger frames, so motion of a few percent of the width is still found.
    levels = max(3, min(6, int(np.log2(max(a_gray.shape) / 32))))
    return cv2.calcOpticalFlowFarneback(
        a_gray,
        b_gray,
        None,
        pyr_scale=0.5,
        levels=levels,
        winsize=15,
        iterations=3,
        poly_n=5,
        poly_sigma=1.2,
        flags=0,
    )


def _warp(
    cv2, image: np.ndarray, flow: np.ndarray, amount: float, grid: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    map_x = grid[0] - amount * flow[..., 0]
    map_y = grid[1] - amount * flow[..., 1]
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def between(a: np.ndarray, b: np.ndarray, times: list[float]) -> list[np.ndarray]:
    """Frames at `times` (each in (0, 1)) between float32 RGB frames `a` and `b` (H, W, 3) in 0..1."""
    cv2 = require("cv2")
    to_gray = cv2.COLOR_RGB2GRAY
    a_gray = (cv2.cvtColor(a, to_gray) * 255).astype(np.uint8)
    b_gray = (cv2.cvtColor(b, to_gray) * 255).astype(np.uint8)
    forward = _flow(cv2, a_gray, b_gray)
    backward = _flow(cv2, b_gray, a_gray)
    h, w = a.shape[:2]
    grid = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    out = []
    for t in times:
        from_a = _warp(cv2, a, forward, t, grid)
        from_b = _warp(cv2, b, backward, 1.0 - t, grid)
        out.append(np.clip((1.0 - t) * from_a + t * from_b, 0.0, 1.0))
    return out


def interpolate_frames(
    frames, multiplier: int = 2, loop: bool = False, control: Control | None = None
) -> np.ndarray:
    """`frames` (N, H, W, 3) float 0..1 (array or tensor) with ``multiplier - 1`` new frames between each pair.

    Returns float32 (M, H, W, 3); see the module docstring for M. `control` gets the progress (and may stop
    the work) after each frame pair.
    """
    if multiplier not in MULTIPLIERS:
        raise ValueError(f"multiplier must be one of {MULTIPLIERS}; got {multiplier}")
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().float().numpy()
    frames = np.ascontiguousarray(np.asarray(frames, dtype=np.float32)[..., :3])
    if frames.ndim != 4:
        raise ValueError(f"frames must be (N, H, W, 3); got shape {frames.shape}")
    count = len(frames)
    if count < 2:
        return frames.copy()
    pairs = [(i, i + 1) for i in range(count - 1)] + ([(count - 1, 0)] if loop else [])
    times = [k / multiplier for k in range(1, multiplier)]
    out = []
    for done, (i, j) in enumerate(pairs, start=1):
        out.append(frames[i])
        out.extend(between(frames[i], frames[j], times))
        if control is not None:
            control.progress(done, len(pairs))
    if not loop:
        out.append(frames[-1])
    return np.stack(out).astype(np.float32, copy=False)


def interpolated_count(count: int, multiplier: int, loop: bool = False) -> int:
    """How many frames `interpolate_frames` returns for `count` input frames."""
    if count < 2:
        return count
    return count * multiplier if loop else (count - 1) * multiplier + 1
