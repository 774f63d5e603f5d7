"""Uploads (``RunOptions.upload_to``: ``s3://bucket/prefix``): each done job's folder as soon as it is done, the
batch's own files at the end of a run; see :mod:`~charforge.driver.batch.runner`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..secrets import mask
from .journal import JOURNAL_NAME, Journal
from .plan import BatchPlan, Job
from .run_types import S3_MANIFEST, _reason
from .summary import PLAN_NAME, SUMMARY_NAME, write_json_atomic


class _Runner(Protocol):
    """What :class:`Uploads` uses of the runner it is mixed into (:class:`~.runner.BatchRunner`)."""

    plan: BatchPlan
    out: Path
    jobs: dict[str, Job]
    journal: Journal | None
    note: Callable[[str], None]
    _storage: Any
    _location: Any
    _uploads: asyncio.Queue[str | None] | None
    _uploaded_now: int

    def _log(self, ev: str, **data: Any) -> dict[str, Any]: ...

    def _upload_reason(self, exc: BaseException) -> str: ...

    async def _upload_job(self, job: Job) -> None: ...


class Uploads:
    """The batch runner's uploads (mixed into :class:`~.runner.BatchRunner`)."""

    async def _uploader(self: _Runner) -> None:
        """Upload done jobs' folders one after the other, as they are queued (None ends it)."""
        assert self._uploads is not None
        while True:
            job_id = await self._uploads.get()
            if job_id is None:
                return
            await self._upload_job(self.jobs[job_id])

    def _upload_reason(self: _Runner, exc: BaseException) -> str:
        return mask(_reason(exc), getattr(self._storage, "_secrets", ()))

    async def _upload_job(self: _Runner, job: Job) -> None:
        from ..storage.s3 import S3Location

        folder = self.out / job.folder
        location = S3Location(self._location.bucket, self._location.key(job.folder))
        try:
            entries = await asyncio.to_thread(self._storage.upload_tree, folder, location)
        except Exception as exc:  # noqa: BLE001 - StorageError, OSError...: journaled, tried again next run
            reason = self._upload_reason(exc)
            self._log("upload_failed", job=job.id, url=str(location), reason=reason)
            self.note(
                f"{job.folder}: upload to {location} failed: {reason.splitlines()[0]} (the next run tries "
                "again)"
            )
            return
        sent = [e for e in entries if e["uploaded"]]
        self._uploaded_now += 1
        self._log(
            "uploaded",
            job=job.id,
            url=str(location),
            sent=len(sent),
            bytes_sent=sum(e["bytes_sent"] for e in entries),
            files=[
                {
                    "path": Path(e["path"]).relative_to(folder).as_posix(),
                    "size": e["size"],
                    "sha256": e["sha256"],
                }
                for e in entries
            ],
        )

    async def _upload_batch_files(self: _Runner) -> None:
        """The batch's own files up, with ``s3_manifest.json`` listing every object of the batch; skipped when
        this run uploaded no job and they went to the same place before (a rerun with nothing new sends
        nothing)."""
        assert self.journal is not None
        state = self.journal.state
        where = str(self._location)
        if self._uploaded_now == 0 and state.batch_uploaded == where:
            return
        listing = []
        for job in self.plan.jobs:
            upload = state.job(job.id).upload if job.id in state.jobs else None
            if not upload:
                continue
            for f in upload.get("files") or []:
                listing.append(
                    {
                        "path": f"{job.folder}/{f['path']}",
                        "url": f"{upload['url']}/{f['path']}",
                        "size": f["size"],
                        "sha256": f["sha256"],
                    }
                )
        names = [PLAN_NAME, SUMMARY_NAME, JOURNAL_NAME, "contact_sheet.png", "costs.json"]
        try:
            for name in names:
                if (self.out / name).is_file():
                    entry = await asyncio.to_thread(
                        self._storage.upload_file, self.out / name, self._location, name
                    )
                    listing.append(
                        {"path": name, "url": entry["url"], "size": entry["size"], "sha256": entry["sha256"]}
                    )
            write_json_atomic(self.out / S3_MANIFEST, listing, indent=1)
            await asyncio.to_thread(
                self._storage.upload_file, self.out / S3_MANIFEST, self._location, S3_MANIFEST
            )
        except Exception as exc:  # noqa: BLE001 - noted; the next run tries again
            reason = self._upload_reason(exc)
            self.note(f"the batch's files were not uploaded to {where}: {reason.splitlines()[0]}")
            raise
        self._log("uploaded_batch", url=where, files=len(listing))
        self.note(f"uploaded to {where}: {len(listing)} file(s) listed in {self.out / S3_MANIFEST}")
