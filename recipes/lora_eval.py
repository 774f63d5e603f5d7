"""Evaluate a LoRA on a character: ``charforge lora eval`` as a Python API.

For a LoRA and a character preset the driver builds one API-format graph of ComfyUI's own nodes
(CheckpointLoaderSimple -> LoraLoader -> CLIPTextEncode x 2 -> EmptyLatentImage -> KSampler -> VAEDecode ->
SaveImage) with the character's prompt, trigger words, negative prompt and generation settings, and expands it
into a strength x prompt x seed grid with the batch sweep (:func:`~charforge.driver.batch.parse_sweep`): the
LoRA's model and text-encoder strengths vary together, and every strength renders the same prompts with the same
seeds, so rows differ only by the strength. The grid runs through the batch runner
(:class:`~charforge.driver.batch.Batch`): preflight against the server's ``/object_info``, retries, and a
journal, so running the same command again resumes instead of rendering twice.

Each image is scored here, in the driver's process, as soon as it is downloaded:

* **identity**: cosine similarity of the main face to the character's reference identity (ArcFace embeddings of
  an InsightFace pack, ``charforge.engine.score``); no face = no score;
* **text agreement**: CLIP cosine between the image and its prompt (``charforge.engine.score.clip``), the
  prompt without the trigger words (tokens CLIP has never seen; they are the same in every cell anyway).

Per strength, ``combined`` is CharForge's set score (``charforge.engine.score.select.summarise_set``, the one the
Pick Checkpoint node ranks checkpoints by)::

    combined = (identity_weight * identity_all + text_weight * 2.5 * max(text_mean, 0))
               / (identity_weight + text_weight)

where ``identity_all`` is the mean identity with images without a face counting 0 (a strength that loses the
face is not rewarded for it; the reported ``identity_mean`` is over the images with a face) and 2.5 x the CLIP
cosine is CLIPScore's scale. The best strength has the highest ``combined`` (4 decimals);
ties go to the lower strength (less risk of overcooking). Scoring needs the node pack's and the face extras:
``pip install "charforge[nodes,faces]"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charforge.common.characters import join_prompt
from charforge.driver.batch import BatchPlan, parse_sweep
from charforge.driver.errors import UsageError, close_matches

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
GENERATION_NODES = (
    "CheckpointLoaderSimple",
    "LoraLoader",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "KSampler",
    "VAEDecode",
    "SaveImage",
)
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


def _choices(info: dict[str, Any], node: str, name: str) -> list[str] | None:
    """The combo choices of input `name` of `node` in /object_info (None when the node or input is absent)."""
    declared = (info.get(node) or {}).get("input") or {}
    for section in ("required", "optional"):
        spec = (declared.get(section) or {}).get(name)
        if spec is None:
            continue
        kind = spec[0] if isinstance(spec, list) and spec else None
        if isinstance(kind, list):
            return [str(c) for c in kind]
        if kind == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
            return [str(c) for c in spec[1].get("options", [])]
        return []
    return None


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
    loras = _choices(info, "LoraLoader", "lora_name") or []
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
    checkpoints = _choices(info, "CheckpointLoaderSimple", "ckpt_name") or []
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


# --------------------------------------------------------------------------------------------------
# Scoring models (local)


def missing_scoring_packages(clip: bool) -> list[str]:
    """pip names of the packages local scoring needs that are not importable."""
    needed = [
        ("numpy", "numpy"),
        ("PIL", "Pillow"),
        ("onnxruntime", "onnxruntime"),
        ("insightface", "insightface"),
    ]
    if clip:
        needed += [("torch", "torch"), ("transformers", "transformers")]
    missing = []
    for module, package in needed:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


@contextlib.contextmanager
def _insightface_folder(folder: str | None) -> Iterator[None]:
    """Search `folder` first for InsightFace packs while inside the block (the bridge's explicit folder)."""
    if not folder:
        yield
        return
    key = "CHARFORGE_PATH_INSIGHTFACE"
    before = os.environ.get(key)
    os.environ[key] = os.pathsep.join(p for p in (str(Path(folder).expanduser()), before) if p)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def photo_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class Scoring:
    """The local scoring setup: face models, the character's reference identity, CLIP (or none)."""

    options: EvalOptions
    character: Any
    reference: str  # what the identity comes from (folder, identity name or path)
    clip_folder: Path | None
    analyzer: Any = None
    identity: Any = None
    identity_source: str = ""
    threshold: float | None = None
    clip: Any = None

    @classmethod
    def check(cls, character: Any, options: EvalOptions) -> Scoring:
        """Cheap checks before anything is rendered: packages, the face pack's folder, the reference, CLIP."""
        use_clip = (options.clip_model or "").strip().lower() != "none" and options.text_weight > 0
        if not use_clip and options.identity_weight <= 0:
            raise UsageError(
                "nothing to rank the strengths by: --identity-weight is 0 and text agreement is off "
                "(--clip none or --text-weight 0)"
            )
        missing = missing_scoring_packages(use_clip)
        if missing:
            raise UsageError(
                f"lora eval scores the images in this process and needs {', '.join(missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not installed: {SCORING_INSTALL}"
            )
        from charforge.engine.faces import FaceModelsNotFoundError, locate_pack

        with _insightface_folder(options.face_models_dir):
            try:
                locate_pack(options.face_pack)
            except FaceModelsNotFoundError as exc:
                raise UsageError(
                    f"face models for identity scoring: {exc} (or point --face-models at the "
                    f"insightface folder)"
                ) from None
        reference = (options.reference or character.identity or character.reference_photos or "").strip()
        if not reference:
            raise UsageError(
                f"character {character.name!r} has no identity and no reference_photos, so identity "
                f"cannot be scored: add 'identity:' or 'reference_photos:' to {character.path}, or give "
                f"--reference DIR (photos of the character) or --reference IDENTITY"
            )
        clip_folder = None
        if use_clip:
            from charforge.engine.score.clip import list_clip_models, resolve_clip_model

            name = options.clip_model
            if name is None:
                found = list_clip_models()
                if not found:
                    raise UsageError(
                        "no CLIP model for text agreement: put a Hugging Face CLIP folder (e.g. "
                        "openai/clip-vit-large-patch14) in <models>/clip_vision/<name>/ (models: "
                        "$CHARFORGE_MODELS_DIR, $COMFYUI_DIR/models or the config file), give --clip "
                        "PATH, or --clip none to score identity only"
                    )
                name = found[0]
            try:
                clip_folder = resolve_clip_model(name)
            except FileNotFoundError as exc:
                raise UsageError(f"{exc} (--clip none scores identity only)") from None
        return cls(options, character, reference, clip_folder)

    def load(self, note: Callable[[str], None]) -> None:
        """Load the face models, the reference identity and CLIP."""
        from charforge.deps import MissingDependencyError
        from charforge.engine.faces import FaceAnalyzer
        from charforge.engine.score import check_same_model

        try:
            with _insightface_folder(self.options.face_models_dir):
                self.analyzer = FaceAnalyzer.load(self.options.face_pack, det_size=self.options.det_size)
        except MissingDependencyError as exc:
            raise UsageError(f"{exc} ({SCORING_INSTALL})") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"face models: {exc}") from None
        self.identity, self.identity_source = self._reference_identity(note)
        try:
            check_same_model(self.identity, self.analyzer)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.threshold = self.character.threshold or self.identity.suggested_threshold
        if self.clip_folder is not None:
            from charforge.engine.score.clip import ClipScorer

            try:
                self.clip = ClipScorer.load(str(self.clip_folder), device=self.options.device)
            except MissingDependencyError as exc:
                raise UsageError(f"{exc} ({SCORING_INSTALL})") from None

    def _reference_identity(self, note: Callable[[str], None]) -> tuple[Any, str]:
        from charforge.engine.score import load_identity

        source = self.reference
        path = Path(source).expanduser()
        if path.is_dir():
            return self._from_photos(path), f"{len(photo_files(path))} photo(s) in {path}"
        photos = (
            Path(self.character.reference_photos).expanduser() if self.character.reference_photos else None
        )
        try:
            identity = load_identity(source)
        except (OSError, ValueError) as exc:
            if photos is not None and photos.is_dir():
                note(
                    f"identity {source!r} cannot be loaded ({str(exc).splitlines()[0]}); using the photos in {photos}"
                )
                return self._from_photos(photos), f"{len(photo_files(photos))} photo(s) in {photos}"
            raise UsageError(
                f"reference identity {source!r}: {exc}. Give --reference DIR (photos of the character) "
                f"or copy the identity's .json into <models>/charforge/identities/"
            ) from None
        if identity.model != self.analyzer.name and photos is not None and photos.is_dir():
            note(
                f"identity {identity.name!r} was built with {identity.model}, the face models loaded are "
                f"{self.analyzer.name}: rebuilding it from the photos in {photos}"
            )
            return self._from_photos(photos), f"{len(photo_files(photos))} photo(s) in {photos}"
        return identity, f"saved identity {identity.name!r}"

    def _from_photos(self, folder: Path) -> Any:
        import numpy as np

        from charforge.engine.dataset.scan import load_image
        from charforge.engine.score import build_identity

        photos = photo_files(folder)
        if not photos:
            raise UsageError(
                f"reference photos {folder}: no image ({', '.join(IMAGE_SUFFIXES)}) in that folder"
            )
        try:
            return build_identity(
                self.character.name, self.analyzer, ((p.name, np.asarray(load_image(p))) for p in photos)
            )
        except ValueError as exc:  # no usable face in any photo
            raise UsageError(f"reference photos {folder}: {exc}") from None

    @property
    def clip_name(self) -> str | None:
        return None if self.clip is None else self.clip.name

    def score(self, image: EvalImage) -> None:
        """Fill in the identity and text scores of a rendered image."""
        import numpy as np
        from PIL import Image

        from charforge.engine.score import score_identity

        assert image.file is not None  # only a rendered image (one with a file) is scored
        with Image.open(image.file) as picture:
            rgb = np.asarray(picture.convert("RGB"))
        row = score_identity(self.analyzer, self.identity, [(image.file.name, rgb)], self.threshold).rows[0]
        image.identity, image.identity_passed = row.value, row.passed
        image.identity_note, image.faces = row.reason, int(row.details.get("faces", 0))
        if self.clip is not None:
            import torch

            pixels = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]
            image.text = self.clip.score(pixels, [image.scored_text])[0]


