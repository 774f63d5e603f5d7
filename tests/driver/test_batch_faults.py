"""Fault tests of ``charforge batch run``: the driver killed at random points, the server restarted mid-batch,
dropped connections and sockets. Each time every job's outputs exist exactly once, no prompt runs twice while
its server still knows it, and the summary counts are right."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

from fakes.batch_checks import (
    assert_outputs_once,
    batch_process,
    batch_run,
    executions_by_color,
    records,
    run_cli,
    sweep_file,
)
from fakes.comfy_server import FakeComfyServer, Knobs, image_workflow
from fakes.processes import sigint_as_in_a_terminal

from charforge.driver.batch import Batch, load_batch
from charforge.driver.batch.journal import JOURNAL_NAME, replay


def _driver(spec: Path, out: Path, *servers: str) -> subprocess.Popen:
    options = ("--backoff", "0.05", "--window", "3")
    return batch_process(spec, out, list(servers), *options, preexec_fn=sigint_as_in_a_terminal)


def test_driver_killed_at_random_points_of_a_100_job_batch(tmp_path):
    rng = random.Random(
        int(os.environ.get("CHARFORGE_KILL_SEED", "4"))
    )  # vary it to explore more kill points
    spec = sweep_file(tmp_path, list(range(100)))
    out = tmp_path / "out"
    kills = 0
    with FakeComfyServer(knobs=Knobs(node_seconds=0.004)) as server:
        for attempt in range(12):
            journal = out / JOURNAL_NAME
            size = journal.stat().st_size if journal.exists() else 0
            proc = _driver(spec, out, server.url)
            if attempt < 6:  # then let it finish
                deadline = time.monotonic() + 15  # kill only once it works (Python starting is not the test)
                while (
                    time.monotonic() < deadline
                    and proc.poll() is None
                    and (not journal.exists() or journal.stat().st_size <= size + 200)
                ):
                    time.sleep(0.01)
                try:
                    proc.wait(timeout=rng.uniform(0.0, 0.6))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    continue
            else:
                proc.wait(timeout=60)
            if proc.returncode == 0:
                break
            raise AssertionError(f"driver exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        else:
            raise AssertionError("the batch never finished")
        executions = executions_by_color(server)
        assert max(server.executions.values()) == 1
        assert sorted(executions) == list(range(100)) and set(executions.values()) == {1}
    assert kills >= 3
    plan = load_batch(spec)
    assert_outputs_once(out, plan)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == 100 and summary["complete"] and summary["runs"] == kills + 1
    state = replay(out / JOURNAL_NAME)
    # a run killed after its last journal line (while exiting) has ended normally as far as the journal goes
    assert [r["reason"] for r in state.runs[:-1]] == ["killed"] * kills or [
        r["reason"] for r in state.runs[:-2]
    ] == ["killed"] * (kills - 1), [r["reason"] for r in state.runs]
    # every job's journal shows its prompt id before the submission and one "done"
    done = [r for r in records(out) if r["ev"] == "done"]
    assert len(done) == 100 and len({r["job"] for r in done}) == 100


def test_sigint_stops_cleanly_and_the_rerun_finishes(tmp_path):
    spec = sweep_file(tmp_path, list(range(30)))
    out = tmp_path / "out"
    with FakeComfyServer(knobs=Knobs(node_seconds=0.01)) as server:
        proc = _driver(spec, out, server.url)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list(out.glob("color-*")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130, proc.stderr.read()
        state = replay(out / JOURNAL_NAME)
        assert state.runs[-1]["reason"] == "interrupted" and not state.torn
        assert "rerun the same command to resume" in proc.stderr.read()
        code, _, err = batch_run(spec, out, server.url)
        assert code == 0, err
        assert max(server.executions.values()) == 1 and set(executions_by_color(server).values()) == {1}
    assert_outputs_once(out, load_batch(spec))


def test_server_restarted_mid_batch(tmp_path):
    spec = sweep_file(tmp_path, list(range(24)))
    out = tmp_path / "out"
    with FakeComfyServer(knobs=Knobs(node_seconds=0.01)) as server:

        def restart_when_a_third_is_done() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(server.history) < 8:
                time.sleep(0.01)
            server.knobs.down = True  # the process is gone for a moment ...
            server.restart()  # ... and comes back with an empty queue and history
            time.sleep(0.3)
            server.knobs.down = False

        thread = threading.Thread(target=restart_when_a_third_is_done)
        thread.start()
        results = list(Batch.from_file(spec).run(servers=[server.url], out=out, capacity=3, backoff=0.05))
        thread.join()
        assert len(results) == 24 and all(r.ok for r in results)
        assert max(server.executions.values()) == 1  # a prompt id never runs twice
        executions = executions_by_color(server)
        assert set(executions) == set(range(24)) and server.generation == 1
        twice = [c for c, n in executions.items() if n > 1]
        # Only jobs the driver had not collected yet (at most the window, 3) ran again, and only because the
        # server forgot them: each ran once before the restart and once after it.
        assert len(twice) <= 3 and max(executions.values()) <= 2
        for color in twice:
            generations = [
                g
                for (_, prompt), g in zip(server.executed, server.execution_generations, strict=True)
                if prompt["1"]["inputs"]["color"] == color
            ]
            assert generations == [0, 1], (color, generations)
    assert_outputs_once(out, load_batch(spec))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == 24 and summary["resubmissions"] >= len(twice)


def test_dropped_connections_and_websockets(tmp_path):
    spec = sweep_file(tmp_path, list(range(16)))
    out = tmp_path / "out"
    knobs = Knobs(node_seconds=0.005, drop_rate=0.15, drop_socket_on="executing", drop_times=5, fault_seed=3)
    with FakeComfyServer(knobs=knobs) as a, FakeComfyServer(knobs=Knobs(node_seconds=0.005)) as b:
        code, _, err = batch_run(spec, out, [a.url, b.url], "--backoff", "0.02", "--retries", "20")
        assert code == 0, err
        assert a.injected_faults > 0
        assert max([*a.executions.values(), *b.executions.values()]) == 1
        assert set(executions_by_color(a, b).values()) == {1}
    assert_outputs_once(out, load_batch(spec))
    assert json.loads((out / "summary.json").read_text())["counts"]["done"] == 16


def test_status_reads_a_running_batch(tmp_path):
    spec = sweep_file(tmp_path, list(range(20)), workflow=image_workflow())
    out = tmp_path / "out"
    with FakeComfyServer(knobs=Knobs(node_seconds=0.02)) as server:
        proc = _driver(spec, out, server.url)
        try:
            deadline = time.monotonic() + 20
            seen_running = False
            while time.monotonic() < deadline and proc.poll() is None:
                if (out / JOURNAL_NAME).exists():
                    code, stdout, _ = run_cli("batch", "status", str(out), "--json")
                    if code == 0 and json.loads(stdout)["running"]:
                        seen_running = True
                        break
                time.sleep(0.05)
            assert seen_running
        finally:
            assert proc.wait(timeout=60) == 0
    code, stdout, _ = run_cli("batch", "status", str(out))
    assert code == 0 and "20 jobs, complete" in stdout
