"""Server URLs, auth, profiles and environment variables; secrets never shown; the driver stays light."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from charforge.driver.config import (
    BasicAuth,
    BearerAuth,
    HeaderAuth,
    MultiAuth,
    Secret,
    ServerURL,
    redact,
    resolve_server,
)
from charforge.driver.errors import ConfigError
from charforge.driver.events import Event
from charforge.driver.progress import JobView, make_renderer


@pytest.mark.parametrize(
    ("text", "base", "ws"),
    [
        ("http://127.0.0.1:8188", "http://127.0.0.1:8188", "ws://127.0.0.1:8188/ws?clientId=c1"),
        ("127.0.0.1:8188/", "http://127.0.0.1:8188", "ws://127.0.0.1:8188/ws?clientId=c1"),
        (
            "https://comfy.example.com/team/a/",
            "https://comfy.example.com/team/a",
            "wss://comfy.example.com/team/a/ws?clientId=c1",
        ),
        (
            "wss://pod-8188.proxy.runpod.net",
            "https://pod-8188.proxy.runpod.net",
            "wss://pod-8188.proxy.runpod.net/ws?clientId=c1",
        ),
        ("http://[::1]:8188", "http://[::1]:8188", "ws://[::1]:8188/ws?clientId=c1"),
    ],
)
def test_server_urls(text, base, ws):
    url, auth = ServerURL.parse(text)
    assert url.base == base and url.ws("c1") == ws and auth is None
    assert url.http("/prompt") == base + "/prompt"


def test_credentials_in_url_become_basic_auth():
    url, auth = ServerURL.parse("https://ann:p%40ss@host.example/x")
    assert url.base == "https://host.example/x"
    assert isinstance(auth, BasicAuth) and auth.username == "ann" and auth.password.reveal() == "p@ss"
    for bad in ("ftp://host", "http://", "http://host/?q=1", ""):
        with pytest.raises(ConfigError):
            ServerURL.parse(bad)


def test_secrets_are_masked_everywhere():
    token = Secret("abc123secret")
    assert "abc123" not in repr(token) + str(token) + f"{token}"
    bearer, basic, headers = (
        BearerAuth("tok-1234"),
        BasicAuth("u", "pw-9876"),
        HeaderAuth({"X-Key": "key-5555"}),
    )
    text = repr(bearer) + repr(basic) + repr(headers) + repr(MultiAuth([bearer, basic, headers]))
    assert not any(s in text for s in ("tok-1234", "pw-9876", "key-5555"))
    assert bearer.headers() == {"Authorization": "Bearer tok-1234"}
    secrets = MultiAuth([bearer, basic, headers]).secrets()
    message = f"failed with Authorization: {basic.headers()['Authorization']} and key-5555 and tok-1234%21"
    cleaned = redact(message, secrets)
    assert "pw-9876" not in cleaned and "key-5555" not in cleaned and "tok-1234" not in cleaned
    assert basic.headers()["Authorization"].split()[1] not in cleaned


def test_profiles_env_and_precedence(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "default_profile: local\n"
        "profiles:\n"
        "  local:\n    server: http://127.0.0.1:8188\n"
        "  studio:\n    server: https://comfy.example.com/team/\n    token_env: STUDIO_TOKEN\n    timeout: 900\n"
        "  pod:\n    server: https://pod.example\n    username: me\n    password_env: POD_PW\n"
        "    headers: {X-Api-Key: '${POD_KEY}'}\n"
    )
    env = {"STUDIO_TOKEN": "st-0001", "POD_PW": "pw-0002", "POD_KEY": "key-0003"}
    local = resolve_server(env=env, config_path=config)
    assert local.url.base == "http://127.0.0.1:8188" and local.auth is None and local.profile == "local"
    studio = resolve_server(profile="studio", env=env, config_path=config)
    assert studio.url.base == "https://comfy.example.com/team" and studio.job_timeout == 900
    assert studio.auth.headers() == {"Authorization": "Bearer st-0001"} and "st-0001" not in repr(studio)
    pod = resolve_server("pod", env=env, config_path=config)  # a bare name that is a profile
    assert pod.auth.headers()["X-Api-Key"] == "key-0003" and pod.auth.headers()["Authorization"].startswith(
        "Basic"
    )
    # Environment beats the profile; explicit arguments beat both.
    env2 = {**env, "CHARFORGE_SERVER": "http://10.0.0.5:8188", "CHARFORGE_TOKEN": "env-tok"}
    chosen = resolve_server(env=env2, config_path=config)
    assert (
        chosen.url.base == "http://10.0.0.5:8188"
        and chosen.auth.headers()["Authorization"] == "Bearer env-tok"
    )
    explicit = resolve_server("http://h:1", env=env2, config_path=config, auth=BearerAuth("arg"))
    assert explicit.url.base == "http://h:1" and explicit.auth.headers()["Authorization"] == "Bearer arg"
    headers = resolve_server("http://h:1", env={"CHARFORGE_HEADERS": '{"X-A": "b"}'}, config_path=config)
    assert headers.auth.headers() == {"X-A": "b"}


def test_config_errors_are_actionable(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("profiles:\n  studio:\n    server: https://x\n    token_env: MISSING_VAR\n")
    with pytest.raises(ConfigError, match="MISSING_VAR"):
        resolve_server(profile="studio", env={}, config_path=config)
    with pytest.raises(ConfigError, match="no profile 'other'.*studio"):
        resolve_server(profile="other", env={}, config_path=config)
    with pytest.raises(ConfigError, match="JSON object"):
        resolve_server("http://h", env={"CHARFORGE_HEADERS": "X-A: b"}, config_path=config)
    config.write_text("profiles: [1, 2]\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_server(env={}, config_path=config)


def test_world_readable_config_with_a_token_warns(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("profiles:\n  s:\n    server: http://h\n    token: literal-secret\n")
    config.chmod(0o644)
    resolved = resolve_server(profile="s", env={}, config_path=config)
    assert resolved.warnings and "chmod 600" in resolved.warnings[0]
    assert "literal-secret" not in resolved.warnings[0]
    config.chmod(0o600)
    assert resolve_server(profile="s", env={}, config_path=config).warnings == []


def test_importing_the_driver_pulls_in_nothing_heavy():
    code = (
        "import sys, charforge.driver, charforge.driver.cli; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'PIL', 'comfy') "
        "or m.startswith(('charforge.nodes', 'charforge.engine'))]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rich_and_plain_renderers_draw_a_job():
    prompt = {
        "1": {"class_type": "EmptyImage", "_meta": {"title": "Blank"}},
        "2": {"class_type": "KSampler", "_meta": {"title": "Sampler"}},
    }
    events = [
        Event("submitted", {}, "p"),
        Event("execution_start", {}, "p"),
        Event("executing", {"node": "1"}, "p"),
        Event("executing", {"node": "2"}, "p"),
        Event("progress", {"value": 3, "max": 3, "node": "2"}, "p"),
        Event("execution_success", {}, "p"),
        Event("finished", {}, "p"),
    ]
    for mode in ("rich", "plain", "json"):
        view = JobView(prompt, ["1", "2"])
        err, out = io.StringIO(), io.StringIO()
        renderer = make_renderer(mode, view, stdout=out, stderr=err)
        renderer.start()
        for event in events:
            renderer.handle(event)
        renderer.close()
        assert view.done == {"1", "2"} and view.state == "finished"
        if mode == "json":
            assert [json.loads(line)["event"] for line in out.getvalue().splitlines()][0] == "submitted"
        else:
            assert "Sampler" in err.getvalue() or mode == "rich"
    failed = JobView(prompt, ["1", "2"])
    for event in [
        Event("executing", {"node": "1"}, "p"),
        Event("execution_error", {"node_id": "1"}, "p"),
        Event("executing", {"node": None}, "p"),
    ]:
        failed.update(event)
    assert failed.state == "failed" and failed.done == set()
