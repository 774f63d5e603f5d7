"""Batches with Replicate in the pool: a 20-job batch split between a fake ComfyUI and the fake Replicate with the
driver SIGKILLed twice, a crash in the window between creating a prediction and journaling it, the cost against
the fake's bill, and ``--max-cost``."""

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
from fakes.comfy_server import FakeComfyServer, Knobs, image_workflow
from fakes.replicate_api import FakeReplicate

from charforge.driver.batch import Batch, Job
from charforge.driver.config import resolve_replicate
from charforge.driver.replicate import ReplicateTarget
from charforge.driver.runpod.cost import with_budget

TESTS = Path(__file__).resolve().parents[1]
MODEL = "comfyui/any-comfyui-workflow"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[FakeComfyServer, FakeComfyServer, FakeReplicate]]:
    """A local fake ComfyUI, and the fake Replicate whose model runs on a second one; nodes take 0.25 s."""
    with (
        FakeComfyServer(knobs=Knobs(node_seconds=0.25)) as local,
        FakeComfyServer(knobs=Knobs(node_seconds=0.25)) as remote,
        FakeReplicate() as replicate,
    ):
        replicate.add_model(MODEL, "comfyui", upstream=remote, hardware="gpu-a100-large")
        yield local, remote, replicate


def environment(replicate: FakeReplicate, tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"profiles:\n  rep:\n    replicate:\n      model: {MODEL}\n      hardware: gpu-a100-large\n"
        "      poll_interval: 0.05\n      capacity: 3\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CHARFORGE_SERVER", "CHARFORGE_PROFILE")}
    return {**env, **replicate.env(), "CHARFORGE_CONFIG": str(config)}


def run_until(
    cmd: list[str], env: dict[str, str], out: Path, done_at_least: int, timeout: float = 60
) -> None:
    """Start the batch and SIGKILL it once the journal holds ``done_at_least`` done jobs (over all runs)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if sum(1 for r in journal(out) if r.get("ev") == "done") >= done_at_least:
                return
            if proc.poll() is not None:
                pytest.fail(f"the batch ended before it was killed: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            time.sleep(0.02)
        pytest.fail("the batch made no progress")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def test_mixed_pool_killed_twice_every_output_exactly_once_and_cost_matches_the_bill(
    pool: tuple[FakeComfyServer, FakeComfyServer, FakeReplicate], tmp_path: Path
) -> None:
    local, _, replicate = pool
    replicate.knobs.rate_limit_next = 4
    batch = tmp_path / "jobs.jsonl"
    batch.write_text(
        "".join(
            json.dumps({"name": f"j{i:02d}", "prompt": image_workflow(width=20 + i, prefix=f"j{i:02d}")})
            + "\n"
            for i in range(20)
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    env = environment(replicate, tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "charforge.driver.cli",
        "batch",
        "run",
        str(batch),
        "--out",
        str(out),
        "--server",
        local.url,
        "--profile",
        "rep",
        "--window",
        "2",
        "--backoff",
        "0.05",
    ]
    run_until(cmd, env, out, 4)
    run_until(cmd, env, out, 11)
    final = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-3000:]

    records = journal(out)
    servers = {r["job"]: r["server"] for r in records if r.get("ev") == "done"}
    assert len(servers) == 20 and {"replicate:" + MODEL, local.url.rstrip("/") + "/"} >= set(servers.values())
    on_replicate = sorted(j for j, s in servers.items() if s.startswith("replicate:"))
    assert on_replicate and len(on_replicate) < 20  # the pool really was shared
    for i in range(20):
        folder = out / f"j{i:02d}"
        names = sorted(p.name for p in folder.iterdir())
        assert names == [f"j{i:02d}_00001_.png", "manifest.json"], (folder, names)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert [f["path"] for f in manifest["files"]] == [f"j{i:02d}_00001_.png"]
    assert not any(p.name.startswith(".staging") and any(p.iterdir()) for p in out.iterdir() if p.is_dir())
    # some Replicate jobs were in flight at a kill: sent by one run, collected by a later one
    runs = [i for i, r in enumerate(records) if r.get("ev") == "run_start"]
    sent = {
        r["job"]: i
        for i, r in enumerate(records)
        if r.get("ev") == "submitted" and str(r.get("server")).startswith("replicate:")
    }
    done_at = {r["job"]: i for i, r in enumerate(records) if r.get("ev") == "done"}
    carried = [job for job, i in sent.items() if any(i < k < done_at[job] for k in runs)]
    assert len(runs) == 3 and carried
    # exactly once on Replicate: one prediction per job that ran there, each tag created once
    tags = replicate.tagged()
    assert len(tags) == len(set(tags)) == len(replicate.created)
    succeeded = [j for j in replicate.jobs.values() if j.status == "succeeded"]
    assert len(succeeded) == len(on_replicate)
    assert all(j.status in ("succeeded", "canceled") for j in replicate.jobs.values())
    # cost: predict_time x the hardware price, as the fake bills it
    summary = json.loads((out / "summary.json").read_text())
    (row,) = [r for r in summary["servers"] if r["server"] == "replicate:" + MODEL]
    assert row["cost"] == pytest.approx(replicate.bill(), rel=0.03)
    assert summary["cost"]["total_usd"] == pytest.approx(replicate.bill(), rel=0.03)
    costs = json.loads((out / "costs.json").read_text())
    assert costs["servers"]["replicate:" + MODEL]["cost_usd"] == pytest.approx(
        sum((j.predict_time or 0) * 0.0014 for j in succeeded if j.id in costs["jobs"]), rel=1e-6
    )
    # the token appears nowhere we wrote
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            assert replicate.token not in path.read_text(), path
    assert replicate.token not in final.stdout + final.stderr


CRASH_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from fakes.comfy_server import image_workflow
from charforge.driver.batch import Batch, Job
from charforge.driver.config import resolve_replicate
from charforge.driver.replicate import ReplicateTarget

class DiesAfterCreating(ReplicateTarget):
    async def submit(self, graph, prompt_id):
        accepted = await super().submit(graph, prompt_id)
        if graph["3"]["inputs"]["filename_prefix"] == "victim":
            os.kill(os.getpid(), signal.SIGKILL)   # created on Replicate, not yet journaled as submitted
        return accepted

settings = resolve_replicate("replicate:{model}", config_path=Path("/nonexistent"))
settings.options.update(poll_interval=0.05, hardware="gpu-a100-large")
jobs = [Job(id=p, name=p, folder=p, prompt=image_workflow(prefix=p)) for p in ("first", "victim")]
for outcome in Batch(jobs).run([DiesAfterCreating(settings, capacity=1)], sys.argv[1]):
    print(outcome.job.id, outcome.state, flush=True)
"""


