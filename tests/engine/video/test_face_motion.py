"""Face-driven motion: landmarks of a planted moving face, head pose, gaps, smoothing, control images.

The face pack is the planted detector (a red cell gives the face box) with landmark models of InsightFace's
I/O whose outputs follow two coloured dots (cf_testing/face_motion_models.py), so each frame's landmarks are
known. They go through insightface's own crop, model run and inverse transform, then ours: tracking, gap
filling, forward-backward One-Euro smoothing and head pose.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cf_testing.face_motion_models import (
    motion_frame,
    planted_points,
    template_68,
    template_106,
    write_face_motion_pack,
)
from cf_testing.fixtures import needs_insightface

pytestmark = needs_insightface

SIZE = (320, 320)
FPS = 12.0


@pytest.fixture(scope="module")
def motion_pack(tmp_path_factory):
    models = tmp_path_factory.mktemp("face_motion") / "models"
    write_face_motion_pack(models / "insightface", "buffalo_l")
    return models


@pytest.fixture
def landmarker(no_comfy, motion_pack, monkeypatch):
    from charforge.engine.faces import FaceAnalyzer
    from charforge.engine.video.face_motion import FaceLandmarker

    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(motion_pack))
    yield FaceLandmarker.load("buffalo_l", det_size=320)
    FaceAnalyzer.clear_cache()
    FaceLandmarker._cache.clear()


def _clip(count=24, hidden=(5, 6, 23)):
    """A face sliding right and down while it turns from -20 to +20 degrees; no face in `hidden` frames."""
    frames, truth = [], []
    for i in range(count):
        t = i / (count - 1)
        green = (120.3 + 60.0 * t, 150.6 + 24.0 * t)
        roll = -20.0 + 40.0 * t
        blue = (green[0] + 36 * math.cos(math.radians(roll)), green[1] + 36 * math.sin(math.radians(roll)))
        # the box (red cell) jumps on the detector's 16 px grid while the dots glide: the crop moves under them
        cell = (16 * round((green[0] - 8) / 16), 16 * round((green[1] - 28) / 16))
        frames.append(motion_frame(SIZE, None if i in hidden else cell, green, blue))
        truth.append((green, blue, roll))
    return np.stack(frames), truth


def test_68_point_landmarks_follow_a_moving_face_with_gaps_filled_and_roll_recovered(landmarker):
    from charforge.engine.video.face_motion import track_faces

    frames, truth = _clip()
    track = track_faces(frames, FPS, landmarker, "68", min_cutoff=1.5, beta=0.05)
    assert track.landmarks == "68" and len(track.frames) == 24 and (track.width, track.height) == SIZE
    assert track.missing == [5, 6, 23]
    assert [track.frames[i].source for i in (4, 5, 6, 7, 23)] == [
        "detected",
        "interpolated",
        "interpolated",
        "detected",
        "held",
    ]
    template = template_68()
    errors, roll_errors = [], []
    for frame, (green, blue, roll) in zip(track.frames, truth, strict=True):
        expected = planted_points(template, green, blue)
        assert frame.points.shape == (68, 2) and frame.points3d.shape == (68, 3)
        if frame.source == "held":
            continue
        errors.append(np.abs(frame.points - expected).max())
        roll_errors.append(abs(frame.pose.roll - roll))
        assert abs(frame.pose.yaw) < 1.0 and abs(frame.pose.pitch) < 1.0
    # within a pixel everywhere (smoothed, interpolated over two missing frames; the clip's ends, where the
    # two smoothing directions do not cancel, are the worst), a tenth of one in the median, a degree of roll
    assert max(errors) < 1.0 and float(np.median(errors)) < 0.3, errors
    assert max(roll_errors) < 1.0, roll_errors
    # held at the end: the last detected frame's points (up to the smoothing)
    assert np.abs(track.frames[23].points - track.frames[22].points).max() < 1.0
    table = track.table().splitlines()
    assert table[0] == "frame,source,yaw,pitch,roll,x1,y1,x2,y2" and len(table) == 25
    assert table[6].startswith("5,interpolated,")
    assert "no face in 3 (filled from neighbours): 5, 6, 23" in track.summary()


def test_106_and_5_point_landmarks_follow_the_face_without_smoothing(landmarker):
    from charforge.engine.video.face_motion import track_faces

    frames, truth = _clip(count=8, hidden=())
    track = track_faces(frames, FPS, landmarker, "106", min_cutoff=0.0)
    for frame, (green, blue, _) in zip(track.frames, truth, strict=True):
        assert np.abs(frame.points - planted_points(template_106(), green, blue)).max() < 0.2
    five = track_faces(frames, FPS, landmarker, "5", min_cutoff=0.0)
    assert five.landmarks == "5"
    for frame, raw in zip(five.frames, frames, strict=True):
        detected = landmarker.analyzer.detect(raw)[0]
        assert np.allclose(frame.points, detected.landmarks, atol=1e-3)
        assert np.allclose(frame.box, detected.box, atol=1e-3)
        assert frame.pose is not None  # solvePnP on the five points


def test_auto_prefers_3d_points_and_a_missing_model_is_named(landmarker, tmp_path, monkeypatch):
    from charforge.engine.faces import FaceAnalyzer
    from charforge.engine.video.face_motion import FaceLandmarker

    assert landmarker.available() == ["68", "106", "5"] and landmarker.pick("auto") == "68"
    models = tmp_path / "models"
    write_face_motion_pack(models / "insightface", "buffalo_l", landmarks=("106",))
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(models))
    FaceAnalyzer.clear_cache()
    only_2d = FaceLandmarker.load("buffalo_l", det_size=320)
    assert only_2d.available() == ["106", "5"]
    with pytest.raises(ValueError, match="no 68-point landmark model.*1k3d68.onnx"):
        only_2d.pick("68")


def test_a_video_without_any_face_is_refused(landmarker):
    from charforge.engine.video.face_motion import NoFaceInVideoError, track_faces

    frames = np.stack([motion_frame(SIZE, None, (100, 100), (140, 100))] * 3)
    with pytest.raises(NoFaceInVideoError, match="no face found in any of the 3 driving frames"):
        track_faces(frames, FPS, landmarker)


@needs_insightface
@pytest.mark.parametrize(
    "yaw, pitch, roll", [(0, 0, 0), (30, 0, 0), (-35, 10, 5), (10, -25, -12), (40, 20, 30), (-5, 30, -40)]
)
def test_head_pose_from_planted_3d_landmarks(yaw, pitch, roll):
    from charforge.engine.video.face_motion import mean_face_68, pose_from_3d, rotation

    face = mean_face_68()
    rng = np.random.default_rng(abs(yaw * 7 + pitch * 3 + roll))
    planted = 140.0 * face @ rotation(yaw, pitch, roll).T + np.array([200.0, 180.0, 40.0])
    planted += rng.normal(0.0, 0.5, planted.shape)  # half-pixel landmark noise
    pose = pose_from_3d(planted)
    assert abs(pose.yaw - yaw) < 1.0 and abs(pose.pitch - pitch) < 1.0 and abs(pose.roll - roll) < 1.0


@needs_insightface
def test_pose_conventions_match_the_picture():
    """Yaw > 0 moves the nose towards image right, pitch > 0 moves it up, roll > 0 turns the face clockwise."""
    from charforge.engine.video.face_motion import mean_face_68, rotation

    face = mean_face_68()
    nose, eyes = 30, [36, 45]

    def turned(yaw=0, pitch=0, roll=0):
        return face @ rotation(yaw, pitch, roll).T

    assert turned(yaw=20)[nose, 0] - turned(yaw=20)[eyes, 0].mean() > 0.05
    assert turned(pitch=20)[nose, 1] < turned()[nose, 1] - 0.05
    left, right = turned(roll=20)[36], turned(roll=20)[45]
    assert right[1] > left[1] + 0.1  # y down: the eye on image right drops, a clockwise turn


@needs_insightface
@pytest.mark.parametrize("yaw, pitch, roll", [(0, 0, 0), (25, 0, 0), (-20, 12, 8), (15, -15, -20)])
def test_head_pose_from_five_projected_points(yaw, pitch, roll):
    from charforge.engine.video.face_motion import five_point_template, pose_from_2d, rotation

    width, height, focal = 640, 480, 640.0
    model = five_point_template()
    turned = 120.0 * model @ rotation(yaw, pitch, roll).T
    # camera looks along -z of the face frame: depth grows as z falls; face 600 px from the camera
    depth = 600.0 - turned[:, 2]
    image = np.stack([focal * turned[:, 0] / depth + 330.0, focal * turned[:, 1] / depth + 230.0], axis=1)
    pose = pose_from_2d(image, width, height)
    assert abs(pose.yaw - yaw) < 2.0 and abs(pose.pitch - pitch) < 2.0 and abs(pose.roll - roll) < 2.0


def test_smoothing_removes_jitter_without_dragging_a_steady_motion():
    from charforge.engine.video.face_motion import one_euro, smooth_track

    steps = np.arange(48, dtype=np.float64)
    line = np.stack([100 + 3.0 * steps, 50 + 1.5 * steps], axis=1)
    error = np.abs(smooth_track(line, 24.0, 1.0, 0.05) - line)
    assert error[12:-12].max() < 0.05 and error.max() < 1.0  # the filters settle a few frames from the ends
    assert np.abs(one_euro(line, 24.0, 1.0, 0.05) - line)[10:].max() > 1.0  # one direction alone lags
    slow = np.stack([100 + 0.5 * steps, 50 + 0.25 * steps], axis=1)  # a face drifting 12 px/s
    noisy = slow + np.random.default_rng(0).normal(0.0, 2.0, slow.shape)
    before = np.sqrt(np.mean((noisy - slow) ** 2))
    after = np.sqrt(np.mean((smooth_track(noisy, 24.0, 1.0, 0.05) - slow) ** 2))
    assert after < 0.6 * before
    assert np.array_equal(smooth_track(noisy, 24.0, 0.0, 0.05), noisy)  # 0 = off


def test_gaps_are_interpolated_between_and_held_at_the_ends():
    from charforge.engine.video.face_motion import NoFaceInVideoError, fill_gaps

    values = np.array([[0.0], [0.0], [10.0], [0.0], [30.0], [0.0]])
    filled, sources = fill_gaps([False, False, True, False, True, False], values)
    assert filled.ravel().tolist() == [10.0, 10.0, 10.0, 20.0, 30.0, 30.0]
    assert sources == ["held", "held", "detected", "interpolated", "detected", "held"]
    with pytest.raises(NoFaceInVideoError):
        fill_gaps([False, False], values[:2])


def test_control_image_has_a_dot_at_every_point_and_nothing_else():
    from charforge.engine.video.face_motion import dot_radius, draw_face

    points = np.array([[20.2, 30.7], [100.0, 40.0], [60.4, 90.6], [127.0, 127.0], [-5.0, 10.0]])
    image = draw_face(points, 128, 128)
    assert image.shape == (128, 128, 3) and dot_radius(128, 128) == 1 and dot_radius(512, 512) == 3
    white = image[..., 0] == 255
    assert (image[..., 0] == image[..., 1]).all() and set(np.unique(image)) <= {0, 255}
    for x, y in points[:4]:
        assert white[int(round(y)), int(round(x))]
    ys, xs = np.nonzero(white)
    nearest = np.min(
        np.hypot(xs[:, None] - np.round(points[:4, 0]), ys[:, None] - np.round(points[:4, 1])), axis=1
    )
    assert nearest.max() <= 1.0  # every white pixel belongs to a dot; the point outside is not drawn
    big = draw_face(points[:3] * 4, 512, 512)
    assert big[..., 0].sum() / 255 > 3 * 20  # radius 3: at least ~20 px per dot


def test_lines_join_the_68_point_contours():
    from charforge.engine.video.face_motion import draw_face, mean_face_68

    points = mean_face_68()[:, :2] * 200 + 256
    dots = draw_face(points, 512, 512, "dots")
    lines = draw_face(points, 512, 512, "lines")
    jaw_middle = ((points[3] + points[4]) / 2).round().astype(int)
    x, y = jaw_middle
    assert (
        lines[y - 1 : y + 2, x - 1 : x + 2, 0].max() == 255
        and dots[y - 1 : y + 2, x - 1 : x + 2, 0].max() == 0
    )
    with pytest.raises(ValueError, match="style must be one of"):
        draw_face(points, 64, 64, "mesh")


def test_retarget_puts_the_median_face_box_on_the_character_face():
    from charforge.engine.video.face_motion import FaceFrame, FaceTrack, retarget

    frames = [
        FaceFrame(
            i, "detected", np.array([100.0 + i, 50.0, 200.0 + i, 170.0]), np.array([[150.0 + i, 110.0]])
        )
        for i in range(5)
    ]
    track = FaceTrack(frames, 640, 360, 10.0, "5")
    moved = retarget(track, 512, 512, face_box=(200, 100, 300, 160))
    assert np.allclose(moved.frames[2].box, [200, 100, 300, 160])
    assert np.allclose(moved.frames[2].points, [[250, 130]])
    assert np.allclose(moved.frames[4].points[0, 0] - moved.frames[0].points[0, 0], 4.0)  # motion kept
    covered = retarget(track, 512, 512)  # cover: scale 512 / 360, centred, cropped at the sides
    scale = 512 / 360
    assert np.allclose(covered.frames[0].points, [[150 * scale - (640 * scale - 512) / 2, 110 * scale]])
    with pytest.raises(ValueError, match="empty"):
        retarget(track, 512, 512, face_box=(10, 10, 5, 20))


def test_tracking_reports_progress_and_stops_on_cancel(landmarker):
    from charforge.engine.control import Cancelled, Control
    from charforge.engine.video.face_motion import track_faces

    frames, _ = _clip(count=6, hidden=())
    seen = []
    control = Control(
        on_progress=lambda done, total, text: seen.append((done, total)), should_stop=lambda: len(seen) > 3
    )
    with pytest.raises(Cancelled):
        track_faces(frames, FPS, landmarker, "5", control=control)
    assert seen == [(0, 6), (1, 6), (2, 6), (3, 6)]  # stopped after the third frame, not at the end
