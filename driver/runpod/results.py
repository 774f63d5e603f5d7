"""Training on a RunPod serverless endpoint: the LoRA and run folder come home through S3-compatible storage.

worker-comfyui returns only the images of a job, and the worker's disk goes away with it, so a Train LoRA run
must leave the worker by itself. For each training node of a job, :func:`add_store_nodes` adds CharForge's
*Send Training to Storage* node (``nodes/storage.py``), wired to the node's run, with a destination of its own
below the endpoint's results location (``runpod.results`` in the profile, or ``$CHARFORGE_SERVERLESS_RESULTS``:
``s3://bucket/prefix``). On the worker that node sends the LoRA and the run folder there with the worker's own
credentials (the endpoint's environment) and shows a small receipt PNG holding, in a text chunk, the Train
LoRA text with the run folder's place on S3. That image is what the worker returns; :func:`receipt` reads it
back, and the batch runner then brings the run home from storage like any trained LoRA
(:func:`charforge.driver.sync.training.bring_training_home`), checked by the sha256 of each object.

The dataset goes the other way: a training node's ``dataset_folder`` that is a folder on this machine is sent
to ``<results>/datasets/<name>-<fingerprint>`` (:func:`dataset_location`), and one that is already an ``s3://``
location is used as it is; :func:`add_fetch_nodes` puts a *Fetch from Storage* node before the training node,
which downloads it on the worker (sha256-checked) and hands it the folder. worker-comfyui's own ``images`` input
cannot carry a dataset: it lands flat in ``input/`` (no ``<repeats>_<trigger class>/`` folders, no captions).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import uuid
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from charforge.common.transfer import (
    FETCH_NODE_CLASS,
    OUTPUT_VALUES,
    OUTPUTS_NODE_CLASS,
    RECEIPT_KEY,
    RECEIPT_PREFIX,
    STORE_NODE_CLASS,
    output_input_name,
    relative_parts,
    sha256_file,
)

from ..errors import UsageError
from ..outputs import DownloadedFile, OutputFile
from ..sync.training import TRAIN_NODE_CLASSES

RESULTS_ENV = "CHARFORGE_SERVERLESS_RESULTS"
_PNG = b"\x89PNG\r\n\x1a\n"


def results_location(options: dict[str, Any] | None = None) -> str | None:
    """Where a serverless endpoint's trained runs go: the profile's ``runpod.results`` or
    ``$CHARFORGE_SERVERLESS_RESULTS`` (an ``s3://bucket/prefix``), None when neither is set."""
    value = str((options or {}).get("results") or os.environ.get(RESULTS_ENV) or "").strip().rstrip("/")
    if value and not value.startswith("s3://"):
        raise UsageError(f"runpod.results / {RESULTS_ENV} must be s3://bucket/prefix, not {value!r}")
    return value or None


def add_store_nodes(prompt: dict[str, Any], results: str | None) -> dict[str, Any]:
    """`prompt` with a Send Training to Storage node after each training node that has none (a new destination
    below `results` for each submission). Raises :class:`UsageError` naming the fixes when the job trains and no
    results location is set: its LoRA would be lost with the worker."""
    trains = _train_nodes(prompt)
    if not trains:
        return prompt
    if results is None:
        raise UsageError(
            "this job trains a LoRA, and a RunPod serverless worker returns only images and loses its disk: "
            f"the LoRA would never come home. Set runpod.results in the profile (or {RESULTS_ENV}) to "
            "s3://bucket/prefix and give the endpoint credentials for it in its environment (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, and AWS_ENDPOINT_URL for R2, MinIO or RunPod volumes), with CharForge and "
            "boto3 in the worker image; or train on a pod (--server runpod-pod:POD_ID)"
        )
    linked = {
        str(node["inputs"]["run"][0])
        for node in prompt.values()
        if isinstance(node, dict)
        and node.get("class_type") == STORE_NODE_CLASS
        and isinstance((node.get("inputs") or {}).get("run"), list)
    }
    new = dict(prompt)
    for node_id in trains:
        if node_id in linked:
            continue
        new[f"charforge_store_{node_id}"] = {
            "class_type": STORE_NODE_CLASS,
            "inputs": {"run": [node_id, 1], "destination": f"{results}/{uuid.uuid4().hex[:16]}"},
            "_meta": {"title": f"Send training {node_id} to storage"},
        }
    return new


def _train_nodes(prompt: dict[str, Any]) -> list[str]:
    return [
        str(node_id)
        for node_id, node in prompt.items()
        if isinstance(node, dict) and node.get("class_type") in TRAIN_NODE_CLASSES
    ]


def local_datasets(prompt: dict[str, Any]) -> dict[str, Path]:
    """Training nodes whose ``dataset_folder`` is a folder on this machine: ``{node_id: folder}`` (it goes up to
    storage and the worker fetches it)."""
    found = {}
    for node_id in _train_nodes(prompt):
        value = (prompt[node_id].get("inputs") or {}).get("dataset_folder")
        if isinstance(value, str) and value.strip() and not value.startswith("s3://"):
            folder = Path(value).expanduser()
            if folder.is_dir():
                found[node_id] = folder
    return found


def dataset_location(results: str, folder: Path) -> str:
    """Where a local dataset folder goes: ``<results>/datasets/<name>-<fingerprint>``, the fingerprint over its
    files' names and sha256 (content-addressed: an unchanged folder is found there and not sent again; a
    changed one gets a place of its own, so the worker never mixes two versions)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            digest.update(f"{rel}:{sha256_file(path)}\n".encode())
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in folder.name)[:40] or "dataset"
    return f"{results}/datasets/{name}-{digest.hexdigest()[:16]}"


def add_fetch_nodes(prompt: dict[str, Any], sources: dict[str, str] | None = None) -> dict[str, Any]:
    """`prompt` with a Fetch from Storage node before each training node whose dataset is on storage (its
    ``dataset_folder`` an ``s3://`` location, or the node's entry in `sources`), wired into ``dataset_folder``."""
    new = dict(prompt)
    for node_id in _train_nodes(prompt):
        inputs = dict(prompt[node_id].get("inputs") or {})
        value = inputs.get("dataset_folder")
        source = (sources or {}).get(node_id) or (
            value if isinstance(value, str) and value.startswith("s3://") else None
        )
        if source is None:
            continue
        fetch_id = f"charforge_fetch_{node_id}"
        new[fetch_id] = {
            "class_type": FETCH_NODE_CLASS,
            "inputs": {"source": source, "folder_name": ""},
            "_meta": {"title": f"Fetch the dataset of {node_id}"},
        }
        inputs["dataset_folder"] = [fetch_id, 0]
        new[node_id] = {**prompt[node_id], "inputs": inputs}
    return new


def png_text(data: bytes, key: str) -> str | None:
    """The value of the PNG text chunk `key` (``tEXt``, ``zTXt`` or uncompressed ``iTXt``), None without one."""
    if not data.startswith(_PNG):
        return None
    pos = len(_PNG)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IEND":
            break
        name, _, rest = body.partition(b"\0")
        if name.decode("latin-1") != key:
            continue
        if kind == b"tEXt":
            return rest.decode("latin-1")
        if kind == b"zTXt" and rest[:1] == b"\0":
            return zlib.decompress(rest[1:]).decode("latin-1")
        if kind == b"iTXt" and rest[:1] == b"\0":
            return rest[2:].split(b"\0", 2)[-1].decode("utf-8")
    return None


def receipt(filename: str, data: bytes) -> dict[str, Any] | None:
    """The receipt a Send Training to Storage image holds, None for any other image."""
    if not filename.startswith(RECEIPT_PREFIX):
        return None
    text = png_text(data, RECEIPT_KEY)
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) and isinstance(value.get("summary"), str) else None


def stored_summary(destination: str, endpoint_url: str | None = None, storage: Any = None) -> str | None:
    """The Train LoRA text of a run found at `destination` on storage (``lora/<name>`` and ``run/<run name>/``
    below it), for a job whose receipt did not come back; None when nothing is there (blocking: boto3)."""
    from ..storage import S3Location, S3Storage

    location = S3Location.parse(destination)
    storage = storage or S3Storage(endpoint_url=endpoint_url)
    base = location.key("")
    loras, runs = set(), set()
    for item in storage.list_objects(location):
        parts = str(item["Key"])[len(base) :].split("/")
        if len(parts) == 2 and parts[0] == "lora" and parts[1].endswith(".safetensors"):
            loras.add(parts[1])
        elif len(parts) > 2 and parts[0] == "run":
            runs.add(parts[1])
    if len(loras) != 1 or len(runs) != 1:
        return None
    return f"{loras.pop()}: sent to storage; run folder {location}/run/{runs.pop()}"


# --------------------------------------------------------------------------------------------------
# What a job's CharForge nodes wrote: videos, storyboard folders, datasets and reports, score sheets

#: below a Send Outputs to Storage destination: the files (``files/<path below ComfyUI's output folder>``) and
#: the receipt listing them (the node's own layout, engine/transfer/storage.py)
FILES_PREFIX = "files/"
RECEIPT_OBJECT = "receipt.json"


def add_outputs_node(prompt: dict[str, Any], results: str | None) -> tuple[dict[str, Any], str | None]:
    """`prompt` with one Send Outputs to Storage node wired to every output of a CharForge node that names what
    the node wrote (:data:`~charforge.common.transfer.OUTPUT_VALUES`), with a new destination below `results`;
    the prompt unchanged when it has no such node or already sends its outputs. Without a results location
    the prompt is unchanged too and a warning says what stays on the worker."""
    wired: dict[str, list[Any]] = {
        output_input_name(str(node_id), index): [str(node_id), index]
        for node_id, node in sorted(prompt.items())
        if isinstance(node, dict)
        for index in sorted(OUTPUT_VALUES.get(str(node.get("class_type")), {}))
    }
    has_node = any(isinstance(n, dict) and n.get("class_type") == OUTPUTS_NODE_CLASS for n in prompt.values())
    if not wired or has_node:
        return prompt, None
    if results is None:
        classes = sorted({str(prompt[str(link[0])]["class_type"]) for link in wired.values()})
        return prompt, (
            f"what {', '.join(classes)} write(s) on the worker (videos, folders, reports, score sheets) cannot "
            f"come home without storage: set runpod.results in the profile (or {RESULTS_ENV}) to "
            "s3://bucket/prefix, with credentials for it in the endpoint's environment"
        )
    new = dict(prompt)
    new["charforge_outputs"] = {
        "class_type": OUTPUTS_NODE_CLASS,
        "inputs": {"destination": f"{results}/outputs/{uuid.uuid4().hex[:16]}", **wired},
        "_meta": {"title": "Send outputs to storage"},
    }
    return new, None


def stored_receipt(destination: str, endpoint_url: str | None = None, storage: Any = None) -> dict | None:
    """The receipt a Send Outputs to Storage node left at `destination` (``receipt.json``), for a job whose
    receipt image did not come back; None when there is none (blocking: boto3)."""
    from ..storage import S3Location, S3Storage, StorageError

    location = S3Location.parse(destination)
    storage = storage or S3Storage(endpoint_url=endpoint_url)
    with tempfile.TemporaryDirectory() as folder:
        try:
            got = storage.download_file(location, location.key(RECEIPT_OBJECT), Path(folder) / RECEIPT_OBJECT)
            value = json.loads(Path(got["path"]).read_text(encoding="ascii"))
        except (StorageError, ValueError, OSError):
            return None
    return value if isinstance(value, dict) and isinstance(value.get("files"), list) else None


def outputs_home(
    receipt: dict[str, Any], out_dir: Path, endpoint_url: str | None = None, storage: Any = None
) -> list[dict[str, Any]]:
    """Every file a receipt lists, from its destination into ``out_dir/<path below the output folder>`` (the
    layout a local run gives), each checked against its sha256; a file already there with those bytes is not
    downloaded again. Returns ``{"path", "local", "node", "class_type", "size", "sha256", "downloaded", "url"}`` per
    file. A receipt naming a path outside `out_dir` or a hidden one is refused (blocking: boto3)."""
    from ..storage import S3Location, S3Storage

    location = S3Location.parse(str(receipt["destination"]))
    storage = storage or S3Storage(endpoint_url=endpoint_url)
    done = []
    for entry in receipt.get("files") or []:
        name = str(entry.get("path") or "")
        parts = relative_parts(name)
        if parts is None or str(entry.get("key")) != FILES_PREFIX + name:
            raise UsageError(f"the receipt at {location} names {name!r}, not a plain file name: refused")
        got = storage.download_file(
            location, location.key(FILES_PREFIX + name), Path(out_dir).joinpath(*parts)
        )
        if entry.get("sha256") and got["sha256"] != entry["sha256"]:
            raise UsageError(f"{got['url']} is not the file the receipt names (sha256 differs)")
        done.append(
            {
                **got,
                "local": got["path"],
                "path": name,
                "node": str(entry.get("node") or ""),
                "class_type": entry.get("class_type"),
            }
        )
    return done


def downloaded_files(
    got: list[dict[str, Any]], out_dir: Path, prompt: dict[str, Any]
) -> list[DownloadedFile]:
    """What came home from storage as the manifest's files: each of `got` (``path`` below `out_dir`, ``node``
    or ``node_id``, ``class_type``, ``size`` or ``bytes``, ``sha256``) tied to its node and that node's title."""
    files = []
    for index, entry in enumerate(got):
        name = PurePosixPath(entry["path"])
        node_id = str(entry.get("node", entry.get("node_id")) or "")
        folder = "" if str(name.parent) == "." else str(name.parent)
        node = prompt.get(node_id)
        title = (node.get("_meta") or {}).get("title") if isinstance(node, dict) else None
        files.append(
            DownloadedFile(
                OutputFile(node_id, str(entry.get("output") or "files"), index, name.name, folder),
                Path(out_dir).joinpath(*name.parts),
                int(entry.get("size", entry.get("bytes")) or 0),
                str(entry["sha256"]),
                entry.get("class_type"),
                title,
            )
        )
    return files