# --------------------------------------------------------------------------------------------------
# Summaries


def summarise(
    images: list[EvalImage],
    strengths: Sequence[float],
    identity_weight: float,
    text_weight: float,
    threshold: float | None,
) -> tuple[list[StrengthSummary], StrengthSummary | None]:
    """Per-strength means and combined score (see the module docstring), each image's combined score, and the
    best strength (highest combined; ties: the lower strength)."""
    from charforge.engine.score import ImageScore, ScoreSheet, combine, summarise_set

    def sheets(rows: list[EvalImage]) -> tuple[Any, Any]:
        identity = ScoreSheet(
            "identity",
            [ImageScore(i, r.identity, r.identity_passed, r.identity_note) for i, r in enumerate(rows)],
            threshold,
        )
        has_text = any(r.text is not None for r in rows)
        text = (
            ScoreSheet("clip", [ImageScore(i, r.text, r.text is not None) for i, r in enumerate(rows)])
            if has_text
            else None
        )
        return identity, text

    rendered = [image for image in images if image.state == "done"]
    if rendered:
        identity, text = sheets(rendered)
        if identity_weight > 0 or (text is not None and text_weight > 0):
            merged = combine(identity, text, identity_weight, text_weight)
            for image, row in zip(rendered, merged.rows, strict=True):
                image.combined = row.value
    summaries = []
    for strength in strengths:
        rows = [image for image in rendered if image.strength == strength]
        if not rows:
            summaries.append(StrengthSummary(strength, 0))
            continue
        identity, text = sheets(rows)
        s = summarise_set(strength_label(strength), identity, text, identity_weight, text_weight)
        summaries.append(
            StrengthSummary(
                strength,
                s.images,
                s.faces,
                s.identity_mean,
                s.identity_min,
                s.identity_pass_rate,
                s.clip_mean,
                s.combined,
            )
        )
    ranked = [(s.combined, s) for s in summaries if s.combined is not None]
    best = max(ranked, key=lambda pair: (round(pair[0], 4), -pair[1].strength))[1] if ranked else None
    return summaries, best


