"""The ablation: does the setup help? Storyboards of the same scenes and seeds made the simple way, with
reference guidance (one row per guidance kind when a run compares several: ``reference/faceid``,
``reference/img2img``, ...) and with the base model without the LoRA, compared by mean identity similarity
to the character and mean text agreement (CLIP cosine with each frame's prompt)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .storyboard import Storyboard


@dataclass
class AblationRow:
    mode: str  # the storyboard's key: its mode, or e.g. "reference/faceid"
    label: str
    frames: int
    faces: int  # frames where a face was found (identity measured)
    identity_mean: float | None
    identity_min: float | None
    text_mean: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ablation_rows(storyboards: list[Storyboard]) -> list[AblationRow]:
    """One row per storyboard, in the order given."""
    rows = []
    for board in storyboards:
        stats = board.stats()
        rows.append(
            AblationRow(
                board.key,
                board.label,
                stats["frames"],
                stats["faces"],
                stats["identity_mean"],
                stats["identity_min"],
                stats["text_mean"],
            )
        )
    return rows


def _best(rows: list[AblationRow], key: str) -> str | None:
    scored = [r for r in rows if getattr(r, key) is not None]
    return max(scored, key=lambda r: getattr(r, key)).mode if scored else None


def ablation_to_dict(rows: list[AblationRow]) -> dict[str, Any]:
    return {
        "metrics": {
            "identity_mean": "mean cosine similarity (ArcFace) of each frame's face to the character's identity; "
            "frames without a face are left out and counted in 'faces'",
            "text_mean": "mean CLIP cosine between each frame and its prompt (text agreement)",
        },
        "modes": [r.to_dict() for r in rows],
        "best_identity": _best(rows, "identity_mean"),
        "best_text": _best(rows, "text_mean"),
    }


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def ablation_to_markdown(rows: list[AblationRow], title: str = "Storyboard ablation") -> str:
    lines = [
        f"# {title}",
        "",
        "| mode | frames | frames with a face | mean identity | min identity | mean text agreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.frames} | {r.faces} | {_cell(r.identity_mean)} | {_cell(r.identity_min)} "
            f"| {_cell(r.text_mean)} |"
        )
    data = ablation_to_dict(rows)
    lines += [
        "",
        "Identity: ArcFace cosine similarity of each frame's face to the character (higher is the same "
        "person more clearly); frames without a face are not averaged. Text agreement: CLIP cosine between "
        "each frame and its prompt; '-' when no CLIP model was available.",
    ]
    labels = {r.mode: r.label for r in rows}
    if data["best_identity"]:
        lines.append(f"Best identity: {labels[data['best_identity']]}.")
    if data["best_text"]:
        lines.append(f"Best text agreement: {labels[data['best_text']]}.")
    return "\n".join(lines) + "\n"


def write_ablation(rows: list[AblationRow], folder: str | Path, stem: str = "ablation") -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` into `folder`; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / f"{stem}.md", folder / f"{stem}.json"
    md.write_text(ablation_to_markdown(rows), encoding="utf-8")
    js.write_text(json.dumps(ablation_to_dict(rows), indent=1) + "\n", encoding="utf-8")
    return md, js
