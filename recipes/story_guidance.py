"""Reference-mode guidance and pose control of ``charforge story``: what the server offers, and the graph pieces.

Guidance kinds (``--guidance``), strongest first (the order ``auto`` tries):

- ``instantid``: CharForge's Apply InstantID with the character's identity (SDXL bases only), every frame;
- ``faceid``: CharForge's Load IP-Adapter + Apply IP-Adapter FaceID with the character's identity (the saved
  identity, or the one built from the reference photos), every frame; no CLIP vision model needed;
- ``ipadapter``: CharForge's Load IP-Adapter + ComfyUI's Load CLIP Vision + Apply IP-Adapter, frame 1 guided by
  the first reference photo (when the identity is a photo folder), frames 2+ by frame 1;
- ``img2img``: frames 2+ start from frame 1 (VAEEncode, denoise below 1).

What the server has comes from its /object_info (the nodes, and the model files their inputs list: Load
IP-Adapter's ``models/ipadapter``, Load CLIP Vision's ``models/clip_vision``, ControlNetLoader's
``models/controlnet``) and, for DWPose's ONNX files (which no node input lists), CharForge's model listing
route. Adapter files are told apart by their published names (``ip-adapter-faceid_sd15.bin``,
``ip-adapter-plus-face_sdxl_vit-h.safetensors``, InstantID's ``ip-adapter.bin``, ...); a file whose name says
another base-model family than the checkpoint's is never picked.

Scenes' pose images (a pose ControlNet in every mode) are :mod:`charforge.recipes.story_pose`'s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from charforge.driver.errors import UsageError
from charforge.driver.workflow.object_info import input_choices

KINDS = ("instantid", "faceid", "ipadapter", "img2img")  # strongest first: the order `auto` tries
CHOICES = ("auto", "all", *KINDS)
LOAD_ADAPTER, APPLY_ADAPTER, APPLY_FACEID = (
    "CharForgeLoadIPAdapter",
    "CharForgeApplyIPAdapter",
    "CharForgeApplyIPAdapterFaceID",
)
APPLY_INSTANTID = "CharForgeApplyInstantID"
NODES = {
    "ipadapter": (LOAD_ADAPTER, "CLIPVisionLoader", APPLY_ADAPTER, "LoadImage"),
    "faceid": (LOAD_ADAPTER, APPLY_FACEID),
    "instantid": (LOAD_ADAPTER, APPLY_INSTANTID, "ControlNetLoader", "LoadImage"),
    "img2img": ("LoadImage", "VAEEncode", "RepeatLatentBatch"),
}
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
# IP-Adapter variants for the `ipadapter` kind, best first (the face models keep a character best)
IMAGE_VARIANTS = ("plus_face", "full_face", "plus", "base")
VARIANT_NAMES = {
    "base": "base",
    "plus": "plus",
    "plus_face": "plus-face",
    "full_face": "full-face",
    "faceid": "FaceID",
    "faceid_plus": "FaceID-Plus",
    "instantid": "InstantID",
}
INSTANTID_PACK = "antelopev2"  # the face models InstantID was trained with
INSTANTID_CN_STRENGTH = 0.8


@dataclass
class Guidance:
    """How reference mode guides its frames; `reason` is what the storyboard's metadata and the log say."""

    kind: str
    ipadapter_file: str = ""
    clip_vision: str = ""
    reason: str = ""
    variant: str = ""  # the adapter file's variant (VARIANT_NAMES)
    controlnet: str = ""  # InstantID: its ControlNet (IdentityNet)
    face_photo: str = ""  # InstantID: the reference photo (server input folder) its face comes from

    @property
    def every_frame(self) -> bool:
        """FaceID and InstantID guide frame 1 too (the identity is the character's, not frame 1's)."""
        return self.kind in ("faceid", "instantid")


@dataclass(frozen=True)
class AdapterFile:
    name: str
    variant: str  # VARIANT_NAMES
    family: str | None  # sd15 / sdxl as the name says; None when it says neither

    @property
    def vision(self) -> str:
        """The CLIP vision encoder the file was trained with: ``bigg`` (ViT-bigG) or ``h`` (ViT-H)."""
        said = _vision_kind(self.name)
        if said is None and self.family == "sdxl" and self.variant == "base":
            return "bigg"  # ip-adapter_sdxl.safetensors
        return said or "h"


def name_family(name: str) -> str | None:
    """The base-model family a model file's name says: ``sdxl``, ``sd15`` or None."""
    low = PurePosixPath(name).name.lower()
    if re.search(r"sdxl|(^|[^a-z])xl([^a-z]|$)|_xl|xl_", low):
        return "sdxl"
    if re.search(r"sd_?1[._-]?5|v1[._-]5|sd15|v11p|v11f1p|control_sd15|sd-?v1", low):
        return "sd15"
    return None


