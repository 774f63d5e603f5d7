"""Overrides: ``--set NODE.INPUT=VALUE`` and ``--input NODE[.INPUT]=PATH`` resolved against one workflow.

A node is addressed by id, by its title (``_meta.title``) or by its class when only one node has that class;
values are typed (``12``, ``0.5``, ``true``, ``null``, JSON lists/objects, else a string) and then coerced to the
input's declared type when ``/object_info`` is known. Nothing here touches the network: uploads are only
*planned* (:func:`plan_inputs`); the client sends the files.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OverrideError, close_matches
from .object_info import InputSpec, input_names, input_spec, is_upload_input, upload_input_of

# ------------------------------------------------------------------------------------------------------------
# Node addressing
# ------------------------------------------------------------------------------------------------------------


def node_title(node: dict[str, Any]) -> str | None:
    meta = node.get("_meta")
    return meta.get("title") if isinstance(meta, dict) else None


def describe_node(prompt: dict[str, Any], node_id: str) -> str:
    node = prompt.get(node_id, {})
    title = node_title(node)
    cls = node.get("class_type")
    text = f"{node_id}"
    if title and title != cls:
        text += f' "{title}"'
    return text + f" ({cls})"


def resolve_node(prompt: dict[str, Any], ref: str) -> str:
    """The id of the node that ``ref`` names: an id, a title, or a class used by exactly one node."""
    ref = ref.strip()
    if ref in prompt:
        return ref
    by_title = [nid for nid, n in prompt.items() if node_title(n) == ref]
    if not by_title:
        by_title = [nid for nid, n in prompt.items() if (node_title(n) or "").lower() == ref.lower()]
    if len(by_title) == 1:
        return by_title[0]
    if len(by_title) > 1:
        listed = ", ".join(describe_node(prompt, nid) for nid in by_title)
        raise OverrideError(f"{len(by_title)} nodes are titled {ref!r}: {listed}; address one by its id")
    by_class = [nid for nid, n in prompt.items() if n.get("class_type") == ref]
    if len(by_class) == 1:
        return by_class[0]
    if len(by_class) > 1:
        listed = ", ".join(describe_node(prompt, nid) for nid in by_class)
        raise OverrideError(
            f"{len(by_class)} nodes have class {ref!r}: {listed}; address one by its id or title"
        )
    names = (
        list(prompt)
        + [t for t in (node_title(n) for n in prompt.values()) if t]
        + sorted({str(n.get("class_type")) for n in prompt.values()})
    )
    hint = close_matches(ref, names)
    listing = "; ".join(describe_node(prompt, nid) for nid in sorted(prompt, key=_id_key))
    text = f"no node {ref!r} in the workflow"
    if hint:
        text += f" (did you mean {', '.join(repr(h) for h in hint)}?)"
    return _raise_override(f"{text}. Nodes: {listing}")


def _raise_override(message: str) -> str:
    raise OverrideError(message)


def _id_key(node_id: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[:.]", node_id))


# ------------------------------------------------------------------------------------------------------------
# Values and overrides
# ------------------------------------------------------------------------------------------------------------

_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?")


def parse_value(text: str) -> Any:
    """Type a command-line value: int, float, true/false, null, JSON list/object/string, else the text."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    if _INT.fullmatch(t):
        return int(t)
    if _FLOAT.fullmatch(t):
        return float(t)
    if t[:1] in '[{"':
        try:
            return json.loads(t)
        except ValueError:
            return text
    return text


@dataclass
class Override:
    """``NODE.INPUT=VALUE`` as given by the user."""

    node: str
    input: str
    value: Any
    raw: str
    text: str = ""


@dataclass
class AppliedOverride:
    """An override after it was resolved to a node and typed; recorded in the manifest."""

    node_id: str
    class_type: str | None
    title: str | None
    input: str
    value: Any
    previous: Any
    spec: str = ""
    uploaded_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "node_id": self.node_id,
            "class_type": self.class_type,
            "title": self.title,
            "input": self.input,
            "value": self.value,
            "previous": self.previous,
            "given_as": self.spec,
        }
        if self.uploaded_from:
            out["uploaded_from"] = self.uploaded_from
        return out


def parse_set(text: str) -> Override:
    """Parse ``NODE.INPUT=VALUE`` (NODE may contain dots; the input name is after the last dot)."""
    if "=" not in text:
        raise OverrideError(f"--set {text!r}: expected NODE.INPUT=VALUE, e.g. --set KSampler.seed=42")
    left, raw = text.split("=", 1)
    node, dot, input_name = left.strip().rpartition(".")
    if not dot or not node.strip() or not input_name.strip():
        raise OverrideError(f"--set {text!r}: expected NODE.INPUT=VALUE (NODE is an id, a title or a class)")
    return Override(node.strip(), input_name.strip(), parse_value(raw), raw, text)


@dataclass
class InputFile:
    """``--input NODE[.INPUT]=PATH``: a local file to upload and feed to a node input."""

    node: str
    input: str | None
    path: Path
    text: str = ""


def parse_input(text: str) -> InputFile:
    """Parse ``NODE[.INPUT]=PATH``."""
    if "=" not in text:
        raise OverrideError(
            f"--input {text!r}: expected NODE=PATH or NODE.INPUT=PATH, e.g. --input 'Load Image=face.png'"
        )
    left, path = text.split("=", 1)
    if not left.strip() or not path.strip():
        raise OverrideError(f"--input {text!r}: expected NODE=PATH or NODE.INPUT=PATH")
    return InputFile(left.strip(), None, Path(path.strip()).expanduser(), text)


