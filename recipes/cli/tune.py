"""``charforge tune SEARCH.yaml``: hyperparameter search for a character LoRA (see ``recipes/tune``), and the
servers of its pool. ``charforge lora bench`` is registered by the lora group (recipes/cli/library.py) through
:func:`register_lora_bench`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from charforge.driver.cli.common import add_pool_options

TUNE_EPILOG = """\
Each trial trains a LoRA with the Train LoRA node of the search file's workflow (its settings from the search
space), renders the evaluation scenes x seeds with it, and scores them here: identity (ArcFace), text agreement
(CLIP), diversity, distances to the reference photos (CLIP-feature MMD, KID). Optuna picks the next settings
(TPE, or NSGA-II for several objectives); with pruning, training runs in segments and hopeless trials stop early.
One trial runs per server at a time; a trial stays on its server.

The study is kept in OUT/study.db: run the same command again to resume - finished trials are never run again,
trials left running continue where their batch folders stopped.

Output (--out DIR): report.html with report/*.png (Pareto front, parameter importances, score over trials, the
best trials' images), trials.json, best.yaml, trials/NNNN/ (batch folders, evaluation grid). The best LoRA is
copied into --loras-dir (default: $CHARFORGE_MODELS_DIR/loras or $COMFYUI_DIR/models/loras) with a character
preset '<character>_tuned' pointing at it; existing files are never replaced.

exit codes: 0 the search ended (budget spent or every trial done) with at least one finished trial; 1 no trial
could be scored; 2 usage error; 3 no server reachable; 130 interrupted (rerun to resume).
"""


def register(sub: Any, *, server: argparse.ArgumentParser, output: Any) -> None:
    """Add ``charforge tune``."""
    del server, output
    tune = sub.add_parser(
        "tune",
        help="search LoRA training settings with Optuna, scored trials across servers",
        description="Hyperparameter search for a character LoRA: train, render and score trials "
        "on a pool of ComfyUI servers, keep the best.",
        epilog=TUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_argument(
        "search", type=Path, help="the search file (YAML: character, workflow, space, budget, ...)"
    )
    tune.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="search folder (created or resumed)"
    )
    add_pool_options(tune, "a ComfyUI server of the pool (repeatable), or runpod-pod:ID")
    tune.add_argument("--trials", type=int, metavar="N", help="trial budget (overrides budget.trials)")
    tune.add_argument("--hours", type=float, metavar="H", help="time budget (overrides budget.hours)")
    tune.add_argument("--dollars", type=float, metavar="USD", help="cost budget (overrides budget.dollars)")
    tune.add_argument(
        "--timeout", type=float, metavar="S", help="wall-clock limit per job (training segment or render)"
    )
    tune.add_argument("--loras-dir", type=Path, metavar="DIR", help="where the best LoRA is copied")
    tune.add_argument(
        "--characters-dir",
        type=Path,
        metavar="DIR",
        help="where its character preset is written (default: the characters folder)",
    )
    tune.add_argument(
        "--no-report", action="store_true", help="skip report.html, best.yaml and the LoRA copy"
    )
    tune.add_argument("--json", action="store_true", help="newline-delimited JSON on stdout")
    tune.set_defaults(func=cmd_tune)


def pool_servers(args: argparse.Namespace, out: Any) -> list[Any]:
    """The pool as :class:`~charforge.recipes.tune.trials.PoolServer` s: ComfyUI URLs and profiles, RunPod pods.

    Stateless backends (RunPod serverless, Replicate) are refused: a trial's LoRA must stay on the server that
    trained it for its evaluation renders.
    """
    import dataclasses

    from charforge.driver.batch import ComfyTarget
    from charforge.driver.config import resolve_replicate, resolve_runpod, resolve_server
    from charforge.driver.errors import UsageError

    from ..tune.trials import PoolServer

    named = [(url, None) for url in args.server] + [(None, name) for name in args.profile]
    if not named:
        raise UsageError("name the servers of the pool: --server URL and/or --profile NAME (repeatable)")
    servers = []
    for server, profile in named:
        label = server or f"profile {profile}"
        if resolve_replicate(server, profile=profile, config_path=args.config) is not None:
            raise UsageError(
                f"{label}: Replicate runs each job in a fresh machine, so a trial's LoRA would not be "
                "there for its evaluation; use ComfyUI servers or RunPod pods for charforge tune"
            )
        pod = resolve_runpod(server, profile=profile, config_path=args.config)
        if pod is not None:
            if pod.kind != "pod":
                raise UsageError(
                    f"{label}: a serverless endpoint keeps no files between jobs; use a RunPod pod"
                )
            from charforge.driver.cli.runpod import batch_target

            out.secrets = [*out.secrets, *pod.secrets()]
            pod_args = argparse.Namespace(config=args.config, window=1, no_preflight=False)

            def make_pod(server=server, profile=profile, pod_args=pod_args) -> Any:
                return batch_target(server, profile, pod_args, out)

            servers.append(PoolServer(label, make_pod, None))
            continue
        config = resolve_server(server, profile=profile, config_path=args.config)
        if args.insecure:
            config = dataclasses.replace(config, verify_tls=False)
        out.secrets = [*out.secrets, *config.secrets()]
        for warning in config.warnings:
            out.note(f"warning: {warning}")

        def make(config=config) -> Any:
            return ComfyTarget(config, capacity=1)

        servers.append(PoolServer(str(config.url), make, config))
    return servers


def cmd_tune(args: argparse.Namespace, out: Any) -> int:
    import importlib.util

    from charforge.driver.errors import UsageError

    from ..tune.search import Tuner
    from ..tune.spec import load_spec

    spec = load_spec(args.search)
    if importlib.util.find_spec("optuna") is None:
        raise UsageError(
            'charforge tune searches with Optuna, which is not installed: pip install "charforge[tune]"'
        )
    if args.trials is not None:
        spec.budget.trials = max(1, args.trials)
    if args.hours is not None:
        spec.budget.hours = args.hours
    if args.dollars is not None:
        spec.budget.dollars = args.dollars
    tuner = Tuner(
        spec,
        pool_servers(args, out),
        args.out,
        timeout=args.timeout,
        note=out.note,
        loras_dir=args.loras_dir,
        characters_dir=args.characters_dir,
        report=not args.no_report,
    )
    result = tuner.run()
    lines = [
        f"search {spec.name}: {result.trials} trial(s) finished ({result.complete} complete, {result.pruned} "
        f"pruned, {result.failed} failed); {result.stopped}"
    ]
    best = None
    if result.complete:
        from ..tune.report import best_trial

        best = best_trial(result.study, spec)
    if best is not None:
        settings = ", ".join(f"{k}={v}" for k, v in (best.user_attrs.get("settings") or {}).items())
        lines.append(
            f"best: trial {best.number} ({settings}); "
            + ", ".join(f"{m} {v:.4f}" for m, v in zip(spec.objectives, best.values, strict=True))
        )
    for label, value in (
        ("report", result.report),
        ("best settings", result.best_yaml),
        ("best LoRA", result.best_lora),
        ("preset", result.preset),
    ):
        if value:
            lines.append(f"{label}: {value}")
    lines += [f"note: {n}" for n in result.notes]
    out.result(
        "\n".join(lines),
        trials=result.trials,
        complete=result.complete,
        pruned=result.pruned,
        failed=result.failed,
        stopped=result.stopped,
        best_trial=best.number if best else None,
        best_settings=best.user_attrs.get("settings") if best else None,
        best_values=list(best.values) if best else None,
        report=str(result.report) if result.report else None,
        best_yaml=str(result.best_yaml) if result.best_yaml else None,
        best_lora=str(result.best_lora) if result.best_lora else None,
        preset=result.preset,
    )
    return 0 if result.complete else 1


BENCH_EPILOG = """\
Every LoRA renders the same images: the character's prompt with each scene (--prompt/--prompts), each seed, at
one strength; the base model (no LoRA) is rendered too unless --no-base. Scores, as charforge tune gives a
trial: combined, identity (ArcFace, no face = 0), faces, text (CLIP), diversity, and distances to the
character's reference photos: cmmd (CLIP-feature MMD x 1000), kid, copying (similarity to the closest
reference); fid when pytorch-fid and its Inception weights are installed. docs/tune.md explains each and its
limits on small sets.

Output (--out DIR): table.md (printed too), bench.json, sheet.png (a row of images per LoRA), one folder per
LoRA with its renders and grid.png. Rerun the same command to resume.

exit codes: 0 every image rendered and scored; 1 some renders failed; 2 usage error; 3 server unreachable.
"""


def register_lora_bench(lora_sub: Any, server: argparse.ArgumentParser) -> None:
    """Add ``charforge lora bench`` to the lora group."""
    bench = lora_sub.add_parser(
        "bench",
        parents=[server],
        help="the same quality scores for several LoRAs and the base model, as a table",
        description="Benchmark LoRAs on a character: render one evaluation set with each "
        "(and the base model) and score it like charforge tune scores a trial.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("loras", nargs="*", metavar="LORA", help="LoRAs as the server's LoraLoader lists them")
    bench.add_argument("--character", required=True, metavar="NAME", help="the character preset")
    bench.add_argument("--out", type=Path, required=True, metavar="DIR", help="benchmark folder (resumed)")
    bench.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a scene (repeatable)")
    bench.add_argument("--prompts", type=Path, metavar="FILE", help="scenes, one per line")
    bench.add_argument("--seeds", default="1,2", help="sampler seeds (default: 1,2)")
    bench.add_argument(
        "--strength", type=float, default=1.0, help="LoRA strength, model and CLIP (default 1.0)"
    )
    bench.add_argument("--checkpoint", help="the base model (default: the first one the server lists)")
    bench.add_argument("--no-base", action="store_true", help="leave out the base model row")
    bench.add_argument(
        "--reference", metavar="DIR|IDENTITY", help="who the character is (default: the preset's)"
    )
    bench.add_argument("--face-pack", default="buffalo_l")
    bench.add_argument("--face-models", metavar="DIR", help="an insightface folder searched first")
    bench.add_argument("--det-size", type=int, default=640)
    bench.add_argument(
        "--clip", metavar="NAME|PATH|none", help="CLIP model (default: the first in clip_vision)"
    )
    bench.add_argument("--device", help="CLIP device (default: cuda, mps or cpu)")
    bench.add_argument("--identity-weight", type=float, default=1.0)
    bench.add_argument("--text-weight", type=float, default=0.5)
    bench.add_argument("--diversity-weight", type=float, default=0.5)
    bench.add_argument("--timeout", type=float, metavar="S", help="limit per image")
    bench.set_defaults(func=cmd_lora_bench)


def cmd_lora_bench(args: argparse.Namespace, out: Any) -> int:
    import dataclasses

    from charforge.driver.batch import ComfyTarget
    from charforge.driver.cli import connect

    from ..lora_eval import DEFAULT_SCENES, check_server, load_character, parse_numbers, read_prompts
    from ..tune.bench import bench_loras, bench_table
    from ..tune.scores import SetScorer
    from ..tune.spec import EvalSet
    from ..tune.trials import PoolServer

    scenes = read_prompts(args.prompts) if args.prompts is not None else (args.prompt or list(DEFAULT_SCENES))
    evaluation = EvalSet(
        scenes=scenes, seeds=parse_numbers(args.seeds, int, "--seeds"), strength=args.strength
    )
    character = load_character(args.character)
    weights = {"identity": args.identity_weight, "text": args.text_weight, "diversity": args.diversity_weight}
    scorer = SetScorer(
        character,
        face_pack=args.face_pack,
        face_models_dir=args.face_models,
        det_size=args.det_size,
        clip=args.clip,
        reference=args.reference,
        device=args.device,
        weights=weights,
        note=out.note,
    )
    with connect(args, out) as client:
        info = client.object_info()
        checkpoint = args.checkpoint
        loras = []
        for lora in args.loras:
            name, checkpoint = check_server(info, lora, checkpoint, client.url, out.note)
            loras.append(name)
        if not loras:  # the base model alone
            checkpoint = checkpoint or _first_checkpoint(info, client.url)
        config = client.config
        if args.insecure:
            config = dataclasses.replace(config, verify_tls=False)
        server = PoolServer(str(config.url), lambda: ComfyTarget(config, capacity=1), config)
        scorer.load()
        rows = bench_loras(
            server,
            character,
            loras,
            args.out,
            evaluation=evaluation,
            checkpoint=checkpoint,
            scorer=scorer,
            include_base=not args.no_base,
            timeout=args.timeout,
            note=out.note,
        )
    failed = sum(r.failed for r in rows)
    table = bench_table(rows)
    lines = [table, f"table: {args.out / 'table.md'}", f"sheet: {args.out / 'sheet.png'}"]
    if failed:
        lines.append(f"{failed} render(s) failed; rerun the same command to retry them")
    out.result(
        "\n".join(lines),
        rows=[{"lora": r.name, **r.scores.to_dict()} for r in rows],
        failed=failed,
        table=str(args.out / "table.md"),
    )
    return 1 if failed else 0


def _first_checkpoint(info: dict, url: str) -> str:
    from charforge.driver.errors import UsageError

    spec = (((info.get("CheckpointLoaderSimple") or {}).get("input") or {}).get("required") or {}).get(
        "ckpt_name"
    )
    choices = spec[0] if spec and isinstance(spec[0], list) else []
    if not choices:
        raise UsageError(
            f"the server {url} has no checkpoint in models/checkpoints; put the base model there"
        )
    return str(choices[0])
