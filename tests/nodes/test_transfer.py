"""CharForge's transfer routes (nodes/transfer.py) over HTTP: every way out of their folders refused (the
rules of ComfyUI's /view), oversize bodies and unsupported types refused, files served with Range, models
listed with cached checksums, and models fetched by the server itself (resumed, a wrong checksum refused)."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fakes.charforge_routes import transfer_server
from fakes.comfy_server import png_bytes
from fakes.file_server import FileServer

PNG = png_bytes(4, 4, (10, 20, 30))
SHA = hashlib.sha256(PNG).hexdigest()


@pytest.fixture
def server(comfy_env):
    with transfer_server(comfy_env) as fake:
        (fake.root / "secret.txt").write_text("not for you")
        runs = fake.output_dir / "charforge" / "train_runs" / "alice"
        runs.mkdir(parents=True)
        (runs / "alice.safetensors").write_bytes(b"lora" * 1000)
        (runs / "loss.png").write_bytes(PNG)
        (runs / "out").symlink_to(fake.root)  # a link out of CharForge's folder
        (runs / ".hidden").write_text("bookkeeping")
        yield fake


def _call(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _put(server, dataset: str, name: str, body: bytes, *, size=None, sha=None, offset=0, raw=False):
    from urllib.parse import quote

    path = name if raw else quote(name, safe="/")
    url = (
        f"{server.url}/charforge/transfer/inputs/{dataset if raw else quote(dataset)}/files/{path}?size={len(body) if size is None else size}"
        f"&sha256={sha or hashlib.sha256(body).hexdigest()}&offset={offset}"
    )
    status, body, _ = _call(url, "PUT", body)
    return status, json.loads(body or b"null")


@pytest.mark.parametrize(
    "name",
    [
        "../escape.png",
        "a/../../escape.png",
        "/abs.png",
        "a\\b.png",
        ".hidden.png",
        "sub/.uploads/x.png",
        "%2e%2e/escape.png",
    ],
)
def test_upload_names_outside_the_folder_are_refused(server, name):
    status, answer = _put(server, "pip", name, PNG, raw=name.startswith("%"))
    assert status in (400, 403, 404), (name, status, answer)
    assert not list(server.root.rglob("escape.png"))


def test_upload_refuses_types_sizes_and_bad_bytes(server, monkeypatch):
    from charforge.nodes import transfer

    assert _put(server, "pip", "run.exe", b"MZ")[0] == 415
    assert _put(server, "pip", "fake.png", b"not a png")[0] == 415  # complete, but not a PNG
    status, answer = _put(server, "pip", "a.png", PNG, sha="0" * 64)
    assert status == 422 and "sha256" in answer["error"]
    assert _put(server, "pip", "huge.png", PNG[:4], size=10**12)[0] == 413
    assert _put(server, "bad%20name!", "a.png", PNG, raw=True)[0] == 400
    monkeypatch.setattr(transfer, "MAX_CHUNK", 16)
    assert _put(server, "pip", "a.png", PNG)[0] == 413  # the body is larger than one chunk may be
    assert not (server.input_dir / "charforge" / "pip" / "a.png").exists()


def test_chunk_at_the_wrong_offset_answers_the_servers_offset(server):
    assert _put(server, "pip", "a.png", PNG[:20], size=len(PNG), sha=SHA) == (200, {"received": 20})
    status, answer = _put(server, "pip", "a.png", PNG[40:], size=len(PNG), sha=SHA, offset=40)
    assert status == 409 and answer["received"] == 20
    status, answer = _put(server, "pip", "a.png", PNG[20:], size=len(PNG), sha=SHA, offset=20)
    assert status == 200 and answer["complete"]
    assert (server.input_dir / "charforge" / "pip" / "a.png").read_bytes() == PNG
    status, body, _ = _call(f"{server.url}/charforge/transfer/inputs/pip")
    listing = json.loads(body)
    assert listing["files"] == {"a.png": {"size": len(PNG), "sha256": SHA}} and listing["partial"] == {}


def test_outputs_served_only_from_charforges_folder_with_range(server):
    base = f"{server.url}/charforge/transfer/outputs"
    status, body, _ = _call(f"{base}/index/train_runs/alice")
    index = json.loads(body)
    assert status == 200 and sorted(index["files"]) == [
        "train_runs/alice/alice.safetensors",
        "train_runs/alice/loss.png",
    ]
    lora = index["files"]["train_runs/alice/alice.safetensors"]
    assert lora["sha256"] == hashlib.sha256(b"lora" * 1000).hexdigest()
    status, body, _ = _call(
        f"{base}/files/train_runs/alice/alice.safetensors", headers={"Range": "bytes=3996-"}
    )
    assert status == 206 and body == b"lora"
    for path in (
        "files/train_runs/alice/out/secret.txt",
        "files/../secret.txt",
        "files/train_runs/alice/.hidden",
        "files/%2e%2e/secret.txt",
        "index/train_runs/alice/out",
        "files//etc/passwd",
        "index/..",
    ):
        status, body, _ = _call(f"{base}/{path}")
        assert status in (400, 403, 404), path
        assert b"not for you" not in body


def test_models_listed_with_hashes_and_loras_served(server):
    loras = server.root / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / "alice.safetensors").write_bytes(b"L" * 64)
    status, body, _ = _call(f"{server.url}/charforge/transfer/models?kinds=loras,checkpoints")
    models = json.loads(body)["models"]
    assert models["checkpoints"] == [] and models["loras"][0]["name"] == "alice.safetensors"
    assert models["loras"][0]["sha256"] is None  # not hashed until asked: a checkpoint takes a while
    status, body, _ = _call(f"{server.url}/charforge/transfer/models?kinds=loras&hash=1")
    assert json.loads(body)["models"]["loras"][0]["sha256"] == hashlib.sha256(b"L" * 64).hexdigest()
    status, body, _ = _call(f"{server.url}/charforge/transfer/models?kinds=loras")
    assert json.loads(body)["models"]["loras"][0]["sha256"] is not None  # cached from now on
    assert _call(f"{server.url}/charforge/transfer/models/loras/files/alice.safetensors")[1] == b"L" * 64
    assert _call(f"{server.url}/charforge/transfer/models/loras/files/../../secret.txt")[0] == 404
    assert _call(f"{server.url}/charforge/transfer/models?kinds=nope")[0] == 400


def _wait_downloads(server, key: str) -> dict:
    for _ in range(200):
        status, body, _ = _call(f"{server.url}/charforge/transfer/models/downloads")
        state = json.loads(body)["downloads"].get(key, {})
        if state.get("state") in ("done", "failed"):
            return state
        time.sleep(0.05)
    raise AssertionError("download did not finish")


def test_server_downloads_a_model_resumed_and_checked(server, tmp_path):
    data = bytes(range(256)) * 400
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "tiny.safetensors").write_bytes(data)
    host = FileServer(tmp_path / "hub")
    try:
        target = server.root / "models" / "checkpoints" / "tiny.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        Path(str(target) + ".part").write_bytes(data[:30_000])  # an earlier attempt that stopped
        entry = {
            "name": "tiny.safetensors",
            "kind": "checkpoints",
            "url": host.url("tiny.safetensors"),
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        status, body, _ = _call(
            f"{server.url}/charforge/transfer/models/download",
            "POST",
            json.dumps({"models": [entry]}).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 202
        assert _wait_downloads(server, "checkpoints/tiny.safetensors")["state"] == "done"
        assert target.read_bytes() == data
        assert host.requests == [("/tiny.safetensors", "bytes=30000-")]

        wrong = dict(entry, name="wrong.safetensors", sha256="1" * 64)
        _call(
            f"{server.url}/charforge/transfer/models/download",
            "POST",
            json.dumps({"models": [wrong]}).encode(),
            {"Content-Type": "application/json"},
        )
        state = _wait_downloads(server, "checkpoints/wrong.safetensors")
        assert state["state"] == "failed" and "sha256" in state["error"]
        assert not list(target.parent.glob("wrong.safetensors*"))
    finally:
        host.close()
