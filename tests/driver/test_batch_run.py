"""``charforge batch run``/``status`` and the :class:`Batch` API against the loopback fake ComfyUI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fakes.batch_checks import (
    assert_outputs_once,
    batch_run,
    executions_by_color,
    records,
    run_cli,
    sweep_file,
)
from fakes.comfy_server import FakeComfyServer, image_workflow, wait_workflow
from PIL import Image

from charforge.driver.batch import Batch, BatchRunner, RunOptions, load_batch, parse_sweep
from charforge.driver.batch.journal import JOURNAL_NAME, Journal, replay
from charforge.driver.batch.targets import ComfyTarget, JobSpec, Target, is_transient, retry_after
from charforge.driver.client import ComfyClient
from charforge.driver.workflow.overrides import apply_overrides, parse_set

FAST = {"backoff": 0.01, "summary_interval": 0.2}


# ---- the target seam ----------------------------------------------------------------------------------------


def test_comfy_target_is_a_target_and_errors_are_classified(fake_comfy):
    from charforge.driver.errors import (
        AuthenticationError,
        ExecutionError,
        ServerError,
        ServerUnavailable,
        ValidationError,
    )

    assert isinstance(ComfyTarget(fake_comfy.url), Target)
    assert is_transient(ServerUnavailable("x")) and is_transient(ServerError("x", status=503))
    assert is_transient(ServerError("x", status=429))
    assert not is_transient(ServerError("x", status=404)) and not is_transient(AuthenticationError("x"))
    assert not is_transient(ValidationError("bad"))
    assert not is_transient(
        ExecutionError(prompt_id="p", node_id="1", node_type="X", exception_type="E", exception_message="m")
    )
    fake_comfy.knobs.fail_next, fake_comfy.knobs.fail_status, fake_comfy.knobs.retry_after = 1, 429, 7
    with ComfyClient(fake_comfy.url) as client, pytest.raises(ServerError) as info:
        client.queue()
    assert info.value.status == 429 and retry_after(info.value) == 7.0


def test_target_prepare_preflights_against_the_server(fake_comfy):
    import asyncio

    async def go():
        target = ComfyTarget(fake_comfy.url)
        try:
            graph = await target.prepare(JobSpec(image_workflow(), ["Blank.color=7"]))
            assert graph["1"]["inputs"]["color"] == 7
            fake_comfy.nodes.pop("ImageScale")
            target.client._object_info = None
            from charforge.driver.errors import ValidationError

            with pytest.raises(ValidationError):
                await target.prepare(JobSpec(image_workflow()))
        finally:
            await target.close()

    asyncio.run(go())


# ---- running --------------------------------------------------------------------------------------------------


def test_sweep_runs_on_two_servers_with_folders_manifests_summary_and_sheet(tmp_path):
    spec = sweep_file(tmp_path, [1, 2, 3], [16, 24])
    out = tmp_path / "out"
    with FakeComfyServer() as a, FakeComfyServer() as b:
        code, stdout, stderr = batch_run(spec, out, [a.url, b.url])
        assert code == 0, stderr
        assert a.executions and b.executions  # the pool shared the work
        assert executions_by_color(a, b) == {1: 2, 2: 2, 3: 2}
    plan = load_batch(spec)
    assert_outputs_once(out, plan)
    assert (out / "color-2" / "width-24" / "manifest.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == 6 and summary["complete"] and not summary["failures"]
    assert {r["server"] for r in summary["servers"]} == {a.url + "/", b.url + "/"} or len(
        summary["servers"]
    ) == 2
    assert "done 6" in stdout
    # the pre-assigned prompt id is journaled before the submission, and the same id is the one that ran
    recs = records(out)
    for job in plan.jobs:
        evs = [r for r in recs if r.get("job") == job.id]
        assert [r["ev"] for r in evs] == ["submitting", "submitted", "finished", "done"]
        assert len({r["prompt_id"] for r in evs}) == 1
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 3 * 200 and sheet.height > 2 * 200
    # rerun: nothing runs again
    with FakeComfyServer() as c:
        code, _, _ = batch_run(spec, out, c.url)
        assert code == 0 and not c.executions
    code, stdout, _ = run_cli("batch", "status", str(out))
    assert code == 0 and "6 jobs, complete" in stdout and "done 6" in stdout


def test_window_limits_jobs_per_server(tmp_path, fake_comfy):
    fake_comfy.knobs.node_seconds = 0.02
    spec = sweep_file(tmp_path, list(range(8)))
    code, _, err = batch_run(spec, tmp_path / "o", fake_comfy.url, "--window", "3")
    assert code == 0, err
    seen = fake_comfy.in_flight_at_submit
    assert len(seen) == 8 and max(seen) == 2  # with the new one, 3 in flight: the queue is fed, not flooded


def test_python_api_iterates_results(tmp_path, fake_comfy):
    plan = parse_sweep(
        {"prompt": image_workflow(), "axes": {"color": {"set": "Blank.color", "values": [5, 6, 7]}}}, "inline"
    )
    batch = Batch(plan.jobs)
    assert len(batch) == 3
    results = list(batch.run(servers=[fake_comfy.url], out=tmp_path / "o", **FAST))
    assert sorted(r.job.axes["color"] for r in results) == [5, 6, 7]
    assert all(r.ok and r.files and r.files[0].exists() for r in results)
    again = list(Batch(plan.jobs).run(servers=[fake_comfy.url], out=tmp_path / "o"))
    assert all(r.skipped for r in again) and len(fake_comfy.executed) == 3


def test_python_api_stops_cleanly_when_the_loop_breaks(tmp_path, fake_comfy):
    fake_comfy.knobs.node_seconds = 0.02
    plan = parse_sweep(
        {"prompt": image_workflow(), "axes": {"color": {"set": "Blank.color", "values": list(range(10))}}},
        "inline",
    )
    for _ in Batch(plan).run(servers=[fake_comfy.url], out=tmp_path / "o", **FAST):
        break
    state = replay(tmp_path / "o" / JOURNAL_NAME)
    assert state.runs[-1]["reason"] == "interrupted"
    results = list(Batch(plan).run(servers=[fake_comfy.url], out=tmp_path / "o", **FAST))
    assert len(results) == 10 and all(r.ok for r in results)
    assert sorted(executions_by_color(fake_comfy).values()) == [1] * 10
    assert_outputs_once(tmp_path / "o", plan)


# ---- failures ---------------------------------------------------------------------------------------------------


def test_graph_invalid_on_one_server_goes_only_to_the_other(tmp_path):
    spec = sweep_file(tmp_path, [1, 2, 3, 4])
    with FakeComfyServer() as a, FakeComfyServer() as b:
        b.nodes.pop("ImageScale")
        code, _, err = batch_run(spec, tmp_path / "o", [a.url, b.url])
        assert code == 0, err
        assert len(a.executions) == 4 and not b.executions
        assert not [r for r in b.requests if r.method == "POST" and r.path.endswith("/prompt")]


def test_graph_invalid_everywhere_fails_without_submitting(tmp_path):
    spec = sweep_file(tmp_path, [1, 2])
    with FakeComfyServer() as a, FakeComfyServer() as b:
        a.nodes.pop("ImageScale")
        b.nodes.pop("ImageScale")
        code, stdout, err = batch_run(spec, tmp_path / "o", [a.url, b.url])
        assert code == 1
        assert not [
            r for s in (a, b) for r in s.requests if r.method == "POST" and r.path.endswith("/prompt")
        ]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["counts"]["failed"] == 2
    assert all(f["kind"] == "validation" and "ImageScale" in f["reason"] for f in summary["failures"])
    assert "failures:" in stdout
    # a deterministic failure is not retried by a rerun (unless asked)
    with FakeComfyServer() as c:
        code, _, _ = batch_run(spec, tmp_path / "o", c.url)
        assert code == 1 and not c.executions
        code, _, _ = batch_run(spec, tmp_path / "o", c.url, "--retry-failed")
        assert code == 0 and len(c.executions) == 2


def test_node_exception_is_not_retried(tmp_path, fake_comfy):
    fake_comfy.knobs.fail_node = "ImageScale"
    spec = sweep_file(tmp_path, [1, 2])
    code, _, _ = batch_run(spec, tmp_path / "o", fake_comfy.url, "--backoff", "0.01")
    assert code == 1
    assert sorted(executions_by_color(fake_comfy).values()) == [1, 1]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [f["kind"] for f in summary["failures"]] == ["execution", "execution"]
    assert "fake failure" in summary["failures"][0]["reason"] and summary["retries"] == 0


def test_transient_storm_of_500_and_429_is_retried(tmp_path, fake_comfy):
    fake_comfy.knobs.fail_rate = 0.3
    spec = sweep_file(tmp_path, list(range(8)))
    code, _, err = batch_run(spec, tmp_path / "o", fake_comfy.url, "--backoff", "0.01", "--retries", "20")
    assert code == 0, err
    assert fake_comfy.injected_faults >= 3
    assert sorted(executions_by_color(fake_comfy).values()) == [1] * 8
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["counts"]["done"] == 8 and summary["retries"] > 0
    assert_outputs_once(tmp_path / "o", load_batch(spec))
    # the same with 429 "slow down" answers carrying Retry-After
    fake_comfy.knobs.fail_status, fake_comfy.knobs.retry_after = 429, 0.02
    before = fake_comfy.injected_faults
    spec = sweep_file(tmp_path, list(range(100, 104)), name="s429.json")
    code, _, err = batch_run(spec, tmp_path / "o2", fake_comfy.url, "--backoff", "0.01", "--retries", "20")
    assert code == 0, err
    assert fake_comfy.injected_faults > before
    assert sorted(executions_by_color(fake_comfy).values()) == [1] * 12
    assert_outputs_once(tmp_path / "o2", load_batch(spec))


def test_retry_after_is_honoured(tmp_path, fake_comfy):
    fake_comfy.knobs.fail_next, fake_comfy.knobs.fail_status = 1, 429
    fake_comfy.knobs.retry_after, fake_comfy.knobs.fault_paths = 0.4, ("/prompt",)
    spec = sweep_file(tmp_path, [1])
    start = time.monotonic()
    code, _, _ = batch_run(spec, tmp_path / "o", fake_comfy.url, "--backoff", "0.001")
    assert code == 0 and time.monotonic() - start >= 0.4
    retries = [r for r in records(tmp_path / "o") if r["ev"] == "retry"]
    assert len(retries) == 1 and retries[0]["delay"] >= 0.4 and "429" in retries[0]["reason"]


def test_transient_failures_give_up_then_a_rerun_retries(tmp_path, fake_comfy):
    fake_comfy.knobs.fail_rate, fake_comfy.knobs.fault_paths = 1.0, ("/prompt",)
    spec = sweep_file(tmp_path, [1])
    code, _, _ = batch_run(spec, tmp_path / "o", fake_comfy.url, "--backoff", "0.001", "--retries", "2")
    assert code == 1
    state = replay(tmp_path / "o" / JOURNAL_NAME)
    (job,) = state.jobs.values()
    assert job.state == "failed" and job.kind == "transient" and job.retries == 2
    fake_comfy.knobs.fail_rate = 0.0
    code, _, _ = batch_run(spec, tmp_path / "o", fake_comfy.url)
    assert code == 0 and len(fake_comfy.executions) == 1


def test_lost_answer_is_not_submitted_twice(tmp_path, fake_comfy):
    fake_comfy.knobs.abort_prompt_responses = 2
    spec = sweep_file(tmp_path, [1, 2, 3])
    code, _, err = batch_run(spec, tmp_path / "o", fake_comfy.url, "--backoff", "0.01")
    assert code == 0, err
    assert sorted(executions_by_color(fake_comfy).values()) == [1, 1, 1]


def test_timeout_cancels_the_job(tmp_path, fake_comfy):
    spec = tmp_path / "b.jsonl"
    spec.write_text(json.dumps({"prompt": wait_workflow(seconds=5.0, steps=50), "name": "slow"}) + "\n")
    start = time.monotonic()
    code, _, _ = batch_run(spec, tmp_path / "o", fake_comfy.url, "--timeout", "0.5")
    assert code == 1 and time.monotonic() - start < 4
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["counts"]["timed_out"] == 1 and summary["failures"][0]["kind"] == "timeout"
    assert fake_comfy.interrupt_calls or not fake_comfy.queue


# ---- resume -----------------------------------------------------------------------------------------------------


def _journal_submitted(out: Path, spec: Path, job_index: int, prompt_id: str, server: str) -> None:
    """Write the journal a driver killed right after submitting would leave."""
    from charforge.driver.batch.plan import plan_hash

    plan = load_batch(spec)
    with Journal(out / JOURNAL_NAME) as journal:
        journal.append(
            "batch",
            plan_hash=plan_hash(plan, spec.parent),
            jobs=len(plan.jobs),
            source=str(spec),
            master_seed=None,
        )
        journal.append("run_start", pid=999999999, servers=[server])
        job = plan.jobs[job_index]
        journal.append("submitting", job=job.id, prompt_id=prompt_id, server=server)
        journal.append("submitted", job=job.id, prompt_id=prompt_id, server=server)


def test_resume_follows_a_job_the_server_still_has(tmp_path, fake_comfy):
    spec = sweep_file(tmp_path, [1, 2])
    out = tmp_path / "o"
    out.mkdir()
    plan = load_batch(spec)
    with ComfyClient(fake_comfy.url) as client:
        graph, _ = apply_overrides(image_workflow(), [parse_set("Blank.color=1")])
        client.submit(graph, prompt_id="11111111-aaaa-4bbb-8ccc-000000000001")
        url = client.url
    _journal_submitted(out, spec, 0, "11111111-aaaa-4bbb-8ccc-000000000001", url)
    with (out / JOURNAL_NAME).open("a") as handle:
        handle.write('{"t": 1, "ev": "submitting", "job": "torn')  # the killed driver's torn last line
    code, _, err = batch_run(spec, out, fake_comfy.url)
    assert code == 0, err
    assert sorted(executions_by_color(fake_comfy).values()) == [1, 1]
    assert fake_comfy.executions["11111111-aaaa-4bbb-8ccc-000000000001"] == 1
    manifest = json.loads((out / plan.jobs[0].folder / "manifest.json").read_text())
    assert manifest["prompt_id"] == "11111111-aaaa-4bbb-8ccc-000000000001"
    assert_outputs_once(out, plan)
    state = replay(out / JOURNAL_NAME)
    assert not state.torn and state.runs[0]["reason"] == "killed"


def test_resume_resubmits_with_a_new_id_when_the_server_forgot(tmp_path, fake_comfy):
    spec = sweep_file(tmp_path, [1, 2])
    out = tmp_path / "o"
    out.mkdir()
    with ComfyClient(fake_comfy.url) as client:
        url = client.url
    _journal_submitted(out, spec, 1, "22222222-aaaa-4bbb-8ccc-000000000002", url)
    code, _, err = batch_run(spec, out, fake_comfy.url)
    assert code == 0, err
    assert "22222222-aaaa-4bbb-8ccc-000000000002" not in fake_comfy.executions
    evs = [r["ev"] for r in records(out) if r.get("job") == load_batch(spec).jobs[1].id]
    assert evs == ["submitting", "submitted", "lost", "submitting", "submitted", "finished", "done"]
    assert json.loads((out / "summary.json").read_text())["resubmissions"] == 1


def test_resume_after_a_crash_between_rename_and_journal_does_not_download_again(tmp_path, fake_comfy):
    spec = sweep_file(tmp_path, [1, 2])
    out = tmp_path / "o"
    code, _, _ = batch_run(spec, out, fake_comfy.url)
    assert code == 0
    # cut the journal back to before the first "done": the folder is complete but the journal does not know
    lines = (out / JOURNAL_NAME).read_text().splitlines(keepends=True)
    first_done = next(i for i, line in enumerate(lines) if '"ev":"done"' in line)
    (out / JOURNAL_NAME).write_text("".join(lines[:first_done]))
    with FakeComfyServer() as fresh:  # a server that knows nothing: the outputs must not be fetched again
        code, _, err = batch_run(spec, out, fresh.url)
        assert code == 0, err
        assert len(fresh.executions) <= 1 and not [r for r in fresh.requests if r.path.endswith("/view")][1:]
    assert_outputs_once(out, load_batch(spec))


def test_changed_plan_is_refused_unless_forced(tmp_path, fake_comfy):
    spec = sweep_file(tmp_path, [1, 2])
    out = tmp_path / "o"
    assert batch_run(spec, out, fake_comfy.url)[0] == 0
    sweep_file(tmp_path, [1, 2, 3])
    code, _, err = batch_run(spec, out, fake_comfy.url)
    assert code == 2 and "planned from a different batch file" in err and "--force-replan" in err
    code, _, err = batch_run(spec, out, fake_comfy.url, "--force-replan")
    assert code == 0, err
    assert sorted(executions_by_color(fake_comfy).values()) == [1, 1, 1]


def test_random_seed_plan_is_kept_on_resume(tmp_path, fake_comfy):
    (tmp_path / "wf.json").write_text(json.dumps(image_workflow()))
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "workflow: wf.json\naxes:\n  width: {set: Resize.width, values: [16, 24]}\n"
        "seed: {set: Blank.color, policy: random}\n"
    )  # no master: one is drawn and recorded
    out = tmp_path / "o"
    first = batch_run(spec, out, fake_comfy.url)
    seeds = [j["seed"] for j in json.loads((out / "plan.json").read_text())["jobs"]]
    second = batch_run(spec, out, fake_comfy.url)
    assert "different batch file" not in second[2] and first[0] == second[0]
    assert [j["seed"] for j in json.loads((out / "plan.json").read_text())["jobs"]] == seeds


def test_second_runner_on_the_same_folder_is_refused(tmp_path, fake_comfy):
    spec = sweep_file(tmp_path, [1])
    plan = load_batch(spec)
    runner = BatchRunner(plan, [ComfyTarget(fake_comfy.url)], RunOptions(tmp_path / "o"))
    runner._lock()
    try:
        code, _, err = batch_run(spec, tmp_path / "o", fake_comfy.url)
        assert code == 2 and "another 'charforge batch run'" in err
    finally:
        runner._unlock()


def test_status_of_a_folder_without_journal_is_an_error(tmp_path):
    code, _, err = run_cli("batch", "status", str(tmp_path))
    assert code == 2 and "no batch journal" in err


def test_contact_sheet_axes_are_checked(tmp_path, fake_comfy):
    spec = sweep_file(tmp_path, [1, 2], [16, 24])
    code, _, err = batch_run(spec, tmp_path / "o", fake_comfy.url, "--contact-sheet", "color,nope")
    assert code == 2 and "no sweep axis 'nope'" in err
    code, _, _ = batch_run(spec, tmp_path / "o", fake_comfy.url, "--contact-sheet", "width,color")
    assert code == 0
    sheet = Image.open(tmp_path / "o" / "contact_sheet.png")
    assert sheet.width < sheet.height * 2  # 2 columns (width) x 2 rows (color)


class ServerIdTarget(ComfyTarget):
    """A target whose server assigns the job ids (like a serverless endpoint)."""

    supports_prompt_ids = False


def test_a_target_that_assigns_its_own_ids(tmp_path, fake_comfy):
    plan = parse_sweep(
        {"prompt": image_workflow(), "axes": {"color": {"set": "Blank.color", "values": [1, 2]}}}, "inline"
    )
    results = list(Batch(plan).run(servers=[ServerIdTarget(fake_comfy.url)], out=tmp_path / "o"))
    assert all(r.ok for r in results)
    recs = records(tmp_path / "o")
    submitting = [r for r in recs if r["ev"] == "submitting"]
    submitted = [r for r in recs if r["ev"] == "submitted"]
    assert all(r["prompt_id"] is None for r in submitting)
    assert sorted(r["prompt_id"] for r in submitted) == sorted(fake_comfy.executions)
    state = replay(tmp_path / "o" / JOURNAL_NAME)
    assert {j.prompt_id for j in state.jobs.values()} == set(fake_comfy.executions)


def test_an_output_the_server_will_not_serve_fails_only_that_job(tmp_path, fake_comfy):
    spec = sweep_file(tmp_path, [1, 2])
    fake_comfy.knobs.fail_next, fake_comfy.knobs.fail_status, fake_comfy.knobs.fault_paths = (
        1,
        404,
        ("/view",),
    )
    code, _, _ = batch_run(spec, tmp_path / "o", fake_comfy.url)
    assert code == 1
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["counts"] == {**summary["counts"], "done": 1, "failed": 1}
    assert summary["failures"][0]["kind"] == "error" and "404" in summary["failures"][0]["reason"]


def test_a_job_resumed_after_its_deadline_is_still_collected_when_finished(tmp_path, fake_comfy):
    from charforge.driver.batch.plan import plan_hash

    spec = sweep_file(tmp_path, [1])
    plan = load_batch(spec)
    out = tmp_path / "o"
    out.mkdir()
    with ComfyClient(fake_comfy.url) as client:
        graph, _ = apply_overrides(image_workflow(), [parse_set("Blank.color=1")])
        job = client.submit(graph)
        client.wait(job)
        url = client.url
    long_ago = time.time() - 3600
    lines = [
        {"t": long_ago, "ev": "batch", "plan_hash": plan_hash(plan, spec.parent), "jobs": 1},
        {"t": long_ago, "ev": "run_start", "pid": 999999999},
        {
            "t": long_ago,
            "ev": "submitting",
            "job": plan.jobs[0].id,
            "prompt_id": job.prompt_id,
            "server": url,
        },
        {"t": long_ago, "ev": "submitted", "job": plan.jobs[0].id, "prompt_id": job.prompt_id, "server": url},
    ]
    (out / JOURNAL_NAME).write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = batch_run(spec, out, fake_comfy.url, "--timeout", "5")
    assert code == 0, err
    assert fake_comfy.executions == {job.prompt_id: 1}
    assert_outputs_once(out, plan)


def test_json_records_and_a_sheet_with_a_failed_cell(tmp_path, fake_comfy):
    spec = sweep_file(tmp_path, [1, 2], [16, 24])
    original = fake_comfy.validate_prompt

    def reject_color_two(prompt, partial):  # one job of the grid fails validation on the server
        if prompt["1"]["inputs"]["color"] == 2 and prompt["2"]["inputs"]["width"] == 24:
            error = {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": "",
                "extra_info": {},
            }
            return False, error, [], {}
        return original(prompt, partial)

    fake_comfy.validate_prompt = reject_color_two
    code, stdout, _ = batch_run(spec, tmp_path / "o", fake_comfy.url, "--json")
    assert code == 1
    lines = [json.loads(line) for line in stdout.splitlines()]
    jobs = [r for r in lines if r["event"] == "job"]
    assert len(jobs) == 4 and sorted(r["state"] for r in jobs) == ["done", "done", "done", "failed"]
    assert lines[-1]["event"] == "summary" and lines[-1]["counts"]["failed"] == 1
    failed = next(r for r in jobs if r["state"] == "failed")
    assert failed["folder"] == "color-2/width-24" and "failed validation" in failed["reason"]
    sheet = Image.open(tmp_path / "o" / "contact_sheet.png").convert("RGB")
    # the failed job's cell (column color=2, row width=24) is the grey placeholder
    assert sheet.getpixel((140 + (256 + 6) + 6 + 100, 40 + (256 + 6) + 6 + 100)) == (200, 200, 200)
