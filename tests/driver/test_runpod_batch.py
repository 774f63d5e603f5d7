"""Whole batches through the batch runner on RunPod targets (fake pod proxy and fake serverless endpoint):
boot phase, a silent node behind the proxy timeout, a dropped socket, a 429 storm, an oversize input, a
video-only workflow, cancellation by timeout, a client killed mid-batch and resumed without double submission,
and the cost report against the fake's prices and times.

Times are scaled down 100x: proxy timeout and idle limit 1 s (100 s for real), silent node 3 s (5 min).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.batch_checks import journal
from fakes.comfy_server import FakeComfyServer, image_workflow, wait_workflow
from fakes.runpod_api import FakeRunPod, RunPodKnobs

from charforge.driver.batch import Batch, Job
from charforge.driver.batch.summary import summary_of
from charforge.driver.config import resolve_runpod
from charforge.driver.runpod import PodTarget, ServerlessTarget
from charforge.driver.runpod.cost import CostBudget, cost_report, with_budget, write_cost_summary

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture
def runpod(fake_comfy: FakeComfyServer) -> Iterator[FakeRunPod]:
    with FakeRunPod(
        knobs=RunPodKnobs(proxy_timeout=1.0, ws_idle_timeout=1.0), default_upstream=fake_comfy
    ) as fake:
        fake.add_endpoint("ep1", fake_comfy)
        yield fake


def job(name: str, prompt: dict, **extra) -> Job:
    return Job(id=name, name=name, folder=name, prompt=prompt, **extra)


def settings(runpod: FakeRunPod, server: str, **options):
    s = resolve_runpod(server, env=runpod.env(), config_path=Path("/nonexistent"))
    s.options.update(options)
    return s


def gif_only() -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 9}},
        "2": {"class_type": "CF_SaveGif", "inputs": {"images": ["1", 0], "filename_prefix": "clip"}},
    }


def test_batch_on_a_pod_through_the_proxy(
    runpod: FakeRunPod, fake_comfy: FakeComfyServer, tmp_path: Path
) -> None:
    runpod.knobs.boot_seconds = 0.2
    runpod.knobs.comfy_start_seconds = 0.2
    runpod.knobs.hang_requests = 1
    fake_comfy.knobs.drop_socket_on = "execution_start"
    runpod.add_pod("pod1", fake_comfy, cost_per_hr=360.0)  # $0.10/s: big enough for the summary's 4 decimals
    target = PodTarget(
        settings(runpod, "runpod-pod:pod1", on_finish="stop", ready_interval=0.05, keepalive=0.3),
        capacity=2,
        poll_interval=0.5,
    )
    jobs = [
        job("silent", wait_workflow(seconds=3.0, steps=1, tag="silent")),
        job("img-a", image_workflow(prefix="a")),
        job("img-b", image_workflow(width=40, prefix="b")),
    ]
    out = tmp_path / "out"
    outcomes = list(Batch(jobs).run([target], out))
    assert sorted(o.state for o in outcomes) == ["done"] * 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == 3
    (row,) = summary["servers"]
    # the pod's bill: hourly price x wall time from start to stop, boot and idle included
    assert row["server"] == "runpod-pod:pod1"
    assert row["cost"] == pytest.approx(runpod.pod_cost("pod1"), rel=0.03)
    assert (out / "img-b" / "manifest.json").exists() and any((out / "img-b").rglob("*.png"))
    assert runpod.proxy_502 >= 1 and runpod.proxy_524 == 1 and runpod.ws_drops == 0
    assert runpod.pods["pod1"].status == "EXITED"  # stopped after the batch
    report = cost_report([target])
    write_cost_summary(out, report)
    assert report["total_usd"] == pytest.approx(runpod.pod_cost("pod1"), rel=0.03)
    assert json.loads((out / "costs.json").read_text())["servers"]["runpod-pod:pod1"]["kind"] == "pod"


def test_batch_on_serverless(runpod: FakeRunPod, tmp_path: Path) -> None:
    runpod.knobs.rate_limit_next = 8
    runpod.knobs.cold_start = 0.1
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(range(256)) * (8 * 4096))
    load = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Face"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    target = ServerlessTarget(settings(runpod, "runpod-serverless:ep1"), capacity=2, poll_interval=0.05)
    target.client.http.backoff_base = 0.01
    jobs = [
        job("img-1", image_workflow(prefix="p1")),
        job("img-2", image_workflow(width=50, prefix="p2")),
        job("video", gif_only()),
        job("huge", load, inputs={"Face": str(big)}),
        job("slow", wait_workflow(seconds=5.0, steps=50, tag="slow")),
    ]
    out = tmp_path / "out"
    outcomes = {o.job.id: o for o in Batch(jobs).run([target], out, timeout=1.5, backoff=0.01)}
    assert {k: v.state for k, v in outcomes.items()} == {
        "img-1": "done",
        "img-2": "done",
        "video": "done",
        "huge": "failed",
        "slow": "timed_out",
    }
    assert "network volume" in outcomes["huge"].reason and "10 MB" in outcomes["huge"].reason
    assert any("CF_SaveGif" in w for w in target.warnings)
    assert outcomes["video"].files == []
    assert target.client.http.rate_limited == 8
    # the oversize job never left the machine; every other job was sent exactly once
    assert runpod.oversize == [] and len(runpod.run_bodies) == 4
    assert sorted(j.status for j in runpod.jobs.values()) == [
        "CANCELLED",
        "COMPLETED",
        "COMPLETED",
        "COMPLETED",
    ]
    # cost: executionTime x the endpoint GPU's per-second price, per job and in total
    ids = [r["prompt_id"] for r in journal(out) if r.get("ev") == "finished"]
    report = cost_report([target], {target.name: ids})
    assert set(report["jobs"]) == set(ids) and len(ids) == 3
    for job_id in ids:
        assert report["jobs"][job_id] == pytest.approx(runpod.job_cost(job_id), abs=1e-9)
    assert report["total_usd"] == pytest.approx(sum(runpod.job_cost(i) for i in ids), abs=1e-9)


CRASH_SCRIPT = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from fakes.comfy_server import wait_workflow
from charforge.driver.batch import Job
from charforge.driver.batch import Batch
from charforge.driver.config import resolve_runpod
from charforge.driver.runpod import ServerlessTarget

settings = resolve_runpod("runpod-serverless:ep1", config_path=Path("/nonexistent"))
target = ServerlessTarget(settings, capacity=1, poll_interval=0.05)
jobs = [Job(id=f"j{{i}}", name=f"j{{i}}", folder=f"j{{i}}", prompt=wait_workflow(seconds=1.5 + i / 100, tag=str(i)))
        for i in range(3)]
for outcome in Batch(jobs).run([target], sys.argv[1]):
    print(outcome.job.id, outcome.state, flush=True)
"""


