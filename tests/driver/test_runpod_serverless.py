"""RunPod serverless (worker-comfyui) against the loopback fake: states, schemas, limits, 429, cancel, cost."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.comfy_server import FakeComfyServer, image_workflow, png_bytes, wait_workflow
from fakes.runpod_api import FakeRunPod, RunPodKnobs

from charforge.driver.batch.targets import JobSpec, is_transient
from charforge.driver.config import resolve_runpod
from charforge.driver.errors import ExecutionError, Interrupted, ServerError
from charforge.driver.runpod import RequestTooLarge, ServerlessTarget, SubmitOutcomeUnknown, decode_output
from charforge.driver.runpod.serverless import output_warnings


@pytest.fixture
def runpod(fake_comfy: FakeComfyServer) -> Iterator[FakeRunPod]:
    with FakeRunPod(knobs=RunPodKnobs()) as fake:
        fake.add_endpoint("ep1", fake_comfy, gpu="NVIDIA RTX A5000")
        yield fake


def make_target(runpod: FakeRunPod, **options) -> ServerlessTarget:
    settings = resolve_runpod("runpod-serverless:ep1", env=runpod.env(), config_path=Path("/nonexistent"))
    assert settings is not None
    target = ServerlessTarget(settings, poll_interval=0.05, **options)
    target.client.http.backoff_base = 0.01  # keeps 429 backoff fast; the schedule itself is tested below
    return target


def gif_only_workflow() -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 9}},
        "2": {"class_type": "CF_SaveGif", "inputs": {"images": ["1", 0], "filename_prefix": "clip"}},
    }


def load_image_workflow() -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Face"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "out"}},
    }


async def run_one(target: ServerlessTarget, spec: JobSpec, out: Path):
    await target.open()
    try:
        graph = await target.prepare(spec)
        job_id = await target.submit(graph, None)
        result = await target.wait(job_id, 30)
        files = await target.download(result, out)
        return job_id, result, files
    finally:
        await target.close()


@pytest.mark.parametrize(
    ("schema", "kind"), [("new", "base64"), ("new", "s3_url"), ("old", "base64"), ("old", "s3_url")]
)
def test_both_output_schemas_and_transports(
    runpod: FakeRunPod, tmp_path: Path, schema: str, kind: str
) -> None:
    runpod.knobs.output_schema, runpod.knobs.output_type = schema, kind
    runpod.knobs.cold_start = 0.1
    target = make_target(runpod)
    job_id, result, files = asyncio.run(
        run_one(target, JobSpec(image_workflow(width=20, height=10)), tmp_path)
    )
    assert len(files) == 1
    data = files[0].path.read_bytes()
    assert data.startswith(b"\x89PNG") and b"IHDR" in data
    assert int.from_bytes(data[16:20], "big") == 20  # the image the fake ComfyUI rendered, not a stand-in
    times = target.job_times(job_id)
    assert times["queue_seconds"] >= 0.1
    assert result.timings.execution_seconds is not None


def test_input_images_travel_base64_and_cost_matches(
    runpod: FakeRunPod, fake_comfy: FakeComfyServer, tmp_path: Path
) -> None:
    face = tmp_path / "face.png"
    face.write_bytes(png_bytes(6, 5, (1, 2, 3)))
    target = make_target(runpod)
    spec = JobSpec(load_image_workflow(), [], {"Face": str(face)})
    job_id, _, files = asyncio.run(run_one(target, spec, tmp_path / "out"))
    body = runpod.run_bodies[-1]
    (image,) = body["input"]["images"]
    assert base64.b64decode(image["image"]) == face.read_bytes()
    assert body["input"]["workflow"]["1"]["inputs"]["image"] == image["name"]
    assert (fake_comfy.input_dir / image["name"]).read_bytes() == face.read_bytes()
    assert len(files) == 1
    # cost = executionTime x the endpoint GPU's price per second (catalog $/h / 3600)
    assert target.price_per_second == pytest.approx(runpod.gpu_price("NVIDIA RTX A5000") / 3600)
    assert target.job_cost(job_id) == pytest.approx(runpod.job_cost(job_id))


def test_oversize_input_is_refused_before_sending(runpod: FakeRunPod, tmp_path: Path) -> None:
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG" + bytes(range(256)) * (8 * 4096))  # 8.4 MB -> 11.2 MB as base64
    target = make_target(runpod)

    async def go() -> None:
        await target.open()
        try:
            await target.prepare(JobSpec(load_image_workflow(), [], {"Face": str(big)}))
        finally:
            await target.close()

    with pytest.raises(RequestTooLarge) as info:
        asyncio.run(go())
    text = str(info.value)
    assert "10 MB" in text and "huge.png" in text
    assert "network volume" in text and "runpod-pod:" in text
    assert runpod.run_bodies == [] and runpod.oversize == []  # nothing was sent


def test_endpoint_limit_answer_when_the_check_is_bypassed(runpod: FakeRunPod) -> None:
    runpod.knobs.run_limit = 1000
    target = make_target(runpod)
    body = {"input": {"workflow": image_workflow(), "pad": "x" * 2000}}

    async def go() -> None:
        try:
            await target.client.run(body)
        finally:
            await target.close()

    with pytest.raises(ServerError) as info:
        asyncio.run(go())
    assert info.value.status == 413 and runpod.oversize


def test_video_only_workflow_is_warned(runpod: FakeRunPod, tmp_path: Path) -> None:
    assert output_warnings(image_workflow()) == []
    target = make_target(runpod)
    _, _, files = asyncio.run(run_one(target, JobSpec(gif_only_workflow()), tmp_path))
    assert any("returns only images" in w and "CF_SaveGif" in w for w in target.warnings)
    assert files == []  # the worker dropped the gif, exactly as warned


def test_429_storm_is_ridden_out_with_backoff(runpod: FakeRunPod, tmp_path: Path) -> None:
    runpod.knobs.rate_limit_next = 7
    target = make_target(runpod)
    _, _, files = asyncio.run(run_one(target, JobSpec(image_workflow()), tmp_path))
    assert len(files) == 1
    assert target.client.http.rate_limited == 7
    assert sum(1 for m, p, s in runpod.requests if s == 429) == 7
    assert len(runpod.run_bodies) == 1


def test_backoff_has_jitter_and_honours_retry_after() -> None:
    from charforge.driver.runpod.http import backoff_delay

    assert backoff_delay(3, base=1.0, rng=lambda: 0.5) == 4.0
    assert backoff_delay(10, base=1.0, cap=20.0, rng=lambda: 1.0) == 20.0
    assert backoff_delay(0, base=1.0, retry_after=7.0, rng=lambda: 0.1) == 7.0
    delays = {backoff_delay(4, base=1.0) for _ in range(20)}
    assert len(delays) > 1  # jittered


def test_cancel_queued_and_running_jobs(runpod: FakeRunPod, fake_comfy: FakeComfyServer) -> None:
    target = make_target(runpod)

    async def go() -> tuple[str, str]:
        runpod.knobs.cold_start = 5.0
        queued = await target.submit(await target.prepare(JobSpec(image_workflow())), None)
        assert await target.lookup(queued) == "pending"
        first = await target.cancel(queued)
        with pytest.raises(Interrupted):
            await target.wait(queued, 5)
        runpod.knobs.cold_start = 0.0
        running = await target.submit(
            await target.prepare(JobSpec(wait_workflow(seconds=5.0, steps=50))), None
        )
        for _ in range(100):
            if await target.lookup(running) == "running" and runpod.jobs[running].prompt_id:
                break
            await asyncio.sleep(0.05)
        second = await target.cancel(running)
        assert await target.cancel(running) == "not_active"
        await target.close()
        return first, second

    assert asyncio.run(go()) == ("removed", "interrupted")
    assert [j.status for j in runpod.jobs.values()] == ["CANCELLED", "CANCELLED"]
    for _ in range(100):  # the worker interrupts ComfyUI right after RunPod marked the job cancelled
        if fake_comfy.interrupt_calls:
            break
        time.sleep(0.02)
    assert any(call.get("prompt_id") for call in fake_comfy.interrupt_calls)


def test_lost_run_answer_is_never_resubmitted(runpod: FakeRunPod) -> None:
    runpod.knobs.lose_run_answers = 1
    target = make_target(runpod)

    async def go() -> None:
        try:
            await target.submit(await target.prepare(JobSpec(image_workflow())), None)
        finally:
            await target.close()

    with pytest.raises(SubmitOutcomeUnknown) as info:
        asyncio.run(go())
    assert "may or may not" in str(info.value)
    assert not is_transient(info.value)  # a batch runner must not retry it blindly
    assert len(runpod.run_bodies) == 1 and len(runpod.jobs) == 1


def test_failed_job_surfaces_the_worker_error(
    runpod: FakeRunPod, fake_comfy: FakeComfyServer, tmp_path: Path
) -> None:
    fake_comfy.knobs.fail_node = "ImageScale"
    fake_comfy.knobs.fail_message = "CUDA out of memory"
    target = make_target(runpod)
    with pytest.raises(ExecutionError) as info:
        asyncio.run(run_one(target, JobSpec(image_workflow()), tmp_path))
    assert "Job processing failed" in str(info.value) and "CUDA out of memory" in str(info.value)


def test_unknown_job_and_key_never_leaks(runpod: FakeRunPod) -> None:
    target = make_target(runpod)

    async def go() -> str:
        try:
            return await target.lookup("no-such-job")
        finally:
            await target.close()

    assert asyncio.run(go()) == "unknown"
    bad = resolve_runpod(
        "runpod-serverless:ep1",
        env={**runpod.env(), "RUNPOD_API_KEY": "wrong-key-999"},
        config_path=Path("/nonexistent"),
    )
    assert "wrong-key-999" not in repr(bad)
    target = ServerlessTarget(bad, poll_interval=0.05)

    async def health() -> None:
        try:
            await target.open()
        finally:
            await target.close()

    with pytest.raises(Exception) as info:
        asyncio.run(health())
    assert "401" in str(info.value) and "wrong-key-999" not in str(info.value)


def test_decode_output_shapes() -> None:
    png = png_bytes(2, 2, (9, 9, 9))
    b64 = base64.b64encode(png).decode()
    assert decode_output({"images": [{"filename": "a.png", "type": "base64", "data": b64}]})[0].data == png
    assert decode_output({"images": [{"filename": "a.png", "type": "s3_url", "data": "https://s3/x/a.png"}]})[
        0
    ].url
    assert decode_output({"status": "success", "message": "data:image/png;base64," + b64})[0].data == png
    old = decode_output(
        {"status": "success", "message": "https://bucket.s3.amazonaws.com/job/ComfyUI_001.png"}
    )
    assert old[0].filename == "ComfyUI_001.png" and old[0].url
    assert decode_output({"status": "success_no_images", "images": []}) == []
    assert json.dumps(output_warnings(gif_only_workflow()))


def test_timed_out_job_is_a_timeout_not_a_lost_job(runpod: FakeRunPod, tmp_path: Path) -> None:
    from charforge.driver.errors import JobTimeout

    runpod.knobs.execution_timeout = 0.3
    target = make_target(runpod)
    with pytest.raises(JobTimeout, match="timed out on RunPod"):
        asyncio.run(run_one(target, JobSpec(wait_workflow(seconds=3.0, steps=3)), tmp_path))
    assert [j.status for j in runpod.jobs.values()] == ["TIMED_OUT"]
