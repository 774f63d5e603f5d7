"""LoRA training on a hosted Replicate trainer: dataset archive, trainer inputs, follow, download the LoRA.

The trainer is named like any Replicate model (``replicate:OWNER/MODEL[:VERSION]``, e.g.
``replicate:ostris/flux-dev-lora-trainer``). A training needs a *destination*, a model of yours that receives the
trained version (``OWNER/NAME``, created beforehand on replicate.com). What is sent (docs/replicate.md):

* the dataset folder's images (``.png``/``.jpg``/``.jpeg``/``.webp``) and their same-named ``.txt`` captions as one
  zip, uploaded through the files API, as the trainer's images input;
* CharForge's settings under the trainer's input names (:data:`FLUX_TRAINER_INPUTS` for the ostris-style Flux
  trainers; a profile's ``replicate.training.inputs`` maps other trainers), plus any extra inputs.

The trainer's output names the new version and a ``weights`` URL (a tar or zip holding ``lora.safetensors``, or
the file itself); :func:`run_training` downloads it and extracts the LoRA. Checking that it loads and writing a
character preset need the LoRA library, so they happen in the ``charforge train`` command (recipes), not here.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from charforge.common.retry import Backoff

from ..config import ReplicateSettings
from ..errors import ExecutionError, Interrupted, JobTimeout, ProtocolError, ServerError, UsageError
from ..secrets import mask
from .api import CreateOutcomeUnknown, Prediction, ReplicateAPI
from .workflows import new_log_lines, output_urls, price_per_second, require_token

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: CharForge's setting -> the input name of the ostris-style Flux LoRA trainers on Replicate
FLUX_TRAINER_INPUTS = {
    "images": "input_images",
    "trigger_word": "trigger_word",
    "steps": "steps",
    "rank": "lora_rank",
    "learning_rate": "learning_rate",
    "resolution": "resolution",
    "autocaption": "autocaption",
}
_CREATE_RETRY = Backoff(attempts=3, base=1.0, cap=10.0)
#: the largest LoRA taken out of a weights archive (a LoRA is MBs; a bigger member is not one)
MAX_LORA_BYTES = 4 << 30


@dataclass
class TrainingParams:
    """What the user asks for, in CharForge's words; None leaves the trainer's default."""

    trigger_word: str
    steps: int | None = None
    rank: int | None = None
    learning_rate: float | None = None
    resolution: int | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingOutcome:
    training: Prediction
    lora: Path
    weights_url: str
    new_version: str | None
    predict_time: float | None
    cost_usd: float | None
    images: int
    captions: int


def dataset_archive(folder: Path) -> tuple[bytes, int, int]:
    """A zip of the folder's images and their ``.txt`` captions (same stem); ``(bytes, images, captions)``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"dataset folder {folder} does not exist")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UsageError(f"no training images (.png, .jpg, .jpeg, .webp) in {folder}")
    buffer = io.BytesIO()
    captions = 0
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for image in images:
            archive.write(image, image.name)
            caption = image.with_suffix(".txt")
            if caption.is_file():
                archive.write(caption, caption.name)
                captions += 1
    return buffer.getvalue(), len(images), captions


def trainer_input(
    params: TrainingParams, images_url: str, *, captions: bool, names: dict[str, str] | None = None
) -> dict[str, Any]:
    """The training's input: our settings under the trainer's names. Our own captions switch the trainer's
    automatic captioning off (when it has that input)."""
    names = {**FLUX_TRAINER_INPUTS, **(names or {})}
    values: dict[str, Any] = {
        "images": images_url,
        "trigger_word": params.trigger_word,
        "steps": params.steps,
        "rank": params.rank,
        "learning_rate": params.learning_rate,
        "resolution": params.resolution,
        "autocaption": False if captions else None,
    }
    body = {names[k]: v for k, v in values.items() if v is not None and names.get(k)}
    return {**body, **params.extra}


def weights_url(output: Any) -> str:
    """The URL of the trained weights in a training's output (``weights``, else the one file URL)."""
    if isinstance(output, dict) and isinstance(output.get("weights"), str):
        return output["weights"]
    urls = output_urls(output)
    if len(urls) == 1:
        return urls[0]
    raise ProtocolError(f"the training's output names no weights file: {mask(json.dumps(output))[:300]}")


def extract_lora(path: Path, dest: Path) -> Path:
    """The LoRA inside a downloaded weights file, moved or written to ``dest``: the file itself when it is a
    safetensors file, else the archive's ``lora.safetensors`` (or its only ``.safetensors``). Member names are
    never used as paths."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[8:9] == b"{" and not zipfile.is_zipfile(path):  # a safetensors header: 8-byte length, then JSON
        dest.parent.mkdir(parents=True, exist_ok=True)
        path.replace(dest)
        return dest
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            sizes = {
                i.filename: i.file_size for i in archive.infolist() if i.filename.endswith(".safetensors")
            }
            data = archive.read(_pick_lora(path, sizes))
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile() and m.name.endswith(".safetensors")}
            choice = members[_pick_lora(path, {n: m.size for n, m in members.items()})]
            member = tar.extractfile(choice)
            assert member is not None  # a regular file
            data = member.read()
    else:
        raise ProtocolError(
            f"the trained weights {path.name} are neither a .safetensors file nor a zip/tar archive"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def _pick_lora(path: Path, sizes: dict[str, int]) -> str:
    """``lora.safetensors`` among an archive's safetensors files, else the only one."""
    named = [m for m in sizes if PurePosixPath(m).name == "lora.safetensors"]
    choice = named[0] if named else (next(iter(sizes)) if len(sizes) == 1 else None)
    if choice is None:
        raise ProtocolError(
            f"cannot tell which file of {path.name} is the LoRA (.safetensors files: "
            f"{', '.join(sizes) or 'none'})"
        )
    if sizes[choice] > MAX_LORA_BYTES:
        raise ProtocolError(f"{choice} in {path.name} is {sizes[choice]} bytes: too large for a LoRA")
    return choice


