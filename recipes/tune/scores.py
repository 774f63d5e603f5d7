"""Scores of one set of evaluation images: per image (identity, text) and for the set (diversity, distances).

Per-image scoring is ``charforge lora eval``'s (:class:`~charforge.recipes.lora_eval.Scoring`: the character's
reference identity with an InsightFace pack, CLIP text agreement). On top, with the same CLIP model's image
embeddings (``charforge.engine.score.distribution``): diversity of the set, CLIP-feature MMD and KID to the
character's reference photos, similarity to the closest reference (copying), and FID when its Inception
weights are present. ``combined`` is the single number a one-objective search maximises::

    combined = (w_identity x identity + w_text x 2.5 x max(text, 0) + w_diversity x diversity) / (sum of the weights used)

where ``identity`` counts images without a face as 0 and terms without a value (no CLIP: text, diversity) are
left out with their weight.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charforge.driver.errors import UsageError

from ..lora_eval import EvalImage, EvalOptions, Scoring, photo_files

CLIPSCORE_SCALE = 2.5


@dataclass
class SetScores:
    """The scores of one set of images (a trial's evaluation renders, a LoRA in a benchmark)."""

    images: int = 0  # images scored
    faces: int = 0  # images with a face
    identity: float | None = None  # mean, images without a face counting 0
    identity_mean: float | None = None  # mean over the images with a face
    text: float | None = None  # mean CLIP cosine with the prompt
    diversity: float | None = None
    cmmd: float | None = None
    kid: float | None = None
    kid_std: float | None = None
    copying: float | None = None
    fid: float | None = None
    combined: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def combined_score(
    identity: float | None, text: float | None, diversity: float | None, weights: dict[str, float]
) -> float | None:
    """The weighted score of the module docstring (None when no weighted term has a value)."""
    terms = [
        (weights.get("identity", 0.0), identity),
        (weights.get("text", 0.0), None if text is None else CLIPSCORE_SCALE * max(text, 0.0)),
        (weights.get("diversity", 0.0), diversity),
    ]
    used = [(w, v) for w, v in terms if w > 0 and v is not None]
    total = sum(w for w, _ in used)
    return None if not used or total <= 0 else sum(w * v for w, v in used) / total


class SetScorer:
    """The loaded scoring models and the reference photos' features; thread-safe (one scoring at a time)."""

    def __init__(
        self,
        character: Any,
        *,
        face_pack: str = "buffalo_l",
        face_models_dir: str | None = None,
        det_size: int = 640,
        clip: str | None = None,
        reference: str | None = None,
        device: str | None = None,
        weights: dict[str, float] | None = None,
        fid: bool = False,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.character = character
        self.weights = dict(weights or {"identity": 1.0, "text": 0.5, "diversity": 0.5})
        self.note = note or (lambda text: None)
        # text_weight 1: CLIP is loaded whenever one is available (diversity and distances need it too).
        options = EvalOptions(
            face_pack=face_pack,
            face_models_dir=face_models_dir,
            det_size=det_size,
            clip_model=clip,
            reference=reference,
            device=device,
            identity_weight=1.0,
            text_weight=1.0,
        )
        self.scoring = Scoring.check(character, options)
        self.want_fid = fid
        self.reference_features: Any = None
        self.reference_inception: Any = None
        self.reference_photos: list[Path] = []
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the models and embed the reference photos (the distances need a folder of photos)."""
        from charforge.engine.score import distribution

        self.scoring.load(self.note)
        self.note(
            f"identity reference: {self.scoring.identity_source} ({self.scoring.analyzer.name}); CLIP: "
            f"{self.scoring.clip_name or 'none (identity only; no text, diversity or distances)'}"
        )
        folder = next(
            (
                Path(p).expanduser()
                for p in (self.scoring.options.reference, self.character.reference_photos)
                if p and Path(p).expanduser().is_dir()
            ),
            None,
        )
        if folder is None:
            self.note(
                "no reference photo folder: the distances to the references (cmmd, kid, copying) are not "
                "computed (give reference_photos in the preset or scoring.reference)"
            )
            return
        self.reference_photos = photo_files(folder)
        if self.scoring.clip is not None and len(self.reference_photos) >= 2:
            self.reference_features = distribution.clip_image_features(
                self.scoring.clip, [_rgb(p) for p in self.reference_photos]
            )
        if self.want_fid:
            missing = distribution.fid_available()
            if missing:
                self.note(f"FID not computed: {missing}")
            else:
                self.reference_inception = distribution.inception_features(
                    [_rgb(p) for p in self.reference_photos]
                )

    def score_images(self, images: Sequence[EvalImage]) -> SetScores:
        """Score every rendered image of `images` (fills their identity and text) and the set."""
        with self._lock:
            return self._score(images)

    def _score(self, images: Sequence[EvalImage]) -> SetScores:
        from charforge.engine.score import distribution

        rendered = [image for image in images if image.file is not None and image.state == "done"]
        result = SetScores(images=len(rendered))
        if not rendered:
            result.notes.append("no image was rendered")
            return result
        for image in rendered:
            try:
                self.scoring.score(image)
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot score {image.file}: {exc}") from None
        identities = [image.identity for image in rendered]
        with_face = [v for v in identities if v is not None]
        result.faces = len(with_face)
        result.identity = sum(with_face) / len(rendered)
        result.identity_mean = sum(with_face) / len(with_face) if with_face else None
        texts = [image.text for image in rendered if image.text is not None]
        result.text = sum(texts) / len(texts) if texts else None
        clip = self.scoring.clip
        if clip is not None and len(rendered) >= 2:
            pictures = [_rgb(image.file) for image in rendered if image.file is not None]
            features = distribution.clip_image_features(clip, pictures)
            result.diversity = distribution.diversity(features)
            if self.reference_features is not None:
                result.cmmd = distribution.cmmd(features, self.reference_features)
                kid = distribution.kid(features, self.reference_features)
                result.kid, result.kid_std = kid.value, kid.std
                result.copying = distribution.nearest_reference(features, self.reference_features)
            if self.reference_inception is not None:
                result.fid = distribution.frechet_distance(
                    distribution.inception_features(pictures), self.reference_inception
                )
            if min(len(rendered), len(self.reference_photos) or len(rendered)) < distribution.SMALL_SET:
                result.notes.append(
                    f"small sets ({len(rendered)} images, {len(self.reference_photos)} references): "
                    "distances are noisy; compare trials, not absolute values"
                )
        result.combined = combined_score(result.identity, result.text, result.diversity, self.weights)
        return result


def _rgb(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def parse_sample_index(name: str) -> tuple[int, int] | None:
    """``step_250_3.png`` -> (250, 3): a Train LoRA sample's step and index; None for other files."""
    import re

    match = re.fullmatch(r"step_(\d+)_(\d+)\.(?:png|jpe?g|webp)", name, flags=re.IGNORECASE)
    return (int(match.group(1)), int(match.group(2))) if match else None


def sample_images(files: Sequence[Path], prompts: Sequence[tuple[str, str]], seeds: int) -> list[EvalImage]:
    """The last step's Train LoRA samples among `files`, as images to score: sample i shows prompt i // seeds
    (the trainer renders prompt by prompt, each with every seed); `prompts` are (full, scored text) pairs."""
    found: list[tuple[tuple[int, int], Path]] = []
    for f in files:
        key = parse_sample_index(f.name)
        if key is not None:
            found.append((key, f))
    if not found:
        return []
    last = max(key[0] for key, _ in found)
    images = []
    for (step, index), file in sorted(found):
        if step != last:
            continue
        full, scored = prompts[min(index // max(seeds, 1), len(prompts) - 1)]
        images.append(
            EvalImage(
                1.0,
                index // max(seeds, 1),
                index % max(seeds, 1),
                full,
                scored,
                f"sample-{index}",
                file=file,
                state="done",
            )
        )
    return images
