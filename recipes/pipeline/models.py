"""Choosing the pipeline's models: the server's real base model (SD1.5, SDXL, Flux.1, SD3/SD3.5: the family read
from its tensors, :mod:`.families`) with what that family needs beside it, tagger and face pack, or the tiny ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...driver.client import ComfyClient
from ...driver.errors import DriverError
from ...driver.sync import call, provision_tiny
from .families import (
    DIFFUSION_MODEL_LABEL,
    FAMILY_NAMES,
    choose_family_files,
    family_from_name,
    family_from_shapes,
    group,
    header_shapes,
)
from .options import Models, PipelineError, PipelineOptions, Say, Server
from .server import _choices

# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------


def _model_dirs(server: Server, kind: str) -> list[Path]:
    dirs = []
    if server.base_dir is not None:
        dirs.append(server.base_dir / "models" / kind)
    if server.comfy_dir is not None:
        dirs.append(server.comfy_dir / "models" / kind)
    return [d for d in dirs if d.is_dir()]


def _has_tagger(server: Server) -> bool:
    return any(
        any(f.with_suffix(".csv").is_file() for f in d.glob("*.onnx"))
        for d in _model_dirs(server, "wd14_tagger")
    )


def _has_face_pack(server: Server) -> bool:
    return any((d / "models" / "buffalo_l").is_dir() for d in _model_dirs(server, "insightface"))


def _local_shapes(server: Server, kind: str, name: str) -> dict[str, tuple[int, ...]] | None:
    """The tensor shapes of the model file `name` of folder `kind` when it is on this machine."""
    folders = {"diffusion_models": ("diffusion_models", "unet"), "text_encoders": ("text_encoders", "clip")}
    for folder_name in folders.get(kind, (kind,)):
        for folder in _model_dirs(server, folder_name):
            shapes = header_shapes(folder / name)
            if shapes is not None:
                return shapes
    return None


def checkpoint_arch(server: Server, checkpoint: str, kind: str = "checkpoints") -> str:
    """The family id (``sd15``, ``sdxl``, ``flux-dev``, ``flux-schnell``, ``sd3-medium``, ``sd35-medium``,
    ``sd35-large``) of a base model the server lists: from its tensor names when the file is local (the
    safetensors header only; SDXL has a second text encoder, ``conditioner.embedders.1``), else from its name,
    SD1.5 or SDXL only (many SDXL fine-tunes have "xl" in it; Pony and others do not, hence the header first).
    Raises :class:`PipelineError` for a local file of another architecture."""
    shapes = _local_shapes(server, kind, checkpoint)
    if shapes is not None:
        return family_from_shapes(shapes, checkpoint)
    return family_from_name(checkpoint)


def _tiny_listed(info: dict[str, Any], part: str) -> bool:
    """Whether the server's choices already hold the tiny model `part` (engine/tiny.py names)."""
    from charforge.engine import tiny

    where = {
        "sd15": ("CheckpointLoaderSimple", "ckpt_name", tiny.CHECKPOINT),
        "motion": ("CharForgeLoadVideoModel", "motion_module", tiny.MOTION_MODULE),
        "clip": ("CharForgeLoadClip", "model", tiny.CLIP_FOLDER),
    }.get(part)
    return where is not None and where[2] in _choices(info, where[0], where[1])


