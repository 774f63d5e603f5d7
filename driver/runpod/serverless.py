"""RunPod Serverless endpoints running worker-comfyui: submit through ``/run``, follow ``/status``.

(Over 600 lines on purpose: worker-comfyui's request and output format, the client and the batch target are one
contract with the worker, each part small, and they change together when the worker does.)

What the worker expects and returns (worker-comfyui, facts in docs/runpod.md):

* input ``{"input": {"workflow": <API graph>, "images": [{"name": "x.png", "image": "<base64>"}]}}``; the images
  land in ComfyUI's ``input/`` folder and ``LoadImage`` refers to them by ``name``;
* output since worker 5.0 ``{"images": [{"filename", "type": "base64"|"s3_url", "data"}]}``; before 5.0
  ``{"message": "<base64 or S3 URL>"}`` with one image. Only the ``images`` of ComfyUI's outputs come back:
  video, gifs, audio and text are dropped by the worker, so a workflow whose only outputs are of that kind is
  warned about before it is sent;
* no progress: ``/status`` says ``IN_QUEUE`` / ``IN_PROGRESS`` and finally ``COMPLETED`` / ``FAILED`` /
  ``CANCELLED`` / ``TIMED_OUT`` with ``delayTime`` (queue + cold start) and ``executionTime`` (ms).

Limits: a ``/run`` body may be at most 10 MB (base64 makes files 4/3 larger); it is checked *before* sending.
``/run`` has no idempotency key, so a submission whose answer is lost is never re-sent automatically: it
raises :class:`~charforge.driver.runpod.http.SubmitOutcomeUnknown` and the batch journal records it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import aiohttp

from charforge.common.retry import Backoff
from charforge.common.transfer import OUTPUTS_NODE_CLASS, RECEIPT_PREFIX, STORE_NODE_CLASS

from ..client.http import TIMEOUT_ERRORS
from ..client.models import JobResult, Timings
from ..config import DOWNLOAD_LIMIT_SETTING, RUNPOD_ENDPOINT_URL, Limits, RunPodSettings, Secret, mib
from ..errors import (
    DriverError,
    ExecutionError,
    Interrupted,
    JobLost,
    JobTimeout,
    ProtocolError,
    ServerError,
    ServerUnavailable,
    UsageError,
    WorkflowError,
)
from ..outputs import DownloadedFile, OutputFile, local_path_for, open_unique
from ..secrets import mask
from ..sync.training import TrainedLoRA, bring_training_home, trained_loras
from ..workflow.load import coerce_workflow
from ..workflow.overrides import apply_overrides, parse_input, parse_set, plan_inputs
from .http import RunPodHTTP
from .results import (
    add_fetch_nodes,
    add_outputs_node,
    add_store_nodes,
    dataset_location,
    downloaded_files,
    local_datasets,
    outputs_home,
    receipt,
    results_location,
    stored_receipt,
    stored_summary,
)

if TYPE_CHECKING:
    from ..batch.targets import JobSpec

log = logging.getLogger("charforge.driver.runpod")
#: Fetching a worker output from S3: three tries, 0.5 s then 1 s apart.
_FETCH_RETRY = Backoff(attempts=3, base=0.5, jitter=0.0)

MB = 1_000_000
RUN_LIMIT_BYTES = 10 * MB  # POST /run
RUNSYNC_LIMIT_BYTES = 20 * MB  # POST /runsync (not used: results are kept 1 min only)
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
#: our job model's state for each RunPod job state (404 after the retention time = "expired")
JOB_STATES = {
    "IN_QUEUE": "queued",
    "IN_PROGRESS": "running",
    "RUNNING": "running",
    "COMPLETED": "succeeded",
    "FAILED": "failed",
    "CANCELLED": "cancelled",
    "TIMED_OUT": "expired",
    "GONE": "expired",
}
_LOOKUP = {
    "queued": "pending",
    "running": "running",
    "succeeded": "finished",
    "failed": "finished",
    "cancelled": "finished",
    "expired": "finished",
}

# Output nodes by what worker-comfyui returns for them: it collects only the ``images`` key of ComfyUI's outputs
# and skips ``temp`` ones (previews).
IMAGE_SAVERS = {
    "SaveImage",
    "SaveAnimatedWEBP",
    "SaveAnimatedPNG",
    "Image Save",
    "SaveImageWebsocket",
    "CharForgeTrainLoRA",  # shows its loss curve and samples from the output folder
    STORE_NODE_CLASS,  # its receipt: how a trained LoRA comes home (results.py)
    OUTPUTS_NODE_CLASS,  # its receipt: how videos, storyboards, datasets, reports and sheets come home
}
PREVIEW_ONLY = {"PreviewImage", "PreviewAny"}
NON_IMAGE_SAVERS = {
    "VHS_VideoCombine",
    "SaveVideo",
    "SaveWEBM",
    "SaveAudio",
    "SaveAudioMP3",
    "SaveAudioOpus",
    "SaveAnimatedGIF",
    "CF_SaveGif",
    "CF_SaveAudio",
    "CF_SaveVideo",
    "SaveGLB",
    "SaveText",
    "ShowText|pysssss",
    "CF_ShowText",
    "SaveLatent",
    "SaveLoRA",
    "CF_EncodeVideo",
}


class RequestTooLarge(UsageError):
    """The ``/run`` request would exceed RunPod's size limit; refused before anything was sent."""

    def __init__(self, size: int, limit: int, images: list[tuple[str, int]]) -> None:
        self.size = size
        self.limit = limit
        biggest = ", ".join(
            f"{name} ({n / MB:.1f} MB)" for name, n in sorted(images, key=lambda x: -x[1])[:3]
        )
        what = f"; largest inputs: {biggest}" if biggest else ""
        super().__init__(
            f"the serverless request is {size / MB:.1f} MB, over RunPod's {limit / MB:.0f} MB limit for /run "
            f"(inputs travel base64-encoded, 4/3 of their size{what}). Nothing was sent. Fix: put the files on "
            "the endpoint's network volume and refer to them by name instead of --input, or shrink/compress the "
            "inputs, or run this job on a pod (--server runpod-pod:POD_ID), which has no such limit"
        )