def classify_adapter(name: str) -> AdapterFile | None:
    """An ``models/ipadapter`` file by its published name, or None for a name that says no known variant
    (FaceID Portrait, which no node here takes, included)."""
    low = PurePosixPath(name).name.lower()
    stem = low.rsplit(".", 1)[0]
    if "instantid" in low or stem in ("ip-adapter", "ip_adapter"):
        return AdapterFile(name, "instantid", "sdxl")
    family = name_family(name)
    if "faceid" in low:
        if "portrait" in low:
            return None
        return AdapterFile(name, "faceid_plus" if "plus" in low else "faceid", family)
    if "full-face" in low or "full_face" in low:
        return AdapterFile(name, "full_face", family)
    if "plus-face" in low or "plus_face" in low:
        return AdapterFile(name, "plus_face", family)
    if "plus" in low:
        return AdapterFile(name, "plus", family)
    if "ip-adapter" in low or "ip_adapter" in low or "ipadapter" in low:
        return AdapterFile(name, "base", family)
    return None


def _vision_kind(name: str) -> str | None:
    """The CLIP vision encoder a file name says (an adapter's or an encoder's): ``bigg``, ``h`` or None."""
    low = name.lower()
    if "bigg" in low or "vit-g" in low or "vit_g" in low:
        return "bigg"
    if "vit-h" in low or "vit_h" in low or "h-14" in low or "h14" in low:
        return "h"
    return None


def checkpoint_family(checkpoint: str, reported: str) -> tuple[str | None, str]:
    """The SD family of the storyboard's checkpoint: the one the server or the preset reports, else what its name
    says (and how it was told, for the metadata)."""
    if reported in FAMILY_NAMES:
        return reported, f"{FAMILY_NAMES[reported]} (read from the model)"
    guessed = name_family(checkpoint)
    if guessed is not None:
        return guessed, f"{FAMILY_NAMES[guessed]} (from the checkpoint's name)"
    return None, "unknown (neither the server nor the checkpoint's name tells SD1.5 from SDXL)"


# --------------------------------------------------------------------------------------------------
# What the server offers


@dataclass
class Offer:
    """What a server offers for guidance and poses: the object_info, the base family and the listings."""

    info: dict[str, Any]
    family: str | None
    family_reason: str = ""
    identity: dict[str, Any] | None = None  # the storyboard's identity (story.StoryRun._identity)

    def files(self, node: str, name: str) -> list[str]:
        return [f for f in input_choices(self.info, node, name) or [] if not f.startswith("(")]

    def adapters(self) -> list[AdapterFile]:
        return [a for a in map(classify_adapter, self.files(LOAD_ADAPTER, "ipadapter_name")) if a is not None]

    def missing_nodes(self, kind: str) -> list[str]:
        return [n for n in NODES[kind] if n not in self.info]

    def identity_words(self) -> str:
        identity = self.identity or {}
        if "name" in identity:
            return f"identity {identity['name']!r}"
        return f"identity from the reference photos ({identity.get('source') or identity.get('folder', '?')})"


def _family_ok(offer: Offer, adapter: AdapterFile) -> bool:
    return adapter.family is not None and adapter.family == offer.family


def _refused(offer: Offer, variants: tuple[str, ...]) -> list[str]:
    """Files of `variants` that were not picked because their name says another family (or none)."""
    return [
        f"{a.name} ({FAMILY_NAMES.get(a.family or '', 'family not in its name')})"
        for a in offer.adapters()
        if a.variant in variants and not _family_ok(offer, a)
    ]


def _why_not(offer: Offer, kind: str, what: str, variants: tuple[str, ...]) -> str:
    missing = offer.missing_nodes(kind)
    if missing:
        pack = any(n.startswith("CharForge") for n in missing)
        return f"the server lacks the node(s) {', '.join(missing)}" + (
            " (update the CharForge pack on it)" if pack else ""
        )
    refused = _refused(offer, variants)
    base = FAMILY_NAMES.get(offer.family or "", "an unknown family")
    text = f"no {what} for the checkpoint's family ({base}) in the server's models/ipadapter"
    return text + (f"; not of that family: {', '.join(refused)}" if refused else "")


def _pick_adapter(offer: Offer, variants: tuple[str, ...], wanted: str | None) -> AdapterFile | None:
    candidates = [a for a in offer.adapters() if a.variant in variants and _family_ok(offer, a)]
    if wanted:
        return next((a for a in candidates if a.name == wanted), None)
    candidates.sort(key=lambda a: (variants.index(a.variant), a.name))
    return candidates[0] if candidates else None


