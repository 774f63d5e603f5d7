"""Set-level scores: how far a set of generated images is from the reference photos, and how varied it is.

Per-image scores (identity, CLIP text agreement) cannot see two failures of a LoRA: painting the training photo
every time (high identity, no variety) and drifting away from what the photos look like as a whole. These
functions compare *sets* of image features (rows of an ``[N, D]`` array, usually CLIP image embeddings from
:meth:`~charforge.engine.score.clip.ClipScorer.embed_images`):

- :func:`cmmd`: CLIP-feature MMD (Jayasumana et al. 2024, "Rethinking FID"): the unbiased squared maximum mean
  discrepancy with a Gaussian kernel (sigma 10) on CLIP embeddings, times 1000. No normality assumption, unbiased
  at any size, so it stays meaningful at 20-100 images where FID is not;
- :func:`kid`: Kernel Inception Distance's estimator (Bińkowski et al. 2018: unbiased MMD with the cubic
  polynomial kernel ``(x.y / d + 1)^3``), here on whatever features it is given, with the spread over random
  half-size subsets;
- :func:`diversity`: mean pairwise cosine distance within a set (0 for identical images);
- :func:`nearest_reference`: mean over generated images of the cosine similarity to the closest reference
  photo (close to 1: copies of the training photos);
- :func:`frechet_distance`: FID's formula on any features; :func:`inception_features` gives FID's own
  features when the ``pytorch_fid`` package and its Inception weights are already in torch's hub cache
  (nothing is downloaded). FID is biased upwards at small sizes and needs far more images than dimensions to estimate
  the covariance (2048 for Inception): treat values from under a few thousand images as a rough ranking only.

Every function takes plain numpy arrays; unbiased estimates can be slightly negative for sets from the same
distribution (read them as 0). A set compared with itself gives exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CMMD_SIGMA = 10.0  # the Gaussian kernel's bandwidth CMMD uses on unit-length CLIP embeddings
CMMD_SCALE = 1000.0  # CMMD reports MMD^2 x 1000
INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # pytorch_fid's FID Inception weights file
SMALL_SET = 50  # below this many images per set the report warns that distances are noisy


def _features(x: Any, what: str) -> np.ndarray:
    array = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{what}: expected an [images, features] array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: the features hold NaN or Inf")
    return array


def _unbiased_mmd2(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m, n = kxx.shape[0], kyy.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 images in each set, got {m} and {n}")
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    if m == n:
        # Equal sizes: the paired U-statistic (Gretton et al. 2012, eq. 3) leaves the i == j cross pairs out
        # too, so a set against itself is exactly 0 instead of -2 x its mean within-set distance / n.
        return float(xx + yy - 2.0 * (kxy.sum() - np.trace(kxy)) / (m * (m - 1)))
    return float(xx + yy - 2.0 * kxy.mean())


def _rbf(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.exp(-np.maximum(squared, 0.0) / (2.0 * sigma * sigma))


def _poly(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def cmmd(generated: Any, reference: Any, sigma: float = CMMD_SIGMA) -> float:
    """CLIP-feature MMD x 1000 between two sets of embeddings (0: same distribution; larger: further apart)."""
    x, y = _features(generated, "generated"), _features(reference, "reference")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"the sets have different feature sizes ({x.shape[1]} and {y.shape[1]})")
    return CMMD_SCALE * _unbiased_mmd2(_rbf(x, x, sigma), _rbf(y, y, sigma), _rbf(x, y, sigma))


@dataclass(frozen=True)
class Kid:
    """A KID estimate: the full-set value and the spread over random half-size subsets."""

    value: float
    std: float
    subsets: int


def kid(generated: Any, reference: Any, subsets: int = 50, seed: int = 0) -> Kid:
    """Kernel (Inception) Distance between two feature sets: unbiased MMD^2, cubic polynomial kernel.

    ``value`` uses every image; ``std`` is the standard deviation over `subsets` draws of half of each set (how
    much the number would move with other images), 0 when a set has fewer than 4 images.
    """
    x, y = _features(generated, "generated"), _features(reference, "reference")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"the sets have different feature sizes ({x.shape[1]} and {y.shape[1]})")
    kxx, kyy, kxy = _poly(x, x), _poly(y, y), _poly(x, y)
    value = _unbiased_mmd2(kxx, kyy, kxy)
    m, n = len(x), len(y)
    if min(m, n) < 4 or subsets <= 0:
        return Kid(value, 0.0, 0)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(subsets):
        i = rng.choice(m, m // 2, replace=False)
        j = rng.choice(n, n // 2, replace=False)
        draws.append(_unbiased_mmd2(kxx[np.ix_(i, i)], kyy[np.ix_(j, j)], kxy[np.ix_(i, j)]))
    return Kid(value, float(np.std(draws)), subsets)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def diversity(features: Any) -> float:
    """Mean pairwise cosine distance (1 - cosine) between the images of one set: 0 when they are all the same.

    On CLIP embeddings, different poses, backgrounds and framings of one person typically land around 0.2-0.4;
    a LoRA that repeats its training photo whatever the prompt lands near 0.
    """
    x = _unit(_features(features, "features"))
    n = len(x)
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images, got {n}")
    cos = x @ x.T
    return float(max(0.0, 1.0 - (cos.sum() - np.trace(cos)) / (n * (n - 1))))


def nearest_reference(generated: Any, reference: Any) -> float:
    """Mean over the generated images of the cosine similarity to their closest reference image (copying)."""
    x, y = _unit(_features(generated, "generated")), _unit(_features(reference, "reference"))
    if not len(x) or not len(y):
        raise ValueError("nearest_reference needs at least one image in each set")
    return float((x @ y.T).max(axis=1).mean())


def frechet_distance(generated: Any, reference: Any) -> float:
    """FID's Fréchet distance between Gaussians fitted to two feature sets (biased upwards on small sets)."""
    x, y = _features(generated, "generated"), _features(reference, "reference")
    if min(len(x), len(y)) < 2:
        raise ValueError("the Fréchet distance needs at least 2 images in each set")
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    # tr(sqrt(s1 s2)) = tr(sqrt(A s2 A)) with A = sqrt(s1): symmetric, so eigh is exact and stable.
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    trace_root = float(np.sqrt(np.maximum(inner, 0.0)).sum())
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * trace_root)
    return max(0.0, value)


