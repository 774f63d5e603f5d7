"""The HTTP layer shared by the RunPod clients: Bearer auth, explicit timeouts, typed errors, 429 backoff.

RunPod rate-limits per endpoint and answers HTTP 429 when a client goes over (``/run`` 1000 per 10 s,
``/cancel`` 100 per 10 s, ...). We back off exponentially with full jitter, honouring ``Retry-After`` when
the answer carries one, so that many workers hitting the same limit do not retry in lockstep.

Requests that create something (``POST /run``, ``POST /v2/pods``) are never retried after the request may
have reached the server: a lost answer is reported as :class:`SubmitOutcomeUnknown` instead (RunPod has no
idempotency key, so a retry could create a second job or pod).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

import aiohttp

from charforge.common.retry import Backoff, retry_after_seconds

from ..client.http import (
    TIMEOUT_ERRORS,
    ServiceSession,
    client_timeout,
    failure_reason,
    lost_answer,
    read_body,
    status_error,
)
from ..config import REPLY_LIMIT_SETTING, Limits, Secret, mib
from ..errors import DriverError, ProtocolError, ServerError, ServerUnavailable
from ..secrets import mask_body

USER_AGENT = "charforge-driver-runpod"


class SubmitOutcomeUnknown(DriverError):
    """A request that creates something (a job, a pod) was sent but its answer was lost (or was a 5xx): it may
    or may not have been created. Never retried automatically (RunPod has no idempotency key), and deliberately
    *not* a transient error, so a batch runner reports it instead of sending the job again."""

    exit_code = 3


def backoff_delay(
    attempt: int,
    *,
    base: float = 0.5,
    cap: float = 20.0,
    retry_after: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): the shared policy with full jitter over
    ``base * 2**attempt`` (capped), never less than the server's ``Retry-After`` (RunPod's own hint is trusted)."""
    delay = Backoff(attempts=attempt + 2, base=base, cap=cap, jitter=1.0).delay(attempt, rng=rng)
    return delay if retry_after is None else max(delay, retry_after)


def _retry_after(headers: Any) -> float | None:
    return retry_after_seconds(headers.get("Retry-After") if headers is not None else None)


class RunPodHTTP(ServiceSession):
    """One aiohttp session with the API key as a Bearer token; every message passes through redaction."""

    def __init__(
        self,
        api_key: Secret | str | None,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_429_retries: int = 8,
        backoff_base: float = 0.5,
        backoff_cap: float = 20.0,
        what: str = "RunPod",
    ) -> None:
        self.api_key = api_key if isinstance(api_key, Secret) or api_key is None else Secret(api_key)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_429_retries = max_429_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.what = what
        self.rate_limited = 0  # 429 answers seen (for reports and tests)
        self.max_reply_bytes = Limits.resolve().max_reply_bytes
        self._session = None

    def _secret(self) -> Secret | None:
        return self.api_key

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key.reveal()}"
        return headers

    def _error(
        self, method: str, url: str, status: int, body: bytes, retry_after: float | None
    ) -> DriverError:
        return status_error(
            f"{method} {self.redact(url)}",
            status,
            mask_body(body, self.secrets(), limit=300),
            service=self.what,
            auth_hint=(
                "no API key was sent: set RUNPOD_API_KEY (or runpod.api_key_env in the config file)"
                if not self.api_key
                else "the API key was refused: check RUNPOD_API_KEY and its permissions"
            ),
            rate_limited=f"{self.what} rate limit still exceeded after {self.max_429_retries} retries",
            retry_after=retry_after,
        )

    async def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        ok: tuple[int, ...] = (200, 201, 202, 204),
        creates: bool = False,
        retries: int = 2,
        read_timeout: float | None = None,
    ) -> tuple[int, Any]:
        """Send one request and decode its JSON answer (None for an empty body).

        429 is retried with jittered backoff (up to ``max_429_retries``); connection failures and 5xx are
        retried ``retries`` times, except for ``creates=True`` requests whose body may have arrived: those
        raise :class:`SubmitOutcomeUnknown` instead of being sent again.
        """
        attempt_429 = 0
        attempt = 0
        timeout = None if read_timeout is None else client_timeout(self.connect_timeout, read_timeout)
        if json_body is not None:
            data = json.dumps(json_body, separators=(",", ":")).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else None
        while True:
            sent = False
            try:
                session = await self.session()
                kwargs: dict[str, Any] = {"data": data, "headers": headers}
                if timeout is not None:
                    kwargs["timeout"] = timeout
                async with session.request(method, url, **kwargs) as resp:
                    sent = True
                    body = await read_body(
                        resp,
                        self.max_reply_bytes,
                        lambda: ProtocolError(
                            f"{method} {self.redact(url)}: the answer of {self.what} is larger than "
                            f"{mib(self.max_reply_bytes)}, the limit for one reply ({REPLY_LIMIT_SETTING})"
                        ),
                    )
                    if resp.status == 429 and attempt_429 < self.max_429_retries:
                        self.rate_limited += 1
                        await asyncio.sleep(
                            backoff_delay(
                                attempt_429,
                                base=self.backoff_base,
                                cap=self.backoff_cap,
                                retry_after=_retry_after(resp.headers),
                            )
                        )
                        attempt_429 += 1
                        continue
                    if resp.status == 429:
                        self.rate_limited += 1
                    if resp.status not in ok:
                        error = self._error(method, url, resp.status, body, _retry_after(resp.headers))
                        if creates and resp.status >= 500:
                            raise SubmitOutcomeUnknown(
                                self.redact(
                                    f"{method} {url}: HTTP {resp.status}; the request may or may not have been "
                                    "accepted"
                                )
                            ) from None
                        if isinstance(error, ServerUnavailable) and not creates and attempt < retries:
                            attempt += 1
                            await asyncio.sleep(backoff_delay(attempt, base=self.backoff_base))
                            continue
                        raise error
                    if not body.strip():
                        return resp.status, None
                    try:
                        return resp.status, json.loads(body)
                    except ValueError:
                        snippet = mask_body(body, self.secrets(), limit=120)
                        raise ServerError(
                            f"{method} {self.redact(url)} did not answer JSON: {snippet!r}",
                            status=resp.status,
                        ) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, *TIMEOUT_ERRORS) as exc:
                # A refused connection never delivered the request; anything later might have.
                reason, delivered = failure_reason(exc, sent)
                if creates and delivered:
                    raise SubmitOutcomeUnknown(self.redact(lost_answer(method, url, reason))) from None
                if attempt >= retries:
                    raise ServerUnavailable(
                        self.redact(f"cannot reach {self.what} ({method} {url}): {reason}")
                    ) from None
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt, base=self.backoff_base))
