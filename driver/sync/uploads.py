"""A photo folder (images + caption sidecars) up to ``<input>/charforge/<dataset>/`` on the server.

Content-addressed: a file the server already holds with the same sha256 is not sent; a changed one is. Sent
in chunks (each request well inside a RunPod proxy's 100 s limit), each chunk appended at the offset the
server has: after a dropped connection the driver asks the server how far it got and goes on from there, so
each byte range crosses the wire once (unless it was lost on the way).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charforge.common.transfer import (
    DEFAULT_CHUNK,
    MAX_UPLOAD_FILE,
    dataset_name_ok,
    local_files,
    sha256_file,
)

from ..client.async_client import AsyncComfyClient
from ..errors import DriverError, ServerError, ServerUnavailable, UsageError
from ._http import path, request_json

#: what a proxy in front of the server answers when it gave up waiting (Cloudflare's 524 on RunPod pods)
PROXY_GAVE_UP = (520, 522, 524)

Progress = Callable[[str, int, int], None]  # (file name, bytes of it on the server, its size)


@dataclass
class UploadReport:
    """What an upload did: the server's folder for the dataset (what a Load Dataset node takes), the files
    sent and those already there, the bytes that crossed the wire, files removed on the server."""

    dataset: str
    folder: str
    sent: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "folder": self.folder,
            "sent": self.sent,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "bytes_sent": self.bytes_sent,
            "files": self.files,
        }


async def _listing(client: AsyncComfyClient, dataset: str) -> dict[str, Any]:
    _, answer = await request_json(client, "GET", path("inputs", dataset))
    return answer


async def upload_folder(
    client: AsyncComfyClient,
    folder: str | Path,
    dataset: str,
    *,
    chunk: int = DEFAULT_CHUNK,
    prune: bool = True,
    retries: int = 5,
    on_progress: Progress | None = None,
) -> UploadReport:
    """Upload the images and captions of `folder` as `dataset`; see the module docstring.

    `prune` removes files of the dataset on the server that are no longer in `folder`. A connection that
    drops is retried `retries` times per file, each time from where the server got to.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of photos")
    if not dataset_name_ok(dataset):
        raise UsageError(f"dataset name {dataset!r}: use letters, digits and '._-'")
    files = local_files(folder)
    if not files:
        raise UsageError(f"{folder} holds no images or captions to upload")
    too_big = [
        f"{name} ({p.stat().st_size} bytes)"
        for name, p in files.items()
        if p.stat().st_size > MAX_UPLOAD_FILE
    ]
    if too_big:
        raise UsageError(
            f"larger than the {MAX_UPLOAD_FILE // (1 << 20)} MiB the server accepts per file: "
            + ", ".join(too_big)
            + "; shrink or remove them"
        )
    hashes = {name: await asyncio.to_thread(sha256_file, p) for name, p in files.items()}
    listing = await _listing(client, dataset)
    report = UploadReport(dataset, str(listing.get("folder", "")))
    remote = listing.get("files") or {}
    for name, local in files.items():
        size, sha = local.stat().st_size, hashes[name]
        report.files[name] = {"size": size, "sha256": sha}
        if (remote.get(name) or {}).get("sha256") == sha:
            report.unchanged.append(name)
            continue
        report.bytes_sent += await _send_file(
            client,
            dataset,
            name,
            local,
            size,
            sha,
            int((listing.get("partial") or {}).get(sha, 0)),
            chunk,
            retries,
            on_progress,
        )
        report.sent.append(name)
    if prune:
        _, answer = await request_json(
            client, "POST", path("inputs", dataset, "prune"), json_body={"keep": sorted(files)}
        )
        report.removed = list(answer.get("removed") or [])
    if not report.folder:
        report.folder = str((await _listing(client, dataset)).get("folder", ""))
    return report


async def _put_chunk(
    client: AsyncComfyClient, route: str, file: Path, offset: int, size: int, sha: str, chunk: int
) -> tuple[int, int, Any]:
    """PUT the chunk of `file` at `offset` (at most `chunk` bytes) to a resumable upload route: the bytes sent,
    the status (200, or 409 when the server holds another offset) and the answer."""
    with open(file, "rb") as handle:
        handle.seek(offset)
        data = handle.read(min(chunk, size - offset))
    params = {"size": str(size), "sha256": sha, "offset": str(offset)}
    status, answer = await request_json(
        client, "PUT", route, params=params, data=data, ok=(200, 409), retries=0
    )
    return len(data), status, answer


