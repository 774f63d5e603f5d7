"""Storyboards headless: ``charforge story`` as a Python API over :class:`~charforge.driver.client.ComfyClient`.

(Over 600 lines on purpose: the guidance detection, the frame graph and :class:`StoryRun` change together, every
mode being a graph variant and a run variant, and the run's frames, files and ablation share its state.)

For every frame the driver submits one API-format graph of ComfyUI's own generation nodes (checkpoint,
character LoRAs, CLIPTextEncode, KSampler with N candidates, VAEDecode) followed by CharForge's Storyboard
Select, which scores the candidates on the server (identity to the character, text agreement with CLIP when
the server has a CLIP folder) and keeps the best; SaveImage writes it and the driver downloads it.

Modes: ``simple`` (every frame with the LoRA, selected by identity to the character), ``reference`` (guided
frames selected by identity to frame 1: InstantID or FaceID with the character's identity on every frame,
IP-Adapter or image-to-image from frame 1 on frames 2+ -- CharForge's own guide nodes, see
:mod:`charforge.recipes.story_guidance`; one reference storyboard per kind with ``--guidance all``) and ``base``
(like simple without the LoRA: the ablation's baseline). The same scenes and seeds are used in every mode; a
scene's pose image drives a pose ControlNet when the server has one. The driver then writes each storyboard's
frames, sheet.png and metadata.json, and the ablation table.

The storyboard record, the sheet and the ablation come from ``charforge.engine.story`` (plain Python; the sheet
needs Pillow).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from charforge.common.characters import GenerationParams, default_size
from charforge.driver.client import ComfyClient
from charforge.driver.errors import DriverError, UsageError
from charforge.driver.workflow.object_info import LORA_TXT2IMG_NODES, input_choices
from charforge.recipes.names import ascii_name

from . import story_guidance, story_pose
from .story_guidance import Guidance
from .story_pose import PoseSupport

SELECT = "CharForgeStoryboardSelect"
GENERATION_NODES = (*LORA_TXT2IMG_NODES, "CharForgeLoadFaceModels", SELECT)
NO_CLIP = "(no CLIP folder found)"
DEFAULT_NEGATIVE = "blurry, low quality, deformed, watermark, text, several people"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GUIDANCE = story_guidance.CHOICES


def _flag_generation() -> GenerationParams:
    """Generation settings of a character given by flags: the preset schema's, sized for an unknown base model."""
    return GenerationParams(width=default_size(""), height=default_size(""))


@dataclass
class Character:
    """What the storyboard needs to know about the character (a preset, or the command-line flags).

    `generation` is the preset schema's (``charforge.common.characters.GenerationParams``): a preset's own
    settings, or for flags its defaults at the size `default_size` gives an unknown base model (512 px).
    """

    name: str
    trigger: str = ""
    prompt: str = ""  # extra positive text for every frame
    negative: str = DEFAULT_NEGATIVE
    # (file name in the server's loras folder, model weight[, clip weight])
    loras: list[tuple] = field(default_factory=list)
    reference: str | None = None  # a local folder of photos, or the name of an identity saved on the server
    reference_photos: str = ""  # photos to fall back on when the server does not have the identity
    threshold: float | None = None
    checkpoint: str | None = None
    generation: GenerationParams = field(default_factory=_flag_generation)
    display_name: str = ""
    base_model: str = ""  # the preset's family id (flux-dev, sd35-large, ...); "" = ask the server

    def to_dict(self) -> dict[str, Any]:
        """The record in metadata.json: the generation settings flat beside the rest (the seed is the run's)."""
        gen = self.generation
        return {
            "name": self.name,
            "trigger": self.trigger,
            "prompt": self.prompt,
            "negative": self.negative,
            "loras": [_lora_dict(lora) for lora in self.loras],
            "reference": self.reference,
            "reference_photos": self.reference_photos,
            "threshold": self.threshold,
            "checkpoint": self.checkpoint,
            **_generation_record(gen),
            "display_name": self.display_name,
        }


def _generation_record(gen: GenerationParams) -> dict[str, Any]:
    """The generation settings as a storyboard records them (the character's and the run's metadata)."""
    return {
        "steps": gen.steps,
        "cfg": gen.cfg,
        "width": gen.width,
        "height": gen.height,
        "sampler": gen.sampler,
        "scheduler": gen.scheduler,
    }


