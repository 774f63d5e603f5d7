"""What ``charforge lora eval`` writes besides the results: the score table and the grid image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..tables import markdown_table
from .plan import EvalImage, StrengthSummary


def strength_label(strength: float) -> str:
    """``0.4`` -> ``"0.4"``, ``1.0`` -> ``"1.0"`` (not ``"1"``)."""
    text = f"{strength:g}"
    return f"{strength:.1f}" if text.lstrip("-").isdigit() else text


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_text(summaries: list[StrengthSummary], best: StrengthSummary | None) -> str:
    """The per-strength table (Markdown, readable as plain text)."""
    heads = [
        "strength",
        "images",
        "faces",
        "identity mean",
        "identity min",
        "pass rate",
        "text mean",
        "combined",
        "",
    ]
    rows = [
        [
            strength_label(s.strength),
            str(s.images),
            "-" if s.faces is None else str(s.faces),
            _cell(s.identity_mean),
            _cell(s.identity_min),
            "-" if s.identity_pass_rate is None else f"{100 * s.identity_pass_rate:.0f}%",
            _cell(s.text_mean),
            _cell(s.combined, 4),
            "best" if best is not None and s is best else "",
        ]
        for s in summaries
    ]
    return markdown_table(heads, rows)


# --------------------------------------------------------------------------------------------------
# The grid image


@dataclass(frozen=True)
class GridLayout:
    """Where things go on the grid image: rows = strengths, columns = prompt x seed."""

    rows: int
    columns: int
    thumb: tuple[int, int]  # image area of a cell (width, height)
    left: int = 150  # row labels
    top: int = 64  # title and column labels
    caption: int = 36  # score band under each image
    pad: int = 8
    footer: int = 0

    @property
    def cell_size(self) -> tuple[int, int]:
        return self.thumb[0] + self.pad, self.thumb[1] + self.caption + self.pad

    @property
    def size(self) -> tuple[int, int]:
        width, height = self.cell_size
        return (
            self.left + self.columns * width + self.pad,
            self.top + self.rows * height + self.pad + self.footer,
        )

    def image_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the image area of cell (row, column)."""
        width, height = self.cell_size
        x0 = self.left + column * width + self.pad
        y0 = self.top + row * height + self.pad
        return x0, y0, x0 + self.thumb[0], y0 + self.thumb[1]


def grid_layout(
    rows: int, columns: int, image_size: tuple[int, int], cell: int = 256, legend_lines: int = 0
) -> GridLayout:
    """The layout for `rows` x `columns` images of `image_size`, each scaled to fit `cell` pixels."""
    width, height = image_size
    scale = cell / max(width, height, 1)
    thumb = (max(1, round(width * scale)), max(1, round(height * scale)))
    return GridLayout(rows, columns, thumb, footer=16 * legend_lines + (8 if legend_lines else 0))


def draw_grid(
    images: list[EvalImage],
    strengths: Sequence[float],
    scenes: Sequence[str],
    seeds: Sequence[int],
    summaries: list[StrengthSummary],
    best: StrengthSummary | None,
    title: str,
    image_size: tuple[int, int],
    cell: int = 256,
    combined_note: str = "",
) -> Any:
    """The labelled grid: one row per strength, one column per (prompt, seed), scores under each image."""
    from PIL import Image, ImageDraw

    from charforge.engine.score.render import BACKGROUND, FAIL, INK, MUTED, NONE, PASS, load_font

    legend = [f"P{i + 1}: {scene}"[:160] for i, scene in enumerate(scenes)]
    if combined_note:
        legend.append(combined_note[:160])
    layout = grid_layout(len(strengths), len(scenes) * len(seeds), image_size, cell, len(legend))
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, small, big = load_font(13), load_font(11), load_font(15)
    draw.text((layout.pad, 8), title[:200], fill=INK, font=big)
    for column in range(layout.columns):
        prompt, seed = divmod(column, len(seeds))
        x0, _, x1, _ = layout.image_box(0, column)
        draw.text((x0, layout.top - 22), f"P{prompt + 1} / seed {seeds[seed]}", fill=INK, font=font)
    by_cell = {(image.strength, image.prompt_index, image.seed): image for image in images}
    by_strength = {s.strength: s for s in summaries}
    for row, strength in enumerate(strengths):
        _, y0, _, _ = layout.image_box(row, 0)
        summary = by_strength.get(strength)
        is_best = best is not None and summary is best
        draw.text((layout.pad, y0 + 4), f"strength {strength_label(strength)}", fill=INK, font=big)
        if summary is not None:
            draw.text(
                (layout.pad, y0 + 26), f"identity {_cell(summary.identity_mean)}", fill=MUTED, font=small
            )
            draw.text((layout.pad, y0 + 42), f"text {_cell(summary.text_mean)}", fill=MUTED, font=small)
            draw.text((layout.pad, y0 + 58), f"combined {_cell(summary.combined)}", fill=INK, font=small)
        if is_best:
            draw.text((layout.pad, y0 + 78), "BEST", fill=(20, 120, 40), font=big)
            x_end = layout.size[0] - layout.pad // 2
            draw.rectangle(
                [
                    layout.pad // 2,
                    y0 - layout.pad // 2,
                    x_end,
                    y0 + layout.thumb[1] + layout.caption + layout.pad // 2,
                ],
                outline=(20, 120, 40),
                width=3,
            )
        for column in range(layout.columns):
            prompt, seed_index = divmod(column, len(seeds))
            x0, y0, x1, y1 = layout.image_box(row, column)
            image = by_cell.get((strength, prompt, seeds[seed_index]))
            if image is None or image.file is None:
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=NONE)
                reason = "not rendered" if image is None else (image.error or image.state)
                draw.text((x0 + 6, y0 + 6), reason.splitlines()[0][:40], fill=MUTED, font=small)
                continue
            with Image.open(image.file) as picture:
                tile = picture.convert("RGB")
            scale = min(layout.thumb[0] / tile.width, layout.thumb[1] / tile.height)
            size = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
            if size != tile.size:
                tile = tile.resize(size, Image.Resampling.LANCZOS)
            sheet.paste(
                tile, (x0 + (layout.thumb[0] - tile.width) // 2, y0 + (layout.thumb[1] - tile.height) // 2)
            )
            fill = NONE if image.identity is None else PASS if image.identity_passed else FAIL
            draw.rectangle([x0, y1, x1 - 1, y1 + layout.caption - 2], fill=fill)
            identity = (
                f"id {_cell(image.identity)}"
                if image.identity is not None
                else f"id - ({image.identity_note or 'no face'})"
            )
            draw.text((x0 + 4, y1 + 3), identity[:40], fill=INK, font=small)
            draw.text(
                (x0 + 4, y1 + 18),
                f"text {_cell(image.text)}   comb {_cell(image.combined)}",
                fill=INK,
                font=small,
            )
    y = layout.size[1] - layout.footer
    for line in legend:
        draw.text((layout.pad, y), line, fill=MUTED, font=small)
        y += 16
    return sheet