def test_client_killed_mid_batch_resumes_without_double_submission(
    runpod: FakeRunPod, tmp_path: Path
) -> None:
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT.format(tests=str(TESTS)), encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, **runpod.env()}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            if any(r.get("ev") == "submitted" for r in journal(out)):
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"the batch never submitted: {proc.stderr.read().decode() if proc.poll() else ''}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    first = [r for r in journal(out) if r.get("ev") == "submitted"]
    assert len(first) == 1 and len(runpod.run_bodies) == 1  # killed while job 1 ran, before job 2 was sent
    # resume in this process: job 1 is looked up by its journaled id and collected, not sent again
    target = ServerlessTarget(settings(runpod, "runpod-serverless:ep1"), capacity=1, poll_interval=0.05)
    jobs = [job(f"j{i}", wait_workflow(seconds=1.5 + i / 100, tag=str(i))) for i in range(3)]
    outcomes = list(Batch(jobs).run([target], out))
    assert sorted(o.state for o in outcomes) == ["done"] * 3
    assert len(runpod.run_bodies) == 3  # one /run per job, none twice
    submitted = [r["prompt_id"] for r in journal(out) if r.get("ev") == "submitted"]
    assert len(submitted) == len(set(submitted)) == 3 and first[0]["prompt_id"] in submitted


def test_cost_budget_stops_new_submissions() -> None:
    budget = CostBudget(limit=1.0, first_estimate=0.3)
    admitted = 0
    while budget.allow():
        budget.started()
        admitted += 1
    assert admitted == 3  # 3 x 0.3 fits in 1.0, a 4th would not
    budget.finished(0.5)
    assert budget.estimate() == 0.5 and not budget.allow()  # 0.5 spent + 2 in flight x 0.5 + one more > 1


def test_a_job_whose_cost_is_unknown_still_uses_budget() -> None:
    # A job that ends without a bill (the platform reported no time) counts as the estimate, not as free:
    # otherwise a pool keeps admitting jobs past --max-cost.
    budget = CostBudget(limit=1.0, first_estimate=0.4)
    for _ in range(2):
        assert budget.allow()
        budget.started()
        budget.finished(None)
    assert budget.spent == [0.4, 0.4] and not budget.allow()  # 0.8 + one more 0.4 > 1.0


def test_max_cost_stops_submitting_and_costs_land_next_to_the_summary(
    runpod: FakeRunPod, tmp_path: Path
) -> None:
    target = ServerlessTarget(
        settings(runpod, "runpod-serverless:ep1"), capacity=1, poll_interval=0.05, price_per_second=1.0
    )  # $1/s makes the sums easy to follow
    out = tmp_path / "out"
    pool = with_budget([target], max_cost=2.6, out=out, first_estimate=1.0)
    jobs = [job(f"w{i}", wait_workflow(seconds=1.0 + i / 100, steps=2, tag=str(i))) for i in range(4)]
    outcomes = {o.job.id: o for o in Batch(jobs).run(pool, out)}
    states = [outcomes[f"w{i}"].state for i in range(4)]
    assert states == ["done", "done", "failed", "failed"]
    assert "--max-cost $2.6 would be exceeded" in outcomes["w2"].reason
    assert len(runpod.run_bodies) == 2  # nothing was sent once the estimate passed the limit
    costs = json.loads((out / "costs.json").read_text())
    ids = [r["prompt_id"] for r in journal(out) if r.get("ev") == "finished"]
    assert costs["total_usd"] == pytest.approx(
        sum(runpod.jobs[i].to_dict()["executionTime"] / 1000 for i in ids), abs=1e-6
    )
    assert costs["total_usd"] <= 2.6
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["servers"]
    assert row["cost"] == pytest.approx(costs["total_usd"], abs=2e-3)  # busy time = executionTime, at $1/s
    # per job and per batch in the summary too (what `charforge batch status` shows)
    assert set(summary["cost"]["jobs"]) == {"w0", "w1"}
    for job_id, prompt_id in zip(("w0", "w1"), ids, strict=True):
        assert summary["cost"]["jobs"][job_id] == pytest.approx(
            runpod.jobs[prompt_id].to_dict()["executionTime"] / 1000, abs=1e-6
        )
    assert summary["cost"]["total_usd"] == pytest.approx(costs["total_usd"], abs=2e-3)
    # job costs are journaled: the summary rebuilt from the journal alone still has them
    (out / "summary.json").unlink()
    assert summary_of(out)["cost"]["jobs"] == summary["cost"]["jobs"]
