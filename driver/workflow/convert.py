"""Convert an editor (UI-format) workflow into the API format, using the server's ``/object_info``.

What the editor saves and the API needs differ in ways that silently break naive converters:

* ``widgets_values`` is a positional list. Names come from ``/object_info``: the inputs that have a widget
  (INT, FLOAT, STRING, BOOLEAN, combos; not ``forceInput`` sockets), required then optional, in
  ``input_order``. A widget converted to a socket keeps its slot (the link wins over the value).
* Seed-like widgets are followed by the editor's ``control_after_generate`` value (``fixed``/``randomize``...),
  which is not an input: INT widgets whose options set ``control_after_generate`` (or, when the option is
  absent, the legacy names ``seed``/``noise_seed``), and combos with the option (two extra values: the mode
  and a filter string). A stray mode value after any number widget is skipped too.
* File-picking combos carry an extra ``upload`` value (it trails the real widgets, so it is ignored).
* Literal list values are wrapped as ``{"__value__": [...]}`` (a bare list is a link).
* UI-only nodes disappear: ``Reroute`` (followed upstream), ``PrimitiveNode`` (its value is inlined into every
  target), ``Note``/``MarkdownNote`` (dropped).
* Muted nodes (mode 2) are dropped; bypassed nodes (mode 4) are wired through: a consumer of output *k* gets
  the input of the same type (the same index preferred).
* Subgraphs (``definitions.subgraphs``; an instance's ``type`` is the subgraph id) are expanded; inner nodes get
  ids ``<instance>:<inner>`` (nested: ``a:b:c``) like the editor's execution ids.
* ``_meta.title`` keeps each node's title. Text widgets with ``dynamicPrompts`` get ``{a|b}`` choices expanded
  and comments removed, as the editor does when queueing.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConversionError, close_matches
from .object_info import combo_choices, split_spec

CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
LEGACY_SEED_NAMES = frozenset({"seed", "noise_seed"})
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
MUTED, BYPASSED = 2, 4
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20


@dataclass
class _Slot:
    name: str
    type: str
    source: tuple[str, int] | None = None
    widget: str | None = None


@dataclass
class _Node:
    id: str
    type: str
    kind: str  # "real", "reroute", "primitive", "note", "sg_in", "sg_out"
    mode: int = 0
    title: str | None = None
    widgets_values: Any = None
    inputs: list[_Slot] = field(default_factory=list)
    output_types: list[str] = field(default_factory=list)
    properties: dict[str, Any] = field(default_factory=dict)
    values: dict[int, Any] = field(default_factory=dict)  # sg_in: subgraph inputs fed by promoted widgets
    overrides: dict[str, Any] = field(default_factory=dict)  # widget values promoted to a subgraph instance


@dataclass
class _Link:
    id: Any
    origin_id: Any
    origin_slot: int
    target_id: Any
    target_slot: int
    type: Any = None


def _links(raw: Any) -> dict[Any, _Link]:
    links: dict[Any, _Link] = {}
    if raw is not None and not isinstance(raw, list):
        raise ConversionError(
            f"the workflow's 'links' is {type(raw).__name__}, expected a list; the workflow file "
            "is damaged - open and save it again in the ComfyUI editor"
        )
    for item in raw or []:
        try:
            if isinstance(item, (list, tuple)) and len(item) >= 5:
                link = _Link(
                    item[0], item[1], int(item[2]), item[3], int(item[4]), item[5] if len(item) > 5 else None
                )
            elif isinstance(item, dict) and "id" in item:
                link = _Link(
                    item["id"],
                    item.get("origin_id"),
                    int(item.get("origin_slot") or 0),
                    item.get("target_id"),
                    int(item.get("target_slot") or 0),
                    item.get("type"),
                )
            else:
                continue
            links[link.id] = link
        except (TypeError, ValueError):
            raise ConversionError(
                f"link {str(item)[:80]} of the workflow is malformed (slots must be numbers); "
                "the workflow file is damaged - open and save it again in the ComfyUI editor"
            ) from None
    return links


class _Flattener:
    """Expands subgraphs and records, for every input slot of every node, which (node, slot) feeds it."""

    def __init__(self, workflow: dict[str, Any]) -> None:
        self.nodes: dict[str, _Node] = {}
        self.definitions: dict[str, dict[str, Any]] = {}
        self._collect_definitions(workflow)

    def _collect_definitions(self, graph: dict[str, Any]) -> None:
        for sub in (graph.get("definitions") or {}).get("subgraphs") or []:
            if isinstance(sub, dict) and sub.get("id"):
                self.definitions[str(sub["id"])] = sub
                self._collect_definitions(sub)

    def flatten(self, graph: dict[str, Any], prefix: str = "", depth: int = 0) -> None:
        if depth > 32:
            raise ConversionError(
                "subgraphs are nested more than 32 levels deep (a subgraph contains itself?)"
            )
        links = _links(graph.get("links"))
        instances = {
            str(n.get("id")): n
            for n in graph.get("nodes") or []
            if isinstance(n, dict) and str(n.get("type")) in self.definitions
        }

        def origin(link_id: Any) -> tuple[str, int] | None:
            if link_id is None or link_id not in links:
                return None
            link = links[link_id]
            if link.origin_id == SUBGRAPH_INPUT or str(link.origin_id) == str(SUBGRAPH_INPUT):
                return f"{prefix}{SUBGRAPH_INPUT}", link.origin_slot
            if str(link.origin_id) in instances:
                return f"{prefix}{link.origin_id}:{SUBGRAPH_OUTPUT}", link.origin_slot
            return f"{prefix}{link.origin_id}", link.origin_slot

        # The enclosing instance's output proxy reads from links into the subgraph's output node.
        if prefix:
            out_proxy = self.nodes.get(f"{prefix}{SUBGRAPH_OUTPUT}")
            if out_proxy is not None:
                for k, slot in enumerate(out_proxy.inputs):
                    ids = (graph.get("outputs") or [{}] * len(out_proxy.inputs))[k].get("linkIds") or []
                    if not ids:
                        ids = [
                            lk.id
                            for lk in links.values()
                            if str(lk.target_id) == str(SUBGRAPH_OUTPUT) and lk.target_slot == k
                        ]
                    slot.source = origin(ids[0]) if ids else None

        for raw in graph.get("nodes") or []:
            if not isinstance(raw, dict) or "id" not in raw:
                continue
            node_id = f"{prefix}{raw['id']}"
            node_type = str(raw.get("type") or "")
            _check_node_fields(raw, f"node {node_id} ({node_type or 'no type'})")
            mode = int(raw.get("mode") or 0)
            slots = [
                _Slot(
                    str(s.get("name")),
                    str(s.get("type")),
                    origin(s.get("link")),
                    (s.get("widget") or {}).get("name") if isinstance(s.get("widget"), dict) else None,
                )
                for s in raw.get("inputs") or []
                if isinstance(s, dict)
            ]
            outputs = [str(s.get("type")) for s in raw.get("outputs") or [] if isinstance(s, dict)]
            if node_type in self.definitions:
                self._instance(raw, node_id, slots, mode, depth)
                continue
            kind = {"Reroute": "reroute", "PrimitiveNode": "primitive"}.get(node_type, "real")
            if node_type in NOTE_TYPES:
                kind = "note"
            self.nodes[node_id] = _Node(
                node_id,
                node_type,
                kind,
                mode,
                raw.get("title"),
                raw.get("widgets_values"),
                slots,
                outputs,
                dict(raw.get("properties") or {}),
            )

    def _instance(self, raw: dict[str, Any], node_id: str, slots: list[_Slot], mode: int, depth: int) -> None:
        definition = self.definitions[str(raw["type"])]
        sub_inputs = definition.get("inputs") or []
        sub_outputs = definition.get("outputs") or []
        inner_prefix = f"{node_id}:"
        in_proxy = _Node(
            f"{inner_prefix}{SUBGRAPH_INPUT}",
            "SubgraphInput",
            "sg_in",
            mode,
            inputs=[_Slot(str(s.get("name")), str(s.get("type"))) for s in sub_inputs],
            output_types=[str(s.get("type")) for s in sub_inputs],
        )
        out_proxy = _Node(
            f"{inner_prefix}{SUBGRAPH_OUTPUT}",
            "SubgraphOutput",
            "sg_out",
            mode,
            inputs=[_Slot(str(s.get("name")), str(s.get("type"))) for s in sub_outputs],
            output_types=[str(s.get("type")) for s in sub_outputs],
        )
        # Instance input k (by position, or by name when the instance lists fewer slots) feeds subgraph input k.
        names = [s.name for s in in_proxy.inputs]
        for position, slot in enumerate(slots):
            k = names.index(slot.name) if slot.name in names else position
            if k < len(in_proxy.inputs):
                in_proxy.inputs[k].source = slot.source
        # Promoted widgets: values on the instance for subgraph inputs that are not linked from outside.
        values = raw.get("widgets_values")
        if isinstance(values, list):
            proxy_widgets = (raw.get("properties") or {}).get("proxyWidgets")
            if isinstance(proxy_widgets, list) and proxy_widgets:
                for entry, value in zip(proxy_widgets, values):  # noqa: B905 - extra values are editor-only
                    if isinstance(entry, (list, tuple)) and len(entry) == 2:
                        in_proxy.overrides[f"{inner_prefix}{entry[0]}.{entry[1]}"] = value
            else:
                widget_slots = [k for k, s in enumerate(slots) if s.widget is not None]
                for k, value in zip(widget_slots, values):  # noqa: B905 - extra values are editor-only
                    name = slots[k].name
                    index = names.index(name) if name in names else k
                    if in_proxy.inputs[index].source is None:
                        in_proxy.values[index] = value
        self.nodes[in_proxy.id] = in_proxy
        self.nodes[out_proxy.id] = out_proxy
        self.flatten(definition, inner_prefix, depth + 1)
        for key, value in in_proxy.overrides.items():
            inner_id, _, widget = key.rpartition(".")
            if inner_id in self.nodes:
                self.nodes[inner_id].overrides[widget] = value
        if mode in (MUTED, BYPASSED):  # nothing inside a muted or bypassed subgraph runs
            for inner in self.nodes.values():
                if inner.id.startswith(inner_prefix) and inner.kind == "real":
                    inner.mode = MUTED


def _check_node_fields(raw: dict[str, Any], where: str) -> None:
    """Refuse an editor node whose fields have the wrong JSON type (a damaged or hand-edited file)."""

    def kind(value: Any) -> str:
        return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
            type(value), type(value).__name__
        )

    for key, allowed, expected in (
        ("inputs", (list,), "a list"),
        ("outputs", (list,), "a list"),
        ("widgets_values", (list, dict), "a list"),
        ("properties", (dict,), "an object"),
    ):
        value = raw.get(key)
        if value is not None and not isinstance(value, allowed):
            raise ConversionError(
                f"{where}: '{key}' is {kind(value)}, expected {expected}; the workflow file is "
                "damaged - open and save it again in the ComfyUI editor"
            )
    mode = raw.get("mode")
    if mode is not None and (isinstance(mode, bool) or not isinstance(mode, (int, float))):
        raise ConversionError(
            f"{where}: 'mode' is {kind(mode)}, expected a number; the workflow file is damaged "
            "- open and save it again in the ComfyUI editor"
        )


def _types_match(a: str, b: str) -> bool:
    if a == b or a == "*" or b == "*":
        return True
    return bool({t.strip() for t in a.split(",")} & {t.strip() for t in b.split(",")})


class _Resolver:
    """Follows a slot's source through UI-only, bypassed and subgraph proxy nodes to a real node or a value."""

    def __init__(self, nodes: dict[str, _Node]) -> None:
        self.nodes = nodes

    def resolve(self, source: tuple[str, int] | None, depth: int = 0) -> tuple[str, Any] | None:
        if source is None or depth > 256:
            return None
        node_id, slot = source
        node = self.nodes.get(node_id)
        if node is None:
            return None
        if node.kind == "real":
            if node.mode == MUTED:
                return None
            if node.mode == BYPASSED:
                return self._bypass(node, slot, depth)
            return "link", [node_id, slot]
        if node.kind == "reroute":
            return self.resolve(node.inputs[0].source if node.inputs else None, depth + 1)
        if node.kind == "primitive":
            values = node.widgets_values
            if isinstance(values, list) and values:
                return "value", values[0]
            return None
        if node.kind == "sg_in":
            if slot in node.values:
                return "value", node.values[slot]
            return self.resolve(node.inputs[slot].source if slot < len(node.inputs) else None, depth + 1)
        if node.kind == "sg_out":
            if node.mode == BYPASSED:
                in_proxy = self.nodes.get(node_id[: -len(str(SUBGRAPH_OUTPUT))] + str(SUBGRAPH_INPUT))
                if in_proxy is None:
                    return None
                return self._bypass(
                    in_proxy,
                    slot,
                    depth,
                    out_type=node.output_types[slot] if slot < len(node.output_types) else "*",
                )
            if node.mode == MUTED:
                return None
            return self.resolve(node.inputs[slot].source if slot < len(node.inputs) else None, depth + 1)
        return None

    def _bypass(
        self, node: _Node, slot: int, depth: int, out_type: str | None = None
    ) -> tuple[str, Any] | None:
        if out_type is None:
            out_type = node.output_types[slot] if slot < len(node.output_types) else "*"
        candidates = list(range(len(node.inputs)))
        if slot < len(node.inputs):
            candidates.remove(slot)
            candidates.insert(0, slot)
        for k in candidates:
            if _types_match(node.inputs[k].type, out_type) and node.inputs[k].source is not None:
                if node.kind == "sg_in":
                    return self.resolve((node.id, k), depth + 1)
                return self.resolve(node.inputs[k].source, depth + 1)
        return None


