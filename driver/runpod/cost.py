"""Cost of a batch on RunPod: per job and per target, and a budget that stops new submissions.

* **Pod:** the pod bills its hourly price for every second it runs, boot and idle included. A batch's pod cost
  is ``price_per_hour x (finish - start)`` of its :class:`~charforge.driver.runpod.pod.PodSession`; a job's
  share is its own wall time at the same rate (the rest is overhead: boot, idle, downloads).
* **Serverless:** billed per second of worker time; a job costs ``executionTime x price_per_second`` of the
  endpoint's GPU. Cold starts show up in ``delayTime``; RunPod bills part of them too, which this estimate
  leaves out (reconcile with RunPod's billing page).

:func:`cost_report` gathers both from targets after (or during) a batch; :class:`CostBudget` implements
``--max-cost``: it refuses a new submission once spent + the estimate of one more job would exceed the limit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

COSTS_NAME = "costs.json"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 9)


def cost_report(targets: list[Any], job_ids: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """``{"total_usd", "servers": {name: {...}}, "jobs": {prompt_id: usd}}`` for targets with cost hooks.

    ``job_ids`` maps a target name to the prompt ids it ran (default: what the target remembers itself).
    """
    servers: dict[str, Any] = {}
    jobs: dict[str, float | None] = {}
    total = 0.0
    known = False
    for target in targets:
        row: dict[str, Any] = {}
        session_cost = getattr(target, "session_cost", None)
        job_cost = getattr(target, "job_cost", None)
        if callable(session_cost):  # a pod: the whole session is the bill
            session = getattr(target, "session", None)
            value = session_cost()
            row.update(
                kind="pod",
                price_per_hour=getattr(target, "price_per_hour", None),
                cost_usd=_round(value),
                wall_seconds=_round(session.wall_seconds()) if session is not None else None,
            )
            if value is not None:
                total += value
                known = True
        elif callable(job_cost):  # serverless: the sum of the jobs' execution
            ids = (job_ids or {}).get(target.name) or list(getattr(target, "_status", {}))
            values = {pid: job_cost(pid) for pid in ids}
            jobs.update({pid: _round(v) for pid, v in values.items()})
            spent = sum(v for v in values.values() if v is not None)
            row.update(
                kind="serverless",
                price_per_second=getattr(target, "price_per_second", None),
                jobs=len(ids),
                cost_usd=_round(spent) if values else None,
                execution_seconds=_round(
                    sum((target.job_times(pid)["execution_seconds"] or 0.0) for pid in ids)
                ),
            )
            if values and any(v is not None for v in values.values()):
                total += spent
                known = True
        else:
            continue
        servers[target.name] = row
    return {"total_usd": _round(total) if known else None, "servers": servers, "jobs": jobs}


def write_cost_summary(out_dir: Path, report: dict[str, Any]) -> Path:
    """Write ``costs.json`` next to the batch's ``summary.json``."""
    path = Path(out_dir) / COSTS_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


@dataclass
class CostBudget:
    """``--max-cost``: stop submitting new jobs once the estimate would pass ``limit`` (USD).

    The estimate of the next job is the mean cost of the jobs finished so far (or ``first_estimate`` before any
    finished); ``fixed`` costs (a pod's boot, already spent) count towards the limit.
    """

    limit: float
    first_estimate: float = 0.0
    fixed: float = 0.0
    spent: list[float] = field(default_factory=list)
    in_flight: int = 0

    def estimate(self) -> float:
        return sum(self.spent) / len(self.spent) if self.spent else self.first_estimate

    def projected(self) -> float:
        """Spent + fixed + jobs in flight + one more job."""
        return self.fixed + sum(self.spent) + (self.in_flight + 1) * self.estimate()

    def allow(self) -> bool:
        """True when one more job fits in the budget (call before submitting; then :meth:`started`)."""
        return self.projected() <= self.limit

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, cost: float | None) -> None:
        """A job ended; an unknown `cost` counts as the current estimate, so a job whose bill was not
        reported still uses budget (counting it as free let a pool overspend)."""
        estimate = self.estimate()
        self.in_flight = max(0, self.in_flight - 1)
        self.spent.append(float(cost) if cost is not None else estimate)


class BudgetExceeded(UsageError):
    """``--max-cost`` reached: the job was not submitted (rerun with a higher limit to run it)."""


