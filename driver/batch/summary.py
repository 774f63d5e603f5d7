"""The batch summary: ``summary.json`` and the human table of ``charforge batch status``.

Everything is computed from the replayed journal (:class:`~charforge.driver.batch.journal.BatchState`) and the plan
saved next to it (``plan.json``), so it can be rebuilt at any time, by any process, while a batch runs or after.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .journal import JOURNAL_NAME, STATES, BatchState, replay

PLAN_NAME = "plan.json"
SUMMARY_NAME = "summary.json"


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _alive(pid: Any) -> bool:
    """Whether the process that started a run still exists (a killed run leaves no ``run_end``)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def build_summary(
    state: BatchState, jobs: list[dict[str, Any]] | None = None, *, now: float | None = None
) -> dict[str, Any]:
    """Counts by state, timings, per-server throughput and failures (``jobs``: the plan's job dicts)."""
    now = time.time() if now is None else now
    planned = [j["id"] for j in jobs] if jobs is not None else list(state.jobs)
    info = {j["id"]: j for j in jobs or []}
    counts = {s: 0 for s in STATES}
    per_server: dict[str, dict[str, Any]] = {}
    failures = []
    durations = []
    for job_id in planned:
        js = state.jobs.get(job_id)
        st = js.state if js else "pending"
        counts[st] += 1
        if js is None:
            continue
        if js.server and js.state in ("done", "failed", "timed_out"):
            row = per_server.setdefault(
                js.server, {"done": 0, "failed": 0, "timed_out": 0, "busy_seconds": 0.0}
            )
            row[js.state] += 1
        if js.state == "done" and js.first_submitted_at and js.finished_at:
            durations.append(js.finished_at - js.first_submitted_at)
            if js.server:
                per_server[js.server]["busy_seconds"] += js.execution_seconds or 0.0
        if js.state in ("failed", "timed_out"):
            failures.append(
                {
                    "job": job_id,
                    "folder": info.get(job_id, {}).get("folder"),
                    "state": js.state,
                    "kind": js.kind,
                    "server": js.server,
                    "prompt_id": js.prompt_id,
                    "reason": js.reason,
                }
            )
    runs = state.runs
    started = runs[0]["start"] if runs else None
    active = bool(runs) and runs[-1]["end"] is None and _alive(runs[-1].get("pid"))
    ended = None if active or not runs else (runs[-1]["end"] or state.last_t)
    # a run killed without a run_end record ends at the last record it wrote
    elapsed = sum(
        ((r["end"] or (now if active and r is runs[-1] else state.last_t) or r["start"]) - r["start"])
        for r in runs
        if r.get("start")
    )
    for name, row in per_server.items():
        row["jobs_per_minute"] = round(row["done"] / elapsed * 60, 2) if elapsed > 0 else None
        row["busy_seconds"] = round(row["busy_seconds"], 3)
        row["server"] = name
    durations.sort()
    timing = {"elapsed_seconds": round(elapsed, 3), "started": _iso(started), "ended": _iso(ended)}
    if durations:
        timing.update(
            job_seconds_mean=round(sum(durations) / len(durations), 3),
            job_seconds_median=round(durations[len(durations) // 2], 3),
            job_seconds_max=round(durations[-1], 3),
        )
    total = len(planned)
    priced = {
        job_id: js.cost for job_id, js in state.jobs.items() if js.state == "done" and js.cost is not None
    }
    cost = {"cost": {"total_usd": round(sum(priced.values()), 4), "jobs": priced}} if priced else {}
    uploads: dict[str, Any] = {}
    if state.batch_uploaded or any(j.uploaded or j.upload_error for j in state.jobs.values()):
        done_jobs = [
            job_id for job_id in planned if job_id in state.jobs and state.jobs[job_id].state == "done"
        ]
        uploads = {
            "uploads": {
                "uploaded": sum(1 for job_id in done_jobs if state.jobs[job_id].uploaded),
                "not_uploaded": sum(1 for job_id in done_jobs if not state.jobs[job_id].uploaded),
                "batch_files": state.batch_uploaded,
                "failures": [
                    {
                        "job": job_id,
                        "folder": info.get(job_id, {}).get("folder"),
                        "reason": state.jobs[job_id].upload_error,
                    }
                    for job_id in done_jobs
                    if not state.jobs[job_id].uploaded and state.jobs[job_id].upload_error
                ],
            }
        }
    return {
        "charforge_batch_summary": 1,
        "source": state.header.get("source"),
        "plan_hash": state.plan_hash,
        "jobs": total,
        "counts": counts,
        "complete": total > 0 and counts["done"] + counts["failed"] + counts["timed_out"] == total,
        "running": active,
        "runs": len(runs),
        "retries": sum(j.retries for j in state.jobs.values()),
        "resubmissions": sum(max(0, j.submissions - 1) for j in state.jobs.values()),
        "timings": timing,
        "servers": sorted(per_server.values(), key=lambda r: r["server"]),
        "failures": failures,
        **cost,
        **uploads,
        "updated": _iso(now),
    }


def render_table(summary: dict[str, Any]) -> str:
    """The summary as a few aligned lines for a terminal."""
    c = summary["counts"]
    t = summary["timings"]
    state = "running" if summary.get("running") else ("complete" if summary.get("complete") else "stopped")
    lines = [
        f"batch {summary.get('source') or ''}: {summary['jobs']} jobs, {state}",
        "  " + "  ".join(f"{k} {c[k]}" for k in STATES if c.get(k) or k in ("pending", "done", "failed")),
        f"  elapsed {t['elapsed_seconds']:.1f} s over {summary['runs']} run(s); "
        f"{summary['retries']} retries, {summary['resubmissions']} resubmissions",
    ]
    if "job_seconds_mean" in t:
        lines.append(
            f"  per job: mean {t['job_seconds_mean']:.2f} s, median {t['job_seconds_median']:.2f} s, "
            f"max {t['job_seconds_max']:.2f} s (submission to download)"
        )
    if summary["servers"]:
        width = max(len(r["server"]) for r in summary["servers"])
        lines.append(f"  {'SERVER'.ljust(width)}  DONE  FAILED  TIMED_OUT  JOBS/MIN")
        for r in summary["servers"]:
            rate = "-" if r["jobs_per_minute"] is None else f"{r['jobs_per_minute']:.1f}"
            lines.append(
                f"  {r['server'].ljust(width)}  {r['done']:>4}  {r['failed']:>6}  {r['timed_out']:>9}  "
                f"{rate:>8}"
            )
    if summary.get("cost"):
        cost = summary["cost"]
        lines.append(
            f"  estimated cost ${cost['total_usd']:.4f} ({len(cost['jobs'])} job(s) priced; "
            "per job in summary.json)"
        )
    if summary.get("uploads"):
        up = summary["uploads"]
        lines.append(
            f"  uploaded {up['uploaded']} job folder(s)"
            + (f", {up['not_uploaded']} not yet" if up["not_uploaded"] else "")
            + (f"; batch files in {up['batch_files']}" if up.get("batch_files") else "")
        )
        for f in up["failures"][:5]:
            lines.append(
                f"    {f['folder'] or f['job']}: upload failed: {(f['reason'] or '').splitlines()[0]}"
            )
    if summary["failures"]:
        lines.append("  failures:")
        for f in summary["failures"][:20]:
            reason = (f["reason"] or "").splitlines()[0] if f["reason"] else ""
            lines.append(f"    {f['folder'] or f['job']}: {f['state']} ({f['kind']}) {reason}")
        if len(summary["failures"]) > 20:
            lines.append(f"    ... and {len(summary['failures']) - 20} more (see summary.json)")
    return "\n".join(lines)


def write_json_atomic(path: Path, data: Any, indent: int | None = 2) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_plan_jobs(out_dir: Path) -> list[dict[str, Any]] | None:
    try:
        data = json.loads((Path(out_dir) / PLAN_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("jobs") if isinstance(data, dict) else None


def summary_of(out_dir: Path) -> dict[str, Any]:
    """Rebuild the summary of the batch in ``out_dir`` from its journal and plan (job costs are journaled)."""
    out_dir = Path(out_dir)
    journal = out_dir / JOURNAL_NAME
    if not journal.exists():
        from .plan import BatchError

        raise BatchError(f"no batch journal in {out_dir} (expected {journal})")
    summary = build_summary(replay(journal), load_plan_jobs(out_dir))
    # A pod's session cost (idle time included) is known only to the running batch: take it from its summary.
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        written = json.loads((out_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
        costs = {row["server"]: row["cost"] for row in written.get("servers", []) if "cost" in row}
        for row in summary["servers"]:
            if row["server"] in costs:
                row["cost"] = costs[row["server"]]
        if costs:
            summary.setdefault("cost", {"total_usd": 0.0, "jobs": {}})["total_usd"] = round(
                sum(costs.values()), 4
            )
    return summary
