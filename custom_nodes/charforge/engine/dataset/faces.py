"""Face detection for dataset analysis: InsightFace when a model pack is installed, else a fallback.

Order tried by ``choice="auto"``:

1. **InsightFace** (``charforge.engine.faces``) with a pack from ComfyUI's ``insightface`` model folder:
   boxes, landmarks and 512-d identity embeddings (so Analyse can measure identity distance).
2. **MTCNN** with the weights shipped inside the ``mtcnn`` PyPI package (run here with torch; see
   ``mtcnn.py``): boxes and landmarks, no embeddings.
3. **OpenCV Haar cascade** from ``cv2.data.haarcascades``: only OpenCV 4.x wheels ship the cascades
   and the ``CascadeClassifier`` class (OpenCV 5 moved both out of the main package).

When none is available Analyse still measures everything else and says which detector it would need.
Every detector returns the same `Face` objects, largest first, in the pixel coordinates of the array it
was given.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from ...deps import MissingDependencyError, install_hint, require
from . import mtcnn

log = logging.getLogger("charforge")

try:  # the shared face engine (InsightFace); its Face is the one type every stage passes around
    from ..faces import Face
except ImportError:  # that package is optional here: an equivalent value object keeps this module working

    @dataclass
    class Face:  # type: ignore[no-redef]
        """A detected face: box (x1, y1, x2, y2) in pixels, score, optional 5x2 landmarks and embedding."""

        box: tuple[float, float, float, float]
        score: float
        landmarks: Any = None
        embedding: Any = None

        @property
        def area(self) -> float:
            x1, y1, x2, y2 = self.box
            return max(0.0, x2 - x1) * max(0.0, y2 - y1)


DETECTOR_CHOICES = ("auto", "insightface", "fallback", "none")


class FaceDetector(Protocol):
    name: str

    def detect(self, rgb) -> list[Face]: ...


@dataclass
class DetectorChoice:
    """The detector a stage will use (None: no face detection) and a sentence saying why."""

    detector: FaceDetector | None
    note: str

    @property
    def name(self) -> str:
        return self.detector.name if self.detector is not None else "none"


# ------------------------------------------------------------------------------------------------ fallbacks


class MtcnnFaces:
    """`FaceDetector` over the MTCNN networks (weights from the ``mtcnn`` package)."""

    name = "mtcnn"

    def __init__(self, min_face: int = 32):
        self._net = mtcnn.MtcnnDetector.load(min_face=min_face)

    def detect(self, rgb) -> list[Face]:
        boxes, scores, landmarks = self._net.detect_arrays(rgb)
        return [
            Face(
                box=(float(x1), float(y1), float(x2), float(y2)),
                score=float(score),
                landmarks=marks,
                embedding=None,
            )
            for (x1, y1, x2, y2), score, marks in zip(boxes, scores, landmarks, strict=True)
        ]


def haar_cascade_path() -> str | None:
    """The frontal-face Haar cascade bundled with OpenCV, if this OpenCV ships it (4.x wheels do)."""
    try:
        cv2 = require("cv2")
    except MissingDependencyError:
        return None
    if not hasattr(cv2, "CascadeClassifier"):
        return None
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not folder:
        return None
    path = os.path.join(folder, "haarcascade_frontalface_default.xml")
    return path if os.path.isfile(path) else None


class HaarFaces:
    """`FaceDetector` over OpenCV's bundled frontal-face Haar cascade (one classifier per thread)."""

    name = "opencv-haar"

    def __init__(self, path: str, min_face: int = 20):
        self._path = path
        self._min_face = min_face
        self._local = threading.local()
        self._classifier()  # fail now, not in a worker, if the file does not load

    def _classifier(self):
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            cv2 = require("cv2")
            classifier = cv2.CascadeClassifier(self._path)
            if classifier.empty():
                raise OSError(f"could not load the Haar cascade {self._path}")
            self._local.classifier = classifier
        return classifier

    def detect(self, rgb) -> list[Face]:
        cv2 = require("cv2")
        grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        found = self._classifier().detectMultiScale(
            grey, scaleFactor=1.1, minNeighbors=5, minSize=(self._min_face, self._min_face)
        )
        faces = [
            Face(box=(float(x), float(y), float(x + w), float(y + h)), score=1.0) for x, y, w, h in found
        ]
        return sorted(faces, key=lambda face: -face.area)


