"""Any OpenAI-compatible chat-completions endpoint with vision: OpenAI, a local Ollama, vLLM, LM Studio,
llama.cpp server, ...

One request per image: ``POST <base_url>/chat/completions`` with the prompt and the image as a base64
JPEG data URL (``image_url`` content part). The API key is read from the environment variable named in
the settings (``OPENAI_API_KEY`` by default; local servers need none) and is never logged, shown or
put into an error message.

Retries: a 429, a 5xx, a timeout or a connection error is retried up to `max_retries` times, waiting
``base_delay * 2**attempt`` seconds scaled by a random factor of 0.5..1 (jitter), at most `max_delay`; a
``Retry-After`` header (seconds or an HTTP date) sets the wait instead, also capped by `max_delay`. Other
4xx answers fail at once with the server's message. A refusal (the response's ``refusal`` field, a
``content_filter`` finish, or an answer that starts like "I'm sorry, I can't") gives an empty caption
for that image, and the report lists it; the rest of the dataset goes on.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .base import Captioner, CaptionerError

DEFAULT_PROMPT = ("Describe this photo in one sentence for an image-generation training caption: the person's "
                  "appearance, clothing, pose, expression, setting and lighting. No preamble.")
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry, (but )?i|i can(no|'?)t (help|assist|describe|provide)|"
                      r"i('m| am) (unable|not able) to)", re.IGNORECASE)


@dataclass
class OpenAISettings:
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    prompt: str = DEFAULT_PROMPT
    system_prompt: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable; the key itself never goes in settings
    max_tokens: int = 120
    temperature: float = 0.2
    timeout: float = 60.0  # seconds per request
    max_retries: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_side: int = 1024  # images are shrunk to this long side before upload
    jpeg_quality: int = 90
    concurrency: int = 4  # requests in flight at once

    def __repr__(self) -> str:  # safe to log: holds no secret, but keep it short
        return f"OpenAISettings(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"


class RequestFailed(CaptionerError):
    """The endpoint answered with an error that retrying will not fix (or retries ran out)."""


def image_data_url(image: Any, quality: int = 90) -> str:
    """A PIL image as a ``data:image/jpeg;base64,...`` URL."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header value (delta seconds or an HTTP date) as seconds from now."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry `attempt` (0-based): Retry-After when given, else jittered exponential."""
    if retry_after is not None:
        return min(cap, retry_after)
    rng = rng or random
    return min(cap, base * (2 ** attempt)) * (0.5 + 0.5 * rng.random())


def is_refusal(message: dict[str, Any], finish_reason: str | None) -> bool:
    if message.get("refusal"):
        return True
    if finish_reason == "content_filter":
        return True
    content = message.get("content")
    return isinstance(content, str) and bool(_REFUSAL.match(content))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers answer with content parts
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


class OpenAICompatCaptioner(Captioner):
    """Captions from a vision model behind an OpenAI-compatible chat-completions endpoint."""

    name = "openai"

    def __init__(self, settings: OpenAISettings | None = None, sleep=time.sleep, rng: random.Random | None = None):
        self.settings = settings or OpenAISettings()
        if not self.settings.base_url.strip():
            raise CaptionerError("the endpoint's base URL is empty (e.g. http://127.0.0.1:11434/v1 for Ollama)")
        self.max_side = self.settings.max_side
        self.batch_size = max(1, self.settings.concurrency) * 2
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.refused = 0
        self.retries = 0
        self._count_lock = threading.Lock()  # requests run on several threads
        self._url = self.settings.base_url.rstrip("/") + "/chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        var = self.settings.api_key_env.strip()
        key = os.environ.get(var, "").strip() if var else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _scrub(self, text: str) -> str:
        """`text` with the API key (should a server echo it) replaced by ***."""
        var = self.settings.api_key_env.strip()
        key = os.environ.get(var, "").strip() if var else ""
        return text.replace(key, "***") if key else text

    def payload(self, image: Any) -> dict[str, Any]:
        s = self.settings
        messages = []
        if s.system_prompt.strip():
            messages.append({"role": "system", "content": s.system_prompt})
        messages.append({"role": "user", "content": [
            {"type": "text", "text": s.prompt},
            {"type": "image_url", "image_url": {"url": image_data_url(image, s.jpeg_quality)}},
        ]})
        return {"model": s.model, "messages": messages, "max_tokens": s.max_tokens, "temperature": s.temperature}

    def _post(self, body: bytes) -> dict[str, Any]:
        s = self.settings
        last = "no attempt made"
        for attempt in range(s.max_retries + 1):
            retry_after = None
            try:
                request = urllib.request.Request(self._url, data=body, headers=self._headers(), method="POST")
                with urllib.request.urlopen(request, timeout=s.timeout) as response:  # noqa: S310 - user's endpoint
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                detail = self._scrub(_error_detail(exc))
                last = f"HTTP {exc.code}: {detail}"
                if exc.code not in RETRY_STATUS:
                    hint = " (check the API key variable)" if exc.code in (401, 403) else ""
                    raise RequestFailed(f"{self._url} answered {last}{hint}") from None
                retry_after = retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"connection failed: {reason}"
            except json.JSONDecodeError as exc:
                raise RequestFailed(f"{self._url} answered something that is not JSON: {exc}") from None
            if attempt == s.max_retries:
                break
            with self._count_lock:
                self.retries += 1
            self._sleep(backoff_delay(attempt, s.base_delay, s.max_delay, retry_after, self._rng))
        raise RequestFailed(f"{self._url}: gave up after {s.max_retries + 1} attempt(s); last error: {last}")

    def caption_one(self, image: Any) -> str:
        data = self._post(json.dumps(self.payload(image)).encode("utf-8"))
        try:
            choice = data["choices"][0]
            message = choice.get("message") or {}
        except (KeyError, IndexError, TypeError):
            raise RequestFailed(f"{self._url} answered without choices: {str(data)[:200]}") from None
        if is_refusal(message, choice.get("finish_reason")):
            with self._count_lock:
                self.refused += 1
            return ""
        return " ".join(_text(message.get("content")).split())

    def caption(self, images: list[Any]) -> list[str]:
        if not images:
            return []
        workers = max(1, min(self.settings.concurrency, len(images)))
        if workers == 1:
            return [self.caption_one(image) for image in images]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="charforge-caption") as pool:
            return list(pool.map(self.caption_one, images))

    def notes(self) -> list[str]:
        notes = [f"{self.settings.model} at {self.settings.base_url}"]
        if self.refused:
            notes.append(f"the model refused {self.refused} image(s); they have no new caption")
        if self.retries:
            notes.append(f"{self.retries} request(s) retried (rate limit or server errors)")
        return notes


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the body is only a hint
        return exc.reason or ""
    try:
        data = json.loads(raw)
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("error")
        if message:
            return str(message)[:300]
    except (ValueError, AttributeError):
        pass
    return raw.strip()[:300] or str(exc.reason or "")
