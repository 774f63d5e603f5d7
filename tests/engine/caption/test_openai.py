"""OpenAI-compatible backend against a loopback fake endpoint (127.0.0.1 only)."""

import random

import pytest
from PIL import Image

from cf_testing.caption_models import FakeEndpoint
from charforge.engine.caption.backends.openai_compat import (
    OpenAICompatCaptioner,
    OpenAISettings,
    RequestFailed,
)

SECRET = "sk-test-SECRET-123"


@pytest.fixture
def endpoint():
    fake = FakeEndpoint()
    yield fake
    fake.close()


def make(endpoint, sleeps=None, **kw):
    settings = OpenAISettings(
        base_url=endpoint.url, model="llava", api_key_env="CF_TEST_KEY", timeout=5, concurrency=1, **kw
    )
    return OpenAICompatCaptioner(
        settings, sleep=(sleeps.append if sleeps is not None else lambda s: None), rng=random.Random(0)
    )


def red():
    return Image.new("RGB", (40, 30), (255, 0, 0))


def test_sends_prompt_and_base64_image_with_key_from_env(endpoint, monkeypatch):
    monkeypatch.setenv("CF_TEST_KEY", SECRET)
    cap = make(endpoint, prompt="Describe.", system_prompt="Be brief.")
    assert cap.caption([red(), Image.new("RGB", (20, 20), (0, 0, 255))]) == [
        "A red square.",
        "A blue square.",
    ]
    first = endpoint.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == f"Bearer {SECRET}"
    body = first["body"]
    assert body["model"] == "llava" and body["messages"][0] == {"role": "system", "content": "Be brief."}
    parts = body["messages"][1]["content"]
    assert parts[0] == {"type": "text", "text": "Describe."}
    assert parts[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert SECRET not in repr(cap.settings) and SECRET not in " ".join(cap.notes())


def test_no_key_variable_sends_no_authorization(endpoint, monkeypatch):
    monkeypatch.delenv("CF_TEST_KEY", raising=False)
    make(endpoint).caption([red()])
    assert endpoint.requests[0]["auth"] is None


def test_429_with_retry_after_then_success(endpoint):
    endpoint.script = [
        (429, {"error": {"message": "slow down"}}, {"Retry-After": "3"}),
        (503, {"error": "busy"}, {}),
        "caption",
    ]
    sleeps = []
    cap = make(endpoint, sleeps, base_delay=0.5, max_delay=30)
    assert cap.caption([red()]) == ["A red square."]
    assert len(endpoint.requests) == 3
    assert sleeps[0] == 3.0  # Retry-After honoured
    assert 0.5 <= sleeps[1] <= 1.0  # 0.5 * 2**1 with jitter 0.5..1
    assert any("retried" in n for n in cap.notes())


def test_connection_errors_are_retried_then_give_up(endpoint):
    endpoint.script = ["drop", "caption"]
    assert make(endpoint).caption([red()]) == ["A red square."]
    endpoint.script = ["drop"] * 5
    with pytest.raises(RequestFailed, match="gave up after 3 attempt"):
        make(endpoint, max_retries=2).caption([red()])


def test_client_errors_fail_at_once_without_leaking_the_key(endpoint, monkeypatch):
    monkeypatch.setenv("CF_TEST_KEY", SECRET)
    endpoint.script = [(401, {"error": {"message": f"Incorrect API key provided: {SECRET}"}}, {})]
    with pytest.raises(RequestFailed) as info:
        make(endpoint).caption([red()])
    assert "401" in str(info.value) and "API key in $CF_TEST_KEY" in str(info.value)
    assert SECRET not in str(info.value)
    assert len(endpoint.requests) == 1


def test_refusals_give_empty_captions_and_a_note(endpoint):
    endpoint.script = [
        "refuse",
        (
            200,
            {
                "choices": [
                    {"message": {"content": "I'm sorry, I can't describe this."}, "finish_reason": "stop"}
                ]
            },
            {},
        ),
        "caption",
    ]
    cap = make(endpoint)
    assert cap.caption([red(), red(), red()]) == ["", "", "A red square."]
    assert any("refused 2" in n for n in cap.notes())


def test_concurrent_requests_keep_the_order(endpoint):
    images = [Image.new("RGB", (16, 16), (255, 0, 0) if i % 2 else (0, 0, 255)) for i in range(6)]
    cap = OpenAICompatCaptioner(
        OpenAISettings(base_url=endpoint.url, model="m", api_key_env="", concurrency=3)
    )
    assert cap.caption(images) == ["A blue square.", "A red square."] * 3
