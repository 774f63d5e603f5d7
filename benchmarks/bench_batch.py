"""Batch runner at scale (issue 4): plan size, journal, resume, memory; and one server vs two.

``scale`` (no server needed), run in a fresh process per size so each peak RSS is its own:

* expand a sweep of N jobs (two axes over an inline graph);
* journal it as a run would: the header and ``plan.json``, then for 70 % of the jobs the four records of a
  finished job (``submitting``, ``submitted``, ``finished``, ``done``), for 10 % the two of a job still on its
  server, the rest untouched; every record ``fsync``'d like a real run;
* replay the journal (what ``charforge batch status`` and a resume do first);
* resume: open the batch folder again (plan hash, replay, scheduling of done / in-flight / pending jobs) and
  build the summary.

``speedup``: the same batch on one server, then on two, then on one again (the load of a shared machine
drifts), with the fake ComfyUI (``tests/fakes/comfy_server.py`` as separate processes, ``--node-seconds``
per node) and, with ``--comfyui-dir``, two real ComfyUIs on loopback (ports 18300-18399) running a small CPU
workflow of built-in nodes (``EmptyImage`` -> ``ImageBlur`` -> ``SaveImage``)::

    python benchmarks/bench_batch.py scale --jobs 1000 10000
    python benchmarks/bench_batch.py speedup --jobs 40 --comfyui-dir /work/comfyui \\
        --comfyui-python /work/comfyui-venv/bin/python

Prints one JSON line per measurement; record them in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORTS = range(18300, 18400)
sys.path.insert(0, str(ROOT / "tests"))
from cf_testing.real_comfyui import free_port, start_comfyui  # noqa: E402 - the tests' helpers, not installed


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def graph() -> dict:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 0},
            "_meta": {"title": "Blank"},
        },
        "2": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": 15, "sigma": 5.0},
            "_meta": {"title": "Blur"},
        },
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "bench/batch"},
            "_meta": {"title": "Save"},
        },
    }


def fake_graph() -> dict:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0},
            "_meta": {"title": "Blank"},
        },
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "nearest-exact",
                "width": 32,
                "height": 32,
                "crop": "disabled",
            },
            "_meta": {"title": "Resize"},
        },
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "bench/batch"},
            "_meta": {"title": "Save"},
        },
    }


# ---- scale -----------------------------------------------------------------------------------------------------


def scale_one(jobs: int) -> dict:
    from charforge.driver.batch import parse_sweep
    from charforge.driver.batch.journal import JOURNAL_NAME, replay
    from charforge.driver.batch.runner import BatchRunner, RunOptions
    from charforge.driver.batch.summary import build_summary
    from charforge.driver.batch.targets import ComfyTarget

    rss_start = rss_mib()
    side = int(jobs**0.5)
    rows = jobs // side
    spec = {
        "prompt": fake_graph(),
        "axes": {
            "color": {"set": "Blank.color", "values": list(range(side))},
            "width": {"set": "Resize.width", "values": list(range(8, 8 + rows))},
        },
    }
    t = time.perf_counter()
    plan = parse_sweep(spec, "bench")
    expand_s = time.perf_counter() - t
    out = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        target = ComfyTarget("http://127.0.0.1:9", capacity=2)  # never contacted
        runner = BatchRunner(plan, [target], RunOptions(out))
        t = time.perf_counter()
        journal = runner._open_journal()
        n_done, n_flight = int(len(plan.jobs) * 0.7), int(len(plan.jobs) * 0.1)
        for i, job in enumerate(plan.jobs[: n_done + n_flight]):
            pid = f"{i:08d}-0000-4000-8000-000000000000"
            journal.append("submitting", job=job.id, prompt_id=pid, server=target.name)
            journal.append("submitted", job=job.id, prompt_id=pid, server=target.name)
            if i < n_done:
                journal.append(
                    "finished", job=job.id, prompt_id=pid, server=target.name, execution_seconds=0.1
                )
                journal.append(
                    "done",
                    job=job.id,
                    prompt_id=pid,
                    server=target.name,
                    files=["bench/batch_00001_.png"],
                    seconds=0.2,
                )
        journal.close()
        journal_s = time.perf_counter() - t
        records = journal.state.records
        size = (out / JOURNAL_NAME).stat().st_size
        t = time.perf_counter()
        state = replay(out / JOURNAL_NAME)
        replay_s = time.perf_counter() - t
        assert state.counts()["done"] == n_done
        t = time.perf_counter()
        again = BatchRunner(plan, [target], RunOptions(out))
        again.journal = again._open_journal()
        finished = again._schedule(again.journal)
        summary = build_summary(again.journal.state, again._job_infos)
        again.journal.close()
        resume_s = time.perf_counter() - t
        assert len(finished) == n_done and len(again._pending) == len(plan.jobs) - n_done - n_flight
        assert summary["counts"]["done"] == n_done
        return {
            "bench": "scale",
            "jobs": len(plan.jobs),
            "expand_s": round(expand_s, 3),
            "journal_records": records,
            "journal_mib": round(size / 2**20, 2),
            "journal_write_s": round(journal_s, 3),
            "fsync_per_record_ms": round(journal_s / records * 1000, 3),
            "replay_s": round(replay_s, 3),
            "resume_s": round(resume_s, 3),
            "rss_before_mib": round(rss_start, 1),
            "peak_rss_mib": round(rss_mib(), 1),
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---- speedup ---------------------------------------------------------------------------------------------------


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/system_stats", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(url)


def start_servers(
    kind: str, count: int, args: argparse.Namespace, tmp: Path
) -> list[tuple[str, subprocess.Popen]]:
    servers = []
    for i in range(count):
        port = free_port(PORTS)
        if kind == "fake":
            cmd = [
                sys.executable,
                str(ROOT / "tests" / "fakes" / "comfy_server.py"),
                "--listen",
                "127.0.0.1",
                "--port",
                str(port),
                "--node-seconds",
                str(args.node_seconds),
                "--caching",
                "off",
            ]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            servers.append((url, proc))
            wait_up(url, proc)
        else:
            threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
            comfy, base = Path(args.comfyui_dir), tmp / f"comfy{i}"
            server = start_comfyui(comfy, base, args.comfyui_python, env=threads, port=port)
            servers.append((server.url, server.process))
    return servers


def run_batch(urls: list[str], jobs: int, tmp: Path, kind: str, tag: str, offset: int) -> float:
    from charforge.driver.batch import Batch, parse_sweep

    # different colours every run: ComfyUI's cache must never skip the work
    spec = {
        "prompt": fake_graph() if kind == "fake" else graph(),
        "axes": {"color": {"set": "Blank.color", "values": list(range(offset, offset + jobs))}},
    }
    plan = parse_sweep(spec, "bench")
    out = tmp / f"out-{tag}"
    start = time.perf_counter()
    results = list(Batch(plan).run(servers=urls, out=out, capacity=2, contact_sheet=None))
    took = time.perf_counter() - start
    assert len(results) == jobs and all(r.ok for r in results), [r.reason for r in results if not r.ok][:3]
    return took


def speedup(kind: str, args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-speedup-"))
    servers = start_servers(kind, 2, args, tmp)
    try:
        urls = [u for u, _ in servers]
        # warm-up: the first job of a ComfyUI imports torch code paths
        run_batch(urls[:1], 2, tmp, kind, "warm0", 10_000_000)
        run_batch(urls[1:], 2, tmp, kind, "warm1", 10_100_000)
        one_a = run_batch(urls[:1], args.jobs, tmp, kind, "one-a", 0)
        two = run_batch(urls, args.jobs, tmp, kind, "two", 1_000_000)
        one_b = run_batch(urls[:1], args.jobs, tmp, kind, "one-b", 2_000_000)
        one = (one_a + one_b) / 2
        return {
            "bench": "speedup",
            "servers": kind,
            "jobs": args.jobs,
            "one_server_s": [round(one_a, 2), round(one_b, 2)],
            "two_servers_s": round(two, 2),
            "ratio_two_over_one": round(two / one, 3),
            "speedup": round(one / two, 2),
        }
    finally:
        for _, proc in servers:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def machine() -> dict:
    import aiohttp

    try:
        from charforge import __version__
    except Exception:  # noqa: BLE001
        __version__ = "?"
    return {
        "bench": "machine",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "aiohttp": aiohttp.__version__,
        "charforge": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    scale = sub.add_parser("scale")
    scale.add_argument("--jobs", type=int, nargs="+", default=[1000, 10000])
    scale.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process mode
    sp = sub.add_parser("speedup")
    sp.add_argument("--jobs", type=int, default=40)
    sp.add_argument("--node-seconds", type=float, default=0.05, help="fake server: seconds per node")
    sp.add_argument("--comfyui-dir", type=Path, default=os.environ.get("COMFYUI_DIR"))
    sp.add_argument("--comfyui-python", default=os.environ.get("COMFYUI_PYTHON", sys.executable))
    sp.add_argument("--threads", type=int, default=1, help="torch threads per real ComfyUI (default 1)")
    sp.add_argument("--real-jobs", type=int, default=None, help="jobs for the real servers (default --jobs)")
    args = parser.parse_args()
    if args.what == "scale" and args.one:
        print(json.dumps(scale_one(args.jobs[0])), flush=True)
        return
    print(json.dumps(machine()), flush=True)
    if args.what == "scale":
        for n in args.jobs:  # a fresh process each: its peak RSS belongs to that size alone
            subprocess.run(
                [sys.executable, __file__, "scale", "--one", "--jobs", str(n)], check=True, stdout=sys.stdout
            )
        return
    print(json.dumps(speedup("fake", args)), flush=True)
    if args.comfyui_dir:
        if args.real_jobs:
            args.jobs = args.real_jobs
        print(json.dumps(speedup("comfyui", args)), flush=True)


if __name__ == "__main__":
    main()
