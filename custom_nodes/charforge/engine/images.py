"""Opening image files with a pixel limit: the one way the pack opens an image it did not make itself.

A PNG of 20 KB can declare 13000 x 13000 pixels and decode to gigabytes; Pillow's own guard only refuses
images above about 179 MP. `open_image` reads the header (which costs nothing) and refuses an image
above the limit before a single pixel is decoded, with `ImageTooLarge` saying "too large: W x H".

The limit is `DEFAULT_MAX_PIXELS` (50 MP, more than any camera photo a LoRA dataset needs), changed by
the environment variable ``CHARFORGE_MAX_IMAGE_PIXELS`` (a number of pixels, e.g. ``100000000``) or a
function's `max_pixels` argument. Pillow's own limit still applies on top (it raises
``DecompressionBombError`` above twice ``PIL.Image.MAX_IMAGE_PIXELS``); the pack never changes that
process-wide setting, since ComfyUI shares it.

`decode_slot(pixels)` bounds how many pixels the dataset stages decode at once across all their worker
threads (`decode_budget()`: four times the limit), so memory stays bounded whatever the folder holds
and however many workers run.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

ENV_VAR = "CHARFORGE_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000
BUDGET_FACTOR = 4  # decode_budget() = BUDGET_FACTOR * max_image_pixels()


class ImageTooLarge(ValueError):
    """An image with more pixels than the limit; refused before it was decoded.

    `reason` is the short form for reports ("too large: 13000 x 13000 (169.0 MP; limit 50 MP ...)").
    """

    def __init__(self, path: str | os.PathLike, size: tuple[int, int] | None, limit: int):
        self.path = str(path)
        self.size = size
        self.limit = limit
        what = (
            f"{size[0]} x {size[1]} ({size[0] * size[1] / 1e6:.1f} MP"
            if size
            else "(more pixels than Pillow allows"
        )
        self.reason = (
            f"too large: {what}; the limit is {limit / 1e6:g} MP: shrink the image, or raise the limit "
            f"with {ENV_VAR})"
        )
        super().__init__(f"{self.path}: {self.reason}")


def max_image_pixels(override: int | None = None) -> int:
    """The pixel limit: `override` when given, else ``$CHARFORGE_MAX_IMAGE_PIXELS``, else 50 MP."""
    if override is not None:
        value: Any = override
        source = "max_pixels"
    else:
        value = os.environ.get(ENV_VAR, "").strip().replace("_", "")
        source = f"${ENV_VAR}"
        if not value:
            return DEFAULT_MAX_PIXELS
    try:
        limit = int(float(value))
    except (TypeError, ValueError):
        raise ValueError(
            f"{source} must be a number of pixels such as 100000000, got {str(value)[:40]!r}"
        ) from None
    if limit < 1:
        raise ValueError(f"{source} must be at least 1 pixel, got {limit}")
    return limit


def check_size(size: tuple[int, int], path: str | os.PathLike, max_pixels: int | None = None) -> None:
    """Raise `ImageTooLarge` when an image of `size` (width, height) is above the limit."""
    limit = max_image_pixels(max_pixels)
    if size[0] * size[1] > limit:
        raise ImageTooLarge(path, (int(size[0]), int(size[1])), limit)


def open_image(path: str | os.PathLike, max_pixels: int | None = None):
    """``PIL.Image.open(path)`` (lazy: nothing decoded yet) after checking the header's size against the limit.

    Use it as ``with open_image(path) as img:``. Raises `ImageTooLarge` above the limit, and whatever Pillow
    raises for a file that is not an image.
    """
    from PIL import Image

    limit = max_image_pixels(max_pixels)
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:
        raise ImageTooLarge(path, None, limit) from None
    try:
        check_size(image.size, path, limit)
    except ImageTooLarge:
        image.close()
        raise
    return image


# --------------------------------------------------------------------------------------------------
# Bounding what several worker threads decode at once


def decode_budget() -> int:
    """Pixels the dataset stages may decode at the same time, over all worker threads."""
    return BUDGET_FACTOR * max_image_pixels()


class _PixelBudget:
    def __init__(self):
        self._used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def slot(self, pixels: int, budget: int) -> Iterator[None]:
        pixels = max(1, min(int(pixels), budget))  # one image alone always fits
        with self._cond:
            self._cond.wait_for(lambda: self._used + pixels <= budget or self._used == 0)
            self._used += pixels
        try:
            yield
        finally:
            with self._cond:
                self._used -= pixels
                self._cond.notify_all()

    @property
    def used(self) -> int:
        return self._used


_BUDGET = _PixelBudget()


def decode_slot(pixels: int) -> contextlib.AbstractContextManager[None]:
    """Hold `pixels` of the shared decode budget while decoding; waits while other threads use it up."""
    return _BUDGET.slot(pixels, decode_budget())