async def run_training(
    settings: ReplicateSettings,
    dataset: Path,
    destination: str,
    params: TrainingParams,
    out_dir: Path,
    *,
    timeout: float | None = None,
    poll_interval: float | None = None,
    on_update: Callable[[Prediction, list[str]], None] | None = None,
    api: ReplicateAPI | None = None,
) -> TrainingOutcome:
    """Zip ``dataset``, start a training of ``settings``' trainer into ``destination``, follow it, download the
    weights into ``out_dir`` and extract the LoRA (``out_dir/<trigger>-<training id>.safetensors``).

    A lost answer to the create request is resolved by listing recent trainings for our uploaded archive's URL,
    never by creating a second training. ``timeout`` cancels the training (:class:`JobTimeout`).
    """
    require_token(settings)
    own = api is None
    api = api or ReplicateAPI(settings.token, base_url=settings.api_url)
    options = dict(settings.options.get("training") or {})
    interval = float(poll_interval or settings.options.get("poll_interval", 5.0))
    try:
        version = settings.version or await api.latest_version(settings.model)
        archive, images, captions = dataset_archive(dataset)
        upload = await api.upload_file(
            archive,
            f"{Path(dataset).name or 'dataset'}.zip",
            "application/zip",
            metadata={"charforge": "training dataset"},
        )
        images_url = upload["urls"]["get"]
        body = trainer_input(
            params, images_url, captions=captions == images, names=dict(options.get("inputs") or {})
        )
        started = time.time()
        training = await _create(api, settings.model, version, destination, body, images_url, started)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        seen = ""
        while True:
            if on_update is not None and (training.logs != seen or not seen):
                on_update(training, new_log_lines(seen, training.logs))
            seen = training.logs or seen
            if training.terminal:
                break
            if deadline is not None and loop.time() >= deadline:
                await api.cancel_training(training.id)
                raise JobTimeout(
                    f"training {training.id} did not finish within {timeout:g} s; it was canceled",
                    prompt_id=training.id,
                    seconds=float(timeout or 0),
                )
            await asyncio.sleep(
                interval if deadline is None else min(interval, max(0.0, deadline - loop.time()))
            )
            training = await api.training(training.id)
        if training.status == "canceled":
            raise Interrupted(f"training {training.id} was canceled", prompt_id=training.id)
        if training.status == "failed":
            tail = "\n".join(training.logs.strip().splitlines()[-15:])
            raise ExecutionError(
                prompt_id=training.id,
                node_id=None,
                node_type=None,
                exception_type="TrainingFailed",
                exception_message=mask(
                    f"{training.error or 'the training failed'}"
                    + (f"\nlast log lines:\n{tail}" if tail else "")
                ),
            )
        url = weights_url(training.output)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{_safe(params.trigger_word) or 'lora'}-{training.id}"
        raw = out_dir / f"{stem}.download"
        await api.download(url, raw)
        lora = extract_lora(raw, out_dir / f"{stem}.safetensors")
        raw.unlink(missing_ok=True)
        price, _ = price_per_second(settings)
        ran = training.predict_time
        new_version = training.output.get("version") if isinstance(training.output, dict) else None
        outcome = TrainingOutcome(
            training,
            lora,
            url,
            new_version,
            ran,
            None if price is None or ran is None else ran * price,
            images,
            captions,
        )
        record = {
            "training_id": training.id,
            "trainer": settings.model,
            "trainer_version": version,
            "destination": destination,
            "new_version": new_version,
            "lora": lora.name,
            "predict_time": ran,
            "cost_usd": outcome.cost_usd,
            "images": images,
            "captions": captions,
            "input": {k: v for k, v in body.items() if k != FLUX_TRAINER_INPUTS["images"]},
        }
        (out_dir / f"{stem}.training.json").write_text(
            mask(json.dumps(record, indent=2)) + "\n", encoding="utf-8"
        )
        return outcome
    finally:
        if own:
            await api.close()


async def _create(
    api: ReplicateAPI,
    model: str,
    version: str,
    destination: str,
    body: dict[str, Any],
    images_url: str,
    started: float,
) -> Prediction:
    """Create the training; when the answer is lost, look for it (by its unique dataset URL) before retrying."""
    for attempt in range(_CREATE_RETRY.attempts):
        try:
            return await api.create_training(model, version, destination, body)
        except CreateOutcomeUnknown:
            found = await api.find(
                "trainings", lambda e: images_url in json.dumps(e.get("input") or {}), since=started
            )
            if found is not None:
                return found
            if _CREATE_RETRY.is_last(attempt):
                raise
            await asyncio.sleep(_CREATE_RETRY.delay(attempt))
        except ServerError as exc:
            if exc.status == 422 and "destination" in str(exc):
                raise UsageError(
                    f"{mask(str(exc))}\ncreate the destination model first on replicate.com (or "
                    f"with POST /v1/models), then train into it: {destination}"
                ) from None
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text.strip())[:40].strip("-")
