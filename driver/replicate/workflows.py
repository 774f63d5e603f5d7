"""ComfyUI workflows on a Replicate model that runs them (``comfyui/any-comfyui-workflow`` and its forks).

What such a model takes and returns (facts in docs/replicate.md):

* ``workflow_json``: the API-format workflow as JSON text; ``input_file``: one file, or a zip archive that is
  unpacked into ComfyUI's ``input/`` folder, so ``LoadImage`` refers to its members by name; ``randomise_seeds``
  (the model's default re-draws every seed: we send ``false`` so a run is reproducible), ``output_format``,
  ``output_quality``, ``return_temp_files``;
* output: a list of file URLs, everything ComfyUI wrote to its output folder, without node ids;
* no ``/object_info``: nodes the model lacks are found before sending only when the profile points
  ``object_info`` at a snapshot of the model's node definitions; otherwise the model fails the prediction.

:class:`ReplicateTarget` implements the batch runner's :class:`~charforge.driver.batch.targets.Target`. Exactly
once: the runner's prompt id is written into the workflow (``_meta.charforge_job`` of its first node, which
ComfyUI ignores) so a prediction whose creation answer was lost, or whose driver was killed before journaling
it, is found again by listing recent predictions (:meth:`ReplicateAPI.find`) instead of being created twice.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import json
import logging
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from charforge.common.retry import Backoff

from ..client.models import JobResult, Timings
from ..config import ReplicateSettings, Secret
from ..errors import (
    ConfigError,
    ExecutionError,
    Interrupted,
    JobLost,
    JobTimeout,
    ServerError,
    UsageError,
    WorkflowError,
)
from ..outputs import DownloadedFile, OutputFile, local_path_for, open_unique
from ..secrets import mask
from ..workflow.load import coerce_workflow
from ..workflow.overrides import apply_overrides, parse_input, parse_set, plan_inputs
from ..workflow.preflight import check_workflow
from .api import CreateOutcomeUnknown, Prediction, ReplicateAPI

if TYPE_CHECKING:
    from ..batch.targets import JobSpec

log = logging.getLogger("charforge.driver.replicate")

TAG_KEY = "charforge_job"
#: what we send besides the workflow unless the profile's ``inputs`` says otherwise
DEFAULT_INPUTS: dict[str, Any] = {"randomise_seeds": False, "output_format": "png"}
#: the pseudo node the outputs hang from in the manifest (the model does not say which node wrote a file)
OUTPUT_NODE = "replicate"
_LOOKUP = {
    "starting": "pending",
    "processing": "running",
    "succeeded": "finished",
    "failed": "finished",
    "canceled": "finished",
}

#: A create whose answer was lost and that the listing does not show is sent again: three tries in all.
_CREATE_RETRY = Backoff(attempts=3, base=0.5, cap=5.0)
#: USD per second of public hardware, from Replicate's pricing page (docs/replicate.md); the profile's
#: ``price_per_second`` wins.
HARDWARE_PRICES = {
    "cpu": 0.000100,
    "gpu-t4": 0.000225,
    "gpu-a40-small": 0.000575,
    "gpu-a40-large": 0.000725,
    "gpu-l40s": 0.000975,
    "gpu-a100-large": 0.001400,
    "gpu-h100": 0.001525,
}


def price_per_second(settings: ReplicateSettings) -> tuple[float | None, str | None]:
    """The per-second price for cost estimates and where it came from (``config`` or ``hardware``)."""
    options = settings.options
    if options.get("price_per_second") is not None:
        return float(options["price_per_second"]), "config"
    hardware = options.get("hardware")
    if hardware and str(hardware) in HARDWARE_PRICES:
        return HARDWARE_PRICES[str(hardware)], "hardware"
    return None, None


def tag_workflow(prompt: dict[str, Any], tag: str) -> dict[str, Any]:
    """A copy of ``prompt`` with ``tag`` in its first node's ``_meta`` (ComfyUI ignores ``_meta``)."""
    tagged = copy.deepcopy(prompt)
    first = min(tagged, key=lambda k: (len(k), k))
    meta = tagged[first].setdefault("_meta", {})
    meta[TAG_KEY] = tag
    return tagged


