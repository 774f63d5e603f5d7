"""Depth maps for ControlNet from a Depth Anything model, through transformers' own classes, offline.

A model is a folder (models/depth_anything/<name>: ``config.json`` and the weights, as published by the
Depth Anything authors on the Hugging Face hub) loaded with ``DepthAnythingForDepthEstimation``. The photo is
resized so both sides are multiples of the patch size (14) with the shorter side near `DEFAULT_SIZE` (518, the
training size), keeping its aspect, normalised with the ImageNet mean and std; the predicted relative depth
(larger = nearer) is resized back to the photo with bicubic interpolation and scaled to 0..255 over its own
range, so the nearest point is white and the farthest black, as depth ControlNets were trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...deps import require

DEFAULT_SIZE = 518
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class DepthModelNotFoundError(FileNotFoundError):
    """The Depth Anything folder is missing or incomplete."""


def find_depth_model(folder: str | Path) -> Path:
    """`folder` if it holds config.json and weights, or an error naming the folder and the files."""
    folder = Path(folder)
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise DepthModelNotFoundError(
            f"depth maps need a Depth Anything model folder (config.json and its weights, as on the Hugging Face "
            f"hub) at {folder}; missing: {', '.join(missing)}"
        )
    return folder


def input_size(height: int, width: int, size: int = DEFAULT_SIZE, multiple: int = 14) -> tuple[int, int]:
    """(h, w) for the model: the shorter side scaled to `size`, both rounded to multiples of `multiple`."""
    scale = size / min(height, width)
    return (
        max(multiple, int(round(height * scale / multiple)) * multiple),
        max(multiple, int(round(width * scale / multiple)) * multiple),
    )


def pixel_values(image_rgb: np.ndarray, size: int = DEFAULT_SIZE, multiple: int = 14) -> Any:
    """(H, W, 3) uint8 RGB -> (1, 3, h, w) float32 tensor, resized bicubically and ImageNet-normalised."""
    torch = require("torch")
    cv2 = require("cv2")
    h, w = input_size(image_rgb.shape[0], image_rgb.shape[1], size, multiple)
    resized = cv2.resize(image_rgb, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    normed = (resized - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(normed.transpose(2, 0, 1)))[None]


def to_depth_map(predicted: Any, height: int, width: int) -> np.ndarray:
    """Predicted relative depth (1, h, w) -> (H, W, 3) uint8, nearest white, farthest black."""
    torch = require("torch")
    depth = torch.nn.functional.interpolate(
        predicted[:, None].float(), size=(height, width), mode="bicubic", align_corners=False
    )[0, 0]
    low, high = depth.min(), depth.max()
    flat = float(predicted.max() - predicted.min()) == 0  # bicubic rounding would make noise of a constant
    scaled = torch.zeros_like(depth) if flat else (depth - low) / (high - low)
    grey = (scaled * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return np.repeat(grey[:, :, None], 3, axis=2)


class DepthEstimator:
    """A Depth Anything model loaded once from its folder."""

    def __init__(self, folder: str | Path, device: str = "cpu", size: int = DEFAULT_SIZE):
        transformers = require("transformers")
        path = find_depth_model(folder)
        self.model = transformers.DepthAnythingForDepthEstimation.from_pretrained(
            str(path), local_files_only=True
        )
        self.model.to(device).eval()
        self.device = device
        self.size = size
        self.multiple = int(self.model.config.patch_size)

    def predict(self, image_rgb: np.ndarray) -> Any:
        """The model's predicted relative depth (1, h, w) for an (H, W, 3) uint8 RGB image."""
        torch = require("torch")
        values = pixel_values(image_rgb, self.size, self.multiple).to(self.device)
        with torch.inference_mode():
            return self.model(pixel_values=values).predicted_depth

    def depth_map(self, image_rgb: np.ndarray) -> np.ndarray:
        """The ControlNet depth map of an (H, W, 3) uint8 RGB image, same size."""
        return to_depth_map(self.predict(image_rgb), image_rgb.shape[0], image_rgb.shape[1])
