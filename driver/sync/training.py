"""Trained LoRAs home: which LoRA and run folder a finished job trained, and both downloaded.

The Train LoRA node (``nodes/train.py``) shows one text per run, ``"<lora>.safetensors: <n> steps, final loss
<x>; run folder <server path>"`` (more ``; ...`` notes may follow). That text is in the job's history outputs,
so in its manifest's ``values`` next to the node's class: this module reads it there (no engine code needed),
and brings the LoRA (from the server's loras folders) and its run folder (below ``<output>/charforge``) home with
:func:`~charforge.driver.sync.results.download_lora` / :func:`~charforge.driver.sync.results.download_tree`:
resumed, checked by sha256, nothing downloaded twice. Used by the batch runner and by the pipeline recipe.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

from charforge.common.transfer import STORE_NODE_CLASS

from ..client.async_client import AsyncComfyClient
from ..errors import DriverError
from ..workflow.overrides import apply_overrides, parse_set
from .blocking import server_info
from .results import download_lora, download_tree

#: node classes that train a LoRA and say so in their text output
TRAIN_NODE_CLASSES = frozenset({"CharForgeTrainLoRA"})
#: nodes that sent a training run to S3-compatible storage and say so in the same words, the run folder being
#: ``s3://bucket/prefix/run/<run name>`` (a RunPod serverless worker's LoRA comes home from there)
STORED_NODE_CLASSES = frozenset({STORE_NODE_CLASS})

_SUMMARY = re.compile(r"^\s*(\S+?\.safetensors): .*?run folder (.+?)\s*(?:;\s|$)")

#: where a job's trained LoRAs go inside its folder: ``lora/<name>`` and ``lora/run/<run folder name>/``
LORA_DIR = "lora"
RUN_DIR = "run"


@dataclass(frozen=True)
class TrainedLoRA:
    """A LoRA a training node wrote: its file name in the loras folders and the run folder's server path."""

    lora: str
    run_dir: str
    node_id: str = ""

    @property
    def run_name(self) -> str:
        return _server_path(self.run_dir).name


def parse_train_summary(text: str, node_id: str = "") -> TrainedLoRA | None:
    """The LoRA and run folder named by a Train LoRA text, or None when `text` is not one."""
    found = _SUMMARY.match(str(text))
    if not found:
        return None
    return TrainedLoRA(found.group(1), found.group(2).strip(), node_id)


def trained_loras(values: dict[str, Any]) -> list[TrainedLoRA]:
    """Every LoRA trained by a job, from its text outputs by node (a manifest's ``values``: ``{node_id:
    {"class_type": ..., "text": [...]}}``); only nodes of :data:`TRAIN_NODE_CLASSES` count."""
    found = []
    for node_id, node in sorted((values or {}).items()):
        if (
            not isinstance(node, dict)
            or node.get("class_type") not in TRAIN_NODE_CLASSES | STORED_NODE_CLASSES
        ):
            continue
        for text in node.get("text") or []:
            trained = parse_train_summary(text, str(node_id))
            if trained is not None:
                found.append(trained)
    return found


def training_names(graph: dict[str, Any] | None, overrides: list[str]) -> dict[str, str]:
    """The ``output_name`` of each training node of an API `graph` once `overrides` (``NODE.INPUT=VALUE``) are
    applied: ``{node_id: name}`` (a name wired from another node, or an editor-format graph, gives nothing)."""
    if not graph:
        return {}
    try:
        prompt, _ = apply_overrides(graph, [parse_set(text) for text in overrides])
    except DriverError:
        return {}
    return {
        str(node_id): node["inputs"]["output_name"]
        for node_id, node in prompt.items()
        if isinstance(node, dict)
        and node.get("class_type") in TRAIN_NODE_CLASSES
        and isinstance((node.get("inputs") or {}).get("output_name"), str)
    }


def distinct_training_names(jobs: list[tuple[str, dict[str, Any] | None, list[str]]]) -> dict[str, list[str]]:
    """Overrides that keep the jobs of one batch from training into the same LoRA file on the server.

    `jobs` are ``(job id, API graph, overrides)``; for every training node whose ``output_name`` another job
    (or node) of the batch trains too, the job gets ``NODE.output_name=<name>_<first 8 of its id>`` (and
    ``_<node id>`` when two of its own nodes share the name): each LoRA and run folder stays its own, and
    planning the same file again gives the same names."""
    names = {job_id: training_names(graph, overrides) for job_id, graph, overrides in jobs}
    count = Counter(name for per_job in names.values() for name in per_job.values())
    extra: dict[str, list[str]] = {}
    for job_id, per_job in names.items():
        within = Counter(per_job.values())
        for node_id, name in sorted(per_job.items()):
            if count[name] > 1:
                unique = f"{name}_{job_id[:8]}" + (f"_{node_id}" if within[name] > 1 else "")
                extra.setdefault(job_id, []).append(f"{node_id}.output_name={unique}")
    return extra


