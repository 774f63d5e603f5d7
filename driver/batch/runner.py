"""Running a batch on a pool of servers, crash-safe (``charforge batch run``, :class:`Batch`).

How it works, and what it guarantees:

* **Pool and window.** Each target (server) gets ``capacity`` worker slots; a worker takes the next job that is
  valid on its target, so jobs go to whichever server has room and no server's queue is flooded.
* **Preflight.** Before a job is first sent to a server, its graph is built and checked against that server's
  ``/object_info`` (:meth:`Target.prepare`). A job invalid on a server is never sent there; invalid on every
  server, it fails with the reasons (deterministic, no retry).
* **Journal first.** The prompt id is chosen and journaled (``submitting``) *before* the POST, and every later
  transition is journaled (``fsync``) before the runner acts on it (:mod:`~charforge.driver.batch.journal`).
* **Resume.** Rerunning on the same output folder replays the journal: ``done`` jobs are skipped; jobs that
  were submitted are looked up on their server first (queue, then history): still queued or running -> followed,
  finished -> collected, unknown to the server (restart) -> resubmitted with a *new* prompt id, unless their
  outputs are already in place. A job is therefore never sent again while a server still knows it.
* **Downloads exactly once.** Outputs are downloaded into ``.staging/<job>-<prompt>/`` with the manifest, then
  the folder is renamed into place in one step; a job folder with a ``manifest.json`` is complete, and a
  collected job is never downloaded again.
* **Retries.** Transient failures (connection errors, 5xx, 429 with ``Retry-After`` honoured) are retried with
  exponential backoff and jitter; deterministic ones (validation errors, node exceptions) are not.
* **Timeout.** ``timeout`` is a wall-clock limit per job from its submission, downloads included; the job is
  cancelled on its server (or its half-downloaded staging folder removed) and marked ``timed_out``.
* **Trained LoRAs home.** A job whose outputs show a Train LoRA run (its text names the LoRA and the run
  folder) is ``done`` only once the LoRA and its run folder are in ``<job>/lora/`` too. The manifest is renamed
  into place first with the training ``pending``; the LoRA comes home after (resumed, sha256-checked) and the
  manifest is rewritten with it. A crash in between resumes by downloading (a job folder with a manifest is
  never submitted again); a download that fails is ``failed`` with kind ``home``, and the next run downloads
  it without ``--retry-failed`` and without running the job again.
* **Uploads** (``upload_to``: ``s3://bucket/prefix``): each ``done`` job's folder goes to
  ``prefix/<job folder>/`` as soon as it is done (journaled ``uploaded``), the batch's own files at the end of
  a run; a resumed batch uploads done jobs not yet uploaded, and unchanged objects are never sent again.
* **Ctrl-C** stops the workers between journal writes; jobs already on a server keep running there and are
  collected by the next run.

(Over 600 lines on purpose: :class:`BatchRunner` is one state machine whose every transition is journaled before
it acts; read top to bottom it shows that rule holding, which spreading it over modules would hide. What is not
that state machine lives beside it: :mod:`.run_types` (options, outcomes), :mod:`.lora_home` (trained LoRAs home),
:mod:`.uploads` (``upload_to``), and planning, targets, the journal, summaries and the Python API.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import IO, Any

from charforge.common.retry import Backoff

from ..errors import (
    DriverError,
    ExecutionError,
    Interrupted,
    JobLost,
    JobTimeout,
    ServerUnavailable,
    UsageError,
)
from ..manifest import build_manifest, write_manifest
from ..sync import trained_loras
from ..workflow.load import Workflow, load_workflow
from .journal import IN_FLIGHT, JOURNAL_NAME, Journal, replay
from .lora_home import LoraHome, _pending_training
from .plan import BatchError, BatchPlan, Job, plan_entry, plan_hash
from .run_types import STAGING, JobOutcome, RunOptions, Step, _reason, _Retryable
from .summary import PLAN_NAME, SUMMARY_NAME, build_summary, write_json_atomic
from .targets import JobSpec, Target, is_transient, retry_after
from .uploads import Uploads


class BatchRunner(LoraHome, Uploads):
    """Runs one plan on a pool of targets into ``options.out`` (use :class:`Batch` for the friendly API)."""

    def __init__(
        self,
        plan: BatchPlan,
        targets: list[Target],
        options: RunOptions,
        *,
        base: Path | None = None,
        on_message: Callable[[str], None] | None = None,
    ) -> None:
        if not targets:
            raise UsageError("a batch needs at least one server (--server URL or --profile NAME)")
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise UsageError(f"the same server is given twice: {', '.join(names)}")
        self.plan = plan
        self.targets = targets
        self.options = options
        self.out = Path(options.out)
        self.base = base or (
            Path(plan.source).parent if plan.source and Path(plan.source).exists() else Path(".")
        )
        self.note = on_message or (lambda text: None)
        self.jobs = {job.id: job for job in plan.jobs}
        if len(self.jobs) != len(plan.jobs):
            raise BatchError(
                "the plan has two jobs with the same id (identical workflow, overrides and inputs)"
            )
        self.journal: Journal | None = None
        self._workflows: dict[str, Workflow] = {}
        self._pending: deque[str] = deque()
        self._recover: dict[str, deque[str]] = {t.name: deque() for t in targets}
        self._excluded: dict[str, set[str]] = {}
        self._active = 0
        self._cond: asyncio.Condition | None = None
        self._results: asyncio.Queue[JobOutcome | None] | None = None
        self._rng = random.Random()
        self._upload_later: list[str] = []
        self._backoff = Backoff(
            attempts=max(0, options.retries) + 1, base=options.backoff, cap=options.backoff_max
        )
        self._job_infos = [{"id": j.id, "folder": j.folder} for j in plan.jobs]  # what the summary needs
        self._no_files: set[str] = set()  # targets found without CharForge's file routes (noted once)
        self._location: Any = None  # the S3Location of upload_to
        self._storage: Any = options.storage
        self._uploads: asyncio.Queue[str | None] | None = None
        self._uploaded_now = 0
        if options.upload_to:
            from ..storage.s3 import S3Location

            self._location = S3Location.parse(
                options.upload_to
            )  # a wrong location fails before anything runs

    # ---- setup --------------------------------------------------------------------------------------------

    def _lock(self) -> None:
        """Hold ``.lock`` in the batch folder: two runners on one folder would submit jobs twice."""
        self.out.mkdir(parents=True, exist_ok=True)
        handle = open(self.out / ".lock", "a+")  # noqa: SIM115 - held until the run ends
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows: no advisory lock, rely on the user
            pass
        except OSError:
            handle.close()
            raise BatchError(
                f"another 'charforge batch run' is using {self.out}; wait for it or stop it "
                "('charforge batch status' shows its progress)"
            ) from None
        self._lock_handle: IO[str] | None = handle

    def _unlock(self) -> None:
        handle = getattr(self, "_lock_handle", None)
        if handle is not None:
            handle.close()
            self._lock_handle = None

    def _open_journal(self) -> Journal:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / JOURNAL_NAME
        state = replay(path)
        digest = plan_hash(self.plan, self.base)
        journal = Journal(path, state, fsync=self.options.fsync)
        if state.plan_hash is None:
            journal.append(
                "batch",
                plan_hash=digest,
                jobs=len(self.plan.jobs),
                source=self.plan.source,
                master_seed=self.plan.master_seed,
            )
        elif state.plan_hash != digest:
            if not self.options.force_replan:
                journal.close()
                raise BatchError(
                    f"the batch in {self.out} was planned from a different batch file or workflow (plan "
                    f"{state.plan_hash}, now {digest}); use another --out, or --force-replan to continue with "
                    "the new plan (finished jobs with the same id are kept)"
                )
            journal.append("replan", plan_hash=digest, jobs=len(self.plan.jobs))
        graphs: dict[int, str] = {}
        write_json_atomic(
            self.out / PLAN_NAME,
            {
                "source": self.plan.source,
                "kind": self.plan.kind,
                "master_seed": self.plan.master_seed,
                "plan_hash": digest,
                "jobs": [plan_entry(j, graphs) for j in self.plan.jobs],
            },
            indent=None,
        )
        return journal

    def _schedule(self, journal: Journal) -> list[JobOutcome]:
        """Sort every job into: already finished (returned), to recover on a server, or to submit."""
        finished = []
        names = {t.name for t in self.targets}
        for job in self.plan.jobs:
            js = journal.state.jobs.get(job.id)
            folder = self.out / job.folder
            if js is None or js.state == "pending":
                self._pending.append(job.id)
            elif js.state == "done":
                finished.append(
                    JobOutcome(
                        job,
                        "done",
                        folder,
                        js.prompt_id,
                        js.server,
                        [folder / f for f in js.files],
                        skipped=True,
                    )
                )
                if self._location is not None and not js.uploaded:
                    self._upload_later.append(job.id)
            elif js.state == "failed" and js.kind == "home" and (folder / "manifest.json").exists():
                # the job ran and its outputs are here; only its LoRA must come home: download, never rerun
                if js.server in names:
                    self._recover[js.server].append(job.id)
                else:
                    self.note(
                        f"{job.folder}: its LoRA is on {js.server}, not in this run's pool: left for a "
                        "later run"
                    )
            elif js.state in ("failed", "timed_out"):
                if js.kind == "transient" or self.options.retry_failed:
                    journal.append("requeue", job=job.id, reason=f"rerun after {js.state} ({js.kind})")
                    self._pending.append(job.id)
                else:
                    finished.append(
                        JobOutcome(
                            job, js.state, folder, js.prompt_id, js.server, reason=js.reason, skipped=True
                        )
                    )
            elif js.state in IN_FLIGHT:
                if js.prompt_id and js.server in names:
                    self._recover[js.server].append(job.id)
                elif (folder / "manifest.json").exists():
                    if self.options.lora_home and _pending_training(folder):
                        self.note(
                            f"{job.folder}: its LoRA is on {js.server}, not in this run's pool: left for a "
                            "later run"
                        )
                        continue
                    self._recover[self.targets[0].name].append(job.id)  # collected already: just journal it
                else:
                    # We cannot ask: the server is not in this pool, or it assigns ids and the driver died
                    # before journaling the one it returned. Submitting again is all that is left.
                    reason = (
                        "its server is not in this run's pool"
                        if js.server not in names
                        else "the id the server assigned was never journaled"
                    )
                    journal.append(
                        "lost", job=job.id, prompt_id=js.prompt_id, server=js.server, reason=reason
                    )
                    self._pending.append(job.id)
        return finished

    def _spec(self, job: Job) -> JobSpec:
        if job.workflow is not None:
            wf = self._workflows.get(job.workflow)
            if wf is None:
                path = Path(job.workflow).expanduser()
                wf = self._workflows[job.workflow] = load_workflow(
                    path if path.is_absolute() else self.base / path
                )
            workflow: Any = wf
        else:
            workflow = job.prompt or {}
        inputs = {}
        for key, value in (job.inputs or {}).items():
            p = Path(str(value)).expanduser()
            inputs[key] = str(p if p.is_absolute() else self.base / p)
        return JobSpec(workflow, list(job.overrides), inputs, job.workflow)

    # ---- scheduling -----------------------------------------------------------------------------------------

    async def _next(self, target: Target) -> tuple[str, bool] | None:
        """The next job for ``target``: its own jobs to recover first, then any job valid on it; None = done."""
        assert self._cond is not None
        async with self._cond:
            while True:
                rec = self._recover[target.name]
                if rec:
                    self._active += 1
                    return rec.popleft(), True
                for _ in range(len(self._pending)):
                    job_id = self._pending.popleft()
                    if target.name in self._excluded.get(job_id, ()):
                        self._pending.append(job_id)
                        continue
                    self._active += 1
                    return job_id, False
                if self._active == 0 and not any(self._recover.values()):
                    return None  # nothing left that this target can run, and nobody can hand one back
                await self._cond.wait()

    async def _release(
        self, job_id: str | None = None, *, requeue: bool = False, front: bool = False
    ) -> None:
        assert self._cond is not None
        async with self._cond:
            self._active -= 1
            if requeue and job_id is not None:
                if front:
                    self._pending.appendleft(job_id)
                else:
                    self._pending.append(job_id)
            self._cond.notify_all()

    async def _worker(self, target: Target) -> None:
        while True:
            item = await self._next(target)
            if item is None:
                return
            job_id, recovering = item
            step = Step.ENDED
            try:
                step = await self._process(self.jobs[job_id], target, recovering)
            finally:
                await self._release(job_id, requeue=step is Step.REQUEUE)

    # ---- one job -------------------------------------------------------------------------------------------

    def _log(self, ev: str, **data: Any) -> dict[str, Any]:
        assert self.journal is not None
        return self.journal.append(ev, **data)

    async def _retrying(self, job: Job, what: str, fn: Callable[[], Any]) -> Any:
        """``await fn()``, retrying transient failures with exponential backoff + jitter (Retry-After honoured)."""
        attempt = 0
        while True:
            try:
                return await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc):
                    raise
                if self._backoff.is_last(attempt):
                    raise _Retryable(
                        f"{what}: {_reason(exc)} (gave up after {self.options.retries} retries)"
                    ) from exc
                # Jittered, so servers recovering are not hit in lockstep; a Retry-After may ask for longer.
                delay = self._backoff.delay(attempt, rng=self._rng.random)
                attempt += 1
                hinted = retry_after(exc)
                if hinted is not None:
                    delay = max(delay, min(hinted, self.options.backoff_max * 5))
                self._log(
                    "retry",
                    job=job.id,
                    what=what,
                    reason=_reason(exc).splitlines()[0],
                    delay=round(delay, 3),
                    attempt=attempt,
                )
                await asyncio.sleep(delay)

    def _finish(self, outcome: JobOutcome) -> None:
        assert self._results is not None
        self._results.put_nowait(outcome)

    def _fail(
        self,
        job: Job,
        ev: str,
        kind: str,
        reason: str,
        target: Target | None = None,
        prompt_id: str | None = None,
    ) -> None:
        self._log(
            ev,
            job=job.id,
            kind=kind,
            reason=reason,
            server=target.name if target else None,
            prompt_id=prompt_id,
        )
        self.note(f"{job.folder}: {ev.replace('_', ' ')} ({kind}): {reason.splitlines()[0]}")
        self._finish(
            JobOutcome(
                job, ev, self.out / job.folder, prompt_id, target.name if target else None, reason=reason
            )
        )

    async def _process(self, job: Job, target: Target, recovering: bool) -> Step:
        """Take one job to an end (:attr:`Step.ENDED`) or hand it back (:attr:`Step.REQUEUE`)."""
        js = self.journal.state.job(job.id)  # type: ignore[union-attr]
        try:
            prompt_id: str | None = js.prompt_id if recovering else None
            if recovering and (self.out / job.folder / "manifest.json").exists():
                await self._collect(job, target, prompt_id, None)  # collected before the crash
                return Step.ENDED
            where = None
            if prompt_id is not None:
                known_id = prompt_id
                where = await self._retrying(job, "looking the job up", lambda: target.lookup(known_id))
                if where == "unknown":
                    self._log(
                        "lost",
                        job=job.id,
                        prompt_id=prompt_id,
                        server=target.name,
                        reason="the server does not know the job (restarted?)",
                    )
                    prompt_id = None
            resubmits = 0
            while True:
                if prompt_id is None:
                    submitted = await self._submit(job, target)
                    if isinstance(submitted, Step):
                        return submitted  # invalid here (back to the queue), or failed for good
                    prompt_id = submitted
                step = await self._follow(job, target, prompt_id, finished=where == "finished")
                where = None
                if step is Step.LOST:
                    resubmits += 1
                    if resubmits > self.options.max_resubmits:
                        self._fail(
                            job,
                            "failed",
                            "lost",
                            f"the server lost the job {resubmits} times",
                            target,
                            prompt_id,
                        )
                        return Step.ENDED
                    prompt_id = None
                    continue
                return Step.ENDED
        except _Retryable as exc:
            self._fail(job, "failed", "transient", str(exc), target, js.prompt_id)
            return Step.ENDED
        except (DriverError, OSError) as exc:  # e.g. an output the server will not serve, a full disk
            self._fail(job, "failed", "error", _reason(exc), target, js.prompt_id)
            return Step.ENDED

    async def _submit(self, job: Job, target: Target) -> str | Step:
        """Prepare (preflight) and submit; returns the prompt id, :attr:`Step.REQUEUE` when the job is invalid on
        this server only, :attr:`Step.ENDED` when it failed for good."""
        try:
            graph = await self._retrying(job, "preparing", lambda: target.prepare(self._spec(job)))
        except UsageError as exc:  # ValidationError, OverrideError, WorkflowError: invalid on this target
            reason = _reason(exc)
            self._log("invalid", job=job.id, server=target.name, reason=reason)
            excluded = self._excluded.setdefault(job.id, set())
            excluded.add(target.name)
            if excluded >= {t.name for t in self.targets}:
                js = self.journal.state.job(job.id)  # type: ignore[union-attr]
                reasons = "; ".join(f"{s}: {r.splitlines()[0]}" for s, r in js.invalid_on.items())
                self._fail(
                    job, "failed", "validation", f"invalid on every server: {reasons}\n{reason}", target
                )
                return Step.ENDED
            return Step.REQUEUE
        prompt_id = str(uuid.uuid4()) if target.supports_prompt_ids else None
        self._log("submitting", job=job.id, prompt_id=prompt_id, server=target.name)
        try:

            async def submit() -> str:
                try:
                    return await target.submit(graph, prompt_id)
                except Exception as exc:
                    # The request may have arrived before the failure: look before sending it again.
                    if prompt_id is not None and is_transient(exc):
                        with contextlib.suppress(Exception):
                            if await target.lookup(prompt_id) != "unknown":
                                return prompt_id
                    raise

            accepted = await self._retrying(job, "submitting", submit)
        except UsageError as exc:  # the server's own validation rejected it
            reason = _reason(exc)
            self._log("invalid", job=job.id, server=target.name, reason=reason)
            self._excluded.setdefault(job.id, set()).add(target.name)
            if self._excluded[job.id] >= {t.name for t in self.targets}:
                self._fail(job, "failed", "validation", reason, target, prompt_id)
                return Step.ENDED
            return Step.REQUEUE
        self._log("submitted", job=job.id, prompt_id=accepted, server=target.name)
        return accepted

    async def _follow(self, job: Job, target: Target, prompt_id: str, finished: bool = False) -> Step:
        """Wait for the job and collect it: :attr:`Step.LOST` when the server forgot it, else :attr:`Step.ENDED`."""
        js = self.journal.state.job(job.id)  # type: ignore[union-attr]
        timeout = self.options.timeout
        remaining = None
        if timeout is not None and not finished:  # a finished job is collected, however late we come back
            remaining = timeout - (time.time() - (js.submitted_at or time.time()))
            if remaining <= 0:  # resumed after its deadline: one look first, it may have finished meanwhile
                remaining = 1.0
        try:
            result = await self._retrying(job, "waiting", lambda: target.wait(prompt_id, remaining))
        except JobLost as exc:
            self._log("lost", job=job.id, prompt_id=prompt_id, server=target.name, reason=_reason(exc))
            return Step.LOST
        except JobTimeout:
            with contextlib.suppress(Exception):
                await target.cancel(prompt_id)
            self._fail(
                job,
                "timed_out",
                "timeout",
                f"did not finish within {timeout:g} s; cancelled",
                target,
                prompt_id,
            )
            return Step.ENDED
        except ExecutionError as exc:
            self._fail(job, "failed", "execution", _reason(exc), target, prompt_id)
            return Step.ENDED
        except Interrupted as exc:
            self._fail(job, "failed", "interrupted", _reason(exc), target, prompt_id)
            return Step.ENDED
        if js.state != "finished":
            self._log(
                "finished",
                job=job.id,
                prompt_id=prompt_id,
                server=target.name,
                execution_seconds=result.timings.execution_seconds,
            )
        # The job's time limit covers its downloads: what is left of it, or all of it for a job found finished
        # when a run resumes (however late we come back, it gets one full try).
        download_limit = None
        if timeout is not None:
            download_limit = (
                timeout if finished else max(0.0, timeout - (time.time() - (js.submitted_at or time.time())))
            )
        try:
            await self._collect(job, target, prompt_id, result, download_limit)
        except JobTimeout:
            self._fail(
                job,
                "timed_out",
                "timeout",
                f"downloading its outputs did not finish within {timeout:g} s",
                target,
                prompt_id,
            )
        return Step.ENDED

    async def _collect(
        self,
        job: Job,
        target: Target,
        prompt_id: str | None,
        result: Any,
        download_limit: float | None = None,
    ) -> None:
        """Download into a staging folder, write the manifest, rename into place, journal ``done``.

        Raises :class:`JobTimeout` when the downloads take longer than ``download_limit`` seconds (the staging
        folder is removed).
        """
        final = self.out / job.folder
        js = self.journal.state.job(job.id)  # type: ignore[union-attr]
        if not (final / "manifest.json").exists():
            staging = self.out / STAGING / f"{job.id}-{result.prompt_id}"
            started = time.monotonic()

            async def download() -> list:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                return await target.download(result, staging)

            if download_limit is None:
                downloads = await self._retrying(job, "downloading", download)
            else:
                try:
                    downloads = await asyncio.wait_for(
                        self._retrying(job, "downloading", download), download_limit
                    )
                except asyncio.TimeoutError:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise JobTimeout(
                        f"downloading the outputs of job {job.id} did not finish within {download_limit:g} s",
                        prompt_id=result.prompt_id,
                        seconds=download_limit,
                    ) from None
            manifest = build_manifest(
                result,
                downloads,
                out_dir=staging,
                server=target.name,
                workflow_source=job.workflow,
                wall_seconds=time.monotonic() - started,
            )
            manifest["batch"] = {
                "job": job.id,
                "name": job.name,
                "folder": job.folder,
                "axes": job.axes,
                "seed": job.seed,
                "tags": job.tags,
                "set": job.overrides,
            }
            trained = trained_loras(manifest.get("values") or {}) if self.options.lora_home else []
            if trained:  # renamed into place with the training pending; its LoRA comes home next
                manifest["training"] = [
                    {"node_id": t.node_id, "lora": t.lora, "run_dir": t.run_dir, "state": "pending"}
                    for t in trained
                ]
            write_manifest(staging, manifest)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # an empty or foreign folder without a manifest: keep it aside, never mix
                final.rename(final.with_name(f"{final.name}.stale-{int(time.time())}"))
            os.rename(staging, final)
            prompt_id = result.prompt_id
        if self.options.lora_home and not await self._bring_home(job, target, final, prompt_id):
            return
        files = []
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads((final / "manifest.json").read_text(encoding="utf-8"))
            files = [f["path"] for f in manifest.get("files", [])]
            prompt_id = prompt_id or manifest.get("prompt_id")
        seconds = round(time.time() - js.first_submitted_at, 3) if js.first_submitted_at else None
        costs = getattr(
            target, "job_costs", None
        )  # targets that price their jobs (RunPod) keep them by prompt id
        cost = costs.get(prompt_id) if isinstance(costs, dict) and prompt_id else None
        extra = {"cost": round(float(cost), 6)} if cost is not None else {}
        self._log(
            "done", job=job.id, prompt_id=prompt_id, server=target.name, files=files, seconds=seconds, **extra
        )
        self._finish(JobOutcome(job, "done", final, prompt_id, target.name, [final / f for f in files]))
        if self._uploads is not None:
            self._uploads.put_nowait(job.id)

    # ---- the run -------------------------------------------------------------------------------------------

    def write_summary(self) -> dict[str, Any]:
        assert self.journal is not None
        summary = build_summary(self.journal.state, self._job_infos)
        for row in summary["servers"]:  # targets that know their price (RunPod) add what the batch cost
            target = next((t for t in self.targets if t.name == row["server"]), None)
            cost = getattr(target, "cost", None)
            if callable(cost):
                with contextlib.suppress(Exception):
                    value = cost(row["busy_seconds"])
                    if value is not None:
                        row["cost"] = round(float(value), 4)
        self._add_job_costs(summary)
        write_json_atomic(self.out / SUMMARY_NAME, summary)
        return summary

    def _add_job_costs(self, summary: dict[str, Any]) -> None:
        """A pod bills its whole session, idle included: when servers know their cost, the batch total is
        theirs rather than the sum of the journaled job costs."""
        servers = [row["cost"] for row in summary["servers"] if "cost" in row]
        if servers:
            summary.setdefault("cost", {"total_usd": 0.0, "jobs": {}})["total_usd"] = round(sum(servers), 4)

    async def _summaries(self) -> None:
        while True:
            await asyncio.sleep(self.options.summary_interval)
            with contextlib.suppress(OSError):
                self.write_summary()

    async def _open_target(self, target: Target) -> bool:
        for attempt in range(self._backoff.attempts):
            try:
                await target.open()
                return True
            except Exception as exc:  # noqa: BLE001 - classified
                if not is_transient(exc) or self._backoff.is_last(attempt):
                    self.note(f"server {target.name} is not usable: {_reason(exc)}")
                    return False
                await asyncio.sleep(self._backoff.delay(attempt, rng=self._rng.random))
        return False

    async def run(self) -> AsyncGenerator[JobOutcome, None]:
        """Run the batch; yields a :class:`JobOutcome` per job as it ends (finished jobs of earlier runs first)."""
        self._lock()
        try:
            self.journal = journal = self._open_journal()
        except BaseException:
            self._unlock()
            raise
        # Nothing downloads while we hold the lock: half-finished staging folders of a killed run go.
        shutil.rmtree(self.out / STAGING, ignore_errors=True)
        self._cond = asyncio.Condition()
        self._results = asyncio.Queue()
        reason = "error"
        tasks: list[asyncio.Future[Any]] = []
        uploader: asyncio.Future[Any] | None = None
        try:
            journal.append("run_start", pid=os.getpid(), servers=[t.name for t in self.targets])
            for outcome in self._schedule(journal):
                yield outcome
            if self._location is not None:
                if self._storage is None:
                    from ..storage.s3 import S3Storage

                    self._storage = S3Storage(endpoint_url=self.options.s3_endpoint)
                self._uploads = asyncio.Queue()
                for job_id in self._upload_later:  # done by an earlier run, not uploaded yet
                    self._uploads.put_nowait(job_id)
                uploader = asyncio.ensure_future(self._uploader())
                tasks.append(uploader)
            usable = await asyncio.gather(*[self._open_target(t) for t in self.targets])
            if not any(usable):
                raise ServerUnavailable(
                    "no server of the pool can be reached: " + ", ".join(t.name for t in self.targets)
                )
            for target, ok in zip(self.targets, usable, strict=True):
                if not ok:  # its recovered jobs cannot be looked up: leave them for a later run
                    left = self._recover[target.name]
                    if left:
                        self.note(f"{len(left)} job(s) submitted to {target.name} are left for a later run")
                    left.clear()
                    for job_id in self._pending:
                        self._excluded.setdefault(job_id, set()).add(target.name)
            tasks.append(asyncio.ensure_future(self._summaries()))
            workers = [
                asyncio.ensure_future(self._worker(t))
                for t, ok in zip(self.targets, usable, strict=True)
                if ok
                for _ in range(t.capacity)
            ]
            tasks += workers
            done_all = asyncio.ensure_future(asyncio.gather(*workers))
            tasks.append(done_all)
            done_all.add_done_callback(lambda _: self._results.put_nowait(None))  # type: ignore[union-attr]
            while True:
                item = await self._results.get()
                if item is None:
                    break
                yield item
            await done_all  # re-raises a worker's unexpected error
            while not self._results.empty():
                item = self._results.get_nowait()
                if item is not None:
                    yield item
            for job_id in self._pending:  # only possible when no usable server accepts them
                job = self.jobs[job_id]
                self._fail(job, "failed", "validation", "no usable server accepts this job")
                yield self._results.get_nowait()  # type: ignore[misc]
            if uploader is not None and self._uploads is not None:
                self._uploads.put_nowait(None)  # every done job is queued: let the uploads finish
                await uploader
            reason = "complete"
        except (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit):
            reason = "interrupted"
            raise
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(Exception):
                journal.append("run_end", reason=reason)
                self.write_summary()
            for target in self.targets:
                with contextlib.suppress(Exception):
                    await target.close()
            shutil.rmtree(self.out / STAGING, ignore_errors=True)
            if reason == "complete":
                self._contact_sheet()
                if self._location is not None and self._storage is not None:
                    with contextlib.suppress(Exception):  # a failure is noted and journaled there
                        await self._upload_batch_files()
            journal.close()
            self._unlock()

    def _contact_sheet(self) -> None:
        spec = self.options.contact_sheet
        if not spec:
            return
        from .sheet import axes_for_sheet, make_contact_sheet

        axes = axes_for_sheet(self.plan, None if spec == "auto" else spec)
        if axes is None:
            return
        try:
            path = make_contact_sheet(self.out, self.plan, axes)
        except (OSError, BatchError) as exc:
            self.note(f"contact sheet not written: {exc}")
            return
        if path is not None:
            self.note(f"contact sheet: {path}")
