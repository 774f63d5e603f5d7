"""Which device a model runs on when the user leaves it to us."""

from __future__ import annotations


def best_device() -> str:
    """``cuda`` when there is an NVIDIA GPU, else ``mps`` (Apple silicon), else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
