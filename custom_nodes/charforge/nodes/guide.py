"""Guide nodes (menu: CharForge/Guide): IP-Adapter on a ComfyUI MODEL.

- Load IP-Adapter: an IP-Adapter file from models/ipadapter, its variant shown
- Apply IP-Adapter: a reference image through ComfyUI's CLIP vision model -> image tokens that every
  cross-attention layer of the U-Net also attends to (base, plus, plus-face, full-face)
- Apply IP-Adapter FaceID: the same with a CharForge identity's ArcFace embedding (FaceID, FaceID-Plus)
  and the file's FaceID LoRA patched into the U-Net's attention weights (``bridge.add_lora_patches``)

Several adapters chain: each Apply node adds its adapter to the ones already on the MODEL. The adapter
modules and the attention term live in ``charforge.engine.guide``; the MODEL is patched through
``bridge.patch_attn2`` (a clone with ComfyUI's attn2 replacements, start / end through the model's own
noise schedule).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from .. import bridge
from .types import CUSTOM_TYPES

CATEGORY = "CharForge/Guide"
IPADAPTER = "CHARFORGE_IPADAPTER"
NO_ADAPTER = "(no IP-Adapter in models/ipadapter)"
CLIP_VARIANTS = ("base", "plus", "plus_face", "full_face")
FACE_VARIANTS = ("faceid", "faceid_plus")
PUT_IN_PLACE = (
    "put an IP-Adapter file in ComfyUI's models/ipadapter folder, e.g. ip-adapter_sd15.safetensors, "
    "ip-adapter-plus_sd15.safetensors, ip-adapter-plus-face_sd15.safetensors, ip-adapter_sdxl_vit-h.safetensors "
    "or ip-adapter-faceid-plusv2_sd15.bin, and the matching CLIP vision model (ViT-H / ViT-bigG image "
    "encoder, e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors) in models/clip_vision"
)

CUSTOM_TYPES.setdefault(
    IPADAPTER,
    "A loaded IP-Adapter (engine.guide.ipadapter.IPAdapter: variant, image projection, per-layer "
    "key / value weights) plus its file name (nodes/guide.py).",
)


def _adapters() -> list[str]:
    return bridge.list_models("ipadapter")


class LoadedAdapter:
    """What flows on a CHARFORGE_IPADAPTER wire: the adapter and the file it came from."""

    def __init__(self, adapter: Any, name: str) -> None:
        self.adapter, self.name = adapter, name

    def __repr__(self) -> str:
        return f"IP-Adapter {self.name} ({self.adapter.variant}, {self.adapter.family or 'unknown family'})"


class LoadIPAdapter:
    """Load an IP-Adapter file and show which kind it is."""

    DESCRIPTION = (
        "Reads an IP-Adapter file (.safetensors or .bin) from models/ipadapter and tells its variant from its "
        "tensors: base, plus, plus-face, full-face, FaceID, FaceID-Plus(v2). Every tensor must be used; a file of "
        "another layout is refused with its keys."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (IPADAPTER, "STRING")
    RETURN_NAMES = ("ipadapter", "variant")
    OUTPUT_TOOLTIPS = (
        "The adapter: connect to Apply IP-Adapter or Apply IP-Adapter FaceID.",
        "Variant and base-model family read from the file, e.g. 'plus (sd15)'.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ipadapter_name": (
                    _adapters() or [NO_ADAPTER],
                    {"tooltip": "IP-Adapter file in models/ipadapter."},
                ),
            }
        }

    def load(self, ipadapter_name):
        from ..engine.guide.ipadapter import load_ip_adapter

        if ipadapter_name == NO_ADAPTER:
            raise bridge.ModelNotFoundError(f"no IP-Adapter file found: {PUT_IN_PLACE}")
        try:
            path = bridge.find_model("ipadapter", ipadapter_name)
        except bridge.ModelNotFoundError as exc:
            raise bridge.ModelNotFoundError(f"{exc}; {PUT_IN_PLACE}") from exc
        adapter = load_ip_adapter(path)
        variant = f"{adapter.variant} ({adapter.family or 'unknown family'})"
        return {"ui": {"text": [variant]}, "result": (LoadedAdapter(adapter, Path(path).name), variant)}


def _common_inputs() -> dict[str, Any]:
    return {
        "weight": (
            "FLOAT",
            {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.05, "tooltip": "Strength of the adapter."},
        ),
        "start_at": (
            "FLOAT",
            {
                "default": 0.0,
                "min": 0.0,
                "max": 1.0,
                "step": 0.01,
                "tooltip": "Fraction of sampling where it starts.",
            },
        ),
        "end_at": (
            "FLOAT",
            {
                "default": 1.0,
                "min": 0.0,
                "max": 1.0,
                "step": 0.01,
                "tooltip": "Fraction of sampling where it stops.",
            },
        ),
    }


_MASK_INPUT = {
    "attn_mask": (
        "MASK",
        {"tooltip": "Optional: where in the picture the adapter acts (white = acts); resized to each layer."},
    )
}


def _tokens(projection, *args, **kwargs):
    import torch

    with torch.no_grad():
        return projection(*args, **kwargs).float()


def _as_one_reference(tokens):
    """Several reference images: their tokens side by side ([N, T, C] -> [1, N·T, C])."""
    return tokens.reshape(1, -1, tokens.shape[-1])


def _check_variant(loaded: LoadedAdapter, allowed: tuple[str, ...], other: str) -> None:
    if loaded.adapter.variant not in allowed:
        raise ValueError(
            f"{loaded.name} is a {loaded.adapter.variant} IP-Adapter; this node takes {', '.join(allowed)} "
            f"(use {other})"
        )
    if loaded.adapter.family is None:
        raise ValueError(
            f"{loaded.name}: cross-attention width {loaded.adapter.cross_dim} is neither SD1.5 (768) nor SDXL "
            "(2048); only those U-Nets are supported"
        )


def _clip_hidden(clip_vision, image):
    """CLIP vision penultimate hidden states of an IMAGE batch, and of an all-black image (the negative)."""
    import torch

    hidden = clip_vision.encode_image(image)["penultimate_hidden_states"]
    black = torch.zeros((1, 224, 224, 3), dtype=image.dtype, device=image.device)
    return hidden, clip_vision.encode_image(black)["penultimate_hidden_states"]


def apply_to_model(model, loaded: LoadedAdapter, cond, uncond, weight, start_at, end_at, attn_mask=None):
    """A clone of ``model`` with this adapter's tokens added to the IP-Adapter patches already on it."""
    from ..engine.guide.attn2_patch import AdapterInput, comfy_attn2_slots

    if start_at > end_at:
        raise ValueError(f"start_at {start_at} is after end_at {end_at}")
    item = AdapterInput(
        loaded.adapter,
        cond,
        uncond,
        float(weight),
        sigma_start=bridge.percent_to_sigma(model, start_at),
        sigma_end=bridge.percent_to_sigma(model, end_at),
        mask=None if attn_mask is None else (attn_mask if attn_mask.ndim == 3 else attn_mask[None]).float(),
    )
    slots = comfy_attn2_slots(loaded.adapter.family)

    def make_patch(slot: tuple[str, int, int], existing: Any) -> Any:
        patch_class = shared_patch_class()
        if existing is not None and not isinstance(existing, patch_class):
            raise ValueError(
                f"the MODEL already has another cross-attention replacement at {slot} (from another node "
                "pack); apply the IP-Adapter before it"
            )
        earlier = existing.inputs if existing is not None else []
        return patch_class([*earlier, item], slots.index(slot))

    return bridge.patch_attn2(model, make_patch, slots)


