"""The loss-curve image, drawn with Pillow alone (no plotting library needed in ComfyUI's Python)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (the first points are not dragged towards 0)."""
    out, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**index))
    return out


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def loss_curve(
    steps: Sequence[int], losses: Sequence[float], size: tuple[int, int] = (768, 384), title: str = "loss"
):
    """A PIL image of the per-step loss (light) and its moving average (dark), with axis labels.

    Constant or empty series draw fine (ComfyUI's own loss graph divides by the range and fails there).
    """
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, 16, 28, 36
    draw.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
    points = [(s, v) for s, v in zip(steps, losses, strict=False) if math.isfinite(v)]
    draw.text(
        (left, 8),
        f"{title}: {len(points)} step(s)" + (f", last {_fmt(points[-1][1])}" if points else ""),
        fill=(0, 0, 0),
    )
    if not points:
        return image
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_min, x_max = min(xs), max(xs)
    y_min, y_max = min(ys), max(ys)
    if y_max - y_min < 1e-12:
        y_min, y_max = y_min - 0.5 * (abs(y_min) or 1.0), y_max + 0.5 * (abs(y_max) or 1.0)
    if x_max == x_min:
        x_min, x_max = x_min - 1, x_max + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_xy(x: float, y: float) -> tuple[float, float]:
        return left + (x - x_min) / (x_max - x_min) * plot_w, top + (
            1 - (y - y_min) / (y_max - y_min)
        ) * plot_h

    for fraction in (0.0, 0.5, 1.0):
        y = y_min + fraction * (y_max - y_min)
        _, py = to_xy(x_min, y)
        draw.line([left - 4, py, left, py], fill=(120, 120, 120))
        draw.text((4, py - 6), _fmt(y), fill=(60, 60, 60))
    for x in (x_min, x_max):
        px, _ = to_xy(x, y_min)
        draw.text((px - 10, height - bottom + 6), str(int(x)), fill=(60, 60, 60))
    draw.text((width // 2 - 14, height - 16), "step", fill=(60, 60, 60))
    if len(points) == 1:
        px, py = to_xy(xs[0], ys[0])
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(30, 90, 200))
        return image
    draw.line([to_xy(x, y) for x, y in points], fill=(170, 200, 240), width=1)
    draw.line([to_xy(x, y) for x, y in zip(xs, smooth(ys), strict=True)], fill=(20, 70, 180), width=2)
    return image
