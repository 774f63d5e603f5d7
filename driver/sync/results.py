"""Results home: folders of ``<output>/charforge`` on the server (a training run folder, a dataset folder with
its report, a storyboard) and the trained LoRA, downloaded with resume and checksum.

A file already here with the server's size and sha256 is not downloaded again; an interrupted one goes on
from its ``.part`` file with an HTTP Range request; a file whose checksum does not match what the server
announced is removed and refused. Each downloaded file comes back as a manifest entry.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp

from charforge.common.transfer import relative_parts, sha256_file

from ..client.async_client import AsyncComfyClient
from ..client.http import describe_error, read_head
from ..errors import ProtocolError, ServerUnavailable, UsageError
from ._http import path, request_json


@dataclass
class DownloadedTree:
    """What came home: manifest entries ``{"remote", "path", "size", "sha256", "downloaded"}``."""

    remote: str
    out_dir: Path
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bytes_downloaded(self) -> int:
        return sum(f["bytes_received"] for f in self.files)


async def _have(target: Path, size: int, sha: str) -> bool:
    return (
        target.is_file()
        and target.stat().st_size == size
        and await asyncio.to_thread(sha256_file, target) == sha
    )


async def fetch_file(
    client: AsyncComfyClient, route: str, target: Path, size: int, sha: str, retries: int = 5
) -> int:
    """Download `route` into `target` (via ``target.part``, resumed with Range), verified against `size` and
    `sha`; returns the bytes received. A mismatch removes the partial file and raises :class:`ProtocolError`."""
    if size > client.limits.max_download_bytes:
        raise ProtocolError(
            f"{target.name} is {size} bytes, over the download limit; raise "
            "CHARFORGE_MAX_DOWNLOAD_MB if such a file is expected"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    received = 0
    url = client.config.url.http(route)
    for attempt in range(retries + 1):
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            partial.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if 0 < have < size else {}
        try:
            if have < size or size == 0:
                session = await client._get_session()
                async with session.get(url, headers=headers) as resp:
                    if resp.status not in (200, 206):
                        raise client._status_error("GET", route, resp.status, await read_head(resp))
                    mode = "ab" if resp.status == 206 else "wb"
                    with open(partial, mode) as handle:
                        written = have if mode == "ab" else 0
                        async for block in resp.content.iter_chunked(1 << 16):
                            written += len(block)
                            if written > size:
                                break
                            handle.write(block)
                            received += len(block)
            break
        except (
            aiohttp.ClientConnectionError,
            aiohttp.ClientPayloadError,
            asyncio.TimeoutError,
            TimeoutError,
        ) as exc:
            if attempt >= retries:
                raise ServerUnavailable(
                    client._redact(f"downloading {target.name} from {client.url}: {describe_error(exc)}")
                ) from None
            await asyncio.sleep(min(10.0, 0.2 * 2**attempt))
    got = partial.stat().st_size if partial.exists() else 0
    digest = await asyncio.to_thread(sha256_file, partial) if partial.exists() else ""
    if got != size or digest != sha:
        partial.unlink(missing_ok=True)
        raise ProtocolError(
            f"{target.name}: received {got} bytes with sha256 {digest or '-'}, the server announced "
            f"{size} bytes with sha256 {sha}; the file was removed"
        )
    os.replace(partial, target)
    return received


def _local(out_dir: Path, remote: str, rel: str) -> Path:
    inner = PurePosixPath(rel).relative_to(remote) if remote and rel != remote else PurePosixPath(rel).name
    parts = relative_parts(str(inner))
    if parts is None:
        raise ProtocolError(f"the server listed a file name that is not a plain relative name: {rel!r}")
    return out_dir.joinpath(*parts)


async def download_tree(
    client: AsyncComfyClient,
    remote: str,
    out_dir: str | Path,
    *,
    retries: int = 5,
    have: dict[str, Path] | None = None,
) -> DownloadedTree:
    """Download ``<output>/charforge/<remote>`` (a folder, or one file) into `out_dir`, keeping its layout.

    `have` maps sha256 to local files already at home (a LoRA downloaded from the loras folder that the run
    folder holds too): such a file is copied here instead of crossing the wire again."""
    remote = remote.strip("/")
    if remote and relative_parts(remote) is None:
        raise UsageError(f"{remote!r} is not a relative path inside CharForge's output folder")
    _, index = await request_json(
        client, "GET", path("outputs", "index", remote) if remote else path("outputs", "index") + "/"
    )
    tree = DownloadedTree(remote, Path(out_dir))
    for rel, meta in sorted((index.get("files") or {}).items()):
        size, sha = int(meta["size"]), str(meta["sha256"])
        target = _local(tree.out_dir, remote, rel)
        received: int | None = None  # None: the file was already here (or a copy of it was)
        if not await _have(target, size, sha):
            local = (have or {}).get(sha)
            if local is not None and await _have(local, size, sha):
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".part")
                await asyncio.to_thread(shutil.copyfile, local, partial)
                os.replace(partial, target)
            else:
                received = await fetch_file(client, path("outputs", "files", rel), target, size, sha, retries)
        tree.files.append(
            {
                "remote": rel,
                "path": str(target),
                "size": size,
                "sha256": sha,
                "downloaded": received is not None,
                "bytes_received": received or 0,
            }
        )
    return tree


async def download_lora(
    client: AsyncComfyClient, name: str, out_dir: str | Path, *, retries: int = 5
) -> dict[str, Any]:
    """Download the LoRA `name` of the server's loras folder into `out_dir` (checked by sha256)."""
    if relative_parts(name) is None:
        raise UsageError(f"{name!r} is not a LoRA file name")
    _, listing = await request_json(
        client, "GET", path("models"), params={"kinds": "loras", "hash": "1", "names": name}
    )
    entry = next((e for e in (listing.get("models") or {}).get("loras", []) if e.get("name") == name), None)
    if entry is None or "sha256" not in entry:
        raise UsageError(f"the server has no LoRA {name!r} in its loras folders")
    target = Path(out_dir) / PurePosixPath(name).name
    size, sha = int(entry["size"]), str(entry["sha256"])
    downloaded = not await _have(target, size, sha)
    received = (
        await fetch_file(client, path("models", "loras", "files", name), target, size, sha, retries)
        if downloaded
        else 0
    )
    return {
        "remote": f"loras/{name}",
        "path": str(target),
        "size": size,
        "sha256": sha,
        "downloaded": downloaded,
        "bytes_received": received,
    }
