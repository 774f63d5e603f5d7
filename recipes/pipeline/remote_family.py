"""The family of a base model on a server elsewhere: the server reads it from its own file's tensors and reports
it in the transfer routes' model listing (``GET /charforge/transfer/models?...&arch=1``)."""

from __future__ import annotations

from typing import Any

from ...driver.client import ComfyClient
from ...driver.client.async_client import AsyncComfyClient
from ...driver.errors import DriverError
from ...driver.sync import call
from ...driver.sync._http import path, request_json
from .families import FAMILY_NAMES, SUPPORTED
from .options import PipelineError


async def _listing(client: AsyncComfyClient, kind: str, name: str) -> dict[str, Any]:
    _, answer = await request_json(
        client, "GET", path("models"), params={"kinds": kind, "names": name, "arch": "1"}
    )
    return answer or {}


def listed_family(client: ComfyClient, kind: str, name: str) -> str | None:
    """The family the server reports for its model `name` in folder `kind`; None when it reports none (no
    CharForge transfer routes, or one that predates model families). Refuses a file the server could not read
    as a supported base model, with the server's reason."""
    try:
        answer = call(client, _listing, kind, name)
    except DriverError:
        return None
    entries = ((answer.get("models") or {}).get(kind)) or []
    entry = next((e for e in entries if e.get("name") == name), None)
    if entry is None:
        return None
    if entry.get("arch_error"):
        raise PipelineError(
            f"base model {name!r} on {client.url} is not a model the pipeline can use: {entry['arch_error']} "
            f"(supported: {SUPPORTED})"
        )
    family = entry.get("arch")
    if family is None:
        return None
    if family not in FAMILY_NAMES:
        raise PipelineError(f"base model {name!r} is a {family} model; the pipeline supports {SUPPORTED}")
    return str(family)
