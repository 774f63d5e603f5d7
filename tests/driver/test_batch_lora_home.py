"""``charforge batch run`` with training jobs brings every LoRA and its run folder home into the job's folder
(driver/sync/training.py through the batch runner), against the fake ComfyUI with CharForge's transfer routes
and a stand-in of Train LoRA that writes what the real node writes and shows its text. The driver SIGKILLed
after a job finished but before its LoRA came home resumes by downloading (with Range), never by training
again."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from fakes.batch_checks import batch_process, batch_run, records
from fakes.charforge_routes import lying_checksums
from fakes.comfy_server import FakeComfyServer
from fakes.train_lora import (
    LORA_ROUTE,
    NAMES,
    Stall,
    add_train_node,
    check_lora_home,
    lora_bytes,
    train_spec,
    training_server,
    training_sweep,
)

from charforge.driver.batch.journal import JOURNAL_NAME, replay
from charforge.driver.sync import parse_train_summary


def job_folders(out: Path) -> dict[str, Path]:
    return {p.parent.name.split("-", 1)[1]: p.parent for p in out.glob("name-*/manifest.json")}


def check_home(fake: FakeComfyServer, out: Path) -> None:
    """Each job folder holds its LoRA (byte-identical to the server's) and run folder, all in its manifest."""
    folders = job_folders(out)
    assert sorted(folders) == NAMES
    for name, folder in folders.items():
        training = check_lora_home(folder, name, fake.root)
        assert (
            training["lora_path"] == f"lora/{name}.safetensors" and training["run_path"] == f"lora/run/{name}"
        )
        assert not list(folder.rglob("*.part"))


def test_the_train_summary_is_read_as_the_node_writes_it():
    trained = parse_train_summary(
        "pip.safetensors: 500 steps, final loss 0.0812 (resumed at step 200); run folder "
        "/data/out/charforge/train_runs/pip; preset 'sdxl' values used, not steps"
    )
    assert (trained.lora, trained.run_dir, trained.run_name) == (
        "pip.safetensors",
        "/data/out/charforge/train_runs/pip",
        "pip",
    )
    assert (
        parse_train_summary(
            "C:\\ComfyUI\\x.safetensors: 1 steps, final loss 1.0000; run folder "
            "C:\\ComfyUI\\output\\charforge\\train_runs\\x"
        ).run_name
        == "x"
    )
    assert parse_train_summary("kept 3 of 4 images") is None


def test_a_training_sweep_brings_every_lora_and_run_folder_home(comfy_env, monkeypatch, tmp_path):
    spec = training_sweep(tmp_path)
    out = tmp_path / "out"
    with training_server(comfy_env, monkeypatch) as fake:
        code, stdout, err = batch_run(spec, out, fake.url, "--json")
        assert code == 0, err
        check_home(fake, out)
        done = [json.loads(line) for line in stdout.splitlines() if '"event": "job"' in line]
        assert all(any(f.endswith(".safetensors") for f in rec["files"]) for rec in done) and len(done) == 3
        # the run folder's copy of the LoRA is the LoRA just downloaded: copied here, not sent twice
        assert not [
            r for r in fake.requests if "/outputs/files/" in r.path and r.path.endswith(".safetensors")
        ]
        assert len([r for r in fake.requests if r.path.startswith(LORA_ROUTE)]) == 3

        fake.requests.clear()  # a rerun: nothing is submitted or downloaded again
        code, _, err = batch_run(spec, out, fake.url)
        assert code == 0, err
        assert not [r for r in fake.requests if r.path.startswith(("/prompt", "/charforge/transfer"))]
        assert len(fake.executed) == 3


def test_driver_killed_before_the_lora_came_home_resumes_by_downloading(comfy_env, monkeypatch, tmp_path):
    spec = training_sweep(tmp_path)
    out = tmp_path / "out"
    stall = Stall()
    with training_server(comfy_env, monkeypatch, stall) as fake:
        stall.on = True
        proc = batch_process(spec, out, fake.url, "--window", "1", "--backoff", "0.05")
        try:
            assert stall.hit.wait(60), "the LoRA download never started"
            deadline = time.monotonic() + 20  # some bytes are on disk: a download was cut in the middle
            while time.monotonic() < deadline and not any(
                p.stat().st_size for p in out.rglob("*.safetensors.part")
            ):
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        [partial] = list(out.rglob("*.safetensors.part"))
        have = partial.stat().st_size
        assert 0 < have < len(lora_bytes("pip_a"))
        folder = partial.parent.parent
        state = replay(out / JOURNAL_NAME)
        job = json.loads((folder / "manifest.json").read_text())["batch"]["job"]
        assert state.jobs[job].state == "finished"  # the job ran; its outputs are in place, its LoRA is not
        assert json.loads((folder / "manifest.json").read_text())["training"][0]["state"] == "pending"
        executed = len(fake.executed)

        fake.requests.clear()
        code, _, err = batch_run(spec, out, fake.url)
        assert code == 0, err
        check_home(fake, out)
        assert max(fake.executions.values()) == 1 and len(fake.executed) == 3 >= executed
        assert [r["job"] for r in records(out) if r["ev"] == "submitting"].count(
            job
        ) == 1  # never resubmitted
        resumed = [
            r
            for r in fake.requests
            if r.path.startswith(LORA_ROUTE) and folder.name.split("-", 1)[1] in r.path
        ]
        assert [r.headers.get("Range") for r in resumed] == [f"bytes={have}-"]  # only the missing bytes


def test_a_server_without_transfer_routes_keeps_the_lora_and_says_so(tmp_path):
    spec = training_sweep(tmp_path, ["solo"])
    out = tmp_path / "out"
    with FakeComfyServer() as fake:
        add_train_node(fake)
        code, _, err = batch_run(spec, out, fake.url)
    assert code == 0, err
    assert "trained LoRAs stay on" in err and "transfer routes" in err
    manifest = json.loads((out / "name-solo" / "manifest.json").read_text())
    assert (
        manifest["training"][0]["state"] == "not_home"
        and "transfer routes" in manifest["training"][0]["reason"]
    )
    assert not (out / "name-solo" / "lora").exists()


def test_no_lora_home_leaves_it_on_the_server(comfy_env, monkeypatch, tmp_path):
    spec = training_sweep(tmp_path, ["solo"])
    out = tmp_path / "out"
    with training_server(comfy_env, monkeypatch) as fake:
        code, _, err = batch_run(spec, out, fake.url, "--no-lora-home")
    assert code == 0, err
    assert "training" not in json.loads((out / "name-solo" / "manifest.json").read_text())
    assert not (out / "name-solo" / "lora").exists()


def test_a_lora_refused_by_its_checksum_is_downloaded_by_the_next_run_not_trained_again(
    comfy_env, monkeypatch, tmp_path
):
    spec = training_sweep(tmp_path, ["solo"])
    out = tmp_path / "out"
    with training_server(comfy_env, monkeypatch) as fake:
        with lying_checksums():
            code, _, err = batch_run(spec, out, fake.url)
        assert code == 1 and "failed (home)" in err and "sha256" in err
        state = replay(out / JOURNAL_NAME)
        [job] = state.jobs.values()
        assert (job.state, job.kind) == ("failed", "home")
        assert not list((out / "name-solo").rglob("*.part"))  # a refused file is not kept

        code, _, err = batch_run(spec, out, fake.url)  # no --retry-failed
        assert code == 0, err
        assert len(fake.executed) == 1 and replay(out / JOURNAL_NAME).jobs[job.id].state == "done"
    manifest = json.loads((out / "name-solo" / "manifest.json").read_text())
    assert manifest["training"][0]["state"] == "home"
    assert (out / "name-solo" / "lora" / "run" / "solo" / "loss.png").is_file()


def test_jobs_training_the_same_name_each_keep_their_own_lora(comfy_env, monkeypatch, tmp_path):
    """A steps sweep whose jobs all train ``output_name: pip``: the plan gives each job its own name
    (``pip_<job id>``), so each job's LoRA and run folder on the server is its own and each comes home into its
    job folder; planning again gives the same names."""
    from charforge.driver.batch.plan import load_batch

    spec = train_spec(tmp_path, "pip", "steps", "Train.steps", [2, 3], "steps.json")
    plan = load_batch(spec)
    names = {job.id: [o for o in job.overrides if ".output_name=" in o] for job in plan.jobs}
    assert names == {job.id: [f"1.output_name=pip_{job.id[:8]}"] for job in plan.jobs}
    assert {j.id: j.overrides for j in load_batch(spec).jobs} == {j.id: j.overrides for j in plan.jobs}

    out = tmp_path / "out"
    with training_server(comfy_env, monkeypatch) as fake:
        code, _, err = batch_run(spec, out, fake.url)
        assert code == 0, err
        for job in plan.jobs:
            name = f"pip_{job.id[:8]}"
            folder = out / job.folder
            assert (folder / "lora" / f"{name}.safetensors").read_bytes() == lora_bytes(name)
            assert (folder / "lora" / "run" / name / "samples").is_dir()
        assert not (fake.root / "models" / "loras" / "pip.safetensors").exists()
    # a batch whose jobs train different names keeps them as given
    assert not [
        o for j in load_batch(training_sweep(tmp_path)).jobs for o in j.overrides if "output_name=x_" in o
    ]


def test_distinct_training_names_cover_overrides_and_nodes_of_one_job():
    from charforge.driver.sync.training import distinct_training_names

    graph = {
        "1": {"class_type": "CharForgeTrainLoRA", "inputs": {"output_name": "pip"}},
        "2": {"class_type": "CharForgeTrainLoRA", "inputs": {"output_name": "pip"}},
        "3": {"class_type": "CharForgeTrainLoRA", "inputs": {"output_name": ["9", 0]}},  # wired: not read
    }
    extra = distinct_training_names(
        [("aaaaaaaa11", graph, []), ("bbbbbbbb22", graph, ["1.output_name=solo", "2.output_name=duo"])]
    )
    # job a trains "pip" twice; job b's overrides name its runs apart from everything else
    assert extra == {"aaaaaaaa11": ["1.output_name=pip_aaaaaaaa_1", "2.output_name=pip_aaaaaaaa_2"]}
    assert (
        distinct_training_names([("c", None, []), ("d", {"1": {"class_type": "X", "inputs": {}}}, [])]) == {}
    )
