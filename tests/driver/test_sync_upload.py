"""Photo folders up (driver/sync/uploads.py against nodes/transfer.py on a loopback server): content-addressed,
chunked, resumed after a dropped connection with each byte range written once, through a RunPod pod's proxy
with its response limit scaled down."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from fakes.charforge_routes import transfer_server
from fakes.comfy_server import png_bytes
from fakes.cutting_proxy import CuttingProxy

from charforge.driver.client.async_client import AsyncComfyClient
from charforge.driver.errors import ServerUnavailable
from charforge.driver.sync import upload_folder


def _photos(folder: Path, sizes: dict[str, int]) -> dict[str, bytes]:
    """PNG files of about the given sizes (a valid header, then padding) and one caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, size in sizes.items():
        data = png_bytes(4, 4, (len(name) * 20 % 255, 10, 10))
        data += hashlib.sha256(name.encode()).digest() * ((size - len(data)) // 32 + 1)
        (folder / name).write_bytes(data[:size])
        (folder / name).with_suffix(".txt").write_text(f"sks, photo of {name}")
        made[name] = data[:size]
    return made


@pytest.fixture
def server(comfy_env):
    with transfer_server(comfy_env) as fake:
        yield fake


@pytest.fixture
def writes(monkeypatch):
    """Every (sha256, offset, length) the server wrote into a partial upload."""
    from charforge.engine.transfer.uploads import UploadStore

    seen: list[tuple[str, int, int]] = []
    original = UploadStore.open_chunk

    def open_chunk(self, item, offset, length):
        handle = original(self, item, offset, length)
        real_write = handle.write
        position = [offset]

        class Recorder:
            def write(self, data):
                seen.append((item.sha256, position[0], len(data)))
                position[0] += len(data)
                return real_write(data)

            def close(self):
                handle.close()

        return Recorder()

    monkeypatch.setattr(UploadStore, "open_chunk", open_chunk)
    return seen


def _upload(url: str, folder: Path, dataset: str = "pip", **options):
    async def go():
        async with AsyncComfyClient(url, retries=0) as client:
            return await upload_folder(client, folder, dataset, **options)

    return asyncio.run(go())


def test_folder_up_then_only_changes(server, tmp_path, writes):
    photos = _photos(tmp_path / "photos", {"a.png": 3000, "b.png": 5000, "c.png": 1000})
    first = _upload(server.url, tmp_path / "photos", chunk=1024)
    assert sorted(first.sent) == ["a.png", "a.txt", "b.png", "b.txt", "c.png", "c.txt"]
    folder = Path(first.folder)
    assert folder == (server.input_dir / "charforge" / "pip").resolve()
    for name, data in photos.items():
        assert (folder / name).read_bytes() == data
    assert (folder / "a.txt").read_text() == "sks, photo of a.png"
    assert first.bytes_sent == sum(p.stat().st_size for p in (tmp_path / "photos").iterdir())

    again = _upload(server.url, tmp_path / "photos", chunk=1024)
    assert again.sent == [] and again.bytes_sent == 0 and len(again.unchanged) == 6

    changed = png_bytes(4, 4, (1, 2, 3)) + b"\0" * 100
    (tmp_path / "photos" / "b.png").write_bytes(changed)
    (tmp_path / "photos" / "c.png").unlink()
    third = _upload(server.url, tmp_path / "photos", chunk=1024)
    assert third.sent == ["b.png"] and third.bytes_sent == len(changed)
    assert third.removed == ["c.png"]
    assert (folder / "b.png").read_bytes() == changed and not (folder / "c.png").exists()


def test_dropped_connection_resumes_each_byte_range_once(server, tmp_path, writes):
    data = _photos(tmp_path / "photos", {"big.png": 200_000})["big.png"]
    (tmp_path / "photos" / "big.txt").unlink()
    proxy = CuttingProxy(server.port)
    try:
        proxy.arm(64 * 1024 + 30_000)  # the line drops in the middle of the second chunk's body
        report = _upload(proxy.url, tmp_path / "photos", chunk=50_000)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert report.sent == ["big.png"]
    assert (Path(report.folder) / "big.png").read_bytes() == data
    sha = hashlib.sha256(data).hexdigest()
    ranges = sorted((offset, length) for s, offset, length in writes if s == sha)
    # contiguous and never overlapping: every byte written exactly once although the connection dropped
    position = 0
    for offset, length in ranges:
        assert offset == position
        position += length
    assert position == len(data)


def test_partial_upload_left_by_a_dead_client_is_resumed(server, tmp_path, writes):
    data = _photos(tmp_path / "photos", {"x.png": 120_000})["x.png"]
    sha = hashlib.sha256(data).hexdigest()
    partial = server.input_dir / "charforge" / ".uploads" / f"{sha}.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:70_000])
    report = _upload(server.url, tmp_path / "photos", chunk=40_000)
    assert report.bytes_sent == len(data) - 70_000 + len(b"sks, photo of x.png")
    assert min(offset for s, offset, _ in writes if s == sha) == 70_000
    assert (Path(report.folder) / "x.png").read_bytes() == data


def test_through_the_pod_proxy_chunks_fit_its_response_limit(comfy_env, tmp_path):
    from fakes.runpod_api import FakeRunPod

    _photos(tmp_path / "photos", {"p.png": 60_000})
    with transfer_server(comfy_env) as upstream, FakeRunPod() as runpod:
        runpod.knobs.proxy_timeout = 1.0  # RunPod: 100 s
        runpod.knobs.uplink_bytes_per_second = 40_000.0  # a 60 kB request would need 1.5 s
        runpod.add_pod("pod1", upstream, running=True)
        url = runpod.proxy_template.format(pod_id="pod1", port=8188)
        with pytest.raises(ServerUnavailable, match="524|proxy"):
            _upload(url, tmp_path / "photos", chunk=60_000, retries=1)
        report = _upload(url, tmp_path / "photos", chunk=16_000)
    assert "p.png" in report.sent
    assert runpod.proxy_524 >= 2


def _safetensors(path: Path, payload: bytes) -> bytes:
    """A minimal safetensors file: the 8-byte header length, a JSON header, the bytes."""
    header = b'{"__metadata__": {"format": "pt"}}'
    data = len(header).to_bytes(8, "little") + header + payload
    path.write_bytes(data)
    return data


def test_a_lora_goes_up_into_the_loras_folder_in_chunks_once_and_never_replaces_another(server, tmp_path):
    from charforge.driver.errors import ServerError
    from charforge.driver.sync import upload_lora

    def up(path: Path, **options):
        async def go():
            async with AsyncComfyClient(server.url, retries=0) as client:
                return await upload_lora(client, path, **options)

        return asyncio.run(go())

    lora = tmp_path / "zqx-abc.safetensors"
    data = _safetensors(lora, b"w" * 5000)
    sent = up(lora, chunk=1024)
    placed = server.root / "models" / "loras" / lora.name
    assert placed.read_bytes() == data and sent["sent"] == len(data)
    assert up(lora)["sent"] == 0  # the server has it (same sha256): nothing sent
    _safetensors(lora, b"x" * 5000)  # another file of the same name is refused, the first one stays
    with pytest.raises(ServerError, match="not replaced"):
        up(lora)
    assert placed.read_bytes() == data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ServerError, match="content is not"):
        up(bad)
    assert not (server.root / "models" / "loras" / "bad.safetensors").exists()
