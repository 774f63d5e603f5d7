"""Pose maps end to end on stand-ins that read the photo: the detector boxes the bright pixels and the pose model
finds colour dots (keypoint k follows the red, green or blue dot, k % 3), so a dot planted in the photo must come
back at its own pixel through the letterbox, the person-box crop (1.25 padding, 3:4), the ImageNet normalisation
and the SimCC decode, for tall and wide boxes, photos smaller and larger than the detector input and a person
at the photo's edge."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from cf_testing.pose_models import PERSON_SCORE, write_dot_pose_models
from charforge.engine.guide import pose

CHANNELS = np.array([k % 3 for k in range(133)])
CHANNELS[112:133] = -1  # the right hand finds nothing: score 0
CHANNELS[4] = -1  # right ear too
HEIGHTS = 0.4 + 0.5 * np.arange(133) / 132


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = write_dot_pose_models(tmp_path_factory.mktemp("dwpose_dots"), CHANNELS, HEIGHTS)
    return folder, pose.PoseEstimator(folder)


def _photo(width: int, height: int, dots: list[tuple[int, int]]) -> np.ndarray:
    """Black RGB photo with a soft red, green and blue dot (peak 255 on the given pixel) at `dots`."""
    photo = np.zeros((height, width, 3), np.uint8)
    ys, xs = np.mgrid[0:height, 0:width]
    for channel, (x, y) in enumerate(dots):
        blob = 255 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.5**2))
        photo[..., channel] = np.maximum(
            photo[..., channel], np.where(blob > 1, blob, 0).round().astype(np.uint8)
        )
    return photo


def _bright_extent(photo: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(photo.max(2) > 128)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


# (photo width, height), red / green / blue dot pixels; letterbox ratio in the comment.
CASES = {
    "tall box, 480x320 photo (ratio 4/3)": ((480, 320), [(200, 40), (230, 160), (180, 290)]),
    "wide box, 960x540 photo (ratio 2/3)": ((960, 540), [(300, 250), (700, 300), (520, 200)]),
    "box at the top-left edge, 200x500 photo (ratio 1.28)": ((200, 500), [(2, 3), (60, 120), (25, 70)]),
    "box at the bottom-right edge, 640x480 photo (ratio 1)": (
        (640, 480),
        [(637, 477), (560, 420), (600, 380)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_planted_dots_come_back_at_their_pixels(models, case):
    _, est = models
    (width, height), dots = CASES[case]
    photo = _photo(width, height, dots)
    people = est.people(photo)
    assert len(people) == 1
    person = people[0]
    # The detector's box (in letterboxed pixels) comes back in photo pixels.
    ratio = min(640 / height, 640 / width)
    np.testing.assert_allclose(person.box, _bright_extent(photo), atol=1.0 / ratio + 0.5)
    # Every keypoint lands on its dot (within half a crop pixel, under one photo pixel here), scored its planted height.
    at = np.array(dots, dtype=np.float64)
    points = np.zeros((133, 2))
    scores = np.zeros(133)
    coco_body = [i for i in pose.OPENPOSE_FROM_COCO if i >= 0]
    body_rows = [n for n, i in enumerate(pose.OPENPOSE_FROM_COCO) if i >= 0]
    points[coco_body], scores[coco_body] = person.body[body_rows], person.body_scores[body_rows]
    points[23:91], scores[23:91] = person.face, person.face_scores
    points[91:133], scores[91:133] = person.hands.reshape(42, 2), person.hand_scores.reshape(42)
    kept = np.ones(133, bool)
    kept[17:23] = False  # the feet are not part of a Person
    found = (CHANNELS >= 0) & kept
    for k in np.nonzero(found)[0]:
        np.testing.assert_allclose(points[k], at[CHANNELS[k]], atol=1.0, err_msg=f"keypoint {k}")
    np.testing.assert_allclose(scores[found], HEIGHTS[found], atol=1e-4)
    assert scores[~found & kept].max() == 0
    # The neck is the mean of the shoulders (COCO 5 on blue, 6 on red).
    np.testing.assert_allclose(person.body[1], (at[2] + at[0]) / 2, atol=1.0)
    assert person.body_scores[1] == pytest.approx(min(HEIGHTS[5], HEIGHTS[6]), abs=1e-4)


def _crop_position(session, photo: np.ndarray, box: tuple) -> np.ndarray:
    """Where the pose model sees the red, green and blue dots in its 288 x 384 crop (x, y crop pixels)."""
    crop, _ = pose.pose_input(photo, box)
    simcc_x, simcc_y = session.run(["simcc_x", "simcc_y"], {"input": crop})
    return np.stack([simcc_x[0, :3].argmax(1), simcc_y[0, :3].argmax(1)], 1) / 2


@pytest.mark.parametrize(
    ("box", "crop_w", "crop_h"),
    [
        ((150.0, 50.0, 250.0, 350.0), 281.25, 375.0),  # tall 100 x 300: height x 1.25, width to 3:4
        ((100.0, 150.0, 420.0, 250.0), 400.0, 533.333),  # wide 320 x 100: width x 1.25, height to 3:4
        ((0.0, 0.0, 90.0, 120.0), 112.5, 150.0),  # exactly 3:4 at the corner: both x 1.25, partly outside
    ],
)
def test_the_pose_model_sees_the_box_padded_by_a_quarter_at_three_by_four(models, box, crop_w, crop_h):
    folder, _ = models
    session = ort.InferenceSession(str(folder / pose.POSE_FILE), providers=["CPUExecutionProvider"])
    x1, y1, x2, y2 = box
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    dots = [(int(x1) + 5, int(y1) + 5), (int(centre[0]), int(centre[1])), (int(x2) - 6, int(y2) - 6)]
    photo = _photo(480, 400, dots)
    seen = _crop_position(session, photo, box)
    expected = (np.array(dots) - centre) / np.array([crop_w, crop_h]) * np.array([288, 384]) + [144, 192]
    np.testing.assert_allclose(seen, expected, atol=0.75)


def test_a_dark_photo_has_nobody_and_an_empty_map(models):
    _, est = models
    photo = np.zeros((200, 300, 3), np.uint8)
    photo[50:80, 60:90] = 100  # dim: below the detector's brightness
    assert est.people(photo) == []
    assert est.pose_map(photo).max() == 0
    assert PERSON_SCORE > pose.PERSON_MIN
