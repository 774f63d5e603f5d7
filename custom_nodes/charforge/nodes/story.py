"""Storyboard nodes (menu: CharForge/Story): a story told in 6-10 frames with the same character in each.

``Story Scenes`` turns a scene list (or a story sentence, split by an OpenAI-compatible LLM) into one prompt
per frame as a ComfyUI list, so ComfyUI's own CLIPTextEncode / KSampler / VAEDecode run once per frame.
``Storyboard Select`` receives every frame's N candidates at once (INPUT_IS_LIST) and keeps the best of each
by identity and text agreement; ``Storyboard Sheet`` saves the frames, the sheet image and metadata.json.
The logic lives in ``charforge.engine.story`` and ``charforge.engine.score``.

Longer than 600 lines: most of it is the declarations of the stage's 3 nodes, every input documented in
its tooltip.
"""

from __future__ import annotations

import json
import os
import re

from .. import bridge
from ..engine.score import FACE_CHOICES, ImageScore, ScoreSheet, build_identity, score_identity
from ..engine.story import (
    MAX_FRAMES,
    MIN_FRAMES,
    MODES,
    LLMSettings,
    SceneSplitter,
    Storyboard,
    StoryFrame,
    frame_prompt,
    parse_scenes,
    pick_frame,
    storyboard_sheet,
)
from .convert import image_frames, image_to_pil, pil_to_image_batch, show_file, stack_images

CATEGORY = "CharForge/Story"
EXAMPLE_SCENES = """close-up portrait of the character, face clearly visible, looking at the camera, morning light
the character opens an old letter at a kitchen table, medium shot
the character walks through a busy market street, full body, afternoon
the character boards a small boat at the harbour, wide shot, windy
the character stands on the deck at sunset, three-quarter view
the character arrives on an island beach, full body, golden hour"""


def _one(value, default=None):
    """The single value of a widget input of an INPUT_IS_LIST node (ComfyUI passes every input as a list)."""
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


def _torch():
    from ..deps import require

    return require("torch")


# --------------------------------------------------------------------------------------------------


