"""``charforge lora bench``: the scores ``charforge tune`` gives a trial, for LoRAs you name (and the base model).

Every LoRA renders the same evaluation set (the character's prompt with each scene, each seed, one strength) on
one server through the batch runner, and is scored here like a trial: identity, text agreement, diversity,
CLIP-feature MMD and KID to the reference photos, copying, and the combined score. The base model (no LoRA) is
a row of its own, the floor a LoRA should beat on identity. Rerunning on the same folder resumes.

Output: ``table.md`` (also printed), ``bench.json``, ``sheet.png`` (one row of images per LoRA), and per LoRA a
folder with its renders and evaluation grid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charforge.driver.errors import UsageError

from ..names import ascii_name
from ..tables import markdown_table
from .scores import SetScorer, SetScores
from .spec import EvalSet
from .trials import EvalRenderer, PoolServer

BASE = "base model"
COLUMNS = ("combined", "identity", "faces", "text", "diversity", "cmmd", "kid", "copying", "fid")


@dataclass
class BenchRow:
    name: str  # the LoRA as the server lists it, or "base model"
    scores: SetScores
    folder: Path
    grid: Path
    failed: int


def bench_loras(
    server: PoolServer,
    character: Any,
    loras: Sequence[str],
    out: str | Path,
    *,
    evaluation: EvalSet,
    checkpoint: str,
    scorer: SetScorer,
    include_base: bool = True,
    timeout: float | None = None,
    note: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Render and score each of `loras` (and the base model) on `server`; rows in the order given, base last."""
    note = note or (lambda text: None)
    if not loras and not include_base:
        raise UsageError("lora bench: name at least one LoRA (or keep the base model row)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    renderer = EvalRenderer(character, evaluation, checkpoint, weights=scorer.weights, timeout=timeout)
    rows = []
    names: list[str | None] = [*loras, *([None] if include_base else [])]
    used: set[str] = set()
    for lora in names:
        label = lora or BASE
        folder_name = ascii_name(Path(lora).stem if lora else "base_model", "lora")
        while folder_name in used:
            folder_name += "_"
        used.add(folder_name)
        folder = out / folder_name
        note(f"{label}: rendering {len(renderer.texts) * len(evaluation.seeds)} image(s) on {server.name}")
        images, grid, _ = renderer.evaluate(lora, server, folder, lambda: False, title=label)
        scores = scorer.score_images(images)
        renderer.draw(
            images, scores, grid, f"{label} on {character.name} ({checkpoint})", scorer.scoring.threshold
        )
        failed = sum(1 for image in images if image.state != "done")
        rows.append(BenchRow(label, scores, folder, grid, failed))
        note(
            f"{label}: combined {_cell(scores.combined)}, identity {_cell(scores.identity)}, text "
            f"{_cell(scores.text)}, diversity {_cell(scores.diversity)}"
            + (
                f" ({failed} render(s) failed: {next(i.error for i in images if i.state != 'done')})"
                if failed
                else ""
            )
        )
    write_bench(out, rows, character, checkpoint, evaluation)
    return rows


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def bench_table(rows: Sequence[BenchRow]) -> str:
    """The Markdown table: one row per LoRA; the best combined score marked."""
    scored = [r for r in rows if r.scores.combined is not None]
    best = max(scored, key=lambda r: r.scores.combined or 0.0) if scored else None
    heads = ["LoRA", "images", *COLUMNS, ""]
    body = [
        [
            r.name,
            str(r.scores.images),
            *(_cell(r.scores.value(c)) for c in COLUMNS),
            "best" if r is best else "",
        ]
        for r in rows
    ]
    return markdown_table(heads, body)


def write_bench(
    out: Path, rows: Sequence[BenchRow], character: Any, checkpoint: str, evaluation: EvalSet
) -> None:
    from .report import best_grid_png_rows

    table = bench_table(rows)
    legend = (
        "higher is better: combined, identity, text, diversity; lower is better: cmmd, kid, copying, fid "
        "(distances to the reference photos). See docs/tune.md for what each means and its limits."
    )
    (out / "table.md").write_text(
        f"# lora bench: {character.name} on {checkpoint}\n\n{table}\n\n{legend}\n\n"
        f"Scenes: {'; '.join(evaluation.scenes)}; seeds {evaluation.seeds}; strength "
        f"{evaluation.strength:g}\n",
        encoding="utf-8",
    )
    data = {
        "format": "charforge.lora_bench",
        "version": 1,
        "character": character.name,
        "checkpoint": checkpoint,
        "scenes": evaluation.scenes,
        "seeds": evaluation.seeds,
        "strength": evaluation.strength,
        "rows": [
            {"lora": r.name, "folder": r.folder.name, "failed": r.failed, **r.scores.to_dict()} for r in rows
        ],
    }
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "bench.json")
    best_grid_png_rows(
        [(r.name, r.scores.to_dict(), [], r.folder) for r in rows],
        out / "sheet.png",
        "LoRAs (rows), evaluation images (columns: scene x seed)",
    )
