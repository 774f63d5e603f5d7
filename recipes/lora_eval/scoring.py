"""Local scoring for ``charforge lora eval``: the face and CLIP models, per-image scores, per-strength summaries."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charforge.driver.errors import UsageError

from .plan import IMAGE_SUFFIXES, SCORING_INSTALL, EvalImage, EvalOptions, StrengthSummary
from .sheet import strength_label

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
    """Per-strength means and combined score (see the package docstring), each image's combined score, and the
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
