"""The grid ``charforge lora eval`` renders: options and results, arguments, the graph and its strength x prompt x
seed sweep, and the check of what the server offers."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charforge.driver.batch import BatchPlan, parse_sweep
from charforge.driver.errors import UsageError, close_matches
from charforge.driver.workflow.object_info import LORA_TXT2IMG_NODES, input_choices

FORMAT = "charforge.lora_eval"
VERSION = 1
DEFAULT_STRENGTHS = (0.4, 0.6, 0.8, 1.0)
DEFAULT_SEEDS = (1, 2)
# Scenes that show the face, the body and a context, so a LoRA that only works for close-ups is visible.
DEFAULT_SCENES = (
    "portrait photo, looking at the camera",
    "upper body, standing outdoors in daylight",
    "sitting at a table in a cafe, side view",
)
GENERATION_NODES = LORA_TXT2IMG_NODES
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RENDERS = "renders"  # the batch folder inside --out
RESULTS_NAME = "results.json"
GRID_NAME = "grid.png"
TABLE_NAME = "table.md"
SCORING_INSTALL = 'pip install "charforge[nodes,faces]"'

# Node ids of the graph (the sweep addresses inputs by id).
CHECKPOINT, LORA, POSITIVE, NEGATIVE, LATENT, SAMPLER, DECODE, SAVE = "1", "2", "3", "4", "5", "6", "7", "8"


@dataclass
class EvalOptions:
    """What ``charforge lora eval`` renders and how it scores (the command's flags)."""

    strengths: Sequence[float] = DEFAULT_STRENGTHS
    scenes: Sequence[str] = (
        DEFAULT_SCENES  # prompt texts added to the character's prompt, one grid column each
    )
    seeds: Sequence[int] = DEFAULT_SEEDS
    checkpoint: str | None = None  # None: the first checkpoint the server lists
    reference: str | None = None  # photo folder, identity name or identity .json; None: the preset's
    face_pack: str = "buffalo_l"
    face_models_dir: str | None = None  # an insightface folder (holding models/<pack>/) searched first
    det_size: int = 640
    clip_model: str | None = None  # CLIP folder name or path; None: the first found; "none": no text score
    device: str | None = None  # CLIP device; None: cuda, mps or cpu
    identity_weight: float = 1.0
    text_weight: float = 0.5
    window: int = 2  # jobs queued or running on the server at once
    timeout: float | None = None  # per job
    verify_tls: bool | None = None  # False: --insecure
    cell: int = 256  # grid cell size in pixels


@dataclass
class EvalImage:
    """One cell of the grid: what was rendered and its scores."""

    strength: float
    prompt_index: int  # 0-based column group (P1 = 0)
    seed: int
    prompt: str  # the full prompt sent (trigger words + character prompt + scene)
    scored_text: str  # what CLIP compared the image with
    job: str
    file: Path | None = None
    state: str = "pending"  # done | failed | timed_out
    error: str | None = None
    identity: float | None = None
    identity_passed: bool = False
    identity_note: str = ""  # why there is no identity score ("no face found"), or why it failed
    faces: int = 0
    text: float | None = None
    combined: float | None = None

    def to_dict(self, base: Path) -> dict[str, Any]:
        file = None
        if self.file is not None:
            with contextlib.suppress(ValueError):
                file = self.file.relative_to(base).as_posix()
            file = file or str(self.file)
        return {
            "strength": self.strength,
            "prompt_index": self.prompt_index + 1,
            "prompt": self.prompt,
            "scored_text": self.scored_text,
            "seed": self.seed,
            "file": file,
            "state": self.state,
            "error": self.error,
            "identity": _round(self.identity),
            "identity_passed": self.identity_passed,
            "identity_note": self.identity_note,
            "faces": self.faces,
            "text": _round(self.text),
            "combined": _round(self.combined),
            "job": self.job,
        }


@dataclass
class StrengthSummary:
    """The mean scores of one strength (one grid row)."""

    strength: float
    images: int  # rendered images (failed renders are not counted)
    faces: int | None = None
    identity_mean: float | None = None  # over the images with a face
    identity_min: float | None = None
    identity_pass_rate: float | None = None
    text_mean: float | None = None
    combined: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: _round(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class EvalResult:
    out_dir: Path
    lora: str
    character: str
    checkpoint: str
    images: list[EvalImage]
    strengths: list[StrengthSummary]
    best: StrengthSummary | None
    grid: Path
    results: Path
    table: Path
    table_text: str
    failed: int = 0
    notes: list[str] = field(default_factory=list)


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


# --------------------------------------------------------------------------------------------------
# Arguments


def parse_numbers(text: str, kind: type, what: str) -> list:
    """``"0.4,0.6, 1"`` -> ``[0.4, 0.6, 1.0]`` (ints for `kind` int); a UsageError naming `what` otherwise."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = kind(part)
        except ValueError:
            raise UsageError(
                f"{what}: {part!r} is not {'an integer' if kind is int else 'a number'} "
                f"(give a comma-separated list, e.g. {'1,2' if kind is int else '0.4,0.6,0.8,1.0'})"
            ) from None
        values.append(value)
    if not values:
        raise UsageError(f"{what}: give at least one value")
    return values


def read_prompts(path: str | Path) -> list[str]:
    """Scene prompts from a text file: one per line; blank lines and ``#`` comments are skipped."""
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise UsageError(f"--prompts {p}: cannot read it ({exc.strerror or exc})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts {p}: no prompt in the file (one per line; # starts a comment)")
    return prompts


def _unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def load_character(name: str) -> Any:
    """The character preset `name` (a name in the characters folder or a .yaml path), as a UsageError when not."""
    try:
        from charforge.engine.library.characters import load_character as load
    except ImportError as exc:
        raise UsageError(
            f"character presets need the node pack's packages ({exc.name or exc}): {SCORING_INSTALL}"
        ) from None
    try:
        return load(name)
    except (OSError, ValueError) as exc:  # CharacterError names the file and the field
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------------------------------
# The graph and the grid


def eval_graph(
    character: Any, *, lora: str, checkpoint: str, strength: float, prompt: str, seed: int, save_prefix: str
) -> dict[str, Any]:
    """The API-format graph that renders `character` with `lora` at `strength` (model and text encoder)."""
    gen = character.generation
    g: dict[str, Any] = {}

    def add(node_id: str, class_type: str, title: str, **inputs: Any) -> list:
        g[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return [node_id, 0]

    add(CHECKPOINT, "CheckpointLoaderSimple", "Checkpoint", ckpt_name=checkpoint)
    add(
        LORA,
        "LoraLoader",
        "LoRA under test",
        model=[CHECKPOINT, 0],
        clip=[CHECKPOINT, 1],
        lora_name=lora,
        strength_model=strength,
        strength_clip=strength,
    )
    positive = add(POSITIVE, "CLIPTextEncode", "Prompt", text=prompt, clip=[LORA, 1])
    negative = add(
        NEGATIVE, "CLIPTextEncode", "Negative prompt", text=character.negative_prompt, clip=[LORA, 1]
    )
    latent = add(LATENT, "EmptyLatentImage", "Size", width=gen.width, height=gen.height, batch_size=1)
    sampled = add(
        SAMPLER,
        "KSampler",
        "Sampler",
        model=[LORA, 0],
        seed=seed,
        steps=gen.steps,
        cfg=gen.cfg,
        sampler_name=gen.sampler,
        scheduler=gen.scheduler,
        positive=positive,
        negative=negative,
        latent_image=latent,
        denoise=1.0,
    )
    images = add(DECODE, "VAEDecode", "Decode", samples=sampled, vae=[CHECKPOINT, 2])
    add(SAVE, "SaveImage", "Save", images=images, filename_prefix=save_prefix)
    return g


def plan_grid(
    graph: dict[str, Any],
    strengths: Sequence[float],
    prompts: Sequence[str],
    seeds: Sequence[int],
    name: str = "lora eval",
) -> BatchPlan:
    """The strength x prompt x seed sweep of `graph` (jobs in row order: strength, then prompt, then seed).

    ``strength`` sets both LoRA strengths (zipped), ``prompt`` the positive text, ``seed`` the sampler's seed:
    every strength gets the same prompts and seeds.
    """
    spec = {
        "prompt": graph,
        "name": name,
        "axes": {
            "strength": {"set": f"{LORA}.strength_model", "values": list(strengths)},
            "strength_clip": {"set": f"{LORA}.strength_clip", "values": list(strengths), "folder": False},
            "prompt": {"set": f"{POSITIVE}.text", "values": list(prompts)},
            "seed": {"set": f"{SAMPLER}.seed", "values": list(seeds)},
        },
        "zip": [["strength", "strength_clip"]],
    }
    return parse_sweep(spec, name)


# --------------------------------------------------------------------------------------------------
# What the server offers


def _listing(names: list[str], limit: int = 12) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_server(
    info: dict[str, Any], lora: str, checkpoint: str | None, url: str, note: Callable[[str], None]
) -> tuple[str, str]:
    """The LoRA and checkpoint names to use on this server (from its /object_info), or a UsageError saying
    what is missing and what the server has."""
    missing = [n for n in GENERATION_NODES if n not in info]
    if missing:
        raise UsageError(
            f"the server {url} lacks ComfyUI's node(s) {', '.join(missing)}; is it a ComfyUI server?"
        )
    loras = input_choices(info, "LoraLoader", "lora_name") or []
    chosen_lora = lora
    if lora not in loras:
        by_name = [c for c in loras if Path(c.replace("\\", "/")).name == Path(lora.replace("\\", "/")).name]
        if len(by_name) == 1:
            chosen_lora = by_name[0]
            note(f"LoRA {lora!r}: using the server's {chosen_lora!r}")
        else:
            hint = close_matches(Path(lora).name, loras)
            extra = f" (did you mean {', '.join(repr(h) for h in hint)}?)" if hint else ""
            raise UsageError(
                f"LoRA {lora!r} is not in the loras folder of the server {url}{extra}; it has: "
                f"{_listing(loras)}. Copy the file into ComfyUI/models/loras/ (then refresh or restart "
                f"ComfyUI) and give its name as LoraLoader lists it."
            )
    checkpoints = input_choices(info, "CheckpointLoaderSimple", "ckpt_name") or []
    if checkpoint is None:
        if not checkpoints:
            raise UsageError(
                f"the server {url} has no checkpoint in models/checkpoints; put the base model there"
            )
        checkpoint = checkpoints[0]
        note(f"no --checkpoint given: using {checkpoint}")
    elif checkpoint not in checkpoints:
        hint = close_matches(checkpoint, checkpoints)
        extra = f" (did you mean {', '.join(repr(h) for h in hint)}?)" if hint else ""
        raise UsageError(
            f"checkpoint {checkpoint!r} is not on the server {url}{extra}; it has: {_listing(checkpoints)}"
        )
    return chosen_lora, checkpoint
