"""Canny maps equal cv2.Canny on the grey photo with the same thresholds; line art draws white lines at edges
and leaves flat areas black; bad settings are refused."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from charforge.engine.guide import lines


def _photo():
    rng = np.random.default_rng(1)
    image = np.full((64, 96, 3), 40, np.uint8)
    image[16:48, 24:72] = (220, 180, 90)
    cv2.circle(image, (70, 20), 9, (30, 200, 240), -1)
    return (image.astype(np.int16) + rng.integers(-6, 6, image.shape)).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(("low", "high"), [(100, 200), (20, 60)])
def test_canny_equals_opencv_on_the_same_thresholds(low, high):
    photo = _photo()
    result = lines.canny_map(photo, low, high)
    expected = cv2.Canny(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY), low, high)
    assert result.shape == (64, 96, 3) and result.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(result[..., channel], expected)
    assert expected.any()


def test_line_art_is_white_at_edges_and_black_on_flat_areas():
    photo = np.full((64, 96, 3), 200, np.uint8)
    photo[:, 48:] = 60  # one vertical edge at x = 48, dark on the right
    art = lines.line_art_map(photo)
    assert art.shape == (64, 96, 3)
    assert art[:, :30].max() == 0 and art[:, 70:].max() == 0  # flat far from the edge
    assert art[32, 48:51].max() == 255  # the dark side of the edge is a line
    assert art[32, 44:48].max() == 0  # the light side is not
    assert (art[..., 0] == art[..., 1]).all()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="low <= high"):
        lines.canny_map(_photo(), 200, 100)
    with pytest.raises(ValueError, match="blur > 0"):
        lines.line_art_map(_photo(), blur=0)
