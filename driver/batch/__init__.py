"""Batches: many jobs on a pool of servers, crash-safe and resumable (``charforge batch``).

- :mod:`.plan`: batch files and sweep specs -> a :class:`~.plan.BatchPlan` of jobs (ids, folders, seeds)
- :mod:`.targets`: the seam a server kind implements (:class:`~.targets.Target`; ComfyUI here, RunPod in
  ``driver/runpod``)
- :mod:`.journal`: the append-only journal a batch folder keeps, and its replay
- :mod:`.runner`: :class:`~.runner.BatchRunner`, per-server windows, retries, timeouts, exactly-once downloads
- :mod:`.summary`: ``summary.json`` and the status table; :mod:`.sheet`: the contact sheet
- :mod:`.api`: :class:`~.api.Batch`, the Python API
"""

from .api import Batch
from .journal import JOURNAL_NAME, replay
from .plan import BatchError, BatchPlan, Job, load_batch, parse_sweep, plan_hash
from .run_types import JobOutcome, RunOptions
from .runner import BatchRunner
from .targets import ComfyTarget, JobSpec, Target

__all__ = [
    "JOURNAL_NAME",
    "Batch",
    "BatchError",
    "BatchPlan",
    "BatchRunner",
    "ComfyTarget",
    "Job",
    "JobOutcome",
    "JobSpec",
    "RunOptions",
    "Target",
    "load_batch",
    "parse_sweep",
    "plan_hash",
    "replay",
]