def faceid_guidance(offer: Offer, wanted_file: str | None = None) -> tuple[Guidance | None, str]:
    """FaceID (plain FaceID files: the identity's ArcFace embedding, no CLIP vision), or None and why not."""
    if offer.missing_nodes("faceid") or offer.family is None:
        return None, _why_not(offer, "faceid", "FaceID file (e.g. ip-adapter-faceid_sd15.bin)", ("faceid",))
    adapter = _pick_adapter(offer, ("faceid",), wanted_file)
    if adapter is None:
        why = _why_not(offer, "faceid", "FaceID file (e.g. ip-adapter-faceid_sd15.bin)", ("faceid",))
        if any(a.variant == "faceid_plus" for a in offer.adapters()):
            why += " (FaceID-Plus files need a face crop encoded by CLIP vision; the storyboard uses plain FaceID)"
        return None, why
    reason = f"FaceID ({adapter.name}): {offer.identity_words()}"
    return Guidance("faceid", adapter.name, reason=reason, variant=adapter.variant), ""


def ipadapter_guidance(offer: Offer, wanted_file: str | None = None) -> tuple[Guidance | None, str]:
    """IP-Adapter from an image (plus-face, full-face, plus, base) with its CLIP vision model, or None and why."""
    what = "image IP-Adapter (e.g. ip-adapter-plus-face_sd15.safetensors)"
    if offer.missing_nodes("ipadapter") or offer.family is None:
        return None, _why_not(offer, "ipadapter", what, IMAGE_VARIANTS)
    adapter = _pick_adapter(offer, IMAGE_VARIANTS, wanted_file)
    if adapter is None:
        return None, _why_not(offer, "ipadapter", what, IMAGE_VARIANTS)
    visions = offer.files("CLIPVisionLoader", "clip_name")
    if not visions:
        return None, (
            f"{adapter.name} needs its CLIP vision model (ViT-H, e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
            f"{'; ViT-bigG for this file' if adapter.vision == 'bigg' else ''}) in the server's models/clip_vision"
        )
    matching = [v for v in visions if _vision_kind(v) == adapter.vision]
    untold = [v for v in visions if _vision_kind(v) is None]
    if matching:
        vision, caveat = matching[0], ""
    elif untold:
        vision, caveat = untold[0], " (its name does not say ViT-H or ViT-bigG)"
    else:
        encoder = "ViT-bigG" if adapter.vision == "bigg" else "ViT-H"
        return (
            None,
            f"{adapter.name} needs a {encoder} CLIP vision model; models/clip_vision has {', '.join(visions)}",
        )
    guide = "frame 1 guided by the first reference photo, frames 2+ by frame 1"
    if "folder" not in (offer.identity or {}):
        guide = "frames 2+ guided by frame 1"
    reason = (
        f"IP-Adapter {VARIANT_NAMES[adapter.variant]} ({adapter.name}, CLIP vision {vision}{caveat}): {guide}"
    )
    return Guidance("ipadapter", adapter.name, vision, reason, variant=adapter.variant), ""


def _is_identitynet(name: str) -> bool:
    low = name.lower().replace("\\", "/")
    return "instantid" in low or low.startswith("controlnetmodel/")


def instantid_guidance(offer: Offer) -> tuple[Guidance | None, str]:
    """InstantID on an SDXL base (its adapter, its IdentityNet ControlNet, antelopev2 and a reference photo),
    or None and why not."""
    if offer.family != "sdxl":
        return None, "InstantID is made for SDXL bases; this checkpoint is " + FAMILY_NAMES.get(
            offer.family or "", "of an unknown family"
        )
    missing = offer.missing_nodes("instantid")
    if missing:
        return None, f"the server lacks the node(s) {', '.join(missing)}"
    adapter = _pick_adapter(offer, ("instantid",), None)
    controlnets = [c for c in offer.files("ControlNetLoader", "control_net_name") if _is_identitynet(c)]
    if adapter is None:
        return (
            None,
            "no InstantID adapter (ip-adapter.bin, or a name containing 'instantid') in models/ipadapter",
        )
    if not controlnets:
        return None, (
            "no InstantID IdentityNet in models/controlnet (its diffusion_pytorch_model.safetensors, renamed "
            "e.g. instantid_controlnet.safetensors or kept in a ControlNetModel folder)"
        )
    if INSTANTID_PACK not in offer.files("CharForgeLoadFaceModels", "pack"):
        return (
            None,
            f"InstantID needs the {INSTANTID_PACK} face models in models/insightface/models/{INSTANTID_PACK}",
        )
    photo = (offer.identity or {}).get("photo")
    if not photo:
        return None, "InstantID takes the face from a reference photo; the identity is saved by name only"
    reason = (
        f"InstantID ({adapter.name}, IdentityNet {controlnets[0]}, {INSTANTID_PACK}): the face of the first "
        f"reference photo ({PurePosixPath(photo).name}), {offer.identity_words()}"
    )
    guidance = Guidance(
        "instantid", adapter.name, reason=reason, variant="instantid", controlnet=controlnets[0]
    )
    guidance.face_photo = photo
    return guidance, ""


