"""Replicate's HTTP API, the parts CharForge uses: predictions, trainings, files, models and versions.

A thin aiohttp client rather than the official ``replicate`` package (docs/replicate.md says why): every call is
a coroutine on the caller's event loop, every failure is one of the driver's typed errors with the token masked,
replies and downloads obey the driver's size limits, and creating a prediction or a training is never sent twice
by accident.

Retries: 429 is retried on every method (a throttled request was not carried out), waiting at least the
``Retry-After`` the answer carries; connection failures and 5xx are retried on reads and cancels. A request that
*creates* something (``POST /v1/predictions``, ``POST .../trainings``) is sent once: when its answer is lost or is
a 5xx it may or may not have been created, and :class:`CreateOutcomeUnknown` says so. The caller then looks for
it (:meth:`ReplicateAPI.find_prediction`, by the tag it put into the input) before sending it again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from charforge.common.retry import Backoff, retry_after_seconds

from ..client.http import (
    TIMEOUT_ERRORS,
    ServiceSession,
    failure_reason,
    lost_answer,
    parse_time,
    read_body,
    status_error,
)
from ..config import DOWNLOAD_LIMIT_SETTING, REPLICATE_API_URL, REPLY_LIMIT_SETTING, Limits, Secret, mib
from ..errors import DriverError, ProtocolError, ServerError, ServerUnavailable
from ..secrets import mask, mask_body

#: Replicate's prediction and training states; the last three are final.
STATUSES = ("starting", "processing", "succeeded", "failed", "canceled")
TERMINAL = ("succeeded", "failed", "canceled")


class CreateOutcomeUnknown(ServerUnavailable):
    """A create request (prediction, training) was sent but its answer was lost or was a 5xx: it may exist.

    A transient error (the batch runner retries it), but only after looking the job up by its tag: neither
    this client nor the runner sends the request again while Replicate may already run it.
    """


@dataclass
class Prediction:
    """A prediction or a training as the API returns it (``id``, ``status``, ``input``, ``output``, ``logs``,
    ``error``, ``metrics``, ``created_at``/``started_at``/``completed_at``, ``urls``); ``raw`` keeps the rest."""

    id: str
    status: str
    input: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    logs: str = ""
    error: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    urls: dict[str, str] = field(default_factory=dict)
    data_removed: bool = False
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_api(cls, data: Any) -> Prediction:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not data["id"]:
            raise ProtocolError(
                f"Replicate answered something that is not a prediction: {mask(repr(data))[:200]}"
            )
        status = str(data.get("status") or "")
        if status not in STATUSES:
            raise ProtocolError(
                f"prediction {data['id']}: unknown status {status!r} (expected one of {', '.join(STATUSES)})"
            )
        metrics, urls, given = (_mapping(data.get(key)) for key in ("metrics", "urls", "input"))
        return cls(
            id=data["id"],
            status=status,
            input=given,
            output=data.get("output"),
            logs=str(data.get("logs") or ""),
            error=data.get("error"),
            metrics=metrics,
            created_at=parse_time(data.get("created_at")),
            started_at=parse_time(data.get("started_at")),
            completed_at=parse_time(data.get("completed_at")),
            urls={str(k): str(v) for k, v in urls.items() if isinstance(v, str)},
            data_removed=bool(data.get("data_removed")),
            raw=data,
        )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def predict_time(self) -> float | None:
        """Seconds the model ran (``metrics.predict_time``): what Replicate bills for public models."""
        value = self.metrics.get("predict_time")
        return float(value) if isinstance(value, (int, float)) else None


class ReplicateAPI(ServiceSession):
    """One aiohttp session with the token as a Bearer header; every message passes through :func:`mask`."""

    def __init__(
        self,
        token: Secret | str | None,
        *,
        base_url: str = REPLICATE_API_URL,
        connect_timeout: float = 10.0,
        read_timeout: float = 90.0,
        max_429_retries: int = 8,
        backoff: Backoff | None = None,
        retries: int = 3,
    ) -> None:
        self.token = token if isinstance(token, Secret) or token is None else Secret(token)
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_429_retries = max_429_retries
        self.backoff = backoff or Backoff(
            attempts=max(max_429_retries, retries) + 1, base=0.5, cap=30.0, jitter=1.0
        )
        self.retries = retries
        self.rate_limited = 0  # 429 answers seen (reports and tests)
        self.limits = Limits.resolve()
        self._session = None

    # ---- plumbing --------------------------------------------------------------------------------------------

    def _secret(self) -> Secret | None:
        return self.token

    async def __aenter__(self) -> ReplicateAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _auth(self, url: str) -> dict[str, str]:
        """The Authorization header, only for the API's own origin (output files may live on a CDN)."""
        same = urlsplit(url)[:2] == urlsplit(self.base_url)[:2]
        return {"Authorization": f"Bearer {self.token.reveal()}"} if self.token and same else {}

    def _url(self, path: str) -> str:
        return path if "://" in path else f"{self.base_url}{path}"

    def _error(
        self, method: str, url: str, status: int, body: bytes, retry_after: float | None
    ) -> DriverError:
        snippet = mask_body(body, self.secrets(), limit=300)
        return status_error(
            f"{method} {self.redact(url)}",
            status,
            snippet,
            service="Replicate",
            auth_hint=(
                "no token was sent: set REPLICATE_API_TOKEN (or replicate.token_env in the config file)"
                if not self.token
                else "the token was refused: check REPLICATE_API_TOKEN and its account"
            ),
            rate_limited=f"Replicate's rate limit still exceeded after {self.max_429_retries} retries: {snippet}",
            retry_after=retry_after,
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        form: Callable[[], Any] | None = None,
        headers: dict[str, str] | None = None,
        creates: bool = False,
        ok: tuple[int, ...] = (200, 201, 202, 204),
    ) -> Any:
        """Send one request and decode its JSON answer (None for an empty body); see the module docstring for
        what is retried. ``form`` builds a fresh multipart body for each try."""
        url = self._url(path)
        data = None if json_body is None else json.dumps(json_body, separators=(",", ":")).encode("utf-8")
        sent_headers = {"Accept": "application/json", **self._auth(url), **(headers or {})}
        if data is not None:
            sent_headers["Content-Type"] = "application/json"
        throttled = failed = 0
        while True:
            sent = False
            try:
                session = await self.session()
                body_arg = form() if form is not None else data
                async with session.request(method, url, data=body_arg, headers=sent_headers) as resp:
                    sent = True
                    body = await read_body(
                        resp,
                        self.limits.max_reply_bytes,
                        lambda: ProtocolError(
                            f"{method} {self.redact(url)}: Replicate's answer is larger than "
                            f"{mib(self.limits.max_reply_bytes)}, the limit for one reply ({REPLY_LIMIT_SETTING})"
                        ),
                    )
                    hint = retry_after_seconds(resp.headers.get("Retry-After"))
                    if resp.status == 429:
                        self.rate_limited += 1
                        if throttled < self.max_429_retries:
                            await asyncio.sleep(self.backoff.delay(throttled, hint))
                            throttled += 1
                            continue
                    if resp.status not in ok:
                        if creates and resp.status >= 500:
                            raise CreateOutcomeUnknown(
                                self.redact(
                                    f"{method} {url}: HTTP {resp.status} from Replicate; the request may or may not "
                                    "have been accepted"
                                )
                            )
                        error = self._error(method, url, resp.status, body, hint)
                        if isinstance(error, ServerUnavailable) and failed < self.retries:
                            await asyncio.sleep(self.backoff.delay(failed, hint))
                            failed += 1
                            continue
                        raise error
                    if not body.strip():
                        return None
                    try:
                        return json.loads(body)
                    except ValueError:
                        raise ProtocolError(
                            f"{method} {self.redact(url)}: Replicate did not answer JSON: "
                            f"{mask_body(body, self.secrets(), limit=120)!r}",
                            status=resp.status,
                        ) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, *TIMEOUT_ERRORS) as exc:
                reason, delivered = failure_reason(exc, sent)
                if creates and delivered:
                    raise CreateOutcomeUnknown(self.redact(lost_answer(method, url, reason))) from None
                if failed >= self.retries:
                    raise ServerUnavailable(
                        self.redact(f"cannot reach Replicate ({method} {url}): {reason}")
                    ) from None
                await asyncio.sleep(self.backoff.delay(failed))
                failed += 1

    # ---- predictions -----------------------------------------------------------------------------------------

    async def create_prediction(
        self,
        input: dict[str, Any],
        *,
        version: str | None = None,
        model: str | None = None,
        wait: int | None = None,
    ) -> Prediction:
        """``POST /v1/predictions`` with a version id (or ``POST /v1/models/{model}/predictions`` for an
        official model); ``wait`` (1-60 s) asks Replicate to hold the answer until the prediction ends
        (``Prefer: wait=N``), else it comes back ``starting``."""
        headers = {"Prefer": f"wait={max(1, min(60, int(wait)))}"} if wait else None
        if version:
            data = await self.request(
                "POST",
                "/v1/predictions",
                json_body={"version": version, "input": input},
                headers=headers,
                creates=True,
            )
        elif model:
            data = await self.request(
                "POST",
                f"/v1/models/{_model_path(model)}/predictions",
                json_body={"input": input},
                headers=headers,
                creates=True,
            )
        else:
            raise ValueError("create_prediction needs a version or a model")
        return Prediction.from_api(data)

    async def prediction(self, prediction_id: str) -> Prediction:
        """``GET /v1/predictions/{id}``; a prediction Replicate does not know is a :class:`ServerError` 404."""
        return Prediction.from_api(
            await self.request("GET", f"/v1/predictions/{quote(prediction_id, safe='')}")
        )

    async def cancel_prediction(self, prediction_id: str) -> Prediction:
        return Prediction.from_api(
            await self.request("POST", f"/v1/predictions/{quote(prediction_id, safe='')}/cancel")
        )

    async def list_page(self, kind: str, url: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """One page of ``GET /v1/predictions`` or ``/v1/trainings`` (newest first) and the ``next`` page's URL."""
        data = await self.request("GET", url or f"/v1/{kind}")
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise ProtocolError(f'GET /v1/{kind}: expected {{"results": [...], "next": ...}}')
        nxt = data.get("next")
        return [r for r in data["results"] if isinstance(r, dict)], nxt if isinstance(
            nxt, str
        ) and nxt else None

    async def find(
        self,
        kind: str,
        matches: Callable[[dict[str, Any]], bool],
        *,
        since: float | None = None,
        max_pages: int = 20,
    ) -> Prediction | None:
        """The newest prediction (``kind="predictions"``) or training whose listing entry ``matches``, looking
        back to ``since`` (epoch seconds, a minute of clock skew allowed) or ``max_pages`` pages of 100."""
        url = None
        for _ in range(max_pages):
            results, url = await self.list_page(kind, url)
            for entry in results:
                if matches(entry):
                    return Prediction.from_api(entry)
            oldest = min(
                (t for t in (parse_time(r.get("created_at")) for r in results) if t is not None), default=None
            )
            if url is None or (since is not None and oldest is not None and oldest < since - 60):
                return None
        return None

    # ---- trainings -------------------------------------------------------------------------------------------

    async def create_training(
        self, model: str, version: str, destination: str, input: dict[str, Any]
    ) -> Prediction:
        """``POST /v1/models/{owner}/{name}/versions/{version}/trainings``; the new version lands at
        ``destination`` (``owner/model``, which must exist)."""
        data = await self.request(
            "POST",
            f"/v1/models/{_model_path(model)}/versions/{quote(version, safe='')}/trainings",
            json_body={"destination": destination, "input": input},
            creates=True,
        )
        return Prediction.from_api(data)

    async def training(self, training_id: str) -> Prediction:
        return Prediction.from_api(await self.request("GET", f"/v1/trainings/{quote(training_id, safe='')}"))

    async def cancel_training(self, training_id: str) -> Prediction:
        return Prediction.from_api(
            await self.request("POST", f"/v1/trainings/{quote(training_id, safe='')}/cancel")
        )

    # ---- files, models ---------------------------------------------------------------------------------------

    async def upload_file(
        self,
        data: bytes,
        filename: str,
        content_type: str = "application/octet-stream",
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/files`` (multipart field ``content``); returns the file object (``id``, ``urls.get`` ...).
        Uploading is idempotent enough to retry: a second copy of a file costs nothing but storage."""

        def form() -> aiohttp.FormData:
            body = aiohttp.FormData()
            body.add_field("content", data, filename=filename, content_type=content_type)
            if metadata:
                body.add_field("metadata", json.dumps(metadata), content_type="application/json")
            return body

        answer = await self.request("POST", "/v1/files", form=form)
        if not isinstance(answer, dict) or not isinstance((answer.get("urls") or {}).get("get"), str):
            raise ProtocolError(f"POST /v1/files answered without urls.get: {mask(repr(answer))[:200]}")
        return answer

    async def model(self, model: str) -> dict[str, Any]:
        """``GET /v1/models/{owner}/{name}`` (``latest_version``, ``visibility`` ...)."""
        data = await self.request("GET", f"/v1/models/{_model_path(model)}")
        return data if isinstance(data, dict) else {}

    async def latest_version(self, model: str) -> str:
        latest = (await self.model(model)).get("latest_version")
        if not isinstance(latest, dict) or not latest.get("id"):
            raise ServerError(f"Replicate model {model} has no version yet (no latest_version)")
        return str(latest["id"])

    async def version(self, model: str, version: str) -> dict[str, Any]:
        """``GET /v1/models/{owner}/{name}/versions/{id}`` (``id``, ``openapi_schema`` ...)."""
        data = await self.request(
            "GET", f"/v1/models/{_model_path(model)}/versions/{quote(version, safe='')}"
        )
        return data if isinstance(data, dict) else {}

    # ---- output files ----------------------------------------------------------------------------------------

    async def download(self, url: str, dest: Path, *, retries: int = 3) -> tuple[int, str]:
        """Stream an output file (an https URL, or a ``data:`` URL) into ``dest``; returns ``(size, sha256)``.

        Bounded by the driver's download limit; a partial file is removed. The token is sent only to the
        API's own host."""
        cap = self.limits.max_download_bytes
        too_big = (
            f"an output file is larger than {mib(cap)}, the limit for one download; raise it with "
            f"{DOWNLOAD_LIMIT_SETTING}"
        )
        if url.startswith("data:"):
            _, _, payload = url.partition(",")
            raw = base64.b64decode(payload) if ";base64" in url.split(",", 1)[0] else payload.encode()
            if len(raw) > cap:
                raise ProtocolError(too_big)
            dest.write_bytes(raw)
            return len(raw), hashlib.sha256(raw).hexdigest()
        policy = Backoff(attempts=retries + 1, base=0.5, cap=10.0)
        for attempt in range(policy.attempts):
            digest = hashlib.sha256()
            size = 0
            try:
                session = await self.session()
                async with session.get(url, headers=self._auth(url)) as resp:
                    if resp.status != 200:
                        error = self._error("GET", url, resp.status, b"", None)
                        if resp.status < 500 and resp.status != 429:
                            raise error
                        raise aiohttp.ClientConnectionError(str(error))
                    if resp.content_length is not None and resp.content_length > cap:
                        raise ProtocolError(too_big)
                    with open(dest, "wb") as handle:
                        async for chunk in resp.content.iter_chunked(1 << 16):
                            size += len(chunk)
                            if size > cap:
                                raise ProtocolError(too_big)
                            digest.update(chunk)
                            handle.write(chunk)
                return size, digest.hexdigest()
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, *TIMEOUT_ERRORS) as exc:
                dest.unlink(missing_ok=True)
                if policy.is_last(attempt):
                    raise ServerUnavailable(
                        self.redact(f"downloading {url} failed: {exc or type(exc).__name__}")
                    ) from None
                await asyncio.sleep(policy.delay(attempt))
            except BaseException:
                dest.unlink(missing_ok=True)
                raise
        raise AssertionError("unreachable")  # pragma: no cover


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _model_path(model: str) -> str:
    owner, _, name = model.partition("/")
    return f"{quote(owner, safe='')}/{quote(name, safe='')}"