class StoryScenes:
    """Turn a scene list (or a story sentence split by an LLM) into one prompt per storyboard frame."""

    DESCRIPTION = (
        "One prompt per frame, as a list: every node downstream (CLIPTextEncode, KSampler, VAEDecode) runs once per "
        "frame. Scenes are one per line (or JSON/YAML); or leave scenes empty, write a story sentence and give an "
        "OpenAI-compatible endpoint, and the LLM splits the story into 6-10 scenes with frame 1 a clear face. "
        "The trigger words go first in every prompt, the style last; frame i gets seed + i."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "INT", "STRING", "STRING", "INT")
    RETURN_NAMES = ("prompts", "seeds", "captions", "scene_list", "count")
    OUTPUT_IS_LIST = (True, True, True, False, False)
    OUTPUT_TOOLTIPS = (
        "One prompt per frame (a list: what follows runs once per frame). Connect to CLIPTextEncode's text.",
        "One seed per frame (seed + frame index). Connect to KSampler's seed.",
        "One short caption per frame, for the sheet.",
        "The scenes as JSON (prompt and caption per frame).",
        "Number of frames.",
    )
    FUNCTION = "scenes"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "scenes": (
                    "STRING",
                    {
                        "default": EXAMPLE_SCENES,
                        "multiline": True,
                        "tooltip": "One scene per line (or a JSON/YAML list of prompts or of "
                        "{prompt, caption}). Frame 1 should show the face clearly. "
                        "Leave empty to split the story below with an LLM.",
                    },
                ),
                "trigger": (
                    "STRING",
                    {
                        "default": "ohwx person",
                        "tooltip": "The character's trigger words, put first in every prompt "
                        "(skipped where a scene already has them).",
                    },
                ),
                "style": (
                    "STRING",
                    {
                        "default": "cinematic still, detailed, soft light",
                        "tooltip": "Appended to every prompt, e.g. the look of the whole story.",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 42,
                        "min": 0,
                        "max": 0xFFFFFFFF,
                        "tooltip": "Seed of frame 1; frame i uses seed + i - 1.",
                    },
                ),
            },
            "optional": {
                "story": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "A story sentence for the LLM (used only when scenes is empty).",
                    },
                ),
                "llm_base_url": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 "
                        "or http://127.0.0.1:11434/v1 (Ollama).",
                    },
                ),
                "llm_model": (
                    "STRING",
                    {"default": "gpt-4o-mini", "tooltip": "Chat model name at the endpoint."},
                ),
                "api_key_env": (
                    "STRING",
                    {
                        "default": "OPENAI_API_KEY",
                        "tooltip": "Name of the environment variable holding the API key (the "
                        "key itself never goes in a workflow). Local servers need none.",
                    },
                ),
                "frames": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_FRAMES,
                        "tooltip": f"Frames the LLM should make: 0 = it chooses {MIN_FRAMES}-{MAX_FRAMES}.",
                    },
                ),
            },
        }

    def scenes(
        self,
        scenes,
        trigger,
        style,
        seed,
        story="",
        llm_base_url="",
        llm_model="gpt-4o-mini",
        api_key_env="OPENAI_API_KEY",
        frames=0,
    ):
        notes = []
        if scenes.strip():
            found = parse_scenes(scenes)
        elif story.strip():
            if not llm_base_url.strip():
                raise ValueError(
                    "scenes is empty and no LLM endpoint is given: write the scenes (one per line) or "
                    "set llm_base_url to split the story"
                )
            splitter = SceneSplitter(
                LLMSettings(
                    base_url=llm_base_url.strip(), model=llm_model.strip(), api_key_env=api_key_env.strip()
                )
            )
            found = splitter.split(story, frames or None)
            notes.append(f"{len(found)} scenes from {llm_model} at {llm_base_url.strip()}")
            if splitter.malformed:
                notes.append(f"{len(splitter.malformed)} malformed answer(s) were asked again")
        else:
            raise ValueError("write the scenes (one per line), or a story sentence plus an LLM endpoint")
        if not MIN_FRAMES <= len(found) <= MAX_FRAMES:
            notes.append(
                f"note: storyboards usually have {MIN_FRAMES}-{MAX_FRAMES} frames; this one has {len(found)}"
            )
        prompts = [frame_prompt(scene, trigger, style) for scene in found]
        seeds = [int(seed) + i for i in range(len(found))]
        captions = [scene.caption for scene in found]
        listing = json.dumps(
            [
                {"prompt": p, "caption": c, "seed": s}
                for p, c, s in zip(prompts, captions, seeds, strict=True)
            ],
            indent=1,
        )
        report = "\n".join(
            [f"{len(found)} frame(s)", *notes, *(f"{i + 1}. {p}" for i, p in enumerate(prompts))]
        )
        return {"ui": {"text": [report]}, "result": (prompts, seeds, captions, listing, len(found))}


