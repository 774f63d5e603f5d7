"""Tiled upscaling with any spandrel upscale model, in bounded memory.

The photo is cut into tiles of `tile` input pixels; each tile is run with `pad` pixels of its
neighbours around it (so the network sees the same context as on the whole image) and only the tile's own
part of the output is kept. Every output pixel is written once, straight into the 8-bit result, so memory
is the result itself plus one padded tile's tensors, whatever the photo's size:

    peak ~ out_w x out_h x 3 bytes  +  model activations for (tile + 2 pad)^2 pixels

`upscale_to` enlarges a photo until it covers a target size (applying the model once or more) and then
resizes it to exactly that size, which is what the dataset's crop stage needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ...deps import require
from ..control import Control
from .models import ImageModel

DEFAULT_TILE = 512
DEFAULT_PAD = 32


def tile_boxes(width: int, height: int, tile: int) -> list[tuple[int, int, int, int]]:
    """The (x1, y1, x2, y2) tiles covering a width x height image, row by row."""
    return [
        (x, y, min(x + tile, width), min(y + tile, height))
        for y in range(0, height, tile)
        for x in range(0, width, tile)
    ]


def upscale_tiled(
    model: ImageModel,
    rgb,
    tile: int = DEFAULT_TILE,
    pad: int = DEFAULT_PAD,
    control: Control | None = None,
    on_tile: Callable[[int, int], None] | None = None,
) -> Any:
    """`rgb` (H x W x 3 uint8) enlarged `model.scale` times, tile by tile; returns uint8.

    `control` advances per tile and can stop the work between tiles.
    """
    np = require("numpy")
    torch = require("torch")
    if tile < 16:
        raise ValueError(f"tile {tile} is too small: use 64 or more (512 is ComfyUI's default)")
    scale = model.scale
    height, width = rgb.shape[:2]
    out = np.empty((height * scale, width * scale, 3), np.uint8)
    boxes = tile_boxes(width, height, tile)
    device = model.device
    for index, (x1, y1, x2, y2) in enumerate(boxes):
        if control is not None:
            control.check()
        px1, py1 = max(x1 - pad, 0), max(y1 - pad, 0)
        px2, py2 = min(x2 + pad, width), min(y2 + pad, height)
        piece = torch.from_numpy(np.ascontiguousarray(rgb[py1:py2, px1:px2])).to(device, torch.float32)
        piece = piece.permute(2, 0, 1)[None] / 255.0
        with torch.inference_mode():
            result = model.descriptor(piece)
        result = result[
            0, :, (y1 - py1) * scale : (y2 - py1) * scale, (x1 - px1) * scale : (x2 - px1) * scale
        ]
        values = result.clamp(0.0, 1.0).mul(255.0).add(0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        out[y1 * scale : y2 * scale, x1 * scale : x2 * scale] = values
        del piece, result
        if on_tile is not None:
            on_tile(index + 1, len(boxes))
    return out


def passes_needed(scale: int, factor: float) -> int:
    """How many times a `scale`x model must run to enlarge by at least `factor`."""
    if factor <= 1.0:
        return 0
    return max(1, math.ceil(math.log(factor) / math.log(scale) - 1e-9))


def upscale_to(
    model: ImageModel,
    rgb,
    size: tuple[int, int],
    tile: int = DEFAULT_TILE,
    pad: int = DEFAULT_PAD,
    control: Control | None = None,
) -> Any:
    """`rgb` enlarged with the model until it covers `size` (width, height), then resized to exactly `size`.

    An image that already covers `size` is only resized.
    """
    from ..dataset.images import resize

    height, width = rgb.shape[:2]
    factor = max(size[0] / width, size[1] / height)
    for _ in range(passes_needed(model.scale, factor)):
        rgb = upscale_tiled(model, rgb, tile, pad, control)
    if (rgb.shape[1], rgb.shape[0]) != tuple(size):
        rgb = resize(rgb, (size[0], size[1]))
    return rgb