def img2img_guidance(offer: Offer) -> tuple[Guidance | None, str]:
    missing = offer.missing_nodes("img2img")
    if missing:
        return None, f"reference mode needs ComfyUI's {', '.join(missing)} node(s), which the server lacks"
    return Guidance("img2img", reason="image-to-image from frame 1"), ""


def guidance_of(offer: Offer, kind: str, ipadapter_file: str | None = None) -> tuple[Guidance | None, str]:
    if kind == "instantid":
        return instantid_guidance(offer)
    if kind == "faceid":
        return faceid_guidance(offer, ipadapter_file)
    if kind == "ipadapter":
        return ipadapter_guidance(offer, ipadapter_file)
    return img2img_guidance(offer)


def parse_kinds(text: str) -> list[str]:
    """``--guidance``: auto, all, one kind, or a comma list of kinds."""
    kinds = [k.strip().lower() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in CHOICES]
    if unknown or not kinds or (len(kinds) > 1 and {"auto", "all"} & set(kinds)):
        raise UsageError(
            f"--guidance takes auto, all, one of {', '.join(KINDS)} or a comma list of them; got {text!r}"
        )
    return kinds


def choose_guidance(offer: Offer, wanted: str = "auto", ipadapter_file: str | None = None) -> list[Guidance]:
    """The guidance of each reference storyboard: ``auto`` the strongest the server offers, ``all`` every kind it
    offers (strongest first), else the kinds named -- each must be available (the error says what is missing)."""
    kinds = parse_kinds(wanted)
    if ipadapter_file and ipadapter_file not in offer.files(LOAD_ADAPTER, "ipadapter_name"):
        raise UsageError(
            f"IP-Adapter model {ipadapter_file!r} is not in the server's models/ipadapter; it has: "
            f"{', '.join(offer.files(LOAD_ADAPTER, 'ipadapter_name')) or 'none'}"
        )
    if kinds in (["auto"], ["all"]):
        found, skipped = [], []
        for kind in KINDS:
            guidance, why = guidance_of(offer, kind, ipadapter_file)
            if guidance is None:
                skipped.append(f"{kind}: {why}")
                continue
            found.append(guidance)
            if kinds == ["auto"]:
                break
        if not found:
            raise UsageError("reference mode has no guidance on this server: " + "; ".join(skipped))
        if kinds == ["auto"] and skipped:
            found[0].reason += f" (stronger kinds not available: {'; '.join(skipped)})"
        return found
    chosen = []
    for kind in dict.fromkeys(kinds):
        guidance, why = guidance_of(offer, kind, ipadapter_file)
        if guidance is None:
            raise UsageError(f"--guidance {kind}: {why}")
        chosen.append(guidance)
    return chosen


# --------------------------------------------------------------------------------------------------
# Graph pieces (node ids 30-49; `add` is frame_graph's)


def add_guidance(
    add: Callable[..., list],
    guidance: Guidance,
    model: list,
    *,
    image: list | None,
    identity: list,
    weight: float,
    clip: list | None = None,
) -> list:
    """Patch `model` with `guidance` (``ipadapter`` needs `image`: the guide picture; ``faceid`` and
    ``instantid`` the `identity` socket); returns the MODEL socket to sample with."""
    if guidance.kind == "ipadapter":
        if image is None:
            return model
        add("31", LOAD_ADAPTER, "IP-Adapter model", ipadapter_name=guidance.ipadapter_file)
        add("32", "CLIPVisionLoader", "CLIP vision", clip_name=guidance.clip_vision)
        return add(
            "33",
            APPLY_ADAPTER,
            "IP-Adapter: guided by the guide image",
            model=model,
            ipadapter=["31", 0],
            clip_vision=["32", 0],
            image=image,
            weight=weight,
            start_at=0.0,
            end_at=1.0,
        )
    if guidance.kind == "faceid":
        add("31", LOAD_ADAPTER, "FaceID model", ipadapter_name=guidance.ipadapter_file)
        return add(
            "33",
            APPLY_FACEID,
            "FaceID: the character's identity",
            model=model,
            ipadapter=["31", 0],
            identity=identity,
            weight=weight,
            start_at=0.0,
            end_at=1.0,
            shortcut_scale=1.0,
        )
    raise ValueError(f"no graph for guidance {guidance.kind!r} here")


