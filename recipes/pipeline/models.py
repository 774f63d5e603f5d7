"""Choosing the pipeline's models: the server's real SD1.5/SDXL checkpoint, tagger and face pack, or the tiny ones."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ...driver.client import ComfyClient
from ...driver.errors import DriverError
from ...driver.sync import call, provision_tiny
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


def checkpoint_arch(server: Server, checkpoint: str) -> str:
    """``sd15`` or ``sdxl`` for a checkpoint the server lists: from its tensor names when the file is local
    (the safetensors header only, no torch; SDXL has a second text encoder, ``conditioner.embedders.1``), else
    from its name (many SDXL fine-tunes have "xl" in it; Pony and others do not, hence the header first)."""
    for folder in _model_dirs(server, "checkpoints"):
        path = folder / checkpoint
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            continue
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                keys = json.loads(f.read(size)) if 0 < size < 200_000_000 else {}
        except (OSError, ValueError):
            continue
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            return "sdxl"
        if any(k.startswith("model.diffusion_model.") for k in keys):
            return "sd15"
    return "sdxl" if re.search(r"xl", checkpoint, re.IGNORECASE) else "sd15"


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
    use_tiny = opts.tiny or not checkpoints
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
    checkpoint = opts.base_model or checkpoints[0]
    if checkpoint not in checkpoints:
        raise PipelineError(
            f"base model {checkpoint!r} is not among the server's checkpoints: {', '.join(checkpoints)}"
        )
    arch = checkpoint_arch(server, checkpoint)
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
