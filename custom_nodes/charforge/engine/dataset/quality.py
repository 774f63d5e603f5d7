"""Per-image quality measures: sharpness and exposure.

Sharpness is the variance of the Laplacian of the grey image, measured after scaling the image so its
long side is `ANALYSIS_SIZE` pixels: the raw measure grows with resolution, so without the rescale a
sharp small photo would score below a blurry large one. Values above ~100 are typically sharp, below
~30 clearly blurred (8-bit scale).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...deps import require

ANALYSIS_SIZE = 512
DARK_LEVEL = 5  # 8-bit levels at or below 2 % luminance (0.02 * 255)
BRIGHT_LEVEL = 250  # at or above 98 %


@dataclass(frozen=True)
class ImageQuality:
    sharpness: float  # variance of the Laplacian at ANALYSIS_SIZE, 8-bit scale
    brightness: float  # mean luminance, 0..1
    contrast: float  # standard deviation of luminance, 0..1
    dark_fraction: float  # share of pixels at or below 2 % luminance
    bright_fraction: float  # share of pixels at or above 98 % luminance

    def as_dict(self) -> dict:
        return {key: round(value, 4) for key, value in asdict(self).items()}


def measure_quality(rgb) -> ImageQuality:
    """Quality of one image given as an HxWx3 array (uint8 0..255 or float 0..1)."""
    np = require("numpy")
    cv2 = require("cv2")
    image = np.asarray(rgb)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return measure_grey(analysis_grey(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)))


def analysis_grey(grey):
    """A grey uint8 image scaled so its long side is `ANALYSIS_SIZE` (the scale sharpness is defined at)."""
    cv2 = require("cv2")
    scale = ANALYSIS_SIZE / max(grey.shape)
    if scale != 1.0:
        interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
        grey = cv2.resize(
            grey,
            (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale))),
            interpolation=interpolation,
        )
    return grey


def measure_grey(grey) -> ImageQuality:
    """Quality of a grey uint8 image already at the analysis scale (see `analysis_grey`)."""
    np = require("numpy")
    cv2 = require("cv2")
    sharpness = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    mean, std = cv2.meanStdDev(grey)
    histogram = np.bincount(grey.ravel(), minlength=256)
    total = max(int(grey.size), 1)
    return ImageQuality(
        sharpness=sharpness,
        brightness=float(mean[0, 0]) / 255.0,
        contrast=float(std[0, 0]) / 255.0,
        dark_fraction=float(histogram[: DARK_LEVEL + 1].sum()) / total,
        bright_fraction=float(histogram[BRIGHT_LEVEL:].sum()) / total,
    )