def add_instantid(
    add: Callable[..., list],
    guidance: Guidance,
    model: list,
    positive: list,
    negative: list,
    *,
    weight: float,
) -> tuple[list, list, list]:
    """Apply InstantID with its adapter, IdentityNet, antelopev2 and the reference photo; (model, positive,
    negative) sockets to sample with."""
    add("31", LOAD_ADAPTER, "InstantID adapter", ipadapter_name=guidance.ipadapter_file)
    add("36", "LoadImage", "Face photo (InstantID)", image=guidance.face_photo)
    add("37", "ControlNetLoader", "InstantID IdentityNet", control_net_name=guidance.controlnet)
    add(
        "38",
        "CharForgeLoadFaceModels",
        "Face models (InstantID)",
        pack=INSTANTID_PACK,
        det_size=640,
        provider="auto",
    )
    node = add(
        "33",
        APPLY_INSTANTID,
        "InstantID: the character's face",
        model=model,
        instantid=["31", 0],
        control_net=["37", 0],
        face_models=["38", 0],
        image=["36", 0],
        positive=positive,
        negative=negative,
        weight=weight,
        start_at=0.0,
        end_at=1.0,
        cn_strength=INSTANTID_CN_STRENGTH,
    )
    return node, ["33", 1], ["33", 2]


# --------------------------------------------------------------------------------------------------
# A run's plan and records (story.StoryRun calls these)


def plan(run: Any, checkpoint: str, identity: dict[str, Any]) -> list[Guidance | None]:
    """Reference mode's guidance kinds ([None] without reference mode) and the run's poses (`run.pose`, the
    scenes' pose photos uploaded into `run.pose_images`); notes what it chose and why."""
    from pathlib import Path

    from . import story_pose
    from .pipeline.options import PipelineError
    from .pipeline.remote_family import listed_family

    parse_kinds(run.options.guidance)  # a wrong --guidance is an error even without reference mode
    poses = [i for i, scene in enumerate(run.scenes) if getattr(scene, "pose", "")]
    for i in poses:
        if not Path(run.scenes[i].pose).expanduser().is_file():
            raise UsageError(f"scene {i + 1}: its pose image {run.scenes[i].pose} is not a file")
    reference = "reference" in run.options.modes
    family, how, reported = None, "", run.character.base_model
    if run.flow is None and (reference or poses):
        if not reported:
            try:
                reported = listed_family(run.client, "checkpoints", checkpoint) or ""
            except PipelineError:
                reported = ""
        family, how = checkpoint_family(checkpoint, reported)
    offer = Offer(run.info, family, how, identity)
    guidances: list[Guidance | None] = [None]
    if reference and run.flow is not None:
        if set(parse_kinds(run.options.guidance)) - {"auto", "all", "img2img"}:
            raise UsageError(
                f"--guidance {run.options.guidance}: IP-Adapter, FaceID and InstantID models are made for "
                f"SD1.5/SDXL, not this {run.flow.family} base (use img2img)"
            )
        guidances = [Guidance("img2img", reason="image-to-image from frame 1")]
    elif reference:
        guidances = list(choose_guidance(offer, run.options.guidance, run.ipadapter_file))
        run.note(f"checkpoint family for guidance: {how}")
    for guidance in guidances:
        if guidance is not None:
            run.note(f"reference mode ({guidance.kind}): {guidance.reason}")
    if poses:
        story_pose.plan_poses(run, offer, poses)
    return guidances


def guidance_record(guidance: Guidance, denoise: float, weight: float) -> dict[str, Any]:
    """``models.guidance`` of a reference storyboard's metadata.json."""
    return {
        "kind": guidance.kind,
        "reason": guidance.reason,
        "frames": "every frame" if guidance.every_frame else "frames 2+ (frame 1: see reason)",
        "variant": VARIANT_NAMES.get(guidance.variant) if guidance.variant else None,
        "ipadapter": guidance.ipadapter_file or None,
        "clip_vision": guidance.clip_vision or None,
        "controlnet": guidance.controlnet or None,
        "denoise": denoise if guidance.kind == "img2img" else None,
        "weight": weight if guidance.kind != "img2img" else None,
    }


def guidance_note(guidance: Guidance) -> str:
    what = "every frame" if guidance.every_frame else "frames"
    return f"{what} guided by {guidance.reason}; frames 2+ selected by identity to frame 1"
