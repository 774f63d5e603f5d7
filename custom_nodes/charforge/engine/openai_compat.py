"""The one client for OpenAI-compatible chat-completions endpoints (OpenAI, Ollama, vLLM, LM Studio,
llama.cpp server, ...), shared by the caption backend and story scene splitting.

``ChatClient.complete(body)`` POSTs to ``<base_url>/chat/completions`` with the standard library only.
Retries: a 408/409/425/429, a 5xx, a timeout or a connection error is retried up to `max_retries` times with
the shared policy (``charforge.common.retry.Backoff``): ``base_delay * 2**attempt`` seconds scaled by a random
factor of 0.5..1 (jitter), at most `max_delay`; a ``Retry-After`` header (seconds or an HTTP date) sets the wait
instead, also capped. Other 4xx answers fail at once with the server's message.

Secrets: the API key comes from the environment variable named by `api_key_env` (the variable's NAME
is all the settings hold); a ``user:password@`` in the URL is taken out of it and sent as Basic
authentication. Every text that can reach an exception or a log goes through `Secrets.mask` first,
before anything is cut, so no part of a key survives; a response body is never quoted whole: from an
error answer only its JSON ``error.message`` is shown (masked, then cut), and an answer of the wrong shape
is described by its shape ("no 'choices' (keys: error, id)").
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol

from ..common.retry import Backoff, retry_after_seconds

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
DETAIL_CHARS = 300  # how much of a server's error message an exception quotes
_MIN_SECRET = 4  # shorter "secrets" (an empty password, "x") would mask ordinary words


class EndpointError(RuntimeError):
    """An OpenAI-compatible endpoint failed: unreachable, refusing, or answering something unusable."""


class Secrets:
    """The secrets one client holds (API key, URL password), and masking of any text that might echo them."""

    def __init__(self, values: list[str] | None = None):
        self._values = sorted(
            {v for v in (values or []) if v and len(v) >= _MIN_SECRET}, key=len, reverse=True
        )

    def add(self, value: str) -> None:
        if value and len(value) >= _MIN_SECRET and value not in self._values:
            self._values = sorted([*self._values, value], key=len, reverse=True)

    def mask(self, text: Any) -> str:
        """`text` with every secret (also URL-quoted or JSON-escaped, as servers echo them) replaced by ***."""
        text = str(text)
        for value in self._values:
            for form in {value, urllib.parse.quote(value, safe=""), json.dumps(value)[1:-1]}:
                text = text.replace(form, "***")
        return text


def mask_then_cut(text: Any, mask: Callable[[Any], str], limit: int = DETAIL_CHARS) -> str:
    """`mask` first, then cut: a key that straddles the cut would otherwise leave its first part behind."""
    text = " ".join(mask(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_shape(data: Any) -> str:
    """What a decoded JSON value looks like, without any of its values (for error messages)."""
    if isinstance(data, dict):
        keys = sorted(str(k)[:40] for k in data)
        more = f", ... {len(keys) - 10} more" if len(keys) > 10 else ""
        return f"an object (keys: {', '.join(keys[:10])}{more})" if keys else "an empty object"
    if isinstance(data, list):
        return f"a list of {len(data)} item(s)"
    return "null" if data is None else f"a {type(data).__name__}"


def split_userinfo(base_url: str) -> tuple[str, str | None, str | None]:
    """``(url without user:password@, user, password)``."""
    parts = urllib.parse.urlsplit(base_url)
    if "@" not in parts.netloc:
        return base_url, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    clean = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, urllib.parse.unquote(user), urllib.parse.unquote(password) if password else None


def first_choice(
    reply: Any, where: str, error: type[EndpointError] = EndpointError
) -> tuple[dict, str | None]:
    """``(message, finish_reason)`` of a reply's first choice; `error` describing the reply's shape if none."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        what = (
            f"no 'choices' ({describe_shape(reply)})"
            if not isinstance(reply, dict) or "choices" not in reply
            else f"'choices' that is {describe_shape(choices)}"
        )
        raise error(
            f"{where} answered without a usable choice: the reply had {what}. Is this an OpenAI-"
            "compatible chat-completions endpoint, and does the model exist?"
        )
    message = choices[0].get("message")
    reason = choices[0].get("finish_reason")
    return (message if isinstance(message, dict) else {}), (reason if isinstance(reason, str) else None)


def message_text(message: dict) -> str:
    """A message's text (plain content, or the text of its content parts)."""
    content = message.get("content")
    if isinstance(content, list):  # some servers answer with content parts
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return content if isinstance(content, str) else ""


class EndpointSettings(Protocol):
    """The connection fields every caller's settings carry (caption backend, scene splitter)."""

    base_url: str
    api_key_env: str
    timeout: float
    max_retries: int
    base_delay: float
    max_delay: float


