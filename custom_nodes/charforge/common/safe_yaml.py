"""Reading the small YAML files users hand CharForge (character presets, scene lists, batch specs, the config
file) without surprises.

YAML aliases (``*name``) let a few hundred bytes expand into gigabytes ("billion laughs"), and an error
message that quotes the expanded value is as large. The files read here never need aliases, so any alias
is refused while parsing (before anything is built), documents are capped in size, and `short_repr` keeps
the values that error messages quote short.
"""

from __future__ import annotations

import reprlib
from typing import Any

MAX_YAML_BYTES = 1_000_000  # a preset, scene list, sweep spec or config file is a few kilobytes


class UnsafeYaml(ValueError):
    """A YAML document refused before it was built (aliases, or too large); the message says why."""


_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a few elements per level and a few levels (for error messages)."""
    return _REPR.repr(value)


def load_yaml(text: str, source: str = "the YAML file", max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Parse one YAML document with PyYAML's safe loader, refusing aliases and documents over `max_bytes`.

    Raises `UnsafeYaml` for a refused document and ``yaml.YAMLError`` for one that is not valid YAML.
    """
    import yaml

    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise UnsafeYaml(
            f"{source} is {size} bytes; YAML files read here are at most {max_bytes} bytes "
            "(a preset, scene list, sweep spec or config file is a few kilobytes)"
        )
    # Scan the events first: an alias is refused before any node is composed, so nothing expands.
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1 if event.start_mark else "?"
            raise UnsafeYaml(
                f"{source} line {line}: YAML aliases (*{str(event.anchor)[:40]}) are not allowed "
                "here; write the value out instead of referring to an anchor (&name)"
            )
    return yaml.safe_load(text)
