"""Lay out editor-format workflows from a short description (used to write the newer shipped workflows).

The editor format needs every socket, link id and widget value in the right place; writing that by hand is
error-prone. :class:`Layout` takes nodes (class, widget values by name, title), links by input/output name
and groups, places each group's nodes in a column, sizes every group around its nodes and fills the
sockets from the node definitions (``build_api.object_info()``), so the file is what the editor would save.

    python workflows/layout.py            # rewrite the editor files this module describes, then run build_api.py

Every shipped editor file, laid out here or by hand, also gets what the editor checks and shows first
(:func:`finish`): a stable UUID as the workflow's ``id`` (the editor's schema rejects anything else) and an
opening view (``extra.ds``) with the Note and the first group on screen.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

WORKFLOWS_DIR = Path(__file__).resolve().parent
PRIMITIVES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH = 360
GAP = 30
# Workflow ids are UUIDs derived from this fixed namespace and the file name: the same on every rebuild.
WORKFLOW_ID_NAMESPACE = uuid.UUID("0b6f3f5e-3c4a-4d1e-9a57-6c2b1f0e8d42")
# The opening view: this zoom, and the top-left node or group this many screen pixels from the canvas's
# top-left corner (clear of the editor's side bar, menu bar and tabs). LiteGraph draws a node's title bar
# above its pos.
VIEW_SCALE = 0.8
VIEW_MARGIN = (70, 100)
NODE_TITLE_HEIGHT = 30


def workflow_id(name: str) -> str:
    """The editor ``id`` of the shipped workflow ``<name>.json``: a UUID, stable across rebuilds."""
    return str(uuid.uuid5(WORKFLOW_ID_NAMESPACE, name))


def opening_view(workflow: dict[str, Any], scale: float = VIEW_SCALE) -> dict[str, Any]:
    """``extra.ds`` that shows the workflow's top-left corner (where the Note sits) at `scale`.

    The editor draws canvas point p at screen point (p + offset) * scale."""
    lefts = [n["pos"][0] for n in workflow["nodes"]] + [g["bounding"][0] for g in workflow.get("groups", [])]
    tops = [n["pos"][1] - NODE_TITLE_HEIGHT for n in workflow["nodes"]]
    tops += [g["bounding"][1] for g in workflow.get("groups", [])]
    return {"scale": scale, "offset": [round(VIEW_MARGIN[0] / scale - min(lefts)),
                                       round(VIEW_MARGIN[1] / scale - min(tops))]}


def finish(workflow: dict[str, Any], name: str) -> dict[str, Any]:
    """Set the id and the opening view of the editor workflow `name` (keeping its zoom if it has one)."""
    workflow["id"] = workflow_id(name)
    extra = workflow.get("extra") or {}
    scale = (extra.get("ds") or {}).get("scale", VIEW_SCALE)
    workflow["extra"] = {**extra, "ds": opening_view(workflow, scale)}
    return workflow


def finish_file(path: Path) -> bool:
    """:func:`finish` a workflow file in place, in its own JSON indentation; True when it changed."""
    text = path.read_text(encoding="utf-8")
    indent = 2 if text.startswith('{\n  "') else 1
    new = json.dumps(finish(json.loads(text), path.stem), indent=indent, ensure_ascii=False) + "\n"
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


def _split(spec: Any) -> tuple[Any, dict[str, Any]]:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return kind, options


def _is_widget(kind: Any) -> bool:
    return isinstance(kind, list) or kind in PRIMITIVES


class Layout:
    """One editor workflow being built."""

    def __init__(self, name: str, info: dict[str, Any]) -> None:
        self.name = name
        self.info = info
        self.nodes: list[dict[str, Any]] = []
        self.links: list[list[Any]] = []
        self.groups: list[dict[str, Any]] = []
        self._group_nodes: list[list[dict[str, Any]]] = []
        self._notes: list[tuple[str, int]] = []
        self._x = 40
        self._y = 80

    # -- nodes ---------------------------------------------------------------------------------------------
    def group(self, title: str, color: str = "#3f789e", width: int = 1) -> None:
        """Start a new group: the next nodes stack in its column(s), to the right of the previous group."""
        if self._group_nodes:
            self._x = self._right + 40 + 20
        self._y = 80
        self._col_left = self._x
        self._col_width = COLUMN_WIDTH * width - 40
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [0, 0, 0, 0], "color": color,
                            "font_size": 24, "flags": {}})
        self._group_nodes.append([])

    @property
    def _right(self) -> int:
        x, _, w, _ = self.groups[-1]["bounding"]
        return x + w

    def node(self, class_type: str, title: str | None = None, height: int | None = None,
             widgets: dict[str, Any] | None = None, **values: Any) -> int:
        """Add a node: widget values by name (in `widgets` for names this method takes itself, e.g. height)."""
        values = {**values, **(widgets or {})}
        info = self.info[class_type]
        node_id = len([n for n in self.nodes]) + 1
        inputs, widgets = [], []
        declared = info.get("input") or {}
        for section in ("required", "optional"):
            names = (info.get("input_order") or {}).get(section) or list(declared.get(section) or {})
            for name in names:
                kind, options = _split(declared[section][name])
                if _is_widget(kind) and not options.get("forceInput"):
                    if name not in values:
                        if "default" in options:
                            value = options["default"]
                        elif isinstance(kind, list) and kind:
                            value = kind[0]
                        else:
                            raise ValueError(f"{class_type}.{name} needs a value")
                    else:
                        value = values.pop(name)
                    widgets.append(value)
                    if name in ("seed", "noise_seed") or options.get("control_after_generate"):
                        widgets.append("fixed")
                    if options.get("image_upload"):
                        widgets.append("image")
                else:
                    slot = {"name": name, "type": kind, "link": None}
                    if section == "optional":
                        slot["shape"] = 7
                    inputs.append(slot)
        if values:
            raise ValueError(f"{class_type} has no widget(s) {sorted(values)}")
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(info.get("output_name") or info["output"], info["output"],
                                                  strict=True))]
        size_h = height or 46 + 24 * (len(widgets) + max(len(inputs), len(outputs)))
        node = {"id": node_id, "type": class_type, "pos": [self._col_left + 20, self._y],
                "size": [self._col_width, size_h], "flags": {}, "order": len(self.nodes), "mode": 0,
                "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": class_type},
                "widgets_values": widgets}
        if title:
            node["title"] = title
        self._y += size_h + GAP + 10
        self.nodes.append(node)
        self._group_nodes[-1].append(node)
        x = self._col_left
        bottom = max(n["pos"][1] + n["size"][1] for n in self._group_nodes[-1])
        self.groups[-1]["bounding"] = [x, 10, self._col_width + 40, max(bottom + 30, 600) - 10]
        return node_id

    def _find(self, node_id: int) -> dict[str, Any]:
        return self.nodes[node_id - 1]

    def link(self, source: int, output: str, target: int, input_name: str) -> None:
        src, dst = self._find(source), self._find(target)
        slot = next(i for i, o in enumerate(src["outputs"]) if o["name"] == output)
        kind = src["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        for j, s in enumerate(dst["inputs"]):
            if s["name"] == input_name:
                target_slot = j
                break
        else:  # a widget converted to a socket
            spec = None
            for section in ("required", "optional"):
                spec = (self.info[dst["type"]]["input"].get(section) or {}).get(input_name) or spec
            assert spec is not None, f"{dst['type']} has no input {input_name}"
            dst["inputs"].append({"name": input_name, "type": _split(spec)[0] if not isinstance(_split(spec)[0], list)
                                  else "COMBO", "widget": {"name": input_name}, "link": None})
            target_slot = len(dst["inputs"]) - 1
        dst["inputs"][target_slot]["link"] = link_id
        src["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, source, slot, target, target_slot, kind])

    def note(self, text: str, height: int = 650) -> None:
        """The Note explaining what to set; it gets the last id, so the working nodes are numbered 1, 2, ..."""
        self._notes.append((text, height))

    def _note(self, text: str, height: int) -> dict[str, Any]:
        node_id = len(self.nodes) + 1
        return {"id": node_id, "type": "Note", "pos": [-480, 10], "size": [460, height], "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                "widgets_values": [text], "color": "#432", "bgcolor": "#653"}

    def to_json(self) -> dict[str, Any]:
        for text, height in self._notes:
            self.nodes.append(self._note(text, height))
        self._notes = []
        workflow = {"id": "", "revision": 0, "last_node_id": len(self.nodes),
                    "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links,
                    "groups": self.groups, "config": {}, "extra": {}, "version": 0.4}
        return finish(workflow, self.name)

    def write(self) -> Path:
        path = WORKFLOWS_DIR / f"{self.name}.json"
        path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def main() -> int:
    sys.path.insert(0, str(WORKFLOWS_DIR))
    import build_api  # noqa: E402 - the sibling script
    import definitions  # noqa: E402 - the sibling script
    import definitions_flow  # noqa: E402 - the sibling script (Flux and SD3.5)
    import definitions_guide  # noqa: E402 - the sibling script (pose + depth ControlNets)
    import definitions_multi  # noqa: E402 - the sibling script (two characters)

    info = build_api.object_info()
    built = set()
    builders = definitions.BUILDERS + definitions_flow.BUILDERS + definitions_multi.BUILDERS
    for build in builders + definitions_guide.BUILDERS:
        layout = build(lambda name: Layout(name, info))
        built.add(layout.name)
        print(f"wrote {layout.write().relative_to(WORKFLOWS_DIR.parent)}")
    for path in build_api.editor_files():  # the hand-laid ones: only their id and opening view
        if path.stem not in built and finish_file(path):
            print(f"updated the id and opening view of {path.relative_to(WORKFLOWS_DIR.parent)}")
    return build_api.main([])


if __name__ == "__main__":
    sys.exit(main())
