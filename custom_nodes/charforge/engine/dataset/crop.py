"""Crop and resize: each accepted photo to its resolution bucket, framed on the face.

The bucket is the one closest to the photo's shape (or the square one). The crop is the largest
rectangle of the bucket's shape inside the photo; with a face box it is moved so the face is centred
horizontally and has `headroom` (a share of the crop's height) above the top of the face box, then
clamped to the photo. Photos smaller than their bucket go to a smaller size of the same shape unless
`upscale` is on, or an upscale model is given: then the crop is enlarged with the model (tiled, see
``engine.synth.upscale``) instead of a plain resize, and the entry records by how much. Results are written
to ``<dataset>/crops-<settings key>/<id>.<format>`` and become the entries' working files; the source photos
are only read.

An enhanced (upscaled) crop is scored against the dataset's identity (``engine.synth.identity.EnhanceCheck``:
the identity Analyse built, or one given). When enhancement changed who the face looks like, the enhanced
crop is refused and the crop the stage makes without a model is kept instead: the photo itself passed Filter,
only the model failed it. Either way the entry's ``enhanced`` record says what happened, with the source
photo, the factor, the similarity and the reason.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .buckets import BUCKET_SETS, bucket_list, closest_bucket, fit_without_upscale, square_bucket
from .images import read_rgb, resize, write_rgb
from .manifest import DatasetManifest, ImageEntry
from .parallel import ordered_map
from .scan import rejection_reason

ProgressFn = Callable[[int, int], None]
CROP_MODES = ("face", "centre")
FORMATS = ("png", "jpg")


@dataclass
class CropSettings:
    bucket_set: str = "sdxl"  # "sdxl" (~1 MP) or "sd15" (~0.26 MP)
    mode: str = "face"  # "face": framed on the main face when there is one; "centre": centre crop
    headroom: float = 0.15  # share of the crop height kept above the face box
    square: bool = False  # every image to the square bucket
    upscale: bool = False  # enlarge photos smaller than their bucket
    format: str = "jpg"  # quality 95: PNG is lossless but ~15x slower to write and ~3x larger

    def key(self) -> str:
        """A short name for these settings: different settings write to different folders."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]

    def validate(self) -> None:
        if self.bucket_set not in BUCKET_SETS:
            raise ValueError(f"bucket set {self.bucket_set!r} is not one of {', '.join(BUCKET_SETS)}")
        if self.mode not in CROP_MODES:
            raise ValueError(f"crop mode {self.mode!r} is not one of {', '.join(CROP_MODES)}")
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if not 0.0 <= self.headroom <= 0.9:
            raise ValueError(
                f"headroom {self.headroom} must be between 0 and 0.9 (a share of the crop height)"
            )


def plan_crop(
    width: int, height: int, bucket: tuple[int, int], face_box: list[float] | None, headroom: float
) -> tuple[int, int, int, int]:
    """The crop (x1, y1, x2, y2) of a width x height photo with the bucket's aspect ratio."""
    aspect = bucket[0] / bucket[1]
    crop_w = min(float(width), height * aspect)
    crop_h = crop_w / aspect
    if face_box is not None:
        fx1, fy1, fx2, fy2 = face_box
        x = (fx1 + fx2) / 2 - crop_w / 2
        y = fy1 - headroom * crop_h
        face_h = fy2 - fy1
        if face_h + headroom * crop_h > crop_h:  # a face taller than the crop: keep its centre instead
            y = (fy1 + fy2) / 2 - crop_h / 2
    else:
        x = (width - crop_w) / 2
        y = (height - crop_h) / 2
    x = min(max(x, 0.0), width - crop_w)
    y = min(max(y, 0.0), height - crop_h)
    return round(x), round(y), round(x + crop_w), round(y + crop_h)


def target_size(entry: ImageEntry, settings: CropSettings) -> tuple[int, int]:
    """The bucket an entry goes to (before the no-upscale rule)."""
    if settings.square:
        return square_bucket(settings.bucket_set)
    return closest_bucket(entry.width, entry.height, bucket_list(settings.bucket_set))


