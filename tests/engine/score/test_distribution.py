"""Set-level scores (engine/score/distribution.py): CLIP-feature MMD, KID, diversity, copying, Fréchet distance."""

from __future__ import annotations

import numpy as np
import pytest

from charforge.engine.score import distribution as dist


def _set(rng, n, shift=0.0, dim=32, spread=1.0):
    x = rng.normal(size=(n, dim)) * spread
    x[:, 0] += shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_set_against_itself_is_near_zero_and_a_different_set_is_clearly_not():
    rng = np.random.default_rng(0)
    a, b = _set(rng, 40), _set(rng, 40, shift=3.0)
    same, other = dist.cmmd(a, a), dist.cmmd(a, b)
    assert other > 50 * abs(same) and other > 1.0
    # two draws from one distribution: near 0 as well (unbiased: may dip below 0)
    assert abs(dist.cmmd(a, _set(rng, 40))) < other / 10
    k_same, k_other = dist.kid(a, a), dist.kid(a, b)
    assert k_other.value > 50 * abs(k_same.value) and k_other.value > 0
    assert k_other.subsets == 50 and k_other.std > 0
    assert dist.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert dist.frechet_distance(a, b) > 0.5


def test_distances_grow_with_the_shift():
    rng = np.random.default_rng(1)
    ref = _set(rng, 30)
    values = [dist.cmmd(_set(rng, 30, shift=s), ref) for s in (0.0, 1.0, 3.0)]
    assert values[0] < values[1] < values[2]


def test_diversity_of_identical_images_is_minimal():
    rng = np.random.default_rng(2)
    one = _set(rng, 1)
    assert dist.diversity(np.repeat(one, 12, axis=0)) == pytest.approx(0.0, abs=1e-9)
    spread = dist.diversity(_set(rng, 12))
    narrow = dist.diversity(_set(rng, 12, shift=8.0))
    assert spread > narrow > 0.0 and spread > 0.5


def test_nearest_reference_finds_copies():
    rng = np.random.default_rng(3)
    refs = _set(rng, 5)
    assert dist.nearest_reference(refs[[0, 0, 2, 4]], refs) == pytest.approx(1.0)
    assert dist.nearest_reference(_set(rng, 6), refs) < 0.9


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least 2 images"):
        dist.cmmd(np.ones((1, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="different feature sizes"):
        dist.kid(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        dist.diversity(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match=r"\[images, features\]"):
        dist.diversity(np.ones(4))


def test_fid_says_what_is_missing(monkeypatch, tmp_path):
    pytest.importorskip("torch")
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reason = dist.fid_available()
    assert reason is not None and ("pytorch-fid" in reason or dist.INCEPTION_WEIGHTS in reason)
    assert dist.find_inception_weights() is None


def test_clip_features_of_images(tmp_path):
    pytest.importorskip("transformers")
    from cf_testing.face_models import write_clip_folder
    from charforge.engine.score.clip import ClipScorer

    scorer = ClipScorer.load(str(write_clip_folder(tmp_path / "clip")), device="cpu")
    rng = np.random.default_rng(4)
    same = [np.full((40, 48, 3), 120, np.uint8)] * 4
    varied = [(rng.random((40, 48, 3)) * 255).astype(np.uint8) for _ in range(4)]
    f_same, f_varied = dist.clip_image_features(scorer, same), dist.clip_image_features(scorer, varied)
    assert f_same.shape[0] == 4 and np.allclose(np.linalg.norm(f_same, axis=1), 1.0, atol=1e-4)
    assert dist.diversity(f_same) < 1e-5 < dist.diversity(f_varied)
