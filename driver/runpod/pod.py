"""ComfyUI on a RunPod pod: reach it, wait until it answers, keep the socket alive, and run the pod's lifecycle.

* **Address.** ``runpod-pod:POD_ID`` goes through RunPod's HTTPS proxy, ``https://POD_ID-8188.proxy.runpod.net``
  (no API key needed). With ``runpod: {connect: tcp}`` the pod's public IP and the TCP port mapped to 8188 are
  read from the API instead (plain http/ws, no 100 s limit; the mapping changes whenever the pod restarts).
* **Readiness.** A pod shown as running is not yet a ComfyUI that answers: the proxy says 502 while nothing
  listens, and 524 when a request got no answer within 100 s. :func:`wait_ready` polls ``/system_stats``
  and treats 502/503/504/524 and connection errors as "not ready yet", reporting progress as it goes.
* **Long silent nodes.** The proxy drops WebSockets idle for ~100 s and ComfyUI sends nothing during a long
  node. The client pings every ``keepalive`` seconds (30 by default), reconnects with the same client id when
  dropped anyway, and polls ``/history`` (the source of truth) so a silent hour-long training node never
  breaks the wait: all of that is :class:`~charforge.driver.client.AsyncComfyClient`; here we only choose a
  ping interval below the proxy's idle limit.
* **Lifecycle** (optional, :class:`PodSession`): create from an image or template with a GPU type, or
  start/resume a stopped pod; wait until RUNNING and ready; run; then stop, terminate or keep it as
  configured (``on_finish``) — always, in a ``finally``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..batch.targets import ComfyTarget
from ..client.async_client import AsyncComfyClient
from ..client.models import Timeout
from ..config import RunPodSettings, ServerConfig, ServerURL, runpod_proxy_url
from ..errors import ConfigError, DriverError, ServerError, ServerUnavailable
from ..secrets import mask
from .api import Pod, RunPodAPI

log = logging.getLogger("charforge.driver.runpod")

COMFY_PORT = 8188
PROXY_IDLE_LIMIT = 100.0  # seconds: RunPod's proxy (Cloudflare) drops idle sockets, answers 524
DEFAULT_KEEPALIVE = 30.0  # WebSocket ping interval, well below the idle limit
NOT_READY_STATUSES = (502, 503, 504, 520, 521, 522, 523, 524)
ON_FINISH = ("keep", "stop", "terminate")

Message = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


async def pod_address(
    settings: RunPodSettings, *, api: RunPodAPI | None = None, pod: Pod | None = None
) -> str:
    """The ComfyUI base URL of a pod: its proxy URL, or ``http://IP:PORT`` from its TCP mapping
    (``runpod: {connect: tcp}``)."""
    options = settings.options
    port = int(options.get("port", COMFY_PORT))
    mode = str(options.get("connect", "proxy")).lower()
    if mode == "proxy":
        return runpod_proxy_url(settings.id, port, settings.proxy_template)
    if mode != "tcp":
        raise ConfigError(f"runpod.connect must be 'proxy' or 'tcp', not {mode!r}")
    if pod is None:
        if api is None:
            raise ConfigError(
                "connect: tcp needs the RunPod API (set RUNPOD_API_KEY) to read the port mapping"
            )
        pod = await api.get_pod(settings.id)
    public = pod.port_mappings.get(str(port))
    if not pod.public_ip or public is None:
        raise ConfigError(
            f"pod {settings.id} exposes no public TCP port for {port} (ports: {pod.ports or 'none'}, "
            f"mappings: {pod.port_mappings or 'none'}); add '{port}/tcp' to the pod's ports or use "
            "connect: proxy"
        )
    return f"http://{pod.public_ip}:{public}"


async def wait_ready(
    url: str | ServerConfig,
    *,
    timeout: float = 900.0,
    interval: float = 5.0,
    on_message: Message = _quiet,
    request_timeout: float = 30.0,
) -> dict[str, Any]:
    """Poll ``GET /system_stats`` until ComfyUI answers 200; returns its answer.

    502/503/504/524 (the proxy has nothing to talk to yet, or ComfyUI hangs while it starts) and connection
    errors mean "not ready"; 401/403 are raised at once. Raises :class:`ServerUnavailable` after ``timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    started = loop.time()
    last_reason = None
    async with AsyncComfyClient(
        url, timeout=Timeout(connect=10.0, read=request_timeout), retries=0
    ) as client:
        while True:
            try:
                stats = await client.system_stats()
                on_message(f"ComfyUI at {client.url} is ready after {loop.time() - started:.0f} s")
                return stats
            except ServerUnavailable as exc:
                reason = _short_reason(exc)
            except ServerError as exc:
                if exc.status not in NOT_READY_STATUSES:
                    raise
                reason = f"HTTP {exc.status}" + (
                    " (the proxy timed out waiting for ComfyUI)" if exc.status == 524 else ""
                )
            if reason != last_reason:
                on_message(f"waiting for ComfyUI at {client.url}: {reason} ({loop.time() - started:.0f} s)")
                last_reason = reason
            if loop.time() >= deadline:
                raise ServerUnavailable(
                    f"ComfyUI at {client.url} did not become ready within {timeout:g} s (last: "
                    f"{reason}); check the pod's logs in the RunPod console"
                )
            await asyncio.sleep(min(interval, max(0.0, deadline - loop.time())))


