"""RunPod's management API (REST v2, ``https://api.runpod.io/v2``): pods, GPU catalog, serverless endpoints.

Only what CharForge uses: create a pod (from an image or a template, with a GPU type), start/stop/terminate
it, read it (status, hourly cost, public IP and TCP port mappings), list pods, list GPU types with prices and
read a serverless endpoint's GPU types. The key comes from ``$RUNPOD_API_KEY`` or the config file (see
:func:`charforge.driver.config.runpod_api_key`) and is only ever sent as a Bearer header.

REST v2 is the current API (REST v1 ``rest.runpod.io/v1`` retired on 2026-11-15). Field names are read
tolerantly: v2 ``status`` or v1 ``desiredStatus``, lists bare or wrapped (``{"pods": [...]}``), prices as
numbers or strings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..client.http import parse_time
from ..config import RUNPOD_API_URL, Secret
from ..errors import ConfigError, ServerError
from .http import RunPodHTTP

#: pod states in which the container may run and bill; EXITED = stopped (volume kept), TERMINATED = gone
POD_RUNNING_STATES = ("PROVISIONING", "STARTING", "RUNNING")


def _number(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


@dataclass
class GpuType:
    """A GPU type of the catalog; prices in USD per GPU-hour (None when RunPod does not offer it there)."""

    id: str
    display_name: str
    memory_gb: float | None = None
    secure_price: float | None = None
    community_price: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> GpuType:
        return cls(
            id=str(data.get("id") or data.get("gpuId") or ""),
            display_name=str(data.get("displayName") or data.get("name") or data.get("id") or ""),
            memory_gb=_number(data.get("memoryInGb") or data.get("memory")),
            secure_price=_number(data.get("securePrice")),
            community_price=_number(data.get("communityPrice")),
            raw=data,
        )

    def hourly_price(self, cloud: str = "SECURE") -> float | None:
        """Price per GPU-hour in the given cloud (falls back to the other cloud's price)."""
        first, second = (
            (self.community_price, self.secure_price)
            if cloud.upper() == "COMMUNITY"
            else (self.secure_price, self.community_price)
        )
        return first if first is not None else second


@dataclass
class Pod:
    """The parts of a pod CharForge reads."""

    id: str
    name: str
    status: str
    cost_per_hr: float | None = None
    gpu_id: str | None = None
    gpu_count: int = 1
    public_ip: str | None = None
    port_mappings: dict[str, int] = field(default_factory=dict)
    ports: list[str] = field(default_factory=list)
    last_started_at: float | None = None
    image: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Pod:
        gpu = data.get("gpu")
        if not isinstance(gpu, dict):
            gpu = {}
        mappings = data.get("portMappings") or {}
        if not isinstance(mappings, dict):
            mappings = {}
        ports = data.get("ports") or []
        if isinstance(ports, str):
            ports = [p.strip() for p in ports.split(",") if p.strip()]
        status = str(data.get("status") or data.get("desiredStatus") or "UNKNOWN").upper()
        cost = _number(data.get("adjustedCostPerHr")) or _number(data.get("costPerHr"))
        return cls(
            id=str(data.get("id")),
            name=str(data.get("name") or ""),
            status=status,
            cost_per_hr=cost,
            gpu_id=gpu.get("id") or data.get("gpuTypeId"),
            gpu_count=int(gpu.get("count") or data.get("gpuCount") or 1),
            public_ip=data.get("publicIp") or None,
            port_mappings={str(k): int(v) for k, v in mappings.items()},
            ports=list(ports),
            last_started_at=parse_time(data.get("lastStartedAt")),
            image=data.get("image"),
            raw=data,
        )

    @property
    def running(self) -> bool:
        return self.status in POD_RUNNING_STATES

    def uptime(self, now: float | None = None) -> float | None:
        """Seconds since the pod last started (None when stopped or unknown)."""
        if not self.running or self.last_started_at is None:
            return None
        return max(0.0, (now or time.time()) - self.last_started_at)


@dataclass
class EndpointInfo:
    """A serverless endpoint's configuration (which GPU types its workers use)."""

    id: str
    name: str
    gpu_type_ids: list[str]
    workers_max: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> EndpointInfo:
        gpus = data.get("gpuTypeIds") or data.get("gpuIds") or []
        if isinstance(gpus, str):
            gpus = [g.strip() for g in gpus.split(",") if g.strip()]
        return cls(
            id=str(data.get("id")),
            name=str(data.get("name") or ""),
            gpu_type_ids=list(gpus),
            workers_max=data.get("workersMax"),
            raw=data,
        )


def _items(data: Any, key: str) -> list[dict[str, Any]]:
    if isinstance(data, dict):
        data = data.get(key, data.get("data", []))
    if not isinstance(data, list):
        raise ServerError(f"RunPod answered {type(data).__name__} where a list of {key} was expected")
    return [d for d in data if isinstance(d, dict)]


class RunPodAPI:
    """Async client of RunPod's REST v2 management API (``async with RunPodAPI(key) as api: ...``)."""

    def __init__(
        self, api_key: Secret | str | None, *, base_url: str = RUNPOD_API_URL, http: RunPodHTTP | None = None
    ) -> None:
        if not api_key:
            raise ConfigError(
                "no RunPod API key: set RUNPOD_API_KEY (create one at "
                "https://www.runpod.io/console/user/settings), or name the variable with "
                "'runpod: {api_key_env: NAME}' in the config file"
            )
        self.base_url = base_url.rstrip("/")
        self.http = http or RunPodHTTP(api_key, what="the RunPod API")

    async def __aenter__(self) -> RunPodAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.close()

    def _url(self, path: str) -> str:
        return f"{self.base_url}/v2/{path.lstrip('/')}"

    # ---- catalog --------------------------------------------------------------------------------------------

    async def gpu_types(self) -> list[GpuType]:
        _, data = await self.http.request("GET", self._url("catalog/gpus"))
        return [GpuType.from_api(d) for d in _items(data, "gpus")]

    async def gpu_type(self, gpu_id: str) -> GpuType | None:
        for gpu in await self.gpu_types():
            if gpu.id == gpu_id or gpu.display_name == gpu_id:
                return gpu
        return None

    # ---- pods -------------------------------------------------------------------------------------------------

    async def list_pods(self) -> list[Pod]:
        _, data = await self.http.request("GET", self._url("pods"))
        return [Pod.from_api(d) for d in _items(data, "pods")]

    async def get_pod(self, pod_id: str) -> Pod:
        _, data = await self.http.request("GET", self._url(f"pods/{pod_id}"))
        if not isinstance(data, dict):
            raise ServerError(f"RunPod answered {data!r} for pod {pod_id}")
        return Pod.from_api(data)

    async def create_pod(
        self,
        *,
        name: str,
        gpu: str,
        image: str | None = None,
        template: str | None = None,
        gpu_count: int = 1,
        cloud: str = "SECURE",
        disk_gb: int = 50,
        volume_gb: int | None = None,
        ports: list[str] | None = None,
        env: dict[str, str] | None = None,
        network_volume: str | None = None,
    ) -> Pod:
        """Create (and start) a pod. Exactly one of ``image`` and ``template`` is required. Never retried:
        a lost answer raises :class:`~charforge.driver.runpod.http.SubmitOutcomeUnknown` (check
        ``charforge runpod pods`` before creating another)."""
        if bool(image) == bool(template):
            raise ConfigError("a pod needs exactly one of image (e.g. runpod/comfyui:latest) and template")
        body: dict[str, Any] = {"disk": int(disk_gb), "ports": ["8188/http", "22/tcp"], "env": {}}
        if template:
            # v2 has no templateId on create: the template's container settings are spread into the body.
            _, data = await self.http.request("GET", self._url(f"templates/{template}"))
            if not isinstance(data, dict) or not data.get("image"):
                raise ServerError(f"template {template} has no image")
            body.update(
                {
                    k: data[k]
                    for k in ("image", "args", "disk", "ports", "env", "registry")
                    if data.get(k) is not None
                }
            )
        else:
            body["image"] = image
        body.update(name=name, gpu={"id": gpu, "count": int(gpu_count)}, cloud=cloud.upper())
        if ports:
            body["ports"] = list(ports)
        if env:
            body["env"] = {**body.get("env", {}), **env}
        if network_volume:
            body["mounts"] = {"network": {"id": network_volume}}
        elif volume_gb:
            body["mounts"] = {"persistent": {"sizeGb": int(volume_gb)}}
        _, data = await self.http.request("POST", self._url("pods"), json_body=body, creates=True)
        return Pod.from_api(data or {})

    async def pod_action(self, pod_id: str, action: str) -> Pod | None:
        """``start`` (resume), ``stop``, ``restart`` or ``terminate``."""
        if action not in ("start", "stop", "restart", "terminate"):
            raise ConfigError(f"unknown pod action {action!r}")
        _, data = await self.http.request(
            "POST", self._url(f"pods/{pod_id}/action"), json_body={"action": action}
        )
        return Pod.from_api(data) if isinstance(data, dict) and data.get("id") else None

    # ---- serverless -------------------------------------------------------------------------------------------

    async def endpoint(self, endpoint_id: str) -> EndpointInfo:
        _, data = await self.http.request("GET", self._url(f"serverless/endpoints/{endpoint_id}"))
        if not isinstance(data, dict):
            raise ServerError(f"RunPod answered {data!r} for endpoint {endpoint_id}")
        return EndpointInfo.from_api(data)
