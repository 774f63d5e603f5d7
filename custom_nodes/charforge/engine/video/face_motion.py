"""Face-driven motion: a driving video's face landmarks and head pose, smoothed, as ControlNet control frames.

Per frame the InsightFace pack's detector finds the face (five points: eyes, nose, mouth corners); when the pack
has a landmark model (buffalo_l and antelopev2 ship ``2d106det.onnx``, 106 2D points, and ``1k3d68.onnx``, 68 3D
points in the iBUG order) insightface crops the face box (1.5 x its longer side, 192 x 192), runs the model and
maps its points back into the frame. Head pose (yaw, pitch, roll in degrees) comes from the 68 3D points by a
least-squares rotation onto a generic 3D face, or, with 2D points only, from OpenCV's ``solvePnP`` of the five
points against the same face. The track is smoothed with a One-Euro filter run forwards and backwards (the two
lags cancel, so a steadily moving face is not dragged behind), and frames without a face take the points of
their neighbours (interpolated between two found frames, held at the clip's ends); which frames those were is
reported.

The control frames are white dots on black (the OpenPose face format ControlNet face models were trained on),
optionally with the 68-point contours drawn as lines, in the output size; the track can be moved and scaled
so that the driving face's box (its median over the clip) lands on the character's face box.

Conventions: image x right, y down; a face's z points towards the camera. Yaw > 0 turns the nose towards image
right, pitch > 0 lifts it (looking up), roll > 0 turns the face clockwise on screen. R = Rz(roll) Ry(yaw) Rx(pitch).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...deps import require
from ..control import Control, or_default

LANDMARK_CHOICES = ("auto", "68", "106", "5")
STYLES = ("dots", "lines")
# The iBUG 68-point contours: jaw, brows, nose bridge, nose base, eyes (closed), outer and inner lips (closed).
CONTOURS_68 = (
    (range(0, 17), False),
    (range(17, 22), False),
    (range(22, 27), False),
    (range(27, 31), False),
    (range(31, 36), False),
    (range(36, 42), True),
    (range(42, 48), True),
    (range(48, 60), True),
    (range(60, 68), True),
)
# Five-point order of the detector (left eye, right eye as seen in the image, nose, mouth corners) in the 68 layout.
FIVE_FROM_68 = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (30,), (48,), (54,))


class NoFaceInVideoError(ValueError):
    """Not one frame of the driving video has a face the detector finds."""


@dataclass
class FacePose:
    yaw: float
    pitch: float
    roll: float


@dataclass
class FaceFrame:
    """One frame of a face track, in pixels of the driving video (or of the output, after `retarget`)."""

    index: int
    source: str  # "detected", "interpolated" or "held"
    box: np.ndarray  # (4,) x1, y1, x2, y2
    points: np.ndarray  # (N, 2)
    pose: FacePose | None = None
    points3d: np.ndarray | None = field(default=None, repr=False)  # (68, 3) with the 3D landmark model


@dataclass
class FaceTrack:
    frames: list[FaceFrame]
    width: int
    height: int
    fps: float
    landmarks: str  # "68", "106" or "5"

    @property
    def missing(self) -> list[int]:
        return [f.index for f in self.frames if f.source != "detected"]

    def table(self) -> str:
        """The per-frame pose table: frame, source, yaw, pitch, roll (degrees), face box."""
        lines = ["frame,source,yaw,pitch,roll,x1,y1,x2,y2"]
        for f in self.frames:
            pose = (
                ("", "", "")
                if f.pose is None
                else (f"{f.pose.yaw:.1f}", f"{f.pose.pitch:.1f}", f"{f.pose.roll:.1f}")
            )
            box = ",".join(f"{v:.1f}" for v in f.box)
            lines.append(f"{f.index},{f.source},{','.join(pose)},{box}")
        return "\n".join(lines)

    def summary(self) -> str:
        missing = self.missing
        text = (
            f"{len(self.frames)} frames at {self.width}x{self.height}, {self.landmarks}-point landmarks; "
            f"face found in {len(self.frames) - len(missing)}"
        )
        if missing:
            shown = ", ".join(str(i) for i in missing[:20]) + (" ..." if len(missing) > 20 else "")
            text += f"; no face in {len(missing)} (filled from neighbours): {shown}"
        return text


# --------------------------------------------------------------------------------------------------
# Head pose


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Rz(roll) Ry(yaw) Rx(pitch), angles in degrees, in the module's axes."""
    y, p, r = (math.radians(v) for v in (yaw, pitch, roll))
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def euler_angles(matrix: np.ndarray) -> FacePose:
    """Yaw, pitch, roll (degrees) of a rotation made as in `rotation`."""
    m = np.asarray(matrix, dtype=np.float64)
    yaw = math.asin(max(-1.0, min(1.0, -m[2, 0])))
    pitch = math.atan2(m[2, 1], m[2, 2])
    roll = math.atan2(m[1, 0], m[0, 0])
    return FacePose(math.degrees(yaw), math.degrees(pitch), math.degrees(roll))