def strength_label(strength: float) -> str:
    """``0.4`` -> ``"0.4"``, ``1.0`` -> ``"1.0"`` (not ``"1"``)."""
    text = f"{strength:g}"
    return f"{strength:.1f}" if text.lstrip("-").isdigit() else text


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_text(summaries: list[StrengthSummary], best: StrengthSummary | None) -> str:
    """The per-strength table (Markdown, readable as plain text)."""
    heads = [
        "strength",
        "images",
        "faces",
        "identity mean",
        "identity min",
        "pass rate",
        "text mean",
        "combined",
        "",
    ]
    rows = [
        [
            strength_label(s.strength),
            str(s.images),
            "-" if s.faces is None else str(s.faces),
            _cell(s.identity_mean),
            _cell(s.identity_min),
            "-" if s.identity_pass_rate is None else f"{100 * s.identity_pass_rate:.0f}%",
            _cell(s.text_mean),
            _cell(s.combined, 4),
            "best" if best is not None and s is best else "",
        ]
        for s in summaries
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(heads), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]
    )


# --------------------------------------------------------------------------------------------------
# The grid image


@dataclass(frozen=True)
class GridLayout:
    """Where things go on the grid image: rows = strengths, columns = prompt x seed."""

    rows: int
    columns: int
    thumb: tuple[int, int]  # image area of a cell (width, height)
    left: int = 150  # row labels
    top: int = 64  # title and column labels
    caption: int = 36  # score band under each image
    pad: int = 8
    footer: int = 0

    @property
    def cell_size(self) -> tuple[int, int]:
        return self.thumb[0] + self.pad, self.thumb[1] + self.caption + self.pad

    @property
    def size(self) -> tuple[int, int]:
        width, height = self.cell_size
        return (
            self.left + self.columns * width + self.pad,
            self.top + self.rows * height + self.pad + self.footer,
        )

    def image_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the image area of cell (row, column)."""
        width, height = self.cell_size
        x0 = self.left + column * width + self.pad
        y0 = self.top + row * height + self.pad
        return x0, y0, x0 + self.thumb[0], y0 + self.thumb[1]


def grid_layout(
    rows: int, columns: int, image_size: tuple[int, int], cell: int = 256, legend_lines: int = 0
) -> GridLayout:
    """The layout for `rows` x `columns` images of `image_size`, each scaled to fit `cell` pixels."""
    width, height = image_size
    scale = cell / max(width, height, 1)
    thumb = (max(1, round(width * scale)), max(1, round(height * scale)))
    return GridLayout(rows, columns, thumb, footer=16 * legend_lines + (8 if legend_lines else 0))


def draw_grid(
    images: list[EvalImage],
    strengths: Sequence[float],
    scenes: Sequence[str],
    seeds: Sequence[int],
    summaries: list[StrengthSummary],
    best: StrengthSummary | None,
    title: str,
    image_size: tuple[int, int],
    cell: int = 256,
    combined_note: str = "",
) -> Any:
    """The labelled grid: one row per strength, one column per (prompt, seed), scores under each image."""
    from PIL import Image, ImageDraw

    from charforge.engine.score.render import BACKGROUND, FAIL, INK, MUTED, NONE, PASS, load_font

    legend = [f"P{i + 1}: {scene}"[:160] for i, scene in enumerate(scenes)]
    if combined_note:
        legend.append(combined_note[:160])
    layout = grid_layout(len(strengths), len(scenes) * len(seeds), image_size, cell, len(legend))
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, small, big = load_font(13), load_font(11), load_font(15)
    draw.text((layout.pad, 8), title[:200], fill=INK, font=big)
    for column in range(layout.columns):
        prompt, seed = divmod(column, len(seeds))
        x0, _, x1, _ = layout.image_box(0, column)
        draw.text((x0, layout.top - 22), f"P{prompt + 1} / seed {seeds[seed]}", fill=INK, font=font)
    by_cell = {(image.strength, image.prompt_index, image.seed): image for image in images}
    by_strength = {s.strength: s for s in summaries}
    for row, strength in enumerate(strengths):
        _, y0, _, _ = layout.image_box(row, 0)
        summary = by_strength.get(strength)
        is_best = best is not None and summary is best
        draw.text((layout.pad, y0 + 4), f"strength {strength_label(strength)}", fill=INK, font=big)
        if summary is not None:
            draw.text(
                (layout.pad, y0 + 26), f"identity {_cell(summary.identity_mean)}", fill=MUTED, font=small
            )
            draw.text((layout.pad, y0 + 42), f"text {_cell(summary.text_mean)}", fill=MUTED, font=small)
            draw.text((layout.pad, y0 + 58), f"combined {_cell(summary.combined)}", fill=INK, font=small)
        if is_best:
            draw.text((layout.pad, y0 + 78), "BEST", fill=(20, 120, 40), font=big)
            x_end = layout.size[0] - layout.pad // 2
            draw.rectangle(
                [
                    layout.pad // 2,
                    y0 - layout.pad // 2,
                    x_end,
                    y0 + layout.thumb[1] + layout.caption + layout.pad // 2,
                ],
                outline=(20, 120, 40),
                width=3,
            )
        for column in range(layout.columns):
            prompt, seed_index = divmod(column, len(seeds))
            x0, y0, x1, y1 = layout.image_box(row, column)
            image = by_cell.get((strength, prompt, seeds[seed_index]))
            if image is None or image.file is None:
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=NONE)
                reason = "not rendered" if image is None else (image.error or image.state)
                draw.text((x0 + 6, y0 + 6), reason.splitlines()[0][:40], fill=MUTED, font=small)
                continue
            with Image.open(image.file) as picture:
                tile = picture.convert("RGB")
            scale = min(layout.thumb[0] / tile.width, layout.thumb[1] / tile.height)
            size = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
            if size != tile.size:
                tile = tile.resize(size, Image.Resampling.LANCZOS)
            sheet.paste(
                tile, (x0 + (layout.thumb[0] - tile.width) // 2, y0 + (layout.thumb[1] - tile.height) // 2)
            )
            fill = NONE if image.identity is None else PASS if image.identity_passed else FAIL
            draw.rectangle([x0, y1, x1 - 1, y1 + layout.caption - 2], fill=fill)
            identity = (
                f"id {_cell(image.identity)}"
                if image.identity is not None
                else f"id - ({image.identity_note or 'no face'})"
            )
            draw.text((x0 + 4, y1 + 3), identity[:40], fill=INK, font=small)
            draw.text(
                (x0 + 4, y1 + 18),
                f"text {_cell(image.text)}   comb {_cell(image.combined)}",
                fill=INK,
                font=small,
            )
    y = layout.size[1] - layout.footer
    for line in legend:
        draw.text((layout.pad, y), line, fill=MUTED, font=small)
        y += 16
    return sheet


# --------------------------------------------------------------------------------------------------
# Running


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "lora"


def first_image(files: list[Path]) -> Path | None:
    """The first existing image among a job's downloaded files."""
    return next((f for f in files if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()), None)


