"""The run folder: one per training, everything a user (or a resume) needs.

::

    <runs dir>/<run name>/
        config.json       the TrainConfig, base model, dataset summary, versions
        status.json       state (queued / running / completed / failed / cancelled), step, loss, ETA
        metrics.csv       step, loss, lr, steps_per_second, epoch, elapsed_seconds
        loss.png          the loss curve
        samples/          step_000250_0.png ... (fixed seeds, the trigger word in the prompt)
        checkpoints/      <run name>_step000500.safetensors ...
        state.pt          resumable state: LoRA weights, optimizer, schedule, RNG, step, data position
        origin.json       where the run was queued from (a ComfyUI prompt and its id), when known
        scores.json       identity / CLIP scores per sampled step, when Pick Checkpoint scored the samples
        <run name>.safetensors   the final LoRA (also copied into ComfyUI's loras folder)

Every file is written to a temporary name and moved into place (``os.replace``), so a crash or a
cancel never leaves half a state or half a LoRA. On resume, metrics rows after the resumed step are
dropped, so repeated resumes add up to one clean history.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

STATES = ("queued", "running", "completed", "failed", "cancelled")
METRICS_FIELDS = ("step", "loss", "lr", "steps_per_second", "epoch", "elapsed_seconds")
STALE_AFTER_SECONDS = 120.0

# Run folders being trained by this process (a "running" status elsewhere is a process that died).
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to a temporary file next to `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class MetricsRow:
    step: int
    loss: float
    lr: float
    steps_per_second: float
    epoch: int
    elapsed_seconds: float


class RunFolder:
    """Files of one run. Create with `create` (a new folder) or `RunFolder(path)` (an existing one)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def name(self) -> str:
        return self.root.name

    config_path = property(lambda self: self.root / "config.json")
    status_path = property(lambda self: self.root / "status.json")
    metrics_path = property(lambda self: self.root / "metrics.csv")
    loss_curve_path = property(lambda self: self.root / "loss.png")
    state_path = property(lambda self: self.root / "state.pt")
    samples_dir = property(lambda self: self.root / "samples")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    lora_path = property(lambda self: self.root / f"{self.root.name}.safetensors")
    origin_path = property(lambda self: self.root / "origin.json")

    @classmethod
    def create(cls, runs_dir: str | os.PathLike, name: str) -> RunFolder:
        """A new, empty run folder named `name` (or `name`-2, -3, ... when taken)."""
        runs_dir = Path(runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        for candidate in candidate_names(name):
            try:
                (runs_dir / candidate).mkdir()
            except FileExistsError:
                continue
            folder = cls(runs_dir / candidate)
            folder.update_status(state="queued", step=0)
            return folder
        raise RuntimeError("unreachable")

    # ---------------------------------------------------------------------------- config / status

    def write_config(self, document: dict[str, Any]) -> None:
        write_atomic(self.config_path, json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text(encoding="utf-8")) if self.config_path.is_file() else {}

    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def update_status(self, **fields: Any) -> dict[str, Any]:
        status = self.read_status()
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown run state {fields['state']!r}")
        status.update(fields)
        status["name"] = self.name
        status["updated_at"] = time.time()
        write_atomic(self.status_path, json.dumps(status, indent=2, sort_keys=True, default=str) + "\n")
        return status

    def write_origin(self, origin: dict[str, Any]) -> None:
        """Record where the run was queued from (the prompt a UI queues again to resume it, and its id)."""
        write_atomic(self.origin_path, json.dumps(origin, indent=1, sort_keys=True, default=str) + "\n")

    def read_origin(self) -> dict[str, Any]:
        try:
            origin = json.loads(self.origin_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return origin if isinstance(origin, dict) else {}

    # ---------------------------------------------------------------------------- metrics

    def read_metrics(self) -> list[MetricsRow]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        with open(self.metrics_path, newline="", encoding="utf-8") as handle:
            for raw in csv.DictReader(handle):
                rows.append(
                    MetricsRow(
                        int(raw["step"]),
                        float(raw["loss"]),
                        float(raw["lr"]),
                        float(raw["steps_per_second"]),
                        int(raw["epoch"]),
                        float(raw["elapsed_seconds"]),
                    )
                )
        return rows

    def append_metrics(self, rows: Iterable[MetricsRow]) -> None:
        new = not self.metrics_path.is_file()
        with open(self.metrics_path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRICS_FIELDS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow(asdict(row))

    def truncate_metrics(self, last_step: int) -> None:
        """Drop rows after `last_step` (steps a resumed run will compute again)."""
        rows = [r for r in self.read_metrics() if r.step <= last_step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRICS_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
        write_atomic(self.metrics_path, buffer.getvalue())

    def write_loss_curve(self) -> Path:
        from .plot import loss_curve

        rows = self.read_metrics()
        image = loss_curve([r.step for r in rows], [r.loss for r in rows], title=f"{self.name} loss")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        write_atomic(self.loss_curve_path, buffer.getvalue())
        return self.loss_curve_path

    # ---------------------------------------------------------------------------- state

    def save_state(self, state: dict[str, Any]) -> Path:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(self.state_path, buffer.getvalue())
        return self.state_path

    def load_state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        # Only tensors and plain values inside (see loop.capture_rng): no arbitrary unpickling.
        return torch.load(self.state_path, map_location="cpu", weights_only=True)

    def state_step(self) -> int:
        status = self.read_status()
        return int(status.get("state_step", 0)) if self.state_path.is_file() else 0

    # ---------------------------------------------------------------------------- outputs

    def sample_path(self, step: int, index: int) -> Path:
        return self.samples_dir / f"step_{step:06d}_{index}.png"

    def samples_at(self, step: int) -> list[Path]:
        return sorted(self.samples_dir.glob(f"step_{step:06d}_*.png"))

    def latest_samples(self) -> list[Path]:
        files = sorted(self.samples_dir.glob("step_*_*.png"))
        if not files:
            return []
        last = files[-1].name.split("_")[1]
        return [f for f in files if f.name.split("_")[1] == last]

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"{self.name}_step{step:06d}.safetensors"


def candidate_names(name: str) -> Iterable[str]:
    yield name
    index = 2
    while True:
        yield f"{name}-{index}"
        index += 1


def safe_run_name(name: str) -> str:
    """A folder / file name from what the user typed (letters, digits, ``-``, ``_``, ``.``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    return cleaned[:80] or "charforge_lora"


def existing_runs(runs_dir: str | os.PathLike, name: str) -> list[RunFolder]:
    """Run folders named `name` or `name`-N, newest (highest N) first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    pattern = re.compile(re.escape(name) + r"(?:-(\d+))?")
    found = []
    for path in runs_dir.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1) or 1), RunFolder(path)))
    return [folder for _, folder in sorted(found, key=lambda x: -x[0])]


