"""Aligned face crops and feathered paste-back: the geometry shared by face swap and face restoration.

A face model works on a square crop in which the five landmarks (eyes, nose, mouth corners) sit at fixed
template positions. `align_matrix` finds the similarity transform (rotation, uniform scale, shift) from
the photo to that crop; `paste_back` warps the model's output back into the photo through the inverse
transform and blends it in with a feathered mask.

Only the pixels under the mask change: the blend is computed inside the mask's bounding box and written
there alone, and pixels where the mask is zero keep their exact original values (the mask is eroded away
from the crop's border first, so the crop's edge and the resampling fringe never show).
"""

from __future__ import annotations

from typing import Any

from ...deps import require

# ArcFace's 112 px five-point template (insightface's alignment; eyes, nose, mouth corners), the reference
# both templates below are made from.
ARCFACE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)
# The 512 px FFHQ-style template face-restoration models (GFPGAN, CodeFormer, RestoreFormer) were trained on:
# a looser crop with hair and chin, eyes about 126 px apart.
FFHQ_512 = (
    (192.98138, 239.94708),
    (318.90277, 240.1936),
    (256.63416, 314.01935),
    (201.26117, 371.41043),
    (313.08905, 371.15118),
)


def template(points: tuple[tuple[float, float], ...], size: int, reference: int) -> Any:
    """A template made for a `reference` px crop, scaled to a `size` px crop (5 x 2 float32)."""
    np = require("numpy")
    return np.asarray(points, np.float32) * (size / reference)


def align_matrix(landmarks, destination) -> Any:
    """The 2 x 3 similarity transform taking the five `landmarks` (photo pixels) onto `destination`."""
    np = require("numpy")
    cv2 = require("cv2")
    source = np.asarray(landmarks, np.float32).reshape(5, 2)
    matrix, _ = cv2.estimateAffinePartial2D(source, np.asarray(destination, np.float32), method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("the face's landmarks are degenerate (all in one place); it cannot be aligned")
    return matrix.astype(np.float32)


def aligned_crop(rgb, matrix, size: int) -> Any:
    """The `size` x `size` crop `matrix` maps the photo into (edges replicated, so no black border)."""
    cv2 = require("cv2")
    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def feather_mask(size: int, erode: float = 0.1, blur: float = 0.05) -> Any:
    """A `size` x `size` float mask for a square crop: 1 inside, 0 in a border of `erode` x size, and a soft
    edge `blur` x size wide between (a share of the crop's side, so it scales with the face)."""
    np = require("numpy")
    cv2 = require("cv2")
    border = max(1, int(round(size * erode)))
    mask = np.zeros((size, size), np.float32)
    mask[border : size - border, border : size - border] = 1.0
    radius = int(round(size * blur))
    if radius > 0:
        kernel = 2 * radius + 1
        mask = cv2.GaussianBlur(mask, (kernel, kernel), 0)
        # The blur must not lift the outer border off zero: that ring is "outside the face".
        mask[: border // 2 + 1, :] = 0.0
        mask[-(border // 2 + 1) :, :] = 0.0
        mask[:, : border // 2 + 1] = 0.0
        mask[:, -(border // 2 + 1) :] = 0.0
    return mask


def paste_back(rgb, crop, matrix, mask=None) -> tuple[Any, tuple[int, int, int, int] | None]:
    """`rgb` with `crop` (the model's output for the aligned crop `matrix` made) blended back in.

    Returns a new image and the box (x1, y1, x2, y2) that changed, or None when the face lies outside the
    photo. `mask` (crop-sized, 0..1) defaults to `feather_mask`.
    """
    np = require("numpy")
    cv2 = require("cv2")
    size = crop.shape[0]
    if mask is None:
        mask = feather_mask(size)
    inverse = cv2.invertAffineTransform(matrix.astype(np.float64))
    height, width = rgb.shape[:2]
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inverse.T
    x1 = max(int(np.floor(corners[:, 0].min())) - 1, 0)
    y1 = max(int(np.floor(corners[:, 1].min())) - 1, 0)
    x2 = min(int(np.ceil(corners[:, 0].max())) + 2, width)
    y2 = min(int(np.ceil(corners[:, 1].max())) + 2, height)
    out = rgb.copy()
    if x2 <= x1 or y2 <= y1:
        return out, None
    # Warp into the bounding box only: shift the inverse transform by the box's corner.
    local = inverse.copy()
    local[:, 2] -= (x1, y1)
    box_w, box_h = x2 - x1, y2 - y1
    face = cv2.warpAffine(
        crop, local, (box_w, box_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    alpha = cv2.warpAffine(
        mask.astype(np.float32),
        local,
        (box_w, box_h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    alpha = np.clip(alpha, 0.0, 1.0)[..., None]
    region = out[y1:y2, x1:x2]
    blended = face.astype(np.float32) * alpha + region.astype(np.float32) * (1.0 - alpha)
    blended = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    inside = alpha[..., 0] > 0.0
    region[inside] = blended[inside]
    return out, (x1, y1, x2, y2)
