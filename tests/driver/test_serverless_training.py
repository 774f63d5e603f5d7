"""Training on a RunPod serverless endpoint brings every LoRA home: ``charforge batch run`` with training jobs
against the fake serverless worker (worker-comfyui's behaviour: images only, the worker's disk never reachable)
and a real S3-compatible server on loopback (moto). The driver adds CharForge's Send Training to Storage node
(the real node's code runs on the fake worker, with the worker's credentials from the environment); the
worker returns its receipt image; the LoRA and run folder come home from S3, checked by sha256."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.comfy_server import FakeComfyServer
from fakes.moto_s3 import ACCESS_KEY, SECRET_KEY, corrupt_uploads
from fakes.runpod_api import FakeRunPod
from fakes.serverless_worker import serverless_endpoint
from fakes.train_lora import (
    NAMES,
    add_fetch_node,
    add_store_node,
    add_train_node,
    check_lora_home,
    lora_bytes,
    training_sweep,
)

from cf_testing.cli import run_driver_cli

pytest.importorskip("boto3")
pytest.importorskip("moto")


@pytest.fixture
def worker(
    comfy_env, monkeypatch, tmp_path, s3_endpoint
) -> Iterator[tuple[FakeRunPod, FakeComfyServer, str]]:
    """A serverless endpoint ``ep1`` whose worker runs Train LoRA and Send Training to Storage; the driver's and
    the worker's AWS variables point at moto; the results go to ``s3://<bucket>/results``."""
    from charforge import bridge

    bridge.register_model_folders()
    nodes = (add_train_node, add_store_node, add_fetch_node)
    with serverless_endpoint(monkeypatch, tmp_path, s3_endpoint, comfy_env.base_dir, *nodes) as endpoint:
        yield endpoint


def _objects(bucket: str, prefix: str) -> dict[str, dict]:
    import boto3

    client = boto3.client("s3")
    found = {}
    for item in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        head = client.head_object(Bucket=bucket, Key=item["Key"])
        found[item["Key"]] = head["Metadata"]
    return found


