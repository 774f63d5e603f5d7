"""A story sentence split into 6-10 scene prompts by any OpenAI-compatible chat-completions endpoint
(OpenAI, a local Ollama, vLLM, LM Studio, llama.cpp server, ...).

One ``POST <base_url>/chat/completions`` asks for strict JSON: ``{"scenes": [{"prompt": ..., "caption": ...}]}``.
The answer is parsed strictly (a surrounding Markdown code fence is the only thing tolerated): not JSON, the
wrong shape, or the wrong number of scenes is a malformed answer, and the request is repeated with the
reason (at most ``json_attempts`` answers). Transport failures are retried like the caption backend does:
a 429, a 5xx, a timeout or a connection error waits (``Retry-After`` when the server sends one, else a
jittered exponential backoff) and tries again, up to ``max_retries`` times; any other 4xx fails at once
with the server's message. The API key is read from the environment variable named in the settings and
never logged, shown or put into an error message.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from ..caption.backends.openai_compat import RETRY_STATUS, backoff_delay, retry_after_seconds
from .scenes import MAX_FRAMES, MIN_FRAMES, Scene, ensure_face_first, scenes_from_data

SYSTEM_PROMPT = (
    "You are a storyboard artist. Split the user's story into {low} to {high} consecutive scenes for an "
    "image-generation model. The same character appears in every scene; call them 'the character' (their "
    "look comes from elsewhere, do not describe their face or hair). Scene 1 must be a close-up portrait "
    "that shows the character's face clearly, looking at the camera. Each prompt is one line of comma-"
    "separated visual phrases: action, pose, framing, setting, lighting. Each caption is at most 8 words. "
    "Answer with JSON only, no prose: {{\"scenes\": [{{\"prompt\": \"...\", \"caption\": \"...\"}}]}}"
)
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*)\n\s*```\s*$", re.DOTALL)


class SceneSplitError(RuntimeError):
    """The endpoint could not split the story (unreachable, refusing, or never answering valid JSON)."""


class MalformedReply(ValueError):
    """An answer that is not the JSON scene list asked for; the message says what is wrong with it."""


@dataclass
class LLMSettings:
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable; the key itself never goes in settings
    temperature: float = 0.7
    max_tokens: int = 1500
    timeout: float = 60.0  # seconds per request
    max_retries: int = 5  # transport retries per request (429, 5xx, timeouts)
    base_delay: float = 1.0
    max_delay: float = 60.0
    json_attempts: int = 3  # answers asked for before a malformed one is an error
    json_mode: bool = True  # send response_format {"type": "json_object"}

    def __repr__(self) -> str:
        return f"LLMSettings(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"


def parse_scene_reply(content: str, minimum: int = MIN_FRAMES, maximum: int = MAX_FRAMES) -> list[Scene]:
    """The scenes of an answer, or `MalformedReply` saying what is wrong with it."""
    if not isinstance(content, str) or not content.strip():
        raise MalformedReply("the answer is empty")
    match = _FENCE.match(content)
    text = match.group(1) if match else content
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedReply(f"the answer is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    try:
        scenes = scenes_from_data(data, "the answer")
    except ValueError as exc:
        raise MalformedReply(str(exc)) from None
    if not minimum <= len(scenes) <= maximum:
        raise MalformedReply(f"the answer has {len(scenes)} scenes; {minimum} to {maximum} are needed")
    return scenes


class SceneSplitter:
    """Splits story sentences into scene prompts with a chat model behind an OpenAI-compatible endpoint."""

    def __init__(self, settings: LLMSettings | None = None, sleep=time.sleep, rng: random.Random | None = None):
        self.settings = settings or LLMSettings()
        if not self.settings.base_url.strip():
            raise SceneSplitError("the endpoint's base URL is empty (e.g. http://127.0.0.1:11434/v1 for Ollama)")
        self._url = self.settings.base_url.rstrip("/") + "/chat/completions"
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.retries = 0  # transport retries
        self.malformed: list[str] = []  # why earlier answers were rejected

    def _key(self) -> str:
        var = self.settings.api_key_env.strip()
        return os.environ.get(var, "").strip() if var else ""

    def _scrub(self, text: str) -> str:
        key = self._key()
        return text.replace(key, "***") if key else text

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def payload(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {"model": s.model, "messages": messages, "temperature": s.temperature,
                                "max_tokens": s.max_tokens}
        if s.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        data = json.dumps(body).encode("utf-8")
        last = "no attempt made"
        for attempt in range(s.max_retries + 1):
            retry_after = None
            try:
                request = urllib.request.Request(self._url, data=data, headers=self._headers(), method="POST")
                with urllib.request.urlopen(request, timeout=s.timeout) as response:  # noqa: S310 - user's endpoint
                    raw = response.read().decode("utf-8", "replace")
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    raise SceneSplitError(f"{self._url} answered something that is not JSON: "
                                          f"{self._scrub(raw.strip()[:200])!r}") from None
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {self._scrub(_error_detail(exc))}"
                if exc.code not in RETRY_STATUS:
                    hint = (f" (check the API key in ${s.api_key_env})" if exc.code in (401, 403) else
                            " (is the model name right?)" if exc.code == 404 else "")
                    raise SceneSplitError(f"{self._url} answered {last}{hint}") from None
                retry_after = retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                last = f"connection failed: {getattr(exc, 'reason', exc)}"
            if attempt == s.max_retries:
                break
            self.retries += 1
            self._sleep(backoff_delay(attempt, s.base_delay, s.max_delay, retry_after, self._rng))
        raise SceneSplitError(f"{self._url}: gave up after {s.max_retries + 1} attempt(s); last error: "
                              f"{self._scrub(last)}")

    def split(self, story: str, frames: int | None = None, minimum: int = MIN_FRAMES,
              maximum: int = MAX_FRAMES) -> list[Scene]:
        """Scene prompts for `story` (exactly `frames` of them when given), frame 1 showing the face clearly."""
        story = " ".join(story.split())
        if not story:
            raise SceneSplitError("the story is empty: give a sentence such as 'she finds a map and sails to the "
                                  "island'")
        if frames is not None:
            if not minimum <= frames <= maximum:
                raise SceneSplitError(f"frames must be {minimum}-{maximum}, got {frames}")
            minimum = maximum = frames
        system = SYSTEM_PROMPT.format(low=minimum, high=maximum)
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"Story: {story}"}]
        self.malformed = []
        for _ in range(max(1, self.settings.json_attempts)):
            reply = self._post(self.payload(messages))
            content = _content(reply)
            try:
                scenes = parse_scene_reply(content, minimum, maximum)
            except MalformedReply as exc:
                self.malformed.append(str(exc))
                messages = [*messages[:2], {"role": "assistant", "content": content[:4000]},
                            {"role": "user", "content": f"That answer was rejected: {exc}. Answer again with JSON "
                                                        f"only, exactly in the requested shape."}]
                continue
            return ensure_face_first(scenes)
        raise SceneSplitError(f"{self.settings.model} at {self.settings.base_url} gave no usable scene list in "
                              f"{len(self.malformed)} answer(s): " + "; ".join(self.malformed)
                              + ". Try another model, or write the scenes yourself (--scenes FILE).")


def _content(reply: Any) -> str:
    try:
        message = reply["choices"][0].get("message") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""
    content = message.get("content")
    if isinstance(content, list):  # content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the body is only a hint
        return str(exc.reason or "")
    try:
        data = json.loads(raw)
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)[:300]
    except (ValueError, AttributeError):
        pass
    return raw.strip()[:300] or str(exc.reason or "")
