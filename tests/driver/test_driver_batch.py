"""Batch files: JSON Lines, sweeps, seed policies, stable ids, folder names, and ``charforge batch plan``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fakes.comfy_server import sampler_workflow

from cf_testing.cli import run_driver_cli as run_cli
from charforge.driver import cli
from charforge.driver.batch.plan import BatchError, expand_range, load_batch, parse_sweep, safe_name


@pytest.fixture
def wf(tmp_path: Path) -> Path:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(sampler_workflow()))
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# JSON Lines ---------------------------------------------------------------------------------------------------


def test_jsonl_good_lines(wf, tmp_path):
    lines = [
        json.dumps(
            {"workflow": "wf.json", "set": {"KSampler.seed": 5, "Positive.text": "a dog"}, "tags": ["a"]}
        ),
        "",
        "# a comment",
        json.dumps({"workflow": str(wf), "set": ["KSampler.seed=6"], "name": "second job!"}),
        json.dumps({"prompt": sampler_workflow(), "inputs": {"Load": "x.png"}}),
    ]
    plan = load_batch(write(tmp_path / "b.jsonl", "\n".join(lines)))
    assert plan.kind == "jsonl" and len(plan.jobs) == 3
    first, second, third = plan.jobs
    assert first.overrides == ["KSampler.seed=5", "Positive.text=a dog"] and first.tags == ["a"]
    assert first.line == 1 and second.line == 4 and third.line == 5
    assert second.name == "second job!" and second.folder == "second-job"
    assert third.prompt is not None and third.workflow is None and third.folder == third.id


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "b.jsonl:2: not valid JSON"),
        ("[1, 2]", "b.jsonl:2: expected a JSON object"),
        ('{"set": {}}', "b.jsonl:2: give exactly one of 'workflow'"),
        ('{"workflow": "wf.json", "sett": {}}', "b.jsonl:2: unknown key(s) sett"),
        ('{"workflow": "missing.json"}', "b.jsonl:2: workflow file not found"),
        ('{"workflow": "wf.json", "set": ["KSampler.seed"]}', "b.jsonl:2: --set 'KSampler.seed'"),
        ('{"workflow": "wf.json", "set": 3}', "b.jsonl:2: 'set' must be"),
        ('{"workflow": "wf.json", "set": {"KSamplr.seed": 1}}', "did you mean 'KSampler'"),
        ('{"workflow": "wf.json", "set": {"KSampler.sed": 1}}', "has no input 'sed'"),
    ],
)
def test_jsonl_bad_lines(wf, tmp_path, line, message):
    path = write(tmp_path / "b.jsonl", json.dumps({"workflow": "wf.json"}) + "\n" + line + "\n")
    with pytest.raises(BatchError) as info:
        load_batch(path)
    assert message in str(info.value)


# Sweeps -------------------------------------------------------------------------------------------------------


def sweep(**extra) -> dict:
    return {"prompt": sampler_workflow(), **extra}


def test_cartesian_product_counts_and_values():
    plan = parse_sweep(
        sweep(
            axes={
                "prompt": {"set": "Positive.text", "values": ["a cat", "a dog", "a fox"]},
                "seed": {"set": "KSampler.seed", "values": [1, 2, 3, 4]},
                "lora": {"set": "KSampler.cfg", "range": {"start": 0.5, "stop": 1.0, "step": 0.25}},
            }
        )
    )
    assert len(plan.jobs) == 36
    assert plan.jobs[0].axes == {"prompt": "a cat", "seed": 1, "lora": 0.5}
    assert plan.jobs[-1].axes == {"prompt": "a fox", "seed": 4, "lora": 1.0}
    assert plan.jobs[0].folder == "prompt-a-cat/seed-1/lora-0.5"
    assert len({j.folder for j in plan.jobs}) == 36 and len({j.id for j in plan.jobs}) == 36
    assert "Positive.text=a fox" in plan.jobs[-1].overrides


def test_zip_groups():
    plan = parse_sweep(
        sweep(
            axes={
                "prompt": {"set": "Positive.text", "values": ["a", "b", "c"]},
                "negative": {"set": "Negative.text", "values": ["x", "y", "z"]},
                "steps": {"set": "KSampler.steps", "values": [10, 20]},
            },
            zip=[["prompt", "negative"]],
        )
    )
    assert len(plan.jobs) == 6
    assert [(j.axes["prompt"], j.axes["negative"]) for j in plan.jobs[::2]] == [
        ("a", "x"),
        ("b", "y"),
        ("c", "z"),
    ]
    with pytest.raises(BatchError, match="equal lengths"):
        parse_sweep(
            sweep(
                axes={
                    "a": {"set": "Positive.text", "values": [1, 2]},
                    "b": {"set": "Negative.text", "values": [1]},
                },
                zip=[["a", "b"]],
            )
        )
    with pytest.raises(BatchError, match="unknown axis 'c'"):
        parse_sweep(sweep(axes={"a": {"set": "Positive.text", "values": [1]}}, zip=[["a", "c"]]))


def test_ranges():
    assert expand_range({"start": 1, "stop": 10, "step": 3}, "x") == [1, 4, 7, 10]
    assert expand_range({"start": 0.6, "stop": 1.0, "step": 0.2}, "x") == [0.6, 0.8, 1.0]
    assert expand_range({"start": 5, "stop": 1, "step": -2}, "x") == [5, 3, 1]
    with pytest.raises(BatchError, match="never gets"):
        expand_range({"start": 0, "stop": 1, "step": -1}, "x")
    with pytest.raises(BatchError, match="needs 'start' and 'stop'"):
        expand_range({"start": 0}, "x")


def test_seed_policies():
    axes = {"p": {"set": "Positive.text", "values": ["a", "b", "c"]}}
    fixed = parse_sweep(sweep(axes=axes, seed={"set": "KSampler.seed", "policy": "fixed", "value": 7}))
    assert [j.seed for j in fixed.jobs] == [7, 7, 7] and "KSampler.seed=7" in fixed.jobs[0].overrides
    inc = parse_sweep(sweep(axes=axes, seed={"set": "KSampler.seed", "policy": "increment", "base": 100}))
    assert [j.seed for j in inc.jobs] == [100, 101, 102]
    rnd = parse_sweep(sweep(axes=axes, seed={"set": "KSampler.seed", "policy": "random", "master": 42}))
    again = parse_sweep(sweep(axes=axes, seed={"set": "KSampler.seed", "policy": "random", "master": 42}))
    assert [j.seed for j in rnd.jobs] == [j.seed for j in again.jobs] and rnd.master_seed == 42
    assert [j.id for j in rnd.jobs] == [j.id for j in again.jobs]
    drawn = parse_sweep(sweep(axes=axes, seed={"set": "KSampler.seed", "policy": "random"}))
    assert drawn.master_seed is not None
    replay = parse_sweep(
        sweep(axes=axes, seed={"set": "KSampler.seed", "policy": "random", "master": drawn.master_seed})
    )
    assert [j.seed for j in replay.jobs] == [j.seed for j in drawn.jobs]
    with pytest.raises(BatchError, match="not one of fixed, increment, random"):
        parse_sweep(sweep(axes=axes, seed={"set": "KSampler.seed", "policy": "chaos"}))


def test_stable_ids_and_folder_names(wf, tmp_path):
    spec = {"workflow": "wf.json", "axes": {"KSampler.seed": [1, 2]}}
    a = load_batch(write(tmp_path / "s.json", json.dumps(spec)))
    b = load_batch(write(tmp_path / "s.yaml", "workflow: wf.json\naxes:\n  KSampler.seed: [1, 2]\n"))
    assert [j.id for j in a.jobs] == [j.id for j in b.jobs]
    assert a.jobs[0].folder == "KSampler.seed-1"
    assert safe_name("a cat, smiling / 4k") == "a-cat-smiling-4k"
    assert safe_name("../..") == "_"
    quiet = parse_sweep(sweep(axes={"s": {"set": "KSampler.seed", "values": [1, 2], "folder": False}}))
    assert [j.folder for j in quiet.jobs] == ["00000", "00001"]


def test_address_errors_list_candidates():
    with pytest.raises(BatchError) as info:
        parse_sweep(sweep(axes={"x": {"set": "Sampler.seed", "values": [1]}}))
    assert "axis 'x'" in str(info.value) and "Nodes: " in str(info.value) and "KSampler" in str(info.value)
    with pytest.raises(BatchError, match="its inputs: .*seed"):
        parse_sweep(sweep(axes={"x": {"set": "KSampler.sead", "values": [1]}}))
    with pytest.raises(BatchError, match="needs 'values'"):
        parse_sweep(sweep(axes={"x": {"set": "KSampler.seed"}}))


# CLI ----------------------------------------------------------------------------------------------------------


def test_cli_batch_plan(wf, tmp_path):
    path = write(
        tmp_path / "s.yaml",
        "workflow: wf.json\naxes:\n  seed: {set: KSampler.seed, values: [1, 2, 3]}\n"
        "  cfg: {set: KSampler.cfg, range: {start: 5, stop: 6}}\n",
    )
    code, out, err = run_cli("batch", "plan", str(path))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 6 and lines[0].split("\t")[1] == "seed-1/cfg-5"
    assert "6 job(s) planned" in err
    code, out, _ = run_cli("batch", "plan", str(path), "--json")
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and len(records) == 6 and records[-1]["axes"] == {"seed": 3, "cfg": 6}
    assert records[0]["set"] == ["KSampler.seed=1", "KSampler.cfg=5"]


def test_cli_batch_plan_errors(tmp_path):
    code, _, err = run_cli("batch", "plan", str(write(tmp_path / "b.jsonl", "{oops\n")))
    assert code == 2 and "b.jsonl:1: not valid JSON" in err
    code, _, err = run_cli("batch", "plan", str(tmp_path / "nope.yaml"))
    assert code == 2 and "batch file not found" in err


def test_cli_batch_plan_table_on_tty(wf, tmp_path):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    path = write(
        tmp_path / "b.jsonl", json.dumps({"workflow": "wf.json", "set": {"KSampler.seed": 3}}) + "\n"
    )
    out, err = Tty(), io.StringIO()
    assert cli.main(["batch", "plan", str(path)], stdout=out, stderr=err) == 0
    head, row = out.getvalue().splitlines()
    assert head.split() == ["ID", "FOLDER", "SEED", "SET"] and row.endswith("KSampler.seed=3")
