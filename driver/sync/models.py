"""Models in place: a model manifest checked against what the server has before anything is queued, and the
missing files fetched *by the server* from their URL (resumed, checked by size and sha256 there)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from charforge.common.transfer import ModelEntry, hf_token, is_hf_url

from ..client.async_client import AsyncComfyClient
from ..client.http import is_loopback
from ..config import Secret
from ..errors import DriverError, JobTimeout
from ._http import path, request_json

log = logging.getLogger("charforge.driver.sync")


class MissingModels(DriverError):
    """A job needs models the server does not have (or has in another version)."""

    exit_code = 2

    def __init__(self, message: str, missing: list[ModelEntry]):
        super().__init__(message)
        self.missing = missing


@dataclass
class ModelCheck:
    present: list[ModelEntry] = field(default_factory=list)
    missing: list[ModelEntry] = field(default_factory=list)
    #: present under the name but not the file the manifest describes: (entry, what differs)
    different: list[tuple[ModelEntry, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.different

    def describe(self) -> str:
        parts = [
            f"{e.kind}/{e.name}" + (" (no URL to fetch it from)" if not e.source_url() else "")
            for e in self.missing
        ]
        parts += [f"{e.kind}/{e.name} ({why})" for e, why in self.different]
        return ", ".join(parts)


async def check_models(
    client: AsyncComfyClient, entries: list[ModelEntry], *, verify: bool = False
) -> ModelCheck:
    """Which of `entries` the server has. Sizes are always compared; sha256 where the server knows it (it
    remembers the checksum of every file it downloaded or hashed), or always with `verify` (the server hashes
    each file once, which takes a while for a large checkpoint)."""
    kinds = sorted({e.kind for e in entries})
    check = ModelCheck()
    if not entries:
        return check
    _, answer = await request_json(
        client,
        "GET",
        path("models"),
        params={
            "kinds": ",".join(kinds),
            "names": ",".join(sorted({e.name for e in entries})),
            **({"hash": "1"} if verify else {}),
        },
    )
    present = {(kind, m["name"]): m for kind, items in (answer.get("models") or {}).items() for m in items}
    for entry in entries:
        found = present.get((entry.kind, entry.name))
        if found is None:
            check.missing.append(entry)
        elif entry.size is not None and found.get("size") is not None and found["size"] != entry.size:
            check.different.append(
                (entry, f"{found['size']} bytes on the server, the manifest says {entry.size}")
            )
        elif entry.sha256 and found.get("sha256") and found["sha256"] != entry.sha256:
            check.different.append(
                (
                    entry,
                    f"sha256 {found['sha256'][:12]}… on the server, the manifest says {entry.sha256[:12]}…",
                )
            )
        else:
            check.present.append(entry)
    return check


def require_models(check: ModelCheck, server: str) -> None:
    """Raise :class:`MissingModels` naming what is missing, before anything is queued."""
    if not check.ok:
        raise MissingModels(
            f"{server} lacks models this job needs: {check.describe()}; put them there, or pass "
            "--provision to let the server download those with a URL",
            check.missing,
        )


async def provision_models(
    client: AsyncComfyClient,
    entries: list[ModelEntry],
    *,
    poll: float = 1.0,
    timeout: float = 3600.0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    token: Secret | str | None = None,
) -> ModelCheck:
    """Have the server download the missing `entries` with a URL (resumed, checked there); wait until every
    one is done and return the final check. A refused download (wrong checksum, unreachable URL) raises
    :class:`MissingModels` with the server's reason.

    Gated or private Hugging Face files: `token` (default: ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` of this
    process) goes with the request when a missing file is on the hub, unless the link to the server is plain
    http to another machine (then only a token set on the server is used). The server sends it to the hub
    only and keeps it nowhere; every message is masked.
    """
    check = await check_models(client, entries)
    if check.different:
        require_models(check, client.url)
    fetchable = [e for e in check.missing if e.source_url()]
    if len(fetchable) < len(check.missing):
        require_models(ModelCheck(missing=[e for e in check.missing if not e.source_url()]), client.url)
    if not fetchable:
        return check
    body: dict[str, Any] = {"models": [e.to_dict() for e in fetchable]}
    secret = _token_for(client, fetchable, token)
    if secret is not None:
        body["hf_token"] = secret.reveal()
    await request_json(client, "POST", path("models", "download"), json_body=body, ok=(202,))
    keys = {f"{e.kind}/{e.name}": e for e in fetchable}
    deadline = time.monotonic() + timeout
    while True:
        _, answer = await request_json(client, "GET", path("models", "downloads"))
        states = {k: v for k, v in (answer.get("downloads") or {}).items() if k in keys}
        if on_progress is not None:
            on_progress(states)
        failed = {k: v for k, v in states.items() if v.get("state") == "failed"}
        if failed:
            raise MissingModels(
                client._redact(
                    "the server could not fetch "
                    + "; ".join(f"{k}: {v.get('error')}" for k, v in failed.items())
                ),
                [keys[k] for k in failed],
            )
        if len(states) == len(keys) and all(v.get("state") == "done" for v in states.values()):
            break
        if time.monotonic() > deadline:
            raise JobTimeout(
                f"model downloads on {client.url} did not finish within {timeout:g} s",
                prompt_id="",
                seconds=timeout,
            )
        await asyncio.sleep(poll)
    final = await check_models(client, entries)
    require_models(final, client.url)
    return final


def _token_for(
    client: AsyncComfyClient, entries: list[ModelEntry], token: Secret | str | None
) -> Secret | None:
    """The Hugging Face token to send with these downloads, or None (none set, no file on the hub, or a link
    that would carry it in the clear)."""
    value = token if token is not None else hf_token()
    secret = value if isinstance(value, Secret) else Secret(value)  # masked wherever it might appear
    if not secret or not any(is_hf_url(e.source_url()) for e in entries):
        return None
    parts = urlsplit(client.url)
    if parts.scheme != "https" and not is_loopback(parts.netloc):
        log.warning(
            "not sending HF_TOKEN to %s over plain http; gated Hugging Face files need HF_TOKEN set on the "
            "server (or reach it over https)",
            client.url,
        )
        return None
    return secret


async def provision_tiny(
    client: AsyncComfyClient, parts: list[str], *, poll: float = 1.0, timeout: float = 1800.0
) -> None:
    """Have the server write CharForge's tiny random demo models (the demo on a rented GPU, as it runs
    locally); returns once they are there, raises :class:`DriverError` with the server's reason otherwise."""
    await request_json(client, "POST", path("models", "tiny"), json_body={"parts": parts}, ok=(202,))
    key = "tiny/" + ",".join(sorted(parts))
    deadline = time.monotonic() + timeout
    while True:
        _, states = await request_json(client, "GET", path("models", "downloads"))
        state = (states.get("downloads") or {}).get(key) or {}
        if state.get("state") == "done":
            return
        if state.get("state") == "failed":
            raise DriverError(
                client._redact(f"{client.url} could not write the tiny models: {state.get('error')}")
            )
        if time.monotonic() > deadline:
            raise JobTimeout(
                f"writing the tiny models on {client.url} did not finish within {timeout:g} s",
                prompt_id="",
                seconds=timeout,
            )
        await asyncio.sleep(poll)
