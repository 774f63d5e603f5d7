"""Face detection and ArcFace embeddings through InsightFace, with loaded models cached.

insightface (and onnxruntime) are imported only when a pack is loaded, through `deps.require`, so the
pack loads without them. Models load through insightface's own ``FaceAnalysis`` (which routes each ONNX
file to a role by its input/output signature), restricted to the detector and the recogniser.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

from ...deps import require
from .packs import FaceModelsNotFoundError, expected_files, locate_pack

log = logging.getLogger("charforge")

EMBEDDING_SIZE = 512
# Best first. CPU is always appended as the fallback onnxruntime uses for unsupported operators.
PROVIDER_PREFERENCE = (
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
)
# Close-up photos often hide the face from the detector at 640 px; retry smaller, as IPAdapter FaceID does.
RETRY_STEP = 64
RETRY_MIN = 320


@dataclass
class Face:
    """One detected face, in pixels of the image it was found in."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float  # detector confidence, 0..1
    # np.ndarray 5x2: left eye, right eye, nose, left and right mouth corner; or None
    landmarks: Any = field(default=None, repr=False)
    # np.ndarray (512,), L2-normalised ArcFace embedding; or None
    embedding: Any = field(default=None, repr=False)
    # the recogniser's raw embedding is ``embedding * embedding_norm`` (InstantID was trained on it); or None
    embedding_norm: float | None = None

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def as_dict(self) -> dict:
        """JSON-friendly summary (no embedding)."""
        return {
            "box": [round(v, 1) for v in self.box],
            "score": round(self.score, 4),
            "area": round(self.area, 1),
        }


