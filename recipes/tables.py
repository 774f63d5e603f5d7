"""Plain-text tables the recipes write into their reports (``table.md`` of ``charforge lora eval``, the table of
``charforge lora bench``): Markdown whose columns are padded, so it reads as well in a terminal as rendered."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(heads: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """`heads` and `rows` (cells already text) as a Markdown table with every column padded to its widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(heads), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]
    )