class ChatClient:
    """POSTs chat-completions requests with retries; every error message and log line is masked."""

    @classmethod
    def from_settings(
        cls,
        settings: EndpointSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        error: type[EndpointError] = EndpointError,
    ) -> ChatClient:
        """A client for `settings`' endpoint, key variable, timeout and retry policy."""
        return cls(
            settings.base_url,
            settings.api_key_env,
            timeout=settings.timeout,
            max_retries=settings.max_retries,
            base_delay=settings.base_delay,
            max_delay=settings.max_delay,
            sleep=sleep,
            rng=rng or random.Random(),
            error=error,
        )

    def __init__(
        self,
        base_url: str,
        api_key_env: str = "OPENAI_API_KEY",
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        error: type[EndpointError] = EndpointError,
    ):
        if not base_url.strip():
            raise error("the endpoint's base URL is empty (e.g. http://127.0.0.1:11434/v1 for Ollama)")
        self.api_key_env = api_key_env.strip()
        self.timeout = timeout
        self.backoff = Backoff(attempts=max_retries + 1, base=base_delay, cap=max_delay, jitter=0.5)
        self.error = error
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # callers send from several threads
        self.retries = 0
        clean, user, password = split_userinfo(base_url.strip())
        self.secrets = Secrets()
        self._basic = None
        if user is not None:
            self.secrets.add(password or "")
            self._basic = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
            self.secrets.add(self._basic)
        self.url = clean.rstrip("/") + "/chat/completions"
        key = self.api_key()
        if key:
            self.secrets.add(key)

    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "").strip() if self.api_key_env else ""

    def mask(self, text: Any) -> str:
        """`text` with this client's secrets (the key as it is now in the environment too) replaced by ***."""
        key = self.api_key()
        if key:
            self.secrets.add(key)
        return self.secrets.mask(text)

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self.api_key()
        if key:
            self.secrets.add(key)
            headers["Authorization"] = f"Bearer {key}"
        elif self._basic:
            headers["Authorization"] = f"Basic {self._basic}"
        return headers

    def _fail(self, text: str) -> EndpointError:
        return self.error(self.mask(text))

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """The decoded JSON reply to one chat-completions request (retried as the module docstring says)."""
        data = json.dumps(body).encode("utf-8")
        last = "no attempt made"
        for attempt in range(self.backoff.attempts):
            retry_after = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=self.headers(), method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - user's endpoint
                    raw = response.read()
                    kind = response.headers.get_content_type() if response.headers else "?"
                return self._decode(raw, kind)
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {self._error_detail(exc)}"
                if exc.code not in RETRY_STATUS:
                    hint = (
                        f" (check the API key in ${self.api_key_env})"
                        if exc.code in (401, 403)
                        else " (is the model name right?)"
                        if exc.code == 404
                        else ""
                    )
                    raise self._fail(f"{self.url} answered {last}{hint}") from None
                retry_after = retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
            except ValueError as exc:  # urllib's "unknown url type" and the like: retrying will not help
                raise self._fail(
                    f"{self.url} is not a usable URL: {mask_then_cut(exc, self.mask, 200)}"
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"connection failed: {mask_then_cut(reason, self.mask, 200)}"
            if self.backoff.is_last(attempt):
                break
            with self._lock:
                self.retries += 1
            delay = self.backoff.delay(attempt, retry_after, self._rng.random)
            log.debug("%s: %s; retrying in %.1f s", self.url, self.mask(last), delay)
            self._sleep(delay)
        raise self._fail(f"{self.url}: gave up after {self.backoff.attempts} attempt(s); last error: {last}")

    def _decode(self, raw: bytes, kind: str) -> dict[str, Any]:
        try:
            data = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            raise self._fail(
                f"{self.url} answered something that is not JSON ({len(raw)} bytes of {kind}); is "
                "this the API's base URL (it usually ends in /v1)?"
            ) from None
        if not isinstance(data, dict):
            raise self._fail(f"{self.url} answered {describe_shape(data)} instead of a JSON object")
        return data

    def _error_detail(self, exc: urllib.error.HTTPError) -> str:
        """The server's ``error.message`` (masked, then cut), or what the error body was; never the raw body."""
        try:
            raw = exc.read()
        except Exception:  # noqa: BLE001 - the body is only a hint
            raw = b""
        reason = mask_then_cut(exc.reason or "", self.mask, 80)
        try:
            data = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            data = None
        if isinstance(data, dict):
            error = data.get("error")
            message = error.get("message") if isinstance(error, dict) else error
            if not message:
                message = data.get("message") or data.get("detail")
            if isinstance(message, str) and message.strip():
                return mask_then_cut(message, self.mask)
            return f"{reason} ({describe_shape(data)})".strip()
        kind = exc.headers.get_content_type() if exc.headers else "?"
        return f"{reason} ({len(raw)} bytes of {kind})".strip() if raw else reason
