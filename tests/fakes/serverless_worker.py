"""A RunPod serverless endpoint ``ep1`` on the fake RunPod API whose worker is a fake ComfyUI, with the
command line pointed at it and the AWS variables at an S3-compatible server (the serverless storage tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fakes.comfy_server import FakeComfyServer
from fakes.moto_s3 import use_s3
from fakes.runpod_api import FakeRunPod, RunPodKnobs

from cf_testing.cli import point_cli_at


@contextlib.contextmanager
def serverless_endpoint(
    monkeypatch: Any,
    tmp_path: Path,
    s3_endpoint: str,
    comfy_root: Path,
    *add_nodes: Callable[[FakeComfyServer], None],
) -> Iterator[tuple[FakeRunPod, FakeComfyServer, str]]:
    """Yields (runpod, worker, bucket): the worker runs the nodes `add_nodes` put on it, the bucket is fresh;
    the user's own server choice is cleared and the configuration is a missing ``none.yaml``."""
    bucket = use_s3(monkeypatch, s3_endpoint, str(tmp_path))
    with FakeComfyServer(root=comfy_root) as comfy:
        for add in add_nodes:
            add(comfy)
        with FakeRunPod(knobs=RunPodKnobs(proxy_timeout=1.0, ws_idle_timeout=1.0)) as runpod:
            runpod.add_endpoint("ep1", comfy)
            point_cli_at(monkeypatch, runpod.env(), tmp_path / "none.yaml")
            yield runpod, comfy, bucket
