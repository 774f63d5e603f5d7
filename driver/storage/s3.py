"""S3-compatible storage through boto3 (AWS S3, Cloudflare R2, MinIO, RunPod network volumes' S3 API).

* Credentials come from wherever boto3 finds them (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the shared files, instance roles); an endpoint other than AWS from
  ``--s3-endpoint`` or ``AWS_ENDPOINT_URL`` (``CHARFORGE_S3_ENDPOINT`` too). They are never printed: every
  message passes through :func:`~charforge.driver.secrets.mask` with the live credentials.
* Every object written carries its sha256 in its metadata (``x-amz-meta-sha256``); an upload of a file whose
  object already has that checksum sends nothing, and a download is checked against it (or against the ETag
  of a single-part object) and refused on a mismatch, leaving no file behind.
* Files larger than ``part_size`` go up as multipart uploads. An interrupted one is resumed: the upload id
  started for these bytes (by sha256) is kept in a small local record (``~/.cache/charforge/s3-uploads.json``,
  no credentials in it); when S3 still lists it as open, its parts are listed, each part already there whose
  MD5 matches the local bytes is kept, and only the rest is sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from charforge.common.transfer import sha256_file

from ..errors import ConfigError, DriverError, UsageError
from ..secrets import mask

DEFAULT_PART_SIZE = 8 * 1024 * 1024
ENDPOINT_VARS = ("CHARFORGE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(DriverError):
    """An S3 request failed or an object is not what its checksum says."""

    exit_code = 3


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix``."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not url.startswith("s3://"):
            raise UsageError(f"{url!r} is not an s3://bucket/prefix location")
        bucket, _, prefix = url[5:].partition("/")
        if not bucket:
            raise UsageError(f"{url!r} names no bucket")
        prefix = prefix.strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise UsageError(f"{url!r}: the prefix must not contain empty, '.' or '..' parts")
        return cls(bucket, prefix)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def quiet_botocore() -> None:
    """botocore's DEBUG log holds signed request headers (the access key id) and credential lookups: keep its
    loggers at WARNING whatever the root logger is set to."""
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


def is_s3(value: str | os.PathLike | None) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class S3Storage:
    """One S3-compatible service. ``client`` may be given (tests, custom sessions); otherwise one is made
    from boto3's usual configuration, `endpoint_url`, `region` and `profile`."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        client: Any = None,
        record: str | Path | None = None,
    ) -> None:
        self.part_size = part_size
        self.record = Path(record) if record else Path.home() / ".cache" / "charforge" / "s3-uploads.json"
        self._secrets: list[str] = []
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise ConfigError("S3 storage needs boto3: pip install 'charforge[s3]'") from None
            quiet_botocore()
            session = boto3.session.Session(profile_name=profile, region_name=region)
            endpoint_url = endpoint_url or next(
                (os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None
            )
            client = session.client(
                "s3",
                endpoint_url=endpoint_url,
                config=Config(
                    retries={"max_attempts": 5, "mode": "standard"},
                    s3={"addressing_style": "path" if endpoint_url else "auto"},
                ),
            )
            credentials = session.get_credentials()
            if credentials is not None:
                frozen = credentials.get_frozen_credentials()
                self._secrets = [s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s]
        self.client = client

    # ---- errors --------------------------------------------------------------------------------------------

    def _fail(self, what: str, exc: BaseException) -> StorageError:
        detail = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
        text = f"{detail.get('Code')}: {detail.get('Message')}" if detail else str(exc)
        return StorageError(mask(f"{what}: {text}", self._secrets))

    def _call(self, what: str, function: Callable[..., Any], **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return function(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(what, exc) from None

    def _head(self, bucket: str, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(f"HEAD s3://{bucket}/{key}", exc) from None

    # ---- upload --------------------------------------------------------------------------------------------

    def upload_file(self, path: str | Path, location: S3Location, relative: str) -> dict[str, Any]:
        """Put one file at ``location/relative``; returns its manifest entry (``uploaded`` False when the
        object already had this sha256)."""
        path = Path(path)
        key = location.key(relative)
        size, sha = path.stat().st_size, sha256_file(path)
        entry = {
            "path": str(path),
            "url": f"s3://{location.bucket}/{key}",
            "size": size,
            "sha256": sha,
            "uploaded": False,
            "bytes_sent": 0,
        }
        head = self._head(location.bucket, key)
        if (
            head is not None
            and head.get("Metadata", {}).get("sha256") == sha
            and head.get("ContentLength") == size
        ):
            return entry
        if size <= self.part_size:
            with open(path, "rb") as handle:
                self._call(
                    f"uploading {path.name} to s3://{location.bucket}/{key}",
                    self.client.put_object,
                    Bucket=location.bucket,
                    Key=key,
                    Body=handle.read(),
                    Metadata={"sha256": sha},
                )
            entry.update(uploaded=True, bytes_sent=size)
        else:
            entry.update(uploaded=True, bytes_sent=self._multipart(path, location.bucket, key, size, sha))
        head = self._head(location.bucket, key)
        if head is None or head.get("ContentLength") != size or head.get("Metadata", {}).get("sha256") != sha:
            raise StorageError(f"s3://{location.bucket}/{key} does not hold the {size} bytes just uploaded")
        return entry

    def _records(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.record.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _remember(self, where: str, value: dict[str, str] | None) -> None:
        records = self._records()
        if value is None:
            records.pop(where, None)
        else:
            records[where] = value
        self.record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_name(self.record.name + ".tmp")
        tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
        os.replace(tmp, self.record)

    def _open_upload(self, bucket: str, key: str, sha: str) -> str | None:
        """The id of the unfinished multipart upload of these bytes (this sha256) to `key`, if S3 still has it."""
        record = self._records().get(f"s3://{bucket}/{key}")
        if not record or record.get("sha256") != sha:
            return None
        answer = self._call(
            f"listing uploads of s3://{bucket}/{key}",
            self.client.list_multipart_uploads,
            Bucket=bucket,
            Prefix=key,
        )
        open_ids = {u["UploadId"] for u in answer.get("Uploads", []) if u.get("Key") == key}
        return record["upload_id"] if record.get("upload_id") in open_ids else None

    def _multipart(self, path: Path, bucket: str, key: str, size: int, sha: str) -> int:
        where = f"s3://{bucket}/{key}"
        upload_id = self._open_upload(bucket, key, sha)
        done: dict[int, str] = {}
        if upload_id is not None:
            pages = self.client.get_paginator("list_parts").paginate(
                Bucket=bucket, Key=key, UploadId=upload_id
            )
            try:
                for page in pages:
                    for part in page.get("Parts", []):
                        done[int(part["PartNumber"])] = str(part["ETag"]).strip('"')
            except Exception as exc:  # noqa: BLE001 - botocore's errors, masked
                raise self._fail(f"listing the parts of {where}", exc) from None
        else:
            answer = self._call(
                f"starting the upload of {where}",
                self.client.create_multipart_upload,
                Bucket=bucket,
                Key=key,
                Metadata={"sha256": sha},
            )
            upload_id = answer["UploadId"]
            self._remember(where, {"upload_id": upload_id, "sha256": sha})
        sent = 0
        parts = []
        with open(path, "rb") as handle:
            number = 0
            while True:
                data = handle.read(self.part_size)
                if not data:
                    break
                number += 1
                md5 = _md5(data)
                if done.get(number) != md5:
                    answer = self.upload_part(bucket, key, upload_id, number, data)
                    sent += len(data)
                    md5 = str(answer["ETag"]).strip('"')
                parts.append({"PartNumber": number, "ETag": f'"{md5}"'})
        self._call(
            f"finishing the upload of {where}",
            self.client.complete_multipart_upload,
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
        self._remember(where, None)
        return sent

    def upload_part(self, bucket: str, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        """One part of a multipart upload (its own method: the unit that is resumed)."""
        return self._call(
            f"uploading part {number} of s3://{bucket}/{key}",
            self.client.upload_part,
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
        )

    def upload_tree(
        self,
        folder: str | Path,
        location: S3Location,
        on_file: Callable[[dict[str, Any]], None] | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> list[dict[str, Any]]:
        """Upload every file under `folder` (hidden ones and top-level folders named in `exclude` left out)
        below `location`, keeping the layout."""
        folder = Path(folder)
        entries = []
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if (
                not path.is_file()
                or any(part.startswith(".") for part in rel.split("/"))
                or rel.split("/")[0] in exclude
                or path.name.endswith(".part")
            ):
                continue
            entry = self.upload_file(path, location, rel)
            entries.append(entry)
            if on_file is not None:
                on_file(entry)
        return entries

    # ---- download ------------------------------------------------------------------------------------------

    def list_objects(self, location: S3Location) -> list[dict[str, Any]]:
        prefix = location.key("") if location.prefix else ""
        items = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=location.bucket, Prefix=prefix
            ):
                items += page.get("Contents", [])
        except Exception as exc:  # noqa: BLE001 - botocore's errors, masked
            raise self._fail(f"listing {location}", exc) from None
        return items

    def download_file(self, location: S3Location, key: str, target: str | Path) -> dict[str, Any]:
        """Download one object into `target` (resumed from ``target.part`` with a Range request), checked
        against the sha256 in its metadata, or the ETag of a single-part object."""
        target = Path(target)
        where = f"s3://{location.bucket}/{key}"
        head = self._head(location.bucket, key)
        if head is None:
            raise StorageError(f"{where} does not exist")
        size = int(head["ContentLength"])
        sha = head.get("Metadata", {}).get("sha256", "")
        etag = str(head.get("ETag", "")).strip('"')
        entry = {"url": where, "path": str(target), "size": size, "sha256": sha, "downloaded": False}
        if target.is_file() and target.stat().st_size == size and sha and sha256_file(target) == sha:
            return entry
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            partial.unlink()
            have = 0
        if have < size:
            extra = {"Range": f"bytes={have}-"} if have else {}
            answer = self._call(
                f"downloading {where}", self.client.get_object, Bucket=location.bucket, Key=key, **extra
            )
            with open(partial, "ab" if have else "wb") as handle:
                for block in answer["Body"].iter_chunks(1 << 20):
                    handle.write(block)
        elif not partial.exists():
            partial.write_bytes(b"")
        digest = sha256_file(partial)
        ok = digest == sha if sha else ("-" in etag or _md5(partial.read_bytes()) == etag)
        if partial.stat().st_size != size or not ok:
            partial.unlink(missing_ok=True)
            raise StorageError(
                f"{where}: the downloaded bytes do not match its checksum "
                f"({'sha256 ' + sha if sha else 'ETag ' + etag}); the file was removed"
            )
        os.replace(partial, target)
        entry.update(sha256=digest, downloaded=True)
        return entry

    def fetch_object(self, url: str, folder: str | Path) -> dict[str, Any]:
        """One object, ``s3://bucket/key``, downloaded into `folder` under the key's last name (a model manifest
        kept on S3): checked and resumed as :meth:`download_file`; nothing is fetched when the copy is current."""
        location = S3Location.parse(url)
        name = PurePosixPath(location.prefix).name
        if not name:
            raise UsageError(f"{url!r} names a bucket, not a file (s3://bucket/path/manifest.yaml)")
        return self.download_file(location, location.prefix, Path(folder) / name)

    def download_tree(
        self, location: S3Location, folder: str | Path, suffixes: frozenset[str] | None = None
    ) -> list[dict[str, Any]]:
        """Download every object below `location` into `folder` (keys become relative paths; a key that would
        leave `folder` is refused). `suffixes` keeps only those file types."""
        folder = Path(folder)
        base = location.key("") if location.prefix else ""
        entries = []
        for item in self.list_objects(location):
            key = item["Key"]
            rel = PurePosixPath(key[len(base) :])
            if not rel.parts or any(p in ("", ".", "..") for p in rel.parts) or key.endswith("/"):
                continue
            if suffixes is not None and rel.suffix.lower() not in suffixes:
                continue
            entries.append(self.download_file(location, key, folder.joinpath(*rel.parts)))
        return entries
