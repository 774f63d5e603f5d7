"""Targets: the small interface the batch runner uses to talk to one server.

A batch runs on a *pool* of targets. The runner never talks HTTP itself; everything it needs from a server goes
through the :class:`Target` protocol below, so other kinds of server (a RunPod pod, a RunPod serverless endpoint,
a Replicate model: ``charforge.driver.runpod``, ``charforge.driver.replicate``) plug in by implementing these few
methods. :class:`ComfyTarget` is the implementation for a ComfyUI server,
built on :class:`~charforge.driver.client.AsyncComfyClient`.

The contract, method by method (all coroutines run on the runner's event loop):

``name``
    A stable, credential-free identifier of the server (its URL). The journal records it for every submitted
    job, and a resumed batch looks jobs up on the target with the same name.
``capacity``
    How many of this batch's jobs may be queued or running on the target at once (the concurrency window).
``supports_prompt_ids``
    True when :meth:`submit` honours a prompt id chosen by the caller. The runner then writes the id to the
    journal *before* submitting, so a job whose submission answer was lost (or whose driver was killed) can be
    found again instead of being sent twice. Serverless backends usually assign their own ids: set this to
    False, and the runner passes ``prompt_id=None`` and journals the returned id before doing anything else
    (a crash between the submission and that journal line can then run the job twice; the journal says so).
    A backend that cannot take our id but can carry it as a tag and list its jobs (Replicate) sets True and
    returns its own id from ``submit``; ``lookup``/``wait`` then accept either, finding a tag by listing.
``open()`` / ``close()``
    Connect and disconnect (sessions, sockets). ``open`` may raise a transient error; the runner retries.
``prepare(spec)``
    Turn a :class:`JobSpec` (a workflow plus ``--set`` overrides and ``--input`` files) into the graph to
    submit on *this* target: convert editor workflows, apply overrides, check the graph against the target's
    node definitions (preflight, before anything is submitted) and upload input files. Raises
    :class:`~charforge.driver.errors.ValidationError` (or another ``UsageError``) when the job cannot run on
    this target: the runner then never sends it there.
``submit(graph, prompt_id)``
    Queue the graph; return the prompt id the target knows it by.
``lookup(prompt_id)``
    Where the job is: one of :data:`LOOKUP_STATES` (``pending``, ``running``, ``finished``, ``unknown``). The
    answer ``unknown`` must mean "this server does not know the id" (restarted, history cleared), never
    "could not ask": that raises a transient error instead.
``wait(prompt_id, timeout)``
    Wait for the job to end and return its :class:`~charforge.driver.client.JobResult`; raises
    :class:`~charforge.driver.errors.ExecutionError` (a node raised), ``JobTimeout``, ``JobLost`` (the target
    forgot it), ``Interrupted``, or a transient error.
``download(result, out_dir)``
    Download the job's output files into ``out_dir`` (an empty staging folder the runner renames into place
    afterwards) and return them.
``cancel(prompt_id)``
    Cancel this one job (dequeue or interrupt). Returns ``removed``, ``interrupted`` or ``not_active``.
``fetch_training(trained, folder)`` (optional)
    Bring the LoRAs a finished job trained (:class:`~charforge.driver.sync.TrainedLoRA`, read from its text
    outputs) and their run folders into the job's ``folder`` (``lora/``), resumed and checked by sha256; returns
    one entry per LoRA (:func:`~charforge.driver.sync.bring_training_home`). Raises
    :class:`~charforge.driver.sync.NoTransferRoutes` when the server cannot serve files. A target without this
    method (serverless, Replicate) leaves trained LoRAs on its server; the manifest says so.
``cost(seconds)`` (optional)
    The money spent for ``seconds`` of use, or None when the target has no price (summaries show it).

Errors: transient failures (connection refused or reset, HTTP 5xx, 429, timeouts of single requests) must
surface as :class:`~charforge.driver.errors.ServerUnavailable` or
:class:`~charforge.driver.errors.ServerError` with ``status`` set; :func:`is_transient` is how the runner tells
them from deterministic ones, and :func:`retry_after` reads a server's ``Retry-After`` hint from the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from charforge.common.retry import retry_after_seconds

from ..client.async_client import AsyncComfyClient
from ..errors import DriverError, ProtocolError, ServerError, ServerUnavailable
from ..sync.blocking import server_info
from ..sync.training import TrainedLoRA, bring_training_home

if TYPE_CHECKING:
    from ..client.models import JobResult
    from ..config import ServerConfig
    from ..outputs import DownloadedFile

LOOKUP_STATES = ("pending", "running", "finished", "unknown")


@dataclass
class JobSpec:
    """What to run, before any server has seen it: a workflow (a path, an API/editor dict) plus overrides
    (``NODE.INPUT=VALUE`` strings, as ``charforge run --set``) and input files (``{"NODE[.INPUT]": path}``)."""

    workflow: str | Path | dict[str, Any]
    sets: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    source: str | None = None


@runtime_checkable
class Target(Protocol):
    """One server of a batch pool (see the module docstring for the contract of each member)."""

    name: str
    capacity: int
    supports_prompt_ids: bool

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def prepare(self, spec: JobSpec) -> dict[str, Any]: ...

    async def submit(self, graph: dict[str, Any], prompt_id: str | None) -> str: ...

    async def lookup(self, prompt_id: str) -> str: ...

    async def wait(self, prompt_id: str, timeout: float | None) -> JobResult: ...

    async def download(self, result: JobResult, out_dir: Path) -> list[DownloadedFile]: ...

    async def cancel(self, prompt_id: str) -> str: ...


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: the server could not be reached, answered 5xx or 429, or a single
    request timed out. Credentials refused, validation errors and node failures are deterministic."""
    if isinstance(exc, ProtocolError):  # the same request gets the same answer (so does AuthenticationError)
        return False
    if isinstance(exc, ServerUnavailable):
        return True
    if isinstance(exc, ServerError):
        return exc.status is None or exc.status >= 500 or exc.status == 429
    if isinstance(exc, DriverError):
        return False
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


