"""ComfyUI workflows on a Replicate model (``charforge run/status/cancel --server replicate:...`` and
:class:`ReplicateTarget`) against the loopback fake of Replicate's API fronting a fake ComfyUI."""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.comfy_server import FakeComfyServer, image_workflow, png_bytes, wait_workflow
from fakes.replicate_api import FakeReplicate, ReplicateKnobs

from cf_testing.cli import point_cli_at
from cf_testing.cli import run_driver_cli as cli
from charforge.driver.batch.targets import JobSpec, is_transient
from charforge.driver.config import resolve_replicate
from charforge.driver.errors import AuthenticationError, ExecutionError, JobTimeout
from charforge.driver.replicate import CreateOutcomeUnknown, ReplicateAPI, ReplicateTarget, workflow_tag

MODEL = "comfyui/any-comfyui-workflow"


@pytest.fixture
def replicate(
    fake_comfy: FakeComfyServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[FakeReplicate]:
    with FakeReplicate(knobs=ReplicateKnobs()) as fake:
        fake.add_model(MODEL, "comfyui", upstream=fake_comfy, hardware="gpu-a100-large")
        config = (
            f"profiles:\n  rep:\n    replicate:\n      model: {MODEL}\n      hardware: gpu-a100-large\n"
            "      poll_interval: 0.05\n"
        )
        point_cli_at(monkeypatch, fake.env(), tmp_path / "config.yaml", config)
        yield fake


def load_and_save() -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Face"}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "nearest-exact",
                "width": 20,
                "height": 20,
                "crop": "disabled",
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "face/out"}},
    }


def png(path: Path, shade: int = 90) -> Path:
    path.write_bytes(png_bytes(8, 8, (shade, 40, 200)))
    return path


def target(fake: FakeReplicate, **options) -> ReplicateTarget:
    settings = resolve_replicate(f"replicate:{MODEL}", config_path=Path("/nonexistent"))
    assert settings is not None and settings.api_url == fake.url
    settings.options.update({"poll_interval": 0.05, "hardware": "gpu-a100-large", **options})
    return ReplicateTarget(settings)


def test_run_uploads_inputs_follows_and_downloads_with_manifest(
    replicate: FakeReplicate, fake_comfy: FakeComfyServer, tmp_path: Path
) -> None:
    replicate.knobs.rate_limit_next = 2  # throttled twice, waits Retry-After, then goes on
    replicate.knobs.start_delay = 0.3  # a cold boot: "starting" first
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(load_and_save()), encoding="utf-8")
    face = png(tmp_path / "face.png")
    out_dir = tmp_path / "out"
    code, out, err = cli(
        "run",
        str(wf),
        "--server",
        f"replicate:{MODEL}",
        "--input",
        f"Face={face}",
        "--set",
        "ImageScale.width=24",
        "--out",
        str(out_dir),
        "--profile",
        "rep",
    )
    assert code == 0, err
    (job_id,) = replicate.created
    job = replicate.jobs[job_id]
    # what the model got: the API workflow (overrides applied, the input renamed) and a zip with the file
    sent = json.loads(job.input["workflow_json"])
    assert sent["2"]["inputs"]["width"] == 24 and sent["1"]["inputs"]["image"].endswith("-face.png")
    assert job.input["randomise_seeds"] is False
    archive = replicate.files[job.input["input_file"].rsplit("/", 1)[-1]][2]
    assert zipfile.ZipFile(io.BytesIO(archive)).namelist() == [sent["1"]["inputs"]["image"]]
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    assert files == ["manifest.json", "out_00001_.png"]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["replicate"]["prediction_id"] == job_id
    assert manifest["replicate"]["execution_seconds"] == pytest.approx(job.predict_time, abs=1e-5)
    assert manifest["replicate"]["cost_usd"] == pytest.approx(replicate.bill(), rel=1e-3)
    assert manifest["files"][0]["sha256"] and manifest["server"] == f"replicate:{MODEL}"
    assert "starting" in err and "Running workflow" in err  # status and log lines as progress
    assert replicate.token not in out + err + (out_dir / "manifest.json").read_text()
    code, out, _ = cli("status", "--server", f"replicate:{MODEL}", job_id, "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["status"] == "succeeded"


def test_lost_create_answer_is_found_by_its_tag_not_sent_twice(replicate: FakeReplicate) -> None:
    replicate.knobs.lose_create_answers = 1

    async def run() -> str:
        t = target(replicate)
        try:
            await t.open()
            graph = await t.prepare(JobSpec(image_workflow(prefix="tagged")))
            return await t.submit(graph, "6f1c2a64-3d1b-4f59-9d7e-1b2c3d4e5f60")
        finally:
            await t.close()

    prediction_id = asyncio.run(run())
    assert replicate.created == [prediction_id]
    assert replicate.tagged() == ["6f1c2a64-3d1b-4f59-9d7e-1b2c3d4e5f60"]
    assert workflow_tag(replicate.jobs[prediction_id].input) == "6f1c2a64-3d1b-4f59-9d7e-1b2c3d4e5f60"


def test_create_is_never_retried_blindly_and_listing_pages_back(replicate: FakeReplicate) -> None:
    replicate.knobs.page_size = 2

    async def run() -> None:
        api = ReplicateAPI(replicate.token, base_url=replicate.url)
        t = target(replicate)
        try:
            await t.open()
            graph = await t.prepare(JobSpec(image_workflow(prefix="p")))
            ids = [await t.submit(graph, f"00000000-0000-4000-8000-00000000000{i}") for i in range(5)]
            # the oldest one is on the third page of two
            assert (await t.find("00000000-0000-4000-8000-000000000000")).id == ids[0]  # type: ignore[union-attr]
            replicate.knobs.fail_next, replicate.knobs.fail_status = 1, 502
            with pytest.raises(CreateOutcomeUnknown) as caught:
                await api.create_prediction({"workflow_json": "{}"}, version=t.version)
            assert is_transient(caught.value)
            assert len(replicate.created) == 5  # the 502'd create was sent once, not retried
            replicate.knobs.fail_next = 2  # reads are retried through 5xx
            assert (await api.prediction(ids[1])).id == ids[1]
        finally:
            await t.close()
            await api.close()

    asyncio.run(run())


def test_retry_after_is_honoured(replicate: FakeReplicate) -> None:
    replicate.knobs.rate_limit_next, replicate.knobs.retry_after = 3, 0.2

    async def run() -> float:
        api = ReplicateAPI(replicate.token, base_url=replicate.url)
        try:
            started = time.monotonic()
            await api.model(MODEL)
            return time.monotonic() - started
        finally:
            assert api.rate_limited == 3
            await api.close()

    assert asyncio.run(run()) >= 0.55


def test_failed_prediction_reports_error_and_logs_exit_1(replicate: FakeReplicate, tmp_path: Path) -> None:
    replicate.knobs.fail_when = "boom"
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(image_workflow(prefix="boom")), encoding="utf-8")
    code, out, err = cli("run", str(wf), "--profile", "rep", "--out", str(tmp_path / "out"))
    assert code == 1
    assert "CUDA out of memory" in err and "last log lines" in err


