"""``manifest.json``: what a run produced and how.

It ties every downloaded file to the node that made it (id, class, title, output key), records the overrides
and uploads used, the prompt id, timings and the text/number outputs. It never contains secrets: the server
URL is stored without credentials and the whole document is passed through :func:`config.redact`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import redact
from .outputs import open_unique

if TYPE_CHECKING:
    from .client.models import JobResult
    from .outputs import DownloadedFile
    from .workflow.overrides import AppliedOverride

MANIFEST_VERSION = 1


def build_manifest(
    result: JobResult,
    downloads: list[DownloadedFile],
    *,
    out_dir: Path,
    server: str,
    workflow_source: str | None = None,
    overrides: list[AppliedOverride] | None = None,
    uploads: list[dict[str, Any]] | None = None,
    wall_seconds: float | None = None,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """The manifest as a dict (see the module docstring)."""
    root = out_dir.resolve()
    files = []
    for item in downloads:
        try:
            rel = item.path.resolve().relative_to(root).as_posix()
        except ValueError:
            rel = str(item.path)
        files.append(
            {
                "path": rel,
                "node_id": item.source.node_id,
                "class_type": item.class_type,
                "title": item.title,
                "output": item.source.key,
                "index": item.source.index,
                "animated": item.source.animated,
                "bytes": item.size,
                "sha256": item.sha256,
                "server_file": item.source.to_dict(),
            }
        )
    values = {}
    for node_values in result.values:
        values[node_values.node_id] = {
            "class_type": result.node_class(node_values.node_id),
            "title": result.node_title(node_values.node_id),
            **node_values.values,
        }
    timings = result.timings.to_dict()
    timings["wall_seconds"] = None if wall_seconds is None else round(wall_seconds, 3)
    manifest: dict[str, Any] = {
        "charforge_manifest": MANIFEST_VERSION,
        "prompt_id": result.prompt_id,
        "server": server,
        "workflow": workflow_source,
        "status": "success",
        "timings": timings,
        "cached_nodes": result.cached_nodes,
        "overrides": [o.to_dict() for o in overrides or []],
        "uploads": list(uploads or []),
        "files": files,
        "values": values,
    }
    if result.node_errors:
        manifest["partial_node_errors"] = result.node_errors
    if warnings:
        manifest["warnings"] = list(warnings)
    return manifest


def write_manifest(
    out_dir: Path, manifest: dict[str, Any], secrets: list[str] | None = None, name: str = "manifest.json"
) -> Path:
    """Write the manifest into ``out_dir`` (never over an existing file: ``manifest-1.json``...)."""
    text = json.dumps(manifest, indent=2, ensure_ascii=False, default=str)
    text = redact(text, secrets or [])
    path, handle = open_unique(out_dir / name)
    with handle:
        handle.write(text.encode("utf-8") + b"\n")
    return path
