"""``charforge runpod ...`` and RunPod server strings in ``charforge run/status/cancel``, against the fakes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.comfy_server import FakeComfyServer, image_workflow
from fakes.runpod_api import FakeRunPod, RunPodKnobs

from cf_testing.cli import point_cli_at
from cf_testing.cli import run_driver_cli as cli


@pytest.fixture
def runpod(
    fake_comfy: FakeComfyServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[FakeRunPod]:
    with FakeRunPod(
        knobs=RunPodKnobs(proxy_timeout=1.0, ws_idle_timeout=1.0), default_upstream=fake_comfy
    ) as fake:
        fake.add_endpoint("ep1", fake_comfy)
        point_cli_at(monkeypatch, fake.env(), tmp_path / "none.yaml")
        yield fake


def test_gpus_pods_and_pod_lifecycle_commands(runpod: FakeRunPod, fake_comfy: FakeComfyServer) -> None:
    code, out, _ = cli("runpod", "gpus")
    assert code == 0 and "NVIDIA RTX A5000" in out and "$0.27" in out
    code, out, _ = cli("runpod", "pod", "create", "--gpu", "NVIDIA GeForce RTX 4090", "--json")
    assert code == 0
    pod_id = json.loads(out.splitlines()[-1])["pod_id"]
    assert runpod.pods[pod_id].image == "runpod/comfyui:latest"
    code, out, _ = cli("runpod", "pods")
    assert code == 0 and pod_id in out and "$0.690" in out and "RUNNING" in out
    assert cli("runpod", "pod", "stop", pod_id)[0] == 0
    assert runpod.pods[pod_id].status == "EXITED"
    assert cli("runpod", "pod", "terminate", pod_id)[0] == 0
    assert runpod.pods[pod_id].status == "TERMINATED"
    code, out, err = cli("runpod", "pods")
    assert runpod.api_key not in out + err
    code, out, _ = cli(
        "runpod", "pod", "create", "--gpu", "NVIDIA RTX A5000", "--template", "cw3nka7d08", "--json"
    )
    assert code == 0
    from_template = runpod.pods[json.loads(out.splitlines()[-1])["pod_id"]]
    assert from_template.image == "runpod/comfyui:latest" and "8080/http" in from_template.ports
    code, _, err = cli("runpod", "pod", "create", "--gpu", "NO SUCH GPU")
    assert code == 3 and "unknown gpu" in err


def test_missing_key_is_explained(runpod: FakeRunPod, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY")
    code, _, err = cli("runpod", "gpus")
    assert code == 2 and "RUNPOD_API_KEY" in err


def test_run_status_cancel_on_serverless(runpod: FakeRunPod, tmp_path: Path) -> None:
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(image_workflow()), encoding="utf-8")
    out_dir = tmp_path / "out"
    code, out, err = cli(
        "run", str(wf), "--server", "runpod-serverless:ep1", "--out", str(out_dir), "--set", "Resize.width=48"
    )
    assert code == 0, err
    assert "submitted serverless job" in err and "COMPLETED" in err
    (png,) = out_dir.rglob("*.png")
    assert int.from_bytes(png.read_bytes()[16:20], "big") == 48  # the override reached the worker
    manifest = json.loads((out_dir / "manifest.json").read_text())
    job_id = manifest["runpod"]["job_id"]
    assert manifest["runpod"]["cost_usd"] == pytest.approx(runpod.job_cost(job_id), abs=1e-12)
    code, out, _ = cli("status", "--server", "runpod-serverless:ep1", job_id)
    assert code == 0 and "COMPLETED" in out and "succeeded" in out
    code, out, _ = cli("status", "--server", "runpod-serverless:ep1")
    assert code == 0 and "1 completed" in out
    code, out, _ = cli("runpod", "endpoint", "status", "ep1", "--json")
    assert json.loads(out.splitlines()[-1])["jobs"]["completed"] == 1
    runpod.knobs.cold_start = 30.0
    job = runpod.jobs  # a queued job to cancel, submitted through the API as another client would
    import asyncio

    from charforge.driver.runpod import ServerlessClient, build_request

    async def submit() -> str:
        client = ServerlessClient("ep1", runpod.api_key, base_url=runpod.endpoint_url)
        try:
            return await client.run(build_request(image_workflow()))
        finally:
            await client.close()

    queued = asyncio.run(submit())
    code, out, _ = cli("cancel", "--server", "runpod-serverless:ep1", queued)
    assert code == 0 and "removed from the queue" in out and job[queued].status == "CANCELLED"


def test_run_on_a_stopped_pod_starts_and_stops_it(
    runpod: FakeRunPod, fake_comfy: FakeComfyServer, tmp_path: Path
) -> None:
    runpod.knobs.boot_seconds = 0.2
    runpod.add_pod("pod1", fake_comfy)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "profiles:\n  gpu:\n    server: runpod-pod:pod1\n"
        "    runpod: {on_finish: stop, ready_interval: 0.05}\n",
        encoding="utf-8",
    )
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(image_workflow()), encoding="utf-8")
    code, out, err = cli(
        "run",
        str(wf),
        "--profile",
        "gpu",
        "--config",
        str(cfg),
        "--out",
        str(tmp_path / "o"),
        "--progress",
        "plain",
    )
    assert code == 0, err
    assert "starting stopped pod pod1" in err and "is ready" in err and "stop requested" in err
    assert "boot and idle included" in err
    assert list((tmp_path / "o").rglob("*.png"))
    assert runpod.pods["pod1"].status == "EXITED"


def test_batch_run_cli_on_serverless_and_a_pod(
    runpod: FakeRunPod, fake_comfy: FakeComfyServer, tmp_path: Path
) -> None:
    """``charforge batch run --server runpod-serverless:ID --server runpod-pod:ID``: one pool, one journal,
    costs per job and per batch (cli/batch.py asks cli/runpod.py for RunPod servers)."""
    runpod.add_pod("pod1", fake_comfy, running=True)
    batch = tmp_path / "jobs.jsonl"
    batch.write_text(
        "\n".join(
            json.dumps({"prompt": image_workflow(width=16 + i, prefix=f"b{i}"), "name": f"b{i}"})
            for i in range(4)
        )
        + "\n",
        encoding="utf-8",
    )
    out_dir = tmp_path / "batch"
    code, out, err = cli(
        "batch",
        "run",
        str(batch),
        "--out",
        str(out_dir),
        "--server",
        "runpod-serverless:ep1",
        "--server",
        "runpod-pod:pod1",
    )
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["counts"]["done"] == 4
    costs = json.loads((out_dir / "costs.json").read_text())
    assert set(costs["servers"]) == {"runpod-serverless:ep1", "runpod-pod:pod1"}
    submitted = {
        r["prompt_id"]
        for r in map(json.loads, (out_dir / "journal.jsonl").read_text().splitlines())
        if r.get("ev") == "submitted"
    }
    assert set(costs["jobs"]) == submitted  # a cost for every job, on either server
    assert len(summary["cost"]["jobs"]) == 4 and summary["cost"]["total_usd"] > 0
    status = cli("batch", "status", str(out_dir))[1]
    assert "estimated cost $" in status and "4 job(s) priced" in status
    assert runpod.api_key not in out + err


def test_batch_run_cli_on_a_pod(runpod: FakeRunPod, fake_comfy: FakeComfyServer, tmp_path: Path) -> None:
    """``runpod-pod:ID`` in ``charforge batch run`` goes through the pod's proxy URL."""
    runpod.add_pod("pod1", fake_comfy, running=True)
    batch = tmp_path / "jobs.jsonl"
    batch.write_text(
        "\n".join(
            json.dumps({"prompt": image_workflow(width=20 + i, prefix=f"c{i}"), "name": f"c{i}"})
            for i in range(2)
        )
        + "\n",
        encoding="utf-8",
    )
    code, _, err = cli(
        "batch", "run", str(batch), "--out", str(tmp_path / "b"), "--server", "runpod-pod:pod1"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["counts"]["done"] == 2
    assert any("/proxy/pod1-8188/prompt" in path for _, path, _ in runpod.requests)
