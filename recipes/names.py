"""Names the recipes make from user text for files and folders (on their server and in their output folders):
ASCII letters, digits, ``_``, ``.`` and ``-`` only, so the same name works on every file system and in a URL."""

from __future__ import annotations

import re


def ascii_name(text: str, fallback: str) -> str:
    """`text` with every run of other characters made one ``_`` and no leading or trailing ``.``/``_``;
    `fallback` when nothing is left (``"Anna Müller"`` -> ``"Anna_M_ller"``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or fallback
