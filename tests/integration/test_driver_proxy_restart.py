"""Opt-in: the driver survives a proxy in front of a real ComfyUI dropping out mid-run (issue 3).

A small asyncio TCP proxy (loopback, in this file) sits between the driver and a real ComfyUI (``--cpu``,
built-in nodes only, no models). A job that runs several seconds is submitted through the proxy, then:

* the proxy is killed mid-run (every connection aborted, the port closed), stays down ~2 s and is restarted
  on the same port: the driver must still report completion, with every output downloaded;
* only the WebSocket is cut, and new WebSocket connections are refused until the job is over, while plain
  HTTP keeps working: completion must come from the history alone.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (COMFYUI_PYTHON: its Python, default its venv).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cf_testing.real_comfyui import (
    RunningComfyUI,
    comfyui_dir,
    comfyui_python,
    free_port,
    slow_workflow,
    start_comfyui,
    suite_marks,
)
from charforge.driver.client import ComfyClient

pytestmark = suite_marks()

JOB_TIMEOUT = 45.0  # the driver's wall-clock limit for each job
SIDE, BATCH, SCALES = 1024, 3, 8  # about 7 s on 2 CPU cores (ImageScale lanczos runs PIL per image)


# ---- a TCP proxy that can be killed and restarted ---------------------------------------------------------------


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    websocket: bool = False

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


@dataclass
class TcpProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:upstream_port, in its own event-loop thread."""

    port: int
    upstream_port: int
    block_websockets: bool = False
    websocket_refusals: int = 0
    connections_seen: int = 0
    _conns: set[_Conn] = field(default_factory=set)
    _server: asyncio.AbstractServer | None = None

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-proxy", daemon=True)
        self._thread.start()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(
                self._handle, "127.0.0.1", self.port, reuse_address=True
            )

        self._call(start())

    def kill(self) -> None:
        """Stop listening and abort every connection, as a crashing proxy would."""

        async def kill() -> None:
            assert self._server is not None
            self._server.close()
            for conn in list(self._conns):
                conn.abort()
            self._conns.clear()
            await self._server.wait_closed()
            self._server = None

        self._call(kill())

    def cut_websockets(self, *, block: bool) -> int:
        """Abort the WebSocket connections only (HTTP keeps flowing); ``block`` refuses new ones."""

        async def cut() -> int:
            self.block_websockets = block
            victims = [c for c in self._conns if c.websocket]
            for conn in victims:
                conn.abort()
                self._conns.discard(conn)
            return len(victims)

        return self._call(cut())

    def close(self) -> None:
        if self._server is not None:
            self.kill()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_seen += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        conn = _Conn(writer, up_writer)
        self._conns.add(conn)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    # aiohttp may send the upgrade on a kept-alive connection: look at every request start.
                    if from_client and not conn.websocket and data.startswith(b"GET /ws"):
                        conn.websocket = True
                        if self.block_websockets:
                            self.websocket_refusals += 1
                            break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                conn.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        finally:
            self._conns.discard(conn)


# Outside the ephemeral range, so nothing else takes the port while the proxy is down.
PROXY_PORTS = range(8900, 9000)


# ---- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningComfyUI]:
    comfy = comfyui_dir()
    assert comfy is not None and (comfy / "main.py").exists(), f"COMFYUI_DIR={comfy} has no main.py"
    running = start_comfyui(comfy, tmp_path_factory.mktemp("comfy-proxy"), comfyui_python(comfy))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def proxy(server: RunningComfyUI) -> Iterator[TcpProxy]:
    upstream = int(server.url.rsplit(":", 1)[1])
    running = TcpProxy(free_port(PROXY_PORTS), upstream)
    running.start()
    try:
        yield running
    finally:
        running.close()


def _slow_job(color: int) -> dict:
    return slow_workflow(color, SIDE, BATCH, SCALES, "proxy/run")


def _fresh_color() -> int:
    return (time.time_ns() // 1000) & 0xFFFFFF  # a new color per job, so ComfyUI's cache runs it for real


def _check_result(
    server: RunningComfyUI, client: ComfyClient, result, out: Path, disrupted_at: float
) -> None:
    entry = server.get(f"/history/{result.prompt_id}")[result.prompt_id]  # straight from the server
    assert entry["status"]["status_str"] == "success"
    stamps = {kind: data["timestamp"] / 1000 for kind, data in entry["status"]["messages"]}
    # The disruption really happened while the job ran on the server.
    assert stamps["execution_start"] < disrupted_at < stamps["execution_success"], (stamps, disrupted_at)
    expected = sorted(image["filename"] for image in entry["outputs"]["99"]["images"])
    assert len(expected) == BATCH
    assert sorted(f.filename for f in result.files) == expected
    files = client.download_outputs(result, out)
    assert sorted(f.path.name for f in files) == expected
    for f in files:
        data = f.path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and f.size == len(data)
        assert int.from_bytes(data[16:20], "big") == SIDE * (2 if SCALES % 2 else 1)


# ---- tests --------------------------------------------------------------------------------------------------------


def test_proxy_killed_and_restarted_mid_run(server, proxy, tmp_path):
    started = time.monotonic()
    events = []
    with ComfyClient(proxy.url) as client:
        job = client.submit(_slow_job(_fresh_color()))
        watch = client.watch(job, timeout=JOB_TIMEOUT)
        killed_at = None
        for event in watch:
            events.append(event)
            if killed_at is None and event.type == "executing" and event.node == "3":
                proxy.kill()
                killed_at = time.time()
                time.sleep(2.0)  # the driver keeps going in its own thread meanwhile
                proxy.start()
        assert killed_at is not None, [e.type for e in events]
        result = watch.result
        assert result is not None and result.prompt_id == job.prompt_id
        _check_result(server, client, result, tmp_path / "out", killed_at)
    kinds = [e.type for e in events]
    assert "connection_lost" in kinds and kinds[-1] == "finished"
    assert proxy.connections_seen > 2  # the driver came back through the restarted proxy
    assert time.monotonic() - started < JOB_TIMEOUT


def test_websocket_cut_while_http_keeps_working(server, proxy, tmp_path):
    started = time.monotonic()
    events = []
    with ComfyClient(proxy.url) as client:
        job = client.submit(_slow_job(_fresh_color()))
        watch = client.watch(job, timeout=JOB_TIMEOUT)
        cut_at = None
        for event in watch:
            events.append(event)
            if cut_at is None and event.type == "executing" and event.node == "3":
                assert proxy.cut_websockets(block=True) == 1  # and refuse new ones until the job is over
                cut_at = time.time()
        assert cut_at is not None, [e.type for e in events]
        result = watch.result
        assert result is not None
        # No message could tell the driver the job ended: the WebSocket stayed refused, the history said it.
        kinds = [e.type for e in events]
        after_cut = kinds[kinds.index("connection_lost") :]
        assert "reconnected" not in after_cut and "execution_success" not in after_cut
        assert after_cut[-1] == "finished" and proxy.websocket_refusals >= 1
        proxy.block_websockets = False
        _check_result(server, client, result, tmp_path / "out", cut_at)
    assert time.monotonic() - started < JOB_TIMEOUT