async def _dropped(exc: ServerUnavailable | ServerError, failures: int, retries: int, name: str) -> int:
    """After a chunk's connection dropped (or a proxy gave up): the failures so far, once the backoff has been
    waited; raised again when it is another server error, ServerUnavailable when the retries are spent."""
    if isinstance(exc, ServerError) and exc.status not in PROXY_GAVE_UP:
        raise exc
    failures += 1
    if failures > retries:
        raise ServerUnavailable(f"uploading {name}: {exc} ({retries} retries)") from None
    await asyncio.sleep(min(10.0, 0.2 * 2**failures))
    return failures


async def _send_file(
    client: AsyncComfyClient,
    dataset: str,
    name: str,
    local: Path,
    size: int,
    sha: str,
    offset: int,
    chunk: int,
    retries: int,
    on_progress: Progress | None,
) -> int:
    """Send `local` from `offset` on; returns the bytes sent."""
    sent = 0
    failures = 0
    route = path("inputs", dataset, "files", name)
    if offset > size:
        offset = 0
    while True:
        try:
            length, status, answer = await _put_chunk(client, route, local, offset, size, sha, chunk)
            sent += length
        except (ServerUnavailable, ServerError) as exc:
            # the connection dropped (or a proxy gave up, 524): some of the chunk may have arrived; the
            # server says how much
            failures = await _dropped(exc, failures, retries, name)
            listing = await _listing(client, dataset)
            if (listing.get("files", {}).get(name) or {}).get("sha256") == sha:
                return sent
            offset = int((listing.get("partial") or {}).get(sha, 0))
            continue
        if status == 409:
            offset = int(answer.get("received", 0))  # the server has more (or less) than we thought
            continue
        if answer.get("complete"):
            if on_progress is not None:
                on_progress(name, size, size)
            return sent
        new_offset = int(answer.get("received", -1))
        if new_offset <= offset and length:
            raise ServerError(f"uploading {name}: the server did not take the chunk at {offset}")
        offset = new_offset
        if on_progress is not None:
            on_progress(name, offset, size)
        if offset >= size:
            raise DriverError(
                f"uploading {name}: all {size} bytes sent but the server did not complete the file"
            )


async def upload_lora(
    client: AsyncComfyClient,
    lora: str | Path,
    *,
    chunk: int = DEFAULT_CHUNK,
    retries: int = 5,
) -> dict[str, Any]:
    """Put a LoRA trained elsewhere (on Replicate) into the server's loras folder under its own name, in chunks
    like photos (resumed from the server's offset after a dropped connection); a file the server already holds
    with the same sha256 is not sent. Returns ``{"name", "sha256", "size", "sent"}``."""
    lora = Path(lora)
    name, size = lora.name, lora.stat().st_size
    sha = await asyncio.to_thread(sha256_file, lora)
    _, listing = await request_json(
        client, "GET", path("models"), params={"kinds": "loras", "names": name, "hash": "1"}
    )
    present = {m.get("name"): m for m in (listing.get("models") or {}).get("loras") or []}
    if (present.get(name) or {}).get("sha256") == sha:
        return {"name": name, "sha256": sha, "size": size, "sent": 0}
    route = path("models", "loras", "files", name)
    offset, sent, failures = 0, 0, 0
    while True:
        try:
            length, status, answer = await _put_chunk(client, route, lora, offset, size, sha, chunk)
        except (ServerUnavailable, ServerError) as exc:
            failures = await _dropped(exc, failures, retries, name)
            continue  # the same offset again: the server answers 409 with how much it has
        if status == 409:
            offset = int(answer.get("received", 0))
            continue
        sent += length
        if answer.get("complete"):
            return {"name": name, "sha256": sha, "size": size, "sent": sent}
        new_offset = int(answer.get("received", -1))
        if new_offset <= offset and length:
            raise ServerError(f"uploading {name}: the server did not take the chunk at {offset}")
        offset = new_offset
        if offset >= size:
            raise DriverError(f"uploading {name}: all {size} bytes sent but the server did not complete it")
