"""Results home (driver/sync/results.py): a training run folder and the LoRA downloaded with checksums, a
rerun downloading nothing it has, an interrupted download resumed with Range, a checksum mismatch refused."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from fakes.charforge_routes import lying_checksums, transfer_server

from charforge.driver.client.async_client import AsyncComfyClient
from charforge.driver.errors import ProtocolError
from charforge.driver.sync import download_lora, download_tree

LORA = bytes(range(256)) * 300


@pytest.fixture
def server(comfy_env):
    with transfer_server(comfy_env) as fake:
        run = fake.output_dir / "charforge" / "train_runs" / "pip"
        (run / "samples").mkdir(parents=True)
        (run / "pip.safetensors").write_bytes(LORA)
        (run / "loss.png").write_bytes(b"\x89PNG loss")
        (run / "samples" / "step_000010_0.png").write_bytes(b"\x89PNG sample")
        (run / "status.json").write_text('{"state": "done"}')
        loras = fake.root / "models" / "loras"
        loras.mkdir(parents=True, exist_ok=True)
        (loras / "pip.safetensors").write_bytes(LORA)
        yield fake


def _run(url, coro_fn):
    async def go():
        async with AsyncComfyClient(url, retries=0) as client:
            return await coro_fn(client)

    return asyncio.run(go())


def test_run_folder_and_lora_come_home(server, tmp_path):
    out = tmp_path / "out"
    tree = _run(server.url, lambda c: download_tree(c, "train_runs/pip", out / "lora" / "run"))
    names = sorted(Path(f["path"]).relative_to(out / "lora" / "run").as_posix() for f in tree.files)
    assert names == ["loss.png", "pip.safetensors", "samples/step_000010_0.png", "status.json"]
    assert (out / "lora" / "run" / "pip.safetensors").read_bytes() == LORA
    assert all(f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() for f in tree.files)
    lora = _run(server.url, lambda c: download_lora(c, "pip.safetensors", out / "lora"))
    assert (
        Path(lora["path"]).read_bytes() == (server.root / "models" / "loras" / "pip.safetensors").read_bytes()
    )
    assert lora["downloaded"] and lora["sha256"] == hashlib.sha256(LORA).hexdigest()

    again = _run(server.url, lambda c: download_tree(c, "train_runs/pip", out / "lora" / "run"))
    assert again.bytes_downloaded == 0 and not any(f["downloaded"] for f in again.files)
    assert not _run(server.url, lambda c: download_lora(c, "pip.safetensors", out / "lora"))["downloaded"]


def test_interrupted_download_resumes_with_range(server, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "pip.safetensors.part").write_bytes(LORA[:50_000])
    server.requests.clear()
    tree = _run(server.url, lambda c: download_tree(c, "train_runs/pip", out))
    lora = next(f for f in tree.files if f["path"].endswith("pip.safetensors"))
    assert lora["bytes_received"] == len(LORA) - 50_000
    assert (out / "pip.safetensors").read_bytes() == LORA
    ranged = [r for r in server.requests if r.path.endswith("pip.safetensors")]
    assert ranged[0].headers.get("Range") == "bytes=50000-"


def test_checksum_mismatch_is_refused_and_nothing_kept(server, tmp_path, monkeypatch):
    with lying_checksums(), pytest.raises(ProtocolError, match="sha256"):
        _run(server.url, lambda c: download_tree(c, "train_runs/pip", tmp_path / "run"))
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]


def test_paths_outside_charforges_output_are_refused(server, tmp_path):
    from charforge.driver.errors import ServerError, UsageError

    with pytest.raises(UsageError):
        _run(server.url, lambda c: download_tree(c, "../secret", tmp_path))
    with pytest.raises(ServerError, match="404"):
        _run(server.url, lambda c: download_tree(c, "train_runs/nobody", tmp_path))
