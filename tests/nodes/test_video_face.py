"""Face Motion from Video as ComfyUI runs it: a driving clip of a planted face -> control frames, pose table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cf_testing.comfyui import run_node
from cf_testing.face_motion_models import motion_frame, planted_points, template_68, write_face_motion_pack
from cf_testing.fixtures import needs_insightface
from charforge.engine.video import face_motion, write_video
from charforge.nodes import video_face
from charforge.nodes.score import LoadFaceModels
from charforge.nodes.video_face import FaceMotion

SIZE = (320, 320)


def test_node_constants_match_the_engine():
    assert video_face.LANDMARKS == face_motion.LANDMARK_CHOICES
    assert video_face.STYLES == face_motion.STYLES


@pytest.fixture
def comfy(comfy_env):
    from charforge import bridge

    bridge.register_model_folders()
    write_face_motion_pack(comfy_env.base_dir / "models" / "insightface", "buffalo_l")
    yield comfy_env
    from charforge.engine.faces import FaceAnalyzer

    FaceAnalyzer.clear_cache()
    face_motion.FaceLandmarker._cache.clear()


def _clip(count=8, hidden=(3,)):
    frames, truth = [], []
    for i in range(count):
        green = (136.0 + 2.0 * i, 166.0)  # the dots stay inside the landmark crop (box centre +- 60 px)
        roll = 3.0 * i
        blue = (green[0] + 36 * math.cos(math.radians(roll)), green[1] + 36 * math.sin(math.radians(roll)))
        frames.append(motion_frame(SIZE, None if i in hidden else (144, 144), green, blue))
        truth.append((green, blue, roll))
    return np.stack(frames), truth


@needs_insightface
def test_face_motion_from_connected_frames_draws_the_points_on_the_output(comfy):
    (face_models,) = run_node(LoadFaceModels, pack="buffalo_l", det_size=320, provider="CPU").result
    frames, truth = _clip()
    run = run_node(
        FaceMotion,
        node_id="4",
        face_models=face_models,
        video=video_face.NO_VIDEO,
        width=640,
        height=640,
        max_frames=0,
        frame_step=1,
        landmarks="auto",
        style="dots",
        smoothing_hz=0.0,
        smoothing_beta=0.0,
        frames=torch.from_numpy(frames.astype(np.float32) / 255.0),
        frames_fps=12.0,
    )
    control, driving, fps, count, table, info = run.result
    assert (
        control.shape == (8, 640, 640, 3) and driving.shape == (8, 640, 640, 3) and count == 8 and fps == 12.0
    )
    assert "68-point landmarks" in info and "no face in 1 (filled from neighbours): 3" in info
    rows = table.splitlines()
    assert rows[4].startswith("3,interpolated,") and rows[1].startswith("0,detected,")
    template = template_68()
    for i, (green, blue, roll) in enumerate(truth):
        points = planted_points(template, green, blue) * 2.0  # 320 -> 640
        image = control[i].numpy()
        missed = [(x, y) for x, y in points if image[int(round(y)), int(round(x)), 0] != 1.0]
        assert not missed, (i, missed)
        assert image.mean() < 0.2  # dots on black
        assert abs(float(rows[i + 1].split(",")[4]) - roll) < 1.0
    assert abs(driving[0, 300, 300, 0].item() - 1.0) < 1e-6  # the red cell, scaled 2x
    assert len(comfy.progress) >= 8 and comfy.progress[-1].value == comfy.progress[-1].total


@needs_insightface
def test_face_motion_reads_a_driving_video_and_retargets_onto_the_character(comfy):
    (face_models,) = run_node(LoadFaceModels, pack="buffalo_l", det_size=320, provider="CPU").result
    frames, truth = _clip(hidden=())
    (comfy.base_dir / "input").mkdir(parents=True, exist_ok=True)
    write_video(frames, comfy.base_dir / "input" / "talking.mp4", fps=10.0, quality=100)
    assert FaceMotion.INPUT_TYPES()["required"]["video"][0] == ["talking.mp4"]
    character = motion_frame(SIZE, (96, 112), (0, 0), (0, 0))  # a face box centred on (96, 112), 80 px
    control, driving, fps, count, table, info = run_node(
        FaceMotion,
        face_models=face_models,
        video="talking.mp4",
        width=320,
        height=320,
        max_frames=6,
        frame_step=2,
        landmarks="68",
        style="lines",
        smoothing_hz=1.5,
        smoothing_beta=0.05,
        character_image=torch.from_numpy(character[None].astype(np.float32) / 255.0),
    ).result
    assert (
        count == 4
        and fps == pytest.approx(5.0)
        and "talking.mp4" in info
        and "on the character's face" in info
    )
    # the driving box (centred on (144, 144), 80 px) lands on the character's: points shift by (-48, -32)
    template = template_68()
    for k, i in enumerate(range(0, 8, 2)):
        green, blue, _ = truth[i]
        points = planted_points(template, green, blue) - np.array([48.0, 32.0])
        white = control[k].numpy()[..., 0] > 0.5
        ys, xs = np.nonzero(white)
        nearest = [np.min(np.hypot(xs - x, ys - y)) for x, y in points]
        assert max(nearest) < 2.5  # H.264 blurs the dots' colour a little
    assert driving.shape == (4, 320, 320, 3)


def test_a_missing_video_says_where_to_put_it(comfy_env):
    assert FaceMotion.INPUT_TYPES()["required"]["video"][0] == [video_face.NO_VIDEO]
    with pytest.raises(FileNotFoundError, match="input folder"):
        video_face.resolve_video(video_face.NO_VIDEO)
    with pytest.raises(ValueError, match="outside the input folder"):
        video_face.resolve_video("../secret.mp4")
