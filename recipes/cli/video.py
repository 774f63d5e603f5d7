"""``charforge video --audio SONG`` / ``--driving-video FILE``: the shipped audio-reactive AnimateDiff workflow, or
the face-driven ControlNet workflow, run on a server.

The sound file (or driving video) is uploaded into the server's input folder, the workflow's settings are set from the options
(as ``charforge run --set`` / ``--input`` would), and the clip (mp4 with the music) comes home into ``--out``
with a manifest. Only the workflow file is read locally: the command needs neither torch nor the engine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from charforge.driver.errors import UsageError
from charforge.driver.workflow.overrides import Override

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
AUDIO_WORKFLOW = "video_audio_reactive"
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus")
FACE_WORKFLOW = "video_face_motion"
HOTSHOT_WORKFLOW = "video_hotshot_xl"
HOTSHOT_FRAMES = 16  # the shipped workflow's clip length, used to spread --prompt keyframes without --frames
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif", ".webp")

EPILOG = """\
The workflow is workflows/video_audio_reactive.json: Load Audio (CharForge) -> Audio Prompt Travel -> Generate
Video (prompt, frames and fps from the beats) -> Save Video with the music muxed in (AAC in mp4, Opus in webm).
Options left out keep the workflow's values. Anything else: charforge run workflows/video_audio_reactive.json
--input "Load Audio (CharForge)=song.mp3" --set NODE.INPUT=VALUE.

With --driving-video the workflow is workflows/video_face_motion.json: Face Motion from Video (the driving
face's landmarks as face maps) -> Generate Video (AnimateDiff video to video of the driving frames, the face maps
steering a ControlNet in every step, character LoRA) -> Save Video and Identity Drift. --prompt, --negative,
--base-model, --motion-module, --lora, --width/--height, --steps, --seed and --format apply to it too;
--controlnet, --denoise and --max-frames are its own.

With --hotshot the workflow is workflows/video_hotshot_xl.json: an SDXL checkpoint with HotShot-XL's temporal
layers and the character LoRA -> Generate Video (8-frame context windows) -> Save Video. Several --prompt
become keyframes spread evenly over --frames (prompt travel), --shared is added to each; --fps, --base-model,
--motion-module, --lora, --negative, --width/--height, --steps, --seed and --format apply.
"""


def _lora(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` -> (file name in the server's loras folder, weight)."""
    name, weight = text, 0.8
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            name, weight = head, float(tail)
        except ValueError:
            name = text
    if not name.strip():
        raise argparse.ArgumentTypeError(f"--lora {text!r}: use FILE or FILE:WEIGHT")
    return name.strip(), weight


def register(sub: Any, *, server: argparse.ArgumentParser, output: Any) -> None:
    p = sub.add_parser(
        "video",
        parents=[server],
        help="a clip of the character cut to music (--audio), following a driving face (--driving-video) "
        "or made with HotShot-XL on SDXL (--hotshot)",
        description="Run the audio-reactive video workflow on a ComfyUI with CharForge (the prompt changes on "
        "the music's beats and the saved mp4 carries the music, in sync), or the face-driven one (the character's "
        "face follows a driving video's landmarks through a ControlNet).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--audio",
        type=Path,
        metavar="FILE",
        help="the music (wav, flac, mp3, m4a, ogg): uploaded to the server's input folder",
    )
    source.add_argument(
        "--driving-video",
        type=Path,
        metavar="FILE",
        help="a video of a face (mp4, webm, mov, gif) whose motion the character follows: uploaded",
    )
    source.add_argument(
        "--hotshot",
        action="store_true",
        help="an SDXL clip with HotShot-XL's temporal layers and the character LoRA (prompt travel)",
    )
    p.add_argument("--frames", type=int, metavar="N", help="frames in the clip (--hotshot)")
    p.add_argument(
        "--controlnet", metavar="NAME", help="face / pose ControlNet on the server (--driving-video)"
    )
    p.add_argument(
        "--denoise", type=float, metavar="D", help="how much of the driving frames is redrawn (0-1)"
    )
    p.add_argument("--max-frames", type=int, metavar="N", help="driving frames used (0 = all)")
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="a prompt (repeatable): the clip cycles through them, a new one every --beats-per-prompt beats",
    )
    p.add_argument("--shared", metavar="TEXT", help="text added to every prompt (style, place, light)")
    p.add_argument("--negative", metavar="TEXT", help="negative prompt")
    p.add_argument("--start", type=float, metavar="S", help="seconds into the music where the clip starts")
    p.add_argument("--duration", type=float, metavar="S", help="seconds of music (and clip); 0 = to the end")
    p.add_argument("--fps", type=float, metavar="F", help="the clip's frame rate (beats land on its frames)")
    p.add_argument("--beats-per-prompt", type=int, metavar="N", help="a new prompt every N beats")
    p.add_argument("--switch", choices=["cut", "blend"], help="cut on the beat, or blend between beats")
    p.add_argument("--base-model", metavar="NAME", help="SD1.5 / SDXL checkpoint on the server")
    p.add_argument("--motion-module", metavar="NAME", help="AnimateDiff motion module on the server")
    p.add_argument(
        "--lora",
        type=_lora,
        metavar="FILE[:WEIGHT]",
        help="the character LoRA in the server's loras folder ('(none)' for the base model)",
    )
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--format", choices=["mp4", "webm"], help="container (default: the workflow's mp4)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("output"),
        metavar="DIR",
        help="where the clip goes (default ./output)",
    )
    p.add_argument("--timeout", type=float, metavar="S", help="limit for the whole job")
    p.add_argument("--progress", choices=["auto", "rich", "plain"], default="auto")
    p.set_defaults(func=cmd_video)


