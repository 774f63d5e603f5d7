"""Sets of images judged as wholes: the checkpoints of a training run, the arms of an ablation.

- `folder_images` / `labelled_images`: images of a folder or a file list as (name, RGB array) pairs, with
  the unreadable ones named instead of raised;
- `checkpoint_groups`: a run's sample images grouped by checkpoint (one subfolder each, or the step tag in
  sd-scripts / ai-toolkit sample names) and `sample_prompts`, each sample's prompt by its prompt index;
- `score_set`: identity (and CLIP) sheets of one set; `select.summarise_set` / `best_set` summarise them;
- `write_sets_csv`: the per-set metrics as a CSV file;
- `run_folder_of` / `record_run_scores` / `read_run_scores`: a CharForge training run's per-checkpoint
  scores, kept in its run folder (``scores.json``) for the editor's panel.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ..control import Control
from .identity import ReferenceIdentity
from .scoring import score_identity
from .select import SetSummary
from .sheet import ScoreSheet

# Sample names that carry the checkpoint: CharForge's own ``step_000500_0.png`` (engine/train/run.py), sd-scripts ``<name>_e000004_00_<time>.png`` (epoch) or
# ``<name>_000500_00_<time>.png`` (step), then the prompt index; ai-toolkit ``<time>__000000500_0.jpg``.
SD_SCRIPTS_SAMPLE = re.compile(r"(?:^|_)(e\d{6}|\d{6})_(\d{2})(?:_|\.|$)")
AI_TOOLKIT_SAMPLE = re.compile(r"__(\d{9})_(\d+)")
CHARFORGE_SAMPLE = re.compile(r"^step_(\d{6})_(\d+)\.")
SAMPLE_NAMES = (CHARFORGE_SAMPLE, SD_SCRIPTS_SAMPLE, AI_TOOLKIT_SAMPLE)

RUN_SCORES_FILE = "scores.json"
RUN_SCORES_FORMAT = "charforge.run_scores"
_RUN_SCORES_LOCK = threading.Lock()


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


# --------------------------------------------------------------------------------------------------
# Scores of a CharForge training run, kept in its run folder


def run_folder_of(samples_folder: str) -> str | None:
    """The CharForge run folder whose samples `samples_folder` is (``<run>/samples``, the run folder holding
    ``status.json``), links resolved; None for any other folder (sd-scripts / ai-toolkit output, a copy)."""
    real = os.path.realpath(samples_folder)
    parent = os.path.dirname(real)
    if os.path.basename(real) == "samples" and os.path.isfile(os.path.join(parent, "status.json")):
        return parent
    return None


def _checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint group of a CharForge run: ``000500`` (the sample names' tag) or a subfolder
    such as ``step_500``; None when the name has no number."""
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else None


def read_run_scores(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run folder's ``scores.json`` (``{"checkpoints": {step: {...}}, "best": step or None, ...}``);
    empty when it has none or it does not read."""
    try:
        with open(os.path.join(run_dir, RUN_SCORES_FILE), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), dict):
        return {}
    return data


def record_run_scores(
    run_dir: str | os.PathLike,
    summaries: Sequence[SetSummary],
    basis: dict[str, Any],
) -> dict[str, Any]:
    """Merge the per-checkpoint `summaries` of one scoring into ``<run_dir>/scores.json`` and return it.

    A checkpoint scored again replaces its earlier entry; the others stay. `basis` says what the numbers
    were measured with (identity, CLIP model, threshold, weights); ``best`` is the step with the highest
    combined value among the checkpoints scored on the newest entry's basis (values of different identities
    or weights are not comparable). The file is written to a temporary file in the run folder and moved into
    place; nothing is written anywhere else."""
    run_dir = os.path.realpath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"no run folder {run_dir}")
    now = time.time()
    with _RUN_SCORES_LOCK:
        data = read_run_scores(run_dir)
        checkpoints = dict(data.get("checkpoints", {}))
        for summary in summaries:
            step = _checkpoint_step(summary.name)
            if step is None:
                continue
            checkpoints[str(step)] = {**summary.as_dict(), "step": step, **basis, "scored_at": now}
        comparable = [c for c in checkpoints.values() if all(c.get(k) == v for k, v in basis.items())]
        ranked = [c for c in comparable if c.get("combined") is not None]
        best = max(
            ranked,
            key=lambda c: (c["combined"], c.get("identity_pass_rate") or 0.0, -c["step"]),
            default=None,
        )
        data = {
            "format": RUN_SCORES_FORMAT,
            "version": 1,
            "checkpoints": dict(sorted(checkpoints.items(), key=lambda item: int(item[0]))),
            "best": best["step"] if best else None,
            "updated_at": now,
        }
        handle, tmp = tempfile.mkstemp(prefix=f".{RUN_SCORES_FILE}.", suffix=".tmp", dir=run_dir)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=1, sort_keys=True)
                out.write("\n")
            os.replace(tmp, os.path.join(run_dir, RUN_SCORES_FILE))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return data


__all__ = [
    "RUN_SCORES_FILE",
    "SAMPLE_NAMES",
    "checkpoint_groups",
    "folder_images",
    "labelled_images",
    "natural_key",
    "read_run_scores",
    "record_run_scores",
    "run_folder_of",
    "sample_prompts",
    "score_set",
    "write_sets_csv",
]