class StoryboardSelect:
    """Keep the best of each frame's N candidates by identity and text agreement."""

    DESCRIPTION = (
        "Gets every frame's candidates at once (the per-frame image batches from VAEDecode, or one batch of "
        "frames x N) and keeps the best candidate of each frame: face identity to the character (ArcFace) "
        "combined with text agreement to the frame's prompt (CLIP, when a CLIP model is connected). In "
        "reference mode, frames after the first are selected by identity to frame 1 (or to the reference "
        "image when connected). Outputs the frames as one batch and the storyboard record (JSON) for the sheet."
    )
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "STRING", "STRING", "CHARFORGE_SCORES")
    RETURN_NAMES = ("frames", "storyboard", "report", "scores")
    OUTPUT_TOOLTIPS = (
        "The kept frame of every scene, in story order, as one batch.",
        "The storyboard record (prompts, seeds, chosen candidates, scores, mode) as JSON: connect to Storyboard "
        "Sheet.",
        "Which candidate each frame kept and why.",
        "Identity scores of the kept frames (to the character).",
    )
    FUNCTION = "select"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": (
                    "IMAGE",
                    {
                        "tooltip": "The candidates: one batch of N per frame (the list from VAEDecode), "
                        "or a single batch of frames x N, frame after frame."
                    },
                ),
                "prompts": (
                    "STRING",
                    {
                        "forceInput": True,
                        "tooltip": "The frames' prompts (the prompts list of Story Scenes).",
                    },
                ),
                "face_models": ("CHARFORGE_FACE_MODELS", {"tooltip": "From Load Face Models."}),
                "identity": (
                    "CHARFORGE_IDENTITY",
                    {"tooltip": "The character's identity (Build/Load Identity)."},
                ),
                "mode": (
                    list(MODES),
                    {
                        "default": "simple",
                        "tooltip": "simple: every frame selected by identity to the character. "
                        "reference: frame 1 by the character, later frames by identity to "
                        "frame 1. base: like simple, recorded as the base-model run of "
                        "the ablation.",
                    },
                ),
                "identity_weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.05,
                        "tooltip": "Weight of identity in the choice.",
                    },
                ),
                "text_weight": (
                    "FLOAT",
                    {
                        "default": 0.5,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.05,
                        "tooltip": "Weight of text agreement (CLIPScore) in the choice; used only "
                        "with clip connected.",
                    },
                ),
                "face_choice": (
                    list(FACE_CHOICES),
                    {"default": "largest", "tooltip": "Which face counts when a candidate has several."},
                ),
            },
            "optional": {
                "seeds": (
                    "INT",
                    {"forceInput": True, "tooltip": "The frames' seeds (Story Scenes), for the record."},
                ),
                "captions": (
                    "STRING",
                    {"forceInput": True, "tooltip": "The frames' captions (Story Scenes)."},
                ),
                "clip": (
                    "CHARFORGE_CLIP",
                    {"tooltip": "Optional: also select by prompt agreement (Load CLIP)."},
                ),
                "reference": (
                    "IMAGE",
                    {
                        "tooltip": "Optional, reference mode: the image later frames must match "
                        "(e.g. frame 1 of an earlier run)."
                    },
                ),
                "first_frame": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 1000,
                        "tooltip": "Story position of the first frame given here (when frames are "
                        "generated one job at a time, as charforge story does).",
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def select(
        self,
        images,
        prompts,
        face_models,
        identity,
        mode,
        identity_weight,
        text_weight,
        face_choice,
        seeds=None,
        captions=None,
        clip=None,
        reference=None,
        first_frame=1,
        node_id=None,
    ):
        torch = _torch()
        analyzer, character = _one(face_models), _one(identity)
        mode, face_choice = _one(mode, "simple"), _one(face_choice, "largest")
        identity_weight, text_weight = float(_one(identity_weight, 1.0)), float(_one(text_weight, 0.5))
        clip, node_id = _one(clip), _one(node_id)
        reference = _one(reference)
        offset = int(_one(first_frame, 1)) - 1
        prompts = [str(p) for p in prompts]
        batches = _frame_batches(list(images), len(prompts))
        seeds = list(seeds or [])
        captions = list(captions or [])
        counts = [int(b.shape[0]) for b in batches]
        total = sum(counts) + (sum(counts[1:] if offset == 0 else counts) if mode == "reference" else 0)
        progress = bridge.control(total, node_id=node_id, label="storyboard select")
        guide, guide_note = None, ""
        if mode == "reference" and reference is not None:
            guide, guide_note = _guide_identity(analyzer, reference[0].cpu().numpy(), "reference image")
        frames, kept, report = [], [], []
        for position, (batch, prompt) in enumerate(zip(batches, prompts, strict=True)):
            index = offset + position
            progress.check()
            labelled = [(f"frame {index + 1} candidate {i}", f) for i, f in enumerate(image_frames(batch))]
            sheet = score_identity(analyzer, character, labelled, None, face_choice, control=progress)
            text = None
            if clip is not None:
                from ..engine.score.clip import clip_sheet

                text = clip_sheet(clip, batch, [prompt])
            guide_sheet = None
            if guide is not None and index > 0:
                guide_sheet = score_identity(analyzer, guide, labelled, None, face_choice, control=progress)
            pick = pick_frame(guide_sheet or sheet, text, identity_weight, text_weight)
            chosen = batch[pick.index]
            kept.append(chosen)
            if mode == "reference" and index == 0 and guide is None:
                guide, guide_note = _guide_identity(analyzer, chosen.cpu().numpy(), "frame 1")
            candidate_scores = [
                {
                    "index": i,
                    "identity": _r(sheet.rows[i].value),
                    "text": _r(text.rows[i].value) if text else None,
                    "guide_identity": _r(guide_sheet.rows[i].value) if guide_sheet else None,
                }
                for i in range(len(sheet))
            ]
            note = "; ".join(
                n
                for n in (
                    pick.note,
                    sheet.rows[pick.index].reason if sheet.rows[pick.index].value is None else "",
                )
                if n
            )
            frames.append(
                StoryFrame(
                    index=index,
                    prompt=prompt,
                    caption=str(captions[position]) if position < len(captions) else "",
                    seed=int(seeds[position]) if position < len(seeds) else None,
                    candidates=len(sheet),
                    chosen=pick.index,
                    identity=sheet.rows[pick.index].value,
                    text=pick.text,
                    combined=pick.combined,
                    guide_identity=guide_sheet.rows[pick.index].value if guide_sheet else None,
                    guidance="",
                    note=note,
                    candidate_scores=candidate_scores,
                )
            )
            report.append(
                f"frame {index + 1}: candidate {pick.index} of {len(sheet)}"
                + (
                    f", identity {frames[-1].identity:.3f}"
                    if frames[-1].identity is not None
                    else ", no face"
                )
                + (f", text {pick.text:.3f}" if pick.text is not None else "")
                + (f" ({note})" if note else "")
            )
        board = Storyboard(
            mode=mode,
            frames=frames,
            models={
                "face_models": getattr(analyzer, "name", ""),
                "identity": f"{character.name} ({character.model})",
                "clip": getattr(clip, "name", None),
            },
            settings={
                "identity_weight": identity_weight,
                "text_weight": text_weight,
                "face_choice": face_choice,
            },
            notes=[guide_note] if guide_note else [],
        )
        stats = board.stats()
        summary = (
            f"{len(frames)} frame(s), {stats['faces']} with a face"
            + (f", mean identity {stats['identity_mean']:.3f}" if stats["identity_mean"] is not None else "")
            + (f", mean text {stats['text_mean']:.3f}" if stats["text_mean"] is not None else "")
        )
        report_text = "\n".join([summary, *board.notes, *report])
        out = stack_images(kept, torch)
        picks = ScoreSheet("identity", [], None, f"{character.name} ({character.model})")
        for i, frame in enumerate(frames):
            picks.rows.append(
                ImageScore(
                    i,
                    frame.identity,
                    frame.identity is not None,
                    "" if frame.identity is not None else "no face found",
                    f"frame {frame.index + 1}",
                )
            )
        return {
            "ui": {"text": [report_text], "storyboard": [board.to_json(indent=None)]},
            "result": (out, board.to_json(), report_text, picks),
        }


def _r(value):
    return None if value is None else round(float(value), 4)


def _guide_identity(analyzer, rgb, name: str):
    """An identity made from one image (frame 1 or the reference); None with a note when it shows no face."""
    fallback = f"{name} shows no face: later frames were selected by the character's identity instead"
    try:
        guide = build_identity(name, analyzer, [(name, rgb)])
    except ValueError:  # no usable face in it
        return None, fallback
    if not guide.references:
        return None, fallback
    return guide, f"frames 2+ selected by identity to {name}"


def _frame_batches(images: list, frames: int) -> list:
    """One candidate batch per frame: the list as given, or one batch cut into `frames` equal groups."""
    if frames < 1:
        raise ValueError("no prompt: connect the prompts list of Story Scenes")
    if len(images) == frames:
        return images
    if len(images) == 1 and int(images[0].shape[0]) % frames == 0:
        size = int(images[0].shape[0]) // frames
        return [images[0][i * size : (i + 1) * size] for i in range(frames)]
    counts = [int(b.shape[0]) for b in images]
    raise ValueError(
        f"{frames} prompt(s) but {len(images)} image batch(es) of {counts} image(s): give one batch of "
        f"candidates per frame, or one batch of frames x N"
    )


class StoryboardSheet:
    """Save the storyboard: frames, a sheet image with captions and scores, and metadata.json."""

    DESCRIPTION = (
        "Writes the frames (frame_01.png, ...), the storyboard sheet (the frames in a grid with their captions "
        "and scores) and metadata.json (prompts, seeds, scores, mode, models) into a new folder under ComfyUI's "
        "output folder, and shows the sheet on the node."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("sheet", "folder", "metadata")
    OUTPUT_TOOLTIPS = (
        "The sheet image.",
        "The folder the storyboard was written to.",
        "metadata.json's content.",
    )
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "The frames in story order (Storyboard Select's frames)."}),
                "storyboard": (
                    "STRING",
                    {
                        "forceInput": True,
                        "tooltip": "The storyboard record (Storyboard Select's storyboard).",
                    },
                ),
                "title": ("STRING", {"default": "", "tooltip": "Title printed on the sheet (optional)."}),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "charforge/storyboard",
                        "tooltip": "Folder prefix under the output folder; a number is added "
                        "(storyboard_00001, ...).",
                    },
                ),
                "columns": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 10,
                        "tooltip": "Frames per row; 0 picks 3-5 by the number of frames.",
                    },
                ),
            },
            "optional": {
                "story": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "The story sentence, recorded in metadata.json.",
                    },
                ),
            },
        }

    def save(self, frames, storyboard, title, filename_prefix, columns, story=""):
        try:
            board = Storyboard.from_dict(json.loads(storyboard))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"storyboard is not a storyboard record from Storyboard Select: {exc}") from None
        count = int(frames.shape[0])
        if count != len(board.frames):
            raise ValueError(
                f"{count} frame image(s) but the storyboard record has {len(board.frames)} frame(s): "
                f"connect Storyboard Select's frames and storyboard outputs together"
            )
        if story.strip():
            board.story = story.strip()
        root = bridge.output_directory()
        folder = _new_folder(root, filename_prefix)
        pictures = [image_to_pil(frames[i]) for i in range(count)]
        shown = []
        for frame, picture in zip(board.frames, pictures, strict=True):
            frame.image = f"frame_{frame.index + 1:02d}.png"
            picture.save(os.path.join(folder, frame.image), compress_level=4)
            shown.append(show_file(os.path.join(folder, frame.image)))
        sheet = storyboard_sheet(
            pictures, board.frames, title or board.story or f"storyboard ({board.label})", columns or None
        )
        sheet.save(os.path.join(folder, "sheet.png"), compress_level=4)
        path = board.write(folder)
        text = f"storyboard of {count} frame(s) ({board.label}) written to {folder}"
        return {
            "ui": {"images": [show_file(os.path.join(folder, "sheet.png")), *shown], "text": [text]},
            "result": (pil_to_image_batch([sheet]), folder, path.read_text(encoding="utf-8")),
        }


