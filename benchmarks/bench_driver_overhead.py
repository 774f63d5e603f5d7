"""Driver overhead per job against a real ComfyUI on loopback (issue 3), compared with comfy-cli.

Runs N trivial jobs made of built-in nodes (``EmptyImage`` 8x8 -> ``SaveImage``, a different ``color`` per job
so ComfyUI's cache never skips execution) one after another, in these configurations, interleaved job by job
(the order rotates every round) against the same server:

* ``raw``: a minimal hand-written aiohttp client (WebSocket open once, ``POST /prompt``, wait for
  ``executing {node: null}``, ``GET /history/<id>``, ``GET /view`` of the file): the floor the server sets;
* ``api``: CharForge's Python API, one :class:`ComfyClient` kept open: ``client.run(...)`` then
  ``client.download_outputs(...)`` into a temp folder;
* ``cli``: ``charforge run JOB.json --server URL --out DIR --json`` as a new process per job (process start,
  imports, ``/object_info`` preflight, download and manifest included);
* ``comfy-cli``: ``comfy --skip-prompt run --workflow JOB.json --wait --host 127.0.0.1 --port P`` as a new
  process per job (it does not download outputs; it prints their URLs).

For each job: the wall time seen by the client, and the server's own execution time from the history
(``status.messages``: ``execution_start`` -> ``execution_success`` timestamps, ms). Overhead = wall - execution.
Each job's history is checked (success, no cached node) outside the timed part. Process start alone
(``charforge --version``, ``comfy --version``) is measured separately, interleaved with the jobs (every
``--startup-every`` rounds). Both CLIs run with bytecode caching on (see :func:`process_env`).

    python benchmarks/bench_driver_overhead.py --comfyui-dir /work/comfyui \
        --comfyui-python /work/comfyui-venv/bin/python --comfy-cli /work/comfycli-venv/bin/comfy --jobs 200

``--server URL`` uses a running ComfyUI instead of starting one. Prints one JSON line per configuration (and
one for process start, one for the run); record the numbers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def workflow(color: int, prefix: str) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def free_port(low: int, high: int) -> int:
    for port in range(low, high + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit(f"no free port in {low}-{high}")


def get_json(url: str, timeout: float = 30) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def history_entry(server: str, prompt_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = get_json(f"{server}/history/{prompt_id}")
        if prompt_id in data:
            return data[prompt_id]
        time.sleep(0.05)
    raise RuntimeError(f"no history for {prompt_id}")


def execution_ms(entry: dict[str, Any]) -> float:
    """Server execution time of a finished job; raises if it failed or was (partly) served from the cache."""
    status = entry.get("status") or {}
    if status.get("status_str") != "success":
        raise RuntimeError(f"job failed: {status}")
    stamps: dict[str, float] = {}
    for kind, data in status.get("messages") or []:
        stamps[kind] = data.get("timestamp")
        if kind == "execution_cached" and data.get("nodes"):
            raise RuntimeError(f"nodes were cached: {data['nodes']} (the job did not really run)")
    return float(stamps["execution_success"] - stamps["execution_start"])


# ---- configurations -------------------------------------------------------------------------------------------


class Raw:
    """The floor: what any client must do (one WebSocket, POST, wait for the end marker, history, file)."""

    name = "raw"

    def __init__(self, server: str, out: Path) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.server = server
        self.out = out
        self.client_id = uuid.uuid4().hex
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._open())

    async def _open(self) -> None:
        self.session = self.aiohttp.ClientSession()
        ws_url = self.server.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.ws = await self.session.ws_connect(ws_url)

    async def _run(self, wf: dict[str, Any]) -> str:
        prompt_id = str(uuid.uuid4())
        async with self.session.post(
            f"{self.server}/prompt", json={"prompt": wf, "client_id": self.client_id, "prompt_id": prompt_id}
        ) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()
        async for msg in self.ws:
            if msg.type != self.aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if (
                data.get("type") == "executing"
                and data["data"].get("node") is None
                and data["data"].get("prompt_id") == prompt_id
            ):
                break
        async with self.session.get(f"{self.server}/history/{prompt_id}") as resp:
            entry = (await resp.json())[prompt_id]
        for node in entry["outputs"].values():
            for image in node.get("images", []):
                params = {k: image[k] for k in ("filename", "subfolder", "type")}
                async with self.session.get(f"{self.server}/view", params=params) as resp:
                    (self.out / f"{prompt_id}-{image['filename']}").write_bytes(await resp.read())
        return prompt_id

    def run(self, wf: dict[str, Any], path: Path, index: int) -> str:
        return self.loop.run_until_complete(self._run(wf))

    def close(self) -> None:
        async def close() -> None:
            await self.ws.close()
            await self.session.close()

        self.loop.run_until_complete(close())
        self.loop.close()


class Api:
    name = "api"

    def __init__(self, server: str, out: Path) -> None:
        from charforge.driver.client import ComfyClient

        self.client = ComfyClient(server)
        self.out = out

    def run(self, wf: dict[str, Any], path: Path, index: int) -> str:
        result = self.client.run(wf, timeout=60)
        files = self.client.download_outputs(result, self.out)
        assert len(files) == 1, files
        return result.prompt_id

    def close(self) -> None:
        self.client.close()


def _last_json_line(command: list[str], env: dict[str, str], what: str) -> Any:
    """Run a command line tool to the end and read the JSON record its last stdout line holds."""
    proc = subprocess.run(
        command, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stdout[-1000:]} {proc.stderr[-1000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Cli:
    name = "cli"

    def __init__(self, server: str, out: Path, exe: str, env: dict[str, str]) -> None:
        self.server = server
        self.out = out
        self.exe = exe
        self.env = env

    def run(self, wf: dict[str, Any], path: Path, index: int) -> str:
        record = _last_json_line(
            [
                self.exe,
                "run",
                str(path),
                "--server",
                self.server,
                "--out",
                str(self.out / str(index)),
                "--json",
            ],
            self.env,
            "charforge run",
        )
        assert record["event"] == "result" and len(record["files"]) == 1, record
        return record["prompt_id"]

    def close(self) -> None:
        pass


class ComfyCli:
    name = "comfy-cli"

    def __init__(self, server: str, exe: str, env: dict[str, str], home: Path) -> None:
        parsed = urllib.parse.urlsplit(server)
        self.host, self.port = parsed.hostname or "127.0.0.1", str(parsed.port or 80)
        self.exe = exe
        # comfy-cli keeps a state file per job under ~/.config/comfy-cli: give it a throw-away home.
        self.env = dict(env, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))

    def run(self, wf: dict[str, Any], path: Path, index: int) -> str:
        envelope = _last_json_line(
            [
                self.exe,
                "--skip-prompt",
                "run",
                "--workflow",
                str(path),
                "--wait",
                "--host",
                self.host,
                "--port",
                self.port,
            ],
            self.env,
            "comfy run",
        )
        assert envelope.get("ok") and envelope["data"]["status"] == "completed", envelope
        return envelope["data"]["prompt_id"]

    def close(self) -> None:
        pass


# ---- statistics ---------------------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {
        "median": round(statistics.median(ordered), 2),
        "p90": round(pct(0.9), 2),
        "mean": round(statistics.fmean(ordered), 2),
        "min": round(ordered[0], 2),
        "max": round(ordered[-1], 2),
    }


def startup_ms(command: list[str], env: dict[str, str] | None) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL, env=env, check=True)
    return (time.perf_counter() - start) * 1000


def process_env(tmp: Path) -> dict[str, str]:
    """The environment of the CLI processes: bytecode caching on, in a throw-away folder.

    With PYTHONDONTWRITEBYTECODE set (as in some CI images) an editable install of CharForge recompiles its
    modules at every start (~100 ms) while a pip-installed comfy-cli ships .pyc files; a cache prefix gives
    both what a normal install has, without writing __pycache__ folders into the checkout.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    return env