def mean_face_68() -> np.ndarray:
    """The generic 3D face (68 iBUG points, x right, y down, z towards the camera) that insightface ships."""
    require("insightface")
    from insightface.data import get_object

    return np.asarray(get_object("meanshape_68.pkl"), dtype=np.float64)


def pose_from_3d(points3d, template: np.ndarray | None = None) -> FacePose:
    """Head pose from 3D landmarks: the least-squares rotation (Kabsch, reflection excluded) from the template."""
    template = mean_face_68() if template is None else np.asarray(template, dtype=np.float64)
    target = np.asarray(points3d, dtype=np.float64)
    a = template - template.mean(axis=0)
    b = target - target.mean(axis=0)
    u, _, vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    return euler_angles(u @ np.diag([1.0, 1.0, d]) @ vt)


def five_point_template(template68: np.ndarray | None = None) -> np.ndarray:
    """The generic face's five detector points in 3D (eye centres, nose tip, mouth corners)."""
    face = mean_face_68() if template68 is None else np.asarray(template68, dtype=np.float64)
    return np.stack([face[list(ids)].mean(axis=0) for ids in FIVE_FROM_68])


def pose_from_2d(points5, width: int, height: int, template5: np.ndarray | None = None) -> FacePose | None:
    """Head pose from the five 2D points by ``cv2.solvePnP`` (focal length = the frame's longer side)."""
    cv2 = require("cv2")
    model = five_point_template() if template5 is None else np.asarray(template5, dtype=np.float64)
    flip = np.diag([1.0, 1.0, -1.0])  # OpenCV's object z points away from the camera
    focal = float(max(width, height))
    camera = np.array([[focal, 0, width / 2.0], [0, focal, height / 2.0], [0, 0, 1]], dtype=np.float64)
    image = np.ascontiguousarray(np.asarray(points5, dtype=np.float64)[:, :2])
    ok, rvec, _ = cv2.solvePnP(model @ flip, image, camera, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        return None
    matrix, _ = cv2.Rodrigues(rvec)
    return euler_angles(flip @ matrix @ flip)


# --------------------------------------------------------------------------------------------------
# Smoothing and gaps


def one_euro(values, fps: float, min_cutoff: float, beta: float, d_cutoff: float = 1.0) -> np.ndarray:
    """One-Euro filter along axis 0 (frames) of `values` (F, ...); `min_cutoff` in Hz, `beta` per unit/s."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2 or min_cutoff <= 0:
        return x.copy()
    rate = max(float(fps), 1e-6)

    def alpha(cutoff):
        tau = 1.0 / (2.0 * math.pi * cutoff)
        return 1.0 / (1.0 + tau * rate)

    out = np.empty_like(x)
    out[0] = x[0]
    speed = np.zeros_like(x[0])
    a_d = alpha(d_cutoff)
    for i in range(1, len(x)):
        speed = a_d * (x[i] - out[i - 1]) * rate + (1.0 - a_d) * speed
        a = alpha(min_cutoff + beta * np.abs(speed))
        out[i] = a * x[i] + (1.0 - a) * out[i - 1]
    return out


def smooth_track(values, fps: float, min_cutoff: float, beta: float) -> np.ndarray:
    """One-Euro forwards and backwards, averaged: the forward lag and the backward lead cancel."""
    x = np.asarray(values, dtype=np.float64)
    if min_cutoff <= 0:
        return x.copy()
    forward = one_euro(x, fps, min_cutoff, beta)
    backward = one_euro(x[::-1], fps, min_cutoff, beta)[::-1]
    return (forward + backward) / 2.0


def fill_gaps(found: list[bool], values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Rows of `values` (F, ...) where not `found` are interpolated between found neighbours, held at the ends."""
    index = np.flatnonzero(found)
    if not len(index):
        raise NoFaceInVideoError("no face in any frame")
    out = np.asarray(values, dtype=np.float64).copy()
    sources = []
    for i in range(len(found)):
        if found[i]:
            sources.append("detected")
            continue
        before, after = index[index < i], index[index > i]
        if len(before) and len(after):
            a, b = before[-1], after[0]
            t = (i - a) / (b - a)
            out[i] = (1.0 - t) * out[a] + t * out[b]
            sources.append("interpolated")
        else:
            out[i] = out[before[-1] if len(before) else after[0]]
            sources.append("held")
    return out, sources


# --------------------------------------------------------------------------------------------------
# Landmark models of an InsightFace pack


class FaceLandmarker:
    """A pack's detector plus its landmark models (those with a 1 x 3 x 192 x 192 input), loaded and cached."""

    _cache: dict[tuple, FaceLandmarker] = {}
    _lock = threading.Lock()

    def __init__(self, analyzer, models: dict[str, Any]):
        self.analyzer = analyzer
        self.models = models  # "68" -> insightface Landmark (3D), "106" -> (2D)

    @classmethod
    def load(
        cls, pack: str = "buffalo_l", det_size: int = 640, providers: list[str] | None = None
    ) -> FaceLandmarker:
        from ..faces import FaceAnalyzer

        return cls.for_analyzer(FaceAnalyzer.load(pack, det_size=det_size, providers=providers))

    @classmethod
    def for_analyzer(cls, face_models) -> FaceLandmarker:
        """The landmarker of a loaded pack (Load Face Models' value): its detector without embeddings and the
        pack's landmark models."""
        from ..faces import FaceAnalyzer, locate_pack

        analyzer = FaceAnalyzer.load(
            face_models.pack,
            det_size=face_models.det_size,
            providers=face_models.providers,
            with_embeddings=False,
        )
        location = locate_pack(face_models.pack)
        stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in location.onnx_files())
        key = (str(location.folder.resolve()), stamp, tuple(analyzer.providers))
        with cls._lock:
            cached = cls._cache.get(key)
            if cached is None or cached.analyzer is not analyzer:
                cached = cls(analyzer, _landmark_models(location.onnx_files(), analyzer.providers))
                cls._cache[key] = cached
        return cached

    def available(self) -> list[str]:
        """Landmark counts this pack offers, best first (3D 68 points give the pose from 3D)."""
        return [kind for kind in ("68", "106") if kind in self.models] + ["5"]

    def pick(self, landmarks: str) -> str:
        if landmarks == "auto":
            return self.available()[0]
        if landmarks not in self.available():
            raise ValueError(
                f"the face pack {self.analyzer.pack!r} ({self.analyzer.folder}) has no {landmarks}-point landmark "
                f"model: it has {', '.join(self.available())}. buffalo_l ships 1k3d68.onnx (68 points, 3D) and "
                f"2d106det.onnx (106 points); put them in that folder or choose another count."
            )
        return landmarks

    def analyse(self, rgb, landmarks: str, previous_box=None) -> dict | None:
        """The face of one frame: box, five points, dense points (and 3D points); None when there is none."""
        faces = self.analyzer.detect(rgb)
        if not faces:
            return None
        face = faces[0] if previous_box is None else max(faces, key=lambda f: _overlap(f.box, previous_box))
        box = np.asarray(face.box, dtype=np.float64)
        five = np.asarray(face.landmarks, dtype=np.float64) if face.landmarks is not None else None
        if five is None:
            raise ValueError(
                f"the detector of {self.analyzer.name} gives no face keypoints; use an SCRFD pack"
            )
        result = {"box": box, "five": five, "points": five, "points3d": None}
        if landmarks in self.models:
            from insightface.app.common import Face as InsightFace

            bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
            found = InsightFace(
                bbox=box.astype(np.float32), kps=five.astype(np.float32), det_score=face.score
            )
            dense = np.asarray(self.models[landmarks].get(bgr, found), dtype=np.float64)
            result["points"] = dense[:, :2]
            if dense.shape[1] == 3:
                result["points3d"] = dense
        return result