def test_training_sweep_on_serverless_brings_every_lora_home_through_s3(worker, tmp_path, monkeypatch):
    runpod, comfy, bucket = worker
    monkeypatch.setenv("CHARFORGE_SERVERLESS_RESULTS", f"s3://{bucket}/results")
    spec = training_sweep(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_driver_cli(
        "batch", "run", str(spec), "--server", "runpod-serverless:ep1", "--out", str(out), "--json"
    )
    assert code == 0, err

    # each job went to the worker with a store node wired to its Train LoRA run, its own destination
    destinations = []
    for body in runpod.run_bodies:
        graph = body["input"]["workflow"]
        [store] = [n for n in graph.values() if n["class_type"] == "CharForgeSendTrainingToStorage"]
        assert store["inputs"]["run"] == ["1", 1]
        destinations.append(store["inputs"]["destination"])
    assert len(set(destinations)) == 3 and all(d.startswith(f"s3://{bucket}/results/") for d in destinations)

    for name in NAMES:
        folder = out / f"name-{name}"
        training = check_lora_home(folder, name, comfy.root)  # with the worker's images (loss curve, receipt)
        assert training["run_dir"].startswith(f"s3://{bucket}/results/") and training["run_dir"].endswith(
            f"/run/{name}"
        )
        manifest = json.loads((folder / "manifest.json").read_text())
        assert any(f["path"].startswith("charforge_results_") for f in manifest["files"])
        for text in ((folder / "manifest.json").read_text(), stdout, err):
            assert SECRET_KEY not in text and ACCESS_KEY not in text

    # every object on S3 carries its sha256
    stored = _objects(bucket, "results/")
    assert len(stored) == 3 * 5 and all(len(meta.get("sha256", "")) == 64 for meta in stored.values())

    # a rerun submits nothing and downloads nothing
    runs = len(runpod.run_bodies)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    code, _, err = run_driver_cli(
        "batch", "run", str(spec), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code == 0, err
    assert len(runpod.run_bodies) == runs
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps


def test_a_training_job_without_a_results_location_is_refused_before_it_is_sent(
    worker, tmp_path, monkeypatch
):
    runpod, _, _ = worker
    monkeypatch.delenv("CHARFORGE_SERVERLESS_RESULTS", raising=False)
    spec = training_sweep(tmp_path, ["solo"])
    code, _, err = run_driver_cli(
        "batch", "run", str(spec), "--server", "runpod-serverless:ep1", "--out", str(tmp_path / "out")
    )
    assert code != 0
    assert "runpod.results" in err and "CHARFORGE_SERVERLESS_RESULTS" in err and "runpod-pod" in err
    assert runpod.run_bodies == []  # nothing was sent, nothing billed


def test_a_stored_file_that_does_not_match_its_checksum_is_refused(worker, tmp_path, monkeypatch):
    """The LoRA on S3 replaced by other bytes (its recorded sha256 kept): the download is refused, the job's
    LoRA stays pending, and a rerun after the object is right brings it home without training again."""
    import boto3

    runpod, _, bucket = worker
    monkeypatch.setenv("CHARFORGE_SERVERLESS_RESULTS", f"s3://{bucket}/results")
    spec = training_sweep(tmp_path, ["solo"])
    out = tmp_path / "out"
    client = boto3.client("s3")
    corrupt_uploads(monkeypatch, "/lora/solo.safetensors", b"not the lora")
    code, _, err = run_driver_cli(
        "batch", "run", str(spec), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code != 0 and "do not match" in err
    manifest = json.loads((out / "name-solo" / "manifest.json").read_text())
    assert manifest["training"][0]["state"] == "pending"
    assert not (out / "name-solo" / "lora" / "solo.safetensors").exists()
    assert not list(out.rglob("*.part"))

    [key] = [k for k in _objects(bucket, "results/") if k.endswith("/lora/solo.safetensors")]
    client.put_object(
        Bucket=bucket,
        Key=key,
        Body=lora_bytes("solo"),
        Metadata={"sha256": hashlib.sha256(lora_bytes("solo")).hexdigest()},
    )
    runs = len(runpod.run_bodies)
    code, _, err = run_driver_cli(
        "batch", "run", str(spec), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code == 0, err
    assert len(runpod.run_bodies) == runs  # not trained again
    assert (out / "name-solo" / "lora" / "solo.safetensors").read_bytes() == lora_bytes("solo")


def test_a_local_dataset_goes_up_through_storage_and_reaches_the_worker(worker, tmp_path, monkeypatch):
    """Training jobs whose dataset_folder is a kohya folder on this machine: it goes up once to
    ``<results>/datasets/<name>-<fingerprint>`` (sha256 metadata), the worker fetches it into its input folder
    with Fetch from Storage (subfolders and captions kept, byte-identical) and trains on that; a changed photo
    gives the dataset a new place, so the worker never mixes two versions."""
    runpod, comfy, bucket = worker
    monkeypatch.setenv("CHARFORGE_SERVERLESS_RESULTS", f"s3://{bucket}/results")
    dataset = tmp_path / "ds"
    (dataset / "10_pip woman").mkdir(parents=True)
    (dataset / "10_pip woman" / "a.png").write_bytes(b"\x89PNG" + bytes(range(200)))
    (dataset / "10_pip woman" / "a.txt").write_text("pip woman, smiling")
    spec = training_sweep(tmp_path, ["pip_a", "pip_b"])
    graph = json.loads((tmp_path / "train.json").read_text())
    graph["1"]["inputs"]["dataset_folder"] = str(dataset)
    (tmp_path / "train.json").write_text(json.dumps(graph))
    code, _, err = run_driver_cli(
        "batch", "run", str(spec), "--server", "runpod-serverless:ep1", "--out", str(tmp_path / "out")
    )
    assert code == 0, err

    stored = [k for k in _objects(bucket, "results/datasets/")]
    assert len(stored) == 2 and all(k.startswith("results/datasets/ds-") for k in stored)
    for body in runpod.run_bodies:  # the job sent no local path, only where the worker fetches it from
        graph = body["input"]["workflow"]
        [fetch] = [n for n in graph.values() if n["class_type"] == "CharForgeFetchFromStorage"]
        assert fetch["inputs"]["source"].startswith(f"s3://{bucket}/results/datasets/ds-")
        assert graph["1"]["inputs"]["dataset_folder"] == ["charforge_fetch_1", 0]
    for name in ("pip_a", "pip_b"):
        worker_folder = Path(comfy.trained_on[name])
        assert worker_folder.parent == comfy.root / "input" / "charforge"
        assert (worker_folder / "10_pip woman" / "a.png").read_bytes() == (
            dataset / "10_pip woman" / "a.png"
        ).read_bytes()
        assert (worker_folder / "10_pip woman" / "a.txt").read_text() == "pip woman, smiling"
        assert (tmp_path / "out" / f"name-{name}" / "lora" / f"{name}.safetensors").is_file()

    (dataset / "10_pip woman" / "a.png").write_bytes(b"\x89PNG changed")
    spec = training_sweep(tmp_path, ["pip_c"])
    graph = json.loads((tmp_path / "train.json").read_text())
    graph["1"]["inputs"]["dataset_folder"] = str(dataset)
    (tmp_path / "train.json").write_text(json.dumps(graph))
    code, _, err = run_driver_cli(
        "batch", "run", str(spec), "--server", "runpod-serverless:ep1", "--out", str(tmp_path / "out2")
    )
    assert code == 0, err
    assert len(_objects(bucket, "results/datasets/")) == 4
    assert (Path(comfy.trained_on["pip_c"]) / "10_pip woman" / "a.png").read_bytes() == b"\x89PNG changed"


def test_a_driver_killed_while_the_worker_trains_resumes_and_brings_the_lora_home(
    worker, tmp_path, monkeypatch
):
    """The driver SIGKILLed after RunPod accepted the job: the resumed batch looks the job up by its journaled
    id, reads the receipt from /status and brings the LoRA home from storage; the job is never sent twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fakes.batch_checks import journal

    runpod, comfy, bucket = worker
    add_train_node(comfy, seconds=3.0)  # the worker is still training when the driver dies
    monkeypatch.setenv("CHARFORGE_SERVERLESS_RESULTS", f"s3://{bucket}/results")
    spec = training_sweep(tmp_path, ["solo"])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "charforge.driver.cli", "batch", "run", str(spec), "--out", str(out)]
    proc = subprocess.Popen(
        [*command, "--server", "runpod-serverless:ep1"],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any(r.get("ev") == "submitted" for r in journal(out)):
            time.sleep(0.02)
        assert any(r.get("ev") == "submitted" for r in journal(out)), "the batch never submitted"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(runpod.run_bodies) == 1 and not (out / "name-solo").exists()
    code, _, err = run_driver_cli(
        "batch", "run", str(spec), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code == 0, err
    assert len(runpod.run_bodies) == 1
    assert (out / "name-solo" / "lora" / "solo.safetensors").read_bytes() == lora_bytes("solo")
    manifest = json.loads((out / "name-solo" / "manifest.json").read_text())
    assert manifest["training"][0]["state"] == "home"


@pytest.mark.parametrize(("schema", "kind"), [("old", "base64"), ("new", "s3_url")])
def test_the_lora_comes_home_whatever_the_worker_returns(worker, tmp_path, monkeypatch, schema, kind):
    """worker-comfyui >= 5.0 with its own S3 upload (images as presigned URLs), and <= 4.x that returns only the
    last image (the receipt may be missing: the run is then found at the destination the driver gave)."""
    runpod, _, bucket = worker
    runpod.knobs.output_schema, runpod.knobs.output_type = schema, kind
    monkeypatch.setenv("CHARFORGE_SERVERLESS_RESULTS", f"s3://{bucket}/results")
    spec = training_sweep(tmp_path, ["solo", "duo"])
    out = tmp_path / "out"
    code, _, err = run_driver_cli(
        "batch", "run", str(spec), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code == 0, err
    for name in ("solo", "duo"):
        assert (out / f"name-{name}" / "lora" / f"{name}.safetensors").read_bytes() == lora_bytes(name)
        manifest = json.loads((out / f"name-{name}" / "manifest.json").read_text())
        assert manifest["training"][0]["state"] == "home"
