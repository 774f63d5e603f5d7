"""InstantID's keypoint picture pixel by pixel (point colours, 60 % limbs, black elsewhere, marks scaled with
the canvas), the largest-face choice, the raw-scale embedding and the face tokens of a face and of zeros."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from charforge.engine.guide import instantid
from charforge.engine.guide import ipadapter as ipa

# Left eye, right eye, nose, left and right mouth corner on a 1280 x 1280 canvas (the published size).
POINTS = np.array([[500, 500], [780, 500], [640, 640], [540, 800], [740, 800]], dtype=np.float32)
SHADE = {name: tuple(int(c * 0.6) for c in colour) for name, colour in enumerate(instantid.KEYPOINT_COLOURS)}


def _colour(image, x, y):
    return tuple(int(v) for v in image[y, x])


def test_points_are_discs_of_radius_10_in_their_colours_on_the_published_canvas():
    image = instantid.draw_keypoints(POINTS, 1280, 1280)
    assert image.shape == (1280, 1280, 3) and image.dtype == np.uint8
    for (x, y), colour in zip(POINTS.astype(int), instantid.KEYPOINT_COLOURS, strict=True):
        assert _colour(image, x, y) == colour
        assert _colour(image, x, y - 10) == colour  # on the radius-10 disc (above: no limb goes up)
        assert _colour(image, x, y - 12) == (0, 0, 0)  # just outside it
    assert _colour(image, 0, 0) == (0, 0, 0) and _colour(image, 1279, 1279) == (0, 0, 0)


def test_limbs_join_outer_points_to_the_nose_at_60_percent_of_the_outer_colour():
    image = instantid.draw_keypoints(POINTS, 1280, 1280)
    nose = POINTS[2]
    for outer, _ in instantid.LIMBS:
        for t in (0.3, 0.5, 0.7):  # along the limb, away from both discs
            x, y = (POINTS[outer] * (1 - t) + nose * t).astype(int)
            assert _colour(image, x, y) == SHADE[outer], (outer, t)
    # half-width 4: 3 px across the left-eye limb it is coloured, 7 px across it is black
    direction = (nose - POINTS[0]) / np.linalg.norm(nose - POINTS[0])
    normal = np.array([-direction[1], direction[0]])
    middle = (POINTS[0] + nose) / 2
    assert _colour(image, *np.round(middle + 3 * normal).astype(int)) == SHADE[0]
    assert _colour(image, *np.round(middle + 7 * normal).astype(int)) == (0, 0, 0)


def test_nothing_is_drawn_outside_the_limbs_and_discs():
    image = instantid.draw_keypoints(POINTS, 1280, 1280)
    lit = np.argwhere(image.any(axis=2))
    assert lit[:, 1].min() >= 500 - 10 and lit[:, 1].max() <= 780 + 10
    assert lit[:, 0].min() >= 500 - 10 and lit[:, 0].max() <= 800 + 10
    colours = {tuple(int(v) for v in c) for c in image[image.any(axis=2)]}
    assert colours == set(instantid.KEYPOINT_COLOURS) | {SHADE[0], SHADE[1], SHADE[3], SHADE[4]}


def test_marks_scale_with_the_canvas():
    assert instantid.mark_sizes(1280, 720) == (4, 10)
    assert instantid.mark_sizes(640, 480) == (2, 5)
    assert instantid.mark_sizes(64, 64) == (1, 1)
    small = instantid.draw_keypoints(POINTS / 2, 640, 640)
    x, y = (POINTS[1] / 2).astype(int)
    assert _colour(small, x, y - 5) == instantid.KEYPOINT_COLOURS[1]
    assert _colour(small, x, y - 7) == (0, 0, 0)


def test_draw_keypoints_wants_five_points():
    with pytest.raises(ValueError, match="5 face keypoints"):
        instantid.draw_keypoints(POINTS[:3], 64, 64)


def _face(box, norm=20.0, seed=0, landmarks=True):
    unit = np.random.default_rng(seed).normal(size=512).astype(np.float32)
    unit /= np.linalg.norm(unit)
    return SimpleNamespace(
        box=box, landmarks=POINTS if landmarks else None, embedding=unit, embedding_norm=norm
    )


def test_largest_face_and_clear_errors():
    small, big = _face((0, 0, 50, 50)), _face((10, 10, 200, 120), seed=1)
    assert instantid.largest_face([small, big]) is big
    with pytest.raises(instantid.NoFaceError, match="no face found in photo 2"):
        instantid.largest_face([], "photo 2")
    with pytest.raises(instantid.NoFaceError, match="no keypoints"):
        instantid.largest_face([_face((0, 0, 9, 9), landmarks=False)])


def test_embedding_is_the_raw_scale_and_an_identity_keeps_only_its_direction():
    a, b = _face((0, 0, 1, 1), 20.0, 0), _face((0, 0, 1, 1), 30.0, 1)
    one = instantid.face_embedding([a])
    np.testing.assert_allclose(one, a.embedding * 20.0, rtol=1e-6)
    both = instantid.face_embedding([a, b])
    np.testing.assert_allclose(both, (a.embedding * 20.0 + b.embedding * 30.0) / 2, rtol=1e-5)
    direction = _face((0, 0, 1, 1), seed=5).embedding
    steered = instantid.face_embedding([a, b], direction)
    np.testing.assert_allclose(steered, direction * 25.0, rtol=1e-5)


def test_face_tokens_of_the_face_and_of_zeros():
    torch.manual_seed(0)
    projection = ipa.PerceiverResampler(64, 1, 16, 512, 2048, depth=1, ff_mult=2).eval()
    embedding = _face((0, 0, 1, 1)).embedding * 25.0
    cond, uncond = instantid.face_tokens(projection, embedding)
    assert cond.shape == uncond.shape == (1, 16, 2048)
    with torch.no_grad():
        expected = projection(torch.as_tensor(embedding).reshape(1, 1, 512))
        zeros = projection(torch.zeros(1, 1, 512))
    torch.testing.assert_close(cond, expected)
    torch.testing.assert_close(uncond, zeros)
    assert (cond - uncond).abs().max() > 1e-3
