"""Export: the accepted photos in kohya's folder layout, with caption sidecars and the manifest.

```
<dataset>/<export name>/
  img/                               <- pass THIS folder as train_data_dir (the parent, not the inner one)
    <repeats>_<trigger> <class>/
      0001.png
      0001.txt                       <- one line, UTF-8, trigger first
  dataset.toml                       <- the same dataset as a kohya --dataset_config file
  manifest.json                      <- every entry, accepted or not, with its exported file
```

Re-exporting is idempotent: files whose bytes would not change are left alone, and anything else under
``img/`` (photos rejected since, an old folder name after the trigger changed) is removed. Only the
export folder is written; photos are copied, never moved.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .images import EXIF_ORIENTATION, encode_rgb, read_rgb, write_bytes_atomic
from .manifest import DatasetManifest, ImageEntry

CAPTION_MODES = ("caption, trigger first", "caption as is", "trigger and class only")
# Formats kohya's loader reads as they are; anything else (or anything needing conversion) becomes PNG.
COPYABLE = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}


@dataclass
class ExportResult:
    manifest: DatasetManifest
    train_data_dir: str  # the `img` folder
    subject_dir: str  # the `<repeats>_<trigger> <class>` folder
    written: int  # image files (re)written
    unchanged: int  # image files already up to date
    removed: int  # stale files removed
    summary: str


def _clean_token(text: str) -> str:
    # Folder-name safe on every OS; kohya splits the folder name on the first "_" only.
    return " ".join(text.replace("/", " ").replace("\\", " ").replace(":", " ").split())


def subject_folder_name(repeats: int, trigger: str, class_tokens: str) -> str:
    tokens = " ".join(t for t in (_clean_token(trigger), _clean_token(class_tokens)) if t)
    if not tokens:
        raise ValueError("give a trigger word or class tokens: kohya names the training folder after them")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    return f"{int(repeats)}_{tokens}"


def caption_for(entry: ImageEntry, trigger: str, class_tokens: str, mode: str) -> str:
    """The one-line caption written next to an image."""
    trigger, class_tokens = trigger.strip(), class_tokens.strip()
    default = ", ".join(t for t in (trigger, class_tokens) if t)
    caption = " ".join((entry.caption or "").split())  # one line: kohya reads only the first
    if mode == "trigger and class only" or not caption:
        return default
    if mode == "caption, trigger first" and trigger and not _starts_with(caption, trigger):
        words = [p.strip() for p in caption.split(",")]
        rest = ", ".join(p for p in words if p and p.lower() != trigger.lower())
        return f"{trigger}, {rest}" if rest else trigger
    return caption


def _starts_with(caption: str, trigger: str) -> bool:
    return caption.split(",")[0].strip().lower() == trigger.lower()


def _export_plan(entry: ImageEntry) -> tuple[str, bool]:
    """(extension, copy bytes as they are?) for an entry's working file."""
    from ..images import open_image

    try:
        with open_image(entry.file) as img:
            orientation = int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
            if img.format in COPYABLE and img.mode == "RGB" and orientation == 1:
                return COPYABLE[img.format], True
    except Exception:  # noqa: BLE001 - let the re-encode below raise the real error
        pass
    return ".png", False


def _same_bytes(a: Path, b: Path) -> bool:
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    return _digest(a) == _digest(b)


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's (``\\n``, ``\\t``, ``\\uXXXX``), plus DEL, which TOML
    does not allow raw (a folder or class name with a newline must not break the file)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def dataset_toml(subject_dir: Path, repeats: int, class_tokens: str, manifest: DatasetManifest) -> str:
    """A kohya ``--dataset_config`` for the exported folder (buckets as the last Crop made them)."""
    crop = next((h.settings for h in reversed(manifest.history) if h.stage == "crop"), None)
    resolution, smallest, largest = (
        (1024, 256, 2048) if not crop or crop.get("bucket_set") == "sdxl" else (512, 256, 1024)
    )
    return "\n".join(
        [
            "# Written by CharForge. Use with: --dataset_config dataset.toml",
            "[general]",
            'caption_extension = ".txt"',
            "keep_tokens = 1  # the trigger word comes first in every caption",
            "",
            "[[datasets]]",
            f"resolution = {resolution}",
            "enable_bucket = true",
            f"min_bucket_reso = {smallest}",
            f"max_bucket_reso = {largest}",
            "bucket_reso_steps = 64",
            "bucket_no_upscale = true",
            "",
            "  [[datasets.subsets]]",
            f"  image_dir = {_toml_string(subject_dir.as_posix())}",
            f"  num_repeats = {int(repeats)}",
            f"  class_tokens = {_toml_string(class_tokens)}",
            "",
        ]
    )


