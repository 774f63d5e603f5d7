"""A masked IP-Adapter acts only in its region of every layer (the attn2 replacement, ComfyUI's convention).

Two characters' FaceID adapters, each with an image mask over its half of the picture (A left, B right),
go through `IPAttn2Patch` at the token grids an SD1.5 U-Net has for a 512 x 768 picture (and an odd grid):
every query position whose layer cell lies in the other half comes out exactly as plain cross-attention
(A's adapter alone) or exactly as the other adapter alone (both adapters), and the adapter changes its own
half. `mask_for_layer` resizes the image mask bilinearly, so on a grid whose width is odd the middle column
straddles the border and gets a partial weight: positions one cell or more from the border are compared.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from charforge.engine.guide import ipadapter as ipa
from charforge.engine.guide.attn2_patch import AdapterInput, IPAttn2Patch

WIDTH, HEADS, CROSS = 64, 2, 768
PICTURE = (64, 96)  # the mask's size (the picture in pixels, scaled down: only its proportions matter)
# (height, width) of the layer token grids: SD1.5 at 512 x 768 has 64 x 96 latents, then /2, /4, /8;
# 5 x 7 is an odd grid (a picture size the levels do not divide evenly).
GRIDS = [(64, 96), (32, 48), (16, 24), (8, 12), (5, 7)]


def _adapter(seed: int) -> ipa.IPAdapter:
    torch.manual_seed(seed)
    projection = ipa.FaceIdTokens(512, 16, CROSS, tokens=2)
    state = {f"image_proj.{k}": v.detach().clone() for k, v in projection.state_dict().items()}
    for n in range(ipa.LAYER_COUNTS["sd15"]):
        for key in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * n + 1}.{key}.weight"] = torch.randn(WIDTH, CROSS) * 0.05
    return ipa.build_ip_adapter(ipa.split_groups(state), name="ip-adapter-faceid_sd15.safetensors")


def _input(adapter: ipa.IPAdapter, seed: int, mask: torch.Tensor | None) -> AdapterInput:
    face = F.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)
    with torch.no_grad():
        cond, uncond = adapter.projection(face), adapter.projection(torch.zeros_like(face))
    return AdapterInput(adapter, cond, uncond, weight=1.0, mask=mask)


def _half(left: bool) -> torch.Tensor:
    mask = torch.zeros(1, *PICTURE)
    if left:
        mask[..., : PICTURE[1] // 2] = 1.0
    else:
        mask[..., PICTURE[1] // 2 :] = 1.0
    return mask


def _reference_attention(q, k, v):
    """Plain multi-head softmax attention, written out (the unpatched layer)."""
    b, n, width = q.shape
    d = width // HEADS
    q, k, v = (t.reshape(b, -1, HEADS, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, width)


def _run(inputs, layer, grid, q, k, v):
    options = {
        "n_heads": HEADS,
        "cond_or_uncond": [1, 0],  # negative and positive prompt in one batch, as ComfyUI batches them
        "sigmas": torch.tensor([5.0, 5.0]),
        "activations_shape": [q.shape[0], WIDTH, *grid],
    }
    with torch.no_grad():
        return IPAttn2Patch(inputs, layer)(q, k, v, options)


def _columns(grid):
    """Boolean [width] masks of the layer columns at least one cell left / right of the picture's middle."""
    width = grid[1]
    centres = (torch.arange(width) + 0.5) / width
    return centres <= 0.5 - 1 / width, centres >= 0.5 + 1 / width


@pytest.mark.parametrize("grid", GRIDS, ids=[f"{h}x{w}" for h, w in GRIDS])
def test_each_masked_adapter_leaves_the_other_half_of_every_layer_alone(grid):
    a, b = _adapter(1), _adapter(2)
    layer = 0 if grid[1] >= 48 else 15  # an outer and the middle layer's weights (same widths here)
    g = torch.Generator().manual_seed(grid[0])
    tokens = grid[0] * grid[1]
    q = torch.randn(2, tokens, WIDTH, generator=g)
    k, v = torch.randn(2, 77, WIDTH, generator=g), torch.randn(2, 77, WIDTH, generator=g)

    plain = _run([], layer, grid, q, k, v)
    assert torch.allclose(plain, _reference_attention(q, k, v), atol=1e-5)
    only_a = _run([_input(a, 10, _half(left=True))], layer, grid, q, k, v)
    a_everywhere = _run([_input(a, 10, None)], layer, grid, q, k, v)
    b_everywhere = _run([_input(b, 20, None)], layer, grid, q, k, v)
    both = _run([_input(a, 10, _half(left=True)), _input(b, 20, _half(left=False))], layer, grid, q, k, v)

    def half(t, columns):
        return t.reshape(2, *grid, WIDTH)[:, :, columns]

    left, right = _columns(grid)
    # A's adapter, masked to the left half: the right half of the layer is exactly the unpatched layer,
    # the left half exactly the unmasked adapter, which differs from the plain layer.
    assert torch.equal(half(only_a, right), half(plain, right))
    assert torch.allclose(half(only_a, left), half(a_everywhere, left), atol=1e-6)
    assert (half(only_a, left) - half(plain, left)).abs().max() > 1e-3
    # Both characters: each half is its own adapter alone (the other adapter's term is zero there).
    assert torch.allclose(half(both, left), half(a_everywhere, left), atol=1e-6)
    assert torch.allclose(half(both, right), half(b_everywhere, right), atol=1e-6)
    assert (half(a_everywhere, right) - half(b_everywhere, right)).abs().max() > 1e-3
    if grid[1] % 2 == 0:  # an even grid has no straddling column: the halves split exactly
        cells = ipa.mask_for_layer(_half(left=True), *grid).reshape(*grid)
        assert torch.equal(cells[:, : grid[1] // 2], torch.ones(grid[0], grid[1] // 2))
        assert torch.equal(cells[:, grid[1] // 2 :], torch.zeros(grid[0], grid[1] // 2))


def test_the_grid_comes_from_the_latent_when_the_layer_shape_is_missing():
    """Without ``activations_shape`` the grid is the latent's, scaled to the layer's token count."""
    a = _adapter(1)
    grid = (16, 24)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, grid[0] * grid[1], WIDTH, generator=g)
    k, v = torch.randn(2, 77, WIDTH, generator=g), torch.randn(2, 77, WIDTH, generator=g)
    options = {
        "n_heads": HEADS,
        "cond_or_uncond": [1, 0],
        "sigmas": torch.tensor([5.0, 5.0]),
        "original_shape": [2, 4, 64, 96],
    }
    with torch.no_grad():
        masked = IPAttn2Patch([_input(a, 10, _half(left=True))], 3)(q, k, v, options)
    plain = _run([], 3, grid, q, k, v)
    assert torch.equal(masked.reshape(2, *grid, WIDTH)[:, :, 12:], plain.reshape(2, *grid, WIDTH)[:, :, 12:])
    assert (masked - plain).abs().max() > 1e-3
