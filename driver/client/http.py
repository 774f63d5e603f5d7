"""HTTP details the ComfyUI client and the RunPod clients share: the User-Agent, which exceptions mean "timed
out", bounded reads of a body, and short descriptions of network failures."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Callable

import aiohttp

try:  # the package version, for the User-Agent
    from charforge import __version__ as _VERSION
except Exception:  # noqa: BLE001 - the node pack may be absent in a driver-only install
    _VERSION = "0"

USER_AGENT = f"charforge-driver/{_VERSION}"
# asyncio.TimeoutError is the builtin TimeoutError only from Python 3.11 on.
TIMEOUT_ERRORS = (asyncio.TimeoutError, TimeoutError)


def is_loopback(netloc: str) -> bool:
    host = netloc.rsplit(":", 1)[0].strip("[]") if not netloc.startswith("[") else netloc[1:].split("]")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def read_body(resp: aiohttp.ClientResponse, cap: int, too_large: Callable[[], Exception]) -> bytes:
    """The body of ``resp``, raising ``too_large()`` as soon as it passes ``cap`` bytes (or at once when its
    ``Content-Length`` says so): a hostile server cannot make us hold more than ``cap`` in memory."""
    if resp.content_length is not None and resp.content_length > cap:
        raise too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


async def read_head(resp: aiohttp.ClientResponse, limit: int = 64 * 1024) -> bytes:
    """At most ``limit`` bytes of a body (for error messages: the rest is never read)."""
    data = bytearray()
    with contextlib.suppress(aiohttp.ClientError, *TIMEOUT_ERRORS):
        while len(data) < limit:
            chunk = await resp.content.read(limit - len(data))
            if not chunk:
                break
            data += chunk
    return bytes(data)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, TIMEOUT_ERRORS):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text
