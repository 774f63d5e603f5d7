"""The batch journal: an append-only JSON Lines file recording every state change of every job.

One line per event, written with a single ``write`` and ``fsync``'d before the runner acts on it, so after a
crash at any instant the journal is a prefix of what happened plus at most one torn last line (which readers
skip and :class:`Journal` cuts off before appending). Replaying it (:func:`replay`) gives each job's state.

Events (``ev``) and their meaning; every job event carries ``job`` (the plan's job id):

=============  ==============================================================================================
``batch``      first line: ``plan_hash``, ``jobs`` (count), ``source``, ``master_seed``
``replan``     the plan changed and the user accepted it (``--force-replan``): the new ``plan_hash``
``run_start``  a ``charforge batch run`` process started (``pid``, ``servers``)
``run_end``    it ended: ``reason`` = ``complete`` | ``interrupted`` | ``error``
``submitting`` about to submit ``prompt_id`` to ``server`` (written *before* the request)
``submitted``  the server accepted ``prompt_id``
``retry``      a transient failure (``reason``), next try after ``delay`` seconds
``invalid``    the job's graph is invalid on ``server`` (preflight or server validation); never sent there
``lost``       ``server`` does not know ``prompt_id`` (restarted / history cleared): it will be resubmitted
``finished``   the server finished ``prompt_id`` successfully (outputs not yet downloaded)
``done``       outputs downloaded and moved into the job folder (``files``, ``seconds``)
``failed``     a final failure: ``kind`` = ``validation`` | ``execution`` | ``interrupted`` | ``transient``
``timed_out``  the per-job wall-clock limit expired; the job was cancelled on the server
``uploaded``   the done job's folder is in object storage (``url``, ``files``, ``sent``, ``bytes_sent``)
``upload_failed``  uploading it failed (``reason``); the next run tries again
``uploaded_batch``  the batch's own files (plan, summary, journal, contact sheet, s3_manifest.json) went up
=============  ==============================================================================================

A ``failed`` job of ``kind`` ``home`` ran and its outputs are in its folder, but its trained LoRA did not come
home: the next run downloads it (never submits the job again).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOURNAL_NAME = "journal.jsonl"

#: states a job can be in after replay
STATES = ("pending", "submitting", "submitted", "finished", "done", "failed", "timed_out")
#: states in which the job is on (or may be on) a server
IN_FLIGHT = ("submitting", "submitted", "finished")
#: states that end a job (a rerun skips them; ``transient`` failures are retried by a rerun)
TERMINAL = ("done", "failed", "timed_out")


@dataclass
class JobState:
    """What the journal says about one job."""

    id: str
    state: str = "pending"
    prompt_id: str | None = None
    server: str | None = None
    prompt_ids: list[str] = field(default_factory=list)
    submissions: int = 0
    retries: int = 0
    first_submitted_at: float | None = None
    submitted_at: float | None = None
    finished_at: float | None = None
    execution_seconds: float | None = None
    reason: str | None = None
    kind: str | None = None
    files: list[str] = field(default_factory=list)
    cost: float | None = None  # USD, for targets that price their jobs (RunPod)
    invalid_on: dict[str, str] = field(default_factory=dict)
    uploaded: bool = False  # its folder is in object storage (--upload-to)
    upload: dict[str, Any] | None = None  # the last ``uploaded`` record
    upload_error: str | None = None


@dataclass
class BatchState:
    """The replayed journal: the batch header, each job's state and the runs so far."""

    header: dict[str, Any] = field(default_factory=dict)
    plan_hash: str | None = None
    jobs: dict[str, JobState] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    records: int = 0
    torn: bool = False
    batch_uploaded: str | None = None  # where the batch's own files went last (``uploaded_batch``)
    last_t: float | None = None

    def job(self, job_id: str) -> JobState:
        state = self.jobs.get(job_id)
        if state is None:
            state = self.jobs[job_id] = JobState(job_id)
        return state

    def apply(self, rec: dict[str, Any]) -> None:
        """Fold one journal record into the state (the single place that defines the state machine)."""
        self.records += 1
        ev = rec.get("ev")
        t = rec.get("t")
        previous_t = self.last_t
        self.last_t = t if isinstance(t, (int, float)) else self.last_t
        if ev == "batch":
            self.header = dict(rec)
            self.plan_hash = rec.get("plan_hash")
            return
        if ev == "replan":
            self.plan_hash = rec.get("plan_hash")
            return
        if ev == "run_start":
            if (
                self.runs and self.runs[-1]["end"] is None
            ):  # that run was killed: it ended with its last record
                self.runs[-1].update(end=previous_t, reason="killed")
            self.runs.append(
                {
                    "start": t,
                    "end": None,
                    "reason": None,
                    "pid": rec.get("pid"),
                    "servers": rec.get("servers"),
                }
            )
            return
        if ev == "run_end":
            if self.runs:
                self.runs[-1].update(end=t, reason=rec.get("reason"))
            return
        if ev == "uploaded_batch":
            self.batch_uploaded = rec.get("url")
            return
        job_id = rec.get("job")
        if not isinstance(job_id, str):
            return
        job = self.job(job_id)
        if ev == "submitting":
            job.state = "submitting"
            job.prompt_id = rec.get("prompt_id")
            job.server = rec.get("server")
            job.submissions += 1
            job.submitted_at = t
            if job.first_submitted_at is None:
                job.first_submitted_at = t
            if job.prompt_id:
                job.prompt_ids.append(job.prompt_id)
        elif ev == "submitted":
            job.state = "submitted"
            if rec.get("prompt_id") and rec.get("prompt_id") != job.prompt_id:
                job.prompt_id = rec["prompt_id"]
                job.prompt_ids.append(job.prompt_id)
            job.server = rec.get("server", job.server)
        elif ev == "retry":
            job.retries += 1
            job.reason = rec.get("reason")
        elif ev == "invalid":
            job.invalid_on[str(rec.get("server"))] = str(rec.get("reason"))
        elif ev == "lost":
            job.state = "pending"
            job.prompt_id = None
        elif ev == "finished":
            job.state = "finished"
            job.execution_seconds = rec.get("execution_seconds")
        elif ev == "done":
            job.state = "done"
            job.finished_at = t
            job.uploaded = False  # (again) done: its folder is to be uploaded (again)
            job.files = list(rec.get("files") or [])
            job.cost = rec.get("cost")
            job.reason = None
            job.kind = None
            if rec.get("prompt_id"):
                job.prompt_id = rec["prompt_id"]
            if rec.get("server"):
                job.server = rec["server"]
        elif ev in ("failed", "timed_out"):
            job.state = ev
            job.finished_at = t
            job.reason = rec.get("reason")
            job.kind = rec.get("kind", "timeout" if ev == "timed_out" else None)
        elif ev == "uploaded":
            job.uploaded = True
            job.upload = {k: v for k, v in rec.items() if k not in ("t", "ev", "job")}
            job.upload_error = None
        elif ev == "upload_failed":
            job.upload_error = rec.get("reason")
        elif ev == "requeue":
            job.state = "pending"
            job.prompt_id = None
            job.reason = None
            job.kind = None

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for job in self.jobs.values():
            out[job.state] = out.get(job.state, 0) + 1
        return out


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The journal's records in order; a torn (unterminated or undecodable) last line is skipped."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                return  # torn last line: the writer died mid-write
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def replay(path: Path) -> BatchState:
    """Replay a journal file into a :class:`BatchState` (an empty state when the file does not exist)."""
    state = BatchState()
    for rec in read_records(path):
        state.apply(rec)
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell():
                handle.seek(-1, os.SEEK_END)
                state.torn = handle.read(1) != b"\n"
    except FileNotFoundError:
        pass
    return state


