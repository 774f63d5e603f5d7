"""Conversions between ComfyUI's value types and the engine's plain values."""

from __future__ import annotations

import os

from .. import bridge
from ..deps import require


def resolve_folder(folder: str) -> str:
    """An absolute folder as given, or a folder relative to ComfyUI's input directory."""
    folder = os.path.expanduser(folder.strip().strip('"'))
    if not folder:
        raise ValueError("folder is empty: type the path of a folder of photos")
    if os.path.isabs(folder):
        return folder
    return os.path.join(bridge.input_directory(), folder)


def pil_to_image_batch(images: list):
    """PIL images of one size -> ComfyUI IMAGE tensor [B, H, W, 3], float32 in 0..1."""
    np = require("numpy")
    torch = require("torch")
    if not images:
        raise ValueError("cannot build an IMAGE batch from zero images")
    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays))


def empty_image_batch(size: int = 64, like=None):
    """A one-image black batch: what a node returns for IMAGE when it has nothing to show.

    ComfyUI has no empty IMAGE value that every downstream node accepts, so an empty result is shown as
    one black frame and the count output says 0. With `like` (an IMAGE batch) the frame has its size and dtype.
    """
    torch = require("torch")
    if like is not None:
        return torch.zeros((1, *like.shape[1:]), dtype=like.dtype)
    return torch.zeros((1, size, size, 3), dtype=torch.float32)