def _short_reason(exc: BaseException) -> str:
    text = mask(str(exc))  # masked before it is cut
    if "HTTP 502" in text:
        return "HTTP 502 (nothing listens on the port yet: the pod is booting or ComfyUI is starting)"
    if "HTTP 503" in text or "HTTP 504" in text:
        return mask(text.split(": ", 1)[-1], limit=120)
    return mask(text, limit=160)


class PodSession:
    """One run's use of a pod: bring it up (create or start), wait until ComfyUI answers, and afterwards stop,
    terminate or keep it (``on_finish``), whatever happened in between.

    ``started_at``/``ended_at`` bracket the time the pod was running for this session (boot and idle
    included), which is what the pod bills; :meth:`cost` prices it.
    """

    def __init__(
        self,
        settings: RunPodSettings,
        *,
        api: RunPodAPI | None = None,
        on_message: Message = _quiet,
        ready_timeout: float | None = None,
        poll_interval: float | None = None,
    ) -> None:
        self.settings = settings
        options = settings.options
        self.on_finish = str(options.get("on_finish", "keep")).lower()
        if self.on_finish not in ON_FINISH:
            raise ConfigError(
                f"runpod.on_finish must be one of {', '.join(ON_FINISH)}, not {self.on_finish!r}"
            )
        self.api = api
        self._own_api = False
        self.on_message = on_message
        self.ready_timeout = float(ready_timeout or options.get("ready_timeout", 900))
        self.poll_interval = float(poll_interval or options.get("ready_interval", 5))
        self.pod: Pod | None = None
        self.url: str | None = None
        self.price_per_hour: float | None = (
            float(options["price_per_hour"]) if options.get("price_per_hour") is not None else None
        )
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.we_started = False

    def _api(self) -> RunPodAPI | None:
        if self.api is None and self.settings.api_key:
            self.api = RunPodAPI(self.settings.api_key, base_url=self.settings.api_url)
            self._own_api = True
        return self.api

    @property
    def pod_id(self) -> str:
        return self.pod.id if self.pod else self.settings.id

    async def start(self) -> str:
        """Create/start the pod as configured and wait until ComfyUI answers; returns its base URL."""
        api = self._api()
        create = self.settings.options.get("create")
        # The clock starts now: boot (when we start the pod) and idle time are part of this run's bill; time
        # the pod ran before we came is not.
        if self.started_at is None:  # a retried start keeps the first start time
            self.started_at = time.time()
        if api is not None:
            if self.settings.id in ("", "new") and isinstance(create, dict):
                self.pod = await self._create(api, create)
            else:
                self.pod = await api.get_pod(self.settings.id)
                if self.pod.status in ("EXITED", "STOPPED"):
                    self.on_message(f"starting stopped pod {self.pod.id} ...")
                    await api.pod_action(self.pod.id, "start")
                    self.we_started = True
                elif self.pod.status == "TERMINATED":
                    raise ConfigError(
                        f"pod {self.pod.id} is terminated; create a new one (charforge runpod pod create ...)"
                    )
            self.pod = await self._wait_running(api)
            if self.price_per_hour is None:
                self.price_per_hour = self.pod.cost_per_hr
        else:
            self.on_message("no RUNPOD_API_KEY: not managing the pod, only waiting for its ComfyUI")
        url = await pod_address(self.settings, api=api, pod=self.pod)
        await wait_ready(
            url, timeout=self.ready_timeout, interval=self.poll_interval, on_message=self.on_message
        )
        self.url = url
        return url

    async def _create(self, api: RunPodAPI, create: dict[str, Any]) -> Pod:
        if not create.get("gpu"):
            raise ConfigError("runpod.create needs a gpu (see 'charforge runpod gpus' for ids)")
        pod = await api.create_pod(
            name=str(create.get("name") or "charforge"),
            gpu=str(create["gpu"]),
            image=create.get("image"),
            template=create.get("template"),
            gpu_count=int(create.get("gpu_count", 1)),
            cloud=str(create.get("cloud", "SECURE")),
            disk_gb=int(create.get("disk_gb", 50)),
            volume_gb=create.get("volume_gb"),
            ports=create.get("ports"),
            env=create.get("env"),
            network_volume=create.get("network_volume"),
        )
        self.we_started = True
        self.settings.id = pod.id
        self.on_message(f"created pod {pod.id} ({create['gpu']})")
        return pod

    async def _wait_running(self, api: RunPodAPI) -> Pod:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        last = None
        while True:
            pod = await api.get_pod(self.pod_id)
            if pod.status == "RUNNING":
                return pod
            if pod.status in ("TERMINATED", "ERROR"):
                raise ServerUnavailable(f"pod {pod.id} is {pod.status}; see its logs in the RunPod console")
            if pod.status != last:
                self.on_message(f"pod {pod.id}: {pod.status}")
                last = pod.status
            if loop.time() >= deadline:
                raise ServerUnavailable(f"pod {pod.id} was still {pod.status} after {self.ready_timeout:g} s")
            await asyncio.sleep(self.poll_interval)

    async def finish(self) -> str:
        """Stop, terminate or keep the pod (``on_finish``); returns what was done. Never raises for a failed
        stop: it reports it (the pod keeps billing, so the message says so)."""
        self.ended_at = time.time()
        action = self.on_finish
        api = self._api()
        try:
            if action == "keep" or api is None:
                if action != "keep":
                    self.on_message(
                        f"cannot {action} pod {self.pod_id} without RUNPOD_API_KEY; it keeps running"
                    )
                return "kept"
            await api.pod_action(self.pod_id, action)
            self.on_message(f"pod {self.pod_id}: {action} requested")
            return {"stop": "stopped", "terminate": "terminated"}[action]
        except DriverError as exc:
            self.on_message(
                f"warning: could not {action} pod {self.pod_id} ({exc}); it may still be running "
                "and billing: check 'charforge runpod pods'"
            )
            return "failed"
        finally:
            await self.close_api()

    async def close_api(self) -> None:
        """Close the API connection this session opened (before using the session from another event loop)."""
        if self._own_api and self.api is not None:
            await self.api.close()
            self.api = None

    def wall_seconds(self, now: float | None = None) -> float | None:
        if self.started_at is None:
            return None
        return max(0.0, (self.ended_at or now or time.time()) - self.started_at)

    def cost(self, now: float | None = None) -> float | None:
        """Hourly price × the session's wall time (boot and idle included)."""
        seconds = self.wall_seconds(now)
        if seconds is None or self.price_per_hour is None:
            return None
        return seconds * self.price_per_hour / 3600.0


