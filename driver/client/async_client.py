"""ComfyUI clients: :class:`AsyncComfyClient` (asyncio) and :class:`ComfyClient` (blocking, same methods).

How a job is followed (the recipe of the contract, section 5):

1. the WebSocket ``/ws?clientId=<our id>`` is opened *before* submitting, and kept alive with pings;
2. ``POST /prompt`` carries the same ``client_id`` and a ``prompt_id`` we chose (uuid4), so a submission whose
   answer was lost can be recognised in the queue/history instead of being sent twice;
3. WebSocket messages are hints (progress, node starts, previews); the history entry ``/history/<id>`` is the
   source of truth. It is fetched after ``executing {node: null}`` (or ``execution_error``/``_interrupted``),
   retried while it is still ``{}``, and polled periodically anyway, faster while the socket is down;
4. a dropped socket is reopened with the same client id; nothing is lost because completion is decided by the
   history, never by a message;
5. the job timeout is a wall-clock limit for the whole job, queue wait included.

Nothing here prints; events are handed to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import mimetypes
import queue as thread_queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .config import (
    DEFAULT_SERVER,
    DOWNLOAD_LIMIT_SETTING,
    REPLY_LIMIT_SETTING,
    Auth,
    Limits,
    ServerConfig,
    ServerURL,
    mib,
)
from .errors import (
    AuthenticationError,
    DriverError,
    ExecutionError,
    Interrupted,
    JobLost,
    JobTimeout,
    ProtocolError,
    ServerError,
    ServerUnavailable,
    ValidationError,
)
from .events import TERMINAL_TYPES, Event, parse_binary_message, parse_text_message
from .outputs import (
    DownloadedFile,
    NodeValues,
    OutputFile,
    collect_files,
    collect_values,
    local_path_for,
    open_unique,
)
from .secrets import mask, mask_body
from .workflow.load import Workflow, coerce_workflow
from .workflow.overrides import InputFile, Override
from .workflow.preflight import problems_from_server
from .workflow.prepare import PreparedRun, as_api, prepare_run

try:  # the package version, for the User-Agent
    from charforge import __version__ as _VERSION
except Exception:  # noqa: BLE001 - the node pack may be absent in a driver-only install
    _VERSION = "0"

USER_AGENT = f"charforge-driver/{_VERSION}"
# asyncio.TimeoutError is the builtin TimeoutError only from Python 3.11 on.
_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (asyncio.TimeoutError, TimeoutError)
_RECONNECT_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0, 5.0)


@dataclass(frozen=True)
class Timeout:
    """Per-request network timeouts in seconds (``None`` = no limit). The *job* limit is separate."""

    connect: float | None = 10.0
    read: float | None = 60.0


@dataclass
class Job:
    """A submitted prompt."""

    prompt_id: str
    number: float | None
    client_id: str
    submitted_at: float
    prompt: dict[str, Any]
    node_errors: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timings:
    """Epoch seconds; ``started_at``/``finished_at`` come from the server's message timestamps."""

    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    observed_at: float | None = None

    @property
    def queued_seconds(self) -> float | None:
        if self.submitted_at is None or self.started_at is None:
            return None
        return max(0.0, self.started_at - self.submitted_at)

    @property
    def execution_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        def iso(t: float | None) -> str | None:
            if t is None:
                return None
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"

        return {"submitted_at": iso(self.submitted_at), "started_at": iso(self.started_at),
                "finished_at": iso(self.finished_at), "queued_seconds": _round(self.queued_seconds),
                "execution_seconds": _round(self.execution_seconds)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class JobResult:
    """A finished, successful job, built from its history entry."""

    prompt_id: str
    outputs: dict[str, Any]
    prompt: dict[str, Any]
    timings: Timings
    status: dict[str, Any] = field(default_factory=dict)
    cached_nodes: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[OutputFile]:
        """Every file output (images, animations under ``images`` + ``animated``, gifs, audio, video...)."""
        return collect_files(self.outputs)

    @property
    def values(self) -> list[NodeValues]:
        """Text and number outputs."""
        return collect_values(self.outputs)

    def node_class(self, node_id: str) -> str | None:
        node = self.prompt.get(str(node_id)) or {}
        return node.get("class_type")

    def node_title(self, node_id: str) -> str | None:
        node = self.prompt.get(str(node_id)) or {}
        return (node.get("_meta") or {}).get("title")


@dataclass(frozen=True)
class UploadedFile:
    """Where the server stored an upload. ``reference`` is the value for a LoadImage-like input."""

    name: str
    subfolder: str = ""
    type: str = "input"

    @property
    def reference(self) -> str:
        ref = f"{self.subfolder}/{self.name}" if self.subfolder else self.name
        return ref if self.type == "input" else f"{ref} [{self.type}]"


def result_from_history(prompt_id: str, entry: dict[str, Any], *, submitted_at: float | None = None,
                        node_errors: dict[str, Any] | None = None) -> JobResult:
    """Turn a history entry into a :class:`JobResult`, or raise the job's failure.

    Raises :class:`ExecutionError` (a node failed) or :class:`Interrupted` (interrupted/cancelled), and
    :class:`ProtocolError` when the entry does not have the shape ComfyUI gives it.
    """
    check_history_entry(prompt_id, entry)
    status = entry.get("status") or {}
    messages = status.get("messages") or []
    item = entry.get("prompt") or []
    prompt = item[2] if len(item) > 2 and isinstance(item[2], dict) else {}
    timings = Timings(submitted_at=submitted_at, observed_at=time.time())
    cached: list[str] = []
    failure: tuple[str, dict[str, Any]] | None = None
    for message in messages:
        if not isinstance(message, (list, tuple)) or len(message) != 2 or not isinstance(message[1], dict):
            continue
        kind, data = message
        stamp = data.get("timestamp")
        seconds = stamp / 1000.0 if isinstance(stamp, (int, float)) else None
        if kind == "execution_start":
            timings.started_at = seconds
        elif kind == "execution_cached":
            cached = [str(n) for n in data.get("nodes") or []]
        elif kind in TERMINAL_TYPES:
            timings.finished_at = seconds
            if kind != "execution_success":
                failure = (kind, data)
    if failure is not None:
        kind, data = failure
        node_id = data.get("node_id")
        node_id = None if node_id is None else str(node_id)
        node = prompt.get(node_id or "", {})
        title = (node.get("_meta") or {}).get("title")
        if kind == "execution_interrupted":
            where = f" at node {node_id} ({data.get('node_type')})" if node_id else ""
            raise Interrupted(f"job {prompt_id} was interrupted{where}", prompt_id=prompt_id, node_id=node_id,
                              node_type=data.get("node_type"))
        raise ExecutionError(prompt_id=prompt_id, node_id=node_id, node_type=data.get("node_type"), title=title,
                             exception_type=str(data.get("exception_type") or "Error"),
                             exception_message=str(data.get("exception_message") or ""),
                             traceback=data.get("traceback"), executed=data.get("executed"))
    if status and status.get("status_str") == "error":
        raise ExecutionError(prompt_id=prompt_id, node_id=None, node_type=None, exception_type="Error",
                             exception_message="the server reports the job failed without details")
    return JobResult(prompt_id=prompt_id, outputs=entry.get("outputs") or {}, prompt=prompt, timings=timings,
                     status=status, cached_nodes=cached, node_errors=dict(node_errors or {}), history=entry)


def _kind(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__)


def check_history_entry(prompt_id: str, entry: Any, where: str = "the server") -> None:
    """Raise :class:`ProtocolError` unless ``entry`` has the shape of a ComfyUI history entry."""
    def bad(what: str, value: Any, expected: str) -> ProtocolError:
        return ProtocolError(f"the history entry of job {prompt_id} from {where} is malformed: {what} is "
                             f"{_kind(value)}, expected {expected}; is this a ComfyUI server?")

    if not isinstance(entry, dict):
        raise bad("the entry", entry, "an object")
    for key, kind, expected in (("status", dict, "an object"), ("prompt", list, "a list"),
                                ("outputs", dict, "an object")):
        value = entry.get(key)
        if value is not None and not isinstance(value, kind):
            raise bad(f"'{key}'", value, expected)
    messages = (entry.get("status") or {}).get("messages")
    if messages is not None and not isinstance(messages, list):
        raise bad("'status.messages'", messages, "a list")


def _check_queue_items(items: Any, key: str, where: str) -> list[list[Any]]:
    if items is None:
        return []
    if not isinstance(items, list) or not all(
            isinstance(item, list) and len(item) >= 2 and isinstance(item[0], (int, float))
            and isinstance(item[1], str) for item in items):
        raise ProtocolError(f"GET /queue at {where} is malformed: '{key}' must be a list of "
                            "[number, prompt_id, ...] items; is this a ComfyUI server?")
    return items


def _is_loopback(netloc: str) -> bool:
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


async def _read_head(resp: aiohttp.ClientResponse, limit: int = 64 * 1024) -> bytes:
    """At most ``limit`` bytes of a body (for error messages: the rest is never read)."""
    data = bytearray()
    with contextlib.suppress(aiohttp.ClientError, *_TIMEOUT_ERRORS):
        while len(data) < limit:
            chunk = await resp.content.read(limit - len(data))
            if not chunk:
                break
            data += chunk
    return bytes(data)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _TIMEOUT_ERRORS):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text


