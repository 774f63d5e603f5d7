"""S3 storage (driver/storage/s3.py) against a real S3-compatible server on loopback (moto in server mode):
upload and download of a photo folder, a multipart upload resumed after a failure sending only the missing
parts, a checksum mismatch refused, unchanged files not sent again, credentials absent from every output."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from fakes.moto_s3 import ACCESS_KEY, SECRET_KEY, use_s3

pytest.importorskip("boto3")
pytest.importorskip("moto")


@pytest.fixture
def storage(s3_endpoint, monkeypatch, tmp_path):
    from charforge.driver.storage import S3Storage

    bucket = use_s3(monkeypatch, s3_endpoint, str(tmp_path), endpoint_env=False)
    store = S3Storage(endpoint_url=s3_endpoint, part_size=1024, record=tmp_path / "uploads.json")
    store.bucket = bucket  # type: ignore[attr-defined]
    return store


def _folder(root: Path) -> dict[str, bytes]:
    files = {
        "a.png": b"\x89PNG" + bytes(range(256)) * 10,
        "a.txt": b"zqx, smile",
        "sub/b.jpg": b"\xff\xd8\xff" + b"j" * 500,
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_photo_folder_up_and_down_with_checksums(storage, tmp_path):
    from charforge.driver.storage import S3Location

    files = _folder(tmp_path / "photos")
    location = S3Location.parse(f"s3://{storage.bucket}/chars/pip")
    up = storage.upload_tree(tmp_path / "photos", location)
    assert sorted(e["url"] for e in up) == [f"s3://{storage.bucket}/chars/pip/{n}" for n in sorted(files)]
    assert all(e["uploaded"] for e in up)
    again = storage.upload_tree(tmp_path / "photos", location)
    assert not any(e["uploaded"] for e in again) and sum(e["bytes_sent"] for e in again) == 0

    down = storage.download_tree(location, tmp_path / "copy")
    for name, data in files.items():
        assert (tmp_path / "copy" / name).read_bytes() == data
    assert all(e["sha256"] == hashlib.sha256(files[e["url"].split("/pip/")[1]]).hexdigest() for e in down)
    assert not any(e["downloaded"] for e in storage.download_tree(location, tmp_path / "copy"))


def test_multipart_upload_resumes_with_only_the_missing_parts(storage, tmp_path, monkeypatch):
    from charforge.driver.storage import S3Location, S3Storage, StorageError

    big = tmp_path / "lora.safetensors"
    data = hashlib.sha256(b"x").digest() * 160  # 5120 bytes: 5 parts of 1024
    big.write_bytes(data)
    location = S3Location.parse(f"s3://{storage.bucket}/runs")
    sent: list[int] = []
    failed: list[int] = []
    real = S3Storage.upload_part

    def failing(self, bucket, key, upload_id, number, body):
        if number == 4 and not failed:
            failed.append(number)
            raise StorageError("connection dropped")
        sent.append(number)
        return real(self, bucket, key, upload_id, number, body)

    monkeypatch.setattr(S3Storage, "upload_part", failing)
    with pytest.raises(StorageError, match="dropped"):
        storage.upload_file(big, location, "lora.safetensors")
    assert sent == [1, 2, 3]
    sent.clear()
    entry = storage.upload_file(big, location, "lora.safetensors")
    assert sent == [4, 5]  # parts 1-3 were on the server already (their MD5s match): not sent again
    assert entry["bytes_sent"] == 2048
    head = storage.client.head_object(Bucket=storage.bucket, Key="runs/lora.safetensors")
    assert (
        head["ContentLength"] == len(data) and head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    )
    assert json.loads((tmp_path / "uploads.json").read_text()) == {}  # the record is gone once complete


def test_checksum_mismatch_is_refused(storage, tmp_path):
    from charforge.driver.storage import S3Location, StorageError

    storage.client.put_object(
        Bucket=storage.bucket, Key="bad/x.png", Body=b"real bytes", Metadata={"sha256": "0" * 64}
    )
    with pytest.raises(StorageError, match="checksum") as caught:
        storage.download_tree(S3Location.parse(f"s3://{storage.bucket}/bad"), tmp_path / "got")
    assert not list((tmp_path / "got").rglob("*.png*"))
    assert SECRET_KEY not in str(caught.value) and ACCESS_KEY not in str(caught.value)


def test_credentials_absent_from_errors_logs_and_manifests(storage, tmp_path, caplog):
    from charforge.driver.storage import S3Location, StorageError

    caplog.set_level(logging.DEBUG)
    _folder(tmp_path / "photos")
    entries = storage.upload_tree(tmp_path / "photos", S3Location.parse(f"s3://{storage.bucket}/p"))
    (tmp_path / "manifest.json").write_text(json.dumps(entries))
    with pytest.raises(StorageError) as caught:
        storage.upload_tree(tmp_path / "photos", S3Location.parse("s3://no-such-bucket-here/p"))
    outputs = [
        str(caught.value),
        (tmp_path / "manifest.json").read_text(),
        caplog.text,
        (tmp_path / "uploads.json").read_text() if (tmp_path / "uploads.json").exists() else "",
    ]
    for text in outputs:
        assert SECRET_KEY not in text and ACCESS_KEY not in text


@pytest.mark.parametrize("url", ["s3://", "s3:///x", "s3://b/../x", "http://b/x", "s3://b/a//c"])
def test_bad_locations_refused(url):
    from charforge.driver.errors import UsageError
    from charforge.driver.storage import S3Location

    with pytest.raises(UsageError):
        S3Location.parse(url)


def test_pipeline_photos_from_s3_and_results_up(storage, tmp_path, monkeypatch, capsys):
    """``charforge pipeline s3://... --upload-to s3://...``: the photos come down, OUT goes up (not comfyui/ or
    the server mirror), the list of what was sent lands in OUT; no credential in any output."""

    from charforge.driver.storage import S3Location
    from charforge.recipes import pipeline
    from charforge.recipes.cli import main

    photos = _folder(tmp_path / "photos")
    storage.upload_tree(tmp_path / "photos", S3Location.parse(f"s3://{storage.bucket}/in"))
    seen = {}

    def fake_run(opts, say, stderr=None):
        seen["photos"] = sorted(
            p.relative_to(opts.photos).as_posix() for p in opts.photos.rglob("*") if p.is_file()
        )
        for name in ("lora/pip.safetensors", "comfyui/models/big.bin", "server/datasets/x.png"):
            (opts.out / name).parent.mkdir(parents=True, exist_ok=True)
            (opts.out / name).write_bytes(b"x")
        return {"stages": {}, "seconds": 1}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    endpoint = storage.client.meta.endpoint_url
    code = main(
        [
            "pipeline",
            f"s3://{storage.bucket}/in",
            "--out",
            str(tmp_path / "out"),
            "--s3-endpoint",
            endpoint,
            "--upload-to",
            f"s3://{storage.bucket}/results/run1",
        ]
    )
    assert code == 0
    assert seen["photos"] == sorted(photos)
    keys = sorted(
        o["Key"]
        for o in storage.client.list_objects_v2(Bucket=storage.bucket, Prefix="results/").get("Contents", [])
    )
    assert "results/run1/lora/pip.safetensors" in keys
    assert not [k for k in keys if k.startswith(("results/run1/comfyui", "results/run1/server"))]
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, (tmp_path / "out" / "s3_manifest.json").read_text()):
        assert SECRET_KEY not in text and ACCESS_KEY not in text


def test_pipeline_model_manifest_from_s3(storage, tmp_path, monkeypatch):
    """``--models s3://bucket/key``: the manifest comes down into OUT (checked by its sha256) and the run reads
    that copy; a second run finds it current and fetches nothing; a key that does not exist stops the run."""
    from charforge.common.transfer import load_model_manifest
    from charforge.driver.storage import S3Location, StorageError
    from charforge.recipes import pipeline
    from charforge.recipes.cli import main

    text = "models:\n  - name: base.safetensors\n    kind: checkpoints\n    url: https://example.invalid/b\n"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.yaml").write_text(text)
    storage.upload_tree(tmp_path / "m", S3Location.parse(f"s3://{storage.bucket}/config"))
    (tmp_path / "photos").mkdir()
    seen = []

    def fake_run(opts, say, stderr=None):
        seen.append([e.name for e in load_model_manifest(opts.models_manifest)])
        assert opts.models_manifest.parent.parent == opts.out
        return {"stages": {}, "seconds": 1}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    endpoint = storage.client.meta.endpoint_url
    args = ["pipeline", str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--s3-endpoint", endpoint]
    for _ in range(2):
        assert main([*args, "--models", f"s3://{storage.bucket}/config/manifest.yaml"]) == 0
    assert seen == [["base.safetensors"], ["base.safetensors"]]
    got = storage.fetch_object(
        f"s3://{storage.bucket}/config/manifest.yaml", tmp_path / "out" / "models_manifest"
    )
    assert got["downloaded"] is False
    with pytest.raises(StorageError, match="does not exist"):
        storage.fetch_object(f"s3://{storage.bucket}/config/missing.yaml", tmp_path / "x")
