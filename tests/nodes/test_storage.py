"""Send Training to Storage (nodes/storage.py, engine/transfer/storage.py) against moto on loopback: the LoRA
and run folder go up with their sha256, a second run sends nothing, a wrong destination or missing run is
refused with the reason, and the receipt image holds the text the driver reads back."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.moto_s3 import ACCESS_KEY, SECRET_KEY, moto_s3, use_s3

pytest.importorskip("boto3")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


def _run(tmp_path: Path):
    from charforge.engine.train.run import TrainingRun

    run_dir = tmp_path / "output" / "charforge" / "train_runs" / "pip"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "samples" / "s.png").write_bytes(b"\x89PNG sample")
    (run_dir / "pip.safetensors").write_bytes(b"lora" * 1000)
    (run_dir / ".state").write_bytes(b"hidden bookkeeping")
    lora = tmp_path / "models" / "loras" / "pip.safetensors"
    lora.parent.mkdir(parents=True)
    lora.write_bytes(b"lora" * 1000)
    return TrainingRun("pip", str(run_dir), "completed", 8, 8, 0.25, str(lora), "pip.safetensors")


def test_the_run_goes_up_once_and_the_receipt_reads_back(comfy_env, s3_endpoint, tmp_path, monkeypatch):
    import boto3
    from PIL import Image

    from charforge.driver.runpod.results import receipt
    from charforge.driver.sync import parse_train_summary
    from charforge.nodes.storage import SendTrainingToStorage

    bucket = use_s3(monkeypatch, s3_endpoint, str(tmp_path))
    run = _run(tmp_path)
    answer = SendTrainingToStorage().send(run, f"s3://{bucket}/runs/a1", unique_id="9")
    assert answer["result"] == (f"s3://{bucket}/runs/a1",)
    client = boto3.client("s3")
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [
        "runs/a1/lora/pip.safetensors",
        "runs/a1/run/pip/pip.safetensors",
        "runs/a1/run/pip/samples/s.png",
    ]  # hidden files stay on the server
    meta = client.head_object(Bucket=bucket, Key="runs/a1/lora/pip.safetensors")["Metadata"]
    assert meta["sha256"] == hashlib.sha256(b"lora" * 1000).hexdigest()

    [shown] = answer["ui"]["images"]
    path = Path(comfy_env.base_dir) / "output" / shown["subfolder"] / shown["filename"]
    Image.open(path).verify()  # a real image: the worker returns it, the editor shows it
    found = receipt(shown["filename"], path.read_bytes())
    assert found["node"] == "9" and [f["sent"] for f in found["files"]] == [True, True, True]
    trained = parse_train_summary(found["summary"])
    assert (trained.lora, trained.run_dir) == ("pip.safetensors", f"s3://{bucket}/runs/a1/run/pip")
    assert SECRET_KEY not in str(answer) and ACCESS_KEY not in str(answer)

    again = SendTrainingToStorage().send(run, f"s3://{bucket}/runs/a1", unique_id="9")
    assert "sent 0 of 3 files" in again["ui"]["text"][0]


def test_bad_destinations_and_missing_runs_are_refused(comfy_env, s3_endpoint, tmp_path, monkeypatch):
    from charforge.nodes.storage import SendTrainingToStorage

    bucket = use_s3(monkeypatch, s3_endpoint, str(tmp_path))
    run = _run(tmp_path)
    with pytest.raises(RuntimeError, match="not an s3://bucket/prefix"):
        SendTrainingToStorage().send(run, "/tmp/somewhere")
    with pytest.raises(RuntimeError, match=r"'\.\.' parts"):
        SendTrainingToStorage().send(run, f"s3://{bucket}/a/../b")
    with pytest.raises(RuntimeError, match="NoSuchBucket") as caught:
        SendTrainingToStorage().send(run, "s3://no-such-bucket-cf/x")
    assert SECRET_KEY not in str(caught.value) and ACCESS_KEY not in str(caught.value)
    Path(run.lora_path).unlink()
    (Path(run.run_dir) / "pip.safetensors").unlink()
    with pytest.raises(RuntimeError, match="is not there; nothing was sent"):
        SendTrainingToStorage().send(run, f"s3://{bucket}/x")


def test_fetch_keeps_the_layout_checks_every_file_and_refuses_a_mismatch(
    comfy_env, s3_endpoint, tmp_path, monkeypatch
):
    import boto3

    from charforge.nodes.storage import FetchFromStorage

    bucket = use_s3(monkeypatch, s3_endpoint, str(tmp_path))
    client = boto3.client("s3")

    def put(key, body, sha=None):
        meta = {"sha256": sha or hashlib.sha256(body).hexdigest()}
        client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=meta)

    put("ds/10_pip woman/a.png", b"\x89PNG a")
    put("ds/10_pip woman/a.txt", b"pip woman")
    answer = FetchFromStorage().fetch(f"s3://{bucket}/ds", "pip")
    [folder] = answer["result"]
    assert Path(folder) == Path(comfy_env.base_dir) / "input" / "charforge" / "pip"
    assert (Path(folder) / "10_pip woman" / "a.txt").read_bytes() == b"pip woman"
    again = FetchFromStorage().fetch(f"s3://{bucket}/ds", "pip")
    assert "(0 fetched, 2 already here)" in again["ui"]["text"][0]

    put("bad/x.png", b"other bytes", sha="0" * 64)
    with pytest.raises(RuntimeError, match="do not match the sha256"):
        FetchFromStorage().fetch(f"s3://{bucket}/bad", "bad")
    assert not list((Path(comfy_env.base_dir) / "input" / "charforge" / "bad").rglob("*.png*"))
    put("hidden/.uploads/x.png", b"x")
    with pytest.raises(RuntimeError, match="refused"):
        FetchFromStorage().fetch(f"s3://{bucket}/hidden", "hidden")
    with pytest.raises(ValueError, match="folder_name"):
        FetchFromStorage().fetch(f"s3://{bucket}/ds", "../escape")
    with pytest.raises(RuntimeError, match="holds no files"):
        FetchFromStorage().fetch(f"s3://{bucket}/nothing-here", "")
