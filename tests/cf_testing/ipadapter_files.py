"""IP-Adapter files for tests: the published key layout of the image projections (base, plus resampler) and
random weights in that layout for a U-Net of given cross-attention widths.

Imports nothing but torch, so a script running in ComfyUI's own Python can use it too (with tests/ on its path).
"""

from __future__ import annotations

from collections.abc import Sequence


def resampler_keys(dim, heads, queries, in_dim, out_dim, prefix="", latents=True) -> dict[str, tuple]:
    """Key -> shape of the plus adapters' resampler: `queries` latents of width `dim`, four layers of
    attention (64-wide heads) and feed-forward, input `in_dim` (CLIP hidden width), output `out_dim`."""
    keys = {f"{prefix}latents": (1, queries, dim)} if latents else {}
    keys |= {
        f"{prefix}proj_in.weight": (dim, in_dim),
        f"{prefix}proj_in.bias": (dim,),
        f"{prefix}proj_out.weight": (out_dim, dim),
        f"{prefix}proj_out.bias": (out_dim,),
        f"{prefix}norm_out.weight": (out_dim,),
        f"{prefix}norm_out.bias": (out_dim,),
    }
    for n in range(4):
        layer = f"{prefix}layers.{n}"
        for norm in ("norm1", "norm2"):
            keys[f"{layer}.0.{norm}.weight"] = keys[f"{layer}.0.{norm}.bias"] = (dim,)
        keys[f"{layer}.0.to_q.weight"] = (64 * heads, dim)
        keys[f"{layer}.0.to_kv.weight"] = (128 * heads, dim)
        keys[f"{layer}.0.to_out.weight"] = (dim, 64 * heads)
        keys[f"{layer}.1.0.weight"] = keys[f"{layer}.1.0.bias"] = (dim,)
        keys[f"{layer}.1.1.weight"] = (4 * dim, dim)
        keys[f"{layer}.1.3.weight"] = (dim, 4 * dim)
    return keys


def image_proj_keys(variant: str, cross: int, embed: int) -> dict[str, tuple]:
    """Key -> shape of a base (4 tokens from a CLIP image embedding of width `embed`) or plus (16 tokens
    from CLIP hidden states of width `embed`, a 64-wide resampler with 2 heads) image projection."""
    if variant == "base":
        return {
            "proj.weight": (4 * cross, embed),
            "proj.bias": (4 * cross,),
            "norm.weight": (cross,),
            "norm.bias": (cross,),
        }
    if variant == "plus":
        return resampler_keys(64, 2, 16, embed, cross)
    raise ValueError(f"no test layout for {variant!r}")


def random_ip_adapter(
    variant: str, widths: Sequence[int], cross: int, embed: int, seed: int, gain: float = 2.0
):
    """``{"image_proj": ..., "ip_adapter": ...}`` with random weights: `variant`'s projection and one
    ``to_k_ip`` / ``to_v_ip`` pair per cross-attention layer of width ``widths[n]`` (file numbering 2n+1).
    Matrices have entries of size 1/sqrt(fan-in) (`gain` times that for the key / value pairs), norm
    weights near 1, biases near 0."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def draw(key: str, shape: tuple) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator)
        if len(shape) >= 2:
            return noise / shape[-1] ** 0.5
        return 1.0 + 0.1 * noise if key.endswith("weight") else 0.05 * noise

    proj = {key: draw(key, shape) for key, shape in image_proj_keys(variant, cross, embed).items()}
    layers = {}
    for n, width in enumerate(widths):
        for name in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * n + 1}.{name}.weight"] = gain * draw(name, (width, cross))
    return {"image_proj": proj, "ip_adapter": layers}
