"""Files between the server itself and S3-compatible storage: what a RunPod serverless worker trained must
leave the worker before it goes away (its disk does, and worker-comfyui returns images only), and a dataset
the driver put on storage comes down to the worker (its ``images`` input lands flat in ``input/``, which a
kohya dataset with ``<repeats>_<trigger class>/`` folders cannot use).

The server's own credentials are used (never the driver's): boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, a profile, a role), else the keys worker-comfyui's own S3 upload reads
(``BUCKET_ACCESS_KEY_ID`` / ``BUCKET_SECRET_ACCESS_KEY``); the endpoint of a service other than AWS from
``CHARFORGE_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``. No message names a key.

Every object carries its sha256 in its metadata (``sha256``), as the driver's storage writes them, so the
driver's download checks each file and refuses a mismatch; an object that already holds the same bytes is not
sent again (a rerun after a cut-off upload sends only the rest). Large files go up in parts (boto3's transfer).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...common.transfer import RECEIPT_KEY, relative_parts, sha256_file
from ..control import Control

ENDPOINT_VARS = ("CHARFORGE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_S3 = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,62})(?:/(.*))?$")


class StorageFailed(Exception):
    """The destination is not usable or an upload failed (the reason never contains a credential)."""


@dataclass(frozen=True)
class Destination:
    """``s3://bucket/prefix``."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Destination:
        found = _S3.match(url.strip())
        if not found:
            raise StorageFailed(f"{url!r} is not an s3://bucket/prefix destination")
        prefix = (found.group(2) or "").strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise StorageFailed(f"{url!r}: the prefix must not contain empty, '.' or '..' parts")
        return cls(found.group(1), prefix)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def url(self, relative: str = "") -> str:
        key = self.key(relative) if relative else self.prefix
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"


