"""ControlNet preprocessor nodes: IMAGE batches in, maps of the same size out (pose from DWPose files in the
dwpose model folder, depth from a Depth Anything folder, Canny equal to OpenCV's); missing models are refused
with the folder and file names."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cf_testing.comfyui import run_node
from cf_testing.pose_models import write_pose_models
from charforge.engine.guide import pose
from charforge.nodes import guide_maps
from charforge.nodes.guide_maps import CannyMap, DepthMap, LineArtMap, PoseMap


@pytest.fixture
def comfy(comfy_env):
    from charforge import bridge

    bridge.register_model_folders()
    guide_maps._cache.clear()
    yield comfy_env
    guide_maps._cache.clear()


def _batch(count=2, height=48, width=64):
    rng = np.random.default_rng(3)
    frames = np.zeros((count, height, width, 3), np.uint8)
    frames[:, 10:38, 16:48] = rng.integers(100, 255, (count, 1, 1, 3))
    return torch.from_numpy(frames.astype(np.float32) / 255.0)


def test_canny_and_line_art_nodes_map_each_frame(comfy):
    images = _batch()
    (edges,) = run_node(CannyMap, images=images, low_threshold=50, high_threshold=150).result
    assert tuple(edges.shape) == (2, 48, 64, 3)
    for i in range(2):
        frame = (images[i].numpy() * 255 + 0.5).astype(np.uint8)
        expected = cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), 50, 150)
        np.testing.assert_array_equal((edges[i, ..., 0].numpy() * 255).round().astype(np.uint8), expected)
    (art,) = run_node(LineArtMap, images=images, blur=4.0, strength=8.0).result
    assert (
        tuple(art.shape) == (2, 48, 64, 3) and float(art.max()) == 1.0 and float(art[:, 24, 32].max()) == 0.0
    )  # box interior flat


def test_pose_node_reads_the_dwpose_folder_and_draws_the_planted_person(comfy):
    folder = comfy.base_dir / "models" / "dwpose"
    # The 64 x 48 frame letterboxes at ratio 10; one person box, the nose planted at the crop centre.
    write_pose_models(folder, (200.0, 50.0, 440.0, 430.0), {0: (288, 384, 0.9)})
    (maps,) = run_node(PoseMap, images=_batch(), body=True, hands=True, face=True).result
    assert tuple(maps.shape) == (2, 48, 64, 3)
    # Box (20, 5)-(44, 43): centre (32, 24) is the nose, drawn in the first body colour.
    expected = torch.tensor(pose.BODY_COLOURS[0], dtype=torch.float32) / 255
    torch.testing.assert_close(maps[0, 24, 32], expected)
    assert float(maps[0, :, :20].max()) == 0.0


def test_missing_models_are_named(comfy):
    with pytest.raises(FileNotFoundError) as err:
        run_node(PoseMap, images=_batch(1), body=True, hands=True, face=True)
    message = str(err.value)
    assert pose.DETECTOR_FILE in message and pose.POSE_FILE in message and "dwpose" in message
    choices = DepthMap.INPUT_TYPES()["required"]["model"][0]
    assert choices == [guide_maps.NO_DEPTH_MODEL]
    with pytest.raises(FileNotFoundError, match="depth_anything"):
        run_node(DepthMap, images=_batch(1), model=guide_maps.NO_DEPTH_MODEL, resolution=518)
