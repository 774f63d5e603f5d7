"""Edge and line maps for ControlNet, with OpenCV only (no model files).

- ``canny_map``: OpenCV's Canny edges of the grey photo (white edges on black, as Canny ControlNets expect),
  with the two hysteresis thresholds in 0..255 pixel-gradient units;
- ``line_art_map``: a model-free line drawing (white lines on black, the convention of line-art ControlNets):
  the grey photo divided by its blurred self (a colour dodge), so flat regions go to 1 and only edges and
  fine detail stay dark, inverted and stretched. It is not one of the learned line-art extractors; those need
  their own weights.
"""

from __future__ import annotations

import numpy as np

from ...deps import require


def _grey(image_rgb: np.ndarray) -> np.ndarray:
    cv2 = require("cv2")
    return cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2GRAY)


def canny_map(image_rgb: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 Canny edges, white on black."""
    cv2 = require("cv2")
    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high (got low={low}, high={high})")
    edges = cv2.Canny(_grey(image_rgb), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def line_art_map(image_rgb: np.ndarray, blur: float = 4.0, strength: float = 8.0) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 line drawing, white lines on black.

    `blur` is the Gaussian sigma (pixels) the photo is divided by; `strength` multiplies the darkening, so
    fainter detail shows as it grows."""
    cv2 = require("cv2")
    if blur <= 0 or strength <= 0:
        raise ValueError(f"line art needs blur > 0 and strength > 0 (got blur={blur}, strength={strength})")
    grey = _grey(image_rgb).astype(np.float32)
    blurred = cv2.GaussianBlur(grey, (0, 0), sigmaX=blur)
    dodge = np.clip(
        (grey + 1.0) / (blurred + 1.0), 0.0, 1.0
    )  # 1 on flat areas, < 1 just on the dark side of edges
    lines = np.clip((1.0 - dodge) * strength, 0.0, 1.0)
    out = (lines * 255.0).round().astype(np.uint8)
    return np.repeat(out[:, :, None], 3, axis=2)