@dataclass
class JobStatus:
    """One ``/status`` answer."""

    id: str
    status: str
    delay_ms: int | None = None
    execution_ms: int | None = None
    output: Any = None
    error: Any = None
    worker_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, data: dict[str, Any], job_id: str) -> JobStatus:
        def ms(value: Any) -> int | None:
            return int(value) if isinstance(value, (int, float)) else None

        return cls(
            id=str(data.get("id") or job_id),
            status=str(data.get("status") or "UNKNOWN").upper(),
            delay_ms=ms(data.get("delayTime")),
            execution_ms=ms(data.get("executionTime")),
            output=data.get("output"),
            error=data.get("error"),
            worker_id=data.get("workerId"),
            raw=data,
        )

    @property
    def state(self) -> str:
        """Our job model's state: queued, running, succeeded, failed, cancelled or expired."""
        if self.status == "COMPLETED" and self.error:
            return "failed"
        return JOB_STATES.get(self.status, "running")

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL or self.status == "GONE"


@dataclass
class ServerlessOutput:
    """One image the worker returned: inline bytes (base64) or an S3 URL to fetch."""

    filename: str
    data: bytes | None = None
    url: str | None = None


def build_request(prompt: dict[str, Any], images: dict[str, bytes] | None = None) -> dict[str, Any]:
    """The ``/run`` body worker-comfyui expects."""
    body: dict[str, Any] = {"workflow": prompt}
    if images:
        body["images"] = [
            {"name": name, "image": base64.b64encode(data).decode("ascii")} for name, data in images.items()
        ]
    return {"input": body}


def request_size(body: dict[str, Any]) -> int:
    return len(json.dumps(body, separators=(",", ":")).encode("utf-8"))


