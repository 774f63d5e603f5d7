"""Text from a server or a file, made harmless for a terminal: :func:`safe_text`.

Node types, exception messages, file names and the like come from whoever runs the server. Printed raw, an
escape sequence in them can retitle the window (OSC ``ESC ] 0 ; ... BEL``), clear the screen (CSI ``ESC [ 2 J``),
erase or overwrite lines (``ESC [ K``, a bare carriage return) or hide text. :func:`safe_text` replaces every
control character (C0 but newline and tab, DEL, C1 including the 8-bit CSI/OSC) by a visible escape such as
``\\x1b``, so the sequence is shown as text and never acts. The CLI's output layer (``cli.Output`` and the
progress renderers) passes everything it prints through it.
"""

from __future__ import annotations

import re

#: every C0 control but tab and newline, DEL, every C1 control
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_ONE_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: inside JSON text only C1 controls and DEL can appear raw (json.dumps escapes C0)
_JSON_RAW = re.compile(r"[\x7f-\x9f]")


def _visible(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def safe_text(text: object, *, one_line: bool = False) -> str:
    """``text`` with control characters shown as ``\\xNN``; ``one_line`` also escapes newlines and tabs."""
    value = text if isinstance(text, str) else str(text)
    return (_CONTROL_ONE_LINE if one_line else _CONTROL).sub(_visible, value)


def safe_json_line(line: str) -> str:
    """A ``json.dumps(..., ensure_ascii=False)`` line with the controls it leaves raw escaped as ``\\u00NN``."""
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", line)