# One upscale at a time: the model's activations, not the worker count, bound the memory of this stage.
_upscale_lock = threading.Lock()


def crop_entry(
    entry: ImageEntry, settings: CropSettings, folder: Path, upscaler: Any = None, check: Any = None
) -> dict:
    """Crop, resize and write one entry; returns the fields to update (or an "error").

    `upscaler` (an ``engine.synth.ImageModel``) enlarges crops smaller than their bucket; `check` (an
    ``engine.synth.EnhanceCheck``) scores each enlarged crop, and a refused one gives way to the plain crop."""
    bucket = target_size(entry, settings)
    # The final size first (a smaller photo keeps its own size), then the crop of exactly that shape,
    # so the resize never stretches.
    enlarge = settings.upscale or upscaler is not None
    size = bucket if enlarge else fit_without_upscale(bucket, entry.width, entry.height)
    face = entry.faces.box if (settings.mode == "face" and entry.faces and entry.faces.box) else None
    box = plan_crop(entry.width, entry.height, size, face, settings.headroom)
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    try:
        # Decode no larger than needed: a JPEG twice the bucket's size decodes at half scale.
        decoded = read_rgb(entry.file, min_scale=min(1.0, size[0] / crop_w, size[1] / crop_h))
    except Exception as exc:  # noqa: BLE001 - unreadable now: reject, keep going
        return {"error": rejection_reason(exc)}
    rgb = decoded.rgb
    fx = rgb.shape[1] / entry.width
    fy = rgb.shape[0] / entry.height
    x1, y1 = int(round(box[0] * fx)), int(round(box[1] * fy))
    x2, y2 = max(x1 + 1, int(round(box[2] * fx))), max(y1 + 1, int(round(box[3] * fy)))
    region = rgb[y1:y2, x1:x2]
    factor = max(size[0] / region.shape[1], size[1] / region.shape[0])
    notes = [] if face or settings.mode == "centre" else ["no face box: centre crop"]
    upscaled = None
    enhanced: dict[str, Any] | None = None
    if upscaler is not None and factor > 1.0:
        from ..synth.upscale import upscale_to

        with _upscale_lock:
            resized = upscale_to(upscaler, region, size)
        upscaled = round(factor, 2)
        enhanced = {"by": upscaler.name, "factor": upscaled, "source": entry.source, "kept": True}
        verdict = None
        if check is not None:
            try:
                verdict, before = check.judge(resize(region, size), resized)
            except Exception as exc:  # noqa: BLE001 - a face model failing on one crop must not stop the rest
                from .load import short_error

                enhanced["reason"] = f"identity check failed: {short_error(exc)}"
        if verdict is not None:
            enhanced.update(
                similarity=None if verdict.similarity is None else round(verdict.similarity, 4),
                before=None if before is None else round(before, 4),
                threshold=check.threshold,
            )
            if not verdict.passed:
                plain = crop_entry(entry, settings, folder)
                if "error" not in plain:
                    enhanced.update(kept=False, reason=verdict.reason)
                    plain["notes"].append(
                        f"upscaling {upscaled:g}x with {upscaler.name} refused: {verdict.reason}; "
                        "the un-enhanced crop is kept"
                    )
                    plain["enhanced"] = enhanced
                return plain
        notes.append(
            f"upscaled {upscaled:g}x with {upscaler.name} ({region.shape[1]}x{region.shape[0]} -> "
            f"{size[0]}x{size[1]})"
        )
    else:
        resized = resize(region, size)
    path = write_rgb(folder / f"{entry.id}.{settings.format}", resized)
    if size != bucket:
        notes.append(f"smaller than its bucket {bucket[0]}x{bucket[1]}: kept at {size[0]}x{size[1]}")
    return {
        "file": path,
        "bucket": list(size),
        "crop_box": list(box),
        "notes": notes,
        "upscaled": upscaled,
        "enhanced": enhanced,
    }