def retry_after(exc: BaseException) -> float | None:
    """The server's ``Retry-After`` delay in seconds carried by ``exc`` (429/503 answers), if any."""
    value = getattr(exc, "retry_after", None)
    return None if value is None else retry_after_seconds(str(value))


class ComfyTarget:
    """A ComfyUI server as a batch target (one :class:`AsyncComfyClient`, shared by the target's jobs)."""

    supports_prompt_ids = True

    def __init__(
        self,
        server: str | ServerConfig,
        *,
        capacity: int = 2,
        preflight: bool = True,
        poll_interval: float = 1.0,
        client: AsyncComfyClient | None = None,
    ) -> None:
        self.client = client or AsyncComfyClient(server, poll_interval=poll_interval)
        self.name = self.client.url
        self.capacity = max(1, int(capacity))
        self.preflight = preflight
        self._outputs_dir: str | None = None  # the server's <output>/charforge, asked once (trained LoRAs)

    def __repr__(self) -> str:
        return f"ComfyTarget({self.name!r}, capacity={self.capacity})"

    async def open(self) -> None:
        await self.client.object_info()

    async def close(self) -> None:
        await self.client.close()

    async def prepare(self, spec: JobSpec) -> dict[str, Any]:
        workflow = spec.workflow
        inputs = [f"{k}={v}" for k, v in (spec.inputs or {}).items()]
        prepared = await self.client.prepare_run(
            workflow, sets=list(spec.sets), inputs=inputs, preflight=self.preflight
        )
        return prepared.prompt

    async def submit(self, graph: dict[str, Any], prompt_id: str | None) -> str:
        job = await self.client.submit(graph, prompt_id=prompt_id)
        self.client.forget(job.prompt_id)  # followed later by wait(); do not buffer its events meanwhile
        return job.prompt_id

    async def lookup(self, prompt_id: str) -> str:
        state, _ = await self.client.job_state(prompt_id)
        return state

    async def wait(self, prompt_id: str, timeout: float | None) -> JobResult:
        return await self.client.wait(prompt_id, timeout=timeout)

    async def download(self, result: JobResult, out_dir: Path) -> list[DownloadedFile]:
        return await self.client.download_outputs(result, out_dir, include_temp=False)

    async def cancel(self, prompt_id: str) -> str:
        return await self.client.cancel(prompt_id)

    async def fetch_training(self, trained: list[TrainedLoRA], folder: Path) -> list[dict[str, Any]]:
        if self._outputs_dir is None:
            self._outputs_dir = str((await server_info(self.client))["outputs_dir"])
        return await bring_training_home(self.client, trained, folder, outputs_dir=self._outputs_dir)

    def cost(self, seconds: float) -> float | None:
        return None