def _lora_dict(lora: tuple) -> dict[str, Any]:
    data = {"name": lora[0], "weight": lora[1]}
    if len(lora) > 2 and lora[2] != lora[1]:
        data["clip_weight"] = lora[2]
    return data


def character_from_preset(name: str) -> Character:
    """The character preset `name` (``charforge.engine.library.characters.load_character``) as a `Character`.

    The identity reference is the preset's saved identity (a name the server's Load Identity lists), else its
    reference photos folder (uploaded to the server).
    """
    try:
        from charforge.engine.library.characters import load_character
    except ImportError:
        raise UsageError(
            f"character presets are not available in this installation, so --character {name!r} "
            f"cannot be looked up: give --lora FILE --trigger WORDS --reference DIR instead"
        ) from None
    try:
        preset = load_character(name)
    except (OSError, ValueError) as exc:  # CharacterError is a ValueError naming the file and field
        raise UsageError(f"character {name!r}: {exc}") from None
    identity = (preset.identity or "").strip()
    if identity.lower().endswith(".json"):  # a path: the server knows identities by name
        identity = Path(identity).stem
    photos = (preset.reference_photos or "").strip()
    return Character(
        name=preset.name,
        display_name=preset.display_name or preset.name,
        trigger=", ".join(preset.trigger_words),
        prompt=preset.prompt,
        negative=preset.negative_prompt or DEFAULT_NEGATIVE,
        loras=[(lora.name, lora.weight, lora.strength_clip) for lora in preset.loras],
        reference=identity or photos or None,
        reference_photos=photos,
        threshold=preset.threshold or None,
        generation=replace(preset.generation),
        base_model=preset.base_model,
    )


@dataclass
class StoryOptions:
    modes: tuple[str, ...] = ("simple", "reference", "base")
    candidates: int = 4  # N per frame
    seed: int = 42  # frame i uses seed + i
    style: str = ""
    # reference mode: auto (the strongest the server offers), all, instantid, faceid, ipadapter, img2img, or a
    # comma list of kinds (one reference storyboard each)
    guidance: str = "auto"
    denoise: float = 0.55  # img2img strength for frames 2+ in reference mode
    ipadapter_weight: float = 0.7
    identity_weight: float = 1.0
    text_weight: float = 0.5
    face_pack: str = "buffalo_l"
    clip_model: str | None = None  # None: the first CLIP folder the server lists; "none": no text agreement
    timeout: float | None = None  # per job
    # retries (story_retry): regenerate a frame below threshold with new seeds, up to `retries` more times
    # (simple and reference modes; the base-model ablation run is rendered once)
    retries: int = 2
    min_text: float | None = 0.70  # CLIPScore (2.5 x CLIP cosine) a frame must reach (when CLIP is measured)
    # identity a frame must reach; None: the character's threshold, else story_retry.SAME_PERSON
    min_identity: float | None = None


@dataclass(frozen=True)
class _FrameJob:
    """One frame to render: what :meth:`StoryRun._frame` retries and :meth:`StoryRun._render` queues."""

    mode: str
    index: int
    prompt: str
    checkpoint: str
    identity: dict[str, Any]
    clip: str | None
    guidance: Guidance | None
    guide_image: str | None
    folder: Path
    key: str = ""  # the storyboard's name in the run ("reference/faceid"); "" = the mode
    pose_image: str | None = None  # the scene's pose photo in the server's input folder


@dataclass
class StoryResult:
    out_dir: Path
    storyboards: dict[str, Any]  # mode -> charforge.engine.story.Storyboard
    sheets: dict[str, Path]
    metadata: dict[str, Path]
    ablation: tuple[Path, Path]
    summary: Path


# --------------------------------------------------------------------------------------------------
# What the server offers


def detect_guidance(
    info: dict[str, Any],
    wanted: str = "auto",
    ipadapter_file: str | None = None,
    family: str | None = None,
    identity: dict[str, Any] | None = None,
) -> Guidance:
    """The (first) reference-mode guidance the server's /object_info offers for a checkpoint of `family`
    (:func:`charforge.recipes.story_guidance.choose_guidance`)."""
    offer = story_guidance.Offer(info, family, identity=identity)
    return story_guidance.choose_guidance(offer, wanted, ipadapter_file)[0]


# --------------------------------------------------------------------------------------------------
# The graph of one frame


