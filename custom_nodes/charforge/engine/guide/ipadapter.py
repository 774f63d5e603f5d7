"""IP-Adapter files and the extra cross-attention term they add, in plain torch.

A published IP-Adapter file holds two groups of tensors:

- ``image_proj``: a small network that turns an image (or face) embedding into a few extra
  "image tokens" of the U-Net's cross-attention width;
- ``ip_adapter``: for every cross-attention layer of the U-Net, ``{i}.to_k_ip.weight`` and
  ``{i}.to_v_ip.weight`` (no bias), where ``i`` counts every attention layer of the U-Net (self- and
  cross-attention alternately, down blocks, then up blocks, then the middle block), so the
  cross-attention layers carry the odd numbers 1, 3, 5, ... FaceID files also hold rank-128 LoRA
  weights for every attention layer (``{i}.to_q_lora.down.weight`` ...).

``.bin`` files are a pickled ``{"image_proj": {...}, "ip_adapter": {...}}`` (read with
``weights_only=True``); ``.safetensors`` files hold the same keys flat with the prefixes
``image_proj.`` and ``ip_adapter.`` (``adapter_modules.`` is accepted for the second).

`load_ip_adapter` reads a file, `detect_variant` names the layout from its keys, `build_ip_adapter`
makes the modules (parameter names as published, loaded strictly: a missing or unused tensor is an
error), and `cross_attention` computes ``attn(q, k, v) + Σ weight · mask · attn(q, k_ip, v_ip)`` for one
cross-attention layer, with any number of adapters. Applying it inside a sampler (which layer gets
which weights, when the gate is open) is the caller's part.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IPAdapter",
    "IPAdapterLayoutError",
    "IPTerm",
    "LAYER_COUNTS",
    "LayerLoRA",
    "PerceiverResampler",
    "build_ip_adapter",
    "cross_attention",
    "detect_variant",
    "gate",
    "load_ip_adapter",
    "mask_for_layer",
    "read_ip_adapter_file",
    "split_groups",
]

# Cross-attention layers (IP weight pairs) of the full-size U-Nets, keyed by family.
LAYER_COUNTS = {"sd15": 16, "sdxl": 70}
_FAMILY_BY_CROSS_WIDTH = {768: "sd15", 2048: "sdxl"}
VARIANTS = ("base", "plus", "plus_face", "full_face", "faceid", "faceid_plus", "instantid")


class IPAdapterLayoutError(ValueError):
    """The file's tensors are not a known IP-Adapter layout; the message names the keys."""


# --- reading ------------------------------------------------------------------------------------------


