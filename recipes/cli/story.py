"""``charforge story``: a storyboard of the character, headless through the driver (see recipes/story.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from charforge.driver.errors import UsageError

MODES = {"simple": ("simple",), "reference": ("reference",), "both": ("simple", "reference")}

EPILOG = """\
scenes: --scenes FILE (one per line, or JSON/YAML), else the story is split by an OpenAI-compatible LLM:
  --llm-url (default $CHARFORGE_LLM_URL, else https://api.openai.com/v1), --llm-model (default
  $CHARFORGE_LLM_MODEL, else gpt-4o-mini), API key from the variable --llm-key-env names (OPENAI_API_KEY).
output (--out DIR): <mode>/frame_NN.png, <mode>/sheet.png, <mode>/metadata.json for each mode run, then
  ablation.md / ablation.json (simple vs reference-guided vs base model without LoRA) and metadata.json;
  with several --guidance kinds each reference storyboard is in reference/<kind>/ with its own ablation row.
"""


def _lora(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` -> (file name in the server's loras folder, weight)."""
    name, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and _is_number(tail):
        name, weight = head, float(tail)
    if not name.strip():
        raise argparse.ArgumentTypeError(f"--lora {text!r}: use FILE or FILE:WEIGHT")
    return os.path.basename(name.strip()), weight


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def register(sub, *, server, output) -> None:
    story = sub.add_parser(
        "story",
        parents=[server],
        help="tell a story in 6-10 frames with the same character",
        description="Generate a storyboard of the character through ComfyUI: simple mode (character LoRA, best of "
        "N by identity and text agreement), reference-guided mode (frame 1 guides the rest), and the "
        "base model without LoRA for the ablation table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    story.add_argument(
        "story",
        nargs="?",
        default="",
        help="the story in a sentence (split into scenes by the LLM unless --scenes is given)",
    )
    story.add_argument(
        "--character",
        metavar="NAME",
        help="a character preset (LoRAs, trigger words, identity reference, generation settings)",
    )
    story.add_argument(
        "--scenes", type=Path, metavar="FILE", help="your scene list: one per line, JSON or YAML"
    )
    story.add_argument(
        "--mode", choices=sorted(MODES), default="both", help="which storyboards (default: both)"
    )
    story.add_argument(
        "--no-base",
        action="store_true",
        help="skip the base-model-without-LoRA run (the ablation then compares the modes run)",
    )
    story.add_argument(
        "--candidates", type=int, default=4, metavar="N", help="candidates per frame (default 4)"
    )
    story.add_argument("--frames", type=int, metavar="N", help="scenes the LLM should make (6-10)")
    story.add_argument("--seed", type=int, default=42, help="seed of frame 1; frame i uses seed + i - 1")
    story.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the storyboards go")
    story.add_argument("--timeout", type=float, metavar="S", help="limit per frame job")
    story.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="regenerate a frame below threshold with new seeds up to N more times, so at most N + 1 "
        "attempts (default 2; 0: off; the base-model run is never retried)",
    )
    story.add_argument(
        "--min-text",
        type=float,
        default=0.70,
        metavar="X",
        help="text agreement a frame must reach as CLIPScore, 2.5 x CLIP cosine (default 0.70, a cosine of 0.28)",
    )
    story.add_argument(
        "--min-identity",
        type=float,
        metavar="X",
        help="identity a frame must reach (default: the character's threshold, else 0.32, ArcFace's same person)",
    )
    char = story.add_argument_group("character (instead of, or on top of, --character)")
    char.add_argument(
        "--lora",
        action="append",
        default=[],
        type=_lora,
        metavar="FILE[:WEIGHT]",
        help="a LoRA in the server's loras folder (repeatable)",
    )
    char.add_argument("--trigger", metavar="WORDS", help="trigger words put first in every prompt")
    char.add_argument(
        "--reference",
        metavar="DIR|IDENTITY",
        help="a local folder of photos of the character, or an identity saved on the server",
    )
    char.add_argument(
        "--checkpoint",
        metavar="NAME",
        help="base checkpoint on the server (default: the preset's, else the first one listed)",
    )
    char.add_argument("--negative", metavar="TEXT", help="negative prompt")
    char.add_argument("--style", default="", metavar="TEXT", help="appended to every prompt")
    char.add_argument("--steps", type=int)
    char.add_argument("--cfg", type=float)
    char.add_argument("--width", type=int)
    char.add_argument("--height", type=int)
    char.add_argument("--sampler")
    char.add_argument("--scheduler")
    pick = story.add_argument_group("selection and guidance")
    pick.add_argument("--identity-weight", type=float, default=1.0)
    pick.add_argument("--text-weight", type=float, default=0.5)
    pick.add_argument(
        "--clip",
        metavar="NAME",
        help="CLIP folder on the server for text agreement ('none' to skip; default: the first one listed)",
    )
    pick.add_argument(
        "--face-pack", default="buffalo_l", help="InsightFace pack on the server (default buffalo_l)"
    )
    pick.add_argument(
        "--guidance",
        default="auto",
        metavar="KIND",
        help="reference mode: auto (the strongest the server offers: instantid, faceid, ipadapter, img2img), "
        "one kind, a comma list of kinds or all (one reference storyboard and ablation row per kind)",
    )
    pick.add_argument(
        "--denoise", type=float, default=0.55, help="img2img strength for frames 2+ (default 0.55)"
    )
    pick.add_argument("--ipadapter-weight", type=float, default=0.7)
    pick.add_argument(
        "--ipadapter-model",
        metavar="FILE",
        help="IP-Adapter or FaceID file in the server's models/ipadapter (default: chosen by its name)",
    )
    llm = story.add_argument_group("scene splitting by an LLM")
    llm.add_argument("--llm-url", default=os.environ.get("CHARFORGE_LLM_URL", "https://api.openai.com/v1"))
    llm.add_argument("--llm-model", default=os.environ.get("CHARFORGE_LLM_MODEL", "gpt-4o-mini"))
    llm.add_argument(
        "--llm-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default OPENAI_API_KEY)",
    )
    story.set_defaults(func=cmd_story)


