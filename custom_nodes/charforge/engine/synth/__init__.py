"""Dataset synthesis and enhancement: face swap, face restoration, upscaling, and keeping it honest.

- `swap`: InsightFace's inswapper (``models/insightface/inswapper_128.onnx``) puts an identity onto faces
- `restore`: GFPGAN / CodeFormer / RestoreFormer (``models/facerestore_models``, via spandrel) on faces
- `upscale`: any spandrel upscale model (``models/upscale_models``), tiled in bounded memory
- `paste`: aligned crops and the feathered paste-back both face stages use (pixels outside the mask keep
  their values)
- `identity`: the identity check of each synthetic or enhanced image and the cap on synthetic ones
- `synthesize`: a source folder -> synthetic dataset entries, marked with the image they came from
- `models`: loading restoration and upscale files through spandrel
"""

from .identity import (
    DEFAULT_MAX_SHARE,
    EnhanceCheck,
    IdentityCheck,
    cap_synthetic,
    check_identity,
    dataset_identity,
    enhance_check,
    identity_from_record,
    identity_record,
    synthetic_allowance,
)
from .models import (
    FACE_ARCHITECTURES,
    RESTORE_FOLDER,
    UPSCALE_FOLDER,
    ImageModel,
    UnsupportedModelFile,
    load_face_restorer,
    load_image_model,
    load_upscaler,
    wrap_descriptor,
)
from .paste import feather_mask, paste_back
from .restore import RestoreResult, RestoreSettings, restore_faces
from .swap import DEFAULT_SWAPPER, FaceSwapper, SwapperNotFoundError, SwapResult
from .synthesize import SYNTHETIC_FOLDER, SynthSettings, SynthSummary, synthesize
from .upscale import tile_boxes, upscale_tiled, upscale_to

__all__ = [
    "DEFAULT_MAX_SHARE",
    "EnhanceCheck",
    "IdentityCheck",
    "cap_synthetic",
    "check_identity",
    "dataset_identity",
    "enhance_check",
    "identity_from_record",
    "identity_record",
    "synthetic_allowance",
    "FACE_ARCHITECTURES",
    "RESTORE_FOLDER",
    "UPSCALE_FOLDER",
    "ImageModel",
    "UnsupportedModelFile",
    "load_face_restorer",
    "load_image_model",
    "load_upscaler",
    "wrap_descriptor",
    "feather_mask",
    "paste_back",
    "RestoreResult",
    "RestoreSettings",
    "restore_faces",
    "DEFAULT_SWAPPER",
    "FaceSwapper",
    "SwapperNotFoundError",
    "SwapResult",
    "SYNTHETIC_FOLDER",
    "SynthSettings",
    "SynthSummary",
    "synthesize",
    "tile_boxes",
    "upscale_tiled",
    "upscale_to",
]
