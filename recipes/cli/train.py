"""``charforge train DATASET --backend replicate:OWNER/MODEL``: train a LoRA on a hosted Replicate trainer.

The driver does the remote part (:func:`charforge.driver.replicate.training.run_training`: dataset zip, trainer
inputs, follow, download, extract the LoRA). This command adds what needs the LoRA library: it checks that the
file loads the way CharForge's LoRA Info reads it (key layout, modules, finite weights, base family), copies it
into the loras folder given, and writes a character preset for it, so a Replicate-trained LoRA joins the same
library as local ones. Local training runs inside ComfyUI (the Train LoRA workflows, ``charforge pipeline``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path
from typing import Any

EXIT_BAD_LORA = 1


def register(sub: Any, *, server: argparse.ArgumentParser, output: Any) -> None:
    """Add ``charforge train``."""
    del output
    train = sub.add_parser("train", parents=[server], help="train a LoRA on a hosted trainer (Replicate)",
                           description="Zip a prepared dataset (images + .txt captions), train a LoRA on a Replicate "
                                       "trainer, download it, check that it loads, and write a character preset.")
    train.add_argument("dataset", type=Path, help="folder of training images and same-named .txt captions")
    train.add_argument("--backend", required=True, metavar="replicate:OWNER/MODEL[:VERSION]",
                       help="the trainer (or a profile with a replicate section naming it)")
    train.add_argument("--destination", required=True, metavar="OWNER/NAME",
                       help="your Replicate model that receives the trained version (it must exist)")
    train.add_argument("--trigger-word", required=True, help="the word that calls up the character")
    train.add_argument("--name", help="character preset name (default: the trigger word)")
    train.add_argument("--steps", type=int)
    train.add_argument("--rank", type=int, help="LoRA rank")
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--resolution", help="training resolution(s), e.g. 1024 or 512,768,1024")
    train.add_argument("--input", action="append", default=[], metavar="KEY=VALUE",
                       help="any other trainer input (JSON values: 4, true, \"text\")")
    train.add_argument("--base-model", choices=("sd15", "sdxl", "flux"),
                       help="the family the LoRA must be for (checked on the downloaded file)")
    train.add_argument("--out", type=Path, default=Path("output/train"), metavar="DIR",
                       help="where the LoRA and the training record go (default: output/train)")
    train.add_argument("--loras-dir", type=Path, help="also copy the LoRA here (your ComfyUI models/loras)")
    train.add_argument("--characters-dir", type=Path,
                       help="write the preset here (default: the characters folder of the models directory)")
    train.add_argument("--timeout", type=float, metavar="S", help="cancel the training after S seconds")
    train.set_defaults(func=cmd_train)


def _extra_inputs(items: list[str]) -> dict[str, Any]:
    from charforge.driver.errors import UsageError
    from charforge.driver.workflow.overrides import parse_value

    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--input {item!r}: write KEY=VALUE")
        extra[key.strip()] = parse_value(value)
    return extra


def check_lora(path: Path, base_model: str | None) -> tuple[Any, list[str]]:
    """CharForge's LoRA Info on the file, and the problems that make it unusable (empty list: it loads)."""
    from charforge.engine.library.inspect import inspect_lora

    try:
        info = inspect_lora(path)
    except (OSError, ValueError) as exc:
        return None, [f"not a LoRA CharForge can read: {exc}"]
    problems = []
    if info.modules == 0:
        problems.append("it holds no LoRA modules")
    problems += [n for n in info.notes if "NaN" in n or "Inf" in n or "non-finite" in n]
    family = info.base_model
    if base_model in ("sd15", "sdxl") and family != base_model:
        problems.append(f"it is for {family}, not {base_model}")
    if base_model == "flux" and family in ("sd15", "sdxl"):
        problems.append(f"it is for {family}, not flux")
    return info, problems


def cmd_train(args: argparse.Namespace, out: Any) -> int:
    from charforge.driver.config import resolve_replicate
    from charforge.driver.errors import ConfigError
    from charforge.driver.replicate.training import TrainingParams, run_training
    from charforge.engine.library.characters import save_training_character

    settings = resolve_replicate(args.backend, profile=args.profile, config_path=args.config)
    if settings is None:
        raise ConfigError(f"--backend {args.backend!r}: only Replicate trainers (replicate:OWNER/MODEL) train "
                          "remotely; local training runs in ComfyUI (the Train LoRA workflows, charforge pipeline)")
    out.secrets = [*out.secrets, *settings.secrets()]
    params = TrainingParams(args.trigger_word, steps=args.steps, rank=args.rank, learning_rate=args.learning_rate,
                            resolution=args.resolution, extra=_extra_inputs(args.input))

    def on_update(training: Any, lines: list[str]) -> None:
        if not lines:
            out.note(f"training {training.id}: {training.status}")
        for line in lines[-20:]:
            out.note(f"  {line}")

    outcome = asyncio.run(run_training(settings, args.dataset, args.destination, params, args.out,
                                       timeout=args.timeout, on_update=on_update))
    info, problems = check_lora(outcome.lora, args.base_model)
    if problems:
        out.error(RuntimeError(f"training {outcome.training.id} finished, but {outcome.lora} cannot be used: "
                               + "; ".join(problems)), EXIT_BAD_LORA)
        return EXIT_BAD_LORA
    lora = outcome.lora
    if args.loras_dir is not None:
        args.loras_dir.mkdir(parents=True, exist_ok=True)
        lora = Path(shutil.copy2(outcome.lora, args.loras_dir / outcome.lora.name))
    family = info.base_model if info.base_model in ("sd15", "sdxl") else ""
    preset = save_training_character(args.name or args.trigger_word, lora.name, args.trigger_word,
                                     base_model=family, folder=args.characters_dir)
    lines = [f"trained {lora.name} on {settings.model} (training {outcome.training.id}, "
             f"{outcome.images} images, {outcome.captions} captions)",
             f"  ran {outcome.predict_time or 0:.0f} s" + (f", about ${outcome.cost_usd:.4f}"
                                                             if outcome.cost_usd is not None else ""),
             f"  LoRA: {lora} ({info.format}, {info.modules} modules, base {info.base_model})",
             f"  new version: {outcome.new_version or '-'}", f"  {preset}"]
    if not family:
        lines.append("  note: CharForge's library checks SD1.5/SDXL shapes; this LoRA's base was not verified "
                     "(use it with workflows for its own base model)")
    out.result("\n".join(lines), training_id=outcome.training.id, lora=str(lora), format=info.format,
               base_model=info.base_model, modules=info.modules, new_version=outcome.new_version,
               predict_time=outcome.predict_time, cost_usd=outcome.cost_usd, character=preset)
    return 0
