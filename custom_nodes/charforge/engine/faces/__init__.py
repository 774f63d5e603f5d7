"""Faces: InsightFace model packs from ComfyUI's ``insightface`` folder, detection and ArcFace embeddings.

Shared by the dataset stage (face boxes, crops) and the score stage (identity similarity)::

    analyzer = FaceAnalyzer.load("buffalo_l", det_size=640)
    faces = analyzer.detect(rgb)          # HxWx3 uint8 RGB -> [Face], largest first
    faces[0].embedding                    # 512-d, L2-normalised (None with with_embeddings=False)
"""

from .analyzer import EMBEDDING_SIZE, Face, FaceAnalyzer, as_rgb_uint8, best_providers
from .packs import KNOWN_PACKS, FaceModelsNotFoundError, available_face_packs, insightface_roots, locate_pack

__all__ = [
    "EMBEDDING_SIZE",
    "Face",
    "FaceAnalyzer",
    "as_rgb_uint8",
    "best_providers",
    "KNOWN_PACKS",
    "FaceModelsNotFoundError",
    "available_face_packs",
    "insightface_roots",
    "locate_pack",
]
