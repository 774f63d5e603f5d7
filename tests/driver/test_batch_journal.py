"""The batch journal: durable appends, torn last lines, replay into job states, the summary."""

from __future__ import annotations

import json

from charforge.driver.batch.journal import Journal, read_records, replay
from charforge.driver.batch.summary import build_summary, render_table


def test_append_replay_and_state_machine(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append("batch", plan_hash="h1", jobs=3, source="s.yaml")
        journal.append("run_start", pid=1, servers=["http://a/"])
        journal.append("submitting", job="j1", prompt_id="p1", server="http://a/")
        journal.append("submitted", job="j1", prompt_id="p1", server="http://a/")
        journal.append("lost", job="j1", prompt_id="p1", server="http://a/")
        journal.append("submitting", job="j1", prompt_id="p2", server="http://a/")
        journal.append("submitted", job="j1", prompt_id="p2", server="http://a/")
        journal.append("finished", job="j1", prompt_id="p2", server="http://a/", execution_seconds=1.5)
        journal.append("done", job="j1", prompt_id="p2", server="http://a/", files=["x.png"])
        journal.append("invalid", job="j2", server="http://a/", reason="no node X")
        journal.append("failed", job="j2", kind="validation", reason="invalid on every server")
        journal.append("submitting", job="j3", prompt_id="p3", server="http://a/")
        live = journal.state
    state = replay(path)
    assert state.plan_hash == "h1" and state.records == live.records == 12
    j1, j2, j3 = state.jobs["j1"], state.jobs["j2"], state.jobs["j3"]
    assert (j1.state, j1.prompt_id, j1.prompt_ids, j1.submissions, j1.files) == (
        "done",
        "p2",
        ["p1", "p2"],
        2,
        ["x.png"],
    )
    assert j2.state == "failed" and j2.kind == "validation" and j2.invalid_on == {"http://a/": "no node X"}
    assert j3.state == "submitting" and j3.prompt_id == "p3"
    assert state.counts()["done"] == 1 and state.runs[0]["end"] is None


def test_torn_last_line_is_skipped_and_cut_before_appending(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append("submitting", job="j1", prompt_id="p1", server="s")
    long_reason = "x" * 200_000  # a torn line longer than one read-back chunk
    with open(path, "a") as handle:
        handle.write(json.dumps({"ev": "failed", "job": "j1", "reason": long_reason})[:150_000])
    assert [r["ev"] for r in read_records(path)] == ["submitting"]
    assert replay(path).torn
    with Journal(path) as journal:
        journal.append("submitted", job="j1", prompt_id="p1", server="s")
    assert [r["ev"] for r in read_records(path)] == ["submitting", "submitted"]
    assert not replay(path).torn and replay(path).jobs["j1"].state == "submitted"


def test_a_torn_only_line_is_cut_to_an_empty_journal(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"ev": "batch", "plan_')
    with Journal(path) as journal:
        journal.append("batch", plan_hash="h")
    assert [r["ev"] for r in read_records(path)] == ["batch"]


def test_summary_counts_timings_servers_and_failures(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path, fsync=False) as journal:
        journal.append("batch", plan_hash="h", jobs=4, source="s.yaml")
        journal.append("run_start", pid=999999999, servers=["http://a/", "http://b/"])
        for job, server in (("j1", "http://a/"), ("j2", "http://b/"), ("j3", "http://b/")):
            journal.append("submitting", job=job, prompt_id=job + "p", server=server)
            journal.append("submitted", job=job, prompt_id=job + "p", server=server)
        journal.append("done", job="j1", prompt_id="j1p", server="http://a/", files=["a.png"])
        journal.append("done", job="j2", prompt_id="j2p", server="http://b/", files=["b.png"])
        journal.append(
            "timed_out",
            job="j3",
            prompt_id="j3p",
            server="http://b/",
            kind="timeout",
            reason="did not finish within 5 s; cancelled",
        )
    jobs = [{"id": f"j{i}", "folder": f"f{i}"} for i in range(1, 5)]
    summary = build_summary(replay(path), jobs)
    assert summary["counts"]["done"] == 2 and summary["counts"]["timed_out"] == 1
    assert summary["counts"]["pending"] == 1 and not summary["complete"]
    assert not summary["running"]  # its process (pid 999999999) is gone: killed, not running
    rows = {r["server"]: r for r in summary["servers"]}
    assert rows["http://a/"]["done"] == 1 and rows["http://b/"]["timed_out"] == 1
    assert summary["failures"] == [
        {
            "job": "j3",
            "folder": "f3",
            "state": "timed_out",
            "kind": "timeout",
            "server": "http://b/",
            "prompt_id": "j3p",
            "reason": "did not finish within 5 s; cancelled",
        }
    ]
    table = render_table(summary)
    assert "4 jobs, stopped" in table and "f3: timed_out (timeout)" in table and "http://b/" in table
