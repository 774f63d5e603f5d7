"""The little the sync modules share: route paths, JSON requests through the client, and what a missing
route means."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from ..client.async_client import AsyncComfyClient
from ..errors import ProtocolError, ServerError

PREFIX = "/charforge/transfer"


def path(*parts: str) -> str:
    """A route path with each part percent-encoded (``/`` inside a part kept: relative file names)."""
    return PREFIX + "".join("/" + quote(p, safe="/") for p in parts)


class NoTransferRoutes(ServerError):
    """The server has no CharForge transfer routes (no CharForge, or one too old): files cannot move."""


def no_routes(client: AsyncComfyClient) -> ServerError:
    return NoTransferRoutes(
        f"{client.url} has no CharForge transfer routes (HTTP 404): install or update CharForge on "
        "that ComfyUI and restart it",
        status=404,
    )


_REFUSALS = (400, 403, 404, 409, 411, 413, 415, 422)


async def request_json(
    client: AsyncComfyClient,
    method: str,
    route: str,
    *,
    params: dict[str, str] | None = None,
    json_body: Any = None,
    data: bytes | None = None,
    ok: tuple[int, ...] = (200,),
    retries: int | None = None,
) -> tuple[int, Any]:
    """(status, decoded JSON) of one request. A refusal the route explains (``{"error": ...}``) becomes a
    :class:`ServerError` with that explanation; a 404 without one means the routes are not installed."""
    status, body = await client._request(
        method,
        route,
        params=params,
        json_body=json_body,
        data=data,
        ok=tuple(ok) + _REFUSALS,
        retries=retries,
    )
    try:
        answer = json.loads(body or b"null")
    except ValueError:
        if status == 404:
            raise no_routes(client) from None
        raise ProtocolError(f"{method} {route} at {client.url} did not answer JSON (HTTP {status})") from None
    if status not in ok:
        message = answer.get("error") if isinstance(answer, dict) else None
        if status == 404 and not message:
            raise no_routes(client)
        raise ServerError(
            client._redact(f"{method} {route} at {client.url}: HTTP {status}: {message or answer}"),
            status=status,
            body=str(message or ""),
        )
    return status, answer