def check_request_size(
    body: dict[str, Any], limit: int = RUN_LIMIT_BYTES, images: dict[str, bytes] | None = None
) -> int:
    """Raise :class:`RequestTooLarge` when the encoded body exceeds ``limit``; return its size."""
    size = request_size(body)
    if size > limit:
        raise RequestTooLarge(size, limit, [(n, len(b) * 4 // 3) for n, b in (images or {}).items()])
    return size


def output_warnings(prompt: dict[str, Any]) -> list[str]:
    """What worker-comfyui will not return for this workflow (empty when its outputs come back as images)."""
    classes = {str(node.get("class_type")) for node in prompt.values() if isinstance(node, dict)}
    savers = classes & IMAGE_SAVERS
    dropped = sorted(classes & NON_IMAGE_SAVERS)
    previews = sorted(classes & PREVIEW_ONLY)
    if savers:
        if dropped:
            return [
                f"worker-comfyui returns only images: the outputs of {', '.join(dropped)} will not come back "
                "(save them to a network volume or S3 inside the workflow, or run on a pod)"
            ]
        return []
    if dropped:
        return [
            f"this workflow's only outputs are {', '.join(dropped)} (video/audio/text); worker-comfyui returns "
            "only images, so the job would finish with nothing to download. Run it on a pod "
            "(--server runpod-pod:POD_ID), or add a SaveImage of the frames"
        ]
    if previews:
        return [
            "this workflow only previews images (PreviewImage); worker-comfyui skips temporary previews, so "
            "nothing would come back: use SaveImage"
        ]
    return []


def decode_output(output: Any) -> list[ServerlessOutput]:
    """The images of a COMPLETED job, from either worker-comfyui schema (5.x ``images`` list or the older
    ``message`` string holding base64 or an S3 URL)."""
    if output is None:
        return []
    if isinstance(output, str):  # a handler that returned a bare string
        output = {"message": output}
    if not isinstance(output, dict):
        raise ServerError(f"unexpected serverless output of type {type(output).__name__}")
    items: list[ServerlessOutput] = []
    for index, image in enumerate(output.get("images") or []):
        if not isinstance(image, dict):
            continue
        name = str(image.get("filename") or f"image_{index:03d}.png")
        kind = str(image.get("type") or "base64").lower()
        data = image.get("data") or image.get("image") or ""
        if kind in ("s3_url", "url") or (isinstance(data, str) and data.startswith(("http://", "https://"))):
            items.append(ServerlessOutput(name, url=str(data)))
        else:
            items.append(ServerlessOutput(name, data=_b64(str(data), name)))
    message = output.get("message")
    if not items and isinstance(message, str) and message:
        if message.startswith(("http://", "https://")):
            name = Path(unquote(urlsplit(message).path)).name or "output.png"
            items.append(ServerlessOutput(name, url=message))
        else:
            items.append(ServerlessOutput("output.png", data=_b64(message, "message")))
    return items


def _b64(text: str, what: str) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise ServerError(f"the worker's output {what} is not valid base64") from None


def failure_message(status: JobStatus) -> str:
    """A readable message from a FAILED job's ``error`` (plain string, JSON string of a raised exception, dict)
    plus worker-comfyui's ``output.details``."""
    error = status.error
    text = ""
    if isinstance(error, str):
        try:
            parsed = json.loads(error)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            error = parsed
        else:
            text = error
    if isinstance(error, dict):
        text = str(error.get("error_message") or error.get("message") or error.get("error") or error)
        if error.get("error_type"):
            text = f"{error['error_type']}: {text}"
    details = status.output.get("details") if isinstance(status.output, dict) else None
    if isinstance(details, list) and details:
        text += " (" + "; ".join(str(d) for d in details[:5]) + ")"
    return text or f"the job ended {status.status} without an error message"


class ServerlessClient:
    """Async client of one serverless endpoint's job API (``{base}/{ENDPOINT_ID}/run|status|cancel|health``)."""

    def __init__(
        self,
        endpoint_id: str,
        api_key: Secret | str | None,
        *,
        base_url: str = RUNPOD_ENDPOINT_URL,
        max_request_bytes: int = RUN_LIMIT_BYTES,
        poll_interval: float = 2.0,
        submit_timeout: float = 120.0,
        http: RunPodHTTP | None = None,
    ) -> None:
        if not api_key:
            raise UsageError("no RunPod API key: set RUNPOD_API_KEY (serverless endpoints need it)")
        self.endpoint_id = endpoint_id
        self.base = f"{base_url.rstrip('/')}/{endpoint_id}"
        self.max_request_bytes = max_request_bytes
        self.poll_interval = poll_interval
        self.submit_timeout = submit_timeout
        self.http = http or RunPodHTTP(api_key, what=f"serverless endpoint {endpoint_id}")
        self._plain: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        await self.http.close()
        if self._plain is not None:
            await self._plain.close()
            self._plain = None

    async def run(self, body: dict[str, Any], images: dict[str, bytes] | None = None) -> str:
        """POST ``/run`` (size-checked first); returns the job id. Never re-sent after the body may have
        arrived (see the module docstring)."""
        check_request_size(body, self.max_request_bytes, images)
        _, data = await self.http.request(
            "POST", f"{self.base}/run", json_body=body, creates=True, read_timeout=self.submit_timeout
        )
        if not isinstance(data, dict) or not data.get("id"):
            raise ServerError(f"/run of endpoint {self.endpoint_id} answered without a job id: {data!r}")
        return str(data["id"])

    async def status(self, job_id: str) -> JobStatus:
        """GET ``/status/{id}``; a job RunPod no longer knows (past its retention time) has status ``GONE``."""
        try:
            _, data = await self.http.request("GET", f"{self.base}/status/{job_id}")
        except ServerError as exc:
            if exc.status == 404:
                return JobStatus(job_id, "GONE")
            raise
        return JobStatus.from_api(data if isinstance(data, dict) else {}, job_id)

    async def cancel(self, job_id: str) -> JobStatus:
        _, data = await self.http.request("POST", f"{self.base}/cancel/{job_id}")
        return JobStatus.from_api(data if isinstance(data, dict) else {}, job_id)

    async def health(self) -> dict[str, Any]:
        """GET ``/health``: ``{"jobs": {completed, failed, inProgress, inQueue, retried}, "workers": {...}}``."""
        _, data = await self.http.request("GET", f"{self.base}/health")
        return data if isinstance(data, dict) else {}

    async def wait(self, job_id: str, *, timeout: float | None = None, on_status: Any = None) -> JobStatus:
        """Poll ``/status`` until the job is terminal (or ``timeout`` seconds passed: :class:`JobTimeout`)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        last = None
        while True:
            status = await self.status(job_id)
            if on_status is not None and status.status != last:
                on_status(status)
            last = status.status
            if status.terminal:
                return status
            if deadline is not None and loop.time() >= deadline:
                raise JobTimeout(
                    f"serverless job {job_id} did not finish within {timeout:g} s (last status "
                    f"{status.status})",
                    prompt_id=job_id,
                    seconds=float(timeout or 0),
                )
            pause = self.poll_interval
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - loop.time()))
            await asyncio.sleep(pause)

    async def fetch(self, url: str) -> bytes:
        """Download an S3 URL the worker returned (presigned: no RunPod key is sent to it)."""
        if self._plain is None or self._plain.closed:
            self._plain = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
            )
        cap = Limits.resolve().max_download_bytes
        for attempt in range(_FETCH_RETRY.attempts):
            try:
                async with self._plain.get(url) as resp:
                    if resp.status != 200:
                        raise ServerError(
                            f"downloading a worker output from S3 failed: HTTP {resp.status}",
                            status=resp.status,
                        )
                    data = bytearray()
                    async for chunk in resp.content.iter_any():
                        data += chunk
                        if len(data) > cap:
                            raise ProtocolError(
                                f"a worker output on S3 is larger than {mib(cap)}, the limit for "
                                f"one download; raise it with {DOWNLOAD_LIMIT_SETTING}"
                            )
                    return bytes(data)
            except (aiohttp.ClientConnectionError, *TIMEOUT_ERRORS) as exc:
                if _FETCH_RETRY.is_last(attempt):
                    # the presigned URL in the message carries a signature: mask it
                    raise ServerUnavailable(
                        mask(f"downloading a worker output from S3 failed: {exc}")
                    ) from None
                await asyncio.sleep(_FETCH_RETRY.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover


def result_from_status(
    status: JobStatus, prompt: dict[str, Any] | None = None, submitted_at: float | None = None
) -> JobResult:
    """A :class:`JobResult` for a COMPLETED job (raises the job's failure otherwise).

    Files appear as outputs of a pseudo node ``serverless`` (the worker does not say which node made them);
    timings come from ``delayTime``/``executionTime``.
    """
    if status.state == "cancelled":
        raise Interrupted(f"serverless job {status.id} was cancelled", prompt_id=status.id)
    if status.status == "TIMED_OUT":  # not resubmitted by a batch: it would hit the same limit again
        raise JobTimeout(
            f"serverless job {status.id} timed out on RunPod (the endpoint's execution timeout, or "
            "no worker picked it up in time)",
            prompt_id=status.id,
            seconds=(status.execution_ms or 0) / 1000.0,
        )
    if status.state == "expired":
        raise JobLost(
            f"serverless job {status.id} is gone from RunPod (results are kept 30 min after the end, "
            "jobs expire after their TTL)",
            prompt_id=status.id,
        )
    if status.state == "failed":
        raise ExecutionError(
            prompt_id=status.id,
            node_id=None,
            node_type=None,
            exception_type="WorkerError",
            exception_message=failure_message(status),
        )
    items = decode_output(status.output)
    files = [{"filename": item.filename, "subfolder": "", "type": "output"} for item in items]
    start = submitted_at
    timings = Timings(submitted_at=submitted_at, observed_at=time.time())
    if start is not None and status.delay_ms is not None:
        timings.started_at = start + status.delay_ms / 1000.0
        if status.execution_ms is not None:
            timings.finished_at = timings.started_at + status.execution_ms / 1000.0
    history = {"runpod": status.raw}
    return JobResult(
        prompt_id=status.id,
        outputs={"serverless": {"images": files}} if files else {},
        prompt=dict(prompt or {}),
        timings=timings,
        status={"status_str": "success"},
        history=history,
    )


class ServerlessTarget:
    """A serverless endpoint as a batch :class:`~charforge.driver.batch.targets.Target`.

    ``supports_prompt_ids`` is False: RunPod assigns job ids, and the runner journals the returned id before
    anything else. ``cost(seconds)`` prices seconds of execution at the endpoint GPU's per-second rate;
    ``job_cost(job_id)`` is the exact figure of a finished job (its ``executionTime``).
    """

    supports_prompt_ids = False

    def __init__(
        self,
        settings: RunPodSettings | None = None,
        *,
        endpoint_id: str | None = None,
        api_key: Secret | str | None = None,
        capacity: int | None = None,
        price_per_second: float | None = None,
        poll_interval: float | None = None,
        client: ServerlessClient | None = None,
    ) -> None:
        options = dict(settings.options) if settings else {}
        self.endpoint_id = endpoint_id or (settings.id if settings else "")
        if not self.endpoint_id:
            raise UsageError("a serverless target needs an endpoint id (runpod-serverless:ENDPOINT_ID)")
        key = api_key or (settings.api_key if settings else None)
        self.settings = settings
        self.client = client or ServerlessClient(
            self.endpoint_id,
            key,
            base_url=settings.endpoint_url if settings else RUNPOD_ENDPOINT_URL,
            max_request_bytes=int(float(options.get("max_request_mb", 10)) * MB),
            poll_interval=float(poll_interval or options.get("poll_interval", 2.0)),
        )
        self.name = f"runpod-serverless:{self.endpoint_id}"
        self.capacity = max(1, int(capacity or options.get("capacity", 4)))
        self.price_per_second = (
            price_per_second
            if price_per_second is not None
            else (float(options["price_per_second"]) if options.get("price_per_second") is not None else None)
        )
        self.price_source = "config" if self.price_per_second is not None else None
        self.warnings: list[str] = []
        #: where trained runs go (runpod.results / $CHARFORGE_SERVERLESS_RESULTS): see results.py
        self.results = results_location(options)
        #: whether :meth:`download` also brings trained LoRAs home (``charforge run``; a batch runner does it
        #: itself with :meth:`fetch_training`)
        self.training_home = False
        self.s3_endpoint = options.get("s3_endpoint") or None
        self._images: dict[str, bytes] = {}
        self._submitted: dict[str, float] = {}
        self._prompts: dict[str, dict[str, Any]] = {}
        self._status: dict[str, JobStatus] = {}

    def __repr__(self) -> str:
        return f"ServerlessTarget({self.name!r}, capacity={self.capacity})"

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)
        log.warning("%s: %s", self.name, mask(text))

    async def open(self) -> None:
        await self.client.health()  # checks the key and the endpoint id
        if self.price_per_second is None and self.settings is not None:
            self.price_per_second = await endpoint_price_per_second(self.settings)
            self.price_source = "api" if self.price_per_second is not None else None
            if self.price_per_second is None:
                self._warn(
                    "no price known for this endpoint's GPU; set runpod.price_per_second in the profile "
                    "to get cost estimates"
                )

    async def close(self) -> None:
        await self.client.close()

    async def prepare(self, spec: JobSpec) -> dict[str, Any]:
        """Apply overrides locally, embed ``--input`` files as worker images, check the size and the outputs.

        There is no ``/object_info`` on a serverless endpoint, so the graph must already be in API format and
        is not preflighted; the worker validates it when it runs.
        """
        wf = coerce_workflow(spec.workflow)
        if wf.prompt is None:
            raise WorkflowError(
                f"{spec.source or 'this workflow'} is in the editor format; a serverless endpoint "
                "cannot convert it. Convert it once against a ComfyUI with the same nodes: "
                "charforge convert WORKFLOW -o api.json --server URL"
            )
        prompt, _ = apply_overrides(wf.prompt, [parse_set(s) for s in spec.sets], None)
        prompt = add_store_nodes(prompt, self.results)  # a trained LoRA leaves the worker through storage
        prompt, stays = add_outputs_node(prompt, self.results)  # and what CharForge's nodes wrote, too
        if stays:
            self._warn(stays)
        sources = {}
        for node_id, folder in local_datasets(prompt).items():  # and a local dataset reaches it the same way
            sources[node_id] = await asyncio.to_thread(self._dataset_up, folder)
        prompt = add_fetch_nodes(prompt, sources)
        files = [parse_input(f"{k}={v}") for k, v in (spec.inputs or {}).items()]
        images: dict[str, bytes] = {}
        for item in plan_inputs(prompt, files, [], None):
            data = item.path.read_bytes()
            name = f"{hashlib.sha256(data).hexdigest()[:12]}-{item.path.name}"
            images[name] = data
            prompt[item.node_id]["inputs"][item.input] = name
        check_request_size(build_request(prompt, images), self.client.max_request_bytes, images)
        for text in output_warnings(prompt):
            self._warn(text)
        self._images.update(images)
        return prompt

    def _dataset_up(self, folder: Path) -> str:
        """A local dataset folder up to storage (content-addressed below the results location; blocking)."""
        from ..storage import S3Location, S3Storage

        assert self.results is not None  # add_store_nodes refused a training job without one
        location = dataset_location(self.results, folder)
        entries = S3Storage(endpoint_url=self.s3_endpoint).upload_tree(folder, S3Location.parse(location))
        sent = sum(1 for e in entries if e.get("uploaded"))
        log.info(
            "%s: dataset %s -> %s (%d of %d files sent)", self.name, folder, location, sent, len(entries)
        )
        return location

    def _images_for(self, graph: dict[str, Any]) -> dict[str, bytes]:
        names = {
            v
            for node in graph.values()
            if isinstance(node, dict)
            for v in (node.get("inputs") or {}).values()
            if isinstance(v, str)
        }
        return {n: b for n, b in self._images.items() if n in names}

    async def submit(self, graph: dict[str, Any], prompt_id: str | None) -> str:
        images = self._images_for(graph)
        job_id = await self.client.run(build_request(graph, images), images)
        self._submitted[job_id] = time.time()
        self._prompts[job_id] = graph
        return job_id

    async def lookup(self, prompt_id: str) -> str:
        status = await self.client.status(prompt_id)
        self._status[prompt_id] = status
        if status.status == "GONE":
            return "unknown"
        return _LOOKUP.get(status.state, "running")

    async def wait(self, prompt_id: str, timeout: float | None, on_status: Any = None) -> JobResult:
        """Follow ``/status`` until the job ends (``on_status(JobStatus)`` at each change of state)."""
        status = await self.client.wait(prompt_id, timeout=timeout, on_status=on_status)
        self._status[prompt_id] = status
        result = result_from_status(status, self._prompts.get(prompt_id), self._submitted.get(prompt_id))
        await self._read_receipts(result, status)
        return result

    async def _read_receipts(self, result: JobResult, status: JobStatus) -> None:
        """The Train LoRA texts of the runs the job sent to storage, from the receipt images the worker
        returned, as outputs of their Send Training to Storage nodes (the batch runner brings them home)."""
        for item in decode_output(status.output):
            if not item.filename.startswith(RECEIPT_PREFIX):
                continue
            data = item.data if item.data is not None else await self.client.fetch(str(item.url))
            found = receipt(item.filename, data)
            if found is None:
                continue
            node = str(found.get("node") or f"charforge_store_{len(result.outputs)}")
            result.outputs.setdefault(node, {}).setdefault("text", []).append(found["summary"])
            if found.get("kind") == "outputs":
                self._outputs_receipt(result, node, found)
                continue
            result.prompt.setdefault(node, {"class_type": STORE_NODE_CLASS, "inputs": {}})
        # A receipt the worker did not return (worker-comfyui before 5.0 returns one image only): the run is on
        # storage at the destination this driver gave the node, so it is read from there.
        for node_id, node in list(result.prompt.items()):
            if not isinstance(node, dict) or node.get("class_type") not in (
                STORE_NODE_CLASS,
                OUTPUTS_NODE_CLASS,
            ):
                continue
            destination = (node.get("inputs") or {}).get("destination")
            if node_id in result.outputs or not isinstance(destination, str):
                continue
            if node["class_type"] == OUTPUTS_NODE_CLASS:
                found = await asyncio.to_thread(stored_receipt, destination, self.s3_endpoint)
                if found is not None:
                    result.outputs[node_id] = {"text": [str(found.get("summary") or "")]}
                    self._outputs_receipt(result, node_id, found)
                continue
            summary = await asyncio.to_thread(stored_summary, str(destination), self.s3_endpoint)
            if summary is not None:
                result.outputs[node_id] = {"text": [summary]}

    @staticmethod
    def _outputs_receipt(result: JobResult, node_id: str, found: dict[str, Any]) -> None:
        """Keep an outputs receipt for :meth:`download`, its destination the one this driver gave the node (a
        receipt naming another place is not followed)."""
        given = ((result.prompt.get(node_id) or {}).get("inputs") or {}).get("destination")
        if isinstance(given, str):
            found = {**found, "destination": given.rstrip("/")}
        history = result.history if result.history is not None else {}
        history.setdefault("charforge_outputs", []).append(found)
        result.history = history

    async def fetch_training(self, trained: list[TrainedLoRA], folder: Path) -> list[dict[str, Any]]:
        """The runs the job sent to storage, home into ``folder/lora/`` (checked by sha256)."""
        from ..storage import S3Storage

        storage = await asyncio.to_thread(S3Storage, endpoint_url=self.s3_endpoint)
        return await bring_training_home(None, trained, folder, storage=storage)

    async def download(self, result: JobResult, out_dir: Path) -> list[DownloadedFile]:
        """The worker's images, then every file the job's Send Outputs to Storage node sent, from storage into
        ``out_dir/<path below the output folder>`` (a worker image that is one of those comes once, from there)."""
        items = decode_output(((result.history or {}).get("runpod") or {}).get("output"))
        receipts = (result.history or {}).get("charforge_outputs") or []
        stored = {
            (PurePosixPath(str(f.get("path"))).name, str(f.get("sha256")))
            for r in receipts
            for f in r["files"]
        }
        done: list[DownloadedFile] = []
        for index, item in enumerate(items):
            data = item.data if item.data is not None else await self.client.fetch(str(item.url))
            if (item.filename, hashlib.sha256(data).hexdigest()) in stored:
                continue
            source = OutputFile("serverless", "images", index, item.filename)
            path, handle = open_unique(local_path_for(Path(out_dir), source))
            with handle:
                handle.write(data)
            done.append(
                DownloadedFile(source, path, len(data), hashlib.sha256(data).hexdigest(), "worker-comfyui")
            )
        for found in receipts:
            got = await asyncio.to_thread(outputs_home, found, Path(out_dir), self.s3_endpoint)
            done += downloaded_files(got, Path(out_dir), result.prompt)
        if self.training_home:  # charforge run: no batch runner brings the LoRA home afterwards
            values = {
                v.node_id: {"class_type": result.node_class(v.node_id), **v.values} for v in result.values
            }
            trained = [t for t in trained_loras(values) if t.run_dir.startswith("s3://")]
            if trained:
                for home in await self.fetch_training(trained, Path(out_dir)):
                    done += downloaded_files(home["files"], Path(out_dir), result.prompt)
        return done

    async def cancel(self, prompt_id: str) -> str:
        before = await self.client.status(prompt_id)
        if before.terminal:
            return "not_active"
        after = await self.client.cancel(prompt_id)
        self._status[prompt_id] = after
        return "removed" if before.status == "IN_QUEUE" else "interrupted"

    def cost(self, seconds: float) -> float | None:
        """``seconds`` of execution at the endpoint's per-second GPU price."""
        if self.price_per_second is None:
            return None
        return max(0.0, float(seconds)) * self.price_per_second

    def job_cost(self, prompt_id: str) -> float | None:
        """The cost of a finished job: its ``executionTime`` × the per-second price."""
        status = self._status.get(prompt_id)
        if status is None or status.execution_ms is None:
            return None
        return self.cost(status.execution_ms / 1000.0)

    def job_times(self, prompt_id: str) -> dict[str, float | None]:
        status = self._status.get(prompt_id)
        if status is None:
            return {"queue_seconds": None, "execution_seconds": None}
        return {
            "queue_seconds": None if status.delay_ms is None else status.delay_ms / 1000.0,
            "execution_seconds": None if status.execution_ms is None else status.execution_ms / 1000.0,
        }


async def endpoint_price_per_second(settings: RunPodSettings) -> float | None:
    """The per-second price of the endpoint's first GPU type (from the catalog's hourly price / 3600).

    Serverless rates are not pod rates: set ``runpod.price_per_second`` in the profile for exact figures.
    """
    from .api import RunPodAPI

    try:
        async with RunPodAPI(settings.api_key, base_url=settings.api_url) as api:
            endpoint = await api.endpoint(settings.id)
            gpus = {g.id: g for g in await api.gpu_types()}
    except DriverError as exc:
        log.warning("cannot read the price of endpoint %s: %s", settings.id, mask(str(exc)))
        return None
    for gpu_id in endpoint.gpu_type_ids:
        gpu = gpus.get(gpu_id)
        price = gpu.hourly_price() if gpu else None
        if price is not None:
            return price / 3600.0
    return None