def _server_for_batch(client: Any, options: EvalOptions) -> Any:
    config = client.config
    if options.verify_tls is not None and options.verify_tls != config.verify_tls:
        config = dataclasses.replace(config, verify_tls=options.verify_tls)
    return config


def _render(
    plan: BatchPlan, server: Any, out: Path, options: EvalOptions, note: Callable[[str], None]
) -> Iterator[Any]:
    """Run the plan with the batch runner; yields each job's outcome as it ends (earlier runs' first).

    A rerun of the same grid on the same folder resumes: finished images are kept, failed ones are tried again.
    """
    from charforge.driver.batch import Batch

    yield from Batch(plan, base=out).run(
        servers=[server],
        out=out,
        capacity=options.window,
        timeout=options.timeout,
        retry_failed=True,
        contact_sheet=None,
        on_message=note,
    )


def check_resumable(plan: BatchPlan, renders: Path, out_dir: Path) -> None:
    """Refuse a folder that holds the renders of another grid (another LoRA, character setting, strength, prompt
    or seed list): its job folders are named after the axes only and would be taken for this grid's images."""
    from charforge.driver.batch.journal import JOURNAL_NAME, replay
    from charforge.driver.batch.plan import plan_hash

    journal = renders / JOURNAL_NAME
    if not journal.is_file():
        return
    recorded = replay(journal).plan_hash
    if recorded is not None and recorded != plan_hash(plan, renders):
        raise UsageError(
            f"{out_dir} holds the evaluation of a different grid (other LoRA, checkpoint, character "
            f"settings, strengths, prompts or seeds); use another --out, or delete {renders} to "
            f"render this one there"
        )