def coerce_value(value: Any, raw: str, spec: InputSpec | None, where: str) -> Any:
    """Convert a parsed value to the declared input type (``raw`` is the text as typed)."""
    if spec is None:
        return value
    kind, options = spec
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options") or []
        if value in choices and not isinstance(value, bool):
            return value
        for text in (raw, raw.strip()):
            if text in choices:
                return text
        # A number or keyword typed for a text combo stays text; the preflight reports unknown choices.
        return raw.strip() if not isinstance(value, (list, dict)) else value
    if kind == "STRING":
        return value if isinstance(value, str) else raw
    if kind == "INT":
        if isinstance(value, bool) or value is None:
            raise OverrideError(f"{where}: expects an integer, got {raw!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise OverrideError(f"{where}: expects an integer, got {raw!r}")
    if kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OverrideError(f"{where}: expects a number, got {raw!r}")
        return float(value)
    if kind == "BOOLEAN":
        if isinstance(value, bool):
            return value
        low = raw.strip().lower()
        if low in ("1", "yes", "on"):
            return True
        if low in ("0", "no", "off"):
            return False
        raise OverrideError(f"{where}: expects true or false, got {raw!r}")
    return value


def wrap_list(value: Any) -> Any:
    """Lists are links in the API format; literal lists travel as ``{"__value__": [...]}``."""
    return {"__value__": value} if isinstance(value, list) else value


def _previous(value: Any) -> Any:
    if isinstance(value, list) and len(value) == 2:
        return {"link": [str(value[0]), value[1]]}
    return value


def check_input_name(
    prompt: dict[str, Any], node_id: str, name: str, object_info: dict[str, Any] | None, where: str
) -> None:
    """Raise when ``name`` is not an input of the node (per ``/object_info``, else per the workflow)."""
    node = prompt[node_id]
    known = input_names(object_info, node.get("class_type"))
    if known is None:
        known = list(node.get("inputs", {}))
        if name in known:
            return
        hint = close_matches(name, known)
        extra = f" (did you mean {', '.join(hint)}?)" if hint else ""
        raise OverrideError(
            f"{where}: node {describe_node(prompt, node_id)} has no input {name!r} in this "
            f"workflow{extra}; its inputs: {', '.join(known) or 'none'}"
        )
    if name in known or name in node.get("inputs", {}):
        return
    hint = close_matches(name, known)
    extra = f" (did you mean {', '.join(hint)}?)" if hint else ""
    raise OverrideError(
        f"{where}: {node.get('class_type')} has no input {name!r}{extra}; its inputs: {', '.join(known)}"
    )


def apply_overrides(
    prompt: dict[str, Any], overrides: list[Override], object_info: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[AppliedOverride]]:
    """Return a copy of ``prompt`` with the overrides applied, and what was changed."""
    new = copy.deepcopy(prompt)
    applied: list[AppliedOverride] = []
    for ov in overrides:
        where = f"--set {ov.text or ov.node + '.' + ov.input}"
        node_id = resolve_node(new, ov.node)
        node = new[node_id]
        check_input_name(new, node_id, ov.input, object_info, where)
        spec = input_spec(object_info, node.get("class_type"), ov.input)
        value = coerce_value(ov.value, ov.raw, spec, f"{where} ({node.get('class_type')}.{ov.input})")
        previous = node["inputs"].get(ov.input)
        node["inputs"][ov.input] = wrap_list(value)
        applied.append(
            AppliedOverride(
                node_id,
                node.get("class_type"),
                node_title(node),
                ov.input,
                value,
                _previous(previous),
                ov.text,
            )
        )
    return new, applied


@dataclass
class PlannedUpload:
    """A local file that must be uploaded and then written into ``node_id.input``."""

    node_id: str
    input: str
    path: Path
    spec: str
    override_index: int | None = None


def plan_inputs(
    prompt: dict[str, Any],
    inputs: list[InputFile],
    applied: list[AppliedOverride],
    object_info: dict[str, Any] | None,
) -> list[PlannedUpload]:
    """Find the uploads needed: every ``--input``, and every override of a file-picking input whose value is
    an existing local file."""
    planned: list[PlannedUpload] = []
    for item in inputs:
        where = f"--input {item.text}"
        try:
            node_id = resolve_node(prompt, item.node)
            input_name = item.input
        except OverrideError:
            ref, dot, name = item.node.rpartition(".")
            if not dot:
                raise
            node_id = resolve_node(prompt, ref)
            input_name = name
        cls = prompt[node_id].get("class_type")
        if input_name is None:
            input_name = upload_input_of(object_info, cls)
            if input_name is None:
                candidates = [
                    n for n in prompt[node_id].get("inputs", {}) if n in ("image", "video", "audio", "file")
                ]
                if len(candidates) != 1:
                    raise OverrideError(
                        f"{where}: cannot tell which input of {describe_node(prompt, node_id)} takes "
                        "the file; write NODE.INPUT=PATH"
                    )
                input_name = candidates[0]
        check_input_name(prompt, node_id, input_name, object_info, where)
        path = item.path
        if not path.is_file():
            raise OverrideError(f"{where}: file not found: {path}")
        planned.append(PlannedUpload(node_id, input_name, path, item.text))
    for index, ov in enumerate(applied):
        if not isinstance(ov.value, str):
            continue
        spec = input_spec(object_info, ov.class_type, ov.input)
        if not is_upload_input(spec):
            continue
        path = Path(ov.value).expanduser()
        choices = spec[0] if spec and isinstance(spec[0], list) else []
        if ov.value not in choices and path.is_file():
            planned.append(PlannedUpload(ov.node_id, ov.input, path, ov.spec, override_index=index))
    return planned
