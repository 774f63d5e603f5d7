"""HTTP details the ComfyUI client and the hosted-service clients (RunPod, Replicate) share: the User-Agent,
which exceptions mean "timed out", session timeouts, a lazily opened session that keeps its secret out of
messages, bounded reads of a body, the typed error for an HTTP status, ISO 8601 timestamps, and short
descriptions of network failures."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiohttp

from ..errors import AuthenticationError, DriverError, ServerError, ServerUnavailable

try:  # the package version, for the User-Agent
    from charforge import __version__ as _VERSION
except Exception:  # noqa: BLE001 - the node pack may be absent in a driver-only install
    _VERSION = "0"

USER_AGENT = f"charforge-driver/{_VERSION}"
# asyncio.TimeoutError is the builtin TimeoutError only from Python 3.11 on.
TIMEOUT_ERRORS = (asyncio.TimeoutError, TimeoutError)


class RateLimited(ServerError):
    """HTTP 429 after every retry; ``retry_after`` is the server's hint in seconds (if any)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, status=429)
        self.retry_after = retry_after


def client_timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    """No overall limit (uploads and long polls may take a while): `connect` seconds to connect, `read` seconds
    between two reads."""
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=read)


class ServiceSession:
    """One aiohttp session per client, opened on first use and reopened after a close, for a hosted service
    whose secret (`_secret`) must never show in a message (`redact`). Subclasses set ``connect_timeout`` and
    ``read_timeout`` and may add headers (`_headers`)."""

    connect_timeout: float
    read_timeout: float
    _session: aiohttp.ClientSession | None = None

    def _secret(self) -> Any:
        """The service's key or token (a config ``Secret``), or None."""
        return None

    def _headers(self) -> dict[str, str]:
        return {"User-Agent": USER_AGENT}

    def secrets(self) -> list[str]:
        secret = self._secret()
        return [secret.reveal()] if secret else []

    def redact(self, text: str) -> str:
        from ..secrets import mask

        return mask(text, self.secrets())

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = client_timeout(self.connect_timeout, self.read_timeout)
            self._session = aiohttp.ClientSession(headers=self._headers(), timeout=timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def parse_time(text: Any) -> float | None:
    """An ISO 8601 timestamp as the hosted services write it (``2023-09-08T16:19:34.765994Z``) in epoch seconds;
    None for anything else."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def status_error(
    where: str,
    status: int,
    snippet: str,
    *,
    service: str,
    auth_hint: str,
    rate_limited: str,
    retry_after: float | None,
) -> DriverError:
    """The typed error for a hosted service's failed answer (`where`: "METHOD url", masked; `snippet`: the body,
    masked and cut): 401/403 authentication (with `auth_hint`), 429 `RateLimited` (`rate_limited` is its
    message), 5xx unavailable (retryable), any other status a plain `ServerError`."""
    if status in (401, 403):
        return AuthenticationError(f"{where}: HTTP {status} from {service} ({auth_hint})")
    if status == 429:
        return RateLimited(f"{where}: HTTP 429, {rate_limited}", retry_after=retry_after)
    if status >= 500:
        return ServerUnavailable(f"{where}: HTTP {status} from {service}: {snippet or '(empty body)'}")
    return ServerError(
        f"{where}: HTTP {status} from {service}: {snippet or '(empty body)'}", status=status, body=snippet
    )


def failure_reason(exc: BaseException, sent: bool) -> tuple[str, bool]:
    """Why a request failed without an answer ("timed out" or the error's text) and whether the request may have
    reached the server (`sent`, or anything but a refused connection)."""
    reason = "timed out" if isinstance(exc, TIMEOUT_ERRORS) else (str(exc) or type(exc).__name__)
    return reason, sent or not isinstance(exc, aiohttp.ClientConnectorError)


def lost_answer(method: str, url: str, reason: str) -> str:
    """The (unmasked) message for a create request whose answer never came back."""
    return (
        f"{method} {url}: the request was sent but no answer came back ({reason}); it may or may "
        "not have been accepted"
    )


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
