"""Face swap: put the character's face (an ArcFace identity) onto the faces of other photos.

The swapper is InsightFace's ``inswapper_128.onnx``, loaded through insightface's own model zoo, which
recognises it by its signature (inputs ``target`` 1 x 3 x 128 x 128 and ``source`` 1 x 512) and reads the
512 x 512 ``emap`` from the file's last initializer. For each target face the swapper gets the face aligned
to a 128 px crop and the identity's latent (the ArcFace embedding through ``emap``), and returns the crop
with the new face; CharForge pastes it back with a feathered mask (`paste.paste_back`), so nothing outside
the face changes.

The identity is an embedding of the same recogniser family the swapper was trained with: ``w600k_r50``,
the recogniser of the ``buffalo_l`` pack. A `ReferenceIdentity` built with buffalo_l is exactly that.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import bridge
from ...deps import require
from ..faces import Face, as_rgb_uint8, best_providers
from .paste import feather_mask, paste_back

log = logging.getLogger("charforge")

SWAPPER_FOLDER = "insightface"
DEFAULT_SWAPPER = "inswapper_128.onnx"
FACE_CHOICES = ("main", "all")
# The recogniser family inswapper's latent space was trained on (buffalo_l's w600k_r50).
SWAPPER_FACE_MODEL = "insightface:buffalo_l"


class SwapperNotFoundError(FileNotFoundError):
    """No swapper file where the user pointed, or the file is not a face swapper."""


@dataclass
class SwapResult:
    """A photo after the swap: the pixels and the boxes (x1, y1, x2, y2) of the faces that were replaced."""

    rgb: Any
    swapped: list[tuple[int, int, int, int]] = field(default_factory=list)
    faces_found: int = 0


class FaceSwapper:
    """A loaded inswapper model; `swap` replaces faces of an RGB image with an identity."""

    _cache: dict[tuple, FaceSwapper] = {}
    _cache_lock = threading.Lock()

    def __init__(self, model: Any, path: str, providers: list[str]):
        self._model = model  # insightface.model_zoo.inswapper.INSwapper
        self.path = path
        self.name = Path(path).name
        self.providers = providers
        self.size = int(model.input_size[0])
        self._mask = feather_mask(self.size)

    def __repr__(self) -> str:
        return f"FaceSwapper({self.name}, {self.size}px, {self.providers[0]})"

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_SWAPPER, providers: list[str] | None = None) -> FaceSwapper:
        """Load (or reuse) a swapper from the ``insightface`` model folder(s) (where ReActor users keep
        ``inswapper_128.onnx``) or an absolute path."""
        try:
            path = bridge.find_model(SWAPPER_FOLDER, name_or_path)
        except bridge.ModelNotFoundError as exc:
            raise SwapperNotFoundError(
                f"face swapper {name_or_path!r} not found ({exc}). Put inswapper_128.onnx directly in "
                f"models/insightface/ (next to the models/ folder of the face packs)."
            ) from exc
        require("onnxruntime")
        require("insightface")
        providers = list(providers) if providers else best_providers()
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, tuple(providers))
        with cls._cache_lock:
            cached = cls._cache.get(key)
            if cached is None:
                cached = cls._load_uncached(path, providers)
                for old in [k for k in cls._cache if k[0] == key[0]]:
                    del cls._cache[old]
                cls._cache[key] = cached
        return cached

    @classmethod
    def _load_uncached(cls, path: str, providers: list[str]) -> FaceSwapper:
        from insightface import model_zoo
        from insightface.model_zoo.inswapper import INSwapper

        chatter = io.StringIO()  # insightface prints the model's shape; keep that out of ComfyUI's console
        with contextlib.redirect_stdout(chatter):
            model = model_zoo.get_model(path, providers=providers)
        if not isinstance(model, INSwapper):
            kind = type(model).__name__ if model is not None else "not an InsightFace model"
            raise SwapperNotFoundError(
                f"{Path(path).name} is not a face swapper ({kind}): a swapper has two inputs, a 1 x 3 x 128 x 128 "
                f"face crop and a 1 x 512 identity (inswapper_128.onnx)"
            )
        log.info("CharForge: loaded face swapper %s (%s)", Path(path).name, providers[0])
        return cls(model, path, providers)

    @classmethod
    def clear_cache(cls) -> None:
        with cls._cache_lock:
            cls._cache.clear()

    # ----------------------------------------------------------------------------------------------

    def swap_face(self, rgb, face: Face, embedding) -> tuple[Any, tuple[int, int, int, int] | None]:
        """`rgb` with one `face` (it needs landmarks) replaced by the identity `embedding` (512, ArcFace)."""
        np = require("numpy")
        from insightface.app.common import Face as InsightFace

        if face.landmarks is None:
            raise ValueError("this face has no landmarks (the detector gives none), so it cannot be swapped")
        vector = np.asarray(embedding, np.float32).reshape(-1)
        target = InsightFace(kps=np.asarray(face.landmarks, np.float32))
        source = InsightFace(embedding=vector)
        bgr = np.ascontiguousarray(as_rgb_uint8(rgb)[:, :, ::-1])
        with warnings.catch_warnings():  # scikit-image deprecation noise from insightface's alignment
            warnings.simplefilter("ignore", FutureWarning)
            bgr_face, matrix = self._model.get(bgr, target, source, paste_back=False)
        crop = np.ascontiguousarray(bgr_face[:, :, ::-1])
        return paste_back(as_rgb_uint8(rgb), crop, np.asarray(matrix, np.float32), self._mask)

    def swap(self, rgb, faces: list[Face], embedding, which: str = "main") -> SwapResult:
        """Replace the main (largest) face, or every face, of `rgb`. `faces` come from `FaceAnalyzer.detect`
        (largest first); faces without landmarks are left alone."""
        if which not in FACE_CHOICES:
            raise ValueError(f"which must be one of {FACE_CHOICES}, got {which!r}")
        usable = [face for face in faces if face.landmarks is not None]
        chosen = usable[:1] if which == "main" else usable
        out = as_rgb_uint8(rgb)
        boxes = []
        for face in chosen:
            out, box = self.swap_face(out, face, embedding)
            if box is not None:
                boxes.append(box)
        return SwapResult(out, boxes, len(faces))