def frame_graph(
    *,
    character: Character,
    checkpoint: str,
    prompt: str,
    seed: int,
    candidates: int,
    mode: str,
    identity: dict[str, Any],
    face_pack: str,
    clip_model: str | None,
    weights: tuple[float, float],
    frame: int,
    save_prefix: str,
    use_loras: bool = True,
    guide_image: str | None = None,
    guidance: Guidance | None = None,
    denoise: float = 0.55,
    ipadapter_weight: float = 0.7,
    info: dict[str, Any] | None = None,
    flow: Any = None,
    pose_image: str | None = None,
    pose: PoseSupport | None = None,
) -> dict[str, Any]:
    """The API-format prompt that generates `candidates` images of one frame and keeps the best.

    `flow` (a :class:`charforge.recipes.story_flow.FlowBase`) builds it for a FLUX.1 / SD3 base instead of an
    SD1.5/SDXL checkpoint.

    `identity` is ``{"name": <saved identity>}`` or ``{"folder": <reference photos in the input folder>}``.
    With `guide_image` (a file in the server's input folder) the frame is guided by it (`guidance`: img2img,
    IP-Adapter) and selected by identity to it; FaceID / InstantID guidance patches the model on every frame.
    With `pose_image` and a `pose` ControlNet the frame follows that pose.
    """
    g: dict[str, Any] = {}
    gen = character.generation

    def add(node_id: str, class_type: str, title: str, **inputs: Any) -> list:
        g[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return [node_id, 0]

    from . import story_flow

    empty_latent = "EmptyLatentImage" if flow is None else "EmptySD3LatentImage"
    if flow is not None:
        model, clip, vae = story_flow.loaders(
            add, flow, checkpoint, character.loras if use_loras else [], gen
        )
    else:
        add("1", "CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=checkpoint)
        model, clip, vae = ["1", 0], ["1", 1], ["1", 2]
    if use_loras and flow is None:
        for i, lora in enumerate(character.loras):
            node = f"2{i}"
            add(
                node,
                "LoraLoader",
                f"Character LoRA {i + 1}",
                model=model,
                clip=clip,
                lora_name=lora[0],
                strength_model=lora[1],
                strength_clip=lora[2] if len(lora) > 2 else lora[1],
            )
            model, clip = [node, 0], [node, 1]
    positive = story_flow.guided(
        add, flow, add("3", "CLIPTextEncode", "Frame prompt", text=prompt, clip=clip), gen
    )
    negative = add("4", "CLIPTextEncode", "Negative prompt", text=character.negative, clip=clip)
    if pose_image is not None and pose is not None and pose.controlnet:
        positive, negative = story_pose.add_pose(add, pose, pose_image, positive, negative, vae)
    denoise_value = 1.0
    image = None if guide_image is None else add("30", "LoadImage", "Guide image", image=guide_image)
    if image is not None and guidance is not None and guidance.kind == "img2img":
        encoded = add("34", "VAEEncode", "Encode frame 1", pixels=image, vae=vae)
        latent = add(
            "5", "RepeatLatentBatch", "N candidates from frame 1", samples=encoded, amount=candidates
        )
        denoise_value = denoise
    elif guidance is not None and guidance.kind == "instantid":
        model, positive, negative = story_guidance.add_instantid(
            add, guidance, model, positive, negative, weight=ipadapter_weight
        )
        latent = add(
            "5", empty_latent, "N candidates", width=gen.width, height=gen.height, batch_size=candidates
        )
    else:
        if guidance is not None and guidance.kind != "img2img":
            model = story_guidance.add_guidance(
                add, guidance, model, image=image, identity=["9", 0], weight=ipadapter_weight
            )
        latent = add(
            "5", empty_latent, "N candidates", width=gen.width, height=gen.height, batch_size=candidates
        )
    sampled = add(
        "6",
        "KSampler",
        "Generate",
        model=model,
        positive=positive,
        negative=negative,
        latent_image=latent,
        seed=seed,
        steps=gen.steps,
        cfg=gen.cfg,
        sampler_name=gen.sampler,
        scheduler=gen.scheduler,
        denoise=denoise_value,
    )
    images = add("7", "VAEDecode", "Decode", samples=sampled, vae=vae)
    faces = add("8", "CharForgeLoadFaceModels", "Face models", pack=face_pack, det_size=640, provider="auto")
    if "name" in identity:
        ident = add("9", "CharForgeLoadIdentity", "Character identity", name=identity["name"])
    else:
        ident = add(
            "9",
            "CharForgeBuildIdentity",
            "Character identity",
            face_models=faces,
            name=identity.get("label", "character"),
            save=False,
            folder=identity["folder"],
        )
    select: dict[str, Any] = dict(
        images=images,
        prompts=prompt,
        seeds=seed,
        face_models=faces,
        identity=ident,
        mode=mode,
        identity_weight=weights[0],
        text_weight=weights[1],
        face_choice="largest",
        first_frame=frame,
    )
    if clip_model:
        select["clip"] = add(
            "10", "CharForgeLoadClip", "CLIP (text agreement)", model=clip_model, device="auto"
        )
    if guide_image is not None:
        select["reference"] = ["30", 0]
    add("11", SELECT, "Keep the best candidate", **select)
    add("12", "SaveImage", "Chosen frame", images=["11", 0], filename_prefix=save_prefix)
    return g


# --------------------------------------------------------------------------------------------------


class StoryRun:
    """One ``charforge story`` run: every mode's storyboard, the sheets, metadata and the ablation."""

    def __init__(
        self,
        client: ComfyClient,
        character: Character,
        scenes: list,
        options: StoryOptions,
        out_dir: str | Path,
        story: str = "",
        note: Callable[[str], None] | None = None,
        ipadapter_file: str | None = None,
    ) -> None:
        self.client, self.character, self.scenes, self.options = client, character, list(scenes), options
        self.out_dir, self.story = Path(out_dir), story
        self.note = note or (lambda text: None)
        self.ipadapter_file = ipadapter_file
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.info: dict[str, Any] = {}
        self.flow: Any = None  # story_flow.FlowBase for a FLUX.1 / SD3 base
        self._journals: dict[Path, Any] = {}  # storyboard folder -> story_retry.AttemptJournal (with retries)
        self.pose: PoseSupport | None = None  # the pose ControlNet, when a scene has a pose image
        self.pose_images: dict[int, str] = {}  # scene index -> its pose photo in the server's input folder

    # ---- checks against the server ------------------------------------------------------------------

    def _check(self) -> tuple[str, str | None]:
        info = self.info
        missing = [n for n in GENERATION_NODES if n not in info]
        if missing:
            pack = any(n.startswith("CharForge") for n in missing)
            raise UsageError(
                f"the server lacks the node(s) {', '.join(missing)}"
                + ("; install the CharForge pack into that ComfyUI (python install.py)" if pack else "")
            )
        from .story_flow import base_models

        checkpoints = base_models(info)  # checkpoints, then diffusion models (FLUX.1)
        checkpoint = self.character.checkpoint
        if checkpoint is None:
            if not checkpoints:
                raise UsageError(
                    "the server has no checkpoint in models/checkpoints; put the base model there"
                )
            checkpoint = checkpoints[0]
            self.note(f"no checkpoint given: using {checkpoint} (set --checkpoint to choose)")
        elif checkpoint not in checkpoints:
            raise UsageError(
                f"checkpoint {checkpoint!r} is not on the server; it has: {', '.join(checkpoints) or 'none'}"
            )
        loras = input_choices(info, "LoraLoader", "lora_name") or []
        for lora in (entry[0] for entry in self.character.loras):
            if lora not in loras:
                raise UsageError(
                    f"LoRA {lora!r} is not in the server's loras folder; it has: {', '.join(loras) or 'none'}"
                )
        clip = self.options.clip_model
        clip_choices = [c for c in (input_choices(info, "CharForgeLoadClip", "model") or []) if c != NO_CLIP]
        if clip is None:
            clip = clip_choices[0] if clip_choices else None
            if clip is None:
                self.note(
                    "no CLIP folder on the server (models/clip_vision/<name>/): frames are selected by identity "
                    "only and text agreement is not measured"
                )
        elif clip.lower() == "none":
            clip = None
        elif clip not in clip_choices:
            raise UsageError(
                f"CLIP model {clip!r} is not on the server; it has: {', '.join(clip_choices) or 'none'}"
            )
        return checkpoint, clip

    def _family(self, checkpoint: str) -> None:
        """A FLUX.1 / SD3 base: its loaders (story_flow); a character given by flags gets the family's settings."""
        from charforge.common.characters import family_generation

        from .story_flow import flow_base

        self.flow = flow_base(self.client, self.info, self.character.base_model, checkpoint)
        if self.flow is not None:
            self.note(f"{checkpoint}: a {self.flow.family} base model")
            if not self.character.base_model:  # no preset settings for this family: its defaults
                self.character.generation = family_generation(self.flow.family)

    def _identity(self) -> dict[str, Any]:
        reference = self.character.reference
        if not reference:
            raise UsageError(
                "the character has no identity reference: give --reference DIR (photos of the character) "
                "or the name of an identity saved on the server"
            )
        path = Path(reference).expanduser()
        if path.is_dir():
            photos = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not photos:
                raise UsageError(f"--reference {path}: no photo ({', '.join(IMAGE_SUFFIXES)}) in that folder")
            folder = f"charforge_story/{ascii_name(self.character.name, 'story')}_refs"
            uploaded = [self.client.upload(photo, subfolder=folder, overwrite=True) for photo in photos]
            self.note(f"uploaded {len(photos)} reference photo(s) to the server's input/{folder}")
            return {
                "folder": folder,
                "label": self.character.name,
                "source": str(path),
                "photo": uploaded[0].reference,  # what IP-Adapter guides frame 1 by
            }
        names = input_choices(self.info, "CharForgeLoadIdentity", "name") or []
        if reference not in names:
            photo_folder = (
                Path(self.character.reference_photos).expanduser()
                if self.character.reference_photos
                else None
            )
            if photo_folder is not None and photo_folder.is_dir() and photo_folder != path:
                self.note(
                    f"identity {reference!r} is not saved on the server: using the photos in {photo_folder}"
                )
                self.character.reference = str(photo_folder)
                return self._identity()
            raise UsageError(
                f"--reference {reference!r} is neither a local folder nor an identity saved on the server "
                f"(saved: {', '.join(n for n in names if not n.startswith('(')) or 'none'})"
            )
        return {"name": reference}

    # ---- running --------------------------------------------------------------------------------------

    def _retrying(self, mode: str) -> bool:
        """Whether frames of `mode` are retried: with --retries above 0, in simple and reference modes (the
        base model without the LoRA is the ablation's control: picking its luckiest seeds would skew it)."""
        return self.options.retries > 0 and mode != "base"

    def _min_identity(self) -> float:
        from .story_retry import SAME_PERSON

        if self.options.min_identity is not None:
            return self.options.min_identity
        return self.character.threshold if self.character.threshold is not None else SAME_PERSON

    def _frame(self, job: _FrameJob) -> Any:
        from .story_retry import RetryPolicy, best_of_attempts

        options = self.options
        policy = RetryPolicy(
            retries=options.retries, min_text=options.min_text, min_identity=self._min_identity()
        )

        def render(seed: int, attempt: int, name: str) -> Any:
            if attempt:
                self.note(
                    f"{job.mode}: frame {job.index + 1} below threshold: attempt {attempt + 1}, seed {seed}"
                )
            return self._render(job, seed, name)

        name = f"frame_{job.index + 1:02d}.png"
        if not self._retrying(job.mode):  # one attempt, no threshold recorded (as before retries)
            return render(options.seed + job.index, 0, name)
        return best_of_attempts(render, options.seed + job.index, policy, job.folder, name)

    def _render(self, job: _FrameJob, seed: int, name: str) -> Any:
        from charforge.engine.story import StoryFrame

        mode, index, prompt, checkpoint = job.mode, job.index, job.prompt, job.checkpoint
        identity, clip, guidance, guide_image, folder = (
            job.identity,
            job.clip,
            job.guidance,
            job.guide_image,
            job.folder,
        )

        graph = frame_graph(
            character=self.character,
            checkpoint=checkpoint,
            prompt=prompt,
            seed=seed,
            candidates=self.options.candidates,
            mode=mode,
            identity=identity,
            face_pack=self.options.face_pack,
            clip_model=clip,
            weights=(self.options.identity_weight, self.options.text_weight),
            frame=index + 1,
            save_prefix=f"charforge_story/{self.run_id}/{job.key or mode}/frame_{index + 1:02d}",
            use_loras=mode != "base",
            guide_image=guide_image,
            guidance=guidance,
            denoise=self.options.denoise,
            ipadapter_weight=self.options.ipadapter_weight,
            info=self.info,
            flow=self.flow,
            pose_image=job.pose_image,
            pose=self.pose,
        )
        journal = None
        if self._retrying(mode):  # resumable: an attempt rendered by an earlier run is not queued again
            from .story_retry import AttemptJournal

            journal = self._journals.setdefault(folder, AttemptJournal(folder))
            key = AttemptJournal.key(graph, self.run_id)
            hit = journal.get(key)
            if hit is not None:
                import shutil

                self.note(f"{mode}: frame {index + 1}, seed {seed}: recorded by an earlier run, not queued")
                shutil.copyfile(hit[1], folder / name)
                return replace(StoryFrame.from_dict(hit[0]), image=name)
        result = self.client.run(graph, timeout=self.options.timeout)
        record = (result.outputs.get("11") or {}).get("storyboard") or []
        if not record:
            raise DriverError(f"{mode} frame {index + 1}: Storyboard Select reported no storyboard record")
        data = json.loads(record[0])
        frame = StoryFrame.from_dict(data["frames"][0])
        extra = [
            n for n in data.get("notes") or [] if "no face" in n
        ]  # e.g. frame 1 could not guide selection
        frame.note = "; ".join(n for n in [frame.note, *extra] if n)
        files = [f for f in result.files if f.node_id == "12"]
        if not files:
            raise DriverError(f"{mode} frame {index + 1}: SaveImage wrote no file")
        downloaded = self.client.download(files[0], folder / ".download")
        target = folder / name
        os.replace(downloaded.path, target)
        frame.index, frame.seed, frame.image = index, seed, target.name
        frame.caption = self.scenes[index].caption
        if guidance is not None and (guide_image is not None or guidance.every_frame):
            frame.guidance = guidance.kind
        if job.pose_image is not None and self.pose is not None and self.pose.controlnet:
            frame.pose = Path(self.scenes[index].pose).name
        if journal is not None:
            journal.put(key, frame.to_dict(), target)
        return frame

    def _storyboard(
        self,
        mode: str,
        checkpoint: str,
        identity: dict[str, Any],
        clip: str | None,
        guidance: Guidance | None,
        key: str = "",
    ) -> Any:
        from charforge.engine.story import Storyboard, frame_prompt

        key = key or mode
        folder = self.out_dir / key
        folder.mkdir(parents=True, exist_ok=True)
        frames, guide_image = [], None
        if mode == "reference" and guidance is not None and guidance.kind == "ipadapter":
            guide_image = identity.get("photo")  # frame 1 guided by the reference photo, when there is one
        style = ", ".join(t for t in (self.character.prompt, self.options.style) if t.strip())
        for index, scene in enumerate(self.scenes):
            prompt = frame_prompt(scene, self.character.trigger, style)
            self.note(f"{mode}: frame {index + 1}/{len(self.scenes)}: {prompt[:90]}")
            frame = self._frame(
                _FrameJob(
                    mode,
                    index,
                    prompt,
                    checkpoint,
                    identity,
                    clip,
                    guidance if mode == "reference" else None,
                    guide_image,
                    folder,
                    key,
                    self.pose_images.get(index),
                )
            )
            frames.append(frame)
            if mode == "reference" and index == 0:
                uploaded = self.client.upload(
                    folder / frame.image,
                    filename=f"{self.run_id}_{key.replace('/', '_')}_frame_01.png",
                    subfolder="charforge_story",
                    overwrite=True,
                )
                guide_image = uploaded.reference
        if (folder / ".download").exists():
            _remove_tree(folder / ".download")
        models: dict[str, Any] = {
            "checkpoint": checkpoint,
            "loras": [] if mode == "base" else [_lora_dict(lora) for lora in self.character.loras],
            "face_models": self.options.face_pack,
            "clip": clip,
        }
        if self.flow is not None:
            models.update(
                family=self.flow.family, text_encoders=self.flow.files.text_encoders, vae=self.flow.files.vae
            )
        if mode == "reference" and guidance is not None:
            models["guidance"] = story_guidance.guidance_record(
                guidance, self.options.denoise, self.options.ipadapter_weight
            )
        if self.pose is not None and self.pose.controlnet and self.pose_images:
            models["pose"] = self.pose.record()
        gen = self.character.generation
        settings = {
            "candidates": self.options.candidates,
            "seed": self.options.seed,
            **_generation_record(gen),
            "identity_weight": self.options.identity_weight,
            "text_weight": self.options.text_weight,
            "server": self.client.url,
        }
        if self._retrying(mode):
            settings["retries"] = {
                "retries": self.options.retries,
                "min_text": self.options.min_text,
                "text_scale": "CLIPScore = 2.5 x max(CLIP cosine, 0)",
                "min_identity": self._min_identity(),
            }
        notes = []
        failed = [f.index + 1 for f in frames if f.passed is False]
        if failed:
            notes.append(
                f"frame(s) {', '.join(map(str, failed))} never passed the thresholds (marked on the sheet)"
            )
        if mode == "reference" and guidance is not None:
            notes.append(story_guidance.guidance_note(guidance))
        notes += story_pose.pose_notes(self.scenes, self.pose, self.pose_images)
        return Storyboard(
            mode=mode,
            frames=frames,
            story=self.story,
            character=self.character.to_dict(),
            models=models,
            settings=settings,
            notes=notes,
            guidance=guidance.kind if mode == "reference" and guidance is not None else "",
            name=key if key != mode else "",
        )

    def run(self) -> StoryResult:
        from charforge.engine.story import ablation_rows, storyboard_sheet, write_ablation

        try:
            import PIL  # noqa: F401 - the sheet needs Pillow; say so before anything runs

            from charforge.engine.images import open_image
        except ImportError:
            raise UsageError(
                "charforge story draws the storyboard sheet with Pillow: pip install Pillow"
            ) from None
        unknown = [m for m in self.options.modes if m not in ("simple", "reference", "base")]
        if unknown or not self.options.modes:
            raise UsageError(f"unknown mode(s) {unknown}: use simple, reference and/or base")
        if self.options.candidates < 1:
            raise UsageError("--candidates must be at least 1")
        if self.options.retries < 0:
            raise UsageError("--retries must be 0 or more")
        try:
            from .story_retry import RetryPolicy

            RetryPolicy(self.options.retries, self.options.min_text, self.options.min_identity)
        except ValueError as exc:
            raise UsageError(f"--min-text / --min-identity: {exc}") from None
        self.info = self.client.object_info()
        checkpoint, clip = self._check()
        self._family(checkpoint)
        identity = self._identity()
        guidances = story_guidance.plan(self, checkpoint, identity)  # reference mode's kinds; poses
        self.out_dir.mkdir(parents=True, exist_ok=True)
        boards, sheets, metadata = {}, {}, {}
        runs = [
            (mode, guidance, f"reference/{guidance.kind}" if guidance and len(guidances) > 1 else mode)
            for mode in self.options.modes
            for guidance in (guidances if mode == "reference" else [None])
        ]
        for mode, guidance, key in runs:
            board = self._storyboard(mode, checkpoint, identity, clip, guidance, key)
            folder = self.out_dir / key
            pictures = []
            for frame in board.frames:
                with open_image(folder / frame.image) as picture:
                    pictures.append(picture.convert("RGB"))
            title = f"{self.character.display_name or self.character.name}: {self.story or 'storyboard'} - {board.label}"
            sheet = storyboard_sheet(pictures, board.frames, title[:160])
            sheets[key] = folder / "sheet.png"
            sheet.save(sheets[key])
            metadata[key] = board.write(folder)
            boards[key] = board
            stats = board.stats()
            self.note(
                f"{key}: {stats['frames']} frame(s), {stats['faces']} with a face, mean identity "
                f"{stats['identity_mean']}, mean text agreement {stats['text_mean']}"
            )
            for text in board.notes:
                if "never passed" in text:
                    self.note(f"{key}: {text}")
        ablation = write_ablation(ablation_rows(list(boards.values())), self.out_dir)
        summary = self.out_dir / "metadata.json"
        summary.write_text(
            json.dumps(
                {
                    "format": "charforge.story",
                    "story": self.story,
                    "character": self.character.to_dict(),
                    "scenes": [s.to_dict() for s in self.scenes],
                    "modes": list(boards),
                    "storyboards": {m: str(p.relative_to(self.out_dir)) for m, p in metadata.items()},
                    "sheets": {m: str(p.relative_to(self.out_dir)) for m, p in sheets.items()},
                    "ablation": {"markdown": ablation[0].name, "json": ablation[1].name},
                    "server": self.client.url,
                    "run_id": self.run_id,
                },
                indent=1,
                ensure_ascii=False,
            )
            + "\n",
            encoding="utf-8",
        )
        return StoryResult(self.out_dir, boards, sheets, metadata, ablation, summary)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
