"""The blocking client, :class:`ComfyClient`: every method of the asyncio client, with the same parameters, run
on a background event loop (:mod:`.loop`)."""

from __future__ import annotations

import asyncio
import contextlib
import queue as thread_queue
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import Auth, ServerConfig
from ..errors import DriverError, JobTimeout
from ..events import Event
from ..outputs import DownloadedFile, OutputFile
from ..workflow.load import Workflow
from ..workflow.overrides import InputFile, Override
from ..workflow.prepare import PreparedRun
from .async_client import AsyncComfyClient
from .follow import AsyncWatch
from .loop import LoopThread
from .models import Job, JobResult, Timeout, UploadedFile

_DONE = object()


class Watch:
    """Blocking iterator over the events of one job (see :meth:`AsyncComfyClient.watch`)."""

    def __init__(self, client: ComfyClient, job: Job | str, timeout: float | None) -> None:
        self._client = client
        self._async = AsyncWatch(client._async, job, timeout)
        self.prompt_id = self._async.prompt_id
        self._queue: thread_queue.Queue[Any] = thread_queue.Queue()
        self._future: Any = None

    @property
    def result(self) -> JobResult | None:
        return self._async.result

    @property
    def running_node(self) -> str | None:
        return self._async.running_node

    async def _pump(self) -> None:
        try:
            async for event in self._async:
                self._queue.put(event)
        except BaseException as exc:  # handed to the consuming thread
            self._queue.put(exc)
            return
        self._queue.put(_DONE)

    def __iter__(self) -> Iterator[Event]:
        self._future = asyncio.run_coroutine_threadsafe(self._pump(), self._client._loop.loop)
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                except thread_queue.Empty:
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop following (the job itself keeps running)."""
        if self._future is not None and not self._future.done():
            self._future.cancel()


class ComfyClient:
    """Blocking client with the same methods (and parameters) as :class:`~.async_client.AsyncComfyClient`.

    It runs an event loop in a background thread; use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        server: str | ServerConfig | None = None,
        *,
        auth: Auth | None = None,
        timeout: Timeout | float | None = None,
        client_id: str | None = None,
        ping_interval: float = 20.0,
        poll_interval: float = 5.0,
        retries: int = 2,
        verify_tls: bool | None = None,
        trust_env: bool | None = None,
        max_download_bytes: int | None = None,
        max_reply_bytes: int | None = None,
    ) -> None:
        self._async = AsyncComfyClient(
            server,
            auth=auth,
            timeout=timeout,
            client_id=client_id,
            ping_interval=ping_interval,
            poll_interval=poll_interval,
            retries=retries,
            verify_tls=verify_tls,
            trust_env=trust_env,
            max_download_bytes=max_download_bytes,
            max_reply_bytes=max_reply_bytes,
        )
        self._loop = LoopThread()

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def client_id(self) -> str:
        return self._async.client_id

    @property
    def config(self) -> ServerConfig:
        return self._async.config

    def __repr__(self) -> str:
        return f"ComfyClient({self.url!r}, auth={self._async.config.auth!r})"

    def __enter__(self) -> ComfyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close connections and stop the background loop."""
        try:
            self._loop.run(self._async.close())
        finally:
            self._loop.close()

    def _run(self, coro: Any) -> Any:
        return self._loop.run(coro)

    def system_stats(self) -> dict[str, Any]:
        return self._run(self._async.system_stats())

    def features(self) -> dict[str, Any]:
        return self._run(self._async.features())

    def object_info(self, refresh: bool = False) -> dict[str, Any]:
        return self._run(self._async.object_info(refresh))

    def queue(self) -> dict[str, list]:
        return self._run(self._async.queue())

    def history(self, prompt_id: str | None = None, *, max_items: int | None = None) -> Any:
        return self._run(self._async.history(prompt_id, max_items=max_items))

    def job_state(self, prompt_id: str) -> tuple[str, int | None]:
        return self._run(self._async.job_state(prompt_id))

    def prepare(self, workflow: Workflow | dict[str, Any] | str | Path) -> Workflow:
        return self._run(self._async.prepare(workflow))

    def prepare_run(
        self,
        workflow: Workflow | dict[str, Any] | str | Path,
        *,
        sets: Sequence[str | Override] = (),
        inputs: Sequence[str | InputFile] = (),
        preflight: bool = True,
        upload: bool = True,
    ) -> PreparedRun:
        return self._run(
            self._async.prepare_run(workflow, sets=sets, inputs=inputs, preflight=preflight, upload=upload)
        )

    def submit(
        self,
        workflow: Workflow | dict[str, Any] | str | Path,
        *,
        prompt_id: str | None = None,
        extra_data: dict[str, Any] | None = None,
        front: bool = False,
        number: float | None = None,
        partial_targets: list[str] | None = None,
        allow_partial: bool = False,
        embed_workflow: bool = True,
    ) -> Job:
        return self._run(
            self._async.submit(
                workflow,
                prompt_id=prompt_id,
                extra_data=extra_data,
                front=front,
                number=number,
                partial_targets=partial_targets,
                allow_partial=allow_partial,
                embed_workflow=embed_workflow,
            )
        )

    def watch(self, job: Job | str, *, timeout: float | None = None) -> Watch:
        return Watch(self, job, timeout)

    def wait(
        self, job: Job | str, *, timeout: float | None = None, on_event: Callable[[Event], None] | None = None
    ) -> JobResult:
        watch = self.watch(job, timeout=timeout)
        for event in watch:
            if on_event is not None:
                on_event(event)
        assert watch.result is not None
        return watch.result

    def run(
        self,
        workflow: Workflow | dict[str, Any] | str | Path,
        *,
        timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
        cancel_on_timeout: bool = True,
        prompt_id: str | None = None,
        extra_data: dict[str, Any] | None = None,
        front: bool = False,
        number: float | None = None,
        partial_targets: list[str] | None = None,
        allow_partial: bool = False,
        embed_workflow: bool = True,
    ) -> JobResult:
        start = time.monotonic()
        job = self.submit(
            workflow,
            prompt_id=prompt_id,
            extra_data=extra_data,
            front=front,
            number=number,
            partial_targets=partial_targets,
            allow_partial=allow_partial,
            embed_workflow=embed_workflow,
        )
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        try:
            return self.wait(job, timeout=remaining, on_event=on_event)
        except JobTimeout:
            if cancel_on_timeout:
                with contextlib.suppress(DriverError):
                    self.cancel(job.prompt_id)
            raise
        except KeyboardInterrupt:  # Ctrl-C stops our job too, never anybody else's
            with contextlib.suppress(DriverError):
                self.cancel(job.prompt_id)
            raise

    def cancel(self, prompt_id: str) -> str:
        return self._run(self._async.cancel(prompt_id))

    def upload(
        self,
        source: str | Path | bytes,
        *,
        filename: str | None = None,
        subfolder: str = "",
        kind: str = "input",
        overwrite: bool = False,
    ) -> UploadedFile:
        return self._run(
            self._async.upload(source, filename=filename, subfolder=subfolder, kind=kind, overwrite=overwrite)
        )

    def download(
        self,
        file: OutputFile,
        out_dir: str | Path,
        *,
        class_type: str | None = None,
        title: str | None = None,
    ) -> DownloadedFile:
        return self._run(self._async.download(file, out_dir, class_type=class_type, title=title))

    def download_outputs(
        self,
        result: JobResult,
        out_dir: str | Path,
        *,
        include_temp: bool = True,
        on_file: Callable[[DownloadedFile], None] | None = None,
        timeout: float | None = None,
    ) -> list[DownloadedFile]:
        return self._run(
            self._async.download_outputs(
                result, out_dir, include_temp=include_temp, on_file=on_file, timeout=timeout
            )
        )
