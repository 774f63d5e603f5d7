"""Dataset synthesis: more photos from few, by swapping the character's face onto varied source images.

For every image of a source folder (poses, outfits, backgrounds): detect its faces, swap the main face
(or all) with the character's identity, optionally restore the swapped faces, score the result against
the identity, and add it to the dataset as a *synthetic* entry that names its source image. Results below
the identity threshold are kept in the manifest as rejected (with the similarity in the reason), and at
most `max_share` of the dataset's accepted images may be synthetic (`identity.cap_synthetic`).

The source folder is only read; results are written to ``<dataset>/synthetic/``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..control import Control, or_default
from ..dataset.images import file_sha256, read_rgb, write_rgb
from ..dataset.load import inside, read_caption
from ..dataset.manifest import DatasetManifest, ImageEntry
from ..dataset.scan import rejection_reason, scan_folder
from ..score import ReferenceIdentity, check_same_model
from .identity import DEFAULT_MAX_SHARE, IdentityCheck, cap_synthetic, check_identity, synthetic_allowance
from .models import ImageModel
from .restore import RestoreSettings, restore_faces
from .swap import FACE_CHOICES, SWAPPER_FACE_MODEL, FaceSwapper

SYNTHETIC_FOLDER = "synthetic"
ID_PREFIX = "syn-"


@dataclass
class SynthSettings:
    which: str = "main"  # swap the main (largest) face of each source, or "all" faces
    threshold: float | None = None  # identity similarity a result needs; None: the identity's suggestion
    max_share: float = DEFAULT_MAX_SHARE  # synthetic images as a share of the dataset's accepted images
    restore: bool = True  # restore the swapped faces when a restorer is given
    blend: float = 1.0  # restoration blend (1 = fully restored)
    fidelity: float = 0.5  # CodeFormer fidelity
    recursive: bool = False  # also read sources in subfolders
    format: str = "png"  # of the written results: png (lossless) or jpg

    def validate(self) -> None:
        if self.which not in FACE_CHOICES:
            raise ValueError(f"which must be one of {FACE_CHOICES}, got {self.which!r}")
        if self.format not in ("png", "jpg"):
            raise ValueError(f"format must be png or jpg, got {self.format!r}")
        synthetic_allowance(0, self.max_share)  # checks the range
        RestoreSettings(self.blend, self.fidelity, self.which).validate()


@dataclass
class SynthSummary:
    """What synthesis did, in numbers and names."""

    sources: int = 0
    made: int = 0  # swapped images written
    accepted: int = 0
    below_threshold: int = 0
    over_cap: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source file, why no image was made)
    threshold: float = 0.0
    allowance: int | None = None
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        parts = [
            *self.warnings,
            f"{self.made} synthetic image(s) from {self.sources} source(s): {self.accepted} accepted",
            f"{self.below_threshold} below the identity threshold {self.threshold:.3f}",
        ]
        if self.over_cap:
            parts.append(f"{self.over_cap} over the synthetic cap ({self.allowance} allowed)")
        if self.skipped:
            parts.append(
                f"{len(self.skipped)} source(s) skipped: "
                + ", ".join(f"{os.path.basename(s)} ({why})" for s, why in self.skipped[:5])
                + (" ..." if len(self.skipped) > 5 else "")
            )
        return "; ".join(parts)


def synthesize(
    manifest: DatasetManifest,
    sources: str | os.PathLike,
    identity: ReferenceIdentity,
    analyzer,
    swapper: FaceSwapper,
    restorer: ImageModel | None = None,
    settings: SynthSettings | None = None,
    control: Control | None = None,
) -> tuple[DatasetManifest, SynthSummary]:
    """A new manifest: `manifest`'s entries plus one synthetic entry per source image with a face.

    `analyzer` is a `FaceAnalyzer` with embeddings, of the face model `identity` was built with. `control`
    advances once per source image and stops the work between images (and between faces while restoring).
    """
    settings = settings or SynthSettings()
    settings.validate()
    check_same_model(identity, analyzer)
    control = or_default(control)
    threshold = identity.suggested_threshold if settings.threshold is None else float(settings.threshold)
    out = manifest.copy()
    folder = Path(out.folder) / SYNTHETIC_FOLDER
    dataset_root = Path(out.folder).resolve()
    paths = [
        p for p in scan_folder(sources, recursive=settings.recursive).images if not inside(p, dataset_root)
    ]
    summary = SynthSummary(sources=len(paths), threshold=threshold)
    if identity.model != SWAPPER_FACE_MODEL:
        summary.warnings.append(
            f"note: identity {identity.name!r} was built with {identity.model}; the swapper "
            f"was trained on {SWAPPER_FACE_MODEL} embeddings, so swapped faces may not look "
            f"like the character (rebuild the identity with buffalo_l)"
        )
    restore = RestoreSettings(settings.blend, settings.fidelity, settings.which)
    made: list[tuple[ImageEntry, IdentityCheck]] = []
    control.progress(0, max(len(paths), 1), "swapping faces")
    for index, path in enumerate(paths):
        entry_check = _synthesize_one(
            path,
            index,
            folder,
            identity,
            analyzer,
            swapper,
            restorer if settings.restore else None,
            restore,
            settings,
            threshold,
            control,
            summary,
        )
        if entry_check is not None:
            made.append(entry_check)
        control.progress(index + 1, max(len(paths), 1), os.path.basename(path))
    passing = [(entry, check.similarity or 0.0) for entry, check in made if check.passed]
    real = sum(1 for entry in out.accepted if not entry.synthetic)
    earlier = sum(1 for entry in out.accepted if entry.synthetic)  # synthetic images already in the dataset
    summary.allowance = synthetic_allowance(real, settings.max_share)
    room = None if summary.allowance is None else max(summary.allowance - earlier, 0)
    kept, over = cap_synthetic(passing, room)
    for entry in over:
        entry.reject(
            f"synthetic cap: at most {settings.max_share:.0%} of the dataset may be synthetic "
            f"({summary.allowance} for {real} photo(s)); this one scored lower than those kept"
        )
    summary.made = len(made)
    summary.accepted = len(kept)
    summary.below_threshold = sum(1 for _, check in made if not check.passed)
    summary.over_cap = len(over)
    out.entries.extend(entry for entry, _ in made)
    record = asdict(settings)
    record.update(
        {
            "sources": str(sources),
            "identity": identity.name,
            "swapper": swapper.name,
            "restorer": restorer.name if restorer is not None and settings.restore else None,
            "threshold": threshold,
        }
    )
    out.record("synthesize", record, summary.text())
    return out, summary


def _synthesize_one(
    path: str,
    index: int,
    folder: Path,
    identity: ReferenceIdentity,
    analyzer,
    swapper: FaceSwapper,
    restorer: ImageModel | None,
    restore: RestoreSettings,
    settings: SynthSettings,
    threshold: float,
    control: Control,
    summary: SynthSummary,
) -> tuple[ImageEntry, IdentityCheck] | None:
    try:
        rgb = read_rgb(path).rgb
    except Exception as exc:  # noqa: BLE001 - an unreadable source is skipped with the reason
        summary.skipped.append((path, rejection_reason(exc)))
        return None
    faces = analyzer.detect(rgb)
    if not any(face.landmarks is not None for face in faces):
        summary.skipped.append((path, "no face found"))
        return None
    swapped = swapper.swap(rgb, faces, identity.centroid, settings.which)
    result = swapped.rgb
    notes = [f"face swapped ({len(swapped.swapped)} of {swapped.faces_found} face(s)) with {swapper.name}"]
    if restorer is not None:
        control.check()
        # Re-detect: the swapped face's landmarks are where the restorer must align it.
        restored = restore_faces(restorer, result, analyzer.detect(result), restore, control)
        result = restored.rgb
        notes.append(
            f"faces restored with {restorer.name} (blend {restore.blend:g}"
            + (f", fidelity {restore.fidelity:g})" if restorer.architecture == "CodeFormer" else ")")
        )
    check = check_identity(analyzer, identity, result, threshold)
    stem = Path(path).stem
    target = folder / f"{index + 1:04d}-{stem}.{settings.format}"
    write_rgb(target, result)
    entry = ImageEntry(
        id=f"{ID_PREFIX}{index + 1:04d}",
        source=str(target),
        file=str(target),
        width=int(result.shape[1]),
        height=int(result.shape[0]),
        sha256=file_sha256(target),
        caption=read_caption(path),
        synthetic=True,
        synthesized_from=str(Path(path).resolve()),
    )
    for note in notes:
        entry.flag(note)
    if check.similarity is not None:
        entry.flag(f"identity similarity {check.similarity:.3f} to {identity.name!r}")
    if not check.passed:
        entry.reject(check.reason)
    return entry, check
