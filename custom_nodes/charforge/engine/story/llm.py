"""A story sentence split into 6-10 scene prompts by any OpenAI-compatible chat-completions endpoint
(OpenAI, a local Ollama, vLLM, LM Studio, llama.cpp server, ...).

One ``POST <base_url>/chat/completions`` asks for strict JSON: ``{"scenes": [{"prompt": ..., "caption": ...}]}``.
The answer is parsed strictly (a surrounding Markdown code fence is the only thing tolerated): not JSON, the
wrong shape, or the wrong number of scenes is a malformed answer, and the request is repeated with the
reason (at most ``json_attempts`` answers). Requests go through `engine.openai_compat.ChatClient`, the
client the caption backend uses too: a 429, a 5xx, a timeout or a connection error waits (``Retry-After``
when the server sends one, else a jittered exponential backoff) and tries again, up to ``max_retries``
times; any other 4xx fails at once with the server's message. The API key is read from the environment
variable named in the settings and never logged, shown or put into an error message.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from ..openai_compat import (
    ChatClient,
    EndpointError,
    first_choice,
    mask_then_cut,
    message_text,
    split_userinfo,
)
from .scenes import MAX_FRAMES, MIN_FRAMES, Scene, ensure_face_first, scenes_from_data

SYSTEM_PROMPT = (
    "You are a storyboard artist. Split the user's story into {low} to {high} consecutive scenes for an "
    "image-generation model. The same character appears in every scene; call them 'the character' (their "
    "look comes from elsewhere, do not describe their face or hair). Scene 1 must be a close-up portrait "
    "that shows the character's face clearly, looking at the camera. Each prompt is one line of comma-"
    "separated visual phrases: action, pose, framing, setting, lighting. Each caption is at most 8 words. "
    'Answer with JSON only, no prose: {{"scenes": [{{"prompt": "...", "caption": "..."}}]}}'
)
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*)\n\s*```\s*$", re.DOTALL)


class SceneSplitError(EndpointError):
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
        return (
            f"LLMSettings(base_url={split_userinfo(self.base_url)[0]!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r})"
        )


def parse_scene_reply(content: str, minimum: int = MIN_FRAMES, maximum: int = MAX_FRAMES) -> list[Scene]:
    """The scenes of an answer, or `MalformedReply` saying what is wrong with it."""
    if not isinstance(content, str) or not content.strip():
        raise MalformedReply("the answer is empty")
    match = _FENCE.match(content)
    text = match.group(1) if match else content
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedReply(
            f"the answer is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    try:
        scenes = scenes_from_data(data, "the answer")
    except ValueError as exc:
        raise MalformedReply(str(exc)) from None
    if not minimum <= len(scenes) <= maximum:
        raise MalformedReply(f"the answer has {len(scenes)} scenes; {minimum} to {maximum} are needed")
    return scenes


class SceneSplitter:
    """Splits story sentences into scene prompts with a chat model behind an OpenAI-compatible endpoint."""

    def __init__(
        self, settings: LLMSettings | None = None, sleep=time.sleep, rng: random.Random | None = None
    ):
        self.settings = settings or LLMSettings()
        self.client = ChatClient.from_settings(self.settings, sleep=sleep, rng=rng, error=SceneSplitError)
        self.malformed: list[str] = []  # why earlier answers were rejected

    @property
    def retries(self) -> int:
        """Transport retries so far."""
        return self.client.retries

    def payload(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {
            "model": s.model,
            "messages": messages,
            "temperature": s.temperature,
            "max_tokens": s.max_tokens,
        }
        if s.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def split(
        self, story: str, frames: int | None = None, minimum: int = MIN_FRAMES, maximum: int = MAX_FRAMES
    ) -> list[Scene]:
        """Scene prompts for `story` (exactly `frames` of them when given), frame 1 showing the face clearly."""
        story = " ".join(story.split())
        if not story:
            raise SceneSplitError(
                "the story is empty: give a sentence such as 'she finds a map and sails to the island'"
            )
        if frames is not None:
            if not minimum <= frames <= maximum:
                raise SceneSplitError(f"frames must be {minimum}-{maximum}, got {frames}")
            minimum = maximum = frames
        system = SYSTEM_PROMPT.format(low=minimum, high=maximum)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Story: {story}"}]
        self.malformed = []
        for _ in range(max(1, self.settings.json_attempts)):
            reply = self.client.complete(self.payload(messages))
            message, _ = first_choice(reply, self.client.url, SceneSplitError)
            content = message_text(message)
            try:
                scenes = parse_scene_reply(content, minimum, maximum)
            except MalformedReply as exc:
                self.malformed.append(mask_then_cut(exc, self.client.mask, 200))
                messages = [
                    *messages[:2],
                    {"role": "assistant", "content": content[:4000]},
                    {
                        "role": "user",
                        "content": f"That answer was rejected: {exc}. Answer again with JSON "
                        f"only, exactly in the requested shape.",
                    },
                ]
                continue
            return ensure_face_first(scenes)
        raise SceneSplitError(
            f"{self.settings.model} at {split_userinfo(self.settings.base_url)[0]} gave no usable scene list in "
            f"{len(self.malformed)} answer(s): "
            + "; ".join(self.malformed)
            + ". Try another model, or write the scenes yourself (--scenes FILE)."
        )