# ---- features -------------------------------------------------------------------------------------------


def clip_image_features(scorer: Any, images: Sequence[Any], batch_size: int = 16) -> np.ndarray:
    """Unit-length CLIP image embeddings ``[N, D]`` of RGB images (uint8 arrays or PIL images) of any sizes."""
    import torch

    rows = []
    for image in images:
        rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        pixels = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]
        rows.append(scorer.embed_images(pixels, batch_size=batch_size).cpu().numpy())
    if not rows:
        raise ValueError("no images to embed")
    return np.concatenate(rows).astype(np.float64)


def find_inception_weights() -> Path | None:
    """FID's Inception weights when already in torch's hub cache (where pytorch_fid looks for them), else None."""
    try:
        import torch
    except ImportError:
        return None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    return cached if cached.is_file() else None


def fid_available() -> str | None:
    """None when FID can be computed here, else why not (the package or the weights are missing)."""
    try:
        import pytorch_fid  # noqa: F401
    except ImportError:
        return "FID needs the pytorch-fid package (pip install pytorch-fid)"
    if find_inception_weights() is None:
        return (
            f"FID needs its Inception weights ({INCEPTION_WEIGHTS}) in torch's hub cache "
            f"(<torch hub dir>/checkpoints/); CharForge does not download them"
        )
    return None


def inception_features(images: Sequence[Any], device: str = "cpu") -> np.ndarray:
    """FID's 2048-d Inception pool features of RGB images (needs :func:`fid_available` to return None)."""
    missing = fid_available()
    if missing:
        raise RuntimeError(missing)
    import torch
    from pytorch_fid.inception import InceptionV3

    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(device)
    rows = []
    with torch.inference_mode():
        for image in images:
            rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
            x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(device)
            rows.append(model(x)[0].squeeze(-1).squeeze(-1).cpu().numpy())
    return np.concatenate(rows).astype(np.float64)
