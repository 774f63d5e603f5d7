"""``charforge train DATASET --backend replicate:OWNER/MODEL``: train a LoRA on a hosted Replicate trainer, check
it with LoRA Info and add it to the library with a character preset (``recipes/train.py``). Local training runs
inside ComfyUI (the Train LoRA workflows, ``charforge pipeline``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any, *, server: argparse.ArgumentParser, output: Any) -> None:
    """Add ``charforge train``."""
    del output
    train = sub.add_parser(
        "train",
        parents=[server],
        help="train a LoRA on a hosted trainer (Replicate)",
        description="Zip a prepared dataset (images + .txt captions), train a LoRA on a Replicate "
        "trainer, download it, check that it loads, and write a character preset.",
    )
    train.add_argument("dataset", type=Path, help="folder of training images and same-named .txt captions")
    train.add_argument(
        "--backend",
        required=True,
        metavar="replicate:OWNER/MODEL[:VERSION]",
        help="the trainer (or a profile with a replicate section naming it)",
    )
    train.add_argument(
        "--destination",
        required=True,
        metavar="OWNER/NAME",
        help="your Replicate model that receives the trained version (it must exist)",
    )
    train.add_argument("--trigger-word", required=True, help="the word that calls up the character")
    train.add_argument("--name", help="character preset name (default: the trigger word)")
    train.add_argument("--steps", type=int)
    train.add_argument("--rank", type=int, help="LoRA rank")
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--resolution", help="training resolution(s), e.g. 1024 or 512,768,1024")
    train.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='any other trainer input (JSON values: 4, true, "text")',
    )
    train.add_argument(
        "--base-model",
        choices=("sd15", "sdxl", "flux"),
        help="the family the LoRA must be for (checked on the downloaded file)",
    )
    train.add_argument(
        "--out",
        type=Path,
        default=Path("output/train"),
        metavar="DIR",
        help="where the LoRA and the training record go (default: output/train)",
    )
    train.add_argument("--loras-dir", type=Path, help="also copy the LoRA here (your ComfyUI models/loras)")
    train.add_argument(
        "--characters-dir",
        type=Path,
        help="write the preset here (default: the characters folder of the models directory)",
    )
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


def cmd_train(args: argparse.Namespace, out: Any) -> int:
    from charforge.driver.config import resolve_replicate
    from charforge.driver.errors import ConfigError
    from charforge.driver.replicate.training import TrainingParams

    from ..train import train_remote

    settings = resolve_replicate(args.backend, profile=args.profile, config_path=args.config)
    if settings is None:
        raise ConfigError(
            f"--backend {args.backend!r}: only Replicate trainers (replicate:OWNER/MODEL) train "
            "remotely; local training runs in ComfyUI (the Train LoRA workflows, charforge pipeline)"
        )
    out.secrets = [*out.secrets, *settings.secrets()]
    params = TrainingParams(
        args.trigger_word,
        steps=args.steps,
        rank=args.rank,
        learning_rate=args.learning_rate,
        resolution=args.resolution,
        extra=_extra_inputs(args.input),
    )

    def on_update(training: Any, lines: list[str]) -> None:
        if not lines:
            out.note(f"training {training.id}: {training.status}")
        for line in lines[-20:]:
            out.note(f"  {line}")

    trained = train_remote(
        settings,
        args.dataset,
        args.destination,
        params,
        args.out,
        name=args.name,
        base_model=args.base_model,
        loras_dir=args.loras_dir,
        characters_dir=args.characters_dir,
        timeout=args.timeout,
        on_update=on_update,
    )
    outcome, info = trained.outcome, trained.info
    lines = [
        f"trained {trained.lora.name} on {settings.model} (training {outcome.training.id}, "
        f"{outcome.images} images, {outcome.captions} captions)",
        f"  ran {outcome.predict_time or 0:.0f} s"
        + (f", about ${outcome.cost_usd:.4f}" if outcome.cost_usd is not None else ""),
        f"  LoRA: {trained.lora} ({info.format}, {info.modules} modules, base {info.base_model})",
        f"  new version: {outcome.new_version or '-'}",
        f"  {trained.preset}",
    ]
    if not trained.base_model:
        lines.append(
            "  note: CharForge's library checks SD1.5/SDXL shapes; this LoRA's base was not verified "
            "(use it with workflows for its own base model)"
        )
    out.result(
        "\n".join(lines),
        training_id=outcome.training.id,
        lora=str(trained.lora),
        format=info.format,
        base_model=info.base_model,
        modules=info.modules,
        new_version=outcome.new_version,
        predict_time=outcome.predict_time,
        cost_usd=outcome.cost_usd,
        character=trained.preset,
    )
    return 0
