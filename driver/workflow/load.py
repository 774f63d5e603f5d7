"""Workflow files: reading them and telling their format apart.

A workflow is either in the **API format** (``{"3": {"class_type": ..., "inputs": {...}}}``, what ``POST
/prompt`` takes) or the **editor (UI) format** (``{"nodes": [...], "links": [...]}``, what "Save" writes).
:func:`load_workflow` reads either (also from a PNG that ComfyUI saved, which embeds both) and says which one it
is; editor workflows are converted with the server's ``/object_info`` before submitting (see ``convert.py``).
"""

from __future__ import annotations

import copy
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WorkflowError


@dataclass
class Workflow:
    """A workflow ready to run: ``prompt`` (API format; None until an editor workflow is converted) and the
    editor workflow ``ui`` when known (it is embedded in outputs as ``extra_pnginfo.workflow``)."""

    prompt: dict[str, Any] | None
    ui: dict[str, Any] | None = None
    source: str | None = None
    format: str = "api"


def _looks_like_api(data: dict[str, Any]) -> bool:
    return bool(data) and all(isinstance(v, dict) and "class_type" in v for v in data.values())


def _normalise_api(prompt: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for node_id, node in prompt.items():
        if not isinstance(node, dict):
            raise WorkflowError(f"{where}: node {node_id!r} is not an object")
        node = dict(node)
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(f"{where}: node {node_id}: 'inputs' must be an object")
        node["inputs"] = dict(inputs)
        out[str(node_id)] = node
    return out


def workflow_from_data(data: Any, source: str | None = None) -> Workflow:
    """Recognise the format of parsed JSON and wrap it as a :class:`Workflow`."""
    where = source or "workflow"
    if not isinstance(data, dict):
        raise WorkflowError(f"{where}: expected a JSON object, found {type(data).__name__}")
    if isinstance(data.get("nodes"), list):
        return Workflow(prompt=None, ui=data, source=source, format="ui")
    if _looks_like_api(data):
        return Workflow(prompt=_normalise_api(data, where), source=source, format="api")
    # Wrapped forms: a saved POST /prompt body, or the frontend's {"output": api, "workflow": ui}.
    for api_key, ui_key in (("prompt", None), ("output", "workflow")):
        inner = data.get(api_key)
        if isinstance(inner, dict) and _looks_like_api(inner):
            ui = data.get(ui_key) if ui_key else None
            if ui is None:
                ui = ((data.get("extra_data") or {}).get("extra_pnginfo") or {}).get("workflow")
            return Workflow(
                prompt=_normalise_api(inner, where),
                ui=ui if isinstance(ui, dict) else None,
                source=source,
                format="api",
            )
    if not data:
        raise WorkflowError(f"{where}: the workflow is empty")
    bad = next((k for k, v in data.items() if not (isinstance(v, dict) and "class_type" in v)), None)
    raise WorkflowError(
        f"{where}: not a ComfyUI workflow: neither editor format (no 'nodes' list) nor API "
        f"format (entry {bad!r} has no 'class_type')"
    )


def png_text_chunks(data: bytes) -> dict[str, str]:
    """The tEXt/iTXt/zTXt chunks of a PNG (ComfyUI stores ``prompt`` and ``workflow`` there)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise WorkflowError("not a PNG file")
    chunks: dict[str, str] = {}
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        try:
            if kind == b"tEXt":
                key, _, value = body.partition(b"\x00")
                chunks[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"zTXt":
                key, _, rest = body.partition(b"\x00")
                chunks[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\x00")
                compressed, _method = rest[0], rest[1]
                _lang, _, rest = rest[2:].partition(b"\x00")
                _tkey, _, text = rest.partition(b"\x00")
                chunks[key.decode("latin-1")] = (zlib.decompress(text) if compressed else text).decode(
                    "utf-8"
                )
        except (zlib.error, UnicodeDecodeError, IndexError):
            continue
        if kind == b"IEND":
            break
    return chunks


def load_workflow(path: str | Path) -> Workflow:
    """Read a workflow file (API or editor JSON, or a PNG saved by ComfyUI) and detect its format."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise WorkflowError(f"workflow file not found: {p}") from None
    except OSError as exc:
        raise WorkflowError(f"cannot read workflow {p}: {exc.strerror or exc}") from None
    if raw.startswith(b"\x89PNG"):
        chunks = png_text_chunks(raw)
        ui = _parse_json(chunks["workflow"], f"{p} (workflow chunk)") if "workflow" in chunks else None
        if "prompt" in chunks:
            api = _parse_json(chunks["prompt"], f"{p} (prompt chunk)")
            wf = workflow_from_data(api, str(p))
            wf.ui = ui if isinstance(ui, dict) else None
            wf.format = "png"
            return wf
        if isinstance(ui, dict):
            return Workflow(prompt=None, ui=ui, source=str(p), format="ui")
        raise WorkflowError(f"{p}: this PNG holds no ComfyUI workflow (no 'prompt' or 'workflow' text chunk)")
    return workflow_from_data(_parse_json(raw.decode("utf-8-sig", "replace"), str(p)), str(p))


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(
            f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None


def coerce_workflow(workflow: Workflow | dict[str, Any] | str | Path) -> Workflow:
    """Accept a :class:`Workflow`, parsed JSON, or a path."""
    if isinstance(workflow, Workflow):
        return workflow
    if isinstance(workflow, dict):
        return workflow_from_data(copy.deepcopy(workflow))
    return load_workflow(workflow)
