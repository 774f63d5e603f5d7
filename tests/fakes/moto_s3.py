"""A real S3-compatible server on loopback for the storage tests: moto in server mode (small multipart parts),
with credentials in the environment and one fresh bucket per test."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

ACCESS_KEY = "AKIACHARFORGETEST01"
SECRET_KEY = "s3cr3t-charforge-test-key-0123456789"


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1; yields its endpoint URL."""
    import moto.s3.models
    from moto.server import ThreadedMotoServer

    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = 256  # small parts for tests (5 MiB on AWS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def use_s3(monkeypatch: Any, endpoint: str, name: str, endpoint_env: bool = True) -> str:
    """Point this process's AWS variables at `endpoint` (as the driver's and the worker's environment both
    would; without ``AWS_ENDPOINT_URL`` when not `endpoint_env`: the caller passes the endpoint itself) and
    create a bucket named after `name`; returns the bucket."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if endpoint_env:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"b{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def corrupt_uploads(monkeypatch: Any, suffix: str, body: bytes) -> None:
    """CharForge's storage uploads replace each object whose key ends with `suffix` by `body` right after
    sending it, keeping the metadata (so the recorded sha256 no longer matches): a damaged object on storage."""
    from charforge.engine.transfer import storage

    real_s3_client = storage.s3_client

    def corrupting_client(*args, **kwargs):
        made = real_s3_client(*args, **kwargs)
        original = made.upload_file

        def upload(path, bucket_name, key, ExtraArgs=None):  # noqa: N803 - boto3's name
            original(path, bucket_name, key, ExtraArgs=ExtraArgs)
            if key.endswith(suffix):
                made.put_object(Bucket=bucket_name, Key=key, Body=body, Metadata=ExtraArgs["Metadata"])

        made.upload_file = upload
        return made

    monkeypatch.setattr(storage, "s3_client", corrupting_client)
