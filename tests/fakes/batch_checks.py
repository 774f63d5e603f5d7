"""Helpers of the batch tests: a sweep over the fake server's image workflow, and the checks every fault test
makes (outputs exactly once, executions per job)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fakes.comfy_server import FakeComfyServer, image_workflow

from cf_testing.cli import run_driver_cli as run_cli  # noqa: F401 - the batch tests take it from here
from charforge.driver.batch.journal import JOURNAL_NAME


def sweep_file(
    tmp_path: Path,
    colors: list[int],
    widths: list[int] | None = None,
    workflow: dict | None = None,
    name: str = "sweep.json",
) -> Path:
    (tmp_path / "wf.json").write_text(json.dumps(workflow or image_workflow()))
    axes: dict = {"color": {"set": "Blank.color", "values": colors}}
    if widths:
        axes["width"] = {"set": "Resize.width", "values": widths}
    path = tmp_path / name
    path.write_text(json.dumps({"workflow": "wf.json", "axes": axes}))
    return path


def executions_by_color(*servers: FakeComfyServer) -> dict[int, int]:
    counts: dict[int, int] = {}
    for server in servers:
        for _, prompt in server.executed:
            color = prompt["1"]["inputs"]["color"]
            counts[color] = counts.get(color, 0) + 1
    return counts


def assert_outputs_once(out: Path, plan) -> None:
    """Every job folder holds its manifest and exactly the files it lists, once; nothing is left over."""
    for job in plan.jobs:
        folder = out / job.folder
        manifest = json.loads((folder / "manifest.json").read_text())
        listed = sorted(f["path"] for f in manifest["files"])
        on_disk = sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and p.name != "manifest.json"
        )
        assert on_disk == listed and len(listed) == 1, (job.folder, on_disk, listed)
        assert manifest["batch"]["job"] == job.id
    assert not list(out.rglob("*.stale-*")) and not (out / ".staging").exists()


def batch_process(
    spec: Path, out: Path, server: str | list[str], *options: str, **popen: Any
) -> subprocess.Popen:
    """The same command as its own process (``python -m charforge.driver.cli``), to be killed: stdout dropped,
    stderr piped as text; `popen` goes to :class:`subprocess.Popen`."""
    servers = [server] if isinstance(server, str) else server
    pool = [arg for url in servers for arg in ("--server", url)]
    argv = [sys.executable, "-m", "charforge.driver.cli", "batch", "run", str(spec), *pool, "--out", str(out)]
    return subprocess.Popen(
        [*argv, *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen
    )


def batch_run(spec: Path, out: Path, server: str | list[str], *options: str) -> tuple[int, str, str]:
    """``batch run SPEC --server URL ... --out OUT OPTIONS`` through the driver's command line, in this process."""
    servers = [server] if isinstance(server, str) else server
    pool = [arg for url in servers for arg in ("--server", url)]
    return run_cli("batch", "run", str(spec), *pool, "--out", str(out), *options)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / JOURNAL_NAME).read_text().splitlines()]


def journal(out: Path) -> list[dict]:
    """The journal's records so far, read while a batch may still be writing it: none before it exists, and a torn
    last line (the writer killed mid-line) left out."""
    path = out / JOURNAL_NAME
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    return lines