class PodTarget(ComfyTarget):
    """A pod's ComfyUI as a batch target: a :class:`~charforge.driver.batch.targets.ComfyTarget` whose client pings
    below the proxy's idle limit, plus the pod's lifecycle around the batch (:class:`PodSession`).

    ``name`` is ``runpod-pod:POD_ID`` whatever the address (proxy or TCP mapping), so a resumed batch finds
    its jobs again after the pod restarted with a new mapping.
    """

    def __init__(
        self,
        settings: RunPodSettings,
        *,
        capacity: int | None = None,
        preflight: bool = True,
        poll_interval: float = 2.0,
        keepalive: float | None = None,
        on_message: Message = _quiet,
        api: RunPodAPI | None = None,
        manage: bool = True,
    ) -> None:
        self.settings = settings
        self.keepalive = float(keepalive or settings.options.get("keepalive", DEFAULT_KEEPALIVE))
        self.poll_interval = poll_interval
        self.session = PodSession(settings, api=api, on_message=on_message) if manage else None
        url = runpod_proxy_url(
            settings.id, int(settings.options.get("port", COMFY_PORT)), settings.proxy_template
        )
        super().__init__(
            url,
            capacity=int(capacity or settings.options.get("capacity", 2)),
            preflight=preflight,
            client=self._make_client(url),
        )
        self.name = settings.server
        self.on_message = on_message

    def _make_client(self, url: str) -> AsyncComfyClient:
        config = ServerConfig(ServerURL.parse(url)[0])
        return AsyncComfyClient(config, ping_interval=self.keepalive, poll_interval=self.poll_interval)

    def __repr__(self) -> str:
        return f"PodTarget({self.name!r}, capacity={self.capacity})"

    async def open(self) -> None:
        """Bring the pod up (managed) or wait for its ComfyUI. After a failed ``open``, ``close`` still stops or
        terminates the pod as configured (the batch runner always closes its targets); a retried ``open``
        picks up where the failed one stopped."""
        if self.session is not None:
            url = self.session.url or await self.session.start()
        else:
            url = await pod_address(self.settings)
            await wait_ready(url, on_message=self.on_message)
        if url.rstrip("/") != self.client.url.rstrip("/"):
            await self.client.close()
            self.client = self._make_client(url)
        await self.client.object_info()

    async def close(self) -> None:
        try:
            await self.client.close()
        finally:
            if (
                self.session is not None
                and self.session.started_at is not None
                and self.session.ended_at is None
            ):
                await self.session.finish()

    @property
    def price_per_hour(self) -> float | None:
        if self.session is not None and self.session.price_per_hour is not None:
            return self.session.price_per_hour
        value = self.settings.options.get("price_per_hour")
        return float(value) if value is not None else None

    def price_cost(self, seconds: float) -> float | None:
        """``seconds`` of pod time at its hourly price."""
        price = self.price_per_hour
        return None if price is None else max(0.0, float(seconds)) * price / 3600.0

    def cost(self, seconds: float) -> float | None:
        """What the batch cost on this pod (the batch summary's hook). A managed pod bills every second it
        runs, busy or not, so this is the whole session (:meth:`session_cost`: boot and idle included) and
        ``seconds`` (the jobs' busy time) only counts for a pod we did not start."""
        session = self.session_cost()
        return session if session is not None else self.price_cost(seconds)

    def session_cost(self) -> float | None:
        """What the pod cost for this batch: hourly price × wall time from start to finish (boot and idle
        included), None when the pod was not managed or has no price."""
        return self.session.cost() if self.session is not None else None