def best_providers(available: list[str] | None = None) -> list[str]:
    """The best onnxruntime execution provider available (CUDA, CoreML, DirectML, CPU), then CPU."""
    if available is None:
        available = list(require("onnxruntime").get_available_providers())
    for provider in PROVIDER_PREFERENCE:
        if provider in available:
            return [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def as_rgb_uint8(image) -> Any:
    """An HxWx3 uint8 RGB array from a uint8 array, a float array in 0..1, or a PIL image."""
    np = require("numpy")
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return array


class FaceAnalyzer:
    """A loaded InsightFace pack: `detect()` returns the faces of an RGB image, largest first."""

    _cache: dict[tuple, FaceAnalyzer] = {}
    _cache_lock = threading.Lock()

    def __init__(
        self, app: Any, pack: str, det_size: int, providers: list[str], with_embeddings: bool, folder: str
    ):
        self._app = app
        self._detector = app.models["detection"]
        self._recogniser = app.models.get("recognition") if with_embeddings else None
        self.pack = pack
        self.det_size = det_size
        self.providers = providers
        self.with_embeddings = with_embeddings
        self.folder = folder
        self.name = f"insightface:{pack}"

    def __repr__(self) -> str:
        return f"FaceAnalyzer({self.name}, det_size={self.det_size}, providers={self.providers})"

    @classmethod
    def load(
        cls,
        pack: str = "buffalo_l",
        det_size: int = 640,
        providers: list[str] | None = None,
        with_embeddings: bool = True,
    ) -> FaceAnalyzer:
        """Load (or reuse) the detector and recogniser of `pack` from the insightface model folder(s).

        Raises `FaceModelsNotFoundError` when the pack is missing, misplaced or lacks a detector or
        recogniser, and `deps.MissingDependencyError` when insightface or onnxruntime is not installed.
        """
        if det_size < 64 or det_size % 32:
            raise ValueError(f"det_size must be a multiple of 32 of at least 64, got {det_size}")
        location = locate_pack(pack)
        require("numpy")
        require("onnxruntime")
        require("insightface")
        providers = list(providers) if providers else best_providers()
        stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in location.onnx_files())
        key = (str(location.folder.resolve()), stamp, det_size, tuple(providers), with_embeddings)
        with cls._cache_lock:
            cached = cls._cache.get(key)
            if cached is None:
                cached = cls._load_uncached(location, det_size, providers, with_embeddings)
                # Keep one entry per pack folder and settings: a replaced file replaces the entry.
                for old in [k for k in cls._cache if k[0] == key[0] and k[2:] == key[2:]]:
                    del cls._cache[old]
                cls._cache[key] = cached
        return cached

    @classmethod
    def _load_uncached(
        cls, location, det_size: int, providers: list[str], with_embeddings: bool
    ) -> FaceAnalyzer:
        from insightface.app import FaceAnalysis

        modules = ["detection", "recognition"] if with_embeddings else ["detection"]
        chatter = io.StringIO()  # insightface prints every model it finds; keep that out of ComfyUI's console
        try:
            with contextlib.redirect_stdout(chatter):
                # The absolute folder as `name`: insightface joins it onto root/models (a no-op for an absolute
                # path), and a folder of the same name in the working directory cannot shadow it.
                app = FaceAnalysis(
                    name=str(location.folder.resolve()),
                    root=str(location.root),
                    allowed_modules=modules,
                    providers=providers,
                )
        except AssertionError as exc:  # insightface asserts that a detector was found
            files = ", ".join(p.name for p in location.onnx_files())
            raise FaceModelsNotFoundError(
                f"no face detector among the .onnx files in {location.folder} ({files}); expected "
                f"{expected_files(location.name)}. Re-download the pack or pick another."
            ) from exc
        finally:
            if chatter.getvalue():
                log.debug("insightface: %s", chatter.getvalue().strip())
        if with_embeddings and "recognition" not in app.models:
            files = ", ".join(p.name for p in location.onnx_files())
            raise FaceModelsNotFoundError(
                f"no face recogniser (ArcFace, 112x112 input) among the .onnx files in {location.folder} ({files}); "
                f"expected {expected_files(location.name)}."
            )
        with contextlib.redirect_stdout(io.StringIO()):
            app.prepare(ctx_id=0, det_size=(det_size, det_size))
        log.info(
            "CharForge: loaded face models %s from %s (%s)", location.name, location.folder, providers[0]
        )
        return cls(app, location.name, det_size, providers, with_embeddings, str(location.folder))

    @classmethod
    def clear_cache(cls) -> None:
        """Forget every loaded pack (frees the ONNX sessions once nothing else holds them)."""
        with cls._cache_lock:
            cls._cache.clear()

    # ----------------------------------------------------------------------------------------------

    def detect(self, rgb, retry_smaller: bool = True) -> list[Face]:
        """Faces in an HxWx3 RGB image (uint8, or float 0..1), largest first, each with its embedding.

        When nothing is found at `det_size`, detection is retried at smaller sizes (64 px steps down to
        320) because a face that fills a close-up photo is often missed at 640.
        """
        np = require("numpy")
        from insightface.app.common import Face as InsightFace

        bgr = np.ascontiguousarray(as_rgb_uint8(rgb)[:, :, ::-1])  # insightface works on OpenCV's BGR order
        boxes, keypoints = None, None
        for size in self._sizes(retry_smaller):
            boxes, keypoints = self._detector.detect(bgr, input_size=(size, size), max_num=0)
            if len(boxes):
                break
        assert boxes is not None  # _sizes gives at least det_size, so the detector ran
        faces = []
        for index in range(len(boxes)):
            landmarks = None if keypoints is None else np.asarray(keypoints[index], dtype=np.float32)
            embedding, norm = None, None
            if self._recogniser is not None and landmarks is not None:
                found = InsightFace(bbox=boxes[index, :4], kps=landmarks, det_score=boxes[index, 4])
                with warnings.catch_warnings():  # scikit-image deprecation noise from insightface's alignment
                    warnings.simplefilter("ignore", FutureWarning)
                    self._recogniser.get(bgr, found)
                raw = np.asarray(found.embedding, dtype=np.float32)
                embedding, norm = _normalise(raw), float(np.linalg.norm(raw))
            x1, y1, x2, y2 = (float(v) for v in boxes[index, :4])
            faces.append(Face((x1, y1, x2, y2), float(boxes[index, 4]), landmarks, embedding, norm))
        faces.sort(key=lambda face: face.area, reverse=True)
        return faces

    def _sizes(self, retry_smaller: bool) -> list[int]:
        sizes = [self.det_size]
        if retry_smaller:
            sizes += list(range(self.det_size - RETRY_STEP, RETRY_MIN - 1, -RETRY_STEP))
        return sizes

    def aligned_crop(self, rgb, face: Face, size: int = 112):
        """The face warped onto ArcFace's 5-point template: `size` x `size` RGB uint8 (size: multiple of 112)."""
        np = require("numpy")
        from insightface.utils import face_align

        if face.landmarks is None:
            raise ValueError("this face has no landmarks (the detector gives none), so it cannot be aligned")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            crop = face_align.norm_crop(as_rgb_uint8(rgb), landmark=face.landmarks, image_size=size)
        return np.ascontiguousarray(crop)

    def embed_aligned(self, crops: list) -> Any:
        """L2-normalised embeddings (N x 512) of aligned 112 x 112 RGB face crops, in one batch."""
        np = require("numpy")
        if self._recogniser is None:
            raise RuntimeError(f"{self.name} was loaded without embeddings (with_embeddings=False)")
        if not crops:
            return np.zeros((0, EMBEDDING_SIZE), np.float32)
        bgr = [np.ascontiguousarray(as_rgb_uint8(crop)[:, :, ::-1]) for crop in crops]
        return _normalise(np.asarray(self._recogniser.get_feat(bgr), dtype=np.float32))


def _normalise(vectors):
    np = require("numpy")
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