def choose_models(client: ComfyClient, server: Server, opts: PipelineOptions, say: Say) -> Models:
    """Real models where the server has them; tiny ones (written into our base directory) where it has none."""
    from charforge.engine import tiny

    info = client.object_info(refresh=True)
    checkpoints = [
        c for c in _choices(info, "CheckpointLoaderSimple", "ckpt_name") if not c.startswith(tiny.TINY_PREFIX)
    ]
    # Flux is published as a diffusion model alone (models/diffusion_models, UNETLoader's list).
    diffusion_models = _choices(info, "UNETLoader", "unet_name")
    use_tiny = opts.tiny or not (checkpoints or diffusion_models)
    need: list[str] = []
    notes: list[str] = []
    if use_tiny:
        need += ["sd15", "motion"]
    # A server we did not start says itself what is missing (its Caption node), except in the demo: the tiny
    # tagger is written there with the other tiny models.
    local_without_tagger = server.base_dir is not None and not _has_tagger(server)
    if local_without_tagger or (server.base_dir is None and use_tiny):
        need.append("tagger")
    clips = [c for c in _choices(info, "CharForgeLoadClip", "model") if not c.startswith(tiny.TINY_PREFIX)]
    if not clips:
        need.append("clip")
    if need and server.base_dir is None:  # a server reached over HTTP: it writes the tiny models itself
        missing = [part for part in need if not _tiny_listed(info, part)]
        if missing:
            say(f"writing tiny random models ({', '.join(missing)}) on {server.url} - a minute or two")
            try:
                call(client, provision_tiny, missing)
            except DriverError as exc:
                raise PipelineError(
                    f"the server {server.url} lacks {', '.join(missing)} models and could not write "
                    f"the tiny ones ({exc}): install them, or update CharForge on it"
                ) from None
            info = client.object_info(refresh=True)
    elif need and server.base_dir is not None:
        fresh = [part for part in need if part not in tiny.written_parts(server.base_dir / "models")]
        if fresh:
            say(
                "writing tiny random models ("
                + ", ".join(fresh)
                + ") into "
                + str(server.base_dir / "models")
                + " - a minute or two"
            )
        tiny.write_tiny_models(server.base_dir / "models", parts=need, say=say)
        info = client.object_info(refresh=True)
    if "tagger" in need and not use_tiny:
        notes.append("captions come from a tiny random tagger (no WD14 tagger in models/wd14_tagger)")
    if "clip" in need and not use_tiny:
        notes.append("CLIP scores come from a tiny random CLIP (no CLIP folder in models/clip_vision)")
    tagger = tiny.TAGGER if "tagger" in need else ""
    clip = tiny.CLIP_FOLDER if "clip" in need else clips[0]
    if use_tiny:
        return Models(
            True,
            tiny.CHECKPOINT,
            f"[diffusers] {tiny.DIFFUSERS}",
            "sd15",
            tagger,
            clip,
            tiny.MOTION_MODULE,
            faces=False,
            notes=notes,
        )
    checkpoint = opts.base_model or (checkpoints or diffusion_models)[0]
    if checkpoint in checkpoints:
        kind = "checkpoints"
    elif checkpoint in diffusion_models:
        kind = "diffusion_models"
    else:
        raise PipelineError(
            f"base model {checkpoint!r} is not among the server's checkpoints ({', '.join(checkpoints) or 'none'}) "
            f"or diffusion models ({', '.join(diffusion_models) or 'none'})"
        )
    arch = base_model_family(client, server, checkpoint, kind, notes)
    if group(arch) != "sd":
        return _flow_models(info, server, opts, checkpoint, kind, arch, tagger, clip, notes)
    if kind != "checkpoints":
        raise PipelineError(
            f"{checkpoint!r} in models/diffusion_models is an {FAMILY_NAMES[arch]} model: the pipeline loads "
            "SD1.5/SDXL from a full checkpoint in models/checkpoints"
        )
    motions = [
        m
        for m in _choices(info, "CharForgeLoadVideoModel", "motion_module")
        if not m.startswith(tiny.TINY_PREFIX) and ("xl" in m.lower()) == (arch == "sdxl")
    ]
    if not motions:
        notes.append(
            "no AnimateDiff motion module for this base model in models/animatediff_models: the video "
            "stage is skipped"
        )
    faces = opts.face_check and _has_face_pack(server)
    if opts.face_check and not faces:
        notes.append(
            "no InsightFace pack (models/insightface/models/buffalo_l): images are picked by CLIP score, "
            "not by identity, and the video has no identity-drift check"
        )
    return Models(
        False, checkpoint, checkpoint, arch, tagger, clip, motions[0] if motions else None, faces, notes
    )


def base_model_family(client: ComfyClient, server: Server, name: str, kind: str, notes: list[str]) -> str:
    """The family of the base model `name` (folder `kind`): from the file's tensors here, else from the server's
    own reading of them (the transfer routes' model listing), else (an older CharForge there) from the name."""
    if _local_shapes(server, kind, name) is not None:
        return checkpoint_arch(server, name, kind)
    from .remote_family import listed_family

    family = listed_family(client, kind, name)
    if family is not None:
        return family
    notes.append(
        f"the family of {name} was guessed from its name (the server's CharForge does not report model "
        "families): update CharForge there so it is read from the file's tensors"
    )
    return family_from_name(name)


def _flow_models(
    info: dict[str, Any],
    server: Server,
    opts: PipelineOptions,
    name: str,
    kind: str,
    family: str,
    tagger: str,
    clip: str,
    notes: list[str],
) -> Models:
    """Models for a Flux / SD3 base: the text encoders and VAE beside it; no AnimateDiff video."""
    shapes = _local_shapes(server, kind, name)
    if group(family) == "sd3" and kind != "checkpoints":
        raise PipelineError(
            f"{name!r} is an {FAMILY_NAMES[family]} diffusion model without its VAE: put the full checkpoint "
            "(sd3.5_large.safetensors as published, with its VAE) into models/checkpoints"
        )
    files = choose_family_files(
        family,
        _choices(info, "DualCLIPLoader", "clip_name1"),
        _choices(info, "VAELoader", "vae_name"),
        lambda folder, file: _local_shapes(server, folder, file),
        base_has_vae=shapes is None or any(k.startswith("first_stage_model.") for k in shapes),
    )
    faces = opts.face_check and _has_face_pack(server)
    if opts.face_check and not faces:
        notes.append(
            "no InsightFace pack (models/insightface/models/buffalo_l): images are picked by CLIP score, "
            "not by identity"
        )
    notes.append(
        f"{FAMILY_NAMES[family]} base: no video stage (AnimateDiff motion modules are made for SD1.5/SDXL)"
    )
    return Models(
        False,
        name,
        DIFFUSION_MODEL_LABEL + name if kind == "diffusion_models" else name,
        family,
        tagger,
        clip,
        None,
        faces,
        notes,
        base_folder=kind,
        text_encoders=files.text_encoders,
        vae=files.vae,
    )
