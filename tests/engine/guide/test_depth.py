"""Depth maps: a tiny Depth Anything (real classes, tiny DINOv2 backbone) saved to a folder gives the map of
the transformers model called directly, resized to the photo, near = white; missing files are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from charforge.engine.guide import depth


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    model = DepthAnythingForDepthEstimation(config).eval()
    folder = tmp_path_factory.mktemp("depth_anything_tiny")
    model.save_pretrained(folder)
    return folder, model


def _photo(height=60, width=80):
    rng = np.random.default_rng(0)
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (200, 120, 40)
    image[height // 3 :, width // 2 :] = (30, 90, 220)
    return (image.astype(np.int16) + rng.integers(-20, 20, image.shape)).clip(0, 255).astype(np.uint8)


def test_map_matches_the_transformers_model_called_directly(model_folder):
    folder, reference = model_folder
    estimator = depth.DepthEstimator(folder, size=56)
    photo = _photo()
    values = depth.pixel_values(photo, size=56)
    assert tuple(values.shape) == (1, 3, 56, 70)  # shorter side 56, both multiples of 14, aspect kept
    with torch.inference_mode():
        expected = reference(pixel_values=values).predicted_depth
    torch.testing.assert_close(estimator.predict(photo), expected, rtol=1e-5, atol=1e-5)

    result = estimator.depth_map(photo)
    assert result.shape == (60, 80, 3) and result.dtype == np.uint8
    assert (result[..., 0] == result[..., 1]).all() and (result[..., 0] == result[..., 2]).all()
    full = torch.nn.functional.interpolate(expected[:, None], size=(60, 80), mode="bicubic")[0, 0].numpy()
    # Nearest (largest predicted value) is white, farthest black, linear in between.
    assert result[np.unravel_index(full.argmax(), full.shape)][0] == 255
    assert result[np.unravel_index(full.argmin(), full.shape)][0] == 0
    linear = (full - full.min()) / (full.max() - full.min()) * 255
    assert np.abs(result[..., 0].astype(float) - linear).max() <= 0.5 + 1e-3


def test_flat_prediction_gives_a_black_map():
    flat = torch.full((1, 14, 14), 3.0)
    assert depth.to_depth_map(flat, 20, 30).max() == 0


def test_missing_model_is_named(tmp_path):
    with pytest.raises(depth.DepthModelNotFoundError) as err:
        depth.DepthEstimator(tmp_path / "depth_anything_v2_small")
    message = str(err.value)
    assert (
        "depth_anything_v2_small" in message and "config.json" in message and "model.safetensors" in message
    )