def version_of(exe: str, args: list[str], env: dict[str, str] | None = None) -> str:
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    try:
        return str(json.loads(out.splitlines()[-1])["version"])
    except (ValueError, KeyError, IndexError):
        return out.splitlines()[-1] if out else "?"


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="measured jobs per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured jobs per configuration first")
    parser.add_argument("--server", help="a running ComfyUI (default: start one from --comfyui-dir)")
    parser.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"))
    parser.add_argument("--comfyui-python", default=os.environ.get("COMFYUI_PYTHON"))
    parser.add_argument("--ports", default="8900-8999", help="port range for the started ComfyUI")
    parser.add_argument(
        "--charforge", default=shutil.which("charforge") or str(Path(sys.executable).parent / "charforge")
    )
    parser.add_argument("--comfy-cli", default=shutil.which("comfy") or "comfy", help="comfy-cli's `comfy`")
    parser.add_argument("--configs", default="raw,api,cli,comfy-cli", help="comma-separated subset")
    parser.add_argument(
        "--startup-every",
        type=int,
        default=10,
        help="measure each CLI's bare process start (--version) once every N rounds",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (outputs, server log)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cf-bench-overhead-"))
    server_proc = None
    server = args.server.rstrip("/") if args.server else None
    try:
        if server is None:
            if not args.comfyui_dir:
                raise SystemExit("give --server URL or --comfyui-dir (or set COMFYUI_DIR)")
            from charforge.driver.local import LocalComfyUI

            base = tmp / "comfy-base"
            (base / "custom_nodes").mkdir(parents=True)
            (base / "user").mkdir()
            low, high = (int(p) for p in args.ports.split("-"))
            server_proc = LocalComfyUI(
                args.comfyui_dir,
                python=args.comfyui_python,
                port=free_port(low, high),
                extra_args=[
                    "--cpu",
                    "--base-directory",
                    str(base),
                    "--database-url",
                    f"sqlite:///{base / 'user' / 'comfyui.db'}",
                ],
                log_path=tmp / "comfyui.log",
            )
            server = server_proc.start(timeout=300)
        stats = get_json(f"{server}/system_stats")["system"]

        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        comfy_home = tmp / "comfy-home"
        comfy_home.mkdir()
        env = process_env(tmp)
        runners: list[Any] = []
        for name in wanted:
            out = tmp / "out" / name
            out.mkdir(parents=True)
            if name == "raw":
                runners.append(Raw(server, out))
            elif name == "api":
                runners.append(Api(server, out))
            elif name == "cli":
                runners.append(Cli(server, out, args.charforge, env))
            elif name == "comfy-cli":
                runners.append(ComfyCli(server, args.comfy_cli, env, comfy_home))
            else:
                raise SystemExit(f"unknown configuration {name!r}")

        jobs_dir = tmp / "jobs"
        jobs_dir.mkdir()
        color = random.randrange(1 << 23)  # EmptyImage colors are 24-bit; every job gets a new one
        walls: dict[str, list[float]] = {r.name: [] for r in runners}
        execs: dict[str, list[float]] = {r.name: [] for r in runners}
        starts: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        for runner in runners:
            if isinstance(runner, Cli):
                starts["charforge --version"] = ([args.charforge, "--version"], runner.env)
            elif isinstance(runner, ComfyCli):
                starts["comfy --version"] = ([args.comfy_cli, "--version"], runner.env)
        start_ms: dict[str, list[float]] = {name: [] for name in starts}
        load_before = loadavg()
        started = time.monotonic()
        for round_no in range(args.warmup + args.jobs):
            if round_no >= args.warmup and (round_no - args.warmup) % args.startup_every == 0:
                for name, (command, command_env) in starts.items():
                    start_ms[name].append(startup_ms(command, command_env))
            shift = round_no % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                color = (color + 1) % (1 << 24)
                wf = workflow(color, f"bench/{runner.name}")
                path = jobs_dir / f"{runner.name}-{round_no}.json"
                path.write_text(json.dumps(wf))
                start = time.perf_counter()
                prompt_id = runner.run(wf, path, round_no)
                wall = (time.perf_counter() - start) * 1000
                ran = execution_ms(history_entry(server, prompt_id))
                if round_no >= args.warmup:
                    walls[runner.name].append(wall)
                    execs[runner.name].append(ran)
        elapsed = time.monotonic() - started
        load_after = loadavg()
        for runner in runners:
            runner.close()

        versions = {
            "comfyui": stats.get("comfyui_version"),
            "python": platform.python_version(),
            "server_python": str(stats.get("python_version", "?")).split()[0],
            "comfy_cli": version_of(args.comfy_cli, ["--version"]) if "comfy-cli" in wanted else None,
        }
        overheads: dict[str, dict[str, float]] = {}
        for runner in runners:
            over = [w - e for w, e in zip(walls[runner.name], execs[runner.name], strict=True)]
            overheads[runner.name] = summary(over)
            print(
                json.dumps(
                    {
                        "config": runner.name,
                        "jobs": len(over),
                        "overhead_ms": overheads[runner.name],
                        "wall_ms": summary(walls[runner.name]),
                        "server_execution_ms": summary(execs[runner.name]),
                    }
                ),
                flush=True,
            )
        if start_ms:
            print(
                json.dumps(
                    {
                        "config": "process-start",
                        "samples": min(map(len, start_ms.values())),
                        "ms": {name: summary(values) for name, values in start_ms.items()},
                    }
                ),
                flush=True,
            )
        ratios = {}
        medians = {name: o["median"] for name, o in overheads.items()}
        if "comfy-cli" in medians:
            for name in ("api", "cli", "raw"):
                if name in medians and medians[name] > 0:
                    ratios[f"comfy-cli/{name}"] = round(medians["comfy-cli"] / medians[name], 2)
        if "api" in medians and "raw" in medians:
            ratios["api-raw_ms"] = round(medians["api"] - medians["raw"], 2)
        print(
            json.dumps(
                {
                    "config": "run",
                    "server": server,
                    "versions": versions,
                    "cpus": os.cpu_count(),
                    "machine": platform.machine(),
                    "loadavg_before": load_before,
                    "loadavg_after": load_after,
                    "seconds": round(elapsed, 1),
                    "median_overhead_ratios": ratios,
                    "target_api_under_15ms": medians.get("api", float("inf")) < 15.0,
                    "target_faster_than_comfy_cli": (
                        medians.get("cli", float("inf")) < medians.get("comfy-cli", float("-inf"))
                    ),
                }
            ),
            flush=True,
        )
    finally:
        if server_proc is not None:
            server_proc.stop()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
