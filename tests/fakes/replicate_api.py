"""A loopback fake of Replicate's HTTP API for driver tests, behaving as docs/replicate.md describes it.

One aiohttp server on 127.0.0.1 serves:

* ``/v1/predictions`` (create with ``version`` + ``input``, ``Prefer: wait=N``; get; cancel; list newest first
  with cursor pagination and each prediction's ``input``), ``/v1/models/{owner}/{name}[/versions/{id}]``,
  ``/v1/models/{owner}/{name}/versions/{id}/trainings``, ``/v1/trainings[/{id}[/cancel]]``, ``/v1/files``
  (multipart ``content``); every ``/v1`` call needs ``Authorization: Bearer <token>`` (401 otherwise);
* ``/delivery/...``: output files, without authentication (as on Replicate's CDN).

Two kinds of model: a **ComfyUI runner** shaped like ``any-comfyui-workflow`` (inputs ``workflow_json``,
``input_file`` - a zip unpacked into the input folder -, ``randomise_seeds``, ``output_format``; output a list of
file URLs) executing on a :class:`~fakes.comfy_server.FakeComfyServer`, and a **LoRA trainer** shaped like the
Flux LoRA trainers (``input_images`` zip, ``trigger_word``, ``steps``, ``lora_rank``, ``learning_rate``,
``resolution``; output ``{"version", "weights"}`` where ``weights`` is a tar holding ``lora.safetensors``).

States ``starting`` -> ``processing`` -> ``succeeded`` | ``failed`` | ``canceled``; ``metrics.predict_time`` is
the processing time and the bill is that x the model hardware's price per second. Knobs add 429 storms with
``Retry-After``, 5xx answers, lost create answers (created, connection cut), slow starts and failures.

(Over 600 lines on purpose: predictions, trainings, models and files share one fake account's state and its
billing, which the tests read across endpoints; the serving thread and loop are :mod:`fakes.loopback`'s.)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import string
import struct
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from fakes.loopback import LoopbackServer, history_entry, throttled

#: the hosted LoRA trainer the training tests use (shaped like the Flux LoRA trainers on Replicate)
TRAINER = "ostris/flux-dev-lora-trainer"

#: USD per second by hardware, the fake's own price list (the bill the driver's estimate is compared with)
PRICES = {
    "cpu": 0.0001,
    "gpu-t4": 0.000225,
    "gpu-l40s": 0.000975,
    "gpu-a100-large": 0.0014,
    "gpu-h100": 0.001525,
}


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(26))


@dataclass
class ReplicateKnobs:
    """Behaviour switches, changeable while the fake runs."""

    #: answer the next N /v1 requests with 429 (with ``Retry-After: retry_after`` when set)
    rate_limit_next: int = 0
    retry_after: float | None = 0.05
    #: answer the next N /v1 requests with ``fail_status`` (a body echoing the token when ``echo_token``)
    fail_next: int = 0
    fail_status: int = 503
    echo_token: bool = False
    #: create the next N predictions/trainings but cut the connection instead of answering
    lose_create_answers: int = 0
    #: seconds a prediction stays ``starting`` (cold boot) before ``processing``
    start_delay: float = 0.0
    #: seconds a training takes
    train_seconds: float = 0.3
    #: page size of the list endpoints (Replicate: 100)
    page_size: int = 100
    #: fail every prediction whose workflow contains this text (a model error, with logs)
    fail_when: str | None = None
    #: bill each finished job this many seconds instead of its measured run time (cost tests that must not
    #: depend on how loaded the machine is)
    bill_seconds: float | None = None


@dataclass
class FakeModel:
    owner: str
    name: str
    kind: str  # "comfyui" | "trainer" | "plain"
    hardware: str = "gpu-a100-large"
    versions: list[str] = field(default_factory=list)
    upstream: Any = None  # FakeComfyServer for "comfyui"
    lora_base: str = "sd15"  # what the trainer's LoRA is for

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclass
class FakeJob:
    """A prediction or a training."""

    id: str
    kind: str  # "prediction" | "training"
    model: FakeModel
    version: str
    input: dict[str, Any]
    created: float
    destination: str | None = None
    billed: float | None = None  # seconds billed, when the knobs fix it
    status: str = "starting"
    started: float | None = None
    finished: float | None = None
    output: Any = None
    error: Any = None
    logs: list[str] = field(default_factory=list)
    task: Any = None
    prompt_id: str | None = None

    @property
    def predict_time(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.billed if self.billed is not None else self.finished - self.started

    def to_dict(self, base: str) -> dict[str, Any]:
        path = "predictions" if self.kind == "prediction" else "trainings"
        data: dict[str, Any] = {
            "id": self.id,
            "model": self.model.full_name,
            "version": self.version,
            "input": self.input,
            "output": self.output,
            "logs": "\n".join(self.logs),
            "error": self.error,
            "status": self.status,
            "source": "api",
            "data_removed": False,
            "created_at": iso(self.created),
            "started_at": iso(self.started),
            "completed_at": iso(self.finished),
            "metrics": {},
            "urls": {"get": f"{base}/v1/{path}/{self.id}", "cancel": f"{base}/v1/{path}/{self.id}/cancel"},
        }
        if self.predict_time is not None:
            data["metrics"] = {
                "predict_time": round(self.predict_time, 6),
                "total_time": round((self.finished or 0) - self.created, 6),
            }
        if self.destination:
            data["destination"] = self.destination
        return data


class FakeReplicate(LoopbackServer):
    """The fake; ``start()`` runs it in a background thread (or use it as a context manager)."""

    thread_name = "fake-replicate"
    what = "fake Replicate"

    def __init__(
        self,
        *,
        token: str = "r8_fake_token_0123456789abcdef",
        knobs: ReplicateKnobs | None = None,
        seed: int = 7,
    ) -> None:
        self.token = token
        self.knobs = knobs or ReplicateKnobs()
        self.models: dict[str, FakeModel] = {}
        self.jobs: dict[str, FakeJob] = {}
        self.files: dict[str, tuple[str, str, bytes]] = {}  # id -> (name, content type, bytes)
        self.delivery: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.created: list[str] = []  # ids of every prediction/training created
        self._init_loopback()
        self._rng = random.Random(seed)

    # ---- set-up and accounting ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {"REPLICATE_API_TOKEN": self.token, "CHARFORGE_REPLICATE_API_URL": self.url}

    def add_model(
        self,
        full_name: str,
        kind: str,
        *,
        upstream: Any = None,
        hardware: str = "gpu-a100-large",
        versions: int = 1,
        lora_base: str = "sd15",
    ) -> FakeModel:
        owner, _, name = full_name.partition("/")
        model = FakeModel(
            owner, name, kind, hardware, [self._version_id() for _ in range(versions)], upstream, lora_base
        )
        self.models[full_name] = model
        return model

    def _version_id(self) -> str:
        return "".join(self._rng.choice("0123456789abcdef") for _ in range(64))

    def bill(self, kind: str | None = None) -> float:
        """What Replicate would charge: predict_time x the hardware's price, over every finished job."""
        return sum(
            (j.predict_time or 0.0) * PRICES[j.model.hardware]
            for j in self.jobs.values()
            if kind is None or j.kind == kind
        )

    def tagged(self) -> list[str]:
        """The CharForge tag of every prediction created (duplicates mean a job was created twice)."""
        tags = []
        for job_id in self.created:
            text = self.jobs[job_id].input.get("workflow_json", "")
            with contextlib.suppress(ValueError, AttributeError):
                for node in json.loads(text).values():
                    tag = (node.get("_meta") or {}).get("charforge_job")
                    if tag:
                        tags.append(tag)
        return tags

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def _startup(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/predictions", self.h_create_prediction)
        r.add_get("/v1/predictions", self.h_list)
        r.add_get("/v1/predictions/{id}", self.h_get)
        r.add_post("/v1/predictions/{id}/cancel", self.h_cancel)
        r.add_post("/v1/models/{owner}/{name}/predictions", self.h_create_prediction)
        r.add_get("/v1/models/{owner}/{name}", self.h_model)
        r.add_get("/v1/models/{owner}/{name}/versions/{version}", self.h_version)
        r.add_post("/v1/models/{owner}/{name}/versions/{version}/trainings", self.h_create_training)
        r.add_get("/v1/trainings", self.h_list)
        r.add_get("/v1/trainings/{id}", self.h_get)
        r.add_post("/v1/trainings/{id}/cancel", self.h_cancel)
        r.add_post("/v1/files", self.h_upload)
        r.add_get("/v1/files/{id}", self.h_file)
        r.add_get("/delivery/{key:.+}", self.h_delivery)
        await self._listen(app, client_session=True)

    async def _shutdown(self) -> None:
        await self._cleanup(job.task for job in self.jobs.values())

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        status = 0
        try:
            if request.path.startswith("/v1/"):
                if request.headers.get("Authorization") != f"Bearer {self.token}":
                    status = 401
                    return web.json_response(
                        {
                            "title": "Unauthenticated",
                            "detail": "You did not pass a valid authentication token",
                            "status": 401,
                        },
                        status=401,
                    )
                headers = throttled(self.knobs)
                if headers is not None:
                    status = 429
                    return web.json_response(
                        {"detail": "Request was throttled. Expected available in 1 second.", "status": 429},
                        status=429,
                        headers=headers,
                    )
                if self.knobs.fail_next > 0:
                    self.knobs.fail_next -= 1
                    status = self.knobs.fail_status
                    text = (
                        f"upstream error (token {self.token})" if self.knobs.echo_token else "upstream error"
                    )
                    return web.Response(status=status, text=text)
            response = await handler(request)
            status = response.status
            return response
        finally:
            self.requests.append((request.method, request.path, status))

    # ---- predictions and trainings ---------------------------------------------------------------------------

    def _problem(self, status: int, detail: str) -> web.Response:
        return web.json_response(
            {"title": "Invalid request", "detail": detail, "status": status}, status=status
        )

    def _version_owner(self, version: str) -> tuple[FakeModel, str] | None:
        ident = version.split(":", 1)[-1]
        for model in self.models.values():
            if ident in model.versions:
                return model, ident
        return None

    async def _answer_created(self, request: web.Request, job: FakeJob) -> web.StreamResponse:
        self.jobs[job.id] = job
        self.created.append(job.id)
        job.task = asyncio.ensure_future(self._run(job))
        if self.knobs.lose_create_answers > 0:
            self.knobs.lose_create_answers -= 1
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        prefer = request.headers.get("Prefer", "")
        if prefer.startswith("wait"):
            seconds = float(prefer.partition("=")[2] or 60)
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(job.task), seconds)
        return web.json_response(job.to_dict(self.url), status=201)

    async def h_create_prediction(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return self._problem(400, "body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return self._problem(422, "input is required")
        if "owner" in request.match_info:
            model = self.models.get(f"{request.match_info['owner']}/{request.match_info['name']}")
            if model is None:
                return self._problem(404, "model not found")
            version = model.versions[-1]
        else:
            found = self._version_owner(str(body.get("version") or ""))
            if found is None:
                return self._problem(422, "Invalid version or not permitted")
            model, version = found
        if model.kind != "comfyui":
            return self._problem(422, f"{model.full_name} does not take predictions here")
        return await self._answer_created(
            request, FakeJob(new_id(self._rng), "prediction", model, version, body["input"], time.time())
        )

    async def h_create_training(self, request: web.Request) -> web.StreamResponse:
        model = self.models.get(f"{request.match_info['owner']}/{request.match_info['name']}")
        if model is None or request.match_info["version"] not in model.versions or model.kind != "trainer":
            return self._problem(404, "trainer version not found")
        body = await request.json()
        destination = str(body.get("destination") or "")
        if destination not in self.models:
            return self._problem(422, f"The specified training destination {destination} does not exist")
        return await self._answer_created(
            request,
            FakeJob(
                new_id(self._rng),
                "training",
                model,
                request.match_info["version"],
                dict(body.get("input") or {}),
                time.time(),
                destination=destination,
            ),
        )

    def _job(self, request: web.Request) -> FakeJob | None:
        job = self.jobs.get(request.match_info["id"])
        kind = "prediction" if request.path.startswith("/v1/predictions") else "training"
        return job if job is not None and job.kind == kind else None

    async def h_get(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if job is None:
            return self._problem(404, "Not found.")
        return web.json_response(job.to_dict(self.url))

    async def h_cancel(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if job is None:
            return self._problem(404, "Not found.")
        if job.status in ("starting", "processing"):
            job.status = "canceled"
            job.finished = time.time() if job.started is not None else None
            if job.task is not None:
                job.task.cancel()
        return web.json_response(job.to_dict(self.url))

    async def h_list(self, request: web.Request) -> web.Response:
        kind = "prediction" if request.path == "/v1/predictions" else "training"
        jobs = sorted(
            (j for j in self.jobs.values() if j.kind == kind), key=lambda j: j.created, reverse=True
        )
        start = int(request.query.get("cursor", "0"))
        page = jobs[start : start + self.knobs.page_size]
        more = start + self.knobs.page_size < len(jobs)
        nxt = f"{self.url}{request.path}?cursor={start + self.knobs.page_size}" if more else None
        return web.json_response(
            {"previous": None, "next": nxt, "results": [j.to_dict(self.url) for j in page]}
        )

    # ---- models, files, delivery --------------------------------------------------------------------------

    def _version_json(self, model: FakeModel, version: str) -> dict[str, Any]:
        return {
            "id": version,
            "created_at": iso(time.time()),
            "cog_version": "0.9.0",
            "openapi_schema": {"components": {"schemas": {"Input": {"properties": {}}}}},
        }

    async def h_model(self, request: web.Request) -> web.Response:
        model = self.models.get(f"{request.match_info['owner']}/{request.match_info['name']}")
        if model is None:
            return self._problem(404, "Not found.")
        latest = self._version_json(model, model.versions[-1]) if model.versions else None
        return web.json_response(
            {
                "url": f"https://replicate.com/{model.full_name}",
                "owner": model.owner,
                "name": model.name,
                "visibility": "public",
                "latest_version": latest,
            }
        )

    async def h_version(self, request: web.Request) -> web.Response:
        model = self.models.get(f"{request.match_info['owner']}/{request.match_info['name']}")
        version = request.match_info["version"]
        if model is None or version not in model.versions:
            return self._problem(404, "Not found.")
        return web.json_response(self._version_json(model, version))

    async def h_upload(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        name, ctype, data, metadata = "file", "application/octet-stream", None, {}
        async for part in reader:
            if part.name == "content":
                name = part.filename or name
                ctype = part.headers.get("Content-Type", ctype)
                data = await part.read()
            elif part.name == "metadata":
                metadata = json.loads(await part.text())
        if data is None:
            return self._problem(422, "content is required")
        file_id = new_id(self._rng)
        self.files[file_id] = (name, ctype, bytes(data))
        return web.json_response(
            {
                "id": file_id,
                "name": name,
                "content_type": ctype,
                "size": len(data),
                "metadata": metadata,
                "created_at": iso(time.time()),
                "urls": {"get": f"{self.url}/v1/files/{file_id}"},
            },
            status=201,
        )

    async def h_file(self, request: web.Request) -> web.Response:
        item = self.files.get(request.match_info["id"])
        if item is None:
            return self._problem(404, "Not found.")
        return web.json_response({"id": request.match_info["id"], "name": item[0], "size": len(item[2])})

    async def h_delivery(self, request: web.Request) -> web.Response:
        data = self.delivery.get(request.match_info["key"])
        if data is None:
            return web.Response(status=404, text="Not found")
        return web.Response(body=data, content_type="application/octet-stream")

    def _file_bytes(self, url: Any) -> bytes | None:
        if not isinstance(url, str) or "/v1/files/" not in url:
            return None
        item = self.files.get(url.rstrip("/").rsplit("/", 1)[-1])
        return item[2] if item else None

    # ---- the models' work ------------------------------------------------------------------------------------

    async def _run(self, job: FakeJob) -> None:
        try:
            await asyncio.sleep(self.knobs.start_delay)
            if job.status != "starting":
                return
            job.status, job.started = "processing", time.time()
            if job.kind == "training":
                job.output, job.error = await self._train(job)
            else:
                job.output, job.error = await self._comfy(job)
            job.finished, job.billed = time.time(), self.knobs.bill_seconds
            job.status = "failed" if job.error else "succeeded"
        except asyncio.CancelledError:
            if job.prompt_id and job.model.upstream is not None and self._session is not None:
                with contextlib.suppress(Exception):
                    await self._session.post(
                        f"{job.model.upstream.url}/interrupt", json={"prompt_id": job.prompt_id}
                    )
            raise

    async def _comfy(self, job: FakeJob) -> tuple[Any, Any]:
        """What any-comfyui-workflow does: unpack input_file into input/, queue the workflow, return files."""
        assert self._session is not None
        base = job.model.upstream.url.rstrip("/")
        job.logs.append("Checking inputs")
        text = job.input.get("workflow_json")
        try:
            workflow = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            workflow = None
        if not isinstance(workflow, dict):
            return None, "workflow_json is not valid JSON"
        if self.knobs.fail_when and self.knobs.fail_when in text:
            job.logs.append("Traceback (most recent call last):\nRuntimeError: CUDA out of memory")
            return None, "RuntimeError: CUDA out of memory"
        archive = self._file_bytes(job.input.get("input_file"))
        if job.input.get("input_file") is not None and archive is None:
            return None, "input_file: cannot fetch the file"
        if archive is not None:
            with zipfile.ZipFile(io.BytesIO(archive)) as zf:
                for name in zf.namelist():
                    form = aiohttp.FormData()
                    form.add_field("image", zf.read(name), filename=name)
                    form.add_field("overwrite", "true")
                    async with self._session.post(f"{base}/upload/image", data=form) as resp:
                        if resp.status != 200:
                            return None, f"cannot copy {name} to the input folder"
                    job.logs.append(f"Extracted {name}")
        job.prompt_id = new_id(self._rng)
        job.logs.append("Running workflow")
        async with self._session.post(
            f"{base}/prompt", json={"prompt": workflow, "client_id": "cog", "prompt_id": job.prompt_id}
        ) as resp:
            answer = await resp.json()
            if resp.status != 200:
                job.logs.append(json.dumps(answer))
                return None, f"ComfyUI rejected the workflow: {json.dumps(answer.get('node_errors'))[:300]}"
        entry = await history_entry(self._session, base, job.prompt_id, 0.03)
        status = entry.get("status") or {}
        for message in status.get("messages") or []:
            if message[0] == "execution_start":
                continue
            if message[0] == "execution_cached":
                job.logs.append(f"Cached nodes: {message[1].get('nodes')}")
        if status.get("status_str") == "error":
            errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
            detail = errors[0] if errors else {}
            job.logs.append(f"Error in node {detail.get('node_id')} ({detail.get('node_type')})")
            return None, f"{detail.get('exception_type')}: {detail.get('exception_message')}"
        urls = []
        for node_output in (entry.get("outputs") or {}).values():
            for items in node_output.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if not isinstance(item, dict) or "filename" not in item:
                        continue
                    if item.get("type") == "temp" and not job.input.get("return_temp_files"):
                        continue
                    params = {
                        "filename": item["filename"],
                        "subfolder": item.get("subfolder", ""),
                        "type": item.get("type", "output"),
                    }
                    async with self._session.get(f"{base}/view", params=params) as resp:
                        content = await resp.read()
                    delivery_key = f"{job.id}/{item['filename']}"
                    self.delivery[delivery_key] = content
                    urls.append(f"{self.url}/delivery/{delivery_key}")
        job.logs.append(f"Prompt executed, {len(urls)} output file(s)")
        return urls, None

    async def _train(self, job: FakeJob) -> tuple[Any, Any]:
        """A hosted LoRA trainer: read the images zip, 'train', return a tar with lora.safetensors."""
        archive = self._file_bytes(job.input.get("input_images"))
        if archive is None:
            return None, "input_images: a zip of training images is required"
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            images = [n for n in zf.namelist() if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))]
            captions = [n for n in zf.namelist() if n.endswith(".txt")]
        if not images:
            return None, "no images found in input_images"
        steps = int(job.input.get("steps", 1000))
        rank = int(job.input.get("lora_rank", 16))
        job.logs.append(f"Found {len(images)} images and {len(captions)} captions")
        for step in (1, steps // 2, steps):
            await asyncio.sleep(self.knobs.train_seconds / 3)
            job.logs.append(f"step {step}/{steps}")
        lora = fake_lora(job.model.lora_base, rank, str(job.input.get("trigger_word", "TOK")))
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, data in (
                ("output/flux_train_replicate/lora.safetensors", lora),
                ("output/flux_train_replicate/config.yaml", b"job: train\n"),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        key = f"{job.id}/trained_model.tar"
        self.delivery[key] = buffer.getvalue()
        model = self.models[str(job.destination)]
        version = self._version_id()
        model.versions.append(version)
        return {"version": f"{model.full_name}:{version}", "weights": f"{self.url}/delivery/{key}"}, None


@contextlib.contextmanager
def trainer_fake(monkeypatch: Any, tmp_path: Path, destination: str) -> Iterator[FakeReplicate]:
    """A fake Replicate with an ostris-style Flux LoRA trainer (:data:`TRAINER`, on an H100, making SD1.5-sized
    LoRAs) and the empty `destination` model, with the command line pointed at it (polling every 0.05 s)."""
    from cf_testing.cli import point_cli_at

    with FakeReplicate() as fake:
        fake.add_model(TRAINER, "trainer", hardware="gpu-h100", lora_base="sd15")
        fake.add_model(destination, "plain", versions=0)
        config = "replicate:\n  poll_interval: 0.05\n  hardware: gpu-h100\n"
        point_cli_at(monkeypatch, fake.env(), tmp_path / "config.yaml", config)
        yield fake


def fake_lora(base: str, rank: int, trigger: str) -> bytes:
    """A small kohya-layout LoRA safetensors file (zeros) for SD1.5 or SDXL attention layers."""
    width = 320 if base == "sd15" else 640
    prefix = "lora_unet_down_blocks_0" if base == "sd15" else "lora_unet_down_blocks_1"
    header: dict[str, Any] = {
        "__metadata__": {
            "ss_output_name": "replicate",
            "ss_tag_frequency": json.dumps({"img": {trigger: 3}}),
            "ss_base_model_version": "sd_v1" if base == "sd15" else "sdxl_base_v1-0",
        }
    }
    offset = 0
    parts = []
    for block in range(2):
        for proj in ("to_q", "to_k", "to_v"):
            name = f"{prefix}_attentions_{block}_transformer_blocks_0_attn1_{proj}"
            for key, shape in (
                (f"{name}.lora_down.weight", [rank, width]),
                (f"{name}.lora_up.weight", [width, rank]),
                (f"{name}.alpha", []),
            ):
                count = 1
                for d in shape:
                    count *= d
                size = count * 2
                header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
                parts.append(b"\x00" * size if not key.endswith("alpha") else struct.pack("<e", float(rank)))
                offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(parts)