def _character(args: argparse.Namespace):
    from ..story import Character, character_from_preset

    if args.character:
        character = character_from_preset(args.character)
    elif args.lora or args.trigger or args.reference:
        character = Character(name=Path(args.lora[0][0]).stem if args.lora else (args.trigger or "character"))
    else:
        raise UsageError(
            "name the character: --character NAME, or --lora FILE --trigger WORDS --reference DIR"
        )
    if args.lora:
        character.loras = list(args.lora)
    for flag in ("trigger", "reference", "checkpoint", "negative"):
        if getattr(args, flag) is not None:
            setattr(character, flag, getattr(args, flag))
    for flag in ("steps", "cfg", "width", "height", "sampler", "scheduler"):
        if getattr(args, flag) is not None:
            setattr(character.generation, flag, getattr(args, flag))
    return character


def _scenes(args: argparse.Namespace, out):
    from charforge.engine.story import (
        LLMSettings,
        SceneSplitError,
        SceneSplitter,
        check_scene_count,
        load_scenes,
    )

    if args.scenes:
        try:
            scenes = load_scenes(args.scenes)
            check_scene_count(scenes)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return scenes
    if not args.story.strip():
        raise UsageError("give the story in a sentence, or your own scene list with --scenes FILE")
    splitter = SceneSplitter(
        LLMSettings(base_url=args.llm_url, model=args.llm_model, api_key_env=args.llm_key_env)
    )
    out.note(f"splitting the story into scenes with {args.llm_model} at {args.llm_url} ...")
    try:
        scenes = splitter.split(args.story, args.frames)
    except SceneSplitError as exc:
        raise UsageError(f"scene splitting failed: {exc}") from None
    for note in splitter.malformed:
        out.note(f"note: an answer was rejected and asked again ({note})")
    return scenes


def cmd_story(args: argparse.Namespace, out) -> int:
    from charforge.driver.cli import connect

    from ..story import StoryOptions, StoryRun

    character = _character(args)
    scenes = _scenes(args, out)
    for i, scene in enumerate(scenes):
        out.note(f"scene {i + 1}: {scene.prompt}")
    modes = MODES[args.mode] + (() if args.no_base else ("base",))
    options = StoryOptions(
        modes=modes,
        candidates=args.candidates,
        seed=args.seed,
        style=args.style,
        guidance=args.guidance,
        denoise=args.denoise,
        ipadapter_weight=args.ipadapter_weight,
        identity_weight=args.identity_weight,
        text_weight=args.text_weight,
        face_pack=args.face_pack,
        clip_model=args.clip,
        timeout=args.timeout,
        retries=args.retries,
        min_text=args.min_text,
        min_identity=args.min_identity,
    )
    with connect(args, out) as client:
        result = StoryRun(
            client,
            character,
            scenes,
            options,
            args.out,
            story=args.story,
            note=out.note,
            ipadapter_file=args.ipadapter_model,
        ).run()
    lines = [f"storyboards in {args.out}:"]
    for mode, path in result.sheets.items():
        stats = result.storyboards[mode].stats()
        lines.append(
            f"  {mode}: {path}  (mean identity {stats['identity_mean']}, mean text {stats['text_mean']}, "
            f"{stats['faces']}/{stats['frames']} frames with a face)"
        )
    lines.append(f"  ablation: {result.ablation[0]}")
    lines.append(f"  metadata: {result.summary}")
    out.result(
        "\n".join(lines),
        out=str(args.out),
        sheets={m: str(p) for m, p in result.sheets.items()},
        metadata={m: str(p) for m, p in result.metadata.items()},
        ablation={"markdown": str(result.ablation[0]), "json": str(result.ablation[1])},
        summary={m: b.stats() for m, b in result.storyboards.items()},
    )
    return 0