class AsyncComfyClient:
    """Asynchronous client for one ComfyUI server.

    ``server`` is a URL (``http://host:8188``, ``https://host/prefix/``, credentials in the URL become basic
    auth) or a :class:`~charforge.driver.config.ServerConfig`. Use as an async context manager, or call
    :meth:`close`.
    """

    def __init__(self, server: str | ServerConfig | None = None, *, auth: Auth | None = None,
                 timeout: Timeout | float | None = None, client_id: str | None = None,
                 ping_interval: float = 20.0, poll_interval: float = 5.0, retries: int = 2,
                 verify_tls: bool | None = None, trust_env: bool | None = None,
                 max_download_bytes: int | None = None, max_reply_bytes: int | None = None) -> None:
        if isinstance(server, ServerConfig):
            config = server
            if auth is not None:
                config = dataclasses.replace(config, auth=auth)
        else:
            url, url_auth = ServerURL.parse(server or DEFAULT_SERVER)
            config = ServerConfig(url, auth or url_auth, limits=Limits.resolve())
        if max_download_bytes is not None or max_reply_bytes is not None:
            config = dataclasses.replace(config, limits=Limits(
                max_download_bytes or config.limits.max_download_bytes,
                max_reply_bytes or config.limits.max_reply_bytes))
        self.config = config
        #: size limits on what the server sends (one file, one JSON reply, one WebSocket message)
        self.limits = config.limits
        if isinstance(timeout, (int, float)):
            timeout = Timeout(connect=float(timeout), read=float(timeout))
        self.timeout = timeout or Timeout()
        self.client_id = client_id or uuid.uuid4().hex
        self.ping_interval = ping_interval
        self.poll_interval = poll_interval
        self.retries = retries
        self.verify_tls = config.verify_tls if verify_tls is None else verify_tls
        # A proxy from the environment must never capture loopback traffic.
        self.trust_env = (not _is_loopback(config.url.netloc)) if trust_env is None else trust_env
        self._session: aiohttp.ClientSession | None = None
        self._ws_task: asyncio.Task | None = None
        self._ws_ready: asyncio.Event | None = None
        self._ws_ok = False
        self._ws_error: str | None = None
        self._closing = False
        self._subs: dict[str, asyncio.Queue[Event]] = {}
        self._running_prompt: str | None = None
        self._object_info: dict[str, Any] | None = None
        self.server_features: dict[str, Any] = {}

    # ---- basics ---------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server's base URL (never contains credentials)."""
        return str(self.config.url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, auth={self.config.auth!r})"

    def _redact(self, text: str) -> str:
        return mask(text, self.config.secrets())

    async def __aenter__(self) -> AsyncComfyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the WebSocket and the HTTP session."""
        self._closing = True
        if self._ws_task is not None:
            self._ws_task.cancel()
            with contextlib.suppress(BaseException):
                await self._ws_task
            self._ws_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": USER_AGENT}
            if self.config.auth is not None:
                headers.update(self.config.auth.headers())
            timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout.connect,
                                            sock_connect=self.timeout.connect, sock_read=self.timeout.read)
            connector = aiohttp.TCPConnector(ssl=None if self.verify_tls else False)
            self._session = aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector,
                                                  trust_env=self.trust_env)
        return self._session

    # ---- HTTP -------------------------------------------------------------------------------------------------

    def _status_error(self, method: str, path: str, status: int, body: bytes) -> DriverError:
        snippet = mask_body(body, self.config.secrets(), limit=300)
        if status in (401, 403):
            if self.config.auth is None:
                hint = "no credentials were sent: set CHARFORGE_TOKEN, use --profile, or put them in the URL"
            else:
                hint = "the credentials were refused: check the token/password of this profile"
            return AuthenticationError(f"{method} {path} at {self.url}: HTTP {status} ({hint})")
        if status in (502, 503, 504):
            return ServerUnavailable(f"{method} {path} at {self.url}: HTTP {status} from a proxy; "
                                     "ComfyUI behind it is not answering (still starting?)")
        if status == 404:
            return ServerError(f"{method} {path} at {self.url}: HTTP 404; is this a ComfyUI server and is the "
                               "path prefix right?", status=status, body=snippet)
        if status == 413:
            return ServerError(f"{method} {path}: HTTP 413, the request is larger than the server accepts",
                               status=status, body=snippet)
        return ServerError(f"{method} {path} at {self.url}: HTTP {status}: {snippet or '(empty body)'}",
                           status=status, body=snippet)

    async def _request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                       json_body: Any = None, data: Any = None, ok: tuple[int, ...] = (200,),
                       retries: int | None = None) -> tuple[int, bytes]:
        """One HTTP request with retries on connection failures (GETs retry by default, POSTs do not)."""
        url = self.config.url.http(path)
        attempts = 1 + (self.retries if retries is None and method == "GET" else (retries or 0))
        for attempt in range(attempts):
            try:
                session = await self._get_session()
                body_data = data() if callable(data) else data
                async with session.request(method, url, params=params, json=json_body, data=body_data) as resp:
                    if resp.status in ok:
                        return resp.status, await self._read_reply(resp, f"{method} {path}")
                    body = await _read_head(resp)  # only a short excerpt is ever shown
                    error = self._status_error(method, path, resp.status, body)
                    error.retry_after = resp.headers.get("Retry-After")  # type: ignore[attr-defined]
                    raise error
            except ServerUnavailable:
                if attempt + 1 >= attempts:
                    raise
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, *_TIMEOUT_ERRORS) as exc:
                if attempt + 1 >= attempts:
                    raise ServerUnavailable(self._redact(
                        f"cannot reach ComfyUI at {self.url} ({method} {path}): {_describe(exc)}")) from None
            except aiohttp.InvalidURL as exc:
                raise ServerUnavailable(self._redact(f"invalid server URL {self.url}: {exc}")) from None
            await asyncio.sleep(0.3 * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_reply(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        """The whole body of a reply, refused beyond ``limits.max_reply_bytes`` (never held in memory whole)."""
        cap = self.limits.max_reply_bytes

        def too_large() -> ProtocolError:
            return ProtocolError(f"{what} at {self.url}: the reply is larger than {mib(cap)}, the limit for one "
                                 f"reply ({REPLY_LIMIT_SETTING}); is this a ComfyUI server?")

        return await read_body(resp, cap, too_large)

    def _json(self, body: bytes, path: str) -> Any:
        try:
            return json.loads(body or b"null")
        except ValueError:
            snippet = mask_body(body, self.config.secrets(), limit=120)
            raise ServerError(f"{path} at {self.url} did not answer JSON (got {snippet!r}); is this a ComfyUI "
                              "server?") from None

    async def get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET an API path and decode its JSON answer."""
        _, body = await self._request("GET", path, params=params)
        return self._json(body, path)

    async def get_object(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """GET an API path whose answer must be a JSON object (:class:`ProtocolError` otherwise)."""
        data = await self.get_json(path, params)
        if not isinstance(data, dict):
            raise ProtocolError(f"GET {path} at {self.url} answered {_kind(data)} where ComfyUI answers an "
                                "object; is this a ComfyUI server?")
        return data

    async def system_stats(self) -> dict[str, Any]:
        """``GET /system_stats`` (version, devices, memory)."""
        return await self.get_object("/system_stats")

    async def features(self) -> dict[str, Any]:
        """``GET /features``."""
        return await self.get_object("/features")

    async def object_info(self, refresh: bool = False) -> dict[str, Any]:
        """``GET /object_info``: every node class's schema (cached per client; ``refresh`` re-reads it)."""
        if self._object_info is None or refresh:
            self._object_info = await self.get_object("/object_info")
        return self._object_info

    async def queue(self) -> dict[str, list]:
        """``GET /queue``: ``{"queue_running": [...], "queue_pending": [...]}`` (pending sorted by priority)."""
        data = await self.get_object("/queue")
        running = _check_queue_items(data.get("queue_running"), "queue_running", self.url)
        pending = sorted(_check_queue_items(data.get("queue_pending"), "queue_pending", self.url),
                         key=lambda item: item[0])
        return {"queue_running": running, "queue_pending": pending}

    async def history(self, prompt_id: str | None = None, *, max_items: int | None = None) -> Any:
        """``GET /history/<id>`` -> the entry or None while unknown/unfinished; without an id, recent history."""
        if prompt_id is None:
            params = {"max_items": str(max_items)} if max_items else None
            return await self.get_object("/history", params)
        data = await self.get_object(f"/history/{prompt_id}")
        if prompt_id in data:
            check_history_entry(prompt_id, data[prompt_id], self.url)
            return data[prompt_id]
        return None

    async def job_state(self, prompt_id: str) -> tuple[str, int | None]:
        """Where a job is: ``("running"|"pending"|"finished"|"unknown", jobs ahead when pending)``."""
        data = await self.queue()
        if any(len(item) > 1 and item[1] == prompt_id for item in data["queue_running"]):
            return "running", None
        for position, item in enumerate(data["queue_pending"]):
            if len(item) > 1 and item[1] == prompt_id:
                return "pending", position + len(data["queue_running"])
        if await self.history(prompt_id) is not None:
            return "finished", None
        return "unknown", None

    # ---- WebSocket ------------------------------------------------------------------------------------------

    async def _ensure_ws(self) -> None:
        """Start the WebSocket listener and wait (briefly) for its first connection attempt."""
        if self._ws_task is None or self._ws_task.done():
            self._closing = False
            self._ws_ready = asyncio.Event()
            self._ws_task = asyncio.create_task(self._ws_loop(), name=f"comfy-ws-{self.client_id[:8]}")
        assert self._ws_ready is not None
        with contextlib.suppress(*_TIMEOUT_ERRORS):
            await asyncio.wait_for(self._ws_ready.wait(), (self.timeout.connect or 10.0) + 1.0)

    async def _ws_loop(self) -> None:
        failures = 0
        connected_before = False
        lost_reported = False
        while not self._closing:
            try:
                session = await self._get_session()
                ws = await session.ws_connect(self.config.url.ws(self.client_id), heartbeat=self.ping_interval,
                                              autoping=True, max_msg_size=self.limits.max_reply_bytes)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means "retry later, poll meanwhile"
                self._ws_ok = False
                self._ws_error = self._redact(_describe(exc))
                assert self._ws_ready is not None
                self._ws_ready.set()
                if not lost_reported:
                    lost_reported = True
                    self._broadcast(Event("connection_lost", {"reason": self._ws_error, "reconnecting": True}))
                await asyncio.sleep(_RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)])
                failures += 1
                continue
            failures = 0
            self._ws_ok = True
            self._ws_error = None
            with contextlib.suppress(Exception):  # a socket that dies at once is handled below
                await ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            assert self._ws_ready is not None
            self._ws_ready.set()
            if connected_before or lost_reported:
                self._broadcast(Event("reconnected", {"client_id": self.client_id}))
            connected_before = True
            lost_reported = False
            reason = "closed by the server"
            try:
                error: BaseException | None = None
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        event = parse_text_message(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        event = parse_binary_message(msg.data)
                    else:
                        if msg.type == aiohttp.WSMsgType.ERROR and isinstance(msg.data, BaseException):
                            error = msg.data
                        break
                    if event is not None:
                        self._dispatch(event)
                error = error or ws.exception()
                if ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG or (
                        isinstance(error, aiohttp.WebSocketError)
                        and error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG):
                    reason = (f"the server sent a WebSocket message larger than {mib(self.limits.max_reply_bytes)}"
                              f", the limit ({REPLY_LIMIT_SETTING})")
                elif error is not None:
                    reason = _describe(error)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await ws.close()
                raise
            except Exception as exc:  # noqa: BLE001
                reason = _describe(exc)
            finally:
                self._ws_ok = False
            with contextlib.suppress(Exception):
                await ws.close()
            if self._closing:
                break
            lost_reported = True
            self._broadcast(Event("connection_lost", {"reason": self._redact(reason), "reconnecting": True}))
            await asyncio.sleep(_RECONNECT_DELAYS[0])

    def _dispatch(self, event: Event) -> None:
        if event.type == "feature_flags":
            self.server_features = dict(event.data)
            return
        if event.type == "status":
            self._broadcast(event)
            return
        if event.type == "execution_start" and event.prompt_id in self._subs:
            self._running_prompt = event.prompt_id
        prompt_id = event.prompt_id
        if prompt_id is None and event.type != "status":
            prompt_id = self._running_prompt
            event.prompt_id = prompt_id
        if prompt_id is not None and prompt_id in self._subs:
            self._put(self._subs[prompt_id], event)
        ends_prompt = event.is_finished_marker or event.type in ("execution_error", "execution_interrupted")
        if ends_prompt and self._running_prompt == prompt_id:
            self._running_prompt = None

    @staticmethod
    def _put(q: asyncio.Queue[Event], event: Event) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # history is the truth; a lost hint does no harm
            q.put_nowait(event)

    def _broadcast(self, event: Event) -> None:
        for q in self._subs.values():
            self._put(q, Event(event.type, dict(event.data), event.prompt_id, event.time))

    def _subscribe(self, prompt_id: str) -> asyncio.Queue[Event]:
        if prompt_id not in self._subs:
            self._subs[prompt_id] = asyncio.Queue(maxsize=10000)
        return self._subs[prompt_id]

    def forget(self, prompt_id: str) -> None:
        """Stop buffering events of a job nobody will wait for."""
        self._subs.pop(prompt_id, None)

    # ---- submit -----------------------------------------------------------------------------------------------

    async def prepare(self, workflow: Workflow | dict[str, Any] | str | Path) -> Workflow:
        """Load a workflow (path, dict or :class:`Workflow`) and convert an editor workflow with
        ``/object_info`` when needed."""
        wf = coerce_workflow(workflow)
        if wf.prompt is None:
            wf = as_api(wf, await self.object_info())
        return wf

    async def prepare_run(self, workflow: Workflow | dict[str, Any] | str | Path, *,
                          sets: list[str | Override] = (), inputs: list[str | InputFile] = (),  # type: ignore[assignment]
                          preflight: bool = True, upload: bool = True) -> PreparedRun:
        """Load/convert ``workflow``, apply ``--set`` overrides, check it against ``/object_info`` (see
        :func:`~charforge.driver.workflow.prepare.prepare_run`) and upload the ``--input`` files (and override
        values naming local files for file-picking inputs); ``upload=False`` leaves them in ``pending_uploads``.

        Raises :class:`~charforge.driver.errors.OverrideError` for overrides that do not address one input, and
        :class:`~charforge.driver.errors.ValidationError` when the preflight finds errors; nothing is uploaded
        then.
        """
        prepared = prepare_run(await self.prepare(workflow), await self.object_info(), sets=sets, inputs=inputs,
                               preflight=preflight)
        if not upload or not prepared.pending_uploads:
            return prepared
        references = [(await self.upload(item.path)).reference for item in prepared.pending_uploads]
        return prepared.with_uploads(references)

    async def submit(self, workflow: Workflow | dict[str, Any] | str | Path, *, prompt_id: str | None = None,
                     extra_data: dict[str, Any] | None = None, front: bool = False, number: float | None = None,
                     partial_targets: list[str] | None = None, allow_partial: bool = False,
                     embed_workflow: bool = True) -> Job:
        """Queue a workflow; returns once the server accepted it.

        Raises :class:`ValidationError` when the server rejects it (400), and also when it accepted only part
        of it (200 with ``node_errors``) unless ``allow_partial`` — the partial job is cancelled then.
        """
        wf = await self.prepare(workflow)
        assert wf.prompt is not None
        prompt_id = prompt_id or str(uuid.uuid4())
        await self._ensure_ws()
        self._subscribe(prompt_id)
        payload: dict[str, Any] = {"prompt": wf.prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        extra = json.loads(json.dumps(extra_data)) if extra_data else {}
        if embed_workflow and wf.ui is not None:
            extra.setdefault("extra_pnginfo", {}).setdefault("workflow", wf.ui)
        if extra:
            payload["extra_data"] = extra
        if number is not None:
            payload["number"] = number
        elif front:
            payload["front"] = True
        if partial_targets:
            payload["partial_execution_targets"] = [str(t) for t in partial_targets]
        submitted_at = time.time()
        try:
            answer = await self._post_prompt(payload)
        except BaseException:
            self.forget(prompt_id)
            raise
        node_errors = answer.get("node_errors") or {}
        job = Job(prompt_id=prompt_id, number=answer.get("number"), client_id=self.client_id,
                  submitted_at=submitted_at, prompt=wf.prompt, node_errors=node_errors)
        if node_errors and not allow_partial:
            with contextlib.suppress(DriverError):
                await self.cancel(prompt_id)
            self.forget(prompt_id)
            raise ValidationError(
                "the server accepted only part of the workflow (some outputs failed validation); the job was "
                "cancelled - fix the nodes below or allow a partial run (--allow-partial)",
                problems_from_server(None, node_errors, wf.prompt), node_errors=node_errors, prompt_id=prompt_id)
        return job

    async def _post_prompt(self, payload: dict[str, Any]) -> dict[str, Any]:
        prompt_id = payload["prompt_id"]
        for attempt in range(3):
            try:
                status, body = await self._request("POST", "/prompt", json_body=payload, ok=(200, 400), retries=0)
            except ServerUnavailable:
                # The answer may be lost after the server queued it: look before sending it again.
                with contextlib.suppress(DriverError):
                    state, _ = await self.job_state(prompt_id)
                    if state != "unknown":
                        return {"prompt_id": prompt_id, "number": None, "node_errors": {}}
                if attempt == 2:
                    raise
                await asyncio.sleep(0.5 * 2 ** attempt)
                continue
            data = self._json(body, "/prompt")
            if status == 400:
                error = data.get("error") if isinstance(data, dict) else None
                node_errors = data.get("node_errors") if isinstance(data, dict) else None
                if isinstance(error, str):
                    error = {"type": "error", "message": error}
                summary = "the server rejected the workflow"
                if isinstance(error, dict) and error.get("message"):
                    summary += f": {error['message']}"
                raise ValidationError(summary, problems_from_server(error, node_errors or {}, payload["prompt"]),
                                      error=error, node_errors=node_errors, prompt_id=prompt_id)
            if not isinstance(data, dict):
                raise ServerError(f"POST /prompt at {self.url} answered {data!r}")
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- follow -------------------------------------------------------------------------------------------------

    def watch(self, job: Job | str, *, timeout: float | None = None) -> AsyncWatch:
        """Follow a job: ``async for event in client.watch(job): ...``, then ``watch.result``.

        Iteration ends when the job finished successfully; it raises :class:`ExecutionError`,
        :class:`Interrupted`, :class:`JobTimeout` or :class:`JobLost` otherwise. ``timeout`` is a wall-clock
        limit in seconds for the whole wait (None = no limit).
        """
        return AsyncWatch(self, job, timeout)

    async def wait(self, job: Job | str, *, timeout: float | None = None,
                   on_event: Callable[[Event], None] | None = None) -> JobResult:
        """Wait for a job to finish and return its result (see :meth:`watch` for the errors)."""
        watch = self.watch(job, timeout=timeout)
        async for event in watch:
            if on_event is not None:
                on_event(event)
        assert watch.result is not None
        return watch.result

    async def run(self, workflow: Workflow | dict[str, Any] | str | Path, *, timeout: float | None = None,
                  on_event: Callable[[Event], None] | None = None, cancel_on_timeout: bool = True,
                  **submit_options: Any) -> JobResult:
        """Submit and wait. On timeout the job is cancelled (unless ``cancel_on_timeout=False``)."""
        start = time.monotonic()
        job = await self.submit(workflow, **submit_options)
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        try:
            return await self.wait(job, timeout=remaining, on_event=on_event)
        except JobTimeout:
            if cancel_on_timeout:
                with contextlib.suppress(DriverError):
                    await self.cancel(job.prompt_id)
            raise
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self.cancel(job.prompt_id))
            raise

    async def _follow(self, watch: AsyncWatch) -> AsyncIterator[Event]:
        prompt_id = watch.prompt_id
        loop = asyncio.get_running_loop()
        deadline = None if watch.timeout is None else loop.time() + watch.timeout
        q = self._subscribe(prompt_id)
        await self._ensure_ws()
        finished_hint = False
        history_misses = 0
        lost_checks = 0
        polls = 0
        # A job we just submitted cannot be finished yet; one we attach to may be.
        next_poll = loop.time() + (1.0 if watch.job is not None else 0.0)
        try:
            if watch.job is not None:
                yield Event("submitted", {"prompt_id": prompt_id, "number": watch.job.number,
                                          "node_errors": watch.job.node_errors, "nodes": len(watch.job.prompt)},
                            prompt_id, time=watch.job.submitted_at)
            while True:
                now = loop.time()
                if deadline is not None and now >= deadline:
                    raise JobTimeout(f"job {prompt_id} did not finish within {watch.timeout:g} s",
                                     prompt_id=prompt_id, seconds=float(watch.timeout or 0))
                wait_s = max(0.0, next_poll - now)
                if deadline is not None:
                    wait_s = min(wait_s, max(0.0, deadline - now))
                event: Event | None = None
                try:
                    event = q.get_nowait() if wait_s <= 0 else await asyncio.wait_for(q.get(), wait_s)
                except (asyncio.QueueEmpty, *_TIMEOUT_ERRORS):
                    event = None
                if event is not None:
                    watch._observe(event)
                    yield event
                    ours = event.prompt_id == prompt_id
                    if ours and (event.is_finished_marker or event.type in ("execution_error",
                                                                            "execution_interrupted")):
                        finished_hint = True
                        next_poll = loop.time()
                    elif ours and event.type == "execution_success":
                        # History is written after this message; executing{node:null} follows it.
                        next_poll = min(next_poll, loop.time() + 0.5)
                    elif event.type == "connection_lost":
                        next_poll = min(next_poll, loop.time() + 0.2)
                    elif event.type == "reconnected":
                        next_poll = loop.time()
                    continue
                # Poll the source of truth.
                polls += 1
                try:
                    entry = await self.history(prompt_id)
                except (ServerUnavailable, ServerError) as exc:
                    if isinstance(exc, ProtocolError):
                        raise
                    yield Event("server_unreachable", {"reason": str(exc)}, prompt_id)
                    next_poll = loop.time() + 2.0
                    continue
                if entry is not None:
                    watch.result = result_from_history(
                        prompt_id, entry, submitted_at=watch.job.submitted_at if watch.job else None,
                        node_errors=watch.job.node_errors if watch.job else None)
                    yield Event("finished", {"status": "success", "files": len(watch.result.files),
                                             "cached_nodes": watch.result.cached_nodes,
                                             "timings": watch.result.timings.to_dict()}, prompt_id)
                    return
                if finished_hint:
                    history_misses += 1
                    if history_misses > 40:
                        raise JobLost(f"job {prompt_id} finished but its history entry never appeared",
                                      prompt_id=prompt_id)
                    if history_misses >= 3 and (await self._safe_state(prompt_id))[0] == "unknown":
                        lost_checks += 1  # not even queued or running: the history was cleared (restart)
                        if lost_checks >= 3:
                            raise JobLost(f"job {prompt_id} finished but {self.url} no longer knows it (was the "
                                          "server restarted or its history cleared?)", prompt_id=prompt_id)
                    next_poll = loop.time() + min(0.05 * 2 ** history_misses, 1.0)
                    continue
                # Without a socket, or for a job submitted by another client (its messages never reach us),
                # the history is all we have: poll it every second.
                fast = not self._ws_ok or watch.job is None
                if fast or polls % 3 == 1 or lost_checks:
                    state, ahead = await self._safe_state(prompt_id)
                    if state == "unknown":
                        lost_checks += 1
                        if lost_checks >= 3:
                            raise JobLost(f"job {prompt_id} is not queued, running or in the history of {self.url} "
                                          "(was the server restarted or the queue cleared?)", prompt_id=prompt_id)
                        next_poll = loop.time() + 0.5
                        continue
                    lost_checks = 0
                    if state in ("pending", "running"):
                        yield Event("queue", {"state": state, "ahead": ahead}, prompt_id)
                next_poll = loop.time() + (min(1.0, self.poll_interval) if fast else self.poll_interval)
        finally:
            self.forget(prompt_id)

    async def _safe_state(self, prompt_id: str) -> tuple[str, int | None]:
        try:
            return await self.job_state(prompt_id)
        except (AuthenticationError, ProtocolError):
            raise
        except DriverError:
            return "unreachable", None

    # ---- cancel -------------------------------------------------------------------------------------------------

    async def cancel(self, prompt_id: str) -> str:
        """Cancel one job without touching any other: delete it from the queue if pending, interrupt it (by
        prompt id) if running. Returns ``"removed"``, ``"interrupted"`` or ``"not_active"``."""
        state, _ = await self.job_state(prompt_id)
        if state == "pending":
            await self._request("POST", "/queue", json_body={"delete": [prompt_id]})
            state, _ = await self.job_state(prompt_id)  # it may have started meanwhile
            if state != "running":
                return "removed"
        if state == "running":
            # Only ever a targeted interrupt, and only while this job runs: an old server ignoring the prompt id
            # would otherwise stop somebody else's job.
            await self._request("POST", "/interrupt", json_body={"prompt_id": prompt_id})
            return "interrupted"
        return "not_active"

    # ---- files ------------------------------------------------------------------------------------------------

    async def upload(self, source: str | Path | bytes, *, filename: str | None = None, subfolder: str = "",
                     kind: str = "input", overwrite: bool = False) -> UploadedFile:
        """Upload a file to the server's input (or temp/output) folder via ``POST /upload/image``.

        The server keeps one copy of identical bytes under one name and renames different bytes
        (``x (1).png``); the returned :class:`UploadedFile` says which name to use.
        """
        if isinstance(source, (bytes, bytearray)):
            content = bytes(source)
            name = filename or "upload.bin"
        else:
            path = Path(source)
            try:
                content = path.read_bytes()
            except OSError as exc:
                raise DriverError(f"cannot read {path}: {exc.strerror or exc}") from None
            name = filename or path.name
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"

        def form() -> aiohttp.FormData:
            data = aiohttp.FormData()
            data.add_field("image", content, filename=name, content_type=content_type)
            data.add_field("type", kind)
            if subfolder:
                data.add_field("subfolder", subfolder)
            if overwrite:
                data.add_field("overwrite", "true")
            return data

        _, body = await self._request("POST", "/upload/image", data=form, retries=self.retries)
        answer = self._json(body, "/upload/image")
        return UploadedFile(str(answer.get("name", name)), str(answer.get("subfolder") or ""),
                            str(answer.get("type") or kind))

    async def download(self, file: OutputFile, out_dir: str | Path, *, class_type: str | None = None,
                       title: str | None = None) -> DownloadedFile:
        """Download one output into ``out_dir`` under a safe, non-clobbering name.

        A file larger than ``limits.max_download_bytes`` is refused (:class:`ProtocolError`); whatever goes
        wrong, no partial file is left behind.
        """
        target = local_path_for(Path(out_dir), file)
        url = self.config.url.http("/view")
        cap = self.limits.max_download_bytes

        def too_large() -> ProtocolError:
            return ProtocolError(self._redact(
                f"downloading {file.filename} from {self.url}: the file is larger than {mib(cap)}, the limit for "
                f"one download; raise it with {DOWNLOAD_LIMIT_SETTING} if such a file is expected"))

        for attempt in range(self.retries + 1):
            path, handle = open_unique(target)
            digest = hashlib.sha256()
            size = 0
            try:
                session = await self._get_session()
                async with session.get(url, params=file.view_params) as resp:
                    if resp.status != 200:
                        raise self._status_error("GET", f"/view?filename={file.filename}", resp.status,
                                                 await _read_head(resp))
                    if resp.content_length is not None and resp.content_length > cap:
                        raise too_large()
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        size += len(chunk)
                        if size > cap:
                            raise too_large()
                        handle.write(chunk)
                        digest.update(chunk)
                handle.close()
                return DownloadedFile(file, path, size, digest.hexdigest(), class_type, title)
            except BaseException as exc:
                handle.close()
                path.unlink(missing_ok=True)
                retryable = isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                                             *_TIMEOUT_ERRORS))
                if not retryable or attempt >= self.retries:
                    if retryable:
                        raise ServerUnavailable(self._redact(
                            f"downloading {file.filename} from {self.url} failed: {_describe(exc)}")) from None
                    raise
                await asyncio.sleep(0.3 * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def download_outputs(self, result: JobResult, out_dir: str | Path, *, include_temp: bool = True,
                               on_file: Callable[[DownloadedFile], None] | None = None,
                               timeout: float | None = None) -> list[DownloadedFile]:
        """Download every file output of ``result`` into ``out_dir`` (``include_temp=False`` skips previews).

        ``timeout`` is a wall-clock limit in seconds for all the downloads together (what is left of a job's
        limit): when it expires, :class:`JobTimeout` is raised and the file being written is removed.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        done: list[DownloadedFile] = []
        for file in result.files:
            if file.type == "temp" and not include_temp:
                continue
            fetch = self.download(file, out_dir, class_type=result.node_class(file.node_id),
                                  title=result.node_title(file.node_id))
            if deadline is None:
                item = await fetch
            else:
                try:
                    item = await asyncio.wait_for(fetch, max(0.0, deadline - loop.time()))
                except _TIMEOUT_ERRORS:
                    raise JobTimeout(f"downloading the outputs of job {result.prompt_id} did not finish within "
                                     f"{timeout:g} s (what was left of the job's time limit)",
                                     prompt_id=result.prompt_id, seconds=float(timeout or 0)) from None
            done.append(item)
            if on_file is not None:
                on_file(item)
        return done


class AsyncWatch:
    """Async iterator over the events of one job; ``result`` is set when it ended successfully."""

    def __init__(self, client: AsyncComfyClient, job: Job | str, timeout: float | None) -> None:
        self.client = client
        self.job = job if isinstance(job, Job) else None
        self.prompt_id = job.prompt_id if isinstance(job, Job) else str(job)
        self.timeout = timeout
        self.result: JobResult | None = None
        self.running_node: str | None = None
        self.cached_nodes: list[str] = []
        self._iter: AsyncIterator[Event] | None = None

    def _observe(self, event: Event) -> None:
        if event.type == "execution_cached" and event.prompt_id == self.prompt_id:
            self.cached_nodes = [str(n) for n in event.data.get("nodes") or []]
        elif event.type == "executing" and event.prompt_id == self.prompt_id:
            self.running_node = event.node

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._iter is None:
            self._iter = self.client._follow(self)
        return self._iter


# ------------------------------------------------------------------------------------------------------------
# Blocking client
# ------------------------------------------------------------------------------------------------------------


class _LoopThread:
    """An event loop in a daemon thread; blocking calls hand coroutines to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="charforge-driver-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            while True:
                try:
                    return future.result(0.1)  # short slices keep Ctrl-C responsive
                except TimeoutError:
                    continue
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


_DONE = object()


class Watch:
    """Blocking iterator over the events of one job (see :meth:`AsyncComfyClient.watch`)."""

    def __init__(self, client: ComfyClient, job: Job | str, timeout: float | None) -> None:
        self._client = client
        self._async = AsyncWatch(client._async, job, timeout)
        self.prompt_id = self._async.prompt_id
        self._queue: thread_queue.Queue[Any] = thread_queue.Queue()
        self._future: Any = None

    @property
    def result(self) -> JobResult | None:
        return self._async.result

    @property
    def running_node(self) -> str | None:
        return self._async.running_node

    async def _pump(self) -> None:
        try:
            async for event in self._async:
                self._queue.put(event)
        except BaseException as exc:  # handed to the consuming thread
            self._queue.put(exc)
            return
        self._queue.put(_DONE)

    def __iter__(self) -> Iterator[Event]:
        self._future = asyncio.run_coroutine_threadsafe(self._pump(), self._client._loop.loop)
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                except thread_queue.Empty:
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop following (the job itself keeps running)."""
        if self._future is not None and not self._future.done():
            self._future.cancel()


class ComfyClient:
    """Blocking client with the same methods as :class:`AsyncComfyClient`.

    It runs an event loop in a background thread; use it as a context manager or call :meth:`close`.
    """

    def __init__(self, server: str | ServerConfig | None = None, **options: Any) -> None:
        self._async = AsyncComfyClient(server, **options)
        self._loop = _LoopThread()

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def client_id(self) -> str:
        return self._async.client_id

    @property
    def config(self) -> ServerConfig:
        return self._async.config

    def __repr__(self) -> str:
        return f"ComfyClient({self.url!r}, auth={self._async.config.auth!r})"

    def __enter__(self) -> ComfyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close connections and stop the background loop."""
        try:
            self._loop.run(self._async.close())
        finally:
            self._loop.close()

    def _run(self, coro: Any) -> Any:
        return self._loop.run(coro)

    def system_stats(self) -> dict[str, Any]:
        return self._run(self._async.system_stats())

    def features(self) -> dict[str, Any]:
        return self._run(self._async.features())

    def object_info(self, refresh: bool = False) -> dict[str, Any]:
        return self._run(self._async.object_info(refresh))

    def queue(self) -> dict[str, list]:
        return self._run(self._async.queue())

    def history(self, prompt_id: str | None = None, *, max_items: int | None = None) -> Any:
        return self._run(self._async.history(prompt_id, max_items=max_items))

    def job_state(self, prompt_id: str) -> tuple[str, int | None]:
        return self._run(self._async.job_state(prompt_id))

    def prepare(self, workflow: Workflow | dict[str, Any] | str | Path) -> Workflow:
        return self._run(self._async.prepare(workflow))

    def prepare_run(self, workflow: Workflow | dict[str, Any] | str | Path, **options: Any) -> PreparedRun:
        return self._run(self._async.prepare_run(workflow, **options))

    def submit(self, workflow: Workflow | dict[str, Any] | str | Path, **options: Any) -> Job:
        return self._run(self._async.submit(workflow, **options))

    def watch(self, job: Job | str, *, timeout: float | None = None) -> Watch:
        return Watch(self, job, timeout)

    def wait(self, job: Job | str, *, timeout: float | None = None,
             on_event: Callable[[Event], None] | None = None) -> JobResult:
        watch = self.watch(job, timeout=timeout)
        for event in watch:
            if on_event is not None:
                on_event(event)
        assert watch.result is not None
        return watch.result

    def run(self, workflow: Workflow | dict[str, Any] | str | Path, *, timeout: float | None = None,
            on_event: Callable[[Event], None] | None = None, cancel_on_timeout: bool = True,
            **submit_options: Any) -> JobResult:
        start = time.monotonic()
        job = self.submit(workflow, **submit_options)
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        try:
            return self.wait(job, timeout=remaining, on_event=on_event)
        except JobTimeout:
            if cancel_on_timeout:
                with contextlib.suppress(DriverError):
                    self.cancel(job.prompt_id)
            raise
        except KeyboardInterrupt:  # Ctrl-C stops our job too, never anybody else's
            with contextlib.suppress(DriverError):
                self.cancel(job.prompt_id)
            raise

    def cancel(self, prompt_id: str) -> str:
        return self._run(self._async.cancel(prompt_id))

    def upload(self, source: str | Path | bytes, **options: Any) -> UploadedFile:
        return self._run(self._async.upload(source, **options))

    def download(self, file: OutputFile, out_dir: str | Path, **options: Any) -> DownloadedFile:
        return self._run(self._async.download(file, out_dir, **options))

    def download_outputs(self, result: JobResult, out_dir: str | Path, **options: Any) -> list[DownloadedFile]:
        return self._run(self._async.download_outputs(result, out_dir, **options))