def _overrides(sets: list[tuple[str, str, Any]]) -> list[Override]:
    # Typed values, not NODE.INPUT=VALUE texts: a prompt with a newline or a file name like "1.5" stays as given.
    return [
        Override(node, name, value, value if isinstance(value, str) else json.dumps(value), f"{node}.{name}")
        for node, name, value in sets
        if value is not None
    ]


def _model_sets(args: argparse.Namespace) -> list[tuple[str, str, Any]]:
    """--base-model and --motion-module: Load Video Model's inputs."""
    return [
        ("CharForgeLoadVideoModel", "base_model", args.base_model),
        ("CharForgeLoadVideoModel", "motion_module", args.motion_module),
    ]


def _lora_sets(args: argparse.Namespace) -> list[tuple[str, str, Any]]:
    """--lora FILE:WEIGHT: Video LoRA's file and strength (nothing without --lora)."""
    if args.lora is None:
        return []
    return [
        ("CharForgeVideoLoRA", "lora_name", args.lora[0]),
        ("CharForgeVideoLoRA", "strength", args.lora[1]),
    ]


def _size_steps_seed(args: argparse.Namespace) -> list[tuple[str, str, Any]]:
    """--width, --height, --steps, --seed: Generate Video's inputs."""
    return [
        ("CharForgeGenerateVideo", "width", args.width),
        ("CharForgeGenerateVideo", "height", args.height),
        ("CharForgeGenerateVideo", "steps", args.steps),
        ("CharForgeGenerateVideo", "seed", args.seed),
    ]


def face_settings(args: argparse.Namespace) -> tuple[list[Override], list[str]]:
    """The ``--set`` overrides and ``--input`` text the options mean for the face-driven workflow."""
    video = Path(args.driving_video)
    if not video.is_file():
        raise UsageError(f"--driving-video {video}: no such file")
    if video.suffix.lower() not in VIDEO_SUFFIXES:
        raise UsageError(
            f"--driving-video {video}: not a video this workflow reads ({', '.join(VIDEO_SUFFIXES)})"
        )
    for option in ("shared", "start", "duration", "fps", "beats_per_prompt", "switch"):
        if getattr(args, option, None) is not None:
            raise UsageError(
                f"--{option.replace('_', '-')} belongs to --audio; the face-driven clip has no use for it"
            )
    if args.denoise is not None and not 0.0 < args.denoise <= 1.0:
        raise UsageError(f"--denoise {args.denoise}: give a value in (0, 1]")
    sets: list[tuple[str, str, Any]] = [
        ("CharForgeFaceMotion", "width", args.width),
        ("CharForgeFaceMotion", "height", args.height),
        ("CharForgeFaceMotion", "max_frames", args.max_frames),
        *_model_sets(args),
        ("CharForgeGenerateVideo", "controlnet", args.controlnet),
        ("CharForgeGenerateVideo", "prompt", ", ".join(args.prompt) if args.prompt else None),
        ("CharForgeGenerateVideo", "negative_prompt", args.negative),
        *_size_steps_seed(args),
        ("CharForgeGenerateVideo", "strength", args.denoise),
        ("CharForgeSaveVideo", "format", args.format),
        *_lora_sets(args),
    ]
    return _overrides(sets), [f"CharForgeFaceMotion.video={video}"]


