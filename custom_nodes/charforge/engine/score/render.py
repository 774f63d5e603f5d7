"""Pictures of scores, drawn with Pillow only: tables (shown in ComfyUI like any image) and a line plot.

`table_image` and `line_plot` draw; `sheet_table` (a `ScoreSheet`) and `sets_table` (per-set summaries) lay
out the score tables the nodes show.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
MUTED = (130, 130, 130)
GRID = (225, 225, 225)
PASS = (226, 244, 228)
FAIL = (252, 228, 226)
NONE = (238, 238, 238)
LINE = (40, 90, 200)
THRESHOLD = (210, 60, 50)
MAX_TABLE_ROWS = 80


def load_font(size: int):
    """Pillow's built-in font at `size` pixels (one fixed size on Pillow < 10.1): the same on every machine."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def text_width(draw, text: str, font) -> int:
    """Width in pixels of `text` drawn with `font`."""
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table_image(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    row_status: Sequence[str | None] | None = None,
    footer: str = "",
    font_size: int = 14,
):
    """A PIL image of a table. `row_status` per row: "pass", "fail", "none" (no score) or None (plain)."""
    from PIL import Image, ImageDraw

    font, bold = load_font(font_size), load_font(font_size + 2)
    shown = list(rows[:MAX_TABLE_ROWS])
    status = list(row_status[:MAX_TABLE_ROWS]) if row_status else [None] * len(shown)
    more = len(rows) - len(shown)
    texts = [[_cell(v) for v in row] for row in shown]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, line = 10, font_size + 10
    widths = [
        max([text_width(probe, str(c), font)] + [text_width(probe, r[i], font) for r in texts]) + 2 * pad
        for i, c in enumerate(columns)
    ]
    notes = [n for n in (footer, f"... and {more} more row(s) (see the JSON output)" if more else "") if n]
    width = max(
        sum(widths),
        text_width(probe, title, bold) + 2 * pad,
        *(text_width(probe, n, font) + 2 * pad for n in notes),
        200,
    )
    height = line + 6 + line * (len(texts) + 1) + line * len(notes) + pad
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((pad, 5), title, fill=INK, font=bold)
    y = line + 6
    x = 0
    for col, w in zip(columns, widths, strict=True):
        draw.text((x + pad, y + 4), str(col), fill=INK, font=font)
        x += w
    draw.line([(0, y + line - 1), (width, y + line - 1)], fill=INK)
    y += line
    fills = {"pass": PASS, "fail": FAIL, "none": NONE}
    for row, state in zip(texts, status, strict=True):
        if state in fills:
            draw.rectangle([0, y, width, y + line - 1], fill=fills[state])
        x = 0
        for value, w in zip(row, widths, strict=True):
            draw.text((x + pad, y + 4), value, fill=MUTED if value == "-" else INK, font=font)
            x += w
        draw.line([(0, y + line - 1), (width, y + line - 1)], fill=GRID)
        y += line
    for note in notes:
        draw.text((pad, y + 4), note, fill=MUTED, font=font)
        y += line
    return image


def line_plot(
    title: str,
    values: Sequence[float | None],
    threshold: float | None = None,
    size: tuple[int, int] = (800, 360),
    y_label: str = "similarity",
    x_label: str = "frame",
):
    """A PIL line plot of per-frame values; None values (no face) are marked below the axis."""
    from PIL import Image, ImageDraw

    width, height = size
    font = load_font(13)
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 16, 34, height - 44
    draw.text((left, 8), title, fill=INK, font=load_font(15))
    known = [v for v in values if v is not None]
    low = min([0.0, *known, *([threshold] if threshold is not None else [])])
    high = max([1.0, *known])
    span = (high - low) or 1.0

    def y_of(v: float) -> float:
        return bottom - (v - low) / span * (bottom - top)

    count = max(len(values), 1)

    def x_of(i: int) -> float:
        return left + (i + 0.5) / count * (right - left)

    steps = 4
    for k in range(steps + 1):
        level = low + span * k / steps
        y = y_of(level)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((8, y - 7), f"{level:.2f}", fill=MUTED, font=font)
    draw.rectangle([left, top, right, bottom], outline=INK)
    tick_every = max(1, round(count / 10))
    for i in range(0, count, tick_every):
        draw.text((x_of(i) - 6, bottom + 6), str(i), fill=MUTED, font=font)
    draw.text(((left + right) // 2 - 20, height - 18), x_label, fill=MUTED, font=font)
    draw.text((right - text_width(draw, f"y: {y_label}", font), 12), f"y: {y_label}", fill=MUTED, font=font)
    if threshold is not None:
        y = y_of(threshold)
        for x in range(left, right, 12):
            draw.line([(x, y), (min(x + 6, right), y)], fill=THRESHOLD, width=2)
        draw.text((right - 120, y - 17), f"threshold {threshold:.2f}", fill=THRESHOLD, font=font)
    previous = None
    for i, v in enumerate(values):
        if v is None:
            cross = x_of(i)
            draw.line([(cross - 4, bottom - 8), (cross + 4, bottom)], fill=MUTED, width=2)
            draw.line([(cross - 4, bottom), (cross + 4, bottom - 8)], fill=MUTED, width=2)
            previous = None
            continue
        point = (x_of(i), y_of(v))
        if previous is not None:
            draw.line([previous, point], fill=LINE, width=2)
        below = threshold is not None and v < threshold
        r = 4 if count <= 120 else 2
        draw.ellipse(
            [point[0] - r, point[1] - r, point[0] + r, point[1] + r], fill=THRESHOLD if below else LINE
        )
        previous = point
    if any(v is None for v in values):
        draw.text((left + 6, bottom - 24), "x = no face", fill=MUTED, font=font)
    return image


def sheet_table(sheet, title: str | None = None):
    """A `ScoreSheet` as a table image: one row per image with its score, pass/fail and note."""
    columns = ["#", "image", sheet.metric, "pass", "faces", "note"]
    rows, status = [], []
    for row in sheet.rows:
        rows.append([row.index, row.label, row.value, row.passed, row.details.get("faces", "-"), row.reason])
        status.append("none" if row.value is None else "pass" if row.passed else "fail")
    title = title or f"{sheet.metric} scores: {sheet.source}"
    return table_image(title, columns, rows, status, footer=sheet.summary())


def sets_table(title: str, summaries: Sequence, best=None):
    """Per-set summaries (`select.SetSummary`) as a table image, the best set marked."""
    columns = [
        "set",
        "images",
        "faces",
        "identity mean",
        "identity min",
        "pass rate",
        "clip mean",
        "combined",
    ]
    rows = [
        [
            s.name,
            s.images,
            s.faces,
            s.identity_mean,
            s.identity_min,
            s.identity_pass_rate,
            s.clip_mean,
            s.combined,
        ]
        for s in summaries
    ]
    status = ["pass" if best is not None and s.name == best.name else None for s in summaries]
    footer = f"best: {best.name} (combined {best.combined:.3f})" if best else "no set had a face to score"
    return table_image(title, columns, rows, status, footer=footer)
