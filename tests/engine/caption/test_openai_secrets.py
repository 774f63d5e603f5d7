"""The one OpenAI-compatible client (engine.openai_compat) never lets a secret into an exception or a log.

Loopback fake endpoints only; the key is set in the environment as a user would.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from charforge.engine.caption.backends.openai_compat import (
    OpenAICompatCaptioner,
    OpenAISettings,
    RequestFailed,
)
from charforge.engine.openai_compat import ChatClient, EndpointError, Secrets, describe_shape, mask_then_cut
from charforge.engine.story.llm import LLMSettings, SceneSplitError, SceneSplitter

KEY = "sk-live-" + "Z9" * 20  # 48 characters


class Scripted:
    """Answers each POST with the next (status, raw body bytes, content type); records Authorization."""

    def __init__(self):
        self.script: list[tuple[int, bytes, str]] = []
        self.auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.auth.append(self.headers.get("Authorization"))
                status, body, kind = outer.script.pop(0)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("CF_SECRET_KEY", KEY)
    fake = Scripted()
    yield fake
    fake.close()


def _json(status, payload):
    return status, json.dumps(payload).encode(), "application/json"


def _no_key_anywhere(text: str) -> None:
    assert KEY not in text
    for size in (8, 12, 20):  # no long fragment of it either (a key cut in half is still a leak)
        assert all(KEY[i : i + size] not in text for i in range(len(KEY) - size + 1)), text


def _caption(server, **kw):
    settings = OpenAISettings(
        base_url=server.url,
        model="m",
        api_key_env="CF_SECRET_KEY",
        timeout=5,
        concurrency=1,
        max_retries=1,
        **kw,
    )
    return OpenAICompatCaptioner(settings, sleep=lambda s: None, rng=random.Random(0))


def _splitter(server):
    settings = LLMSettings(
        base_url=server.url, model="m", api_key_env="CF_SECRET_KEY", timeout=5, max_retries=1
    )
    return SceneSplitter(settings, sleep=lambda s: None, rng=random.Random(0))


def test_a_key_straddling_the_old_300_character_cut_is_masked_whole(server, caplog):
    # The old code cut the message at 300 characters and then masked: the key's head survived the cut.
    message = "x" * 280 + f" your key {KEY} is not valid"
    server.script = [_json(400, {"error": {"message": message}})]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RequestFailed) as info:
        _caption(server).caption([Image.new("RGB", (8, 8))])
    assert "HTTP 400" in str(info.value)
    _no_key_anywhere(str(info.value))
    _no_key_anywhere(caplog.text)


def test_a_200_without_choices_describes_the_shape_and_never_the_body(server, caplog):
    caplog.set_level(logging.DEBUG)
    echo = {"id": "x1", "error": {"message": f"bad key {KEY}"}, "echo": {"authorization": f"Bearer {KEY}"}}
    server.script = [_json(200, echo)]
    with pytest.raises(RequestFailed) as info:
        _caption(server).caption([Image.new("RGB", (8, 8))])
    text = str(info.value)
    assert "no 'choices'" in text and "keys: echo, error, id" in text
    assert "bad key" not in text  # no value of the body at all
    _no_key_anywhere(text)
    server.script = [_json(200, echo)]
    with pytest.raises(SceneSplitError) as info:
        _splitter(server).split("she sails to the island")
    assert "no 'choices'" in str(info.value)
    _no_key_anywhere(str(info.value))
    _no_key_anywhere(caplog.text)


def test_non_json_answers_are_described_not_quoted(server):
    server.script = [(200, f"<html>proxy login for {KEY}</html>".encode(), "text/html")]
    with pytest.raises(SceneSplitError) as info:
        _splitter(server).split("she sails to the island")
    assert (
        "not JSON" in str(info.value) and "text/html" in str(info.value) and "<html>" not in str(info.value)
    )
    _no_key_anywhere(str(info.value))
    server.script = [(403, f"<html>denied {KEY}</html>".encode(), "text/html")]
    with pytest.raises(SceneSplitError) as info:
        _splitter(server).split("she sails to the island")
    assert "HTTP 403" in str(info.value) and "text/html" in str(info.value)
    _no_key_anywhere(str(info.value))


def test_retried_errors_and_the_final_message_are_masked(server, caplog):
    caplog.set_level(logging.DEBUG, logger="charforge.engine.openai_compat")
    server.script = [_json(503, {"error": {"message": f"overloaded ({KEY})"}})] * 2
    with pytest.raises(SceneSplitError, match="gave up after 2 attempt") as info:
        _splitter(server).split("she sails to the island")
    assert "retrying" in caplog.text  # the retry was logged ...
    _no_key_anywhere(caplog.text)  # ... without the key
    _no_key_anywhere(str(info.value))


def test_url_password_is_sent_as_basic_auth_and_masked_everywhere(monkeypatch):
    monkeypatch.delenv("CF_NO_KEY", raising=False)
    fake = Scripted()
    try:
        password = "hunter2-very-secret"
        fake.script = [_json(401, {"error": {"message": f"user alice with {password} refused"}})]
        client = ChatClient(
            f"http://alice:{password}@127.0.0.1:{fake.port}/v1", "CF_NO_KEY", timeout=5, max_retries=0
        )
        with pytest.raises(EndpointError) as info:
            client.complete({"model": "m", "messages": []})
        assert fake.auth[0].startswith("Basic ")
        assert password not in str(info.value) and "alice:" not in str(info.value)
        assert "@" not in client.url
        settings = OpenAISettings(base_url=f"http://alice:{password}@127.0.0.1:{fake.port}/v1")
        assert password not in repr(settings)
        assert password not in repr(LLMSettings(base_url=f"http://alice:{password}@127.0.0.1:{fake.port}/v1"))
    finally:
        fake.close()


def test_unreachable_endpoint_message_holds_no_secret(monkeypatch):
    monkeypatch.setenv("CF_SECRET_KEY", KEY)
    client = ChatClient(f"http://u:{KEY}@127.0.0.1:9/v1", "CF_SECRET_KEY", timeout=1, max_retries=0)
    with pytest.raises(EndpointError, match="connection failed") as info:
        client.complete({})
    _no_key_anywhere(str(info.value))


def test_masking_helpers():
    secrets = Secrets([KEY, "", "ab"])  # empty and tiny values are not secrets worth masking
    assert secrets.mask(f"a {KEY} b") == "a *** b"
    assert secrets.mask(json.dumps({"k": KEY})) == '{"k": "***"}'
    assert mask_then_cut("y" * 290 + KEY, secrets.mask, 300).endswith("***")
    assert describe_shape({"b": 1, "a": [KEY]}) == "an object (keys: a, b)"
    assert describe_shape([1, 2]) == "a list of 2 item(s)" and describe_shape(None) == "null"
