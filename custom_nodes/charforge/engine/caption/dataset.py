"""Caption a dataset manifest in place: captions into the manifest and the sidecars of the working files.

Modes:

- ``skip existing``: an accepted photo that already has a caption (in the manifest, e.g. picked up by
  Load from the user's own sidecar, or in its CharForge sidecar) is left alone; the model never sees it;
- ``overwrite``: every accepted photo is captioned anew;
- ``append``: the new caption is added after the existing one (the rules then de-duplicate the parts).

Augmented copies (``parent`` set) take the new caption of their original when it was captioned in the
same run (a mirrored photo shows the same things), so the model runs once per photo.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..dataset.images import read_rgb
from ..dataset.manifest import DatasetManifest, ImageEntry
from .backends.base import Captioner
from .postprocess import CaptionRules, apply_rules
from .sidecars import existing_caption, sidecar_path, write_sidecar

MODES = ("skip existing", "overwrite", "append")
ProgressFn = Callable[[int, int], None]


@dataclass
class CaptionRun:
    """What `caption_dataset` did."""

    manifest: DatasetManifest
    captioned: list[str] = field(default_factory=list)  # entry ids
    skipped: list[str] = field(default_factory=list)  # already captioned (skip existing)
    copied: list[str] = field(default_factory=list)  # augmented copies that took their original's caption
    failed: dict[str, str] = field(default_factory=dict)  # entry id -> why (unreadable, empty caption)
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        text = (
            f"captioned {len(self.captioned)}, copied to {len(self.copied)} augmented cop(ies), "
            f"skipped {len(self.skipped)} already captioned, {len(self.failed)} without caption"
        )
        if self.failed:
            text += ": " + "; ".join(f"{k} ({v})" for k, v in list(self.failed.items())[:8])
        if self.notes:
            text += "\n" + "\n".join(self.notes)
        return text


def _load(entry: ImageEntry, max_side: int | None):
    from PIL import Image

    return Image.fromarray(read_rgb(entry.file, max_side=max_side).rgb)


def caption_dataset(
    manifest: DatasetManifest,
    captioner: Captioner,
    rules: CaptionRules,
    mode: str = "skip existing",
    on_image: ProgressFn | None = None,
    batch_size: int | None = None,
    workers: int = 0,
) -> CaptionRun:
    """Caption the accepted photos of a copy of `manifest`; writes sidecars, returns the copy and a report.

    `on_image(done, total)` is called after each photo (it may raise to cancel: captions finished so far
    are already in their sidecars and in the returned manifest only if it returns normally). `workers`:
    threads decoding photos (0: up to 8, one per CPU core).
    """
    if mode not in MODES:
        raise ValueError(f"caption mode {mode!r} is not one of {', '.join(MODES)}")
    manifest = manifest.copy()
    run = CaptionRun(manifest)
    todo: list[ImageEntry] = []
    copies: list[ImageEntry] = []
    for entry in manifest.accepted:
        old = existing_caption(manifest, entry)
        if mode == "skip existing" and old:
            if entry.caption != old:
                entry.caption = old  # the sidecar knew it; the manifest now does too
            run.skipped.append(entry.id)
        elif entry.parent is not None:
            copies.append(entry)
        else:
            todo.append(entry)
    total = len(todo) + len(copies)
    done = 0
    size = max(1, int(batch_size or captioner.batch_size or 1))
    new_captions: dict[str, str] = {}
    batches = [todo[start : start + size] for start in range(0, len(todo), size)]
    threads = max(1, int(workers or min(8, os.cpu_count() or 1)))
    # Photos are decoded on `threads` threads, and the next batch is decoded while the model captions the
    # current one, so a GPU model does not wait for JPEG decoding.
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="charforge-caption-load") as pool:

        def submit(entries):
            return [pool.submit(_load, entry, captioner.max_side) for entry in entries]

        pending = submit(batches[0]) if batches else []
        for index, entries in enumerate(batches):
            futures, pending = pending, (submit(batches[index + 1]) if index + 1 < len(batches) else [])
            batch, images = [], []
            for entry, future in zip(entries, futures, strict=True):
                try:
                    images.append(future.result())
                    batch.append(entry)
                except Exception as exc:  # noqa: BLE001 - a broken file is reported, the rest goes on
                    run.failed[entry.id] = f"unreadable: {exc}"
                    done += 1
                    if on_image:
                        on_image(done, total)
            raw = captioner.caption(images) if images else []
            if len(raw) != len(images):
                raise RuntimeError(f"{captioner.name} returned {len(raw)} captions for {len(images)} images")
            for entry, text in zip(batch, raw, strict=True):
                written = _store(manifest, entry, text, rules, mode, run)
                if written is not None:
                    new_captions[entry.id] = written
                done += 1
                if on_image:
                    on_image(done, total)
    for entry in copies:
        if entry.parent in new_captions:
            _write(manifest, entry, new_captions[entry.parent])
            run.copied.append(entry.id)
        else:  # the original was not captioned now: caption the copy itself
            try:
                text = captioner.caption([_load(entry, captioner.max_side)])[0]
            except Exception as exc:  # noqa: BLE001
                from ... import bridge

                if bridge.is_cancellation(exc):
                    raise
                run.failed[entry.id] = f"unreadable: {exc}"
            else:
                _store(manifest, entry, text, rules, mode, run)
        done += 1
        if on_image:
            on_image(done, total)
    run.notes.extend(captioner.notes())
    return run


def _store(
    manifest: DatasetManifest, entry: ImageEntry, text: str, rules: CaptionRules, mode: str, run: CaptionRun
) -> str | None:
    """Write `text` (after the rules) as the caption of `entry` and return it; None when it is empty."""
    if not text or not text.strip():
        run.failed[entry.id] = "the captioner gave no caption"
        return None
    if mode == "append":
        old = existing_caption(manifest, entry)
        if old:
            text = f"{old}, {text}"
    caption = apply_rules(text, rules).text
    _write(manifest, entry, caption)
    run.captioned.append(entry.id)
    return caption


def _write(manifest: DatasetManifest, entry: ImageEntry, caption: str) -> None:
    write_sidecar(sidecar_path(manifest, entry), caption)
    entry.caption = caption