def test_crash_between_create_and_journal_is_reconciled_by_tag(
    pool: tuple[FakeComfyServer, FakeComfyServer, FakeReplicate], tmp_path: Path
) -> None:
    _, _, replicate = pool
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT.format(tests=str(TESTS), model=MODEL), encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        env={**os.environ, **replicate.env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    records = journal(out)
    victim = [r for r in records if r.get("job") == "victim"]
    assert [r["ev"] for r in victim] == ["submitting"]  # the id Replicate gave was never journaled
    assert len(replicate.created) == 2
    # resume: the journaled tag finds the prediction by listing; nothing is created again
    settings = resolve_replicate(f"replicate:{MODEL}", env=replicate.env(), config_path=Path("/nonexistent"))
    assert settings is not None
    settings.options.update(poll_interval=0.05, hardware="gpu-a100-large")
    jobs = [Job(id=p, name=p, folder=p, prompt=image_workflow(prefix=p)) for p in ("first", "victim")]
    outcomes = {o.job.id: o for o in Batch(jobs).run([ReplicateTarget(settings, capacity=1)], out)}
    assert {k: o.state for k, o in outcomes.items()} == {"first": "done", "victim": "done"}
    assert len(replicate.created) == 2 and len(set(replicate.tagged())) == 2
    victim_id = next(j.id for j in replicate.jobs.values() if "victim" in j.input["workflow_json"])
    assert outcomes["victim"].prompt_id == victim_id
    assert sorted(p.name for p in (out / "victim").iterdir()) == ["manifest.json", "victim_00001_.png"]


def test_max_cost_stops_submitting_on_replicate(
    pool: tuple[FakeComfyServer, FakeComfyServer, FakeReplicate], tmp_path: Path
) -> None:
    _, _, replicate = pool
    settings = resolve_replicate(f"replicate:{MODEL}", env=replicate.env(), config_path=Path("/nonexistent"))
    assert settings is not None
    settings.options.update(poll_interval=0.05, price_per_second=1.0)  # $1/s keeps the sums readable
    target = ReplicateTarget(settings, capacity=1)
    out = tmp_path / "out"
    jobs = [
        Job(id=f"w{i}", name=f"w{i}", folder=f"w{i}", prompt=image_workflow(width=30 + i, prefix=f"w{i}"))
        for i in range(4)
    ]
    # each job is billed 0.75 s ($0.75) whatever the load. One at a time: the first starts on the $0.7 first
    # estimate, the second at $0.75 spent + $0.75, the third would make $2.25 > $1.9 and is refused.
    replicate.knobs.bill_seconds = 0.75
    outcomes = {
        o.job.id: o for o in Batch(jobs).run(with_budget([target], 1.9, out=out, first_estimate=0.7), out)
    }
    states = [outcomes[f"w{i}"].state for i in range(4)]
    ran = states.count("done")
    assert ran == 2 and states == ["done"] * ran + ["failed"] * (4 - ran)
    assert "--max-cost $1.9 would be exceeded" in outcomes["w3"].reason
    assert len(replicate.created) == ran  # refused jobs were never sent
    costs = json.loads((out / "costs.json").read_text())
    spent = [j.predict_time or 0 for j in replicate.jobs.values()]
    assert costs["total_usd"] == pytest.approx(sum(spent), rel=1e-6)
    assert sum(spent[:-1]) <= 1.9  # only the last admitted job may pass the limit
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["cost"]["jobs"]) == {f"w{i}" for i in range(ran)}