def _move_face(entry: ImageEntry, box: list[int], size: list[int]) -> None:
    # Face boxes are in the working file's pixels: follow the crop and the resize.
    if not entry.faces or not entry.faces.box:
        return
    sx = size[0] / (box[2] - box[0])
    sy = size[1] / (box[3] - box[1])
    x1, y1, x2, y2 = entry.faces.box
    moved = [(x1 - box[0]) * sx, (y1 - box[1]) * sy, (x2 - box[0]) * sx, (y2 - box[1]) * sy]
    entry.faces.box = [round(min(max(v, 0.0), limit), 1) for v, limit in zip(moved, size * 2, strict=True)]
    if entry.faces.size is not None:
        entry.faces.size = round(entry.faces.size * min(sx, sy), 1)


def crop_dataset(
    manifest: DatasetManifest,
    settings: CropSettings | None = None,
    workers: int = 0,
    on_image: ProgressFn | None = None,
    upscaler: Any = None,
    identity_check: bool = True,
    analyzer: Any = None,
    identity: Any = None,
    threshold: float | None = None,
) -> DatasetManifest:
    """A new manifest whose accepted entries point at their cropped, bucket-sized working files.

    With `upscaler` (an ``engine.synth.ImageModel``), crops smaller than their bucket are enlarged to it
    with the model; those entries get ``upscaled`` (the factor), ``enhanced`` and a note naming the model.
    With `identity_check`, each enlarged crop is scored against `identity` (a ``ReferenceIdentity``;
    default: the dataset's own, from Analyse) with `analyzer` (default: the identity's face pack) at
    `threshold` (default: the identity's); one below it is refused and the plain crop kept
    (``engine.synth.identity.EnhanceCheck``). Without an identity the stage's summary says so.
    """
    settings = settings or CropSettings()
    settings.validate()
    out = manifest.copy()
    check, check_note = None, ""
    if upscaler is not None:
        if identity_check:
            from ..synth.identity import enhance_check

            check, check_note = enhance_check(out, analyzer, identity, threshold)
        else:
            check_note = "enhanced images not scored: the identity check is switched off"
    key = (
        settings.key()
        if upscaler is None
        else hashlib.sha256(f"{settings.key()}:{upscaler.name}".encode()).hexdigest()[:8]
    )
    folder = Path(out.folder) / f"crops-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [entry for entry in out.entries if entry.accepted]
    total = len(todo)

    def report(index: int, _result: dict) -> None:
        if on_image is not None:
            on_image(index + 1, total)

    for entry, result in zip(
        todo,
        ordered_map(lambda e: crop_entry(e, settings, folder, upscaler, check), todo, workers, report),
        strict=True,
    ):
        if "error" in result:
            entry.reject(result["error"])
            continue
        entry.file = result["file"]
        _move_face(entry, result["crop_box"], result["bucket"])
        entry.width, entry.height = result["bucket"]
        entry.bucket = result["bucket"]
        entry.crop_box = result["crop_box"]
        entry.upscaled = result["upscaled"]
        entry.enhanced = result.get("enhanced")
        for note in result["notes"]:
            entry.flag(note)
    buckets: dict[str, int] = {}
    for entry in out.accepted:
        if entry.bucket:
            key = f"{entry.bucket[0]}x{entry.bucket[1]}"
            buckets[key] = buckets.get(key, 0) + 1
    histogram = ", ".join(f"{k}: {v}" for k, v in sorted(buckets.items()))
    upscaled = [entry for entry in todo if entry.upscaled]
    summary = f"{len(todo)} image(s) cropped into {folder.name} ({histogram})"
    identity_note = None
    if upscaler is not None:
        summary += f"; {len(upscaled)} upscaled with {upscaler.name}"
        refused = [entry for entry in todo if entry.enhanced and not entry.enhanced["kept"]]
        if refused:
            summary += f"; {len(refused)} upscale(s) refused by the identity check (plain crop kept)"
        identity_note = check.describe() if check is not None else check_note
        if check is None:
            summary += f"; {check_note}"
    out.record(
        "crop",
        {
            **asdict(settings),
            "upscaler": upscaler.name if upscaler is not None else None,
            "identity_check": identity_note,
        },
        summary,
    )
    return out
