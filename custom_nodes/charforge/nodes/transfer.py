"""Server routes that move files between a driver and this ComfyUI: photo folders up, results home, models in
place. The work is done by ``engine/transfer``; these handlers only translate HTTP.

    GET  /charforge/transfer/info                              folders and limits of this server
    GET  /charforge/transfer/inputs/{dataset}                  an upload folder's files (size, sha256) and
                                                               the partial uploads with their length
    PUT  /charforge/transfer/inputs/{dataset}/files/{name}     one chunk: ?size=&sha256=&offset=, body = bytes
    POST /charforge/transfer/inputs/{dataset}/prune            {"keep": [name, ...]}: remove the others
    GET  /charforge/transfer/outputs/index/{path}              files under output/charforge/<path> (size, sha256)
    GET  /charforge/transfer/outputs/files/{path}              one file of output/charforge (Range for resume)
    GET  /charforge/transfer/models?kinds=a,b[&names=x,y][&hash=1][&arch=1]  models present, sha256 when known
                                                               (or hash=1), with arch=1 each file's model family
                                                               read from its tensors (arch, or arch_error)
    GET  /charforge/transfer/models/loras/files/{name}         a LoRA file (the trained LoRA comes home)
    PUT  /charforge/transfer/models/loras/files/{name}         one chunk of a LoRA trained elsewhere (Replicate)
                                                               into the first loras folder, as photos go up
    POST /charforge/transfer/models/download                   {"models": [manifest entry, ...]}: fetch here
    GET  /charforge/transfer/models/downloads                  what those downloads are doing
    POST /charforge/transfer/models/tiny                       {"parts": [...]}: write the tiny demo models
                                                               here (engine/tiny.py); followed like a download

Uploads land in ``<input>/charforge/<dataset>/`` only; files are served from ``<output>/charforge`` and the
loras folders only. Names follow the rules of ComfyUI's ``/view``: relative, no ``..``, no absolute paths,
no backslashes, no way out through a link; hidden names (``.uploads``, hash caches) are never reachable.
ComfyUI serves each route under ``/api`` too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from .. import bridge
from ..common.transfer import (
    DEFAULT_CHUNK,
    MAX_CHUNK,
    MAX_UPLOAD_FILE,
    MODEL_KINDS,
    UPLOAD_TYPES,
    ModelEntry,
    hf_token,
    parse_model_entry,
    relative_parts,
)
from ..engine.transfer.hashes import HashCache
from ..engine.transfer.uploads import Announced, LoraStore, UploadRefused, UploadStore

log = logging.getLogger("charforge")

CHARFORGE = "charforge"
_hash_caches: dict[str, HashCache] = {}
_upload_locks: dict[str, asyncio.Lock] = {}
_downloads: dict[str, dict[str, Any]] = {}
_downloads_lock = threading.Lock()


def upload_store() -> UploadStore:
    return UploadStore(os.path.join(bridge.input_directory(), CHARFORGE))


def outputs_root() -> Path:
    return Path(bridge.output_directory()) / CHARFORGE


def hash_cache() -> HashCache:
    """One cache of checksums per output folder (outputs and models alike are keyed by their full path)."""
    where = str(outputs_root() / ".transfer" / "hashes.json")
    if where not in _hash_caches:
        _hash_caches[where] = HashCache(where)
    return _hash_caches[where]


def _json(data: Any, status: int = 200):
    from aiohttp import web

    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


def _error(status: int, message: str, **extra: Any):
    return _json({"error": message, **extra}, status)


def output_path(relative: str, folder_ok: bool = False) -> Path | None:
    """``<output>/charforge/<relative>`` when it exists inside that folder after following links; `relative`
    must be a plain relative name ("" is the folder itself when `folder_ok`)."""
    try:
        base = outputs_root().resolve(strict=True)
    except OSError:
        return None
    if relative == "" and folder_ok:
        return base
    parts = relative_parts(relative)
    if parts is None:
        return None
    try:
        target = base.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(base) or (not folder_ok and not target.is_file()):
        return None
    return target


# --------------------------------------------------------------------------------------------------
# Photos up


async def info_handler(request):
    return _json(
        {
            "input_dir": str(Path(bridge.input_directory()).resolve()),
            "output_dir": str(Path(bridge.output_directory()).resolve()),
            "upload_dir": str(upload_store().root.resolve()),
            "outputs_dir": str(outputs_root().resolve()),
            "max_chunk": MAX_CHUNK,
            "chunk": DEFAULT_CHUNK,
            "max_file": MAX_UPLOAD_FILE,
            "types": sorted(UPLOAD_TYPES),
            "lora_uploads": True,  # PUT models/loras/files/{name}
        }
    )


async def inputs_handler(request):
    try:
        listing = await asyncio.to_thread(upload_store().listing, request.match_info.get("dataset", ""))
    except UploadRefused as exc:
        return _error(exc.status, str(exc), **exc.extra)
    return _json(listing)


def _announced(request) -> tuple[Announced, int]:
    query = request.query
    try:
        size, offset = int(query.get("size", "")), int(query.get("offset", "0"))
    except ValueError:
        raise UploadRefused(400, "size and offset must be whole numbers of bytes") from None
    if offset < 0:
        raise UploadRefused(400, "offset must not be negative")
    item = Announced(
        request.match_info.get("dataset", ""),
        request.match_info.get("name", ""),
        size,
        query.get("sha256", "").lower(),
    )
    return item, offset


async def upload_chunk_handler(request):
    """Append one chunk; answers ``{"received": n}`` or ``{"complete": true, ...}`` once the file is in place."""
    return await _receive_chunk(request, upload_store())


async def lora_upload_handler(request):
    """One chunk of a LoRA into the first loras folder (answers as :func:`upload_chunk_handler`)."""
    folders = bridge.model_folders("loras")
    if not folders:
        return _error(404, "this server has no loras folder")
    return await _receive_chunk(request, LoraStore(folders[0]))


async def _receive_chunk(request, store: UploadStore):
    try:
        item, offset = _announced(request)
        target = store.check(item)
        length = request.content_length
        if length is None:
            raise UploadRefused(411, "send a Content-Length (chunked bodies are not accepted)")
        if length > MAX_CHUNK:
            raise UploadRefused(413, f"a chunk may be at most {MAX_CHUNK} bytes, this one is {length}")
        lock = _upload_locks.setdefault(item.sha256, asyncio.Lock())
        async with lock:
            if await asyncio.to_thread(store.present, item, target):
                return _json(
                    {"complete": True, "name": item.name, "received": item.size, "path": str(target)}
                )
            handle = store.open_chunk(item, offset, length)
            written = 0
            try:
                async for block in request.content.iter_chunked(1 << 16):
                    if written + len(block) > length:
                        raise UploadRefused(413, "the body is longer than its Content-Length")
                    handle.write(block)
                    written += len(block)
            finally:
                handle.close()  # what arrived before a dropped connection stays: the client resumes after it
            received = offset + written
            if received < item.size:
                return _json({"received": received})
            placed = await asyncio.to_thread(store.complete, item)
            return _json({"complete": True, "name": item.name, "received": item.size, "path": str(placed)})
    except UploadRefused as exc:
        return _error(exc.status, str(exc), **exc.extra)


async def prune_handler(request):
    try:
        body = await request.json()
    except ValueError:
        return _error(400, 'the body must be JSON: {"keep": [name, ...]}')
    keep = body.get("keep") if isinstance(body, dict) else None
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        return _error(400, 'the body must be JSON: {"keep": [name, ...]}')
    try:
        removed = await asyncio.to_thread(
            upload_store().prune, request.match_info.get("dataset", ""), set(keep)
        )
    except UploadRefused as exc:
        return _error(exc.status, str(exc), **exc.extra)
    return _json({"removed": removed})


# --------------------------------------------------------------------------------------------------
# Results home


def _index(folder: Path) -> dict[str, Any]:
    base = outputs_root().resolve()
    files: dict[str, dict[str, Any]] = {}
    paths = [folder] if folder.is_file() else sorted(folder.rglob("*"))
    for path in paths:
        rel = path.relative_to(base).as_posix()
        if relative_parts(rel) is None or not path.is_file():
            continue
        real = path.resolve()
        if not real.is_relative_to(base):
            continue  # a link out of CharForge's folder
        files[rel] = {"size": real.stat().st_size, "sha256": hash_cache().sha256(real)}
    return {"root": str(base), "files": files}


async def outputs_index_handler(request):
    folder = output_path(request.match_info.get("path", ""), folder_ok=True)
    if folder is None:
        return _error(404, "no such file or folder in CharForge's output folder")
    return _json(await asyncio.to_thread(_index, folder))


def _file(path: Path):
    from aiohttp import web

    # FileResponse answers Range requests (206), which is how an interrupted download resumes
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{path.name}"',
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


async def outputs_file_handler(request):
    path = output_path(request.match_info.get("path", ""))
    if path is None:
        return _error(404, "no such file in CharForge's output folder")
    return _file(path)


# --------------------------------------------------------------------------------------------------
# Models


def _model_path(kind: str, name: str) -> Path | None:
    if kind not in MODEL_KINDS or relative_parts(name) is None:
        return None
    for folder in bridge.model_folders(kind):
        base = Path(folder)
        candidate = base.joinpath(*name.split("/"))
        try:
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if candidate.is_file() or candidate.is_dir():
            return real
    return None


def _arch(path: Path) -> dict[str, str]:
    """The model family of a base-model file from its tensor names (the trainer's detection), or why not."""
    from ..engine.train.models import UnsupportedModelError, detect_arch

    try:
        return {"arch": detect_arch(path)}
    except (UnsupportedModelError, OSError, ValueError) as exc:
        return {"arch_error": str(exc)}


def _models(
    kinds: list[str], compute: bool, only: set[str] | None = None, arch: bool = False
) -> dict[str, Any]:
    cache = hash_cache()
    present: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        entries = []
        names = set(bridge.list_models(kind))
        for folder in bridge.model_folders(kind):  # model folders (diffusers, CLIP) are listed by name too
            if Path(folder).is_dir():
                names.update(
                    p.name for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")
                )
        for name in sorted(names if only is None else names & only):
            path = _model_path(kind, name)
            if path is None:
                continue
            entry: dict[str, Any] = {"name": name, "folder": path.is_dir()}
            if path.is_file():
                entry["size"] = path.stat().st_size
                entry["sha256"] = cache.sha256(path) if compute else cache.cached(path)
                if arch:
                    entry.update(_arch(path))
            entries.append(entry)
        present[kind] = entries
    return {"models": present}


async def models_handler(request):
    kinds = [k for k in request.query.get("kinds", "").split(",") if k] or sorted(MODEL_KINDS)
    unknown = [k for k in kinds if k not in MODEL_KINDS]
    if unknown:
        return _error(400, f"unknown model kind(s): {', '.join(unknown)}")
    names = request.query.get("names")
    only = {n for n in names.split(",") if n} if names else None
    flags = [request.query.get(flag) in ("1", "true") for flag in ("hash", "arch")]
    return _json(await asyncio.to_thread(_models, kinds, flags[0], only, flags[1]))


async def lora_file_handler(request):
    path = _model_path("loras", request.match_info.get("name", ""))
    if path is None or not path.is_file():
        return _error(404, "no such LoRA in the loras folders")
    return _file(path)


def _download(entry: ModelEntry, key: str, token: str = "") -> None:
    from ..engine.transfer.downloads import DownloadFailed, download_file

    state = _downloads[key]

    def progress(done: int, total: int | None) -> None:
        state.update(received=done, size=total)

    try:
        target = bridge.first_model_folder(entry.kind).joinpath(*entry.name.split("/"))
        digest = download_file(
            entry.source_url(), target, sha256=entry.sha256, size=entry.size, progress=progress, token=token
        )
        hash_cache().remember(target, digest)
        state.update(state="done", sha256=digest, received=target.stat().st_size, finished=time.time())
        log.info("CharForge: downloaded %s model %s", entry.kind, entry.name)
    except (DownloadFailed, OSError, bridge.ModelNotFoundError) as exc:
        state.update(state="failed", error=str(exc), finished=time.time())
        log.warning("CharForge: model download failed: %s", exc)


async def download_handler(request):
    """Start downloading the manifest's missing models on this server (each once; a finished one is kept)."""
    try:
        body = await request.json()
        entries = [parse_model_entry(item) for item in body.get("models", [])]
    except (ValueError, AttributeError, TypeError) as exc:
        return _error(400, f'the body must be {{"models": [manifest entry, ...]}}: {exc}')
    # a token the driver sent for this request, else the server's own; used for hub URLs only, never kept
    # in the download states (which GET models/downloads shows) nor logged
    token = str(body.get("hf_token") or "") or hf_token()
    started = []
    for entry in entries:
        if not entry.source_url():
            return _error(400, f"model {entry.name!r} has no url or Hugging Face repo/file to download from")
        key = f"{entry.kind}/{entry.name}"
        with _downloads_lock:
            current = _downloads.get(key)
            if current and current["state"] == "downloading":
                continue
            if _model_path(entry.kind, entry.name) is not None and (
                current is None or current["state"] == "done"
            ):
                _downloads[key] = {"name": entry.name, "kind": entry.kind, "state": "done", "present": True}
                continue
            _downloads[key] = {
                "name": entry.name,
                "kind": entry.kind,
                "state": "downloading",
                "received": 0,
                "size": entry.size,
                "started": time.time(),
            }
        threading.Thread(
            target=_download, args=(entry, key, token), name=f"charforge-download-{entry.name}", daemon=True
        ).start()
        started.append(key)
    return _json({"started": started}, 202)


def _write_tiny(parts: list[str], key: str) -> None:
    from ..engine import tiny

    try:
        models_dir = bridge.first_model_folder("checkpoints").parent
        tiny.write_tiny_models(models_dir, parts=parts, say=lambda text: log.info("CharForge:%s", text))
        _downloads[key].update(state="done", finished=time.time())
    except Exception as exc:  # noqa: BLE001 - reported to the driver that asked
        _downloads[key].update(state="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        log.warning("CharForge: writing the tiny models failed: %s", exc)


async def tiny_handler(request):
    """Write the tiny random demo models into this server's models folder (``--tiny`` on a remote server)."""
    from ..engine import tiny

    try:
        body = await request.json()
    except ValueError:
        body = {}
    parts = body.get("parts") if isinstance(body, dict) else None
    parts = list(tiny.PARTS) if parts is None else parts
    if not isinstance(parts, list) or any(p not in tiny.PARTS for p in parts):
        return _error(400, f"parts must be a list of {', '.join(tiny.PARTS)}")
    key = "tiny/" + ",".join(sorted(parts))
    with _downloads_lock:
        if (_downloads.get(key) or {}).get("state") == "downloading":
            return _json({"started": []}, 202)
        _downloads[key] = {"name": key, "kind": "tiny", "state": "downloading", "started": time.time()}
    threading.Thread(target=_write_tiny, args=(parts, key), name="charforge-tiny", daemon=True).start()
    return _json({"started": [key]}, 202)


async def downloads_handler(request):
    with _downloads_lock:
        return _json({"downloads": {key: dict(value) for key, value in _downloads.items()}})


ROUTES = (
    ("GET", "/charforge/transfer/info", info_handler),
    ("GET", "/charforge/transfer/inputs/{dataset}", inputs_handler),
    ("PUT", "/charforge/transfer/inputs/{dataset}/files/{name:.+}", upload_chunk_handler),
    ("POST", "/charforge/transfer/inputs/{dataset}/prune", prune_handler),
    ("GET", "/charforge/transfer/outputs/index/{path:.*}", outputs_index_handler),
    ("GET", "/charforge/transfer/outputs/files/{path:.+}", outputs_file_handler),
    ("GET", "/charforge/transfer/models", models_handler),
    ("GET", "/charforge/transfer/models/loras/files/{name:.+}", lora_file_handler),
    ("PUT", "/charforge/transfer/models/loras/files/{name:.+}", lora_upload_handler),
    ("POST", "/charforge/transfer/models/download", download_handler),
    ("GET", "/charforge/transfer/models/downloads", downloads_handler),
    ("POST", "/charforge/transfer/models/tiny", tiny_handler),
)


def register_routes() -> bool:
    """Add the transfer routes to ComfyUI's server (a no-op outside ComfyUI)."""
    return all([bridge.add_route(method, path, handler) for method, path, handler in ROUTES])
