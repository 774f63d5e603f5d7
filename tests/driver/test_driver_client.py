"""The client against the fake ComfyUI: message order, races, reconnects, errors, cancel, timeouts, auth."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import aiohttp
import pytest
from fakes.comfy_server import FakeComfyServer, image_workflow, sampler_workflow, wait_workflow, webp_workflow

from charforge.driver.client import AsyncComfyClient, ComfyClient
from charforge.driver.config import BasicAuth, BearerAuth, HeaderAuth
from charforge.driver.errors import (
    AuthenticationError,
    ExecutionError,
    Interrupted,
    JobLost,
    JobTimeout,
    ServerUnavailable,
    ValidationError,
)


def _types(events, prompt_id):
    return [
        e.type if not e.is_finished_marker else "executing:null" for e in events if e.prompt_id == prompt_id
    ]


def test_run_follows_the_servers_message_order(client, fake_comfy):
    events = []
    result = client.run(sampler_workflow(seed=3, steps=3), timeout=10, on_event=events.append)
    order = _types(events, result.prompt_id)
    assert order[0] == "submitted"
    assert order[-1] == "finished"
    for earlier, later in [
        ("execution_start", "execution_cached"),
        ("execution_cached", "executing"),
        ("progress", "executed"),
        ("executed", "execution_success"),
        ("execution_success", "executing:null"),
        ("executing:null", "finished"),
    ]:
        assert order.index(earlier) < order.index(later), (earlier, later, order)
    progress = [e.data["value"] for e in events if e.type == "progress"]
    assert progress == [1, 2, 3]
    previews = [e for e in events if e.type == "preview"]
    assert previews and previews[0].prompt_id == result.prompt_id and previews[0].image.startswith(b"\x89PNG")
    assert previews[0].data["node_id"] == "3"  # type-4 frames carry metadata because we announced the flag
    assert [f.filename for f in result.files] == ["txt2img_00001_.png"]
    assert result.node_class("9") == "SaveImage" and result.node_title("9") == "Save Image"
    assert result.timings.started_at is not None and result.timings.execution_seconds is not None


def test_socket_opens_before_submit_with_the_same_client_id(client, fake_comfy):
    result = client.run(image_workflow(), timeout=10)
    paths = [(r.method, r.path) for r in fake_comfy.requests]
    assert paths.index(("GET", "/ws")) < paths.index(("POST", "/prompt"))
    post = next(r for r in fake_comfy.requests if r.path == "/prompt")
    assert post.body["client_id"] == client.client_id == fake_comfy.ws_connects[0].query["clientId"]
    assert post.body["prompt_id"] == result.prompt_id
    assert uuid.UUID(result.prompt_id).version == 4
    assert all("Origin" not in r.headers for r in fake_comfy.requests)


def test_history_race_after_execution_success(fake_comfy):
    """History is written after execution_success; without the executing{null} marker the client must poll."""
    fake_comfy.knobs.history_delay = 0.6
    fake_comfy.knobs.send_finished_marker = False
    with ComfyClient(fake_comfy.url, poll_interval=0.3) as client:
        events = []
        result = client.run(image_workflow(), timeout=10, on_event=events.append)
    written = fake_comfy.history_written_at[result.prompt_id]
    early = [r for r in fake_comfy.requests if r.path == f"/history/{result.prompt_id}" and r.time < written]
    assert early, "the client should have asked for the history before it existed"
    assert "execution_success" in _types(events, result.prompt_id)
    assert result.files and result.files[0].filename.endswith(".png")


def test_reconnects_after_a_dropped_socket_without_losing_completion(fake_comfy):
    fake_comfy.knobs.drop_socket_on = "executing"
    fake_comfy.knobs.node_seconds = 0.3
    with ComfyClient(fake_comfy.url, poll_interval=5.0) as client:
        events = []
        start = time.monotonic()
        result = client.run(image_workflow(), timeout=10, on_event=events.append)
        elapsed = time.monotonic() - start
    kinds = [e.type for e in events]
    assert "connection_lost" in kinds and "reconnected" in kinds
    assert kinds.index("connection_lost") < kinds.index("reconnected")
    ids = {c.query["clientId"] for c in fake_comfy.ws_connects}
    assert len(fake_comfy.ws_connects) >= 2 and ids == {client.client_id}
    assert result.files
    assert elapsed < 4.0  # found through the history right after reconnecting, not after a long poll


def test_drop_exactly_at_the_final_message(fake_comfy):
    fake_comfy.knobs.drop_socket_on = "execution_success"
    with ComfyClient(fake_comfy.url, poll_interval=5.0) as client:
        start = time.monotonic()
        result = client.run(webp_workflow(), timeout=10)
        assert time.monotonic() - start < 4.0
    assert result.files[0].animated


def test_stalled_socket_is_covered_by_history_polling(fake_comfy):
    fake_comfy.knobs.mute_websocket = True
    with ComfyClient(fake_comfy.url, poll_interval=0.3) as client:
        result = client.run(image_workflow(), timeout=10)
    assert result.files


def test_400_is_a_readable_per_node_error(client, fake_comfy):
    wf = image_workflow()
    wf["2"]["inputs"]["upscale_method"] = "bilinaer"
    wf["2"]["inputs"]["width"] = -5
    with pytest.raises(ValidationError) as info:
        client.submit(wf)
    err = info.value
    text = str(err)
    assert 'node 2 "Resize" (ImageScale)' in text
    assert "upscale_method: 'bilinaer' is not one of the allowed values; did you mean 'bilinear'?" in text
    assert "width: -5 is below the minimum 0" in text
    assert "{" not in text  # no JSON dump
    assert err.error["type"] == "prompt_outputs_failed_validation"
    assert {p.kind for p in err.problems} == {"value_not_in_list", "value_smaller_than_min"}
    assert err.exit_code == 2
    assert not fake_comfy.queue and not fake_comfy.history


def test_unknown_class_400_names_the_missing_pack(client):
    wf = image_workflow()
    wf["1"]["class_type"] = "ADE_AnimateDiffLoaderGen1"
    with pytest.raises(ValidationError) as info:
        client.submit(wf)
    text = str(info.value)
    assert "ADE_AnimateDiffLoaderGen1" in text and "custom-node pack" in text and "node 1" in text


def _two_outputs():
    wf = image_workflow()
    wf["4"] = {
        "class_type": "SaveAnimatedWEBP",
        "inputs": {
            "images": ["1", 0],
            "filename_prefix": "x",
            "fps": 6.0,
            "lossless": True,
            "quality": 500,
            "method": "default",
        },
        "_meta": {"title": "Broken save"},
    }
    return wf


def test_200_with_node_errors_is_refused_and_cancelled_by_default(client, fake_comfy):
    fake_comfy.knobs.start_delay = 0.5
    with pytest.raises(ValidationError) as info:
        client.submit(_two_outputs())
    err = info.value
    assert "only part of the workflow" in str(err) and "quality: 500 is above the maximum 100" in str(err)
    assert err.prompt_id
    deletes = [r.body for r in fake_comfy.requests if r.path == "/queue" and r.method == "POST"]
    assert deletes == [{"delete": [err.prompt_id]}]
    time.sleep(0.7)
    assert err.prompt_id not in fake_comfy.history


def test_200_with_node_errors_runs_the_valid_part_when_allowed(client):
    result = client.run(_two_outputs(), timeout=10, allow_partial=True)
    assert list(result.node_errors) == ["4"]
    assert [f.node_id for f in result.files] == ["3"]


def test_execution_error_carries_node_and_traceback(client, fake_comfy):
    fake_comfy.knobs.fail_node = "2"
    fake_comfy.knobs.fail_message = "CUDA out of memory"
    with pytest.raises(ExecutionError) as info:
        client.run(image_workflow(), timeout=10)
    err = info.value
    assert (err.node_id, err.node_type, err.title) == ("2", "ImageScale", "Resize")
    assert err.exception_type == "ValueError" and "CUDA out of memory" in err.exception_message
    assert err.traceback and err.executed == ["1"]
    assert str(err).startswith('node 2 "Resize" (ImageScale) failed: ValueError: CUDA out of memory')
    assert err.exit_code == 1


def _raw_submit(server: FakeComfyServer, workflow: dict) -> str:
    async def post() -> str:
        body = {"prompt": workflow, "client_id": "someone-else"}
        async with aiohttp.ClientSession() as s, s.post(server.url + "/prompt", json=body) as r:
            return (await r.json())["prompt_id"]

    return asyncio.run(post())


def test_cancel_pending_job_leaves_the_running_one_alone(client, fake_comfy):
    other = _raw_submit(fake_comfy, wait_workflow(seconds=0.5, tag="other"))
    job = client.submit(wait_workflow(seconds=5.0, tag="mine"))
    assert client.job_state(job.prompt_id)[0] == "pending"
    assert client.cancel(job.prompt_id) == "removed"
    assert fake_comfy.interrupt_calls == []
    with pytest.raises(JobLost):  # it vanished from the queue without a history entry
        client.wait(job, timeout=10)
    deadline = time.time() + 5
    while other not in fake_comfy.history and time.time() < deadline:
        time.sleep(0.05)
    assert fake_comfy.history[other]["status"]["status_str"] == "success"


def test_cancel_running_job_is_targeted(client, fake_comfy):
    queued_after = None
    job = client.submit(wait_workflow(seconds=5.0, steps=50))
    watch = client.watch(job, timeout=10)
    with pytest.raises(Interrupted):
        for event in watch:
            if event.type == "progress" and queued_after is None:
                queued_after = _raw_submit(fake_comfy, image_workflow(prefix="other/x"))
                assert client.cancel(job.prompt_id) == "interrupted"
    assert fake_comfy.interrupt_calls == [{"prompt_id": job.prompt_id}]
    deadline = time.time() + 5
    while queued_after not in fake_comfy.history and time.time() < deadline:
        time.sleep(0.05)
    assert fake_comfy.history[queued_after]["status"]["status_str"] == "success"


def test_wall_clock_timeout_despite_steady_progress(client, fake_comfy):
    start = time.monotonic()
    with pytest.raises(JobTimeout) as info:
        client.run(wait_workflow(seconds=30.0, steps=300), timeout=0.8)
    elapsed = time.monotonic() - start
    assert 0.7 < elapsed < 3.0
    assert info.value.exit_code == 124 and info.value.seconds == pytest.approx(0.8, abs=0.2)
    assert fake_comfy.interrupt_calls == [{"prompt_id": info.value.prompt_id}]  # run() cancels on timeout


def test_bearer_token_sent_everywhere_and_never_shown(fake_comfy):
    fake_comfy.knobs.require_headers = {"Authorization": "Bearer s3cr3t-t0ken"}
    with ComfyClient(fake_comfy.url, auth=BearerAuth("s3cr3t-t0ken")) as client:
        result = client.run(image_workflow(), timeout=10)
        assert "s3cr3t" not in repr(client)
    assert result.files
    assert fake_comfy.ws_connects[0].headers["Authorization"] == "Bearer s3cr3t-t0ken"
    assert all(r.headers.get("Authorization") == "Bearer s3cr3t-t0ken" for r in fake_comfy.requests)
    client = ComfyClient(fake_comfy.url, auth=BearerAuth("wrong-t0ken-value"))
    try:
        with pytest.raises(AuthenticationError) as info:
            client.system_stats()
    finally:
        client.close()
    assert "wrong-t0ken" not in str(info.value) and "401" in str(info.value)
    assert info.value.exit_code == 3


def test_basic_auth_from_url_and_custom_headers(fake_comfy):
    url = fake_comfy.url.replace("http://", "http://ann:pa55w0rd@")
    with ComfyClient(url) as client:
        assert "pa55w0rd" not in repr(client) and "pa55w0rd" not in client.url
        client.system_stats()
    assert (
        fake_comfy.requests[-1].headers["Authorization"]
        == BasicAuth("ann", "pa55w0rd").headers()["Authorization"]
    )
    with ComfyClient(fake_comfy.url, auth=HeaderAuth({"X-Api-Key": "k-123456"})) as client:
        client.system_stats()
        assert "k-123456" not in repr(client)
    assert fake_comfy.requests[-1].headers["X-Api-Key"] == "k-123456"


def test_server_unavailable():
    with (
        ComfyClient("http://127.0.0.1:9", retries=0, timeout=2) as client,
        pytest.raises(ServerUnavailable) as info,
    ):
        client.system_stats()
    assert "cannot reach ComfyUI at http://127.0.0.1:9/" in str(info.value)
    assert info.value.exit_code == 3


def test_prefixed_server_and_api_aliases(prefixed_comfy):
    with ComfyClient(prefixed_comfy.url) as client:
        result = client.run(image_workflow(), timeout=10)
        assert client.url == prefixed_comfy.url
    assert result.files
    assert {c.path for c in prefixed_comfy.ws_connects} == {"/comfy/ws"}
    assert all(r.path.startswith("/comfy/") for r in prefixed_comfy.requests)


def test_lost_answer_to_post_prompt_is_not_submitted_twice(client, fake_comfy):
    fake_comfy.knobs.abort_prompt_responses = 1
    result = client.run(image_workflow(), timeout=10)
    posts = [r for r in fake_comfy.requests if r.path == "/prompt" and r.method == "POST"]
    assert len(posts) == 1
    assert list(fake_comfy.history) == [result.prompt_id]


def test_upload_dedupes_identical_bytes_and_renames_different_ones(client, fake_comfy, tmp_path):
    a = tmp_path / "face.png"
    a.write_bytes(b"\x89PNG first")
    first = client.upload(a)
    again = client.upload(a)
    b = tmp_path / "other" / "face.png"
    b.parent.mkdir()
    b.write_bytes(b"\x89PNG second")
    renamed = client.upload(b)
    assert first.name == again.name == "face.png"
    assert renamed.name == "face (1).png" and renamed.reference == "face (1).png"
    assert (fake_comfy.input_dir / "face (1).png").read_bytes() == b"\x89PNG second"


def test_cached_resubmission_reports_cached_nodes(client):
    first = client.run(image_workflow(prefix="cache/x"), timeout=10)
    second = client.run(image_workflow(prefix="cache/x"), timeout=10)
    assert first.cached_nodes == []
    assert set(second.cached_nodes) == {"1", "2", "3"}
    assert [f.filename for f in second.files] == [f.filename for f in first.files]


def test_async_client_watch(fake_comfy):
    async def main() -> tuple[list[str], int]:
        async with AsyncComfyClient(fake_comfy.url, poll_interval=0.5) as client:
            job = await client.submit(webp_workflow(frames=3))
            watch = client.watch(job, timeout=10)
            kinds = [event.type async for event in watch]
            assert watch.result is not None
            return kinds, len(watch.result.files)

    kinds, files = asyncio.run(main())
    assert kinds[0] == "submitted" and kinds[-1] == "finished" and files == 1


def test_two_jobs_concurrently_on_one_async_client(fake_comfy):
    fake_comfy.knobs.node_seconds = 0.05

    async def main():
        async with AsyncComfyClient(fake_comfy.url, poll_interval=0.5) as client:
            a, b = await asyncio.gather(
                client.run(image_workflow(prefix="a/a"), timeout=10),
                client.run(image_workflow(prefix="b/b"), timeout=10),
            )
            return a, b

    a, b = asyncio.run(main())
    assert a.files[0].subfolder == "a" and b.files[0].subfolder == "b"


def test_blocking_client_is_usable_from_several_threads(fake_comfy):
    results = []
    with ComfyClient(fake_comfy.url, poll_interval=0.5) as client:
        threads = [
            threading.Thread(
                target=lambda i=i: results.append(client.run(image_workflow(prefix=f"t{i}/x"), timeout=10))
            )
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
    assert sorted(r.files[0].subfolder for r in results) == ["t0", "t1", "t2"]


def test_event_json_is_serialisable(client):
    events = []
    client.run(sampler_workflow(steps=2), timeout=10, on_event=events.append)
    for event in events:
        json.dumps(event.to_json())
