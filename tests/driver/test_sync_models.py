"""Models in place (driver/sync/models.py): a manifest checked before anything is queued, missing models
named, and missing ones fetched by the server from a local HTTP host with a wrong checksum refused."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from fakes.charforge_routes import transfer_server
from fakes.file_server import FileServer

from charforge.common.transfer import ModelEntry, parse_model_manifest
from charforge.driver.client.async_client import AsyncComfyClient
from charforge.driver.sync import MissingModels, check_models, provision_models, require_models

DATA = b"weights" * 5000


@pytest.fixture
def server(comfy_env):
    with transfer_server(comfy_env) as fake:
        checkpoints = fake.root / "models" / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / "base.safetensors").write_bytes(b"base")
        yield fake


@pytest.fixture
def host(tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "mm.safetensors").write_bytes(DATA)
    server = FileServer(tmp_path / "hub")
    yield server
    server.close()


def _run(url, coro_fn):
    async def go():
        async with AsyncComfyClient(url, retries=0) as client:
            return await coro_fn(client)

    return asyncio.run(go())


def test_missing_model_named_before_queueing(server):
    manifest = parse_model_manifest(
        {
            "models": [
                {"name": "base.safetensors", "kind": "checkpoints", "size": 4},
                {
                    "name": "mm.safetensors",
                    "kind": "animatediff_models",
                    "repo": "guoyww/animatediff",
                    "file": "mm.ckpt",
                },
                {"name": "other.safetensors", "kind": "checkpoints", "size": 10},
            ]
        }
    )
    check = _run(server.url, lambda c: check_models(c, manifest))
    assert [e.name for e in check.present] == ["base.safetensors"]
    with pytest.raises(MissingModels) as caught:
        require_models(check, server.url)
    message = str(caught.value)
    assert "animatediff_models/mm.safetensors" in message and "checkpoints/other.safetensors" in message
    assert "base.safetensors" not in message


def test_size_or_checksum_that_differs_is_named(server):
    entry = ModelEntry("base.safetensors", "checkpoints", sha256=hashlib.sha256(b"other").hexdigest())
    check = _run(server.url, lambda c: check_models(c, [entry], verify=True))
    assert not check.ok and "sha256" in check.describe()
    check = _run(
        server.url, lambda c: check_models(c, [ModelEntry("base.safetensors", "checkpoints", size=5)])
    )
    assert "4 bytes on the server" in check.describe()


def test_server_fetches_missing_models_and_refuses_a_wrong_checksum(server, host):
    good = ModelEntry(
        "mm.safetensors",
        "animatediff_models",
        url=host.url("mm.safetensors"),
        size=len(DATA),
        sha256=hashlib.sha256(DATA).hexdigest(),
    )
    seen = []
    check = _run(server.url, lambda c: provision_models(c, [good], poll=0.05, on_progress=seen.append))
    assert (
        check.ok and (server.root / "models" / "animatediff_models" / "mm.safetensors").read_bytes() == DATA
    )
    assert seen

    bad = ModelEntry("bad.safetensors", "animatediff_models", url=host.url("mm.safetensors"), sha256="2" * 64)
    with pytest.raises(MissingModels, match="sha256") as caught:
        _run(server.url, lambda c: provision_models(c, [bad], poll=0.05))
    assert caught.value.missing == [bad]
    assert not list((server.root / "models" / "animatediff_models").glob("bad*"))


def test_manifest_entries_are_checked():
    with pytest.raises(ValueError, match="kind"):
        parse_model_manifest([{"name": "x.safetensors", "kind": "nowhere"}])
    with pytest.raises(ValueError, match="relative"):
        parse_model_manifest([{"name": "../x.safetensors", "kind": "loras"}])
    with pytest.raises(ValueError, match="http"):
        parse_model_manifest([{"name": "x.safetensors", "kind": "loras", "url": "file:///etc/passwd"}])
    entry = parse_model_manifest(
        [{"name": "x.safetensors", "kind": "loras", "repo": "a/b", "file": "x.safetensors"}]
    )[0]
    assert entry.source_url() == "https://huggingface.co/a/b/resolve/main/x.safetensors"


def test_tiny_demo_models_written_by_the_server(server, monkeypatch):
    from charforge.driver.errors import DriverError
    from charforge.driver.sync import provision_tiny
    from charforge.engine import tiny

    written = []

    def fake_write(models_dir, parts, say=None):
        written.append((str(models_dir), list(parts)))
        if "clip" in parts:
            raise OSError("disk full")

    monkeypatch.setattr(tiny, "write_tiny_models", fake_write)
    _run(server.url, lambda c: provision_tiny(c, ["sd15", "motion"], poll=0.05))
    assert written == [(str(server.root / "models"), ["sd15", "motion"])]
    with pytest.raises(DriverError, match="disk full"):
        _run(server.url, lambda c: provision_tiny(c, ["clip"], poll=0.05))


HF_SECRET = "hf_CharForgeTestToken0123456789"


def test_gated_hub_file_fetched_with_the_drivers_token_and_never_shown(server, tmp_path, monkeypatch, caplog):
    """A gated file on the hub (``HF_ENDPOINT`` pointed at a loopback host that answers 401 without the bearer
    token): refused without a token with the fix named; fetched with the driver's ``HF_TOKEN``, which goes to
    the hub only (not along its redirect to the CDN host), is kept in no download state and appears in no
    message."""
    (tmp_path / "cdn").mkdir()
    (tmp_path / "cdn" / "blob").write_bytes(DATA)
    (tmp_path / "hub").mkdir()
    cdn = FileServer(tmp_path / "cdn")
    hub = FileServer(
        tmp_path / "hub",
        token=HF_SECRET,
        redirects={"/org/gated/resolve/main/g.safetensors": cdn.url("blob")},
    )
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.port}")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        entry = ModelEntry(
            "g.safetensors",
            "checkpoints",
            repo="org/gated",
            file="g.safetensors",
            size=len(DATA),
            sha256=hashlib.sha256(DATA).hexdigest(),
        )
        with pytest.raises(MissingModels, match="gated or private.*HF_TOKEN"):
            _run(server.url, lambda c: provision_models(c, [entry], poll=0.05))
        assert hub.authorizations == [None] and not cdn.requests

        monkeypatch.setenv("HF_TOKEN", HF_SECRET)
        states = []
        with caplog.at_level("DEBUG"):
            check = _run(
                server.url, lambda c: provision_models(c, [entry], poll=0.05, on_progress=states.append)
            )
        assert check.ok
        assert (server.root / "models" / "checkpoints" / "g.safetensors").read_bytes() == DATA
        assert hub.authorizations[-1] == f"Bearer {HF_SECRET}"
        assert cdn.authorizations == [None]  # the redirect to another host carries no token
        shown = (
            repr(states)
            + caplog.text
            + repr(_run(server.url, lambda c: c._request("GET", "/charforge/transfer/models/downloads")))
        )
        assert HF_SECRET not in shown

        # a wrong token: refused, the reason says so, the token is not in it
        (server.root / "models" / "checkpoints" / "g.safetensors").unlink()
        with pytest.raises(MissingModels) as caught:
            _run(
                server.url,
                lambda c: provision_models(c, [entry], poll=0.05, token="hf_wrong_token_value_123"),
            )
        assert "not accepted" in str(caught.value) and "hf_wrong_token_value_123" not in str(caught.value)
    finally:
        hub.close()
        cdn.close()


def test_token_never_sent_in_the_clear_to_another_machine(monkeypatch):
    from charforge.driver.sync.models import _token_for

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    hub_entry = [ModelEntry("a.safetensors", "checkpoints", repo="o/r", file="a.safetensors")]
    other = [ModelEntry("b.safetensors", "checkpoints", url="https://example.com/b.safetensors")]

    class Client:
        def __init__(self, url):
            self.url = url

    assert _token_for(Client("https://pod-8188.proxy.runpod.net"), hub_entry, HF_SECRET).reveal() == HF_SECRET
    assert _token_for(Client("http://127.0.0.1:8188"), hub_entry, HF_SECRET) is not None
    assert _token_for(Client("http://10.0.0.5:8188"), hub_entry, HF_SECRET) is None  # plain http elsewhere
    assert _token_for(Client("https://pod-8188.proxy.runpod.net"), other, HF_SECRET) is None  # not the hub
    assert _token_for(Client("https://pod-8188.proxy.runpod.net"), hub_entry, "") is None