def s3_client(env: Any = None) -> Any:
    """A boto3 S3 client from the server's environment (see the module docstring)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StorageFailed(
            "sending results to S3 needs boto3 in the Python that runs ComfyUI: pip install boto3"
        ) from None
    env = os.environ if env is None else env
    for name in ("botocore", "boto3", "s3transfer"):  # their DEBUG log holds signed headers
        import logging

        logging.getLogger(name).setLevel(logging.WARNING)
    endpoint = next((env[v] for v in ENDPOINT_VARS if env.get(v)), None)
    keys: dict[str, str] = {}
    if not env.get("AWS_ACCESS_KEY_ID") and env.get("BUCKET_ACCESS_KEY_ID"):
        keys = {
            "aws_access_key_id": env["BUCKET_ACCESS_KEY_ID"],
            "aws_secret_access_key": env.get("BUCKET_SECRET_ACCESS_KEY", ""),
        }
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            retries={"max_attempts": 5, "mode": "standard"},
            s3={"addressing_style": "path" if endpoint else "auto"},
        ),
        **keys,
    )


_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "BUCKET_ACCESS_KEY_ID",
    "BUCKET_SECRET_ACCESS_KEY",
)


def _error(what: str, exc: BaseException) -> StorageFailed:
    """A readable reason (S3's error code and message) with every credential of the environment hidden."""
    detail = getattr(exc, "response", None)
    error = detail.get("Error", {}) if isinstance(detail, dict) else {}
    text = f"{error.get('Code')}: {error.get('Message')}" if error else f"{type(exc).__name__}: {exc}"
    for name in _CREDENTIAL_VARS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return StorageFailed(f"{what}: {text[:400]}")


def send_file(client: Any, path: Path, where: Destination, relative: str) -> dict[str, Any]:
    """One file up as ``prefix/relative`` with its sha256 in the metadata; nothing is sent when the object
    already holds these bytes. Returns ``{"key", "size", "sha256", "sent"}``."""
    digest = sha256_file(path)
    key = where.key(relative)
    entry = {"key": relative, "size": path.stat().st_size, "sha256": digest, "sent": False}
    try:
        head = client.head_object(Bucket=where.bucket, Key=key)
    except Exception:  # noqa: BLE001 - botocore's not-found and access errors: upload and see
        head = None
    if head is not None and (head.get("Metadata") or {}).get("sha256") == digest:
        return entry
    try:
        client.upload_file(str(path), where.bucket, key, ExtraArgs={"Metadata": {"sha256": digest}})
    except Exception as exc:  # noqa: BLE001 - boto3/botocore errors, reported without credentials
        raise _error(f"sending {relative} to {where.url(relative)}", exc) from None
    entry["sent"] = True
    return entry


def send_tree(
    client: Any,
    files: list[tuple[Path, str]],
    where: Destination,
    control: Control | None = None,
    on_file: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Each ``(path, relative name)`` up below `where` (see :func:`send_file`); stops between files on cancel."""
    sent = []
    for number, (path, relative) in enumerate(files, 1):
        if control is not None:
            control.check()
        entry = send_file(client, path, where, relative)
        sent.append(entry)
        if on_file is not None:
            on_file(entry)
        if control is not None:
            control.progress(number, len(files), relative)
    return sent


def run_files(run_dir: Path) -> list[tuple[Path, str]]:
    """The files of a training run folder with their names relative to it (hidden files left out)."""
    return [
        (p, p.relative_to(run_dir).as_posix())
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)
    ]


def store_training(
    lora: Path,
    run_dir: Path,
    summary: str,
    destination: str,
    control: Control | None = None,
    client: Any = None,
) -> dict[str, Any]:
    """A trained LoRA and its run folder up to `destination`: ``lora/<name>`` and ``run/<run folder name>/``.

    Returns the receipt: the destination, the Train LoRA `summary` with the run folder replaced by its place on
    S3 (the text the driver reads, as it reads the node's own), and every file with size and sha256.
    """
    where = Destination.parse(destination)
    if not lora.is_file():
        raise StorageFailed(f"the LoRA {lora} is not there; nothing was sent")
    if not run_dir.is_dir():
        raise StorageFailed(f"the run folder {run_dir} is not there; nothing was sent")
    client = client if client is not None else s3_client()
    files = [(lora, f"lora/{lora.name}")]
    files += [(path, f"run/{run_dir.name}/{name}") for path, name in run_files(run_dir)]
    sent = send_tree(client, files, where, control)
    head, _, rest = summary.partition("; run folder ")
    tail = rest.partition("; ")[2]
    text = f"{head}; run folder {where.url('run/' + run_dir.name)}" + (f"; {tail}" if tail else "")
    return {
        "destination": where.url(),
        "summary": text,
        "lora": lora.name,
        "run": run_dir.name,
        "files": sent,
    }


def receipt_text(receipt: dict[str, Any]) -> str:
    """The receipt as the text stored in the PNG the node shows (ASCII JSON)."""
    return json.dumps(receipt, ensure_ascii=True, separators=(",", ":"))


__all__ = [
    "RECEIPT_KEY",
    "Destination",
    "StorageFailed",
    "fetch_tree",
    "output_files",
    "receipt_text",
    "s3_client",
    "send_tree",
    "store_outputs",
    "store_training",
]


def fetch_tree(client: Any, source: Destination, folder: Path, control: Control | None = None) -> list[dict]:
    """Every object below `source` into `folder` (keys become relative paths), each checked against the sha256
    in its metadata: a mismatch removes the file and stops. A file already there with that sha256 is kept; a
    key that would leave `folder` or name a hidden file is refused. Returns ``{"key", "size", "sha256",
    "fetched"}`` per file."""
    base = source.key("") if source.prefix else ""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=base)
        items = [item for page in pages for item in page.get("Contents", [])]
    except Exception as exc:  # noqa: BLE001 - boto3/botocore errors, reported without credentials
        raise _error(f"listing {source.url()}", exc) from None
    if not items:
        raise StorageFailed(f"{source.url()} holds no files")
    folder = Path(folder)
    done = []
    for number, item in enumerate(items, 1):
        if control is not None:
            control.check()
        relative = item["Key"][len(base) :]
        parts = relative.split("/")
        if not relative or relative.endswith("/"):
            continue
        if any(p in ("", ".", "..") or p.startswith(".") or "\\" in p for p in parts):
            raise StorageFailed(f"{source.url(relative)}: refused (a name outside the folder or hidden)")
        target = folder.joinpath(*parts)
        try:
            head = client.head_object(Bucket=source.bucket, Key=item["Key"])
        except Exception as exc:  # noqa: BLE001
            raise _error(f"reading {source.url(relative)}", exc) from None
        expected = (head.get("Metadata") or {}).get("sha256", "")
        entry = {
            "key": relative,
            "size": int(head.get("ContentLength", 0)),
            "sha256": expected,
            "fetched": False,
        }
        if not (target.is_file() and expected and sha256_file(target) == expected):
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            try:
                client.download_file(source.bucket, item["Key"], str(partial))
            except Exception as exc:  # noqa: BLE001
                partial.unlink(missing_ok=True)
                raise _error(f"fetching {source.url(relative)}", exc) from None
            digest = sha256_file(partial)
            if expected and digest != expected:
                partial.unlink(missing_ok=True)
                raise StorageFailed(
                    f"{source.url(relative)}: the bytes do not match the sha256 it was stored with; removed"
                )
            os.replace(partial, target)
            entry.update(sha256=digest, fetched=True)
        done.append(entry)
        if control is not None:
            control.progress(number, len(items), relative)
    return done


# --------------------------------------------------------------------------------------------------
# What a job's nodes wrote (Send Outputs to Storage)

#: how a node's output value names what it wrote (common.transfer.OUTPUT_VALUES)
OUTPUT_KINDS = ("file", "folder", "folder_of", "dataset", "sheet")
#: where below the destination the files go (``files/<path below ComfyUI's output folder>``) and the receipt
FILES_PREFIX = "files/"
RECEIPT_OBJECT = "receipt.json"


@dataclass(frozen=True)
class OutputValue:
    """One output value wired into Send Outputs to Storage: which node gave it and how it is read."""

    node: str
    class_type: str
    kind: str
    value: Any


def _inside(path: Path, root: Path) -> str | None:
    """`path`'s name below `root` after following links, None when it is outside, hidden or not a plain name
    (the rules of ComfyUI's ``/view`` and of the transfer routes)."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(root):
        return None
    rel = real.relative_to(root).as_posix()
    return rel if relative_parts(rel) is not None else None


def _folder_files(folder: Path, root: Path) -> list[tuple[Path, str]]:
    if _inside(folder, root) is None or not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.resolve().rglob("*")):
        rel = _inside(path, root)
        if rel is not None and path.is_file():
            found.append((path.resolve(), rel))
    return found


def _sheet_text(value: Any) -> str | None:
    text = value.to_json() if callable(getattr(value, "to_json", None)) else value
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        json.loads(text)
    except ValueError:
        return None
    return text


def output_files(
    values: list[OutputValue], output_dir: Path, sheets_dir: Path
) -> tuple[list[tuple[Path, str, OutputValue]], list[str]]:
    """The files the wired values name, each with its name below `output_dir` (ComfyUI's output folder) and
    the value that named it; a file named twice is listed once. Score sheets (JSON text) are written into
    `sheets_dir` (inside `output_dir`) as ``<node>_<class>.json`` first. Returns the files and a note for each
    value that named nothing usable (outside the output folder, missing, not JSON)."""
    root = Path(output_dir).resolve()
    files: dict[str, tuple[Path, str, OutputValue]] = {}
    notes = []
    for item in values:
        found: list[tuple[Path, str]] = []
        value = item.value
        if item.kind == "sheet":
            text = _sheet_text(value)
            if text is not None:
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{item.node}_{item.class_type}")
                sheet = Path(sheets_dir) / f"{safe}.json"
                sheet.parent.mkdir(parents=True, exist_ok=True)
                sheet.write_text(text, encoding="utf-8")
                rel = _inside(sheet, root)
                found = [(sheet.resolve(), rel)] if rel else []
        else:
            if item.kind == "dataset":
                value = getattr(value, "folder", None)
            if isinstance(value, (str, os.PathLike)) and str(value).strip():
                path = Path(value)
                if item.kind == "folder_of":
                    path = path.parent
                if path.is_dir() and item.kind != "file":
                    found = _folder_files(path, root)
                elif path.is_file():
                    rel = _inside(path, root)
                    found = [(path.resolve(), rel)] if rel else []
        if not found:
            notes.append(
                f"{item.class_type} {item.node}: nothing in the output folder to send ({value!r:.120})"
            )
        for path, rel in found:
            files.setdefault(rel, (path, rel, item))
    return list(files.values()), notes


def store_outputs(
    files: list[tuple[Path, str, OutputValue]],
    destination: str,
    control: Control | None = None,
    client: Any = None,
) -> dict[str, Any]:
    """The files up to ``<destination>/files/<name>`` (see :func:`send_file`: sha256 metadata, nothing sent
    twice) and the receipt as ``<destination>/receipt.json``. Returns the receipt: the destination, a summary
    and every file with its name below the output folder, the node and class that wrote it, size and sha256."""
    where = Destination.parse(destination)
    client = client if client is not None else s3_client()
    owners = {FILES_PREFIX + rel: item for _, rel, item in files}
    sent = send_tree(client, [(path, FILES_PREFIX + rel) for path, rel, _ in files], where, control)
    for entry in sent:
        owner = owners[entry["key"]]
        entry.update(path=entry["key"][len(FILES_PREFIX) :], node=owner.node, class_type=owner.class_type)
    nodes = len({e["node"] for e in sent})
    receipt = {
        "kind": "outputs",
        "destination": where.url(),
        "summary": f"{len(sent)} file(s) of {nodes} node(s) sent to {where.url()}",
        "files": sent,
    }
    body = receipt_text(receipt).encode("ascii")
    try:
        client.put_object(
            Bucket=where.bucket,
            Key=where.key(RECEIPT_OBJECT),
            Body=body,
            Metadata={"sha256": hashlib.sha256(body).hexdigest()},
        )
    except Exception as exc:  # noqa: BLE001 - boto3/botocore errors, reported without credentials
        raise _error(f"sending the receipt to {where.url(RECEIPT_OBJECT)}", exc) from None
    return receipt
