"""Guide node (menu: CharForge/Guide): Apply InstantID on an SDXL MODEL and its conditionings.

InstantID needs three files, loaded by nodes the workflow already has:

- ``ip-adapter.bin`` from InstantX/InstantID in models/ipadapter, through Load IP-Adapter (variant
  ``instantid``: a resampler from the 512-value face embedding to 16 tokens of 2048, and key / value
  weights for the 70 cross-attention layers of SDXL);
- the IdentityNet, a diffusers SDXL ControlNet (``ControlNetModel/diffusion_pytorch_model.safetensors``
  with its ``config.json``), in models/controlnet, through ComfyUI's own Load ControlNet Model;
- the antelopev2 InsightFace pack (models/insightface/models/antelopev2), through Load Face Models.

The face photo's largest face gives the embedding (the recogniser's raw values, as InstantID was trained)
and the five keypoints drawn for the IdentityNet (``engine.guide.instantid``). The MODEL is patched with
the face tokens like any IP-Adapter (``guide.apply_to_model``); the ControlNet is added to both
conditionings by ComfyUI's own ControlNetApplyAdvanced (``bridge.apply_controlnet``), with
``cross_attn_controlnet`` set to the face tokens (positive) and to the tokens of a zero embedding
(negative), so the IdentityNet attends to the face instead of the prompt text.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import bridge
from .guide import CATEGORY, IPADAPTER, _common_inputs, apply_to_model

log = logging.getLogger("charforge")

INSTANTID_FILES = (
    "InstantID needs InstantX/InstantID's ip-adapter.bin in models/ipadapter (Load IP-Adapter), its "
    "IdentityNet ControlNetModel/diffusion_pytorch_model.safetensors in models/controlnet (Load ControlNet "
    "Model; e.g. renamed instantid_controlnet.safetensors) and the antelopev2 pack in "
    "models/insightface/models/antelopev2 (Load Face Models)"
)


def _rgb(image) -> Any:
    """One IMAGE frame [H, W, 3] (0..1) as an RGB uint8 array."""
    import numpy as np

    return (image.detach().cpu().float().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


class ApplyInstantID:
    """Guide an SDXL generation with one face through InstantID (its IP-Adapter and its IdentityNet)."""

    DESCRIPTION = (
        "InstantID for SDXL. The largest face in `image` gives the face embedding (antelopev2, unnormalised, "
        "averaged over a batch) and five keypoints. The embedding becomes 16 face tokens through InstantID's "
        "adapter (ip-adapter.bin from Load IP-Adapter): every cross-attention layer of the MODEL also attends to "
        "them (weight). The keypoints are drawn on black (coloured limbs to the nose, coloured dots) as the hint "
        "of the IdentityNet ControlNet (Load ControlNet Model) on both conditionings (cn_strength), and the "
        "ControlNet attends to the face tokens instead of the prompt (the negative gets the tokens of a zero "
        "embedding). Files: ip-adapter.bin in models/ipadapter, the IdentityNet's "
        "diffusion_pytorch_model.safetensors in models/controlnet, antelopev2 in models/insightface/models."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "IMAGE")
    RETURN_NAMES = ("model", "positive", "negative", "keypoints")
    OUTPUT_TOOLTIPS = (
        "The MODEL with the face tokens in its cross-attention (a clone; the input MODEL is unchanged).",
        "The positive conditioning with the IdentityNet and the face tokens as its context.",
        "The negative conditioning with the IdentityNet and the zero-embedding tokens as its context.",
        "The keypoint picture given to the IdentityNet (for a preview).",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        common = _common_inputs()
        common["weight"][1].update(
            default=0.8, tooltip="Strength of the face tokens in the MODEL (IP-Adapter)."
        )
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SDXL U-Net."}),
                "instantid": (
                    IPADAPTER,
                    {"tooltip": "InstantID's ip-adapter.bin from Load IP-Adapter (variant instantid)."},
                ),
                "control_net": (
                    "CONTROL_NET",
                    {"tooltip": "InstantID's IdentityNet from Load ControlNet Model (models/controlnet)."},
                ),
                "face_models": (
                    "CHARFORGE_FACE_MODELS",
                    {
                        "tooltip": "From Load Face Models with the antelopev2 pack (what InstantID was trained on)."
                    },
                ),
                "image": (
                    "IMAGE",
                    {"tooltip": "Face photo(s) of the person: the largest face of each gives the embedding."},
                ),
                "positive": ("CONDITIONING", {"tooltip": "Positive prompt conditioning (SDXL)."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt conditioning (SDXL)."}),
                **common,
                "cn_strength": (
                    "FLOAT",
                    {
                        "default": 0.8,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "Strength of the IdentityNet ControlNet (0: not added).",
                    },
                ),
            },
            "optional": {
                "keypoint_image": (
                    "IMAGE",
                    {
                        "tooltip": "Optional: take the face position and pose from this picture's largest face "
                        "instead of the face photo's (drawn at this picture's size)."
                    },
                ),
                "identity": (
                    "CHARFORGE_IDENTITY",
                    {
                        "tooltip": "Optional: use this identity's embedding direction (built with the same face "
                        "models) at the raw length of the faces in `image`."
                    },
                ),
                "attn_mask": (
                    "MASK",
                    {
                        "tooltip": "Optional: where in the picture the face tokens act in the MODEL (white = acts)."
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def apply(
        self,
        model,
        instantid,
        control_net,
        face_models,
        image,
        positive,
        negative,
        weight,
        start_at,
        end_at,
        cn_strength,
        keypoint_image=None,
        identity=None,
        attn_mask=None,
        node_id=None,
    ):
        import torch

        from ..engine.guide import instantid as engine

        adapter = instantid.adapter
        if adapter.variant != "instantid":
            raise ValueError(
                f"{instantid.name} is a {adapter.variant} IP-Adapter; Apply InstantID takes InstantID's "
                "ip-adapter.bin (variant instantid; use Apply IP-Adapter or Apply IP-Adapter FaceID for this one). "
                + INSTANTID_FILES
            )
        if adapter.family != "sdxl":
            raise ValueError(f"{instantid.name}: InstantID is for SDXL, but this adapter is {adapter.family}")
        if identity is not None and identity.model != face_models.name:
            raise ValueError(
                f"identity {identity.name!r} was built with {identity.model}, the face models are "
                f"{face_models.name}: embeddings of two face models do not compare"
            )
        if "antelopev2" not in face_models.name:
            log.warning(
                "Apply InstantID: InstantID was trained on antelopev2 embeddings, got %s", face_models.name
            )

        frames = int(image.shape[0]) + (0 if keypoint_image is None else 1)
        progress = bridge.control(frames, node_id=node_id, label="apply instantid")
        faces = []
        for index in range(int(image.shape[0])):
            progress.check()
            found = face_models.detect(_rgb(image[index]))
            faces.append(engine.largest_face(found, f"image {index + 1} of {int(image.shape[0])}"))
            progress.advance()
        pose_face, canvas = faces[0], image[0]
        if keypoint_image is not None:
            canvas = keypoint_image[0]
            pose_face = engine.largest_face(face_models.detect(_rgb(canvas)), "keypoint_image")
            progress.advance()

        embedding = engine.face_embedding(faces, None if identity is None else identity.centroid)
        cond, uncond = engine.face_tokens(adapter.projection, embedding)
        drawn = engine.draw_keypoints(pose_face.landmarks, int(canvas.shape[0]), int(canvas.shape[1]))
        hint = torch.from_numpy(drawn).float().div(255.0)[None]

        patched = apply_to_model(model, instantid, cond, uncond, weight, start_at, end_at, attn_mask)
        positive, negative = bridge.apply_controlnet(
            positive, negative, control_net, hint, float(cn_strength), float(start_at), float(end_at)
        )
        # IdentityNet attends to the face tokens instead of the prompt (ComfyUI's cross_attn_controlnet)
        positive = [[t, {**o, "cross_attn_controlnet": cond}] for t, o in positive]
        negative = [[t, {**o, "cross_attn_controlnet": uncond}] for t, o in negative]
        return (patched, positive, negative, hint)


NODE_CLASS_MAPPINGS = {"CharForgeApplyInstantID": ApplyInstantID}
NODE_DISPLAY_NAME_MAPPINGS = {"CharForgeApplyInstantID": "Apply InstantID"}
