"""Any OpenAI-compatible chat-completions endpoint with vision: OpenAI, a local Ollama, vLLM, LM Studio,
llama.cpp server, ...

One request per image: ``POST <base_url>/chat/completions`` with the prompt and the image as a base64
JPEG data URL (``image_url`` content part). The API key is read from the environment variable named in
the settings (``OPENAI_API_KEY`` by default; local servers need none) and is never logged, shown or
put into an error message.

Requests, retries (429 with ``Retry-After``, 5xx, timeouts) and keeping secrets out of every message are
the job of `engine.openai_compat.ChatClient`, shared with story scene splitting. A refusal (the response's
``refusal`` field, a ``content_filter`` finish, or an answer that starts like "I'm sorry, I can't") gives an
empty caption for that image, and the report lists it; the rest of the dataset goes on.
"""

from __future__ import annotations

import base64
import io
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ...openai_compat import (
    RETRY_STATUS,
    ChatClient,
    EndpointError,
    first_choice,
    message_text,
    split_userinfo,
)
from .base import Captioner, CaptionerError

__all__ = [
    "DEFAULT_PROMPT",
    "RETRY_STATUS",
    "OpenAICompatCaptioner",
    "OpenAISettings",
    "RequestFailed",
    "image_data_url",
    "is_refusal",
]

DEFAULT_PROMPT = (
    "Describe this photo in one sentence for an image-generation training caption: the person's "
    "appearance, clothing, pose, expression, setting and lighting. No preamble."
)
_REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry, (but )?i|i can(no|'?)t (help|assist|describe|provide)|"
    r"i('m| am) (unable|not able) to)",
    re.IGNORECASE,
)


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

    def __repr__(self) -> str:  # safe to log: no key, and a password in the URL is left out
        return (
            f"OpenAISettings(base_url={split_userinfo(self.base_url)[0]!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r})"
        )


class RequestFailed(CaptionerError, EndpointError):
    """The endpoint answered with an error that retrying will not fix (or retries ran out)."""


def image_data_url(image: Any, quality: int = 90) -> str:
    """A PIL image as a ``data:image/jpeg;base64,...`` URL."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def is_refusal(message: dict[str, Any], finish_reason: str | None) -> bool:
    if message.get("refusal"):
        return True
    if finish_reason == "content_filter":
        return True
    content = message.get("content")
    return isinstance(content, str) and bool(_REFUSAL.match(content))


class OpenAICompatCaptioner(Captioner):
    """Captions from a vision model behind an OpenAI-compatible chat-completions endpoint."""

    name = "openai"

    def __init__(
        self, settings: OpenAISettings | None = None, sleep=time.sleep, rng: random.Random | None = None
    ):
        self.settings = settings or OpenAISettings()
        s = self.settings
        self.client = ChatClient.from_settings(s, sleep=sleep, rng=rng, error=RequestFailed)
        self.max_side = s.max_side
        self.batch_size = max(1, s.concurrency) * 2
        self.refused = 0
        self._count_lock = threading.Lock()  # requests run on several threads

    @property
    def retries(self) -> int:
        return self.client.retries

    def payload(self, image: Any) -> dict[str, Any]:
        s = self.settings
        messages: list[dict[str, Any]] = []
        if s.system_prompt.strip():
            messages.append({"role": "system", "content": s.system_prompt})
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": s.prompt},
                    {"type": "image_url", "image_url": {"url": image_data_url(image, s.jpeg_quality)}},
                ],
            }
        )
        return {
            "model": s.model,
            "messages": messages,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
        }

    def caption_one(self, image: Any) -> str:
        reply = self.client.complete(self.payload(image))
        message, finish_reason = first_choice(reply, self.client.url, RequestFailed)
        if is_refusal(message, finish_reason):
            with self._count_lock:
                self.refused += 1
            return ""
        return " ".join(message_text(message).split())

    def caption(self, images: list[Any]) -> list[str]:
        if not images:
            return []
        workers = max(1, min(self.settings.concurrency, len(images)))
        if workers == 1:
            return [self.caption_one(image) for image in images]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="charforge-caption") as pool:
            return list(pool.map(self.caption_one, images))

    def notes(self) -> list[str]:
        notes = [f"{self.settings.model} at {self.client.url.removesuffix('/chat/completions')}"]
        if self.refused:
            notes.append(f"the model refused {self.refused} image(s); they have no new caption")
        if self.retries:
            notes.append(f"{self.retries} request(s) retried (rate limit or server errors)")
        return notes
