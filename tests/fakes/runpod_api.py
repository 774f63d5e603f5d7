"""A loopback fake of RunPod for driver tests: the management API, the pod HTTPS proxy and serverless endpoints
running worker-comfyui, each reproducing the documented behaviour (``docs/ecosystem.md`` §5-§8,
docs/runpod.md) with configurable time limits so tests take seconds.

One aiohttp server on 127.0.0.1 serves three roots:

* ``/v2/...`` - REST v2 management API: ``catalog/gpus`` (prices), ``pods`` (create with ``name``, ``image`` and
  a ``gpu``; get; list), ``templates/{id}``, ``pods/{id}/action`` (start/stop/restart/terminate),
  ``DELETE pods/{id}``, ``serverless/endpoints/{id}``. Bearer API key required (401 otherwise).
* ``/proxy/{POD_ID}-{PORT}/...`` - the pod proxy in front of a :class:`FakeComfyServer`: 502 while the pod is
  stopped or still booting, 524 when the upstream sends no response within ``proxy_timeout`` (100 s for real),
  WebSockets bridged and dropped after ``ws_idle_timeout`` seconds without a frame in either direction (pings
  count as traffic, as through Cloudflare).
* ``/sls/{ENDPOINT_ID}/...`` - a queue-based serverless endpoint whose worker behaves like worker-comfyui:
  ``/run`` (10 MB body limit), ``/runsync``, ``/status/{id}``, ``/cancel/{id}``, ``/health``; states IN_QUEUE
  -> IN_PROGRESS -> COMPLETED | FAILED | CANCELLED | TIMED_OUT with ``delayTime``/``executionTime``; inputs
  ``{"workflow", "images": [{"name", "image"}]}`` uploaded into the ComfyUI it fronts; outputs in the new
  (``images: [{filename, type, data}]``) or the old (``message``) schema, as base64 or S3 URLs served under
  ``/s3/``; only ``images`` outputs come back (no video/gifs/audio), no progress.

Knobs (:class:`RunPodKnobs`) add 429 storms, lost ``/run`` answers, cold starts and boot phases. Every request
is recorded; billing is tracked per pod (hourly price x running time) and per job (execution time).

(Over 600 lines on purpose: the three roots share the pods, endpoints, billing and request record of one fake
account, which tests read across them; the serving thread and loop are :mod:`fakes.loopback`'s.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from fakes.loopback import LoopbackServer, history_entry, throttled

MB = 1_000_000
# asyncio.TimeoutError is the builtin TimeoutError only from Python 3.11 on.
_TIMEOUTS: tuple[type[BaseException], ...] = (asyncio.TimeoutError, TimeoutError)


@dataclass
class RunPodKnobs:
    """Behaviour switches, changeable while the fake runs."""

    #: answer the next N requests (any root except /proxy and /s3) with 429
    rate_limit_next: int = 0
    #: Retry-After header on 429 answers (None = no header, as RunPod usually sends)
    retry_after: float | None = None
    #: seconds a started pod stays STARTING before RUNNING
    boot_seconds: float = 0.0
    #: seconds after RUNNING during which the proxy still answers 502 (ComfyUI not listening yet)
    comfy_start_seconds: float = 0.0
    #: the next N proxied HTTP requests hang until the proxy gives up with 524
    hang_requests: int = 0
    #: the proxy's response timeout (RunPod: 100 s) and WebSocket idle limit (Cloudflare: ~100 s)
    proxy_timeout: float = 100.0
    #: the client's uplink through the proxy in bytes per second (None: instant); a request body takes
    #: len(body) / rate seconds of the proxy's response timeout, as a large upload over a slow line does
    uplink_bytes_per_second: float | None = None
    ws_idle_timeout: float = 100.0
    #: /run and /runsync body limits
    run_limit: int = 10 * MB
    runsync_limit: int = 20 * MB
    #: create the job but cut the connection instead of answering, for the next N /run calls
    lose_run_answers: int = 0
    #: seconds a job waits in IN_QUEUE (queue + cold start) before a worker picks it up
    cold_start: float = 0.0
    #: "new" (worker-comfyui >= 5.0) or "old" (<= 4.x, one image in ``message``)
    output_schema: str = "new"
    #: "base64" or "s3_url"
    output_type: str = "base64"
    #: the endpoint's execution timeout in seconds (job ends TIMED_OUT), None = none
    execution_timeout: float | None = None
    #: answer the next N management/serverless requests with ``fail_status`` and this body (``{key}`` is
    #: replaced by the API key the request carried: an API that echoes credentials in its errors)
    fail_next: int = 0
    fail_status: int = 400
    fail_body: str = "{key}"


@dataclass
class FakePod:
    id: str
    name: str
    gpu_id: str
    cost_per_hr: float
    image: str | None
    template_id: str | None
    ports: list[str]
    upstream: Any  # a FakeComfyServer
    status: str = "EXITED"
    boot_until: float = 0.0
    running_since: float | None = None
    billed_seconds: float = 0.0
    last_started_at: float | None = None
    gpu_count: int = 1

    def current_status(self, now: float) -> str:
        if self.status == "RUNNING" and now < self.boot_until:
            return "STARTING"
        return self.status


@dataclass
class FakeJob:
    id: str
    endpoint: str
    input: Any
    created: float
    status: str = "IN_QUEUE"
    started: float | None = None
    finished: float | None = None
    output: Any = None
    error: Any = None
    prompt_id: str | None = None
    task: Any = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started is not None:
            data["delayTime"] = int((self.started - self.created) * 1000)
            end = self.finished if self.finished is not None else time.time()
            data["executionTime"] = int((end - self.started) * 1000)
            data["workerId"] = "fakeworker1"
        if self.output is not None:
            data["output"] = self.output
        if self.error is not None:
            data["error"] = self.error
        return data


@dataclass
class FakeEndpoint:
    id: str
    name: str
    gpu_ids: list[str]
    upstream: Any
    retried: int = 0


DEFAULT_GPUS = [
    {
        "id": "NVIDIA GeForce RTX 4090",
        "displayName": "RTX 4090",
        "memoryInGb": 24,
        "securePrice": 0.69,
        "communityPrice": 0.34,
    },
    {
        "id": "NVIDIA RTX A5000",
        "displayName": "RTX A5000",
        "memoryInGb": 24,
        "securePrice": 0.27,
        "communityPrice": 0.16,
    },
    {
        "id": "NVIDIA H100 80GB HBM3",
        "displayName": "H100 SXM",
        "memoryInGb": 80,
        "securePrice": 2.99,
        "communityPrice": None,
    },
]


class FakeRunPod(LoopbackServer):
    """The fake; ``start()`` runs it in a background thread (or use it as a context manager)."""

    thread_name = "fake-runpod"
    what = "fake RunPod"

    def __init__(
        self,
        *,
        api_key: str = "rp-test-key-123456",
        knobs: RunPodKnobs | None = None,
        gpus: list[dict[str, Any]] | None = None,
        default_upstream: Any = None,
    ) -> None:
        self.api_key = api_key
        self.knobs = knobs or RunPodKnobs()
        self.gpus = [dict(g) for g in (gpus or DEFAULT_GPUS)]
        self.default_upstream = default_upstream
        self.pods: dict[str, FakePod] = {}
        self.endpoints: dict[str, FakeEndpoint] = {}
        #: pod templates (``GET /v2/templates/{id}``): the official ComfyUI one by default
        self.templates: dict[str, dict[str, Any]] = {
            "cw3nka7d08": {
                "id": "cw3nka7d08",
                "name": "ComfyUI",
                "image": "runpod/comfyui:latest",
                "args": "",
                "disk": 50,
                "ports": ["8188/http", "22/tcp", "8080/http"],
                "env": {},
                "registry": None,
            }
        }
        self.jobs: dict[str, FakeJob] = {}
        self.s3: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, answered status)
        self.run_bodies: list[dict[str, Any]] = []  # every /run body that was accepted (a job created)
        self.oversize: list[int] = []  # sizes of /run bodies refused as too large
        self.ws_drops = 0  # sockets the proxy dropped for idleness
        self.proxy_524 = 0
        self.proxy_502 = 0
        self._init_loopback()

    # ---- addresses for the driver ----------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """Base of the management API (the driver appends ``/v2/...``)."""
        return self.url

    @property
    def endpoint_url(self) -> str:
        """Base of the serverless job API (the driver appends ``/{ENDPOINT_ID}/run``...)."""
        return self.url + "/sls"

    @property
    def proxy_template(self) -> str:
        return self.url + "/proxy/{pod_id}-{port}"

    def env(self) -> dict[str, str]:
        """Environment variables pointing the driver at this fake."""
        return {
            "RUNPOD_API_KEY": self.api_key,
            "CHARFORGE_RUNPOD_API_URL": self.api_url,
            "RUNPOD_ENDPOINT_BASE_URL": self.endpoint_url,
            "CHARFORGE_RUNPOD_PROXY": self.proxy_template,
        }

    # ---- set-up helpers ----------------------------------------------------------------------------------

    def gpu_price(self, gpu_id: str) -> float:
        for gpu in self.gpus:
            if gpu["id"] == gpu_id:
                return float(gpu["securePrice"] if gpu["securePrice"] is not None else gpu["communityPrice"])
        raise KeyError(gpu_id)

    def add_pod(
        self,
        pod_id: str,
        upstream: Any,
        *,
        gpu: str = "NVIDIA GeForce RTX 4090",
        running: bool = False,
        cost_per_hr: float | None = None,
        ports: list[str] | None = None,
    ) -> FakePod:
        pod = FakePod(
            pod_id,
            f"pod-{pod_id}",
            gpu,
            cost_per_hr if cost_per_hr is not None else self.gpu_price(gpu),
            "runpod/comfyui:latest",
            None,
            ports or ["8188/http", "22/tcp"],
            upstream,
        )
        self.pods[pod_id] = pod
        if running:
            self._start_pod(pod, boot=False)
        return pod

    def add_endpoint(self, endpoint_id: str, upstream: Any, *, gpu: str = "NVIDIA RTX A5000") -> FakeEndpoint:
        ep = FakeEndpoint(endpoint_id, f"comfy-{endpoint_id}", [gpu], upstream)
        self.endpoints[endpoint_id] = ep
        return ep

    def pod_cost(self, pod_id: str, now: float | None = None) -> float:
        """What the pod has billed so far: hourly price x running seconds (boot and idle included)."""
        pod = self.pods[pod_id]
        seconds = pod.billed_seconds
        if pod.running_since is not None:
            seconds += (now or time.time()) - pod.running_since
        return seconds * pod.cost_per_hr / 3600.0

    def job_cost(self, job_id: str) -> float:
        """Execution seconds x the endpoint GPU's per-second price."""
        job = self.jobs[job_id]
        ep = self.endpoints[job.endpoint]
        ms = job.to_dict().get("executionTime") or 0
        return ms / 1000.0 * self.gpu_price(ep.gpu_ids[0]) / 3600.0

    def _start_pod(self, pod: FakePod, boot: bool = True) -> None:
        now = time.time()
        pod.status = "RUNNING"
        pod.boot_until = now + (self.knobs.boot_seconds if boot else 0.0)
        if pod.running_since is None:
            pod.running_since = now
        pod.last_started_at = now

    def _stop_pod(self, pod: FakePod, status: str) -> None:
        if pod.running_since is not None:
            pod.billed_seconds += time.time() - pod.running_since
            pod.running_since = None
        pod.status = status

    def ready_at(self, pod: FakePod) -> float:
        return pod.boot_until + self.knobs.comfy_start_seconds

    # ---- lifecycle ----------------------------------------------------------------------------------------

    async def _startup(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * MB)
        r = app.router
        r.add_get("/v2/catalog/gpus", self.h_gpus)
        r.add_get("/v2/pods", self.h_list_pods)
        r.add_post("/v2/pods", self.h_create_pod)
        r.add_get("/v2/pods/{pod_id}", self.h_get_pod)
        r.add_delete("/v2/pods/{pod_id}", self.h_delete_pod)
        r.add_post("/v2/pods/{pod_id}/action", self.h_pod_action)
        r.add_get("/v2/serverless/endpoints/{endpoint_id}", self.h_endpoint)
        r.add_get("/v2/templates/{template_id}", self.h_template)
        r.add_post("/sls/{endpoint_id}/run", self.h_run)
        r.add_post("/sls/{endpoint_id}/runsync", self.h_runsync)
        r.add_get("/sls/{endpoint_id}/status/{job_id}", self.h_status)
        r.add_post("/sls/{endpoint_id}/cancel/{job_id}", self.h_cancel)
        r.add_get("/sls/{endpoint_id}/health", self.h_health)
        r.add_get("/s3/{key}", self.h_s3)
        r.add_route("*", "/proxy/{pod_port}/{tail:.*}", self.h_proxy)
        await self._listen(app, client_session=True)

    async def _shutdown(self) -> None:
        await self._cleanup(job.task for job in self.jobs.values())

    # ---- middleware: API key, 429 storms, request log -----------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        managed = path.startswith(("/v2/", "/sls/"))
        status = 0
        try:
            if managed:
                if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                    status = 401
                    return web.json_response({"error": "Unauthorized"}, status=401)
                if self.knobs.fail_next > 0:
                    self.knobs.fail_next -= 1
                    status = self.knobs.fail_status
                    return web.Response(
                        status=status, text=self.knobs.fail_body.replace("{key}", self.api_key)
                    )
                headers = throttled(self.knobs)
                if headers is not None:
                    status = 429
                    return web.json_response({"error": "Too Many Requests"}, status=429, headers=headers)
            response = await handler(request)
            status = response.status
            return response
        finally:
            self.requests.append((request.method, path, status))

    # ---- management API -----------------------------------------------------------------------------------

    async def h_gpus(self, request: web.Request) -> web.Response:
        return web.json_response({"gpus": self.gpus})

    def _pod_json(self, pod: FakePod) -> dict[str, Any]:
        now = time.time()
        status = pod.current_status(now)
        mapping = {}
        if status == "RUNNING" and any(p.endswith("/tcp") and p.startswith("8188") for p in pod.ports):
            mapping = {"8188": pod.upstream.port}
        return {
            "id": pod.id,
            "name": pod.name,
            "status": status,
            "image": pod.image,
            "templateId": pod.template_id,
            "gpu": {"id": pod.gpu_id, "count": pod.gpu_count},
            "costPerHr": pod.cost_per_hr,
            "ports": pod.ports,
            "publicIp": "127.0.0.1" if mapping else None,
            "portMappings": mapping,
            "lastStartedAt": (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(pod.last_started_at)) + "Z")
            if pod.last_started_at
            else None,
        }

    def _problem(self, status: int, title: str, detail: str) -> web.Response:
        return web.json_response({"title": title, "status": status, "detail": detail}, status=status)

    async def h_list_pods(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"pods": [self._pod_json(p) for p in self.pods.values() if p.status != "TERMINATED"]}
        )

    async def h_get_pod(self, request: web.Request) -> web.Response:
        pod = self.pods.get(request.match_info["pod_id"])
        if pod is None:
            return self._problem(404, "Not Found", "pod not found")
        return web.json_response(self._pod_json(pod))

    async def h_create_pod(self, request: web.Request) -> web.Response:
        body = await request.json()
        gpu = (body.get("gpu") or {}).get("id")
        if not any(g["id"] == gpu for g in self.gpus):
            return self._problem(400, "Bad Request", f"unknown gpu {gpu!r}")
        if not body.get("image") or not body.get("name"):
            return self._problem(400, "Bad Request", "name and image are required")
        pod_id = uuid.uuid4().hex[:14]
        price = self.gpu_price(gpu) * int((body.get("gpu") or {}).get("count") or 1)
        pod = FakePod(
            pod_id,
            str(body["name"]),
            gpu,
            price,
            body["image"],
            None,
            list(body.get("ports") or ["8188/http"]),
            self.default_upstream,
            gpu_count=int((body.get("gpu") or {}).get("count") or 1),
        )
        self.pods[pod_id] = pod
        self._start_pod(pod)
        return web.json_response(self._pod_json(pod), status=201)

    async def h_pod_action(self, request: web.Request) -> web.Response:
        pod = self.pods.get(request.match_info["pod_id"])
        if pod is None or pod.status == "TERMINATED":
            return self._problem(404, "Not Found", "pod not found")
        action = (await request.json()).get("action")
        if action in ("start", "restart"):
            self._start_pod(pod)
        elif action == "stop":
            self._stop_pod(pod, "EXITED")
        elif action == "terminate":
            self._stop_pod(pod, "TERMINATED")
        else:
            return self._problem(400, "Bad Request", f"unknown action {action!r}")
        return web.json_response(self._pod_json(pod))

    async def h_delete_pod(self, request: web.Request) -> web.Response:
        pod = self.pods.get(request.match_info["pod_id"])
        if pod is None:
            return self._problem(404, "Not Found", "pod not found")
        self._stop_pod(pod, "TERMINATED")
        return web.Response(status=204)

    async def h_template(self, request: web.Request) -> web.Response:
        template = self.templates.get(request.match_info["template_id"])
        if template is None:
            return self._problem(404, "Not Found", "template not found")
        return web.json_response(template)

    async def h_endpoint(self, request: web.Request) -> web.Response:
        ep = self.endpoints.get(request.match_info["endpoint_id"])
        if ep is None:
            return self._problem(404, "Not Found", "endpoint not found")
        return web.json_response({"id": ep.id, "name": ep.name, "gpuTypeIds": ep.gpu_ids, "workersMax": 3})

    # ---- pod proxy ----------------------------------------------------------------------------------------

    async def h_proxy(self, request: web.Request) -> web.StreamResponse:
        pod_id, _, port = request.match_info["pod_port"].rpartition("-")
        pod = self.pods.get(pod_id)
        now = time.time()
        if pod is None or pod.current_status(now) != "RUNNING" or now < self.ready_at(pod) or port != "8188":
            self.proxy_502 += 1
            return web.Response(
                status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html"
            )
        if self.knobs.hang_requests > 0:
            self.knobs.hang_requests -= 1
            await asyncio.sleep(self.knobs.proxy_timeout)
            self.proxy_524 += 1
            return web.Response(status=524, text="error code: 524")
        tail = request.match_info["tail"]
        upstream = f"http://127.0.0.1:{pod.upstream.port}/{tail}"
        if tail in ("ws", "api/ws") and request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._bridge_ws(request, upstream.replace("http://", "ws://", 1))
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.read()
        session = self._session

        async def forward() -> web.Response:
            if body and self.knobs.uplink_bytes_per_second:
                await asyncio.sleep(len(body) / self.knobs.uplink_bytes_per_second)
            async with session.request(
                request.method,
                upstream,
                params=request.query,
                data=body or None,
                headers=headers,
                allow_redirects=False,
            ) as resp:
                data = await resp.read()
                out_headers = {
                    k: v
                    for k, v in resp.headers.items()
                    if k.lower() in ("content-type", "content-disposition", "retry-after")
                }
                return web.Response(status=resp.status, body=data, headers=out_headers)

        try:
            return await asyncio.wait_for(forward(), self.knobs.proxy_timeout)
        except _TIMEOUTS:
            self.proxy_524 += 1
            return web.Response(status=524, text="error code: 524")
        except aiohttp.ClientError:
            self.proxy_502 += 1
            return web.Response(status=502, text="502 Bad Gateway")

    async def _bridge_ws(self, request: web.Request, upstream: str) -> web.StreamResponse:
        assert self._session is not None
        client = web.WebSocketResponse(autoping=False)
        await client.prepare(request)
        loop = asyncio.get_running_loop()
        last = [loop.time()]
        try:
            up = await self._session.ws_connect(
                upstream + (f"?{request.query_string}" if request.query_string else ""), max_msg_size=0
            )
        except aiohttp.ClientError:
            await client.close()
            return client

        async def client_to_upstream() -> None:
            async for msg in client:
                last[0] = loop.time()
                if msg.type == WSMsgType.PING:
                    await client.pong(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await up.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await up.send_bytes(msg.data)
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    return

        async def upstream_to_client() -> None:
            async for msg in up:
                last[0] = loop.time()
                if msg.type == WSMsgType.TEXT:
                    await client.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await client.send_bytes(msg.data)
                else:
                    return

        async def idle_watch() -> None:
            while True:
                await asyncio.sleep(min(0.05, self.knobs.ws_idle_timeout / 4))
                if loop.time() - last[0] > self.knobs.ws_idle_timeout:
                    self.ws_drops += 1
                    if request.transport is not None:
                        request.transport.abort()  # Cloudflare just drops the connection
                    return

        tasks = [asyncio.ensure_future(c()) for c in (client_to_upstream, upstream_to_client, idle_watch)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await up.close()
            with contextlib.suppress(Exception):
                await client.close()
        return client

    # ---- serverless ----------------------------------------------------------------------------------------

    def _endpoint(self, request: web.Request) -> FakeEndpoint | None:
        return self.endpoints.get(request.match_info["endpoint_id"])

    async def h_run(self, request: web.Request, limit: int | None = None) -> web.StreamResponse:
        ep = self._endpoint(request)
        if ep is None:
            return web.json_response({"error": "endpoint not found"}, status=404)
        raw = await request.read()
        limit = limit or self.knobs.run_limit
        if len(raw) > limit:
            self.oversize.append(len(raw))
            return web.json_response({"error": f"json is invalid; max size is {limit // MB} MB"}, status=413)
        try:
            body = json.loads(raw)
        except ValueError:
            return web.json_response({"error": "json is invalid"}, status=400)
        if not isinstance(body, dict) or "input" not in body:
            return web.json_response({"error": "input is required"}, status=400)
        job = FakeJob(f"{uuid.uuid4()}-u1", ep.id, body["input"], time.time())
        self.jobs[job.id] = job
        self.run_bodies.append(body)
        job.task = asyncio.ensure_future(self._work(ep, job))
        if self.knobs.lose_run_answers > 0:
            self.knobs.lose_run_answers -= 1
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        return web.json_response({"id": job.id, "status": job.status})

    async def h_runsync(self, request: web.Request) -> web.StreamResponse:
        response = await self.h_run(request, self.knobs.runsync_limit)
        if response.status != 200:
            return response
        job = self.jobs[json.loads(response.body)["id"]]  # type: ignore[arg-type]
        with contextlib.suppress(*_TIMEOUTS):
            await asyncio.wait_for(asyncio.shield(job.task), 90)
        return web.json_response(job.to_dict())

    async def h_status(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["job_id"])
        if job is None:
            return web.json_response({"error": "request does not exist"}, status=404)
        return web.json_response(job.to_dict())

    async def h_cancel(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["job_id"])
        if job is None:
            return web.json_response({"error": "request does not exist"}, status=404)
        if job.status in ("IN_QUEUE", "IN_PROGRESS"):
            job.status = "CANCELLED"
            job.finished = time.time()
            if job.task is not None:
                job.task.cancel()
        return web.json_response({"id": job.id, "status": job.status})

    async def h_health(self, request: web.Request) -> web.Response:
        ep = self._endpoint(request)
        if ep is None:
            return web.json_response({"error": "endpoint not found"}, status=404)
        jobs = [j for j in self.jobs.values() if j.endpoint == ep.id]
        count = lambda *s: sum(1 for j in jobs if j.status in s)  # noqa: E731
        running = count("IN_PROGRESS")
        return web.json_response(
            {
                "jobs": {
                    "completed": count("COMPLETED"),
                    "failed": count("FAILED", "TIMED_OUT"),
                    "inProgress": running,
                    "inQueue": count("IN_QUEUE"),
                    "retried": ep.retried,
                },
                "workers": {"idle": 0 if running else 1, "running": running},
            }
        )

    async def h_s3(self, request: web.Request) -> web.Response:
        data = self.s3.get(request.match_info["key"])
        if data is None:
            return web.Response(status=403, text="AccessDenied")
        return web.Response(body=data, content_type="image/png")

    async def _work(self, ep: FakeEndpoint, job: FakeJob) -> None:
        """worker-comfyui's handler: upload images, queue the workflow, wait for the history, return images."""
        assert self._session is not None
        base = f"http://127.0.0.1:{ep.upstream.port}"
        try:
            await asyncio.sleep(self.knobs.cold_start)
            if job.status != "IN_QUEUE":
                return
            job.status = "IN_PROGRESS"
            job.started = time.time()
            work = self._handle(base, job)
            if self.knobs.execution_timeout is not None:
                try:
                    job.output, job.error = await asyncio.wait_for(work, self.knobs.execution_timeout)
                except _TIMEOUTS:
                    job.status, job.finished = "TIMED_OUT", time.time()
                    return
            else:
                job.output, job.error = await work
            job.finished = time.time()
            job.status = "FAILED" if job.error else "COMPLETED"
        except asyncio.CancelledError:
            if job.prompt_id:
                with contextlib.suppress(Exception):
                    await self._session.post(f"{base}/interrupt", json={"prompt_id": job.prompt_id})
            raise

    async def _handle(self, base: str, job: FakeJob) -> tuple[Any, Any]:
        assert self._session is not None
        data = job.input
        if isinstance(data, str):
            data = json.loads(data)
        workflow = data.get("workflow") if isinstance(data, dict) else None
        if not isinstance(workflow, dict):
            return None, "Missing 'workflow' parameter"
        for image in data.get("images") or []:
            raw = str(image.get("image", ""))
            raw = raw.split(",", 1)[1] if raw.startswith("data:") else raw
            form = aiohttp.FormData()
            form.add_field("image", base64.b64decode(raw), filename=str(image.get("name")))
            form.add_field("overwrite", "true")
            async with self._session.post(f"{base}/upload/image", data=form) as resp:
                if resp.status != 200:
                    return None, f"Error uploading image {image.get('name')}"
        job.prompt_id = str(uuid.uuid4())
        async with self._session.post(
            f"{base}/prompt", json={"prompt": workflow, "client_id": "worker", "prompt_id": job.prompt_id}
        ) as resp:
            answer = await resp.json()
            if resp.status != 200:
                details = [
                    f"Node {k}: {e.get('message')}"
                    for k, v in (answer.get("node_errors") or {}).items()
                    for e in v.get("errors", [])
                ]
                return {"details": details or [str(answer.get("error"))]}, "Workflow validation failed"
        entry = await history_entry(self._session, base, job.prompt_id, 0.05)
        status = entry.get("status") or {}
        if status.get("status_str") == "error":
            messages = [m for m in status.get("messages", []) if m[0] == "execution_error"]
            text = messages[0][1].get("exception_message", "") if messages else "unknown"
            return {"details": [text]}, "Job processing failed"
        images: list[dict[str, Any]] = []
        for node_output in (entry.get("outputs") or {}).values():
            for item in node_output.get("images") or []:  # only "images": gifs/video/audio are dropped
                if item.get("type") == "temp":
                    continue
                params = {
                    "filename": item["filename"],
                    "subfolder": item.get("subfolder", ""),
                    "type": item["type"],
                }
                async with self._session.get(f"{base}/view", params=params) as resp:
                    content = await resp.read()
                if self.knobs.output_type == "s3_url":
                    key = f"{job.id}-{item['filename']}"
                    self.s3[key] = content
                    images.append(
                        {"filename": item["filename"], "type": "s3_url", "data": f"{self.url}/s3/{key}"}
                    )
                else:
                    images.append(
                        {
                            "filename": item["filename"],
                            "type": "base64",
                            "data": base64.b64encode(content).decode("ascii"),
                        }
                    )
        if self.knobs.output_schema == "old":
            if not images:
                return {"status": "success", "message": "No images generated"}, None
            return {"status": "success", "message": images[-1]["data"]}, None
        if not images:
            return {"status": "success_no_images", "images": []}, None
        return {"images": images}, None
