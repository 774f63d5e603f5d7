"""What the batch runner takes and yields (:class:`RunOptions`, :class:`JobOutcome`), and the small values its
workers pass between steps (:class:`Step`, the transient failure that used up its retries)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..secrets import mask
from .plan import Job

STAGING = ".staging"
S3_MANIFEST = "s3_manifest.json"


@dataclass
class RunOptions:
    """How a batch runs (the ``charforge batch run`` options)."""

    out: Path
    timeout: float | None = None
    retries: int = 6
    backoff: float = 1.0
    backoff_max: float = 60.0
    max_resubmits: int = 3
    force_replan: bool = False
    retry_failed: bool = False
    summary_interval: float = 2.0
    fsync: bool = True
    contact_sheet: tuple[str, str] | str | None = "auto"
    #: bring trained LoRAs and their run folders into the job folders (servers with CharForge's file routes)
    lora_home: bool = True
    #: ``s3://bucket/prefix``: upload every done job's folder and the batch's files there
    upload_to: str | None = None
    #: the S3-compatible endpoint (default: AWS or ``$AWS_ENDPOINT_URL``); ``storage``: a ready S3Storage
    s3_endpoint: str | None = None
    storage: Any = None


@dataclass
class JobOutcome:
    """The end of one job, as :meth:`Batch.run` yields it."""

    job: Job
    state: str
    folder: Path
    prompt_id: str | None = None
    server: str | None = None
    files: list[Path] = field(default_factory=list)
    reason: str | None = None
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.state == "done"


class Step(Enum):
    """How a step of one job ended, when it did not hand on a prompt id (the runner's control flow)."""

    REQUEUE = "requeue"  # invalid on this server, perhaps valid on another: back to the queue
    ENDED = "ended"  # the job reached its end (done, failed or timed out), already journaled
    LOST = "lost"  # the server forgot the job: submit it again


class _Retryable(Exception):
    """Internal: a transient failure that exhausted its retries."""


def _reason(exc: BaseException) -> str:
    return mask(str(exc).strip()) or type(exc).__name__
