"""Augment: extra copies of each accepted photo, recorded in the manifest.

- ``flip``: a horizontally mirrored copy. Avoid it for characters with asymmetric features (a parting,
  a scar, text on clothes): the model learns both sides as equally right.
- ``color_jitter``: a copy with brightness, contrast and saturation each scaled by a random factor in
  ``1 +- strength`` (mild: 0.05-0.15). Seeded per photo, so the same settings give the same pixels.

Copies are new entries (``<id>-flip``, ``<id>-jitter``) whose ``parent`` is the original and whose
``augmentations`` say what was done; they share the original's caption. Files go to
``<dataset>/augment-<settings key>/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ...deps import require
from .images import read_rgb, write_rgb
from .manifest import DatasetManifest, ImageEntry
from .parallel import ordered_map
from .scan import rejection_reason

ProgressFn = Callable[[int, int], None]


@dataclass
class AugmentSettings:
    flip: bool = True
    color_jitter: float = 0.0  # 0 = no jittered copy; else the strength (at most 0.5)
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def jitter(rgb, strength: float, rng):
    """Scale brightness, contrast and saturation by factors drawn from ``1 +- strength``."""
    np = require("numpy")
    cv2 = require("cv2")
    b, c, s = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    image = rgb.astype(np.float32)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)[:, :, None]
    image = grey + (image - grey) * s  # saturation around each pixel's own grey
    image = (image - grey.mean()) * c + grey.mean()  # contrast around the mean level
    image = image * b
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _seed(settings: AugmentSettings, entry_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{settings.seed}:{entry_id}".encode()).digest()[:8], "little")


def _augment(entry: ImageEntry, settings: AugmentSettings, folder: Path) -> list[tuple[str, str]] | str:
    np = require("numpy")
    try:
        rgb = read_rgb(entry.file).rgb
    except Exception as exc:  # noqa: BLE001 - reject the photo, keep going
        return rejection_reason(exc)
    made = []
    fmt = "jpg" if Path(entry.file).suffix.lower() in (".jpg", ".jpeg") else "png"
    if settings.flip:
        made.append(
            ("flip", write_rgb(folder / f"{entry.id}-flip.{fmt}", np.ascontiguousarray(rgb[:, ::-1])))
        )
    if settings.color_jitter > 0:
        rng = np.random.default_rng(_seed(settings, entry.id))
        made.append(
            (
                "jitter",
                write_rgb(folder / f"{entry.id}-jitter.{fmt}", jitter(rgb, settings.color_jitter, rng)),
            )
        )
    return made


def augment(
    manifest: DatasetManifest,
    settings: AugmentSettings | None = None,
    workers: int = 0,
    on_image: ProgressFn | None = None,
) -> DatasetManifest:
    """A new manifest with the augmented copies appended after the originals."""
    settings = settings or AugmentSettings()
    if not 0.0 <= settings.color_jitter <= 0.5:
        raise ValueError(f"color_jitter {settings.color_jitter} must be between 0 and 0.5")
    out = manifest.copy()
    folder = Path(out.folder) / f"augment-{settings.key()}"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [entry for entry in out.entries if entry.accepted and not entry.parent]
    total = len(todo)

    def report(index: int, _made) -> None:
        if on_image is not None:
            on_image(index + 1, total)

    copies = []
    for entry, made in zip(
        todo, ordered_map(lambda e: _augment(e, settings, folder), todo, workers, report), strict=True
    ):
        if isinstance(made, str):
            entry.reject(made)
            continue
        for kind, path in made:
            twin = copy.deepcopy(entry)
            twin.id = f"{entry.id}-{kind}"
            twin.file = path
            twin.parent = entry.id
            twin.duplicate_group = None
            twin.augmentations = [
                *entry.augmentations,
                kind if kind == "flip" else f"color jitter {settings.color_jitter:g} (seed {settings.seed})",
            ]
            if kind == "flip" and twin.faces and twin.faces.box:
                x1, y1, x2, y2 = twin.faces.box
                twin.faces.box = [round(twin.width - x2, 1), y1, round(twin.width - x1, 1), y2]
            copies.append(twin)
    out.entries.extend(copies)
    out.record(
        "augment",
        asdict(settings),
        f"{len(copies)} augmented cop{'y' if len(copies) == 1 else 'ies'} of {len(todo)} image(s)",
    )
    return out