class LoraEval:
    """One ``charforge lora eval`` run: check, render the grid, score, write grid.png, results.json, table.md."""

    def __init__(
        self,
        client: Any,
        character: Any,
        lora: str,
        options: EvalOptions,
        out_dir: str | Path,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.client, self.character, self.lora, self.options = client, character, lora, options
        self.out_dir = Path(out_dir)
        self.note = note or (lambda text: None)
        self.strengths = sorted(_unique([float(s) for s in options.strengths]))
        self.scenes = _unique([s.strip() for s in options.scenes if s.strip()])
        self.seeds = _unique([int(s) for s in options.seeds])
        if not self.strengths or not self.scenes or not self.seeds:
            raise UsageError("lora eval needs at least one strength, one prompt and one seed")
        bad = [s for s in self.seeds if not 0 <= s < 2**64]
        if bad:
            raise UsageError(f"--seeds must be 0 .. 2^64-1, got {bad[0]}")
        if (
            options.identity_weight < 0
            or options.text_weight < 0
            or options.identity_weight + options.text_weight <= 0
        ):
            raise UsageError("--identity-weight and --text-weight must be >= 0 and not both 0")

    def prompt_texts(self) -> list[tuple[str, str]]:
        """(full prompt sent, text CLIP scores against) per scene."""
        return [
            (self.character.prompt_text(scene), join_prompt(self.character.prompt, scene))
            for scene in self.scenes
        ]

    def run(self) -> EvalResult:
        scoring = Scoring.check(self.character, self.options)
        info = self.client.object_info()
        lora, checkpoint = check_server(info, self.lora, self.options.checkpoint, self.client.url, self.note)
        texts = self.prompt_texts()
        prefix = f"charforge_eval/{_safe(self.character.name)}_{_safe(Path(lora).stem)}"
        graph = eval_graph(
            self.character,
            lora=lora,
            checkpoint=checkpoint,
            strength=self.strengths[-1],
            prompt=texts[0][0],
            seed=self.seeds[0],
            save_prefix=prefix,
        )
        # The driver's preflight against /object_info (sampler and scheduler names, sizes, the strength range)
        # before anything is queued; the lowest and highest strength bound the others.
        for strength in {self.strengths[0], self.strengths[-1]}:
            self.client.prepare_run(
                graph,
                sets=[f"{LORA}.strength_model={strength!r}", f"{LORA}.strength_clip={strength!r}"],
                preflight=True,
                upload=False,
            )
        fulls = [full for full, _ in texts]
        if len(set(fulls)) < len(fulls):
            raise UsageError(f"two prompts give the same text once the character's prompt is added: {fulls}")
        plan = plan_grid(
            graph, self.strengths, fulls, self.seeds, name=f"lora eval {lora} on {self.character.name}"
        )
        renders = self.out_dir / RENDERS
        check_resumable(plan, renders, self.out_dir)
        scoring.load(self.note)
        self.note(
            f"identity reference: {scoring.identity_source} ({scoring.analyzer.name}, threshold "
            f"{scoring.threshold:.3f}); text agreement: {scoring.clip_name or 'not scored'}"
        )
        index = {full: i for i, (full, _) in enumerate(texts)}
        images: dict[str, EvalImage] = {}
        for job in plan.jobs:
            full = job.axes["prompt"]
            images[job.id] = EvalImage(
                float(job.axes["strength"]),
                index[full],
                int(job.axes["seed"]),
                full,
                texts[index[full]][1],
                job.id,
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        total = len(plan.jobs)
        self.note(
            f"rendering {total} image(s): {len(self.strengths)} strength(s) x {len(self.scenes)} prompt(s) x "
            f"{len(self.seeds)} seed(s) of {lora} on {checkpoint} ({self.client.url}); folder {renders}"
        )
        finished = 0
        for outcome in _render(
            plan, _server_for_batch(self.client, self.options), renders, self.options, self.note
        ):
            image = images.get(outcome.job.id)
            if image is None:
                continue
            finished += 1
            self._collect(image, outcome, scoring)
            where = f"[{finished}/{total}] strength {strength_label(image.strength)}, P{image.prompt_index + 1}, seed {image.seed}"
            if image.state != "done":
                self.note(
                    f"{where}: {image.state} ({(image.error or '').splitlines()[0] if image.error else ''})"
                )
            else:
                self.note(
                    f"{where}: identity {_cell(image.identity)}"
                    + (f" ({image.identity_note})" if image.identity is None else "")
                    + f", text {_cell(image.text)}"
                    + (" (earlier run)" if outcome.skipped else "")
                )
        ordered = [images[job.id] for job in plan.jobs]
        return self._write(ordered, scoring, lora, checkpoint)

    def _collect(self, image: EvalImage, outcome: Any, scoring: Scoring) -> None:
        image.state = outcome.state
        if not outcome.ok:
            image.error = outcome.reason or outcome.state
            return
        image.file = first_image(list(outcome.files))
        if image.file is None:
            image.state, image.error = "failed", "the job wrote no image"
            return
        try:
            scoring.score(image)
        except (OSError, ValueError) as exc:  # an unreadable download
            image.state, image.error = "failed", f"cannot score {image.file.name}: {exc}"

    def _write(self, images: list[EvalImage], scoring: Scoring, lora: str, checkpoint: str) -> EvalResult:
        options = self.options
        weights = (options.identity_weight, options.text_weight if scoring.clip is not None else 0.0)
        summaries, best = summarise(images, self.strengths, weights[0], weights[1], scoring.threshold)
        if scoring.clip is not None and weights[1] > 0:
            combined = (
                f"combined = ({weights[0]:g} x identity + {weights[1]:g} x 2.5 x max(text, 0)) / "
                f"{weights[0] + weights[1]:g}, means over the row; images without a face count 0 identity"
            )
        else:
            combined = (
                "combined = mean identity over the row, images without a face counting 0; text not scored"
            )
        failed = sum(1 for image in images if image.state != "done")
        gen = self.character.generation
        title = (
            f"LoRA {lora} on {self.character.display_name or self.character.name} ({checkpoint}, "
            f"{gen.steps} steps, cfg {gen.cfg:g}, {gen.sampler}/{gen.scheduler})"
        )
        if best is not None:
            title += f" - best strength {strength_label(best.strength)}"
        grid = draw_grid(
            images,
            self.strengths,
            self.scenes,
            self.seeds,
            summaries,
            best,
            title,
            (gen.width, gen.height),
            options.cell,
            combined,
        )
        grid_path = self.out_dir / GRID_NAME
        grid.save(grid_path)
        table = table_text(summaries, best)
        verdict = (
            f"best strength: {strength_label(best.strength)} (combined {best.combined:.4f})"
            if best is not None
            else "no strength could be scored (no image was rendered)"
        )
        table_path = self.out_dir / TABLE_NAME
        prompts = "\n".join(f"- P{i + 1}: {full}" for i, (full, _) in enumerate(self.prompt_texts()))
        table_path.write_text(
            f"# {title}\n\n{table}\n\n{verdict}\n\n{combined}; ties go to the lower strength.\n\n"
            f"Prompts (seeds {', '.join(map(str, self.seeds))}):\n{prompts}\n",
            encoding="utf-8",
        )
        results_path = self.out_dir / RESULTS_NAME
        data = {
            "format": FORMAT,
            "version": VERSION,
            "lora": lora,
            "character": self.character.name,
            "checkpoint": checkpoint,
            "server": self.client.url,
            "strengths": self.strengths,
            "seeds": self.seeds,
            "prompts": [
                {"index": i + 1, "scene": scene, "prompt": full, "scored_text": text}
                for i, (scene, (full, text)) in enumerate(zip(self.scenes, self.prompt_texts(), strict=True))
            ],
            "negative_prompt": self.character.negative_prompt,
            "generation": gen.to_dict(),
            "scoring": {
                "face_models": scoring.analyzer.name,
                "identity": scoring.identity.name,
                "identity_source": scoring.identity_source,
                "threshold": _round(scoring.threshold),
                "clip": scoring.clip_name,
                "identity_weight": weights[0],
                "text_weight": weights[1],
                "combined": combined,
                "ties": "lower strength",
            },
            "best_strength": best.strength if best is not None else None,
            "per_strength": [s.to_dict() for s in summaries],
            "images": [image.to_dict(self.out_dir) for image in images],
            "grid": GRID_NAME,
            "table": TABLE_NAME,
            "renders": RENDERS,
            "failed": failed,
        }
        tmp = results_path.with_name(results_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, results_path)
        return EvalResult(
            self.out_dir,
            lora,
            self.character.name,
            checkpoint,
            images,
            summaries,
            best,
            grid_path,
            results_path,
            table_path,
            f"{table}\n{verdict}",
            failed,
        )


def evaluate_lora(
    client: Any,
    character: str | Any,
    lora: str,
    out_dir: str | Path,
    options: EvalOptions | None = None,
    note: Callable[[str], None] | None = None,
) -> EvalResult:
    """Render and score `lora` on `character` (a preset name or a loaded preset) through `client`'s server.

    Raises :class:`~charforge.driver.errors.UsageError` for a bad request (unknown character, LoRA or checkpoint
    not on the server, scoring models or packages missing) before anything is rendered.
    """
    if isinstance(character, (str, os.PathLike)):
        character = load_character(str(character))
    return LoraEval(client, character, lora, options or EvalOptions(), out_dir, note).run()