class Journal:
    """Appends records to the journal file (``fsync`` after each line unless ``fsync=False``).

    Opening cuts a torn last line off, so the next record starts on a line of its own. ``state`` is kept up to
    date with every appended record.
    """

    def __init__(self, path: Path, state: BatchState | None = None, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.state = state if state is not None else replay(self.path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.lseek(self._fd, 0, os.SEEK_END)
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            os.ftruncate(self._fd, self._last_line_end(size))
        os.lseek(self._fd, 0, os.SEEK_END)

    def _last_line_end(self, size: int) -> int:
        """Offset just after the last newline (0 when there is none): where a torn last line starts."""
        end = size
        while end > 0:
            start = max(0, end - 65536)
            chunk = os.pread(self._fd, end - start, start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            end = start
        return 0

    def append(self, ev: str, **data: Any) -> dict[str, Any]:
        """Write one record (durably when ``fsync``) and apply it to :attr:`state`; returns the record."""
        rec = {"t": round(time.time(), 3), "ev": ev, **data}
        line = (json.dumps(rec, default=str, ensure_ascii=False, separators=(",", ":")) + "\n").encode(
            "utf-8"
        )
        os.write(self._fd, line)
        if self.fsync:
            os.fsync(self._fd)
        self.state.apply(rec)
        return rec

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