@functools.cache
def shared_patch_class() -> type[Any]:
    """The attn2 replacement class this pack installs (built on first use: nodes import without torch)."""
    from ..engine.guide.attn2_patch import IPAttn2Patch

    class _Shared(IPAttn2Patch):
        """`IPAttn2Patch` that ComfyUI's deep copy of model options (every clone) shares instead of
        copying the adapters' weights, and that puts its layer on the U-Net's device and dtype."""

        def __deepcopy__(self, memo):
            return type(self)(list(self.inputs), self.layer)

        def __call__(self, q, k, v, extra_options):
            for item in self.inputs:
                layer: Any = item.adapter.layers[self.layer]
                weight = layer.to_k_ip.weight
                if weight.device != q.device or weight.dtype != q.dtype:
                    layer.to(device=q.device, dtype=q.dtype)
            return super().__call__(q, k, v, extra_options)

    return _Shared


class _ApplyAdapterNode:
    """What the two Apply nodes declare alike: one MODEL output from ``apply``."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MODEL with the adapter applied (a clone; the input MODEL is unchanged).",)
    FUNCTION = "apply"


class ApplyIPAdapter(_ApplyAdapterNode):
    """Guide generation with a reference image through an IP-Adapter."""

    DESCRIPTION = (
        "Encodes the reference image(s) with ComfyUI's CLIP vision model (penultimate hidden states for plus, "
        "plus-face and full-face adapters, the image embedding for base ones; the negative prompt gets an "
        "all-black image or a zero embedding, as the adapters were trained) and patches every cross-attention "
        "layer of the U-Net to also attend to the image tokens. Several images are used together; chain nodes "
        "for several adapters. SD1.5 and SDXL U-Nets."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD1.5 or SDXL U-Net matching the adapter."}),
                "ipadapter": (IPADAPTER, {"tooltip": "From Load IP-Adapter."}),
                "clip_vision": (
                    "CLIP_VISION",
                    {"tooltip": "From Load CLIP Vision: the adapter's image encoder."},
                ),
                "image": ("IMAGE", {"tooltip": "Reference image(s)."}),
                **_common_inputs(),
            },
            "optional": dict(_MASK_INPUT),
        }

    def apply(self, model, ipadapter, clip_vision, image, weight, start_at, end_at, attn_mask=None):
        import torch

        _check_variant(ipadapter, CLIP_VARIANTS, "Apply IP-Adapter FaceID")
        projection = ipadapter.adapter.projection
        if ipadapter.adapter.variant == "base":
            embeds = clip_vision.encode_image(image)["image_embeds"].float()
            cond, uncond = _tokens(projection, embeds), _tokens(projection, torch.zeros_like(embeds[:1]))
        else:
            hidden, black = _clip_hidden(clip_vision, image)
            cond, uncond = _tokens(projection, hidden.float()), _tokens(projection, black.float())
        cond = _as_one_reference(cond)
        uncond = _as_one_reference(uncond.expand(image.shape[0], -1, -1))
        return (apply_to_model(model, ipadapter, cond, uncond, weight, start_at, end_at, attn_mask),)


class ApplyIPAdapterFaceID(_ApplyAdapterNode):
    """Guide generation with a character's face identity through a FaceID IP-Adapter."""

    DESCRIPTION = (
        "Turns a CharForge identity (Build Identity / Load Identity: the normalised ArcFace embedding of the "
        "reference faces) into image tokens with a FaceID or FaceID-Plus adapter; FaceID-Plus also encodes a "
        "face crop with the CLIP vision model, and v2 files (name containing 'v2') add the face tokens back "
        "with shortcut_scale. The negative prompt gets a zero face embedding (and an all-black crop). The "
        "rank-128 LoRA inside FaceID files (query, key, value and output projections of every attention "
        "layer) is patched into the MODEL at lora_strength, as a LoRA loader would; set lora_strength to 0 "
        "when the companion LoRA file is loaded with a LoRA loader instead."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD1.5 or SDXL U-Net matching the adapter."}),
                "ipadapter": (IPADAPTER, {"tooltip": "A FaceID or FaceID-Plus file from Load IP-Adapter."}),
                "identity": ("CHARFORGE_IDENTITY", {"tooltip": "From Build Identity or Load Identity."}),
                **_common_inputs(),
                "shortcut_scale": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 3.0,
                        "step": 0.05,
                        "tooltip": "FaceID-Plus v2 only: how much of the face tokens is added back.",
                    },
                ),
            },
            "optional": {
                "clip_vision": (
                    "CLIP_VISION",
                    {"tooltip": "FaceID-Plus: the image encoder for the face crop."},
                ),
                "face_image": ("IMAGE", {"tooltip": "FaceID-Plus: a crop of the face."}),
                **_MASK_INPUT,
                "lora_strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -1.0,
                        "max": 3.0,
                        "step": 0.05,
                        "tooltip": "Strength of the LoRA inside the FaceID file (0 = not applied; use 0 when "
                        "its companion LoRA file goes through a LoRA loader).",
                    },
                ),
            },
        }

    def apply(
        self,
        model,
        ipadapter,
        identity,
        weight,
        start_at,
        end_at,
        shortcut_scale,
        clip_vision=None,
        face_image=None,
        attn_mask=None,
        lora_strength=1.0,
    ):
        import torch

        _check_variant(ipadapter, FACE_VARIANTS, "Apply IP-Adapter")
        face = torch.as_tensor(identity.centroid, dtype=torch.float32).reshape(1, -1)
        projection = ipadapter.adapter.projection
        if ipadapter.adapter.variant == "faceid":
            cond, uncond = _tokens(projection, face), _tokens(projection, torch.zeros_like(face))
        else:
            if clip_vision is None or face_image is None:
                raise ValueError(
                    f"{ipadapter.name} is FaceID-Plus: connect clip_vision and a face_image crop"
                )
            hidden, black = _clip_hidden(clip_vision, face_image)
            hidden = hidden.float().mean(0, keepdim=True) if hidden.shape[0] > 1 else hidden.float()
            shortcut = "v2" in ipadapter.name.lower()
            options = {"shortcut": shortcut, "shortcut_scale": float(shortcut_scale)}
            cond = _tokens(projection, face, hidden, **options)
            uncond = _tokens(projection, torch.zeros_like(face), black.float(), **options)
        patched = apply_to_model(model, ipadapter, cond, uncond, weight, start_at, end_at, attn_mask)
        if lora_strength and ipadapter.adapter.lora:
            _patch_faceid_lora(patched, ipadapter, float(lora_strength))
        return (patched,)


