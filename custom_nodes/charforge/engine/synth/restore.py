"""Face restoration: GFPGAN, CodeFormer or RestoreFormer on each detected face, pasted back.

Each face is aligned to the 512 px template these models were trained on (`paste.FFHQ_512`), restored,
mixed with the unrestored crop by `blend` (1 = fully restored), and pasted back with a feathered mask, so
only the face changes. CodeFormer also takes `fidelity` (its ``w``: 0 = strongest restoration, 1 = closest
to the input face).

Value ranges: spandrel's RestoreFormer wrapper takes and returns 0..1 itself; GFPGAN and CodeFormer networks
work in -1..1 (as the original projects feed them), so CharForge scales the crop into that range and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...deps import require
from ..control import Control
from ..faces import Face, as_rgb_uint8
from .models import ImageModel
from .paste import FFHQ_512, align_matrix, aligned_crop, feather_mask, paste_back, template

CROP_SIZE = 512
SIGNED_RANGE = ("GFPGAN", "CodeFormer")  # networks that take and give -1..1


@dataclass
class RestoreSettings:
    blend: float = 1.0  # share of the restored face in the result, 0..1
    fidelity: float = 0.5  # CodeFormer only: 0 = strongest restoration, 1 = closest to the input
    which: str = "all"  # "main" (largest face) or "all"

    def validate(self) -> None:
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError(f"blend {self.blend} must be between 0 and 1")
        if not 0.0 <= self.fidelity <= 1.0:
            raise ValueError(f"fidelity {self.fidelity} must be between 0 and 1")
        if self.which not in ("main", "all"):
            raise ValueError(f"which must be 'main' or 'all', got {self.which!r}")


@dataclass
class RestoreResult:
    rgb: Any
    restored: list[tuple[int, int, int, int]] = field(default_factory=list)


def run_face_model(model: ImageModel, crop, fidelity: float = 0.5):
    """Restore one aligned 512 px RGB uint8 crop; returns RGB uint8 of the same size."""
    np = require("numpy")
    torch = require("torch")
    descriptor = model.descriptor
    x = torch.from_numpy(np.ascontiguousarray(crop)).to(descriptor.device, torch.float32)
    x = x.permute(2, 0, 1)[None] / 255.0
    with torch.inference_mode():
        if model.architecture in SIGNED_RANGE:
            kwargs = {"weight": float(fidelity)} if model.architecture == "CodeFormer" else {}
            y = descriptor.model(x * 2.0 - 1.0, **kwargs)[0]
            y = (y + 1.0) / 2.0
        else:
            y = descriptor(x)
    y = y.clamp(0.0, 1.0)[0].permute(1, 2, 0).float().cpu().numpy()
    return (y * 255.0 + 0.5).astype(np.uint8)


def restore_faces(
    model: ImageModel,
    rgb,
    faces: list[Face],
    settings: RestoreSettings | None = None,
    control: Control | None = None,
) -> RestoreResult:
    """`rgb` with its faces (from `FaceAnalyzer.detect`, largest first; they need landmarks) restored.

    `control` is checked before each face (restoring one face on a CPU takes seconds).
    """
    np = require("numpy")
    settings = settings or RestoreSettings()
    settings.validate()
    usable = [face for face in faces if face.landmarks is not None]
    chosen = usable[:1] if settings.which == "main" else usable
    out = as_rgb_uint8(rgb)
    destination = template(FFHQ_512, CROP_SIZE, 512)
    mask = feather_mask(CROP_SIZE, erode=0.06, blur=0.05)
    boxes = []
    for face in chosen:
        if control is not None:
            control.check()
        matrix = align_matrix(face.landmarks, destination)
        crop = aligned_crop(out, matrix, CROP_SIZE)
        if settings.blend <= 0.0:  # nothing of the restored face would show: skip the model
            restored = crop
        else:
            restored = run_face_model(model, crop, settings.fidelity)
        if 0.0 < settings.blend < 1.0:
            restored = (
                restored.astype(np.float32) * settings.blend
                + crop.astype(np.float32) * (1.0 - settings.blend)
                + 0.5
            ).astype(np.uint8)
        out, box = paste_back(out, restored, matrix, mask)
        if box is not None:
            boxes.append(box)
    return RestoreResult(out, boxes)
