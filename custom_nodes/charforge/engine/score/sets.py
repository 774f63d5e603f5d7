"""Sets of images judged as wholes: the checkpoints of a training run, the arms of an ablation.

- `folder_images` / `labelled_images`: images of a folder or a file list as (name, RGB array) pairs, with
  the unreadable ones named instead of raised;
- `checkpoint_groups`: a run's sample images grouped by checkpoint (one subfolder each, or the step tag in
  sd-scripts / ai-toolkit sample names) and `sample_prompts`, each sample's prompt by its prompt index;
- `score_set`: identity (and CLIP) sheets of one set; `select.summarise_set` / `best_set` summarise them;
- `write_sets_csv`: the per-set metrics as a CSV file.
"""

from __future__ import annotations

import csv
import os
import re
import uuid
from collections.abc import Sequence
from typing import Any

from ..control import Control
from .identity import ReferenceIdentity
from .scoring import score_identity
from .select import SetSummary
from .sheet import ScoreSheet

# Sample names that carry the checkpoint: sd-scripts ``<name>_e000004_00_<time>.png`` (epoch) or
# ``<name>_000500_00_<time>.png`` (step), then the prompt index; ai-toolkit ``<time>__000000500_0.jpg``.
SD_SCRIPTS_SAMPLE = re.compile(r"(?:^|_)(e\d{6}|\d{6})_(\d{2})(?:_|\.|$)")
AI_TOOLKIT_SAMPLE = re.compile(r"__(\d{9})_(\d+)")
SAMPLE_NAMES = (SD_SCRIPTS_SAMPLE, AI_TOOLKIT_SAMPLE)


def labelled_images(paths: Sequence[str]) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """(file name, RGB uint8 array) for each readable image; (file name, reason) for the others."""
    import numpy as np

    from ..dataset import load_image

    images, skipped = [], []
    for path in paths:
        try:
            images.append((os.path.basename(path), np.asarray(load_image(path))))
        except Exception as exc:  # noqa: BLE001 - any decoder failure: report the file, keep going
            skipped.append((os.path.basename(path), f"unreadable image: {exc}"))
    return images, skipped


def folder_images(folder: str) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """The images of `folder` as `labelled_images` gives them; files that are no image are skipped too."""
    from ..dataset import scan_folder

    result = scan_folder(folder)
    images, skipped = labelled_images(result.images)
    return images, [(os.path.basename(r.path), r.reason) for r in result.rejected] + skipped


def checkpoint_groups(root: str) -> dict[str, list[str]]:
    """Sample images per checkpoint: one subfolder per checkpoint, or names with the kohya/ai-toolkit step tag
    (`SAMPLE_NAMES`). Raises with what to do when a flat file name carries no tag."""
    from ..dataset import scan_folder

    result = scan_folder(root, recursive=True)
    groups: dict[str, list[str]] = {}
    nested = [p for p in result.images if os.path.dirname(p) != os.path.normpath(root)]
    if nested:
        for path in nested:
            groups.setdefault(os.path.relpath(os.path.dirname(path), root), []).append(path)
        return groups
    unknown = []
    for path in result.images:
        name = os.path.basename(path)
        match = next((m for m in (p.search(name) for p in SAMPLE_NAMES) if m), None)
        if match:
            groups.setdefault(match.group(1), []).append(path)
        else:
            unknown.append(name)
    if unknown or not groups:
        raise ValueError(
            f"cannot tell which checkpoint each sample in {root} belongs to ({len(unknown)} file(s) like "
            f"{unknown[:3]}): put each checkpoint's samples in its own subfolder (named after the checkpoint), or "
            f"keep sd-scripts / ai-toolkit sample names"
        )
    return groups


def natural_key(text: str) -> list[tuple[int, int, str]]:
    """Sort key that puts ``step_2`` before ``step_10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text.lower()) if t]


def sample_prompts(labels: Sequence[str], lines: Sequence[str]) -> list[str]:
    """The prompt of each sample: by its sd-scripts / ai-toolkit prompt index when the name has one, else by
    position (cycling through `lines`); one line or none: `lines` as given."""
    if len(lines) <= 1:
        return list(lines)
    out = []
    for position, label in enumerate(labels):
        match = next((m for m in (p.search(label) for p in SAMPLE_NAMES) if m), None)
        index = int(match.group(2)) if match else position
        out.append(lines[index % len(lines)])
    return out


def score_set(
    frames: Sequence[tuple[str, Any]],
    analyzer,
    identity: ReferenceIdentity,
    clip=None,
    prompts: Sequence[str] = (),
    threshold: float | None = None,
    control: Control | None = None,
) -> tuple[ScoreSheet, ScoreSheet | None]:
    """Identity sheet (and CLIP sheet, with `clip` and `prompts`) of one set of (label, RGB array) frames.

    `prompts`: one for all frames or one per frame (otherwise the first is used for all). Frames of mixed
    sizes are CLIP-scored one at a time."""
    frames = list(frames)
    sheet = score_identity(analyzer, identity, frames, threshold, control=control)
    if clip is None or not prompts:
        return sheet, None
    import numpy as np
    import torch

    from .clip import clip_sheet

    batch = [
        torch.from_numpy(np.asarray(f, dtype=np.float32) / (255.0 if f.dtype == np.uint8 else 1.0))
        for _, f in frames
    ]
    chosen = list(prompts) if len(prompts) in (1, len(frames)) else list(prompts[:1])
    if len({tuple(b.shape) for b in batch}) == 1:
        return sheet, clip_sheet(clip, torch.stack(batch), chosen, labels=[label for label, _ in frames])
    rows = [
        clip_sheet(clip, b[None], [chosen[0 if len(chosen) == 1 else i]]).rows[0] for i, b in enumerate(batch)
    ]
    for i, row in enumerate(rows):
        row.index, row.label = i, frames[i][0]
    return sheet, ScoreSheet("clip", rows, None, clip.name)


def write_sets_csv(summaries: Sequence[SetSummary], folder: str, stem: str) -> str:
    """The summaries as ``<folder>/<stem>_<random>.csv`` (one row per set); returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{stem}_{uuid.uuid4().hex[:8]}.csv")
    rows = [s.as_dict() for s in summaries]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["name"])
        writer.writeheader()
        writer.writerows(rows)
    return path


__all__ = [
    "SAMPLE_NAMES",
    "checkpoint_groups",
    "folder_images",
    "labelled_images",
    "natural_key",
    "sample_prompts",
    "score_set",
    "write_sets_csv",
]
