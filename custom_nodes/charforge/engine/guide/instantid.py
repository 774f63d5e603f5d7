"""InstantID for SDXL: the face-keypoint picture for its IdentityNet and the face tokens, numpy / torch only.

InstantID guides SDXL with one face in two ways at once:

- its IP-Adapter (``ip-adapter.bin``, variant ``instantid`` in `ipadapter`) turns the face embedding of
  the antelopev2 recogniser (``glintr100``: 512 values, *not* normalised) into 16 tokens of width 2048
  with a perceiver resampler; every cross-attention layer of the U-Net also attends to them, as with any
  IP-Adapter;
- its IdentityNet, an SDXL ControlNet, sees a picture of the five face keypoints (eyes, nose tip, mouth
  corners) drawn on black, and attends to the same 16 face tokens instead of the prompt's text tokens.

The negative (unconditional) half gets the tokens of an all-zero embedding, for both parts.

The keypoint picture (`draw_keypoints`): four limbs from the left eye, the right eye and the two mouth
corners to the nose, each a filled ellipse (half-width 4 px, as long as the limb) in the colour of its outer
point, darkened to 60 %; then a filled disc of radius 10 px at each point in its full colour. Point colours,
in detector order: red, green, blue, yellow, magenta. The published pipeline draws on the face photo
resized to a long side of 1280 px and generates at that size, so `draw_keypoints` scales the widths with
the canvas (`REFERENCE_LONG_SIDE`): the marks keep their size relative to the picture whatever size it is
drawn at and then resized to the latent by ComfyUI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...deps import require

__all__ = [
    "DOT_RADIUS",
    "KEYPOINT_COLOURS",
    "LIMBS",
    "LIMB_HALF_WIDTH",
    "NoFaceError",
    "REFERENCE_LONG_SIDE",
    "draw_keypoints",
    "face_embedding",
    "face_tokens",
    "largest_face",
    "mark_sizes",
]

# Detector order: left eye, right eye, nose tip, left mouth corner, right mouth corner (RGB).
KEYPOINT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))  # (outer point, nose): drawn in the outer point's colour
LIMB_SHADE = 0.6
LIMB_HALF_WIDTH = 4  # px at REFERENCE_LONG_SIDE
DOT_RADIUS = 10  # px at REFERENCE_LONG_SIDE
REFERENCE_LONG_SIDE = 1280
EMBEDDING_SIZE = 512


class NoFaceError(ValueError):
    """No face (or no face with keypoints and an embedding) in the image."""


def mark_sizes(height: int, width: int, scale: float | None = None) -> tuple[int, int]:
    """(limb half-width, dot radius) in px for a canvas: the published sizes times ``scale`` (default: the
    canvas's long side / `REFERENCE_LONG_SIDE`), at least 1 px each."""
    if scale is None:
        scale = max(height, width) / REFERENCE_LONG_SIDE
    return max(1, round(LIMB_HALF_WIDTH * scale)), max(1, round(DOT_RADIUS * scale))


def draw_keypoints(keypoints: Any, height: int, width: int, scale: float | None = None) -> np.ndarray:
    """The IdentityNet picture: an ``height`` x ``width`` x 3 uint8 RGB image with the five keypoints
    (a 5 x 2 array of x, y in pixels of that canvas) drawn on black (see the module docstring)."""
    cv2 = require("cv2")
    points = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    if points.shape[0] != len(KEYPOINT_COLOURS):
        raise ValueError(f"InstantID needs the detector's 5 face keypoints, got {points.shape[0]}")
    half_width, radius = mark_sizes(height, width, scale)
    limbs = np.zeros((height, width, 3), dtype=np.float64)
    for outer, inner in LIMBS:
        (x0, y0), (x1, y1) = points[outer], points[inner]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), half_width), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(limbs, polygon, KEYPOINT_COLOURS[outer])
    canvas = np.ascontiguousarray((limbs * LIMB_SHADE).astype(np.uint8))
    for (x, y), colour in zip(points, KEYPOINT_COLOURS, strict=True):
        cv2.circle(canvas, (int(x), int(y)), radius, colour, -1)
    return canvas


def largest_face(faces: Sequence[Any], source: str = "the image") -> Any:
    """The face with the largest box among an analyzer's faces (``box``: x1, y1, x2, y2); it must have
    keypoints. Raises `NoFaceError` naming ``source`` when there is none."""
    if not faces:
        raise NoFaceError(
            f"no face found in {source}: InstantID needs a clear, front-facing face (at least ~100 px wide)"
        )
    face = max(faces, key=lambda f: max(0.0, f.box[2] - f.box[0]) * max(0.0, f.box[3] - f.box[1]))
    if face.landmarks is None:
        raise NoFaceError(f"the face in {source} has no keypoints: use a detector with 5 keypoints (SCRFD)")
    return face


def face_embedding(faces: Sequence[Any], direction: Any = None) -> np.ndarray:
    """The embedding InstantID's projection takes (512 values, the recogniser's raw scale) from faces
    found by the analyzer (their ``embedding``: unit length, ``embedding_norm``: the raw length).

    Several faces (one per photo of the same person): the mean of their raw embeddings. ``direction``
    (a unit vector, e.g. a CharForge identity's centroid) replaces the direction and keeps the mean raw
    length, so an identity built from many photos gives tokens of the scale the adapter was trained on."""
    raws = []
    for face in faces:
        if face.embedding is None or face.embedding_norm is None:
            raise NoFaceError("the face models gave no embedding for a face (load them with a recogniser)")
        raws.append(np.asarray(face.embedding, np.float32) * float(face.embedding_norm))
    if not raws:
        raise NoFaceError("no face to take the embedding from")
    mean = np.mean(raws, axis=0)
    if direction is None:
        return mean.astype(np.float32)
    unit = np.asarray(direction, np.float32).reshape(-1)
    if unit.shape[0] != EMBEDDING_SIZE:
        raise ValueError(
            f"the identity's embedding has {unit.shape[0]} values, InstantID needs {EMBEDDING_SIZE}"
        )
    length = float(np.mean([np.linalg.norm(raw) for raw in raws]))
    return (unit / max(float(np.linalg.norm(unit)), 1e-12) * length).astype(np.float32)


def face_tokens(projection: Any, embedding: Any) -> tuple[Any, Any]:
    """(tokens of ``embedding``, tokens of an all-zero embedding), each [1, T, width] float32, through
    InstantID's projection (the resampler of the ``instantid`` IP-Adapter variant)."""
    import torch

    face = torch.as_tensor(np.asarray(embedding, np.float32)).reshape(1, 1, -1)
    if face.shape[-1] != EMBEDDING_SIZE:
        raise ValueError(f"InstantID takes a {EMBEDDING_SIZE}-value face embedding, got {face.shape[-1]}")
    parameter = next(projection.parameters())
    face = face.to(device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad():
        cond = projection(face).float().cpu()
        uncond = projection(torch.zeros_like(face)).float().cpu()
    return cond, uncond