# --------------------------------------------------------------------------------------------------
# Which runs exist (GET /charforge/runs)


def mark_active(folder: RunFolder, active: bool) -> None:
    with _ACTIVE_LOCK:
        (_ACTIVE.add if active else _ACTIVE.discard)(str(folder.root.resolve()))


def is_active(folder: RunFolder) -> bool:
    """True while a thread of this process trains the run."""
    with _ACTIVE_LOCK:
        return str(folder.root.resolve()) in _ACTIVE


def list_runs(runs_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run under `runs_dir`, newest first: name, state, step, total, loss, ETA, paths.

    A run whose status says "running" but that no thread of this process trains and whose status has
    not changed for two minutes is reported as "failed" (the process ended; the run can be resumed).
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    out = []
    with _ACTIVE_LOCK:
        active = set(_ACTIVE)
    for path in runs_dir.iterdir():
        if not path.is_dir() or path.name.startswith(("_", ".")):
            continue
        folder = RunFolder(path)
        status = folder.read_status()
        if not status:
            continue
        state = status.get("state", "queued")
        if (
            state in ("running", "queued")
            and str(path.resolve()) not in active
            and time.time() - float(status.get("updated_at", 0)) > STALE_AFTER_SECONDS
        ):
            state = "failed"
            status.setdefault("error", "the process training this run ended; queue it again to resume")
        out.append(
            {
                "name": folder.name,
                "state": state,
                "step": status.get("step", 0),
                "total_steps": status.get("total_steps"),
                "loss": status.get("loss"),
                "eta_seconds": status.get("eta_seconds"),
                "phase": status.get("phase"),
                "lora": status.get("lora"),
                "error": status.get("error"),
                "updated_at": status.get("updated_at"),
                "run_dir": str(path),
                "resumable": folder.state_path.is_file() and state != "completed",
            }
        )
    return sorted(out, key=lambda r: -(r["updated_at"] or 0))


def run_details(folder: RunFolder) -> dict[str, Any]:
    """What a UI shows of one run: its list entry plus the loss history, the samples of every sampled step,
    the checkpoints, their identity / CLIP scores (``scores``, one entry per scored step, and
    ``best_scored_step``) and the settings that matter. File names are relative to the run folder."""
    [entry] = [r for r in list_runs(folder.root.parent) if r["name"] == folder.name] or [
        {"name": folder.name}
    ]
    samples: dict[int, list[str]] = {}
    for path in sorted(folder.samples_dir.glob("step_*_*.png")):
        parts = path.stem.split("_")
        if len(parts) == 3 and parts[1].isdigit():
            samples.setdefault(int(parts[1]), []).append(path.relative_to(folder.root).as_posix())
    checkpoints = []
    for path in sorted(folder.checkpoints_dir.glob("*.safetensors")):
        match = re.search(r"_step(\d+)$", path.stem)
        checkpoints.append(
            {"file": path.relative_to(folder.root).as_posix(), "step": int(match.group(1)) if match else None}
        )
    config = folder.read_config()
    settings = config.get("config", {})
    origin = folder.read_origin()
    from ..score.sets import read_run_scores

    scores = read_run_scores(folder.root)
    return {
        **entry,
        "metrics": [{"step": r.step, "loss": r.loss, "lr": r.lr} for r in folder.read_metrics()],
        "samples": [{"step": step, "files": files} for step, files in sorted(samples.items())],
        "checkpoints": checkpoints,
        "loss_curve": folder.loss_curve_path.name if folder.loss_curve_path.is_file() else None,
        "arch": config.get("arch"),
        "base_model": Path(str(config.get("base_model", ""))).name or None,
        "trigger_word": config.get("trigger_word"),
        "rank": (settings.get("lora") or {}).get("rank"),
        "dataset_images": (config.get("dataset") or {}).get("images"),
        "prompt_id": origin.get("prompt_id"),
        "can_queue_again": bool(origin.get("prompt")),
        "scores": [entry for entry in scores.get("checkpoints", {}).values() if isinstance(entry, dict)],
        "best_scored_step": scores.get("best"),
    }


@dataclass(frozen=True)
class TrainingRun:
    """A finished (or stopped) run as nodes pass it on (``CHARFORGE_TRAINING_RUN``); JSON-ready."""

    name: str
    run_dir: str
    state: str
    step: int
    total_steps: int
    loss: float
    lora_path: str  # the LoRA in the loras folder (or the run folder's copy)
    lora_name: str  # the name ComfyUI's LoRA loaders list it under
    samples: tuple[str, ...] = ()
    loss_curve: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:  # short: ComfyUI may log values
        return f"TrainingRun({self.name!r}, {self.state}, step {self.step}/{self.total_steps}, lora={self.lora_name!r})"