def _server_path(path: str) -> PurePath:
    return PureWindowsPath(path) if "\\" in path else PurePosixPath(path)


def output_relative(server_path: str, outputs_dir: str) -> PurePosixPath:
    """`server_path` relative to the server's ``<output>/charforge`` (`outputs_dir`); :class:`DriverError` when
    it is not inside (it cannot be downloaded)."""
    path, root = _server_path(server_path), _server_path(outputs_dir)
    try:
        return PurePosixPath(*path.relative_to(root).parts)
    except ValueError:
        raise DriverError(
            f"{server_path} is not inside CharForge's output folder on the server ({outputs_dir}); "
            "it cannot be downloaded"
        ) from None


def stored(item: TrainedLoRA) -> bool:
    """Whether the run was sent to S3-compatible storage (it comes home from there, not from the server)."""
    return item.run_dir.startswith("s3://")


def _from_storage(
    item: TrainedLoRA, run_local: Path, lora_dir: Path, storage: Any
) -> tuple[dict, list[dict]]:
    """The LoRA and run folder of a stored run (``<prefix>/lora/<name>``, ``<prefix>/run/<run name>/``), each
    file checked against the sha256 in its metadata (blocking: boto3)."""
    from ..storage import S3Location, S3Storage

    run = S3Location.parse(item.run_dir)
    prefix, _, _ = run.prefix.rpartition(f"/{RUN_DIR}/")
    if not prefix or PurePosixPath(run.prefix).name != item.run_name:
        raise DriverError(f"{item.run_dir} is not a run folder sent by {STORE_NODE_CLASS} (…/run/<name>)")
    storage = storage or S3Storage()
    base = S3Location(run.bucket, prefix)
    lora = storage.download_file(base, base.key(f"lora/{item.lora}"), lora_dir / item.lora)
    tree = storage.download_tree(run, run_local)
    for got in (lora, *tree):
        got["remote"] = got["url"]
    return lora, tree


async def bring_training_home(
    client: AsyncComfyClient | None,
    trained: list[TrainedLoRA],
    folder: str | Path,
    *,
    outputs_dir: str | None = None,
    storage: Any = None,
) -> list[dict[str, Any]]:
    """Download each LoRA into ``folder/lora/`` and its run folder into ``folder/lora/run/<run name>/``.

    Returns one entry per LoRA: ``lora``, ``run_dir``, ``node_id``, ``state`` (``home``), ``lora_path`` and
    ``run_path`` (relative to `folder`), ``lora_sha256`` and ``files`` (manifest-style entries of every file,
    paths relative to `folder`). A LoRA the run folder also holds is copied locally, not downloaded twice.
    A run sent to S3-compatible storage (:func:`stored`) comes home from there with `storage` (an
    :class:`~charforge.driver.storage.S3Storage`; by default one from boto3's usual configuration); the others
    come from `client`'s transfer routes.
    """
    folder = Path(folder)
    if outputs_dir is None and any(not stored(t) for t in trained):
        if client is None:
            raise DriverError("this server cannot send files: only runs sent to storage can come home")
        outputs_dir = str((await server_info(client))["outputs_dir"])
    entries = []
    for item in trained:
        run_local = folder / LORA_DIR / RUN_DIR / item.run_name
        if stored(item):
            lora, tree_files = await asyncio.to_thread(
                _from_storage, item, run_local, folder / LORA_DIR, storage
            )
        else:
            assert client is not None
            relative = output_relative(item.run_dir, outputs_dir or "")
            lora = await download_lora(client, item.lora, folder / LORA_DIR)
            tree = await download_tree(
                client, relative.as_posix(), run_local, have={lora["sha256"]: Path(lora["path"])}
            )
            tree_files = tree.files
        files = [_entry(folder, item, "lora", 0, lora)]
        files += [_entry(folder, item, "run", i, f) for i, f in enumerate(tree_files)]
        entries.append(
            {
                "node_id": item.node_id,
                "lora": item.lora,
                "run_dir": item.run_dir,
                "state": "home",
                "lora_path": files[0]["path"],
                "lora_sha256": lora["sha256"],
                "run_path": run_local.relative_to(folder).as_posix(),
                "files": files,
            }
        )
    return entries


def _entry(folder: Path, item: TrainedLoRA, output: str, index: int, got: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": Path(got["path"]).relative_to(folder).as_posix(),
        "node_id": item.node_id,
        "class_type": "CharForgeTrainLoRA",
        "title": None,
        "output": output,
        "index": index,
        "animated": False,
        "bytes": got["size"],
        "sha256": got["sha256"],
        "server_file": {"remote": got["remote"]},
        "downloaded": got["downloaded"],
    }
