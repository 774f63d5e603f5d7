"""Server routes of the CharForge panel (the editor's sidebar tab, ``web/``): runs, datasets, characters.

Everything here reads CharForge's own folders only: run folders under ``output/charforge/train_runs``,
dataset folders under ``output/charforge/datasets`` and the character presets. A file is served only when,
after following links, it lies inside its run or dataset folder and has a suffix the panel shows (the
rules of ComfyUI's ``/view``: no ``..``, no absolute paths, no way out through a link). The routes are
read-only except two that go through ComfyUI itself: cancel (ComfyUI's ``/interrupt`` for the prompt
training the run) and resume (the run's prompt queued again through ComfyUI's queue).

    GET  /charforge/runs                             the runs list (nodes/train.py)
    GET  /charforge/runs/{run}                       one run: metrics, samples per step, checkpoints
    GET  /charforge/runs/{run}/files/{path}          a sample image or the loss curve
    POST /charforge/runs/{run}/cancel                stop the running run within a step
    POST /charforge/runs/{run}/resume                queue a stopped run again ({"client_id": ...})
    GET  /charforge/datasets                         dataset folders with counts and reports
    GET  /charforge/datasets/{dataset}/files/{path}  a contact sheet or the HTML report
    GET  /charforge/characters                       character presets as cards

ComfyUI serves each under ``/api`` too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .. import bridge
from .dataset import DATASETS_SUBFOLDER
from .train import runs_directory

log = logging.getLogger("charforge")

TRAIN_NODE = "CharForgeTrainLoRA"
RUN_FILE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}
DATASET_FILE_TYPES = {**RUN_FILE_TYPES, ".html": "text/html; charset=utf-8", ".json": "application/json"}


def datasets_directory() -> str:
    """Where dataset folders go: ``<ComfyUI output>/charforge/datasets``."""
    return os.path.join(bridge.output_directory(), *DATASETS_SUBFOLDER)


def safe_file(
    root: str | os.PathLike, name: str, relative: str = "", types: dict[str, str] | None = None
) -> Path | None:
    """``root/name/relative`` when it is an existing file inside ``root/name`` (links followed) whose suffix is
    in `types`; ``root/name`` itself (a folder inside `root`) when `relative` is empty; None otherwise.

    `name` must be one plain path component; `relative` a relative path without ``..``, backslashes or NUL.
    """
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00") or name.startswith("."):
        return None
    parts = relative.split("/") if relative else []
    if (
        "\\" in relative
        or "\x00" in relative
        or relative.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
    ):
        return None
    try:
        base = Path(root).resolve(strict=True)
        folder = (base / name).resolve(strict=True)
        target = folder.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if folder.parent != base or not folder.is_dir():
        return None  # the run / dataset folder is a link to somewhere else
    if not parts:
        return folder
    if not target.is_relative_to(folder) or not target.is_file():
        return None
    if types is not None and target.suffix.lower() not in types:
        return None
    return target


def _json(data: Any, status: int = 200):
    from aiohttp import web

    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


def _error(status: int, message: str):
    return _json({"error": message}, status)


def _file(path: Path, types: dict[str, str]):
    from aiohttp import web

    return web.FileResponse(
        path,
        headers={
            "Content-Type": types[path.suffix.lower()],
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _run_folder(request):
    from ..engine.train.run import RunFolder

    path = safe_file(runs_directory(), request.match_info.get("run", ""))
    return RunFolder(path) if path is not None and (path / "status.json").is_file() else None


# --------------------------------------------------------------------------------------------------
# Runs


async def run_handler(request):
    from ..engine.train.run import run_details

    folder = _run_folder(request)
    if folder is None:
        return _error(404, f"no training run {request.match_info.get('run', '')!r}")
    return _json(run_details(folder))


async def run_file_handler(request):
    folder = _run_folder(request)
    path = (
        None
        if folder is None
        else safe_file(folder.root.parent, folder.name, request.match_info.get("path", ""), RUN_FILE_TYPES)
    )
    if path is None:
        return _error(404, "no such file in a CharForge run folder")
    return _file(path, RUN_FILE_TYPES)


async def cancel_handler(request):
    from ..engine.train.run import is_active

    folder = _run_folder(request)
    if folder is None:
        return _error(404, f"no training run {request.match_info.get('run', '')!r}")
    if not is_active(folder):
        return _error(409, f"run {folder.name!r} is not training in this ComfyUI")
    prompt_id = folder.read_origin().get("prompt_id") or bridge.running_prompt_id()
    if not prompt_id or not bridge.interrupt_prompt(prompt_id):
        return _error(409, f"run {folder.name!r} is not the running prompt")
    return _json({"cancelled": folder.name, "prompt_id": prompt_id})


async def resume_handler(request):
    from ..engine.train.run import is_active, run_details

    folder = _run_folder(request)
    if folder is None:
        return _error(404, f"no training run {request.match_info.get('run', '')!r}")
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        body = {}
    details = run_details(folder)
    if is_active(folder) or details.get("state") in ("running", "queued"):
        return _error(409, f"run {folder.name!r} is {details.get('state')}; cancel it first")
    if not details.get("resumable"):
        return _error(409, f"run {folder.name!r} has no saved state to resume from ({details.get('state')})")
    origin = folder.read_origin()
    prompt = origin.get("prompt")
    if not isinstance(prompt, dict):
        return _error(
            409,
            f"run {folder.name!r} was not queued from ComfyUI (no origin.json): queue its "
            "workflow again with the same settings to resume it",
        )
    prompt = {key: dict(node) for key, node in prompt.items()}
    for node in prompt.values():
        if node.get("class_type") == TRAIN_NODE:
            node["inputs"] = {**node.get("inputs", {}), "resume": "auto"}
    client_id = body.get("client_id") if isinstance(body, dict) else None
    try:
        prompt_id = await bridge.queue_prompt(
            prompt, client_id=str(client_id) if client_id else None, workflow=origin.get("workflow")
        )
    except bridge.PromptRejected as exc:
        return _json({"error": str(exc), "node_errors": exc.node_errors}, 400)
    log.info("CharForge panel: queued run %s again (prompt %s)", folder.name, prompt_id)
    return _json({"queued": folder.name, "prompt_id": prompt_id})


# --------------------------------------------------------------------------------------------------
# Datasets and characters


async def datasets_handler(request):
    from ..engine.dataset.report import list_datasets

    return _json({"datasets": list_datasets(datasets_directory())})


async def dataset_file_handler(request):
    name = request.match_info.get("dataset", "")
    folder = safe_file(datasets_directory(), name)
    path = (
        None
        if folder is None or not (folder / "manifest.json").is_file()
        else safe_file(datasets_directory(), name, request.match_info.get("path", ""), DATASET_FILE_TYPES)
    )
    if path is None:
        return _error(404, "no such file in a CharForge dataset folder")
    return _file(path, DATASET_FILE_TYPES)


async def characters_handler(request):
    from ..engine.library.characters import character_cards

    return _json({"characters": character_cards()})


ROUTES = (
    ("GET", "/charforge/runs/{run}", run_handler),
    ("GET", "/charforge/runs/{run}/files/{path:.+}", run_file_handler),
    ("POST", "/charforge/runs/{run}/cancel", cancel_handler),
    ("POST", "/charforge/runs/{run}/resume", resume_handler),
    ("GET", "/charforge/datasets", datasets_handler),
    ("GET", "/charforge/datasets/{dataset}/files/{path:.+}", dataset_file_handler),
    ("GET", "/charforge/characters", characters_handler),
)


def register_routes() -> bool:
    """Add the panel's routes to ComfyUI's server (a no-op outside ComfyUI)."""
    return all([bridge.add_route(method, path, handler) for method, path, handler in ROUTES])