class InsightFaces:
    """`FaceDetector` over the shared InsightFace engine (boxes, landmarks and identity embeddings)."""

    def __init__(self, analyzer):
        self._analyzer = analyzer
        name = str(getattr(analyzer, "name", "pack"))
        self.name = name if name.startswith("insightface") else f"insightface:{name}"

    def detect(self, rgb) -> list[Face]:
        return list(self._analyzer.detect(rgb))


# ------------------------------------------------------------------------------------------------ choice


def insightface_packs() -> list[str]:
    """InsightFace packs found in the ``insightface`` model folders ([] when the face engine is absent)."""
    try:
        from ..faces import available_face_packs
    except ImportError:
        return []
    try:
        return list(available_face_packs())
    except Exception as exc:  # noqa: BLE001 - a broken folder must not stop analysis; say why
        log.warning("CharForge: could not list InsightFace packs: %s", exc)
        return []


def _load_insightface(pack: str, det_size: int) -> InsightFaces:
    try:
        from ..faces import FaceAnalyzer
    except ImportError as exc:
        raise MissingDependencyError(
            "InsightFace detection needs CharForge's face engine (charforge.engine.faces), which is not "
            f"part of this installation ({exc})"
        ) from exc
    return InsightFaces(FaceAnalyzer.load(pack=pack, det_size=det_size))


def _load_fallback(min_face: int) -> tuple[FaceDetector | None, str]:
    if mtcnn.available():
        return MtcnnFaces(min_face=min_face), "MTCNN (weights from the mtcnn package)"
    cascade = haar_cascade_path()
    if cascade:
        return HaarFaces(cascade, min_face=min_face), "OpenCV Haar cascade (no identity embeddings)"
    return None, (
        "no fallback face detector is installed: install the mtcnn package "
        f"({install_hint(['mtcnn'])}) or put an InsightFace pack into models/insightface"
    )


# The fallback detectors look for faces of at least this many pixels in the (at most 640 px) analysis
# image: 5 % of its long side. Smaller faces are background people, useless for training anyway, and
# skipping them makes MTCNN's image pyramid 2-3 times cheaper.
FALLBACK_MIN_FACE = 32


def choose_detector(
    choice: str = "auto", pack: str = "buffalo_l", det_size: int = 640, min_face: int = FALLBACK_MIN_FACE
) -> DetectorChoice:
    """Pick and load a face detector.

    ``auto``: InsightFace when `pack` (or any pack) is installed, else MTCNN, else the Haar cascade,
    else none. ``insightface``: InsightFace or an error saying what is missing. ``fallback``: MTCNN or
    Haar, skipping InsightFace. ``none``: no face detection.
    """
    if choice not in DETECTOR_CHOICES:
        raise ValueError(f"face detector {choice!r} is not one of {', '.join(DETECTOR_CHOICES)}")
    if choice == "none":
        return DetectorChoice(None, "face detection switched off")
    if choice == "insightface":
        return DetectorChoice(_load_insightface(pack, det_size), f"InsightFace pack {pack}")
    if choice == "auto":
        packs = insightface_packs()
        if packs:
            use = pack if pack in packs else packs[0]
            try:
                return DetectorChoice(_load_insightface(use, det_size), f"InsightFace pack {use}")
            except Exception as exc:  # noqa: BLE001 - fall back, and say why InsightFace was not used
                detector, note = _load_fallback(min_face)
                return DetectorChoice(detector, f"{note}; InsightFace pack {use} did not load: {exc}")
        detector, note = _load_fallback(min_face)
        return DetectorChoice(detector, f"{note}; no InsightFace pack in models/insightface")
    detector, note = _load_fallback(min_face)
    return DetectorChoice(detector, note)