def _landmark_models(files: list[Path], providers: list[str]) -> dict[str, Any]:
    onnx = require("onnx")
    require("insightface")
    from insightface.model_zoo import model_zoo

    models: dict[str, Any] = {}
    for path in files:
        graph = onnx.load(str(path), load_external_data=False).graph
        dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        if dims[2:] != [192, 192] or len(graph.output) != 1:
            continue
        model = model_zoo.get_model(str(path), providers=providers)
        name = getattr(model, "taskname", "")
        if name == "landmark_3d_68":
            models.setdefault("68", model)
        elif name == "landmark_2d_106":
            models.setdefault("106", model)
    return models


def _overlap(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# Tracking


def track_faces(
    frames,
    fps: float,
    landmarker: FaceLandmarker,
    landmarks: str = "auto",
    min_cutoff: float = 1.5,
    beta: float = 0.05,
    control: Control | None = None,
) -> FaceTrack:
    """The face track of `frames` (F, H, W, 3, uint8 or float 0..1): smoothed, gaps filled, head pose per frame.

    `min_cutoff` (Hz, 0 = no smoothing) and `beta` are the One-Euro filter's settings in pixels.
    """
    from ..faces import as_rgb_uint8

    control = or_default(control)
    kind = landmarker.pick(landmarks)
    count = len(frames)
    if not count:
        raise ValueError("no frames to track")
    height, width = np.asarray(frames[0]).shape[:2]
    control.progress(0, count, "face motion: landmarks")
    found: list[bool] = []
    rows: list[np.ndarray | None] = []
    previous = None
    size = None
    for i in range(count):
        face = landmarker.analyse(as_rgb_uint8(np.asarray(frames[i])), kind, previous)
        if face is None:
            found.append(False)
            rows.append(None)
        else:
            previous = face["box"]
            parts = [face["box"], face["five"].ravel(), face["points"].ravel()]
            if face["points3d"] is not None:
                parts.append(face["points3d"][:, 2])
            row = np.concatenate(parts)
            size = len(row)
            found.append(True)
            rows.append(row)
        control.progress(i + 1, count, f"face motion: frame {i + 1}/{count}")
    if size is None:
        raise NoFaceInVideoError(
            f"no face found in any of the {count} driving frames (face models {landmarker.analyzer.folder}); use a "
            f"video where the face is visible and at least about 40 px wide"
        )
    values = np.stack([row if row is not None else np.zeros(size) for row in rows])
    values, sources = fill_gaps(found, values)
    values = smooth_track(values, fps, min_cutoff, beta)
    return _frames_from_rows(values, sources, kind, width, height, fps)


def _frames_from_rows(values, sources, kind, width, height, fps) -> FaceTrack:
    template = mean_face_68() if kind == "68" else None
    five_template = five_point_template(template)
    out = []
    for i, row in enumerate(values):
        box, five = row[:4], row[4:14].reshape(5, 2)
        rest = row[14:]
        points3d = None
        if kind == "68":
            points = rest[:136].reshape(68, 2)
            points3d = np.column_stack([points, rest[136:]])
            pose: FacePose | None = pose_from_3d(points3d, template)
        else:
            points = rest.reshape(-1, 2)
            pose = pose_from_2d(five, width, height, five_template)
        out.append(FaceFrame(i, sources[i], box, points, pose, points3d))
    return FaceTrack(out, int(width), int(height), float(fps), kind)


# --------------------------------------------------------------------------------------------------
# Retargeting and drawing


def retarget(
    track: FaceTrack, width: int, height: int, face_box: tuple[float, float, float, float] | None = None
) -> FaceTrack:
    """The track in an output of `width` x `height`.

    Without `face_box` the driving frame is scaled to cover the output (same aspect, centred, cropped as the
    frames are). With `face_box` (x1, y1, x2, y2 in output pixels, e.g. the character's face in its reference
    image) the driving face's median box over the clip is moved and scaled onto it, each axis on its own, so the
    points take the character's face proportions and position while the motion stays relative.
    """
    if face_box is None:
        scale = max(width / track.width, height / track.height)
        sx = sy = scale
        tx = (width - track.width * scale) / 2.0
        ty = (height - track.height * scale) / 2.0
    else:
        boxes = np.stack([f.box for f in track.frames])
        median = np.median(boxes, axis=0)
        mw, mh = max(median[2] - median[0], 1e-6), max(median[3] - median[1], 1e-6)
        x1, y1, x2, y2 = (float(v) for v in face_box)
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"face box {face_box} is empty (x1, y1, x2, y2 with x2 > x1, y2 > y1)")
        sx, sy = (x2 - x1) / mw, (y2 - y1) / mh
        tx, ty = x1 - median[0] * sx, y1 - median[1] * sy
    factor = np.array([sx, sy])
    shift = np.array([tx, ty])
    frames = []
    for f in track.frames:
        box = (f.box.reshape(2, 2) * factor + shift).ravel()
        points3d = None
        if f.points3d is not None:
            points3d = f.points3d.copy()
            points3d[:, :2] = points3d[:, :2] * factor + shift
            points3d[:, 2] *= math.sqrt(sx * sy)
        frames.append(FaceFrame(f.index, f.source, box, f.points * factor + shift, f.pose, points3d))
    return FaceTrack(frames, int(width), int(height), track.fps, track.landmarks)


