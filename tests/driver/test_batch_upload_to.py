"""``charforge batch run --upload-to s3://bucket/prefix`` against a real S3-compatible server on loopback (moto in
server mode): every done job's folder (outputs, LoRA, run folder) and the batch's files go up with their sha256
in the metadata, a rerun sends nothing, a multipart upload cut in the middle is resumed by the next run with
only the missing parts (the job is not run again), and no credential appears in any output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fakes.batch_checks import records, run_cli
from fakes.moto_s3 import ACCESS_KEY, SECRET_KEY, use_s3
from fakes.train_lora import NAMES, training_server, training_sweep

pytest.importorskip("boto3")
pytest.importorskip("moto")


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    import boto3

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the multipart record (~/.cache/charforge) stays here
    name = use_s3(monkeypatch, s3_endpoint, str(tmp_path), endpoint_env=False)
    return name, boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


def _objects(client, bucket: str, prefix: str) -> dict[str, dict]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {k[len(prefix) :]: client.head_object(Bucket=bucket, Key=k) for k in keys}


def _sent(monkeypatch) -> list[str]:
    """Records every object actually written (not those skipped because S3 had the same sha256)."""
    from charforge.driver.storage import S3Storage

    sent: list[str] = []
    real = S3Storage.upload_file

    def recording(self, path, location, relative):
        entry = real(self, path, location, relative)
        if entry["uploaded"]:
            sent.append(entry["url"])
        return entry

    monkeypatch.setattr(S3Storage, "upload_file", recording)
    return sent


def test_batch_outputs_and_loras_go_up_and_a_rerun_sends_nothing(
    comfy_env, monkeypatch, tmp_path, bucket, s3_endpoint
):
    name, client = bucket
    spec = training_sweep(tmp_path)
    out = tmp_path / "out"
    sent = _sent(monkeypatch)
    argv = [
        "batch",
        "run",
        str(spec),
        "--out",
        str(out),
        "--upload-to",
        f"s3://{name}/sweeps/one",
        "--s3-endpoint",
        s3_endpoint,
        "--json",
    ]
    with training_server(comfy_env, monkeypatch) as fake:
        code, stdout, err = run_cli(*argv, "--server", fake.url)
        assert code == 0, err
        objects = _objects(client, name, "sweeps/one/")
        local = {
            p.relative_to(out).as_posix(): p
            for p in out.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name != "s3_manifest.json"
        }
        assert set(local) <= set(objects)
        for job in NAMES:
            assert f"name-{job}/lora/{job}.safetensors" in objects
            assert f"name-{job}/lora/run/{job}/loss.png" in objects and f"name-{job}/manifest.json" in objects
        for rel, path in local.items():
            if rel.startswith("name-"):  # the job folders are final once done: what went up is what is here
                assert objects[rel]["Metadata"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        for top in ("plan.json", "summary.json", "journal.jsonl", "s3_manifest.json"):
            assert top in objects
        listing = json.loads((out / "s3_manifest.json").read_text())
        assert {e["path"] for e in listing} >= {f"name-{j}/lora/{j}.safetensors" for j in NAMES}
        assert all(e["url"].startswith(f"s3://{name}/sweeps/one/") for e in listing)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["uploads"]["uploaded"] == 3 and summary["uploads"]["not_uploaded"] == 0
        assert len([r for r in records(out) if r["ev"] == "uploaded"]) == 3

        sent.clear()
        code, stdout2, err2 = run_cli(*argv, "--server", fake.url)
        assert code == 0, err2
        assert sent == []  # nothing new: nothing sent
        assert len(fake.executed) == 3
    for text in (stdout, err, stdout2, err2, *(p.read_text(errors="replace") for p in out.rglob("*.json*"))):
        assert SECRET_KEY not in text and ACCESS_KEY not in text


def test_an_upload_cut_in_the_middle_is_resumed_by_the_next_run(
    comfy_env, monkeypatch, tmp_path, bucket, s3_endpoint
):
    from charforge.driver.batch import Batch
    from charforge.driver.storage import S3Storage, StorageError

    name, client = bucket
    spec = training_sweep(tmp_path, ["solo"])
    out = tmp_path / "out"
    parts: list[int] = []
    failed: list[int] = []
    real = S3Storage.upload_part

    def failing(self, bucket_name, key, upload_id, number, data):
        if key.endswith("lora/solo.safetensors") and number == 30 and not failed:
            failed.append(number)
            raise StorageError("connection dropped")
        if key.endswith("lora/solo.safetensors"):
            parts.append(number)
        return real(self, bucket_name, key, upload_id, number, data)

    monkeypatch.setattr(S3Storage, "upload_part", failing)

    def run(fake) -> list:
        storage = S3Storage(endpoint_url=s3_endpoint, part_size=4096, record=tmp_path / "uploads.json")
        return list(
            Batch.from_file(spec).run(
                servers=[fake.url], out=out, upload_to=f"s3://{name}/b", storage=storage, contact_sheet=None
            )
        )

    with training_server(comfy_env, monkeypatch) as fake:
        [first] = run(fake)
        assert first.ok  # the job is done: its folder is home; only its upload failed
        state = [r for r in records(out) if r["ev"] in ("uploaded", "upload_failed")]
        assert [r["ev"] for r in state] == ["upload_failed"] and "connection dropped" in state[0]["reason"]
        assert parts == list(range(1, 30))
        parts.clear()
        [second] = run(fake)
        assert second.skipped and len(fake.executed) == 1  # not run again
    lora = out / "name-solo" / "lora" / "solo.safetensors"
    assert parts == list(range(30, 64))  # parts 1-29 were in S3 already: only the rest was sent
    head = client.head_object(Bucket=name, Key="b/name-solo/lora/solo.safetensors")
    assert head["Metadata"]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert head["ContentLength"] == lora.stat().st_size
    assert [r["ev"] for r in records(out) if r["ev"] in ("uploaded", "upload_failed")] == [
        "upload_failed",
        "uploaded",
    ]
    assert Path(out / "s3_manifest.json").exists()
