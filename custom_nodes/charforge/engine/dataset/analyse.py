"""Analyse: per-image measures, from one reduced decode of each image.

For every readable entry: resolution, sharpness and exposure (quality.py, at 512 px), perceptual hashes
(for Deduplicate), and faces: how many, how many people (faces at least a quarter of the main face's
area), the main face's box, score and size. When the detector gives identity embeddings (InsightFace),
each main face's distance to the dataset's own face centroid is measured too: a photo of someone else
stands out from the rest. The same embeddings (of the photos, not of synthetic images) become the dataset's
identity, kept in the manifest (``identity``): what Crop scores the photos it enhances against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...deps import require
from .faces import FaceDetector
from .hashing import dhash, phash
from .images import read_rgb
from .load import UNUSABLE, short_error
from .manifest import DatasetManifest, FaceInfo, ImageEntry, Scores
from .parallel import library_threads, ordered_map
from .quality import ANALYSIS_SIZE, analysis_grey, measure_grey
from .scan import rejection_reason

ProgressFn = Callable[[int, int], None]

DETECT_SIZE = 640  # long side (at most) the face detector sees
PEOPLE_AREA_RATIO = (
    0.25  # a second face this large relative to the main one is another person, not background
)
CENTROID_KEEP = 0.8  # the centroid is re-estimated from the closest 80 % of faces, so outliers do not pull it


@dataclass
class _Measured:
    width: int = 0
    height: int = 0
    scores: Scores | None = None
    hashes: dict[str, str] = field(default_factory=dict)
    faces: FaceInfo | None = None
    embedding: Any = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def measure_entry(entry: ImageEntry, detector: FaceDetector | None) -> _Measured:
    """Everything Analyse learns about one image (decoded once, at reduced size)."""
    cv2 = require("cv2")
    result = _Measured()
    try:
        # A JPEG decodes at 1/2, 1/4 or 1/8 scale as long as 512 px (the sharpness scale) remain.
        decoded = read_rgb(entry.file, max_side=DETECT_SIZE, decode_side=ANALYSIS_SIZE)
    except Exception as exc:  # noqa: BLE001 - a broken file is a rejection reason, not a failure
        result.error = rejection_reason(exc)
        return result
    rgb = decoded.rgb
    result.width, result.height = decoded.source_size
    result.notes = decoded.notes
    grey = analysis_grey(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    quality = measure_grey(grey)
    result.scores = Scores(
        sharpness=round(quality.sharpness, 3),
        brightness=round(quality.brightness, 4),
        contrast=round(quality.contrast, 4),
        dark_fraction=round(quality.dark_fraction, 4),
        bright_fraction=round(quality.bright_fraction, 4),
    )
    result.hashes = {"phash": phash(grey), "dhash": dhash(grey)}
    if detector is not None:
        try:
            faces = detector.detect(rgb)
        except Exception as exc:  # noqa: BLE001 - one photo the detector chokes on must not stop the rest
            result.notes = [*result.notes, f"face detection failed: {short_error(exc)}"]
            return result
        scale = result.width / rgb.shape[1]  # detector coordinates -> source pixels
        info = FaceInfo(count=len(faces))
        if faces:
            main = faces[0]
            info.people = sum(1 for face in faces if face.area >= PEOPLE_AREA_RATIO * main.area)
            info.box = [round(v * scale, 1) for v in main.box]
            info.score = round(float(main.score), 4)
            info.size = round(min(info.box[2] - info.box[0], info.box[3] - info.box[1]), 1)
            result.embedding = main.embedding
        result.faces = info
    return result


def analyse(
    manifest: DatasetManifest,
    detector: FaceDetector | None,
    detector_name: str | None = None,
    workers: int = 0,
    on_image: ProgressFn | None = None,
) -> DatasetManifest:
    """A new manifest with scores, hashes and faces filled in for every readable entry."""
    np = require("numpy")
    out = manifest.copy()
    out.detector = detector_name if detector is not None else None
    todo = [entry for entry in out.entries if not _unreadable(entry)]
    total = len(todo)

    def report(index: int, _result: _Measured) -> None:
        if on_image is not None:
            on_image(index + 1, total)

    embeddings: dict[str, Any] = {}
    with library_threads(1):  # the face networks are tiny: parallelism comes from the image workers
        results = ordered_map(lambda e: measure_entry(e, detector), todo, workers, report)
        for entry, result in zip(todo, results, strict=True):
            if result.error:
                entry.reject(result.error)
                continue
            entry.width, entry.height = result.width, result.height
            entry.scores = result.scores or Scores()
            entry.hashes = result.hashes
            entry.faces = result.faces
            for note in result.notes:
                entry.flag(note)
            if result.embedding is not None:
                embeddings[entry.id] = np.asarray(result.embedding, dtype=np.float32)
    by_id = out.by_id()
    for entry_id, distance in identity_distances(embeddings).items():
        by_id[entry_id].scores.identity_distance = round(distance, 4)
    out.identity = None
    photos = [
        (by_id[i].name, e, getattr(by_id[i].faces, "count", 1))
        for i, e in embeddings.items()
        if not by_id[i].synthetic
    ]
    if photos and detector is not None:
        from ..synth.identity import dataset_identity  # only reached with InsightFace, whose engine it needs

        models = getattr(detector, "_analyzer", detector)  # the FaceAnalyzer behind InsightFaces
        out.identity = dataset_identity(out.name, detector.name, photos, getattr(models, "det_size", None))
    return out


def _unreadable(entry: ImageEntry) -> bool:
    return any(reason.startswith(UNUSABLE) for reason in entry.rejected)


def identity_distances(embeddings: dict[str, Any]) -> dict[str, float]:
    """Cosine distance (0 same direction .. 2 opposite) of each embedding to the set's robust centroid.

    The centroid is the normalised mean, re-estimated from the closest `CENTROID_KEEP` share, so a few
    photos of other people do not drag it towards themselves. Needs at least two embeddings.
    """
    np = require("numpy")
    if len(embeddings) < 2:
        return {}
    ids = list(embeddings)
    matrix = np.stack([embeddings[i] / (np.linalg.norm(embeddings[i]) or 1.0) for i in ids])

    def centroid(rows):
        mean = rows.mean(axis=0)
        return mean / (np.linalg.norm(mean) or 1.0)

    distances = 1.0 - matrix @ centroid(matrix)
    keep = max(2, int(round(len(ids) * CENTROID_KEEP)))
    closest = np.argsort(distances)[:keep]
    distances = 1.0 - matrix @ centroid(matrix[closest])
    return {entry_id: float(d) for entry_id, d in zip(ids, distances, strict=True)}