def test_missing_node_is_refused_before_sending_with_an_object_info_snapshot(
    replicate: FakeReplicate, fake_comfy: FakeComfyServer, tmp_path: Path
) -> None:
    with urllib.request.urlopen(f"{fake_comfy.url}/object_info") as resp:
        info = json.loads(resp.read())
    snapshot = tmp_path / "object_info.json"
    snapshot.write_text(json.dumps(info), encoding="utf-8")
    graph = image_workflow(prefix="x")
    graph["9"] = {"class_type": "IPAdapterAdvanced", "inputs": {"image": ["1", 0]}}
    graph["3"]["inputs"]["images"] = ["9", 0]
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(graph), encoding="utf-8")
    config = Path(str(tmp_path / "config.yaml"))
    config.write_text(
        f"profiles:\n  rep:\n    replicate:\n      model: {MODEL}\n      object_info: {snapshot}\n",
        encoding="utf-8",
    )
    code, _, err = cli(
        "run", str(wf), "--profile", "rep", "--config", str(config), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "IPAdapterAdvanced" in err and "not installed" in err
    assert replicate.created == []  # nothing was sent
    # the snapshot knows the archive's files: a LoadImage of an --input passes preflight
    wf.write_text(json.dumps(load_and_save()), encoding="utf-8")
    code, _, err = cli(
        "run",
        str(wf),
        "--profile",
        "rep",
        "--config",
        str(config),
        "--input",
        f"Face={png(tmp_path / 'f.png')}",
        "--out",
        str(tmp_path / "o2"),
    )
    assert code == 0, err


def test_timeout_cancels_and_cancel_command(replicate: FakeReplicate, tmp_path: Path) -> None:
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(wait_workflow(seconds=5.0, steps=5, tag="slow")), encoding="utf-8")
    code, _, err = cli("run", str(wf), "--profile", "rep", "--timeout", "0.8", "--out", str(tmp_path / "o"))
    assert code == 124
    (job_id,) = replicate.created
    assert replicate.jobs[job_id].status == "canceled"
    replicate.knobs.start_delay = 5.0

    async def create() -> str:
        t = target(replicate)
        try:
            await t.open()
            return await t.submit(await t.prepare(JobSpec(image_workflow(prefix="c"))), None)
        finally:
            await t.close()

    waiting = asyncio.run(create())
    code, out, _ = cli("cancel", "--server", f"replicate:{MODEL}", waiting)
    assert code == 0 and "canceled before it started" in out
    assert cli("cancel", "--server", f"replicate:{MODEL}", waiting)[0] == 1  # already over


