"""The asyncio ComfyUI client, :class:`AsyncComfyClient`: HTTP requests with retries, submitting with our own
prompt id, cancelling one job, uploads and bounded downloads. Following a job is :mod:`.follow`, the WebSocket
:mod:`.websocket`. Nothing here prints; events are handed to the caller.

(Over 600 lines on purpose: one class whose methods share the session, the retry policy and the limits; following
a job and the WebSocket already live in their own modules.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import mimetypes
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from charforge.common.retry import Backoff

from ..config import (
    DEFAULT_SERVER,
    DOWNLOAD_LIMIT_SETTING,
    REPLY_LIMIT_SETTING,
    Auth,
    Limits,
    ServerConfig,
    ServerURL,
    mib,
)
from ..errors import (
    AuthenticationError,
    DriverError,
    JobTimeout,
    ProtocolError,
    ServerError,
    ServerUnavailable,
    ValidationError,
)
from ..events import Event
from ..outputs import DownloadedFile, OutputFile, local_path_for, open_unique
from ..secrets import mask, mask_body
from ..workflow.load import Workflow, coerce_workflow
from ..workflow.overrides import InputFile, Override
from ..workflow.preflight import problems_from_server
from ..workflow.prepare import PreparedRun, as_api, prepare_run
from .follow import AsyncWatch
from .history import check_history_entry, check_queue_items, describe_kind
from .http import TIMEOUT_ERRORS, USER_AGENT, describe_error, is_loopback, read_body, read_head
from .models import Job, JobResult, Timeout, UploadedFile
from .websocket import EventSocket

#: Waits between the tries of one request: GETs (and uploads, downloads) ``retries`` times, fixed doubling.
_REQUEST_BASE = 0.3
#: ``POST /prompt``: three tries, looking the job up in between (its answer may be lost after it was queued).
_SUBMIT_RETRY = Backoff(attempts=3, base=0.5, jitter=0.0)


def _request_backoff(attempts: int) -> Backoff:
    return Backoff(attempts=max(1, attempts), base=_REQUEST_BASE, jitter=0.0)


class AsyncComfyClient:
    """Asynchronous client for one ComfyUI server.

    ``server`` is a URL (``http://host:8188``, ``https://host/prefix/``, credentials in the URL become basic
    auth) or a :class:`~charforge.driver.config.ServerConfig`. Use as an async context manager, or call
    :meth:`close`.
    """

    def __init__(
        self,
        server: str | ServerConfig | None = None,
        *,
        auth: Auth | None = None,
        timeout: Timeout | float | None = None,
        client_id: str | None = None,
        ping_interval: float = 20.0,
        poll_interval: float = 5.0,
        retries: int = 2,
        verify_tls: bool | None = None,
        trust_env: bool | None = None,
        max_download_bytes: int | None = None,
        max_reply_bytes: int | None = None,
    ) -> None:
        if isinstance(server, ServerConfig):
            config = server
            if auth is not None:
                config = dataclasses.replace(config, auth=auth)
        else:
            url, url_auth = ServerURL.parse(server or DEFAULT_SERVER)
            config = ServerConfig(url, auth or url_auth, limits=Limits.resolve())
        if max_download_bytes is not None or max_reply_bytes is not None:
            config = dataclasses.replace(
                config,
                limits=Limits(
                    max_download_bytes or config.limits.max_download_bytes,
                    max_reply_bytes or config.limits.max_reply_bytes,
                ),
            )
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
        self.trust_env = (not is_loopback(config.url.netloc)) if trust_env is None else trust_env
        self._session: aiohttp.ClientSession | None = None
        self._object_info: dict[str, Any] | None = None
        #: the WebSocket listener: connection state and each followed job's events
        self.events = EventSocket(
            config.url,
            self.client_id,
            session=self._get_session,
            redact=self._redact,
            max_message_bytes=self.limits.max_reply_bytes,
            ping_interval=ping_interval,
            connect_timeout=self.timeout.connect,
        )

    # ---- basics ---------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server's base URL (never contains credentials)."""
        return str(self.config.url)

    @property
    def server_features(self) -> dict[str, Any]:
        """What the server announced in its WebSocket ``feature_flags`` message."""
        return self.events.server_features

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
        await self.events.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": USER_AGENT}
            if self.config.auth is not None:
                headers.update(self.config.auth.headers())
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=self.timeout.connect,
                sock_connect=self.timeout.connect,
                sock_read=self.timeout.read,
            )
            connector = aiohttp.TCPConnector(ssl=bool(self.verify_tls))  # True: the default verified context
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=timeout, connector=connector, trust_env=self.trust_env
            )
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
            return ServerUnavailable(
                f"{method} {path} at {self.url}: HTTP {status} from a proxy; "
                "ComfyUI behind it is not answering (still starting?)"
            )
        if status == 404:
            return ServerError(
                f"{method} {path} at {self.url}: HTTP 404; is this a ComfyUI server and is the "
                "path prefix right?",
                status=status,
                body=snippet,
            )
        if status == 413:
            return ServerError(
                f"{method} {path}: HTTP 413, the request is larger than the server accepts",
                status=status,
                body=snippet,
            )
        return ServerError(
            f"{method} {path} at {self.url}: HTTP {status}: {snippet or '(empty body)'}",
            status=status,
            body=snippet,
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json_body: Any = None,
        data: Any = None,
        ok: tuple[int, ...] = (200,),
        retries: int | None = None,
    ) -> tuple[int, bytes]:
        """One HTTP request with retries on connection failures (GETs retry by default, POSTs do not)."""
        url = self.config.url.http(path)
        attempts = 1 + (self.retries if retries is None and method == "GET" else (retries or 0))
        policy = _request_backoff(attempts)
        for attempt in range(attempts):
            try:
                session = await self._get_session()
                body_data = data() if callable(data) else data
                async with session.request(
                    method, url, params=params, json=json_body, data=body_data
                ) as resp:
                    if resp.status in ok:
                        return resp.status, await self._read_reply(resp, f"{method} {path}")
                    body = await read_head(resp)  # only a short excerpt is ever shown
                    error = self._status_error(method, path, resp.status, body)
                    error.retry_after = resp.headers.get("Retry-After")  # type: ignore[attr-defined]
                    raise error
            except ServerUnavailable:
                if attempt + 1 >= attempts:
                    raise
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, *TIMEOUT_ERRORS) as exc:
                if attempt + 1 >= attempts:
                    raise ServerUnavailable(
                        self._redact(
                            f"cannot reach ComfyUI at {self.url} ({method} {path}): {describe_error(exc)}"
                        )
                    ) from None
            except aiohttp.InvalidURL as exc:
                raise ServerUnavailable(self._redact(f"invalid server URL {self.url}: {exc}")) from None
            await asyncio.sleep(policy.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_reply(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        """The whole body of a reply, refused beyond ``limits.max_reply_bytes`` (never held in memory whole)."""
        cap = self.limits.max_reply_bytes

        def too_large() -> ProtocolError:
            return ProtocolError(
                f"{what} at {self.url}: the reply is larger than {mib(cap)}, the limit for one "
                f"reply ({REPLY_LIMIT_SETTING}); is this a ComfyUI server?"
            )

        return await read_body(resp, cap, too_large)

    def _json(self, body: bytes, path: str) -> Any:
        try:
            return json.loads(body or b"null")
        except ValueError:
            snippet = mask_body(body, self.config.secrets(), limit=120)
            raise ServerError(
                f"{path} at {self.url} did not answer JSON (got {snippet!r}); is this a ComfyUI server?"
            ) from None

    async def get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET an API path and decode its JSON answer."""
        _, body = await self._request("GET", path, params=params)
        return self._json(body, path)

    async def get_object(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """GET an API path whose answer must be a JSON object (:class:`ProtocolError` otherwise)."""
        data = await self.get_json(path, params)
        if not isinstance(data, dict):
            raise ProtocolError(
                f"GET {path} at {self.url} answered {describe_kind(data)} where ComfyUI answers an "
                "object; is this a ComfyUI server?"
            )
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
        running = check_queue_items(data.get("queue_running"), "queue_running", self.url)
        pending = sorted(
            check_queue_items(data.get("queue_pending"), "queue_pending", self.url), key=lambda item: item[0]
        )
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

    def forget(self, prompt_id: str) -> None:
        """Stop buffering events of a job nobody will wait for."""
        self.events.forget(prompt_id)

    # ---- submit -----------------------------------------------------------------------------------------------

    async def prepare(self, workflow: Workflow | dict[str, Any] | str | Path) -> Workflow:
        """Load a workflow (path, dict or :class:`Workflow`) and convert an editor workflow with
        ``/object_info`` when needed."""
        wf = coerce_workflow(workflow)
        if wf.prompt is None:
            wf = as_api(wf, await self.object_info())
        return wf

    async def prepare_run(
        self,
        workflow: Workflow | dict[str, Any] | str | Path,
        *,
        sets: Sequence[str | Override] = (),
        inputs: Sequence[str | InputFile] = (),
        preflight: bool = True,
        upload: bool = True,
    ) -> PreparedRun:
        """Load/convert ``workflow``, apply ``--set`` overrides, check it against ``/object_info`` (see
        :func:`~charforge.driver.workflow.prepare.prepare_run`) and upload the ``--input`` files (and override
        values naming local files for file-picking inputs); ``upload=False`` leaves them in ``pending_uploads``.

        Raises :class:`~charforge.driver.errors.OverrideError` for overrides that do not address one input, and
        :class:`~charforge.driver.errors.ValidationError` when the preflight finds errors; nothing is uploaded
        then.
        """
        prepared = prepare_run(
            await self.prepare(workflow),
            await self.object_info(),
            sets=sets,
            inputs=inputs,
            preflight=preflight,
        )
        if not upload or not prepared.pending_uploads:
            return prepared
        references = [(await self.upload(item.path)).reference for item in prepared.pending_uploads]
        return prepared.with_uploads(references)

    async def submit(
        self,
        workflow: Workflow | dict[str, Any] | str | Path,
        *,
        prompt_id: str | None = None,
        extra_data: dict[str, Any] | None = None,
        front: bool = False,
        number: float | None = None,
        partial_targets: list[str] | None = None,
        allow_partial: bool = False,
        embed_workflow: bool = True,
    ) -> Job:
        """Queue a workflow; returns once the server accepted it.

        Raises :class:`ValidationError` when the server rejects it (400), and also when it accepted only part
        of it (200 with ``node_errors``) unless ``allow_partial`` — the partial job is cancelled then.
        """
        wf = await self.prepare(workflow)
        assert wf.prompt is not None
        prompt_id = prompt_id or str(uuid.uuid4())
        await self.events.ensure()
        self.events.subscribe(prompt_id)
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
        job = Job(
            prompt_id=prompt_id,
            number=answer.get("number"),
            client_id=self.client_id,
            submitted_at=submitted_at,
            prompt=wf.prompt,
            node_errors=node_errors,
        )
        if node_errors and not allow_partial:
            with contextlib.suppress(DriverError):
                await self.cancel(prompt_id)
            self.forget(prompt_id)
            raise ValidationError(
                "the server accepted only part of the workflow (some outputs failed validation); the job was "
                "cancelled - fix the nodes below or allow a partial run (--allow-partial)",
                problems_from_server(None, node_errors, wf.prompt),
                node_errors=node_errors,
                prompt_id=prompt_id,
            )
        return job

    async def _post_prompt(self, payload: dict[str, Any]) -> dict[str, Any]:
        prompt_id = payload["prompt_id"]
        for attempt in range(_SUBMIT_RETRY.attempts):
            try:
                status, body = await self._request(
                    "POST", "/prompt", json_body=payload, ok=(200, 400), retries=0
                )
            except ServerUnavailable:
                # The answer may be lost after the server queued it: look before sending it again.
                with contextlib.suppress(DriverError):
                    state, _ = await self.job_state(prompt_id)
                    if state != "unknown":
                        return {"prompt_id": prompt_id, "number": None, "node_errors": {}}
                if _SUBMIT_RETRY.is_last(attempt):
                    raise
                await asyncio.sleep(_SUBMIT_RETRY.delay(attempt))
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
                raise ValidationError(
                    summary,
                    problems_from_server(error, node_errors or {}, payload["prompt"]),
                    error=error,
                    node_errors=node_errors,
                    prompt_id=prompt_id,
                )
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

    async def wait(
        self, job: Job | str, *, timeout: float | None = None, on_event: Callable[[Event], None] | None = None
    ) -> JobResult:
        """Wait for a job to finish and return its result (see :meth:`watch` for the errors)."""
        watch = self.watch(job, timeout=timeout)
        async for event in watch:
            if on_event is not None:
                on_event(event)
        assert watch.result is not None
        return watch.result

    async def run(
        self,
        workflow: Workflow | dict[str, Any] | str | Path,
        *,
        timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
        cancel_on_timeout: bool = True,
        prompt_id: str | None = None,
        extra_data: dict[str, Any] | None = None,
        front: bool = False,
        number: float | None = None,
        partial_targets: list[str] | None = None,
        allow_partial: bool = False,
        embed_workflow: bool = True,
    ) -> JobResult:
        """Submit (the options of :meth:`submit`) and wait. On timeout the job is cancelled (unless
        ``cancel_on_timeout=False``)."""
        start = time.monotonic()
        job = await self.submit(
            workflow,
            prompt_id=prompt_id,
            extra_data=extra_data,
            front=front,
            number=number,
            partial_targets=partial_targets,
            allow_partial=allow_partial,
            embed_workflow=embed_workflow,
        )
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

    async def upload(
        self,
        source: str | Path | bytes,
        *,
        filename: str | None = None,
        subfolder: str = "",
        kind: str = "input",
        overwrite: bool = False,
    ) -> UploadedFile:
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
        return UploadedFile(
            str(answer.get("name", name)), str(answer.get("subfolder") or ""), str(answer.get("type") or kind)
        )

    async def download(
        self,
        file: OutputFile,
        out_dir: str | Path,
        *,
        class_type: str | None = None,
        title: str | None = None,
    ) -> DownloadedFile:
        """Download one output into ``out_dir`` under a safe, non-clobbering name.

        A file larger than ``limits.max_download_bytes`` is refused (:class:`ProtocolError`); whatever goes
        wrong, no partial file is left behind.
        """
        target = local_path_for(Path(out_dir), file)
        url = self.config.url.http("/view")
        cap = self.limits.max_download_bytes

        def too_large() -> ProtocolError:
            return ProtocolError(
                self._redact(
                    f"downloading {file.filename} from {self.url}: the file is larger than {mib(cap)}, the limit for "
                    f"one download; raise it with {DOWNLOAD_LIMIT_SETTING} if such a file is expected"
                )
            )

        policy = _request_backoff(self.retries + 1)
        for attempt in range(policy.attempts):
            path, handle = open_unique(target)
            digest = hashlib.sha256()
            size = 0
            try:
                session = await self._get_session()
                async with session.get(url, params=file.view_params) as resp:
                    if resp.status != 200:
                        raise self._status_error(
                            "GET", f"/view?filename={file.filename}", resp.status, await read_head(resp)
                        )
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
                retryable = isinstance(
                    exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, *TIMEOUT_ERRORS)
                )
                if not retryable or policy.is_last(attempt):
                    if retryable:
                        raise ServerUnavailable(
                            self._redact(
                                f"downloading {file.filename} from {self.url} failed: {describe_error(exc)}"
                            )
                        ) from None
                    raise
                await asyncio.sleep(policy.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def download_outputs(
        self,
        result: JobResult,
        out_dir: str | Path,
        *,
        include_temp: bool = True,
        on_file: Callable[[DownloadedFile], None] | None = None,
        timeout: float | None = None,
    ) -> list[DownloadedFile]:
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
            fetch = self.download(
                file,
                out_dir,
                class_type=result.node_class(file.node_id),
                title=result.node_title(file.node_id),
            )
            if deadline is None:
                item = await fetch
            else:
                try:
                    item = await asyncio.wait_for(fetch, max(0.0, deadline - loop.time()))
                except TIMEOUT_ERRORS:
                    raise JobTimeout(
                        f"downloading the outputs of job {result.prompt_id} did not finish within "
                        f"{timeout:g} s (what was left of the job's time limit)",
                        prompt_id=result.prompt_id,
                        seconds=float(timeout or 0),
                    ) from None
            done.append(item)
            if on_file is not None:
                on_file(item)
        return done