def _new_folder(root: str, prefix: str) -> str:
    """A new numbered folder ``<prefix>_NNNNN`` under `root`."""
    prefix = prefix.strip().strip("/\\") or "charforge/storyboard"
    if os.path.isabs(prefix) or ".." in re.split(r"[/\\]", prefix):
        raise ValueError(f"filename_prefix must stay inside the output folder, got {prefix!r}")
    parent, _, stem = prefix.replace("\\", "/").rpartition("/")
    base = os.path.join(root, parent)
    os.makedirs(base, exist_ok=True)
    taken = [
        int(m.group(1))
        for name in os.listdir(base)
        if (m := re.fullmatch(re.escape(stem) + r"_(\d{5})", name))
    ]
    number = max(taken, default=0) + 1
    while True:
        name = f"{stem}_{number:05d}"
        try:
            os.makedirs(os.path.join(base, name))
            break
        except FileExistsError:
            number += 1
    return os.path.join(base, name)


NODE_CLASS_MAPPINGS = {
    "CharForgeStoryScenes": StoryScenes,
    "CharForgeStoryboardSelect": StoryboardSelect,
    "CharForgeStoryboardSheet": StoryboardSheet,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgeStoryScenes": "Story Scenes (CharForge)",
    "CharForgeStoryboardSelect": "Storyboard Select (CharForge)",
    "CharForgeStoryboardSheet": "Storyboard Sheet (CharForge)",
}