# ------------------------------------------------------------------------------------------------------------
# Widgets
# ------------------------------------------------------------------------------------------------------------


def _is_widget(kind: Any, options: dict[str, Any]) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _control_count(name: str, kind: Any, options: dict[str, Any]) -> int:
    """How many editor-only values follow this widget (0, 1 for numbers, 2 for combos)."""
    flag = options.get("control_after_generate")
    if isinstance(kind, list) or kind == "COMBO":
        return 2 if flag else 0
    if kind == "INT":
        if flag is None:
            return 1 if name in LEGACY_SEED_NAMES else 0
        return 1 if flag else 0
    return 1 if kind == "FLOAT" and flag else 0


def _widget_specs(info: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    inputs = info.get("input") or {}
    order = info.get("input_order") or {}
    specs = []
    for section in ("required", "optional"):
        declared = inputs.get(section) or {}
        names = [n for n in order.get(section) or [] if n in declared] or list(declared)
        for name in names:
            kind, options = split_spec(declared[name])
            if _is_widget(kind, options):
                specs.append((name, kind, options))
    return specs


def _accepts(kind: Any, options: dict[str, Any], value: Any) -> bool:
    choices = combo_choices(kind, options)
    return choices is not None and value in choices


def _widget_default(kind: Any, options: dict[str, Any]) -> Any:
    """The value the editor gives a widget the saved workflow has no value for (newer node, older file)."""
    if "default" in options:
        return options["default"]
    choices = combo_choices(kind, options)
    if choices is not None:
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


# Widgets the editor (comfyui-frontend-package 1.27) adds on its own and submits with the prompt, although
# /object_info does not declare them; ComfyUI ignores them, except a declared input whose type is drawn as a
# widget (AUDIO_RECORD). Found by comparing with the editor's own conversion of the shipped templates.
_EDITOR_WIDGETS_BY_OPTION = {"audio_upload": ("audioUI", "")}
_EDITOR_WIDGETS_BY_CLASS = {
    "PreviewAny": ("preview", ""),
    "SaveGLB": ("image", ""),
    "Preview3D": ("image", ""),
    "Preview3DAnimation": ("image", ""),
    "SaveAudio": ("audioUI", ""),
    "SaveAudioMP3": ("audioUI", ""),
    "SaveAudioOpus": ("audioUI", ""),
    "PreviewAudio": ("audioUI", ""),
}
_EDITOR_WIDGET_TYPES = {"AUDIO_RECORD": ""}


def editor_only_inputs(class_type: str, info: dict[str, Any]) -> dict[str, Any]:
    """The extra inputs the editor submits for `class_type` (see the table above)."""
    extra: dict[str, Any] = {}
    if class_type in _EDITOR_WIDGETS_BY_CLASS:
        name, value = _EDITOR_WIDGETS_BY_CLASS[class_type]
        extra[name] = value
    for section in ("required", "optional"):
        for name, spec in ((info.get("input") or {}).get(section) or {}).items():
            kind, options = split_spec(spec)
            for option, (widget, value) in _EDITOR_WIDGETS_BY_OPTION.items():
                if options.get(option):
                    extra[widget] = value
            if isinstance(options.get("remote"), dict) and options["remote"].get("refresh_button"):
                extra["refresh"] = "refresh"
            if isinstance(kind, str) and kind in _EDITOR_WIDGET_TYPES:
                extra[name] = _EDITOR_WIDGET_TYPES[kind]
    return extra


def map_widgets(info: dict[str, Any], values: Any, where: str = "") -> dict[str, Any]:
    """Name the positional ``widgets_values`` of a node from its ``/object_info`` entry.

    The editor assigns saved values to its widgets by position, the control widget of a seed-like number
    included, whatever value sits in that slot (old files store ``true`` there); widgets past the end of
    the saved list keep their defaults. This does the same.
    """
    specs = _widget_specs(info)
    if values is not None and not isinstance(values, (list, dict)):
        raise ConversionError(
            f"{where or 'a node'}: 'widgets_values' is {type(values).__name__}, expected a "
            "list; the workflow file is damaged - open and save it again in the ComfyUI editor"
        )
    if isinstance(values, dict):  # some nodes serialise their widgets by name
        named = {name: values[name] for name, _, _ in specs if name in values}
    else:
        values = list(values or [])
        named = {}
        i = 0
        for index, (name, kind, options) in enumerate(specs):
            if i >= len(values):
                break
            named[name] = values[i]
            i += 1
            declared = _control_count(name, kind, options)
            following = specs[index + 1] if index + 1 < len(specs) else None
            if declared and kind in ("INT", "FLOAT") and i < len(values):
                i += 1  # the control widget's slot
            elif declared and i < len(values) and values[i] in CONTROL_VALUES:
                i += 1
                if (
                    declared == 2
                    and i < len(values)
                    and isinstance(values[i], str)
                    and (following is None or not _accepts(following[1], following[2], values[i]))
                ):
                    i += 1  # the combo control's filter string
            # A stray control value after a widget that declares none is NOT skipped: the editor assigns by
            # position and so shifts the rest (a workflow saved against an older node definition); preflight
            # then reports the misplaced values instead of the driver guessing differently from the editor.
    for name, kind, options in specs:
        if name not in named:
            default = _widget_default(kind, options)
            if default is not None:
                named[name] = default
    return named


# ------------------------------------------------------------------------------------------------------------
# Dynamic prompts
# ------------------------------------------------------------------------------------------------------------

_COMMENTS = re.compile(r"/\*[\s\S]*?\*/|//[^\n]*")


def expand_dynamic_prompt(text: str, rng: random.Random) -> str:
    """Remove ``//`` and ``/* */`` comments and replace each ``{a|b|c}`` by one choice (nesting allowed;
    ``\\{``, ``\\|`` and ``\\}`` are literal)."""
    text = _COMMENTS.sub("", text)

    def parse(i: int, top: bool) -> tuple[list[str], int]:
        options: list[str] = []
        current = ""
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}|":
                current += text[i + 1]
                i += 2
            elif ch == "{":
                choices, i = parse(i + 1, False)
                current += rng.choice(choices) if choices else ""
            elif ch == "}" and not top:
                options.append(current)
                return options, i + 1
            elif ch == "|" and not top:
                options.append(current)
                current = ""
                i += 1
            else:
                current += ch
                i += 1
        options.append(current if top else "{" + current)
        return options, i

    return parse(0, True)[0][0]


