"""Pose maps from DWPose-shaped ONNX files: the planted person box and SimCC peaks come back as keypoints in
image pixels, and the map draws them in the OpenPose colours (limbs at 60 %, points full, hands blue, face
white); low scores are left out; missing files are named."""

from __future__ import annotations

import numpy as np
import pytest

from cf_testing.pose_models import write_pose_models
from charforge.engine.guide import pose

# A 320 x 240 photo letterboxes into 640 x 640 at ratio 2.
WIDTH, HEIGHT = 320, 240
BOX = (100.0, 40.0, 180.0, 200.0)
# Crop: centre (140, 120), box 80 x 160 widened 1.25 -> 100 x 200, to 3:4 -> 150 x 200.
CENTRE, SCALE = np.array([140.0, 120.0]), np.array([150.0, 200.0])


def _image_point(bx: int, by: int) -> np.ndarray:
    return np.array([bx / 2 / 288, by / 2 / 384]) * SCALE + CENTRE - SCALE / 2


def _bins_for(x: float, y: float) -> tuple[int, int]:
    """SimCC bins nearest to image pixel (x, y)."""
    crop = (np.array([x, y]) - CENTRE + SCALE / 2) / SCALE * np.array([288, 384]) * 2
    return int(round(crop[0])), int(round(crop[1]))


# COCO body keypoints planted (nose, eyes, shoulders, elbows, wrists, hips, knees, ankles) spread over the box.
BODY_AT = {
    0: (140, 60), 1: (146, 54), 2: (134, 54), 5: (160, 90), 6: (120, 90), 7: (170, 120), 8: (110, 120),
    9: (175, 150), 10: (105, 150), 11: (152, 150), 12: (128, 150), 13: (155, 175), 14: (125, 175),
    15: (157, 196), 16: (123, 196),
}  # fmt: skip
FACE_AT = {23: (126, 68)}
LEFT_HAND_AT = {91: (190, 160), 92: (196, 168)}
LOW_SCORE_AT = {3: (200, 30)}  # left ear, scored 0.2: not drawn


@pytest.fixture(scope="module")
def estimator(tmp_path_factory):
    bins = {}
    for group, height in ((BODY_AT, 0.9), (FACE_AT, 0.8), (LEFT_HAND_AT, 0.7), (LOW_SCORE_AT, 0.2)):
        for k, (x, y) in group.items():
            bins[k] = (*_bins_for(x, y), height)
    folder = write_pose_models(tmp_path_factory.mktemp("dwpose"), tuple(v * 2 for v in BOX), bins)
    return pose.PoseEstimator(folder), bins


def test_planted_box_and_peaks_come_back_as_keypoints_in_image_pixels(estimator):
    est, bins = estimator
    people = est.people(np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    assert len(people) == 1
    person = people[0]
    np.testing.assert_allclose(person.box, BOX, atol=1e-4)
    # OpenPose order: 0 nose, 1 neck, 2 right shoulder (COCO 6), 5 left shoulder (COCO 5), 15 left eye (COCO 1)
    for openpose_i, coco_i in ((0, 0), (2, 6), (5, 5), (4, 10), (13, 15), (15, 1), (14, 2)):
        bx, by, height = bins[coco_i]
        np.testing.assert_allclose(person.body[openpose_i], _image_point(bx, by), atol=1e-6)
        assert person.body_scores[openpose_i] == pytest.approx(height)
    np.testing.assert_allclose(person.body[1], (person.body[2] + person.body[5]) / 2)
    np.testing.assert_allclose(person.face[0], _image_point(*bins[23][:2]), atol=1e-6)
    np.testing.assert_allclose(person.hands[0, 1], _image_point(*bins[92][:2]), atol=1e-6)
    assert person.body_scores[17] == pytest.approx(0.2)  # left ear found, but below the drawing threshold
    assert person.hand_scores[1].max() == 0  # right hand not planted


def _px(canvas, point):
    return tuple(int(v) for v in canvas[int(point[1]), int(point[0])])


def test_map_draws_the_openpose_colour_scheme(estimator):
    est, _ = estimator
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    canvas = est.pose_map(image)
    person = est.people(image)[0]
    assert canvas.shape == (HEIGHT, WIDTH, 3) and canvas.dtype == np.uint8
    # Points in their own colour (those far enough from other points), limbs at 60 % of theirs.
    for i in (0, 4, 7, 10, 13):
        assert _px(canvas, person.body[i]) == pose.BODY_COLOURS[i], i
    for n, (a, b) in enumerate(pose.LIMBS):
        if n <= 12:
            mid = (person.body[a] + person.body[b]) / 2
            assert _px(canvas, mid) == tuple(int(c * 0.6) for c in pose.BODY_COLOURS[n]), n
    # Left ear (score 0.2) not drawn: black where it would be.
    assert _px(canvas, person.body[17]) == (0, 0, 0)
    assert _px(canvas, person.face[0]) == pose.FACE_COLOUR
    assert _px(canvas, person.hands[0, 0]) == pose.HAND_JOINT_COLOUR
    # The bone between hand points 0 and 1 is the first hue (red).
    mid = person.hands[0, 0] * 0.5 + person.hands[0, 1] * 0.5
    assert _px(canvas, mid) in ((0, 0, 255), (255, 0, 0))  # joint disc covers the short bone, or bone shows
    # Nothing away from the person.
    assert canvas[:, :60].max() == 0 and canvas[:, 260:].max() == 0
    # Switching parts off.
    bare = est.pose_map(image, face=False, hands=False)
    assert _px(bare, person.face[0]) == (0, 0, 0) and _px(bare, person.hands[0, 0]) == (0, 0, 0)
    assert _px(bare, person.body[0]) == pose.BODY_COLOURS[0]


def test_yolox_decoding_and_nms_keep_the_best_of_overlapping_people():
    raw = np.zeros((1, 8400, 85), np.float32)
    from cf_testing.pose_models import detector_output

    raw += detector_output((64, 64, 256, 448), score=0.9)
    second = detector_output((96, 64, 288, 448), score=0.6)  # overlaps the first: suppressed
    other = detector_output((400, 64, 560, 400), score=0.5)  # apart: kept
    raw = np.maximum(raw, np.maximum(second, other))
    boxes = pose.person_boxes(raw, ratio=2.0)
    assert len(boxes) == 2
    np.testing.assert_allclose(boxes[0], (32, 32, 128, 224), atol=1e-4)
    np.testing.assert_allclose(boxes[1], (200, 32, 280, 200), atol=1e-4)
    weak = detector_output((64, 64, 256, 448), score=0.25)
    assert pose.person_boxes(weak, ratio=1.0) == []


def test_missing_files_are_named(tmp_path):
    with pytest.raises(pose.PoseModelsNotFoundError) as err:
        pose.PoseEstimator(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert pose.DETECTOR_FILE in str(err.value) and pose.POSE_FILE in str(err.value)