class BudgetedTarget:
    """Wraps a target so a batch stops submitting once ``budget`` would be exceeded, and records each job's cost.

    A job refused for budget fails its ``prepare`` with :class:`BudgetExceeded` (a usage error, so the batch
    runner never sends it and says why). Shared by all targets of a pool: pass the same :class:`CostBudget`.
    When ``out`` is given, ``costs.json`` (:func:`cost_report`) is written there when the target closes.
    """

    def __init__(
        self,
        target: Any,
        budget: CostBudget | None,
        *,
        out: Path | None = None,
        pool: list[Any] | None = None,
        job_costs: dict[str, float | None] | None = None,
    ) -> None:
        self.inner = target
        self.budget = budget
        self.out = out
        self.pool = pool if pool is not None else [target]
        #: cost of every job this pool ran (pods: the job's wall time at the hourly price), by prompt id
        self.job_costs: dict[str, float | None] = job_costs if job_costs is not None else {}
        self._started: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    @property
    def supports_prompt_ids(self) -> bool:
        return self.inner.supports_prompt_ids

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        try:
            await self.inner.close()
        finally:
            if self.out is not None:
                report = cost_report(self.pool)
                report["jobs"] = {**{k: _round(v) for k, v in self.job_costs.items()}, **report["jobs"]}
                write_cost_summary(self.out, report)

    async def prepare(self, spec: Any) -> dict[str, Any]:
        if self.budget is not None:
            session_cost = getattr(self.inner, "session_cost", None)
            if callable(session_cost):  # a pod's bill grows with time, whether jobs run or not
                self.budget.fixed = session_cost() or 0.0
            if not self.budget.allow():
                raise BudgetExceeded(
                    f"not submitted: --max-cost ${self.budget.limit:g} would be exceeded (spent "
                    f"${self.budget.fixed + sum(self.budget.spent):.4f}, about ${self.budget.estimate():.4f} per job, "
                    f"{self.budget.in_flight} running); rerun with a higher --max-cost to run the rest"
                )
        return await self.inner.prepare(spec)

    async def submit(self, graph: dict[str, Any], prompt_id: str | None) -> str:
        accepted = await self.inner.submit(graph, prompt_id)
        self._started[accepted] = time.time()
        if self.budget is not None:
            self.budget.started()
        return accepted

    async def lookup(self, prompt_id: str) -> str:
        return await self.inner.lookup(prompt_id)

    async def wait(self, prompt_id: str, timeout: float | None) -> Any:
        try:
            result = await self.inner.wait(prompt_id, timeout)
        except BaseException:
            self._job_ended(prompt_id, None)
            raise
        self._job_ended(prompt_id, result)
        return result

    def _job_ended(self, prompt_id: str, result: Any) -> None:
        job_cost = getattr(self.inner, "job_cost", None)
        cost = job_cost(prompt_id) if callable(job_cost) else None
        if cost is None and prompt_id in self._started:
            seconds = time.time() - self._started[prompt_id]
            rate = getattr(self.inner, "price_cost", None) or getattr(self.inner, "cost", None)
            cost = rate(seconds) if callable(rate) else None
        self.job_costs[prompt_id] = cost
        if self.budget is not None and prompt_id in self._started:
            self.budget.finished(cost)
        self._started.pop(prompt_id, None)

    async def download(self, result: Any, out_dir: Path) -> Any:
        return await self.inner.download(result, out_dir)

    async def cancel(self, prompt_id: str) -> str:
        return await self.inner.cancel(prompt_id)

    def cost(self, seconds: float) -> float | None:
        """The wrapped target's cost hook (pods: the session; serverless: busy time = ``executionTime``)."""
        return self.inner.cost(seconds) if hasattr(self.inner, "cost") else None


def with_budget(
    targets: list[Any], max_cost: float | None, *, out: Path | None = None, first_estimate: float = 0.0
) -> list[BudgetedTarget]:
    """Wrap a pool of targets with one shared ``--max-cost`` budget (None = no limit, costs still recorded)."""
    budget = CostBudget(float(max_cost), first_estimate=first_estimate) if max_cost is not None else None
    wrapped: list[BudgetedTarget] = []
    job_costs: dict[str, float | None] = {}
    for target in targets:
        wrapped.append(BudgetedTarget(target, budget, out=out, pool=targets, job_costs=job_costs))
    return wrapped