def read_ip_adapter_file(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Read a ``.safetensors`` or ``.bin`` IP-Adapter file into ``{"image_proj": ..., "ip_adapter": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"IP-Adapter file not found: {path} (put IP-Adapter files in models/ipadapter)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat: dict[str, torch.Tensor] = load_file(str(path))
        return split_groups(flat, source=path.name)
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise IPAdapterLayoutError(
            f"{path.name}: expected a dict of tensor groups, found {type(loaded).__name__}"
        )
    if "image_proj" in loaded and isinstance(loaded["image_proj"], Mapping):
        groups = {"image_proj": dict(loaded["image_proj"])}
        second = loaded.get("ip_adapter", loaded.get("adapter_modules"))
        if not isinstance(second, Mapping):
            raise IPAdapterLayoutError(
                f"{path.name}: has image_proj but no ip_adapter group; keys: {sorted(loaded)}"
            )
        groups["ip_adapter"] = dict(second)
        return groups
    return split_groups(dict(loaded), source=path.name)


def split_groups(
    flat: Mapping[str, torch.Tensor], source: str = "state dict"
) -> dict[str, dict[str, torch.Tensor]]:
    """Split flat ``image_proj.*`` / ``ip_adapter.*`` (or ``adapter_modules.*``) keys into the two groups."""
    groups: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    stray = []
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head == "image_proj":
            groups["image_proj"][rest] = value
        elif head in ("ip_adapter", "adapter_modules"):
            groups["ip_adapter"][rest] = value
        else:
            stray.append(key)
    if stray or not groups["image_proj"] or not groups["ip_adapter"]:
        raise IPAdapterLayoutError(
            f"{source}: not an IP-Adapter file (expected keys under image_proj. and ip_adapter.); "
            f"unexpected keys: {_show(stray or list(flat))}"
        )
    return groups


def _show(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --- variant detection --------------------------------------------------------------------------------

_LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_LORA_KEY = re.compile(r"^(\d+)\.(to_q_lora|to_k_lora|to_v_lora|to_out_lora)\.(down|up)\.weight$")


def detect_variant(groups: Mapping[str, Mapping[str, torch.Tensor]], name: str = "") -> str:
    """The layout's variant (one of ``VARIANTS``) from its keys; ``name`` (the file name) separates the
    variants that share a layout: ``plus`` vs ``plus_face`` ("face" in the name)."""
    proj = groups["image_proj"]
    keys = set(proj)
    if keys == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        return "base"
    if keys == {f"proj.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")}:
        return "full_face"
    if "perceiver_resampler.proj_in.weight" in keys:
        return "faceid_plus"
    if keys == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"}:
        return "faceid"
    if "latents" in keys and "proj_in.weight" in keys:
        if proj["proj_in.weight"].shape[1] == 512:  # a face-recognition embedding, not CLIP hidden states
            return "instantid"
        return "plus_face" if "face" in name.lower() else "plus"
    raise IPAdapterLayoutError(f"{name or 'file'}: unknown image_proj layout; its keys: {_show(list(keys))}")


# --- image projections (parameter names as published) -------------------------------------------------


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.GELU(), nn.Linear(hidden, out))


class LinearTokens(nn.Module):
    """Base IP-Adapter: one CLIP image embedding -> ``tokens`` tokens (keys ``proj``, ``norm``)."""

    def __init__(self, embed_dim: int, cross_dim: int, tokens: int = 4) -> None:
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = nn.Linear(embed_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:  # [B, embed] -> [B, tokens, cross]
        return self.norm(self.proj(embeds).reshape(-1, self.tokens, self.cross_dim))


class MLPTokens(nn.Module):
    """Full-face IP-Adapter: every CLIP hidden state -> one token (keys ``proj.0``, ``proj.2``, ``proj.3``)."""

    def __init__(self, hidden_dim: int, cross_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, cross_dim),
            nn.LayerNorm(cross_dim),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, N, hidden] -> [B, N, cross]
        return self.proj(hidden)


class FaceIdTokens(nn.Module):
    """FaceID: a face-recognition embedding (512) -> ``tokens`` tokens (keys ``proj.0``, ``proj.2``, ``norm``)."""

    def __init__(self, id_dim: int, inner_dim: int, cross_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = _mlp(id_dim, inner_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, face: torch.Tensor) -> torch.Tensor:  # [B, 512] -> [B, tokens, cross]
        return self.norm(self.proj(face).reshape(-1, self.tokens, self.cross_dim))


class PerceiverAttention(nn.Module):
    """Latents attend to (inputs ++ latents); keys ``norm1``, ``norm2``, ``to_q``, ``to_kv``, ``to_out``."""

    def __init__(self, dim: int, heads: int, dim_head: int = 64) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, inputs: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        inputs, latents = self.norm1(inputs), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([inputs, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(_attend(q, k, v, self.heads))


class PerceiverResampler(nn.Module):
    """Plus / plus-face / InstantID / FaceID-Plus projection: learned (or given) latents refined by
    ``depth`` perceiver blocks over the projected inputs. Keys ``latents`` (absent for FaceID-Plus),
    ``proj_in``, ``proj_out``, ``norm_out``, ``layers.{n}.0.*`` (attention), ``layers.{n}.1.{0,1,3}``
    (LayerNorm, Linear, GELU, Linear)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        queries: int | None,
        in_dim: int,
        out_dim: int,
        depth: int = 4,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        if queries is not None:
            self.latents = nn.Parameter(torch.randn(1, queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(in_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim, heads),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, ff_mult * dim, bias=False),
                        nn.GELU(),
                        nn.Linear(ff_mult * dim, dim, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, inputs: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        if latents is None:
            latents = self.latents.expand(inputs.shape[0], -1, -1)
        inputs = self.proj_in(inputs)
        for block in self.layers:
            attention, feed_forward = cast(nn.ModuleList, block)
            latents = attention(inputs, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FaceIdPlusTokens(nn.Module):
    """FaceID-Plus(-v2): face embedding -> 4 tokens, refined by a resampler over CLIP hidden states of the
    face crop; v2 adds the face tokens back: ``x + shortcut_scale · resampler(x)``."""

    def __init__(
        self, id_dim: int, inner_dim: int, cross_dim: int, tokens: int, clip_dim: int, heads: int
    ) -> None:
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = _mlp(id_dim, inner_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)
        self.perceiver_resampler = PerceiverResampler(cross_dim, heads, None, clip_dim, cross_dim)

    def forward(
        self,
        face: torch.Tensor,
        clip_hidden: torch.Tensor,
        shortcut: bool = True,
        shortcut_scale: float = 1.0,
    ) -> torch.Tensor:
        x = self.norm(self.proj(face).reshape(-1, self.tokens, self.cross_dim))
        out = self.perceiver_resampler(clip_hidden, latents=x)
        return x + shortcut_scale * out if shortcut else out


def _build_projection(variant: str, proj: Mapping[str, torch.Tensor]) -> nn.Module:
    def shape(key: str) -> tuple[int, ...]:
        return tuple(proj[key].shape)

    if variant == "base":
        cross = shape("norm.weight")[0]
        return LinearTokens(shape("proj.weight")[1], cross, shape("proj.weight")[0] // cross)
    if variant == "full_face":
        return MLPTokens(shape("proj.0.weight")[1], shape("proj.3.weight")[0])
    if variant == "faceid":
        cross = shape("norm.weight")[0]
        inner, id_dim = shape("proj.0.weight")
        return FaceIdTokens(id_dim, inner, cross, shape("proj.2.weight")[0] // cross)
    if variant == "faceid_plus":
        cross = shape("norm.weight")[0]
        inner, id_dim = shape("proj.0.weight")
        dim, clip_dim = shape("perceiver_resampler.proj_in.weight")
        heads = shape("perceiver_resampler.layers.0.0.to_q.weight")[0] // 64
        return FaceIdPlusTokens(id_dim, inner, cross, shape("proj.2.weight")[0] // cross, clip_dim, heads)
    # plus, plus_face, instantid: a resampler with its own latents
    _, queries, dim = shape("latents")
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    return PerceiverResampler(
        dim,
        shape("layers.0.0.to_q.weight")[0] // 64,
        queries,
        shape("proj_in.weight")[1],
        shape("proj_out.weight")[0],
        depth=depth,
        ff_mult=shape("layers.0.1.1.weight")[0] // dim,
    )


# --- per-layer weights --------------------------------------------------------------------------------


class IPLayer(nn.Module):
    """One cross-attention layer's image key / value projections (cross width -> layer width, no bias)."""

    def __init__(self, cross_dim: int, width: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, width, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, width, bias=False)


class LoRAPair(nn.Module):
    def __init__(self, inp: int, out: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(inp, rank, bias=False)
        self.up = nn.Linear(rank, out, bias=False)

    def delta(self) -> torch.Tensor:
        """The weight change ``up @ down`` ([out, in])."""
        return self.up.weight @ self.down.weight


class LayerLoRA(nn.Module):
    """FaceID's LoRA for one attention layer (any of ``to_q_lora``, ``to_k_lora``, ``to_v_lora``, ``to_out_lora``)."""

    def __init__(self, shapes: Mapping[str, tuple[int, int, int]]) -> None:
        super().__init__()
        for name, (inp, out, rank) in shapes.items():
            self.add_module(name, LoRAPair(inp, out, rank))


@dataclass
class IPAdapter:
    """A loaded IP-Adapter: ``projection`` makes the image tokens; ``layers[n]`` holds the n-th
    cross-attention layer's ``to_k_ip`` / ``to_v_ip`` (file index ``layer_ids[n]`` = 1, 3, 5, ...)."""

    variant: str
    family: str | None  # "sd15" / "sdxl" from the cross-attention width; None for other widths
    cross_dim: int
    projection: nn.Module
    layers: nn.ModuleList
    layer_ids: list[int]
    lora: dict[int, LayerLoRA] = field(default_factory=dict)  # FaceID: attention-layer index -> its LoRA

    @property
    def tokens_per_image(self) -> int | None:
        proj = self.projection
        if isinstance(proj, (LinearTokens, FaceIdTokens, FaceIdPlusTokens)):
            return proj.tokens
        if isinstance(proj, PerceiverResampler):
            return proj.latents.shape[1]
        return None  # full-face: one token per CLIP hidden state

    def lora_deltas(self, scale: float = 1.0) -> dict[int, dict[str, torch.Tensor]]:
        """FaceID: ``{attention-layer index: {"to_q" | "to_k" | "to_v" | "to_out": scale · up @ down}}``."""
        return {
            index: {
                name.removesuffix("_lora"): scale * cast(LoRAPair, pair).delta()
                for name, pair in lora.named_children()
            }
            for index, lora in self.lora.items()
        }


def build_ip_adapter(groups: Mapping[str, Mapping[str, torch.Tensor]], name: str = "") -> IPAdapter:
    """Make the modules for a file's tensors; every tensor is used, none is missing."""
    variant = detect_variant(groups, name)
    proj_sd = dict(groups["image_proj"])
    meta = any(t.is_meta for t in proj_sd.values())
    with _on(meta):
        projection = _build_projection(variant, proj_sd)
    _load_strict(projection, proj_sd, f"{name or 'file'} image_proj ({variant})")

    pairs: dict[int, dict[str, torch.Tensor]] = {}
    loras: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in groups["ip_adapter"].items():
        if match := _LAYER_KEY.match(key):
            pairs.setdefault(int(match[1]), {})[f"{match[2]}.weight"] = value
        elif match := _LORA_KEY.match(key):
            loras.setdefault(int(match[1]), {})[f"{match[2]}.{match[3]}.weight"] = value
        else:
            unknown.append(key)
    if unknown or not pairs:
        raise IPAdapterLayoutError(
            f"{name or 'file'}: unknown ip_adapter keys: {_show(unknown or list(groups['ip_adapter']))}"
        )
    layer_ids = sorted(pairs)
    if layer_ids != list(range(1, 2 * len(layer_ids), 2)):
        raise IPAdapterLayoutError(
            f"{name or 'file'}: ip_adapter layers are not numbered 1, 3, 5, ...: {layer_ids}"
        )
    cross_dim = pairs[layer_ids[0]]["to_k_ip.weight"].shape[1]
    layers = nn.ModuleList()
    for index in layer_ids:
        with _on(meta):
            layer = IPLayer(cross_dim, pairs[index]["to_k_ip.weight"].shape[0])
        _load_strict(layer, pairs[index], f"{name or 'file'} ip_adapter layer {index}")
        layers.append(layer)

    family = _FAMILY_BY_CROSS_WIDTH.get(cross_dim)
    if family is not None and len(layer_ids) != LAYER_COUNTS[family]:
        raise IPAdapterLayoutError(
            f"{name or 'file'}: {len(layer_ids)} ip_adapter layers, but a {family} U-Net has {LAYER_COUNTS[family]}"
        )
    lora = {}
    for index, sd in sorted(loras.items()):
        shapes = {
            key.split(".")[0]: (sd[key].shape[1], sd[key.replace("down", "up")].shape[0], sd[key].shape[0])
            for key in sd
            if key.endswith("down.weight") and key.replace("down", "up") in sd
        }
        with _on(meta):
            module = LayerLoRA(shapes)
        _load_strict(module, sd, f"{name or 'file'} FaceID LoRA {index}")
        lora[index] = module
    return IPAdapter(variant, family, cross_dim, projection, layers, layer_ids, lora)


def load_ip_adapter(path: str | Path) -> IPAdapter:
    """Read and build an IP-Adapter file (``.safetensors`` or ``.bin``)."""
    path = Path(path)
    return build_ip_adapter(read_ip_adapter_file(path), name=path.name)


def _on(meta: bool) -> contextlib.AbstractContextManager:
    """Build on the meta device when the tensors are meta (key checks of full-size layouts at no cost)."""
    return torch.device("meta") if meta else contextlib.nullcontext()


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {_show(missing)}")
        if unexpected:
            detail.append(f"unexpected {_show(unexpected)}")
        if wrong:
            detail.append(
                "wrong shapes "
                + ", ".join(f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in wrong[:6])
            )
        raise IPAdapterLayoutError(f"{what}: " + "; ".join(detail))
    module.load_state_dict(dict(state), strict=True, assign=True)


# --- the attention term --------------------------------------------------------------------------------


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention on [B, N, heads·d] tensors."""
    b, n, width = q.shape
    d = width // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, width)


@dataclass
class IPTerm:
    """One adapter's contribution to one cross-attention layer.

    ``tokens``: the image tokens [B, T, cross] (several images: concatenated on T); ``layer``: this
    layer's `IPLayer`; ``weight``: the strength (0 turns it off; the caller applies its start / end
    gate with `gate`); ``mask``: optional [B or 1, N] (or [B or 1, N, 1]) weights over the layer's N
    query positions, for regions (`mask_for_layer` resizes an image mask)."""

    tokens: torch.Tensor
    layer: IPLayer
    weight: float = 1.0
    mask: torch.Tensor | None = None


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, terms: Sequence[IPTerm] = ()
):
    """``attn(q, k_text, v_text) + Σ weight · mask · attn(q, to_k_ip(tokens), to_v_ip(tokens))``.

    ``q`` is the layer's projected query [B, N, C]; ``k`` / ``v`` its projected text keys / values; the
    result goes to the layer's output projection as the plain attention result would."""
    out = _attend(q, k, v, heads)
    for term in terms:
        if term.weight == 0:
            continue
        tokens = term.tokens.to(q.dtype)
        if tokens.shape[0] != q.shape[0]:
            tokens = tokens.expand(q.shape[0], -1, -1)
        extra = _attend(q, term.layer.to_k_ip(tokens), term.layer.to_v_ip(tokens), heads)
        if term.mask is not None:
            mask = term.mask.to(q.dtype)
            extra = extra * (mask if mask.ndim == 3 else mask[..., None])
        out = out + term.weight * extra
    return out


def gate(weight: float, start: float, end: float, progress: float) -> float:
    """The weight while ``start <= progress <= end`` (progress: 0 at the first step, 1 at the last),
    else 0."""
    return weight if start <= progress <= end else 0.0


def mask_for_layer(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An image mask [B, H, W] (1 = where the adapter acts) -> [B, height·width] for a layer whose
    tokens form a ``height`` × ``width`` grid."""
    resized = F.interpolate(mask[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return resized.reshape(mask.shape[0], height * width)