def export_kohya(
    manifest: DatasetManifest,
    trigger: str,
    class_tokens: str,
    repeats: int = 10,
    export_name: str = "kohya",
    caption_mode: str = CAPTION_MODES[0],
    on_image=None,
) -> ExportResult:
    """Write the accepted entries into ``<dataset>/<export_name>`` in kohya's layout (see module doc)."""
    if caption_mode not in CAPTION_MODES:
        raise ValueError(f"caption mode {caption_mode!r} is not one of {', '.join(CAPTION_MODES)}")
    from .load import safe_name

    out = manifest.copy()
    root = Path(out.folder) / safe_name(export_name)
    img_dir = root / "img"
    subject = img_dir / subject_folder_name(repeats, trigger, class_tokens)
    subject.mkdir(parents=True, exist_ok=True)
    keep: set[Path] = set()
    written = unchanged = 0
    exported = out.copy()
    exported.folder = str(root)
    exported_by_id = exported.by_id()
    accepted = out.accepted
    for index, entry in enumerate(accepted):
        ext, copy_as_is = _export_plan(entry)
        target = subject / f"{entry.id}{ext}"
        if copy_as_is:
            if _same_bytes(Path(entry.file), target):
                unchanged += 1
            else:
                shutil.copyfile(entry.file, target)
                written += 1
        elif write_bytes_atomic(target, encode_rgb(read_rgb(entry.file).rgb, ext), only_if_changed=True):
            written += 1
        else:
            unchanged += 1
        caption_path = target.with_suffix(".txt")
        caption = caption_for(entry, trigger, class_tokens, caption_mode) + "\n"
        write_bytes_atomic(caption_path, caption.encode("utf-8"), only_if_changed=True)
        keep.update({target, caption_path})
        exported_by_id[entry.id].file = str(target)
        if on_image is not None:
            on_image(index + 1, len(accepted))
    removed = _remove_stale(img_dir, keep)
    toml = dataset_toml(
        subject, repeats, " ".join(t for t in (trigger.strip(), class_tokens.strip()) if t), out
    )
    write_bytes_atomic(root / "dataset.toml", toml.encode("utf-8"), only_if_changed=True)
    out.export_dir = str(img_dir)
    exported.export_dir = str(img_dir)
    settings = {
        "trigger": trigger,
        "class_tokens": class_tokens,
        "repeats": repeats,
        "caption_mode": caption_mode,
    }
    # The exported manifest says what is there, not what this run changed: re-exporting rewrites nothing.
    exported.record("export", settings, f"{len(accepted)} image(s) exported to {subject}")
    summary = (
        f"{len(accepted)} image(s) exported to {subject} ({written} written, {unchanged} unchanged, "
        f"{removed} stale file(s) removed); train_data_dir = {img_dir}"
    )
    out.record("export", settings, summary)
    text = json.dumps(exported.to_dict(), indent=1, ensure_ascii=False) + "\n"
    write_bytes_atomic(root / "manifest.json", text.encode("utf-8"), only_if_changed=True)
    return ExportResult(out, str(img_dir), str(subject), written, unchanged, removed, summary)


def _remove_stale(img_dir: Path, keep: set[Path]) -> int:
    removed = 0
    for path in sorted(img_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() and path not in keep:
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed
