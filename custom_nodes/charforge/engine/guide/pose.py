"""Pose maps for ControlNet from DWPose's two ONNX files, run with onnxruntime (numpy + OpenCV, no torch).

The files (models/dwpose): ``yolox_l.onnx`` finds people (input 1 x 3 x 640 x 640, the photo letterboxed
into the top-left corner on grey 114, BGR 0..255; output 1 x 8400 x 85 raw YOLOX predictions: per anchor of the
8/16/32-stride grids x, y, log w, log h, objectness and 80 class scores) and ``dw-ll_ucoco_384.onnx`` (RTMPose
with SimCC heads) places 133 COCO-WholeBody keypoints in each person's box (input 1 x 3 x 384 x 288, the box
widened by 1.25 to a 3:4 aspect, normalised with the ImageNet mean and std in 0..255; outputs simcc_x
1 x 133 x 576 and simcc_y 1 x 133 x 768, two bins per pixel). Keypoints 0-16 are the COCO body, 17-22 the feet,
23-90 the face, 91-111 the left hand and 112-132 the right hand.

The map is drawn the way OpenPose ControlNets were trained: 18 body points (COCO's 17 in OpenPose order plus
the neck between the shoulders), 17 limbs as ellipses in the fixed colour list at 60 % and the points as
radius-4 discs, hand bones in hues around the colour wheel with blue joints, face points as white dots, on
black. Points scoring at most `SCORE_MIN` are left out.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...deps import require

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
DETECTOR_SIZE = (640, 640)  # height, width
POSE_SIZE = (384, 288)  # height, width
SIMCC_SPLIT = 2.0
BOX_PADDING = 1.25
PERSON_MIN = 0.3  # detector score kept as a person
NMS_IOU = 0.45
SCORE_MIN = 0.3  # keypoint score drawn
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)

# OpenPose body order: COCO index of each of the 18 points (-1: the neck, mean of both shoulders).
OPENPOSE_FROM_COCO = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# The 17 drawn limbs as pairs of OpenPose body indices, in drawing (and colour) order.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
# One colour per body point (and per limb, in order), RGB.
BODY_COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
LIMB_WIDTH = 4
# 21-point hand: wrist 0, then four joints for each finger from the thumb.
HAND_BONES = tuple((0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4))
HAND_JOINT_COLOUR = (0, 0, 255)
FACE_COLOUR = (255, 255, 255)


class PoseModelsNotFoundError(FileNotFoundError):
    """The DWPose files are not where the node looks for them."""


@dataclass
class Person:
    """One person's keypoints in image pixels: body (18 x 2, OpenPose order), face (68 x 2), hands (2 x 21 x 2)
    each with scores; `box` is the detector's x1, y1, x2, y2."""

    box: tuple[float, float, float, float]
    body: np.ndarray
    body_scores: np.ndarray
    face: np.ndarray
    face_scores: np.ndarray
    hands: np.ndarray
    hand_scores: np.ndarray


def find_pose_models(folder: str | Path) -> tuple[Path, Path]:
    """The detector and pose files in `folder`, or an error naming the folder and both files."""
    folder = Path(folder)
    paths = (folder / DETECTOR_FILE, folder / POSE_FILE)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise PoseModelsNotFoundError(
            f"pose maps need DWPose's {DETECTOR_FILE} and {POSE_FILE} in {folder}; missing: {', '.join(missing)}"
        )
    return paths


def letterbox(image_bgr: np.ndarray, size: tuple[int, int] = DETECTOR_SIZE) -> tuple[np.ndarray, float]:
    """The detector's input (1, 3, H, W) float32 and the scale from image to input pixels."""
    cv2 = require("cv2")
    height, width = image_bgr.shape[:2]
    ratio = min(size[0] / height, size[1] / width)
    canvas = np.full((size[0], size[1], 3), 114, dtype=np.uint8)
    new_w, new_h = int(width * ratio), int(height * ratio)
    resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas[:new_h, :new_w] = resized
    return canvas.transpose(2, 0, 1)[None].astype(np.float32), ratio


def decode_yolox(raw: np.ndarray, size: tuple[int, int] = DETECTOR_SIZE) -> np.ndarray:
    """Raw YOLOX output (1, A, 5 + classes) -> (A, 6): x1, y1, x2, y2 in input pixels, person score, class."""
    pred = raw[0].astype(np.float64)
    grids, strides = [], []
    for stride in (8, 16, 32):
        gh, gw = size[0] // stride, size[1] // stride
        ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        grids.append(np.stack([xs.ravel(), ys.ravel()], 1))
        strides.append(np.full((gh * gw, 1), stride))
    grid = np.concatenate(grids)
    stride_col = np.concatenate(strides)
    if len(grid) != len(pred):
        raise ValueError(
            f"detector output has {len(pred)} anchors; a {size[1]}x{size[0]} YOLOX has {len(grid)}"
        )
    centre = (pred[:, :2] + grid) * stride_col
    half = np.exp(np.clip(pred[:, 2:4], -50, 50)) * stride_col / 2
    scores = pred[:, 4:5] * pred[:, 5:]
    cls = scores.argmax(1)
    best = scores.max(1)
    return np.concatenate([centre - half, centre + half, best[:, None], cls[:, None]], 1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> list[int]:
    """Indices kept by greedy non-maximum suppression, best first."""
    order = list(np.argsort(-scores))
    keep: list[int] = []
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    while order:
        i = order.pop(0)
        keep.append(int(i))
        rest = np.array(order, dtype=int)
        if not len(rest):
            break
        x1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
        overlap = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        order = [int(j) for j, o in zip(rest, overlap, strict=True) if o <= iou]
    return keep


def person_boxes(raw: np.ndarray, ratio: float, size: tuple[int, int] = DETECTOR_SIZE) -> list[tuple]:
    """People (class 0, score > PERSON_MIN) after NMS, as x1, y1, x2, y2 in image pixels."""
    det = decode_yolox(raw, size)
    det = det[(det[:, 5] == 0) & (det[:, 4] > PERSON_MIN)]
    if not len(det):
        return []
    keep = nms(det[:, :4], det[:, 4])
    return [tuple(float(v) / ratio for v in det[i, :4]) for i in keep]


def crop_transform(box: tuple, size: tuple[int, int] = POSE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Centre and (w, h) of the region the pose model sees: the box widened by BOX_PADDING to size's aspect."""
    x1, y1, x2, y2 = box
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    w, h = (x2 - x1) * BOX_PADDING, (y2 - y1) * BOX_PADDING
    aspect = size[1] / size[0]
    if w > h * aspect:
        h = w / aspect
    else:
        w = h * aspect
    return centre, np.array([w, h])


def pose_input(
    image_rgb: np.ndarray, box: tuple, size: tuple[int, int] = POSE_SIZE
) -> tuple[np.ndarray, Any]:
    """The pose model's input (1, 3, H, W) for one box, and (centre, scale) to map keypoints back."""
    cv2 = require("cv2")
    centre, scale = crop_transform(box, size)
    sx, sy = size[1] / scale[0], size[0] / scale[1]
    matrix = np.array(
        [[sx, 0, size[1] / 2 - centre[0] * sx], [0, sy, size[0] / 2 - centre[1] * sy]], dtype=np.float64
    )
    crop = cv2.warpAffine(image_rgb, matrix, (size[1], size[0]), flags=cv2.INTER_LINEAR)
    normed = (crop.astype(np.float32) - MEAN) / STD
    return normed.transpose(2, 0, 1)[None].astype(np.float32), (centre, scale)


def decode_simcc(
    simcc_x: np.ndarray, simcc_y: np.ndarray, centre: np.ndarray, scale: np.ndarray, size=POSE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """SimCC outputs (1, K, Wx), (1, K, Wy) -> (K, 2) image pixels and (K,) scores (the lower axis peak)."""
    x_bins, y_bins = simcc_x[0], simcc_y[0]
    loc = np.stack([x_bins.argmax(1), y_bins.argmax(1)], 1).astype(np.float64) / SIMCC_SPLIT
    scores = np.minimum(x_bins.max(1), y_bins.max(1)).astype(np.float64)
    input_wh = np.array([size[1], size[0]], dtype=np.float64)
    points = loc / input_wh * scale + centre - scale / 2
    return points, scores


def to_person(box: tuple, points: np.ndarray, scores: np.ndarray) -> Person:
    """133 whole-body keypoints -> OpenPose body (with the neck), face and both hands."""
    neck = (points[5] + points[6]) / 2
    neck_score = min(scores[5], scores[6])
    body = np.stack([neck if i < 0 else points[i] for i in OPENPOSE_FROM_COCO])
    body_scores = np.array([neck_score if i < 0 else scores[i] for i in OPENPOSE_FROM_COCO])
    return Person(
        box=tuple(box),
        body=body,
        body_scores=body_scores,
        face=points[23:91],
        face_scores=scores[23:91],
        hands=np.stack([points[91:112], points[112:133]]),
        hand_scores=np.stack([scores[91:112], scores[112:133]]),
    )


def draw_pose(people: list[Person], height: int, width: int, body=True, face=True, hands=True) -> np.ndarray:
    """The OpenPose-style map, (H, W, 3) uint8 RGB on black."""
    cv2 = require("cv2")
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for person in people:
        ok = person.body_scores > SCORE_MIN
        if body:
            for (a, b), colour in zip(LIMBS, BODY_COLOURS[: len(LIMBS)], strict=True):
                if not (ok[a] and ok[b]):
                    continue
                (xa, ya), (xb, yb) = person.body[a], person.body[b]
                length = math.hypot(xa - xb, ya - yb)
                angle = math.degrees(math.atan2(ya - yb, xa - xb))
                polygon = cv2.ellipse2Poly(
                    (int((xa + xb) / 2), int((ya + yb) / 2)),
                    (int(length / 2), LIMB_WIDTH),
                    int(angle),
                    0,
                    360,
                    1,
                )
                cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in colour])
            for i, colour in enumerate(BODY_COLOURS):
                if ok[i]:
                    x, y = person.body[i]
                    cv2.circle(canvas, (int(x), int(y)), 4, colour, thickness=-1)
        if hands:
            for hand, hand_ok in zip(person.hands, person.hand_scores > SCORE_MIN, strict=True):
                for n, (a, b) in enumerate(HAND_BONES):
                    if hand_ok[a] and hand_ok[b]:
                        rgb = colorsys.hsv_to_rgb(n / len(HAND_BONES), 1.0, 1.0)
                        pa, pb = hand[a], hand[b]
                        cv2.line(
                            canvas,
                            (int(pa[0]), int(pa[1])),
                            (int(pb[0]), int(pb[1])),
                            [int(c * 255) for c in rgb],
                            thickness=2,
                        )
                for point, point_ok in zip(hand, hand_ok, strict=True):
                    if point_ok:
                        cv2.circle(canvas, (int(point[0]), int(point[1])), 4, HAND_JOINT_COLOUR, thickness=-1)
        if face:
            for point, point_ok in zip(person.face, person.face_scores > SCORE_MIN, strict=True):
                if point_ok:
                    cv2.circle(canvas, (int(point[0]), int(point[1])), 3, FACE_COLOUR, thickness=-1)
    return canvas


class PoseEstimator:
    """DWPose's detector and whole-body pose model, loaded once from a folder."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None):
        ort = require("onnxruntime")
        detector_path, pose_path = find_pose_models(folder)
        chosen = providers or ["CPUExecutionProvider"]
        self.detector = ort.InferenceSession(str(detector_path), providers=chosen)
        self.pose = ort.InferenceSession(str(pose_path), providers=chosen)
        self._det_input = self.detector.get_inputs()[0].name
        self._pose_input = self.pose.get_inputs()[0].name
        names = [o.name for o in self.pose.get_outputs()]
        self._pose_outputs = ["simcc_x", "simcc_y"] if {"simcc_x", "simcc_y"} <= set(names) else names[:2]

    def people(self, image_rgb: np.ndarray) -> list[Person]:
        """Every person found in an (H, W, 3) uint8 RGB image."""
        batch, ratio = letterbox(np.ascontiguousarray(image_rgb[:, :, ::-1]))
        raw = self.detector.run(None, {self._det_input: batch})[0]
        found = []
        for box in person_boxes(raw, ratio):
            crop, (centre, scale) = pose_input(image_rgb, box)
            simcc_x, simcc_y = self.pose.run(self._pose_outputs, {self._pose_input: crop})
            points, scores = decode_simcc(simcc_x, simcc_y, centre, scale)
            found.append(to_person(box, points, scores))
        return found

    def pose_map(self, image_rgb: np.ndarray, body=True, face=True, hands=True) -> np.ndarray:
        """The OpenPose-style map of an (H, W, 3) uint8 RGB image, same size."""
        people = self.people(image_rgb)
        return draw_pose(people, image_rgb.shape[0], image_rgb.shape[1], body=body, face=face, hands=hands)
