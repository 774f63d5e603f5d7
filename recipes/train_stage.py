"""The pipeline's training stage elsewhere than its server: on Replicate (``charforge pipeline PHOTOS --train-on
replicate:OWNER/MODEL --destination OWNER/NAME``) or on a RunPod serverless endpoint (``--train-on
runpod-serverless:ENDPOINT_ID``, :func:`stage_lora_serverless`).

The dataset and caption stages run on the ComfyUI server as always; this stage flattens the captioned dataset
(images + same-named ``.txt`` captions), trains on the hosted trainer through :func:`recipes.train.train_remote`
(zip, upload, follow, download, LoRA Info check, character preset), keeps the LoRA in ``out/lora/`` and puts it
where the generation stages look for it: copied into the loras folder of a ComfyUI the pipeline started, or
uploaded through CharForge's transfer routes (``driver/sync``) to any other server. A server that cannot take
the upload is refused before anything is trained.

Resuming: ``out/lora/replicate.json`` records the trained LoRA with its sha256 and the dataset's fingerprint;
a rerun with the same dataset and trainer whose LoRA is home and passes the check does not train again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from charforge.common.transfer import CAPTION_TYPES, sha256_file

from ..driver.errors import ConfigError, DriverError
from ..driver.sync import call, server_info, upload_lora

RECORD = "replicate.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def settings_for(opts: Any) -> Any:
    """The Replicate trainer of ``opts.train_on`` (resolved by the CLI, or here from the string)."""
    from ..driver.config import resolve_replicate

    settings = getattr(opts, "replicate", None) or resolve_replicate(opts.train_on)
    if settings is None:
        raise ConfigError(f"--train-on {opts.train_on!r}: name a Replicate trainer (replicate:OWNER/MODEL)")
    if not opts.destination:
        raise ConfigError(
            "--train-on needs --destination OWNER/NAME (your Replicate model for the new version)"
        )
    return settings


def flat_dataset(train_data_dir: Path, target: Path) -> tuple[Path, str]:
    """The images and captions under `train_data_dir` (a kohya ``img`` folder with ``N_trigger class``
    subfolders) copied flat into `target`; returns it and the dataset's fingerprint (names and sha256s)."""
    images = sorted(
        p for p in train_data_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise DriverError(f"no training images under {train_data_dir}")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    digest = hashlib.sha256()
    for number, image in enumerate(images, 1):
        stem = f"{number:04d}_{image.stem}"
        shutil.copy2(image, target / f"{stem}{image.suffix.lower()}")
        digest.update(f"{stem}{image.suffix.lower()}:{sha256_file(image)}\n".encode())
        for suffix in sorted(CAPTION_TYPES):
            caption = image.with_suffix(suffix)
            if caption.is_file():
                shutil.copy2(caption, target / f"{stem}.txt")
                digest.update(f"{stem}.txt:{sha256_file(caption)}\n".encode())
                break
    return target, digest.hexdigest()


def _reusable(record_path: Path, fingerprint: str, model: str, base_model: str) -> dict[str, Any] | None:
    """The earlier training's record when its LoRA is home, unchanged and still passes the check."""
    from .train import check_lora

    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    lora = Path(record.get("lora_path", ""))
    if record.get("dataset") != fingerprint or record.get("model") != model or not lora.is_file():
        return None
    if sha256_file(lora) != record.get("lora_sha256") or check_lora(lora, base_model)[1]:
        return None
    return record


def _check_lora_target(runner: Any, where: str) -> Path | None:
    """The base folder of a ComfyUI the pipeline started (the LoRA is copied there), else None once the server
    is known to take a LoRA through its transfer routes; refuses before anything is trained otherwise."""
    server = getattr(runner, "server", None)
    base_dir = getattr(server, "base_dir", None)
    client = runner.client
    if base_dir is None:  # a server the pipeline did not start: the LoRA goes up through the transfer routes
        try:
            info = call(client, server_info)
        except DriverError as exc:
            raise DriverError(
                f"the server {client.url} cannot receive the LoRA trained on {where} ({exc}); install or "
                "update CharForge on it, or train there (leave out --train-on). Nothing was trained."
            ) from None
        if not info.get("lora_uploads"):
            raise DriverError(
                f"the CharForge on {client.url} is too old to receive a LoRA (no LoRA upload route); update "
                "CharForge on it and restart it, or leave out --train-on. Nothing was trained."
            )
    return base_dir


def _place_lora(runner: Any, lora: Path, sha256: str, say: Any) -> str:
    """The LoRA where the generation stages look for it: copied into the loras folder of a ComfyUI the pipeline
    started, else uploaded through the transfer routes (nothing sent when the server has it)."""
    base_dir = getattr(getattr(runner, "server", None), "base_dir", None)
    if base_dir is not None:
        loras = base_dir / "models" / "loras"
        loras.mkdir(parents=True, exist_ok=True)
        placed = loras / lora.name
        if not placed.is_file() or sha256_file(placed) != sha256:
            shutil.copy2(lora, placed)
        return str(placed)
    client = runner.client
    sent = call(client, upload_lora, lora)
    where = f"models/loras/{lora.name} on {client.url}"
    say(f"LoRA on the server: {where} ({sent['sent']} bytes sent)")
    return where


def stage_lora_elsewhere(runner: Any, opts: Any, models: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The ``lora`` stage when ``opts.train_on`` names a Replicate trainer or a RunPod serverless endpoint."""
    if getattr(opts, "runpod", None) is not None or str(opts.train_on).startswith("runpod-serverless:"):
        return stage_lora_serverless(runner, opts, models, state)
    return stage_lora_replicate(runner, opts, models, state)


def stage_lora_replicate(runner: Any, opts: Any, models: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The ``lora`` stage when ``opts.train_on`` names a Replicate trainer (see the module docstring)."""
    from ..driver.replicate.training import TrainingParams
    from .train import train_remote

    settings = settings_for(opts)
    secrets = [s for s in settings.secrets() if s]

    def say(text: str) -> None:
        for secret in secrets:
            text = text.replace(secret, "***")
        runner.say(text)

    base_dir = _check_lora_target(runner, "Replicate")
    remote = getattr(runner, "remote", None)
    server_dir = state["captions"]["train_data_dir"]
    source = remote.local(server_dir) if remote is not None else Path(server_dir)
    lora_dir = opts.out / "lora"
    dataset, fingerprint = flat_dataset(source, lora_dir / "replicate_dataset")
    record_path = lora_dir / RECORD
    record = _reusable(record_path, fingerprint, settings.model, models.arch)
    if record is not None:
        say(
            f"the LoRA of training {record['training_id']} is home and checked ({record['lora_path']}): "
            "not training again"
        )
    else:

        def on_update(training: Any, lines: list[str]) -> None:
            if not lines:
                say(f"replicate training {training.id}: {training.status}")
            for line in lines[-20:]:
                say(f"  {line}")

        say(f"training on Replicate ({settings.model}) into {opts.destination}; the dataset: {dataset}")
        characters = base_dir / "models" / "charforge" / "characters" if base_dir is not None else lora_dir
        trained = train_remote(
            settings,
            dataset,
            opts.destination,
            TrainingParams(opts.trigger),
            lora_dir,
            name=opts.character,
            base_model=models.arch,
            characters_dir=characters,
            timeout=opts.stage_timeout,
            on_update=on_update,
        )
        outcome = trained.outcome
        record = {
            "model": settings.model,
            "dataset": fingerprint,
            "training_id": outcome.training.id,
            "new_version": outcome.new_version,
            "lora_path": str(trained.lora),
            "lora_sha256": sha256_file(trained.lora),
            "predict_time": outcome.predict_time,
            "cost_usd": outcome.cost_usd,
            "preset": trained.preset,
        }
        record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        say(
            f"trained {trained.lora.name} on Replicate (training {outcome.training.id}); checked with LoRA Info"
        )
    lora = Path(record["lora_path"])
    where = _place_lora(runner, lora, record["lora_sha256"], say)
    return {
        "lora_name": lora.name,
        "lora_path": str(lora),
        "lora_sha256": record["lora_sha256"],
        "server_lora": where,
        "trained_on": settings.server,
        "training_id": record["training_id"],
        "new_version": record.get("new_version"),
        "cost_usd": record.get("cost_usd"),
        "run_dir": None,
        "files": [str(lora)],
    }


SERVERLESS_DIR = "serverless"


def stage_lora_serverless(runner: Any, opts: Any, models: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The ``lora`` stage on a RunPod serverless endpoint (``--train-on runpod-serverless:ENDPOINT_ID``).

    The pipeline's Train LoRA graph runs there as a one-job batch (``OUT/lora/serverless/``, journaled: a rerun
    follows or collects the job it already sent, never trains twice): the captioned dataset goes up through
    S3-compatible storage and is fetched by the worker, the LoRA and run folder come back the same way
    (driver/runpod/results.py), checked by sha256; the LoRA then goes where the generation stages look for it.
    """
    from ..driver.batch import Batch, Job
    from ..driver.config import resolve_runpod
    from ..driver.runpod import ServerlessTarget
    from .pipeline.options import TINY_TRAIN
    from .pipeline.stages import _marked, load_stage_workflow

    settings = getattr(opts, "runpod", None) or resolve_runpod(opts.train_on)
    if settings is None or settings.kind != "serverless":
        raise ConfigError(f"--train-on {opts.train_on!r}: name a serverless endpoint (runpod-serverless:ID)")
    if models.arch not in ("sd15", "sdxl"):
        raise ConfigError(
            f"training a {models.arch} LoRA on a serverless endpoint is not wired into the pipeline; train on the "
            "server (leave out --train-on) or a pod"
        )
    _check_lora_target(runner, opts.train_on)
    remote = getattr(runner, "remote", None)
    server_dir = state["captions"]["train_data_dir"]
    dataset = remote.local(server_dir) if remote is not None else Path(server_dir)
    prompt = load_stage_workflow("train_lora_sd15" if models.arch == "sd15" else "train_lora_sdxl")
    inputs = prompt["1"]["inputs"]
    inputs.update(
        base_model=models.train_base,
        dataset_folder=str(dataset),
        trigger_word=opts.trigger,
        output_name=_marked(opts.character, models, suffix=True),
    )
    if models.tiny:
        inputs.update(TINY_TRAIN)
    job_id = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]
    target = ServerlessTarget(settings, capacity=1)
    runner.say(f"training on {target.name}; the dataset goes up through {target.results or 'storage'}")
    folder = opts.out / "lora" / SERVERLESS_DIR
    [outcome] = list(
        Batch([Job(id=job_id, name="train", folder="train", prompt=prompt)]).run(
            [target], folder, timeout=opts.stage_timeout, on_message=runner.say
        )
    )
    if outcome.state != "done":
        raise DriverError(f"training on {target.name} {outcome.state}: {outcome.reason}")
    manifest = json.loads((outcome.folder / "manifest.json").read_text(encoding="utf-8"))
    homes = [e for e in manifest.get("training") or [] if e.get("state") == "home"]
    if not homes:
        reasons = "; ".join(str(e.get("reason") or e.get("state")) for e in manifest.get("training") or [])
        raise DriverError(
            f"the LoRA trained on {target.name} did not come home ({reasons or 'no trained LoRA reported'}); "
            "rerun to try again (the job is not sent again)"
        )
    home = homes[0]
    lora = outcome.folder / home["lora_path"]
    where = _place_lora(runner, lora, home["lora_sha256"], runner.say)
    cost = (
        target.job_cost(outcome.prompt_id) if outcome.prompt_id else None
    )  # known when followed in this run
    return {
        "lora_name": lora.name,
        "lora_path": str(lora),
        "lora_sha256": home["lora_sha256"],
        "server_lora": where,
        "trained_on": target.name,
        "job": outcome.prompt_id,
        "run_dir": home["run_dir"],
        "run_copy": str(outcome.folder / home["run_path"]),
        "cost_usd": cost,
        "files": [str(lora)],
    }
