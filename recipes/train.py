"""A LoRA trained on a hosted Replicate trainer, added to the library like a local one.

The driver does the remote part (:func:`charforge.driver.replicate.training.run_training`: dataset zip, trainer
inputs, follow, download, extract). This recipe adds what needs the LoRA library: the file must load the way
CharForge's LoRA Info reads it (key layout, modules, finite weights, base family); then it is copied into the
loras folder given and a character preset is written for it. ``charforge train`` is its command; the pipeline's
training stage can call :func:`train_remote` the same way.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charforge.driver.config import ReplicateSettings
from charforge.driver.errors import DriverError
from charforge.driver.replicate.training import TrainingOutcome, TrainingParams, run_training


class UnusableLora(DriverError):
    """The training finished but its file is no LoRA CharForge can use (exit code 1, like a failed job)."""

    exit_code = 1


@dataclass
class TrainedLora:
    outcome: TrainingOutcome
    info: Any  # the LoRA Info (charforge.engine.library.inspect.LoraInfo)
    lora: Path  # in the loras folder when one was given, else in the training's output folder
    preset: str  # where the character preset went (or why it was not replaced)

    @property
    def base_model(self) -> str:
        """The preset's family: sd15 / sdxl, or empty when LoRA Info could not tell (e.g. Flux)."""
        return self.info.base_model if self.info.base_model in ("sd15", "sdxl") else ""


def check_lora(path: Path, base_model: str | None = None) -> tuple[Any, list[str]]:
    """LoRA Info on ``path`` and the problems that make it unusable (an empty list: it loads). A file with
    NaN/Inf weights or no LoRA keys is refused by LoRA Info itself."""
    from charforge.engine.library.inspect import inspect_lora

    try:
        info = inspect_lora(path)
    except (OSError, ValueError) as exc:
        return None, [f"not a LoRA CharForge can read: {exc}"]
    problems = []
    if info.modules == 0:
        problems.append("it holds no LoRA modules")
    family = info.base_model
    if base_model in ("sd15", "sdxl") and family != base_model:
        problems.append(f"it is for {family}, not {base_model}")
    if base_model == "flux" and family in ("sd15", "sdxl"):
        problems.append(f"it is for {family}, not flux")
    return info, problems


def adopt_lora(
    outcome: TrainingOutcome,
    trigger_word: str,
    *,
    name: str | None = None,
    base_model: str | None = None,
    loras_dir: Path | None = None,
    characters_dir: Path | None = None,
) -> TrainedLora:
    """Check the trained file, copy it into ``loras_dir`` and write its character preset (never replacing one);
    raises :class:`UnusableLora` (and writes nothing) when it cannot be used."""
    from charforge.engine.library.characters import save_training_character

    info, problems = check_lora(outcome.lora, base_model)
    if problems:
        raise UnusableLora(
            f"training {outcome.training.id} finished, but {outcome.lora} cannot be used: "
            + "; ".join(problems)
        )
    lora = outcome.lora
    if loras_dir is not None:
        loras_dir.mkdir(parents=True, exist_ok=True)
        lora = Path(shutil.copy2(outcome.lora, loras_dir / outcome.lora.name))
    family = info.base_model if info.base_model in ("sd15", "sdxl") else ""
    preset = save_training_character(
        name or trigger_word, lora.name, trigger_word, base_model=family, folder=characters_dir
    )
    return TrainedLora(outcome, info, lora, preset)


def train_remote(
    settings: ReplicateSettings,
    dataset: Path,
    destination: str,
    params: TrainingParams,
    out_dir: Path,
    *,
    name: str | None = None,
    base_model: str | None = None,
    loras_dir: Path | None = None,
    characters_dir: Path | None = None,
    timeout: float | None = None,
    on_update: Callable[[Any, list[str]], None] | None = None,
) -> TrainedLora:
    """Train on the Replicate trainer ``settings`` names, then :func:`adopt_lora` the result (blocking)."""
    outcome = asyncio.run(
        run_training(settings, dataset, destination, params, out_dir, timeout=timeout, on_update=on_update)
    )
    return adopt_lora(
        outcome,
        params.trigger_word,
        name=name,
        base_model=base_model,
        loras_dir=loras_dir,
        characters_dir=characters_dir,
    )