def _patch_faceid_lora(model, loaded: LoadedAdapter, strength: float) -> None:
    """The FaceID file's LoRA as weight patches on ``model`` (a clone), in ComfyUI's U-Net key names."""
    from ..engine.guide.faceid_lora import faceid_lora_weights, family_unet_config

    config = family_unet_config(loaded.adapter.family)
    try:
        factors = faceid_lora_weights(loaded.adapter.lora, config, ldm=True)
    except ValueError as exc:
        raise ValueError(f"{loaded.name}: {exc}") from exc
    factors = {f"diffusion_model.{key}": pair for key, pair in factors.items()}
    try:
        bridge.add_lora_patches(model, factors, strength)
    except ValueError as exc:
        raise ValueError(
            f"{loaded.name}: its FaceID LoRA does not fit this MODEL ({exc}); use a {loaded.adapter.family} model"
        ) from exc


NODE_CLASS_MAPPINGS = {
    "CharForgeLoadIPAdapter": LoadIPAdapter,
    "CharForgeApplyIPAdapter": ApplyIPAdapter,
    "CharForgeApplyIPAdapterFaceID": ApplyIPAdapterFaceID,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgeLoadIPAdapter": "Load IP-Adapter",
    "CharForgeApplyIPAdapter": "Apply IP-Adapter",
    "CharForgeApplyIPAdapterFaceID": "Apply IP-Adapter FaceID",
}