# ------------------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------------------


def convert_workflow(
    workflow: dict[str, Any], object_info: dict[str, Any], *, rng: random.Random | None = None
) -> dict[str, Any]:
    """The API-format prompt for an editor workflow (see the module docstring for the rules).

    Raises :class:`ConversionError` for nodes whose class the server does not know, and for legacy group
    nodes. ``rng`` picks dynamic-prompt choices (pass a seeded one for reproducible results).
    """
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise ConversionError("not an editor workflow (no 'nodes' list)")
    rng = rng or random.Random()
    flattener = _Flattener(workflow)
    flattener.flatten(workflow)
    nodes = flattener.nodes
    resolver = _Resolver(nodes)
    group_nodes = [
        n for n in nodes.values() if n.type.startswith("workflow>") or n.type.startswith("workflow/")
    ]
    if group_nodes:
        listed = ", ".join(f"{n.id} ({n.type})" for n in group_nodes)
        raise ConversionError(
            f"legacy group nodes are not supported: {listed}; open the workflow in the editor "
            "and convert them to subgraphs (or ungroup them)"
        )
    missing = [
        n
        for n in nodes.values()
        if n.kind == "real" and n.mode not in (MUTED, BYPASSED) and n.type not in object_info
    ]
    if missing:
        lines = []
        for n in missing:
            hint = close_matches(n.type, object_info)
            lines.append(f"node {n.id} ({n.type})" + (f" - similar: {', '.join(hint)}" if hint else ""))
        raise ConversionError(
            "the server does not know these node classes (custom-node packs not installed?): "
            + "; ".join(lines)
        )
    prompt: dict[str, Any] = {}
    for node in nodes.values():
        if node.kind != "real" or node.mode in (MUTED, BYPASSED):
            continue
        info = object_info[node.type]
        where = f"node {node.id} ({node.type})"
        inputs: dict[str, Any] = editor_only_inputs(node.type, info)
        inputs.update(map_widgets(info, node.widgets_values, where))
        inputs.update({k: v for k, v in node.overrides.items()})
        specs = {name: options for name, _, options in _widget_specs(info)}
        for name, value in list(inputs.items()):
            if isinstance(value, str) and specs.get(name, {}).get("dynamicPrompts"):
                value = expand_dynamic_prompt(value, rng)
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for slot in node.inputs:
            name = slot.widget or slot.name
            resolved = resolver.resolve(slot.source)
            if resolved is None:
                continue
            kind, value = resolved
            if kind == "value":
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
            else:
                inputs[name] = value
        title = node.title or info.get("display_name") or node.type
        prompt[node.id] = {"inputs": inputs, "class_type": node.type, "_meta": {"title": title}}
    for entry in prompt.values():  # links into nodes that were dropped
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and str(value[0]) not in prompt:
                del entry["inputs"][name]
    return dict(
        sorted(
            prompt.items(),
            key=lambda kv: [int(p) if p.lstrip("-").isdigit() else 0 for p in kv[0].split(":")],
        )
    )