def workflow_tag(prediction_input: Any) -> str | None:
    """The tag :func:`tag_workflow` put into a prediction's ``workflow_json`` input, if any."""
    text = prediction_input.get("workflow_json") if isinstance(prediction_input, dict) else None
    if not isinstance(text, str) or TAG_KEY not in text:
        return None
    try:
        prompt = json.loads(text)
    except ValueError:
        return None
    for node in prompt.values() if isinstance(prompt, dict) else ():
        meta = node.get("_meta") if isinstance(node, dict) else None
        if isinstance(meta, dict) and isinstance(meta.get(TAG_KEY), str):
            return meta[TAG_KEY]
    return None


def pack_inputs(files: dict[str, bytes]) -> bytes:
    """A zip archive of ``{name: bytes}`` (the model unpacks it into ComfyUI's input folder)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # same bytes for the same files
            archive.writestr(info, files[name])
    return buffer.getvalue()


def output_urls(output: Any) -> list[str]:
    """The file URLs of a prediction's output: a URL, a list of them, or a dict of them (nested once)."""
    if isinstance(output, str):
        return [output] if output.startswith(("http://", "https://", "data:")) else []
    if isinstance(output, list):
        return [u for item in output for u in output_urls(item)]
    if isinstance(output, dict):
        return [u for item in output.values() for u in output_urls(item)]
    return []


def output_name(url: str, index: int) -> str:
    """A local file name for an output URL (its last path segment; ``output-N`` for data URLs)."""
    if url.startswith("data:"):
        kind = url[5:].split(";", 1)[0].split("/")[-1] or "bin"
        return f"output-{index}.{kind}"
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    return name or f"output-{index}"


def failure(prediction: Prediction) -> ExecutionError:
    """The prediction's error, with the end of its logs (where the model prints ComfyUI's traceback)."""
    error = prediction.error if isinstance(prediction.error, str) else json.dumps(prediction.error)
    tail = "\n".join(prediction.logs.strip().splitlines()[-15:])
    message = (error or "the prediction failed") + (f"\nlast log lines:\n{tail}" if tail else "")
    return ExecutionError(
        prompt_id=prediction.id,
        node_id=None,
        node_type=None,
        exception_type="ReplicateError",
        exception_message=mask(message),
    )


def result_from_prediction(
    prediction: Prediction, prompt: dict[str, Any] | None = None, submitted_at: float | None = None
) -> JobResult:
    """A :class:`JobResult` for a succeeded prediction; raises the prediction's end otherwise. ``execution``
    time is ``metrics.predict_time`` (what is billed)."""
    if prediction.status == "canceled":
        raise Interrupted(f"prediction {prediction.id} was canceled", prompt_id=prediction.id)
    if prediction.status == "failed":
        raise failure(prediction)
    if prediction.data_removed:
        raise JobLost(
            f"prediction {prediction.id} finished, but Replicate has deleted its outputs (API "
            "predictions keep them for an hour)",
            prompt_id=prediction.id,
        )
    urls = output_urls(prediction.output)
    files = [{"filename": output_name(u, i), "subfolder": "", "type": "output"} for i, u in enumerate(urls)]
    timings = Timings(submitted_at=submitted_at or prediction.created_at, observed_at=time.time())
    timings.started_at = prediction.started_at
    if prediction.started_at is not None:
        ran = prediction.predict_time
        timings.finished_at = prediction.started_at + ran if ran is not None else prediction.completed_at
    return JobResult(
        prompt_id=prediction.id,
        outputs={OUTPUT_NODE: {"images": files}} if files else {},
        prompt=dict(prompt or {}),
        timings=timings,
        status={"status_str": "success"},
        history={"replicate": {**prediction.raw, "output_urls": urls}},
    )


def new_log_lines(before: str, after: str) -> list[str]:
    """Lines of ``after`` that ``before`` did not have yet (logs only grow while a prediction runs)."""
    if not after.startswith(before):
        before = ""
    return [line for line in after[len(before) :].splitlines() if line.strip()]


