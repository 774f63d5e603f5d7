"""RunPod pods against the loopback fake: proxy readiness (502/524), keepalive under the idle limit, silent
nodes, dropped sockets, TCP mapping, lifecycle and cost.

Times are scaled down: the proxy's 100 s response timeout and idle limit are 1 s here, so a 3 s silent node
stands for a 5-minute one (both are 3x the limit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.comfy_server import FakeComfyServer, image_workflow, wait_workflow
from fakes.runpod_api import FakeRunPod, RunPodKnobs

from charforge.driver.batch.targets import JobSpec
from charforge.driver.config import resolve_runpod, resolve_server
from charforge.driver.errors import ConfigError, ServerUnavailable
from charforge.driver.runpod import PodSession, PodTarget, RunPodAPI, pod_address, wait_ready

SCALE = 100.0  # real seconds per test second


@pytest.fixture
def runpod(fake_comfy: FakeComfyServer) -> Iterator[FakeRunPod]:
    knobs = RunPodKnobs(proxy_timeout=100 / SCALE, ws_idle_timeout=100 / SCALE)
    with FakeRunPod(knobs=knobs, default_upstream=fake_comfy) as fake:
        yield fake


def settings_for(runpod: FakeRunPod, pod_id: str = "pod1", **options):
    settings = resolve_runpod(f"runpod-pod:{pod_id}", env=runpod.env(), config_path=Path("/nonexistent"))
    assert settings is not None
    settings.options.update({"ready_interval": 0.05, **options})
    return settings


def test_server_string_resolves_to_the_proxy(runpod: FakeRunPod) -> None:
    config = resolve_server("runpod-pod:abc123", env={}, config_path=Path("/nonexistent"))
    assert str(config.url) == "https://abc123-8188.proxy.runpod.net/"
    assert config.url.ws("c1") == "wss://abc123-8188.proxy.runpod.net/ws?clientId=c1"
    with pytest.raises(ConfigError, match="serverless"):
        resolve_server("runpod-serverless:ep1", env={}, config_path=Path("/nonexistent"))
    with pytest.raises(ConfigError, match="bad RunPod id"):
        resolve_runpod("runpod-pod:a/b?c", env={}, config_path=Path("/nonexistent"))


def test_profile_with_runpod_section(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "runpod: {api_key_env: MY_RP_KEY}\n"
        "profiles:\n"
        "  gpu:\n"
        "    runpod: {pod: xyz789, connect: tcp, on_finish: stop, price_per_hour: 0.5}\n"
        "  sls:\n"
        "    server: runpod-serverless:ep9\n"
        "    runpod: {price_per_second: 0.0002}\n",
        encoding="utf-8",
    )
    env = {"MY_RP_KEY": "k-abcdef"}
    pod = resolve_runpod("gpu", env=env, config_path=cfg)
    assert (pod.kind, pod.id, pod.options["connect"], pod.options["on_finish"]) == (
        "pod",
        "xyz789",
        "tcp",
        "stop",
    )
    assert pod.api_key.reveal() == "k-abcdef" and "k-abcdef" not in repr(pod)
    sls = resolve_runpod(None, profile="sls", env=env, config_path=cfg)
    assert (sls.kind, sls.id, sls.options["price_per_second"]) == ("serverless", "ep9", 0.0002)
    assert resolve_runpod("http://127.0.0.1:8188", env=env, config_path=cfg) is None


def test_readiness_waits_through_boot_502_and_524(runpod: FakeRunPod, fake_comfy: FakeComfyServer) -> None:
    runpod.knobs.boot_seconds = 0.2
    runpod.knobs.comfy_start_seconds = 0.3
    runpod.knobs.hang_requests = 1
    runpod.add_pod("pod1", fake_comfy)
    messages: list[str] = []
    session = PodSession(settings_for(runpod, on_finish="stop"), on_message=messages.append)

    async def go() -> str:
        try:
            return await session.start()
        finally:
            await session.finish()

    url = asyncio.run(go())
    assert url.endswith("/proxy/pod1-8188")
    text = "\n".join(messages)
    assert "starting stopped pod pod1" in text and "STARTING" in text
    assert "HTTP 502" in text and "HTTP 524" in text and "is ready" in text
    assert runpod.proxy_502 >= 1 and runpod.proxy_524 == 1
    assert runpod.pods["pod1"].status == "EXITED"


def test_readiness_gives_up_with_a_clear_message(runpod: FakeRunPod, fake_comfy: FakeComfyServer) -> None:
    runpod.add_pod("pod1", fake_comfy)  # stopped: the proxy answers 502 forever

    async def go() -> None:
        await wait_ready(runpod.proxy_template.format(pod_id="pod1", port=8188), timeout=0.3, interval=0.05)

    with pytest.raises(ServerUnavailable, match="did not become ready within 0.3 s"):
        asyncio.run(go())


@pytest.mark.parametrize("keepalive", [0.3, 5.0])
def test_silent_node_behind_the_proxy_timeout(
    runpod: FakeRunPod, fake_comfy: FakeComfyServer, keepalive: float
) -> None:
    """A node silent for 3x the proxy's limit (5 min vs 100 s for real). With pings below the idle limit the
    socket survives; with pings above it the proxy drops it, and reconnects + history polling still finish."""
    runpod.add_pod("pod1", fake_comfy, running=True)
    target = PodTarget(settings_for(runpod, keepalive=keepalive), poll_interval=0.5, manage=False)

    async def go():
        await target.open()
        try:
            prompt_id = await target.submit(
                await target.prepare(JobSpec(wait_workflow(seconds=3.0, steps=1))), None
            )
            return await target.wait(prompt_id, 30)
        finally:
            await target.close()

    result = asyncio.run(go())
    assert result.values[0].values["text"] == ["done"]
    if keepalive < runpod.knobs.ws_idle_timeout:
        assert runpod.ws_drops == 0
    else:
        assert runpod.ws_drops >= 1


def test_dropped_socket_mid_run(runpod: FakeRunPod, fake_comfy: FakeComfyServer, tmp_path: Path) -> None:
    fake_comfy.knobs.drop_socket_on = "executing"
    fake_comfy.knobs.node_seconds = 0.1
    runpod.add_pod("pod1", fake_comfy, running=True)
    target = PodTarget(settings_for(runpod, keepalive=0.3), poll_interval=0.5, manage=False)

    async def go():
        await target.open()
        try:
            prompt_id = await target.submit(await target.prepare(JobSpec(image_workflow())), None)
            result = await target.wait(prompt_id, 30)
            return await target.download(result, tmp_path)
        finally:
            await target.close()

    files = asyncio.run(go())
    assert len(files) == 1 and files[0].path.read_bytes().startswith(b"\x89PNG")
    assert len([c for c in fake_comfy.ws_connects]) >= 2  # reconnected with ...
    assert len({c.query["clientId"] for c in fake_comfy.ws_connects}) == 1  # ... the same client id


def test_tcp_mapping(runpod: FakeRunPod, fake_comfy: FakeComfyServer) -> None:
    runpod.add_pod("pod1", fake_comfy, running=True, ports=["8188/http", "8188/tcp"])
    runpod.add_pod("pod2", fake_comfy, running=True)

    async def go() -> tuple[str, str | None]:
        async with RunPodAPI(runpod.api_key, base_url=runpod.api_url) as api:
            direct = await pod_address(settings_for(runpod, connect="tcp"), api=api)
            try:
                await pod_address(settings_for(runpod, "pod2", connect="tcp"), api=api)
            except ConfigError as exc:
                return direct, str(exc)
        return direct, None

    direct, error = asyncio.run(go())
    assert direct == f"http://127.0.0.1:{fake_comfy.port}"
    assert error and "8188/tcp" in error


def test_lifecycle_create_run_terminate_and_cost(runpod: FakeRunPod, fake_comfy: FakeComfyServer) -> None:
    runpod.knobs.boot_seconds = 0.2
    create = {"gpu": "NVIDIA GeForce RTX 4090", "image": "runpod/comfyui:latest", "name": "cf-test"}
    settings = settings_for(runpod, "new", create=create, on_finish="terminate", keepalive=0.3)
    target = PodTarget(settings, poll_interval=0.5)

    async def go():
        await target.open()
        try:
            prompt_id = await target.submit(await target.prepare(JobSpec(wait_workflow(seconds=0.3))), None)
            await target.wait(prompt_id, 30)
        finally:
            await target.close()

    asyncio.run(go())
    (pod,) = runpod.pods.values()
    assert (
        pod.status == "TERMINATED"
        and pod.image == "runpod/comfyui:latest"
        and target.name == "runpod-pod:new"
    )
    assert target.price_per_hour == pytest.approx(runpod.gpu_price("NVIDIA GeForce RTX 4090"))
    # hourly price x wall time, boot and idle included: the same bill as the fake's (the two clocks start and stop
    # at the two ends of each API call, so allow a second of a busy machine's scheduling on top of 5 %)
    per_second = target.price_per_hour / 3600
    assert target.session_cost() == pytest.approx(runpod.pod_cost(pod.id), rel=0.05, abs=per_second)
    assert target.session.wall_seconds() >= 0.2


def test_pod_is_stopped_even_when_the_run_fails(runpod: FakeRunPod, fake_comfy: FakeComfyServer) -> None:
    runpod.add_pod("pod1", fake_comfy)
    target = PodTarget(settings_for(runpod, on_finish="stop", keepalive=0.3), poll_interval=0.5)

    async def go() -> None:
        await target.open()
        try:
            raise RuntimeError("the batch blew up")
        finally:
            await target.close()

    with pytest.raises(RuntimeError):
        asyncio.run(go())
    assert runpod.pods["pod1"].status == "EXITED"
    assert runpod.pods["pod1"].running_since is None


def test_failed_open_still_stops_the_pod_on_close(runpod: FakeRunPod, fake_comfy: FakeComfyServer) -> None:
    runpod.knobs.comfy_start_seconds = 30.0  # ComfyUI never comes up in time
    runpod.add_pod("pod1", fake_comfy)
    target = PodTarget(settings_for(runpod, on_finish="stop", ready_timeout=0.3), poll_interval=0.5)

    async def go() -> None:
        try:
            await target.open()
        finally:
            await target.close()

    with pytest.raises(ServerUnavailable, match="did not become ready"):
        asyncio.run(go())
    assert runpod.pods["pod1"].status == "EXITED" and target.session_cost() is not None