def dot_radius(width: int, height: int) -> int:
    """3 px at 512 (the OpenPose face drawing), in proportion to the output's shorter side."""
    return max(1, round(3 * min(width, height) / 512))


def draw_face(points, width: int, height: int, style: str = "dots", radius: int | None = None) -> np.ndarray:
    """One control image (H, W, 3 uint8): white dots on black at `points` (and the 68-point contours)."""
    cv2 = require("cv2")
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)} (got {style!r})")
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    pts = np.asarray(points, dtype=np.float64)
    r = dot_radius(width, height) if radius is None else int(radius)
    if style == "lines" and len(pts) == 68:
        thickness = max(1, r // 2)
        for ids, closed in CONTOURS_68:
            line = np.round(pts[list(ids)]).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas, [line], closed, (255, 255, 255), thickness, lineType=cv2.LINE_8)
    for x, y in pts:
        if 0 <= x < width and 0 <= y < height:
            cv2.circle(canvas, (int(round(x)), int(round(y))), r, (255, 255, 255), -1, lineType=cv2.LINE_8)
    return canvas


def render_track(track: FaceTrack, style: str = "dots", control: Control | None = None) -> np.ndarray:
    """The control frames (F, H, W, 3 uint8) of a (retargeted) track."""
    control = or_default(control)
    out = np.zeros((len(track.frames), track.height, track.width, 3), dtype=np.uint8)
    for i, f in enumerate(track.frames):
        out[i] = draw_face(f.points, track.width, track.height, style)
        control.check()
    return out


def read_driving_video(path: str | Path, max_frames: int = 0, frame_step: int = 1):
    """Frames (F, H, W, 3 uint8) and frame rate of a driving video, every `frame_step`-th frame."""
    from .encode import read_video

    if frame_step < 1:
        raise ValueError(f"frame_step must be at least 1 (got {frame_step})")
    limit = max_frames * frame_step if max_frames else None
    video = read_video(path, max_frames=limit)
    frames = video.frames[::frame_step]
    if max_frames:
        frames = frames[:max_frames]
    fps = (video.fps or 0.0) / frame_step
    return frames, fps


def cover_frames(frames, width: int, height: int) -> np.ndarray:
    """Frames (F, h, w, 3 uint8) scaled to cover `width` x `height` and centre-cropped, as `retarget` maps points."""
    cv2 = require("cv2")
    frames = np.asarray(frames)
    h, w = frames.shape[1:3]
    scale = max(width / w, height / h)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    x0, y0 = (size[0] - width) // 2, (size[1] - height) // 2
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        scaled = cv2.resize(np.ascontiguousarray(frame), size, interpolation=cv2.INTER_AREA)
        out[i] = scaled[y0 : y0 + height, x0 : x0 + width]
    return out