def test_token_is_never_shown(
    replicate: FakeReplicate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replicate.knobs.fail_next, replicate.knobs.fail_status, replicate.knobs.echo_token = 10, 500, True
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(image_workflow()), encoding="utf-8")
    code, out, err = cli("run", str(wf), "--profile", "rep", "--json", "--out", str(tmp_path / "o"))
    assert code == 3 and "HTTP 500" in out + err
    assert replicate.token not in out + err
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_wrong_token_value_1234")
    code, out, err = cli("run", str(wf), "--profile", "rep", "--out", str(tmp_path / "o"))
    assert code == 3 and "REPLICATE_API_TOKEN" in err and "r8_wrong_token_value_1234" not in out + err

    async def open_with_a_wrong_token() -> None:
        t = target(replicate)
        try:
            await t.open()
        finally:
            await t.close()

    with pytest.raises(AuthenticationError):
        asyncio.run(open_with_a_wrong_token())
    monkeypatch.delenv("REPLICATE_API_TOKEN")
    code, _, err = cli("run", str(wf), "--profile", "rep", "--out", str(tmp_path / "o"))
    assert code == 2 and "no Replicate API token" in err


def test_execution_error_and_timeout_types_from_the_target(replicate: FakeReplicate) -> None:
    replicate.knobs.fail_when = "broken"

    async def run() -> None:
        t = target(replicate)
        try:
            await t.open()
            pid = await t.submit(await t.prepare(JobSpec(image_workflow(prefix="broken"))), None)
            with pytest.raises(ExecutionError, match="CUDA out of memory"):
                await t.wait(pid, 10)
            slow = await t.submit(await t.prepare(JobSpec(wait_workflow(seconds=3.0, tag="t"))), None)
            with pytest.raises(JobTimeout):
                await t.wait(slow, 0.3)
            assert await t.cancel(slow) == "interrupted"
        finally:
            await t.close()

    asyncio.run(run())


def test_prefer_wait_returns_a_finished_prediction_from_create(replicate: FakeReplicate) -> None:
    async def run() -> None:
        t = target(replicate, wait=10)
        try:
            await t.open()
            pid = await t.submit(await t.prepare(JobSpec(image_workflow(prefix="quick"))), None)
            assert t._status[pid].status == "succeeded"  # no polling was needed
            gets = [path for method, path, _ in replicate.requests if method == "GET" and pid in path]
            assert gets == []
            assert t.job_cost(pid) == pytest.approx(replicate.bill(), rel=1e-3)
        finally:
            await t.close()

    asyncio.run(run())


def test_wait_follows_a_prediction_made_elsewhere(replicate: FakeReplicate, tmp_path: Path) -> None:
    replicate.knobs.start_delay = 0.2

    async def create() -> str:
        t = target(replicate)
        try:
            await t.open()
            return await t.submit(await t.prepare(JobSpec(image_workflow(prefix="later"))), None)
        finally:
            await t.close()

    prediction_id = asyncio.run(create())
    out_dir = tmp_path / "out"
    code, out, err = cli(
        "wait", "--server", f"replicate:{MODEL}", prediction_id, "--out", str(out_dir), "--json"
    )
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["prediction_id"] == prediction_id and result["files"] == [str(out_dir / "later_00001_.png")]
    assert json.loads((out_dir / "manifest.json").read_text())["replicate"]["prediction_id"] == prediction_id
    assert cli("validate", str(tmp_path), "--server", f"replicate:{MODEL}")[0] == 2  # no ComfyUI API there


def test_predictions_command_lists_recent_ones_with_their_job_ids(replicate: FakeReplicate) -> None:
    async def create() -> str:
        t = target(replicate)
        try:
            await t.open()
            return await t.submit(
                await t.prepare(JobSpec(image_workflow(prefix="listed"))),
                "11111111-2222-4333-8444-555555555555",
            )
        finally:
            await t.close()

    prediction_id = asyncio.run(create())
    code, out, err = cli("replicate", "predictions", "--json")
    assert code == 0, err
    (row,) = json.loads(out.splitlines()[-1])["predictions"]
    assert row["id"] == prediction_id and row["charforge_job"] == "11111111-2222-4333-8444-555555555555"
    code, out, _ = cli("replicate", "predictions", "--model", "someone/else")
    assert code == 0 and out.strip() == "no predictions"
    assert replicate.token not in out
