"""Storyboards on FLUX.1 and SD3/SD3.5 bases: the loaders and sampling nodes of a frame graph for these families.

``charforge story`` builds one graph per frame (:func:`charforge.recipes.story.frame_graph`). For an SD1.5/SDXL
base that is CheckpointLoaderSimple + LoraLoader; for the transformer families the base model, text encoders
and VAE load separately (as in the shipped ``flux_storyboard`` / ``sd35_storyboard`` workflows), the character
LoRAs go on the diffusion model only (LoraLoaderModelOnly), the family's sampling node shifts the schedule
(ModelSamplingFlux at the image size, ModelSamplingSD3), Flux's guidance is a conditioning input (FluxGuidance,
sampled at cfg 1.0) and the latent has 16 channels (EmptySD3LatentImage). The sampling settings are the
character's generation settings (``family_generation`` for a character given by flags).

The family comes from the character preset's ``base_model``, else from the server, which reads it from the
base model's tensors (the transfer routes' model listing, as for ``charforge pipeline``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from charforge.common.characters import GenerationParams
from charforge.driver.client import ComfyClient
from charforge.driver.errors import UsageError
from charforge.driver.workflow.object_info import input_choices

from .pipeline.families import FAMILY_NAMES, FamilyFiles, choose_family_files, group
from .pipeline.options import PipelineError
from .pipeline.remote_family import listed_family

FLOW_NODES = {
    "flux": ("UNETLoader", "DualCLIPLoader", "VAELoader", "ModelSamplingFlux", "FluxGuidance"),
    "sd3": ("CheckpointLoaderSimple", "TripleCLIPLoader", "ModelSamplingSD3"),
}
COMMON_NODES = ("LoraLoaderModelOnly", "CLIPTextEncode", "EmptySD3LatentImage", "KSampler", "VAEDecode")


@dataclass
class FlowBase:
    """A Flux / SD3 base model on the server and the files its graph loads beside it."""

    family: str
    base_folder: str  # checkpoints or diffusion_models
    files: FamilyFiles

    @property
    def kind(self) -> str:
        return group(self.family)


def base_models(info: dict[str, Any]) -> list[str]:
    """The server's base models: its checkpoints, then its diffusion models (FLUX.1 as published)."""
    checkpoints = input_choices(info, "CheckpointLoaderSimple", "ckpt_name") or []
    return checkpoints + [
        m for m in input_choices(info, "UNETLoader", "unet_name") or [] if m not in checkpoints
    ]


def flow_base(client: ComfyClient, info: dict[str, Any], base_model: str, checkpoint: str) -> FlowBase | None:
    """The Flux / SD3 base of a storyboard, or None for SD1.5/SDXL (and a base whose family the server cannot
    say: the storyboard's SD graph, as before families existed). `base_model` is the preset's family id."""
    checkpoints = input_choices(info, "CheckpointLoaderSimple", "ckpt_name") or []
    folder = "checkpoints" if checkpoint in checkpoints else "diffusion_models"
    family = base_model
    if not family:
        try:
            family = listed_family(client, folder, checkpoint) or ""
        except PipelineError as exc:
            raise UsageError(str(exc)) from None
    if group(family) == "sd":
        return None
    missing = [n for n in (*FLOW_NODES[group(family)], *COMMON_NODES) if n not in info]
    if missing:
        raise UsageError(
            f"a {FAMILY_NAMES[family]} storyboard needs ComfyUI's {', '.join(missing)}, which the server lacks"
        )
    if group(family) == "sd3" and folder != "checkpoints":
        raise UsageError(
            f"{checkpoint!r} is an {FAMILY_NAMES[family]} diffusion model without its VAE: use the full checkpoint "
            "from models/checkpoints"
        )
    try:
        files = choose_family_files(
            family,
            input_choices(info, "DualCLIPLoader", "clip_name1") or [],
            input_choices(info, "VAELoader", "vae_name") or [],
        )
    except PipelineError as exc:
        raise UsageError(str(exc)) from None
    return FlowBase(family, folder, files)


def loaders(
    add: Callable[..., list],
    base: FlowBase,
    checkpoint: str,
    loras: list[tuple],
    gen: GenerationParams,
) -> tuple[list, list, list]:
    """Add the base model, text encoders, VAE, the character LoRAs (model only) and the sampling node; returns
    (model, clip, vae) sockets."""
    if base.base_folder == "checkpoints":
        add("1", "CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=checkpoint)
    else:
        add("1", "UNETLoader", "Load Diffusion Model", unet_name=checkpoint, weight_dtype="default")
    model: list = ["1", 0]
    if base.kind == "flux":
        clip = add(
            "1b", "DualCLIPLoader", "Text encoders", type="flux", device="default", **base.files.text_encoders
        )
        vae = add("1c", "VAELoader", "Load VAE", vae_name=base.files.vae)
    else:
        clip = add("1b", "TripleCLIPLoader", "Text encoders", **base.files.text_encoders)
        vae = ["1", 2]
    for i, lora in enumerate(loras):
        model = add(
            f"2{i}",
            "LoraLoaderModelOnly",
            f"Character LoRA {i + 1}",
            model=model,
            lora_name=lora[0],
            strength_model=lora[1],
        )
    if base.kind == "flux":
        model = add(
            "2s",
            "ModelSamplingFlux",
            "Sampling shift (image size)",
            model=model,
            max_shift=1.15,
            base_shift=0.5,
            width=gen.width,
            height=gen.height,
        )
    else:
        model = add("2s", "ModelSamplingSD3", "Sampling shift", model=model, shift=gen.shift)
    return model, clip, vae


def guided(add: Callable[..., list], base: FlowBase | None, positive: list, gen: GenerationParams) -> list:
    """Flux's guidance as a conditioning input (FluxGuidance); other families' positive unchanged."""
    if base is None or base.kind != "flux":
        return positive
    return add("3g", "FluxGuidance", "Flux guidance", conditioning=positive, guidance=gen.guidance)