def hotshot_settings(args: argparse.Namespace) -> tuple[list[Override], list[str]]:
    """The ``--set`` overrides the options mean for the HotShot-XL workflow (nothing to upload)."""
    for option in ("start", "duration", "beats_per_prompt", "switch", "controlnet", "denoise", "max_frames"):
        if getattr(args, option, None) is not None:
            raise UsageError(f"--{option.replace('_', '-')} has no use in the HotShot-XL clip (--hotshot)")
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames {args.frames}: give at least 1")
    prompt = None
    if args.prompt:
        frames = args.frames or HOTSHOT_FRAMES
        starts = [round(i * frames / len(args.prompt)) for i in range(len(args.prompt))]
        lines = [f"{start}: {text}" for start, text in zip(starts, args.prompt, strict=True)]
        prompt = "\n".join(lines + ([args.shared] if args.shared else []))
    elif args.shared:
        raise UsageError("--shared is added to each --prompt: give at least one --prompt with it")
    sets: list[tuple[str, str, Any]] = [
        *_model_sets(args),
        ("CharForgeGenerateVideo", "prompt", prompt),
        ("CharForgeGenerateVideo", "negative_prompt", args.negative),
        ("CharForgeGenerateVideo", "frames", args.frames),
        ("CharForgeGenerateVideo", "fps", args.fps),
        *_size_steps_seed(args),
        ("CharForgeSaveVideo", "format", args.format),
        *_lora_sets(args),
    ]
    return _overrides(sets), []


def video_settings(args: argparse.Namespace) -> tuple[list[Override], list[str]]:
    """The ``--set`` overrides and ``--input`` text the options mean for the audio workflow (nodes by class)."""
    if getattr(args, "hotshot", False):
        return hotshot_settings(args)
    if getattr(args, "frames", None) is not None:
        raise UsageError(
            "--frames belongs to --hotshot (the other clips take their length from the sound or video)"
        )
    if getattr(args, "driving_video", None) is not None:
        return face_settings(args)
    for option in ("controlnet", "denoise", "max_frames"):
        if getattr(args, option, None) is not None:
            raise UsageError(f"--{option.replace('_', '-')} belongs to --driving-video")
    audio = Path(args.audio)
    if not audio.is_file():
        raise UsageError(f"--audio {audio}: no such file")
    if audio.suffix.lower() not in AUDIO_SUFFIXES:
        raise UsageError(
            f"--audio {audio}: not a sound file this workflow reads ({', '.join(AUDIO_SUFFIXES)})"
        )
    sets: list[tuple[str, str, Any]] = [
        ("CharForgeLoadAudio", "start", args.start),
        ("CharForgeLoadAudio", "duration", args.duration),
        ("CharForgeAudioPromptTravel", "prompts", "\n".join(args.prompt) if args.prompt else None),
        ("CharForgeAudioPromptTravel", "shared", args.shared),
        ("CharForgeAudioPromptTravel", "fps", args.fps),
        ("CharForgeAudioPromptTravel", "beats_per_prompt", args.beats_per_prompt),
        *_model_sets(args),
        *_lora_sets(args),
        ("CharForgeGenerateVideo", "negative_prompt", args.negative),
        *_size_steps_seed(args),
        ("CharForgeGenerateVideo", "blend_prompts", None if args.switch is None else args.switch == "blend"),
        ("CharForgeSaveVideo", "format", args.format),
    ]
    return _overrides(sets), [f"CharForgeLoadAudio.audio={audio}"]


def cmd_video(args: argparse.Namespace, out: Any) -> int:
    from charforge.driver.cli.app import cmd_run

    sets, inputs = video_settings(args)
    name = FACE_WORKFLOW if getattr(args, "driving_video", None) is not None else AUDIO_WORKFLOW
    if getattr(args, "hotshot", False):
        name = HOTSHOT_WORKFLOW
    run_args = argparse.Namespace(
        **vars(args),
        workflow=WORKFLOWS / f"{name}.json",
        set=sets,
        input=inputs,
        no_download=False,
        no_previews=True,
        no_preflight=False,
        allow_partial=False,
        max_download_mb=None,
    )
    if not run_args.workflow.is_file():
        raise UsageError(f"{run_args.workflow} not found: charforge video runs from a checkout of CharForge")
    return cmd_run(run_args, out)