class ReplicateTarget:
    """A Replicate model that runs ComfyUI workflows, as a batch target (and the engine of ``charforge run
    --server replicate:...``).

    ``supports_prompt_ids`` is True: the runner's id tags the workflow, :meth:`submit` returns Replicate's
    prediction id, and :meth:`lookup`/:meth:`wait` accept either (a tag is found by listing predictions).
    ``cost(seconds)`` prices seconds of ``predict_time``; ``job_cost(id)`` is one finished prediction's cost.
    """

    supports_prompt_ids = True

    def __init__(
        self,
        settings: ReplicateSettings,
        *,
        capacity: int | None = None,
        poll_interval: float | None = None,
        api: ReplicateAPI | None = None,
        preflight: bool = True,
    ) -> None:
        options = settings.options
        self.settings = settings
        self.api = api or ReplicateAPI(settings.token, base_url=settings.api_url)
        self.name = f"replicate:{settings.model}"
        self.capacity = max(1, int(capacity or options.get("capacity", 4)))
        self.poll_interval = float(poll_interval or options.get("poll_interval", 2.0))
        self.version = settings.version
        self.preflight = preflight
        #: ``Prefer: wait=N`` on create (1-60 s): a short workflow's answer already holds its outputs
        self.prefer_wait = int(options["wait"]) if options.get("wait") else None
        self.price_per_second, self.price_source = price_per_second(settings)
        self.extra_inputs = {**DEFAULT_INPUTS, **dict(options.get("inputs") or {})}
        self.warnings: list[str] = []
        self._object_info: dict[str, Any] | None = None
        self._files: dict[str, bytes] = {}
        self._ids: dict[str, str] = {}  # tag (the runner's id) -> prediction id
        self._submitted: dict[str, float] = {}
        self._prompts: dict[str, dict[str, Any]] = {}
        self._status: dict[str, Prediction] = {}

    def __repr__(self) -> str:
        return f"ReplicateTarget({self.name!r}, capacity={self.capacity})"

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)
            log.warning("%s: %s", self.name, mask(text))

    # ---- Target ----------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Check the token and the model, pin the version (the latest one unless the server string names one)
        and load the node definitions the profile points at."""
        require_token(self.settings)
        if self.version is None:
            self.version = await self.api.latest_version(self.settings.model)
        else:
            await self.api.version(self.settings.model, self.version)
        source = self.settings.options.get("object_info")
        if source and self._object_info is None:
            try:
                self._object_info = json.loads(Path(str(source)).expanduser().read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UsageError(f"replicate.object_info: cannot read {source}: {exc}") from None
        if self.price_per_second is None:
            self._warn(
                "no price known for this model's hardware; set replicate.hardware (e.g. gpu-a100-large) "
                "or replicate.price_per_second in the profile to get cost estimates"
            )

    async def close(self) -> None:
        await self.api.close()

    async def prepare(self, spec: JobSpec) -> dict[str, Any]:
        """Apply overrides locally, rename ``--input`` files to content-hashed names (packed into the input
        archive at submission), and check the graph against the model's node definitions when known."""
        wf = coerce_workflow(spec.workflow)
        if wf.prompt is None:
            raise WorkflowError(
                f"{spec.source or 'this workflow'} is in the editor format; a Replicate model "
                "cannot convert it. Convert it once against a ComfyUI with the same nodes: "
                "charforge convert WORKFLOW -o api.json --server URL"
            )
        prompt, _ = apply_overrides(wf.prompt, [parse_set(s) for s in spec.sets], self._object_info)
        files = [parse_input(f"{k}={v}") for k, v in (spec.inputs or {}).items()]
        for item in plan_inputs(prompt, files, [], self._object_info):
            data = item.path.read_bytes()
            name = f"{hashlib.sha256(data).hexdigest()[:12]}-{item.path.name}"
            self._files[name] = data
            prompt[item.node_id]["inputs"][item.input] = name
        if self.preflight and self._object_info is not None:
            check_workflow(prompt, self._with_inputs(prompt))
        elif self._object_info is None:
            self._warn(
                "the workflow is not checked before sending (the model publishes no node list here; point "
                "replicate.object_info at its /object_info snapshot): a missing node fails the prediction"
            )
        return prompt

    def _with_inputs(self, prompt: dict[str, Any]) -> dict[str, Any]:
        """The node definitions with our input files added to every file combo (they arrive in the archive)."""
        info = copy.deepcopy(self._object_info or {})
        names = self._files_for(prompt)
        for node in info.values():
            required = ((node or {}).get("input") or {}).get("required") or {}
            for spec in required.values():
                if (
                    isinstance(spec, list)
                    and spec
                    and isinstance(spec[0], list)
                    and len(spec) > 1
                    and isinstance(spec[1], dict)
                    and spec[1].get("image_upload")
                ):
                    spec[0].extend(n for n in names if n not in spec[0])
        return info

    def _files_for(self, graph: dict[str, Any]) -> dict[str, bytes]:
        names = {
            v
            for node in graph.values()
            if isinstance(node, dict)
            for v in (node.get("inputs") or {}).values()
            if isinstance(v, str)
        }
        return {n: b for n, b in self._files.items() if n in names}

    async def build_input(self, graph: dict[str, Any], tag: str) -> dict[str, Any]:
        """The prediction's input: the tagged workflow as JSON text, the input archive (uploaded through the
        files API) and the profile's extra inputs."""
        body: dict[str, Any] = {**self.extra_inputs, "workflow_json": json.dumps(tag_workflow(graph, tag))}
        files = self._files_for(graph)
        if files:
            archive = pack_inputs(files)
            uploaded = await self.api.upload_file(
                archive,
                f"inputs-{hashlib.sha256(archive).hexdigest()[:12]}.zip",
                "application/zip",
                metadata={TAG_KEY: tag},
            )
            body["input_file"] = uploaded["urls"]["get"]
        return body

    async def submit(self, graph: dict[str, Any], prompt_id: str | None) -> str:
        """Create the prediction tagged with ``prompt_id``; a lost answer is resolved by listing (never by
        creating it again while it may exist)."""
        tag = prompt_id or str(uuid.uuid4())
        if self.version is None:
            await self.open()
        started = time.time()
        body = await self.build_input(graph, tag)
        for attempt in range(_CREATE_RETRY.attempts):
            try:
                prediction = await self.api.create_prediction(
                    body, version=self.version, wait=self.prefer_wait
                )
                break
            except CreateOutcomeUnknown:
                found = await self.find(tag, since=started)
                if found is not None:
                    prediction = found
                    break
                if _CREATE_RETRY.is_last(attempt):
                    raise  # transient: the batch runner looks the tag up again before it retries
                await asyncio.sleep(_CREATE_RETRY.delay(attempt))
        self._remember(tag, prediction, graph, started)
        return prediction.id

    def _remember(
        self, tag: str, prediction: Prediction, graph: dict[str, Any] | None, started: float
    ) -> None:
        self._ids[tag] = prediction.id
        self._submitted.setdefault(prediction.id, started)
        if graph is not None:
            self._prompts[prediction.id] = graph
        self._status[prediction.id] = prediction

    async def find(self, tag: str, since: float | None = None) -> Prediction | None:
        """The prediction tagged ``tag`` among the recent ones (API predictions keep their input for an hour)."""
        found = await self.api.find(
            "predictions", lambda entry: workflow_tag(entry.get("input")) == tag, since=since
        )
        if found is not None:
            self._ids[tag] = found.id
        return found

    async def _resolve(self, prompt_id: str) -> str | None:
        """Replicate's prediction id for ``prompt_id`` (a prediction id, or a tag we chose)."""
        if prompt_id in self._ids:
            return self._ids[prompt_id]
        if _is_tag(prompt_id):
            found = await self.find(prompt_id)
            return found.id if found is not None else None
        return prompt_id

    async def prediction(self, prompt_id: str) -> Prediction | None:
        """The prediction now, or None when Replicate does not know it."""
        pid = await self._resolve(prompt_id)
        if pid is None:
            return None
        try:
            prediction = await self.api.prediction(pid)
        except ServerError as exc:
            if exc.status == 404:
                return None
            raise
        self._status[pid] = prediction
        return prediction

    async def lookup(self, prompt_id: str) -> str:
        prediction = await self.prediction(prompt_id)
        return "unknown" if prediction is None else _LOOKUP[prediction.status]

    async def wait(
        self,
        prompt_id: str,
        timeout: float | None,
        on_update: Callable[[Prediction, list[str]], None] | None = None,
    ) -> JobResult:
        """Poll ``GET /v1/predictions/{id}`` until it ends; ``on_update(prediction, new_log_lines)`` is called
        at each change of status or new log lines (the progress Replicate gives)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        seen_logs, seen_status = "", ""
        while True:
            prediction = await self.prediction(prompt_id)
            if prediction is None:
                raise JobLost(f"Replicate does not know prediction {prompt_id}", prompt_id=prompt_id)
            if on_update is not None and (prediction.status != seen_status or prediction.logs != seen_logs):
                on_update(prediction, new_log_lines(seen_logs, prediction.logs))
            seen_logs, seen_status = prediction.logs, prediction.status
            if prediction.terminal:
                return result_from_prediction(
                    prediction, self._prompts.get(prediction.id), self._submitted.get(prediction.id)
                )
            if deadline is not None and loop.time() >= deadline:
                raise JobTimeout(
                    f"prediction {prediction.id} did not finish within {timeout:g} s (last status "
                    f"{prediction.status})",
                    prompt_id=prediction.id,
                    seconds=float(timeout or 0),
                )
            pause = (
                self.poll_interval
                if deadline is None
                else min(self.poll_interval, max(0.0, deadline - loop.time()))
            )
            await asyncio.sleep(pause)

    async def download(self, result: JobResult, out_dir: Path) -> list[DownloadedFile]:
        urls = ((result.history or {}).get("replicate") or {}).get("output_urls") or []
        done: list[DownloadedFile] = []
        for index, url in enumerate(urls):
            source = OutputFile(OUTPUT_NODE, "images", index, output_name(url, index))
            path, handle = open_unique(local_path_for(Path(out_dir), source))
            handle.close()
            size, digest = await self.api.download(url, path)
            done.append(DownloadedFile(source, path, size, digest, "replicate"))
        return done

    async def cancel(self, prompt_id: str) -> str:
        before = await self.prediction(prompt_id)
        if before is None or before.terminal:
            return "not_active"
        after = await self.api.cancel_prediction(before.id)
        self._status[after.id] = after
        return "removed" if before.status == "starting" else "interrupted"

    # ---- cost ------------------------------------------------------------------------------------------------

    def cost(self, seconds: float) -> float | None:
        """``seconds`` of ``predict_time`` at the model's per-second price."""
        return None if self.price_per_second is None else max(0.0, float(seconds)) * self.price_per_second

    def job_cost(self, prompt_id: str) -> float | None:
        prediction = self._status.get(self._ids.get(prompt_id, prompt_id))
        if prediction is None or prediction.predict_time is None:
            return None
        return self.cost(prediction.predict_time)

    def job_times(self, prompt_id: str) -> dict[str, float | None]:
        prediction = self._status.get(self._ids.get(prompt_id, prompt_id))
        if prediction is None:
            return {"queue_seconds": None, "execution_seconds": None}
        queued = None
        if prediction.created_at is not None and prediction.started_at is not None:
            queued = max(0.0, prediction.started_at - prediction.created_at)
        return {"queue_seconds": queued, "execution_seconds": prediction.predict_time}


def require_token(settings: ReplicateSettings) -> None:
    """Fail before any request when no token is configured (every Replicate call needs one)."""
    if settings.token is None:
        raise ConfigError(
            "no Replicate API token: set REPLICATE_API_TOKEN (or replicate.token_env in the config "
            "file); create one on replicate.com under your account's API tokens"
        )


def _is_tag(prompt_id: str) -> bool:
    """Our tags are UUIDs; Replicate's prediction ids are not."""
    try:
        uuid.UUID(prompt_id)
    except ValueError:
        return False
    return True


def make_settings(model: str, token: str | Secret | None = None, **options: Any) -> ReplicateSettings:
    """Settings for code that names a model directly (tests, notebooks); the CLI resolves profiles instead."""
    owner_name, _, version = model.partition(":")
    return ReplicateSettings(
        model=owner_name,
        version=version or None,
        token=token if isinstance(token, Secret) or token is None else Secret(token),
        options=options,
    )
