"""The contact sheet of a batch: the first image of each job on a grid along two sweep axes (``contact_sheet.png``).

Columns are the values of the X axis, rows those of the Y axis, in the order of the sweep spec; jobs that share
a cell (other axes vary too) are shown side by side in it. Cells of jobs without an image (failed, not run
yet) stay grey with the reason. Labels are drawn with Pillow's built-in font, so nothing needs installing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plan import BatchError, BatchPlan, Job, value_text

SHEET_NAME = "contact_sheet.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def axes_for_sheet(plan: BatchPlan, spec: tuple[str, str] | str | None) -> tuple[str, str] | None:
    """The (X, Y) axes: those named (``"seed,strength"`` or a pair), else the two axes of a 2-axis sweep."""
    names: list[str] = []
    for job in plan.jobs:
        for name in job.axes:
            if name not in names:
                names.append(name)
    if spec is None or spec == "auto":
        return (names[0], names[1]) if len(names) == 2 else None
    pair = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if len(pair) != 2 or not all(pair):
        raise BatchError(f"--contact-sheet needs two axis names X,Y; got {spec!r}")
    for name in pair:
        if name not in names:
            raise BatchError(f"--contact-sheet: no sweep axis {name!r}; axes: {', '.join(names) or '(none)'}")
    return pair[0], pair[1]


def first_image(folder: Path) -> Path | None:
    """The first image file the job's manifest lists (or None)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for item in manifest.get("files", []):
        path = folder / str(item.get("path", ""))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            return path
    return None


def make_contact_sheet(
    out: Path, plan: BatchPlan, axes: tuple[str, str], *, cell: int = 256, name: str = SHEET_NAME
) -> Path | None:
    """Draw the sheet into ``out/name``; returns its path (None when no job of the plan has an image)."""
    from PIL import Image, ImageDraw

    x_axis, y_axis = axes
    xs: list[Any] = []
    ys: list[Any] = []
    cells: dict[tuple[int, int], list[Job]] = {}
    for job in plan.jobs:
        if x_axis not in job.axes or y_axis not in job.axes:
            continue
        xv, yv = job.axes[x_axis], job.axes[y_axis]
        if xv not in xs:
            xs.append(xv)
        if yv not in ys:
            ys.append(yv)
        cells.setdefault((xs.index(xv), ys.index(yv)), []).append(job)
    if not cells:
        return None
    per_cell = max(len(v) for v in cells.values())
    images = {job.id: first_image(out / job.folder) for group in cells.values() for job in group}
    if not any(images.values()):
        return None
    thumb = max(32, cell // per_cell) if per_cell > 1 else cell
    margin_left, margin_top, pad = 140, 40, 6
    width = margin_left + len(xs) * (thumb * per_cell + pad) + pad
    height = margin_top + len(ys) * (thumb + pad) + pad + 20
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    others = [a for a in plan.jobs[0].axes if a not in axes]
    header = f"x: {x_axis}   y: {y_axis}"
    if per_cell > 1 and others:
        header += f"   (side by side in each cell: {', '.join(others)})"
    draw.text((pad, pad), header, fill=(0, 0, 0))
    for i, xv in enumerate(xs):
        draw.text(
            (margin_left + i * (thumb * per_cell + pad) + pad, margin_top - 16),
            value_text(xv)[:40],
            fill=(0, 0, 0),
        )
    for j, yv in enumerate(ys):
        draw.text((pad, margin_top + j * (thumb + pad) + thumb // 2), value_text(yv)[:22], fill=(0, 0, 0))
    for (i, j), group in cells.items():
        for k, job in enumerate(group):
            left = margin_left + i * (thumb * per_cell + pad) + pad + k * thumb
            top = margin_top + j * (thumb + pad) + pad
            path = images.get(job.id)
            if path is None:
                draw.rectangle((left, top, left + thumb - 2, top + thumb - 2), fill=(200, 200, 200))
                draw.text((left + 4, top + 4), "no image", fill=(90, 90, 90))
                continue
            with Image.open(path) as img:
                img.seek(0)
                tile = img.convert("RGB")
                scale = min((thumb - 2) / tile.width, (thumb - 2) / tile.height)
                size = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
                # tiny test images are enlarged without blurring them
                tile = tile.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
                sheet.paste(
                    tile, (left + (thumb - 2 - tile.width) // 2, top + (thumb - 2 - tile.height) // 2)
                )
    target = Path(out) / name
    tmp = target.with_name(f".{target.name}.tmp")
    sheet.save(tmp, format="PNG")
    tmp.replace(target)
    return target
