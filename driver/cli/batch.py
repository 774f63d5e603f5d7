"""``charforge batch``: plan, run, and follow batches and sweeps (see :mod:`~charforge.driver.batch.runner`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from ..batch.journal import JOURNAL_NAME, replay
from ..batch.plan import BatchError, load_batch
from ..batch.summary import render_table, summary_of
from ..config import resolve_server
from .common import add_pool_options

RUN_EPILOG = """\
The output folder holds one folder per job (named from the sweep axes, with its outputs and manifest.json),
journal.jsonl (every job's state changes), plan.json, summary.json and contact_sheet.png. Run the same
command again to resume: finished jobs are skipped, submitted jobs are looked up on their server before
anything is sent again. 'charforge batch status DIR' shows progress from another terminal.

Jobs that train a LoRA (CharForge's Train LoRA) get it in <job>/lora/ and its run folder in <job>/lora/run/,
downloaded from the server with resume and checksum (--no-lora-home: leave them there). --upload-to
s3://BUCKET/PREFIX sends each done job's folder up as it finishes and the batch's files at the end.

exit codes: 0 every job done; 1 some jobs failed or timed out; 2 usage error or changed plan;
3 no server reachable; 130 interrupted (rerun to resume).
"""


def register(sub: argparse._SubParsersAction, *, server: argparse.ArgumentParser, output: type) -> None:
    """Add ``charforge batch plan|run|status``."""
    batch = sub.add_parser(
        "batch",
        help="batches and sweeps: plan, run on one or many servers, status",
        description="Batch files: JSON Lines (one job per line) or a sweep spec (YAML/JSON). "
        "'plan' expands them, 'run' runs them crash-safe on a pool of servers, "
        "'status' summarises a batch folder.",
    )
    batch_sub = batch.add_subparsers(dest="batch_command", metavar="BATCH_COMMAND", required=True)

    plan = batch_sub.add_parser("plan", help="print the expanded jobs without contacting any server")
    plan.add_argument("file", type=Path, help="a .jsonl batch or a .yaml/.yml/.json sweep spec")
    plan.add_argument("--json", action="store_true", help="one JSON object per job on stdout")
    plan.set_defaults(func=cmd_batch_plan)

    run = batch_sub.add_parser(
        "run",
        help="run a batch on one or more servers (resumes an existing --out)",
        description="Run every job of a batch file on a pool of ComfyUI servers.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("file", type=Path, help="a .jsonl batch or a sweep spec")
    run.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="batch folder (created or resumed)"
    )
    add_pool_options(
        run,
        "a server of the pool (repeatable): a ComfyUI URL, runpod-pod:ID, "
        "runpod-serverless:ID or replicate:OWNER/MODEL[:VERSION]",
    )
    run.add_argument(
        "--window",
        type=int,
        default=2,
        metavar="N",
        help="jobs queued or running per server at once (default: 2)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="wall-clock limit per job from its submission; "
        "the job is cancelled on its server when it expires",
    )
    run.add_argument(
        "--retries",
        type=int,
        default=6,
        metavar="N",
        help="retries of a transient failure (connection error, 5xx, 429) per step (default: 6)",
    )
    run.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        metavar="S",
        help="first retry delay; doubles each retry, with jitter (default: 1)",
    )
    run.add_argument(
        "--force-replan",
        action="store_true",
        help="continue a batch folder whose plan changed (jobs with unchanged ids keep their state)",
    )
    run.add_argument("--retry-failed", action="store_true", help="run failed and timed-out jobs again")
    run.add_argument(
        "--contact-sheet",
        metavar="X_AXIS,Y_AXIS",
        help="axes of contact_sheet.png (default: automatic for a 2-axis sweep; 'none' to skip)",
    )
    run.add_argument("--no-preflight", action="store_true", help="skip the check against /object_info")
    run.add_argument(
        "--max-cost",
        type=float,
        metavar="USD",
        help="stop submitting new jobs once the estimated cost (RunPod pods and serverless "
        "endpoints, Replicate models with a known price) would pass this many dollars",
    )
    run.add_argument(
        "--upload-to",
        metavar="s3://BUCKET/PREFIX",
        help="upload each done job's folder (outputs, LoRA, run folder) to S3-compatible storage as "
        "it finishes, and the batch's files at the end; unchanged objects are not sent again. "
        "Credentials: the usual AWS variables or profile",
    )
    run.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3-compatible endpoint (R2, MinIO, RunPod volumes; default: AWS or $AWS_ENDPOINT_URL)",
    )
    run.add_argument(
        "--no-lora-home",
        action="store_true",
        help="leave LoRAs trained by the jobs (and their run folders) on the server",
    )
    run.add_argument("--json", action="store_true", help="one JSON record per finished job on stdout")
    run.set_defaults(func=cmd_batch_run)

    status = batch_sub.add_parser("status", help="summary of a batch folder (live while it runs)")
    status.add_argument("dir", type=Path, help="the batch's --out folder")
    status.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="S",
        help="refresh every S seconds (default 2) until the batch stops",
    )
    status.add_argument("--json", action="store_true", help="print summary.json's content")
    status.set_defaults(func=cmd_batch_status)


def cmd_batch_plan(args: argparse.Namespace, out: Any) -> int:
    plan = load_batch(args.file)
    if plan.master_seed is not None:
        out.note(
            f"random seeds drawn from master seed {plan.master_seed} (put 'master: {plan.master_seed}' "
            "in the seed policy to keep this plan)"
        )
    if args.json:
        for job in plan.jobs:
            out.record_line(job.to_dict())
        out.stdout.flush()
        return 0
    rows = [
        (j.id, j.folder, str(j.seed) if j.seed is not None else "-", " ".join(j.overrides)) for j in plan.jobs
    ]
    if out.stdout.isatty():
        heads = ("ID", "FOLDER", "SEED", "SET")
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads[:3])]
        out.stdout.write("  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=False)) + "  SET\n")
        for r in rows:
            line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3]
            out.stdout.write(out.clean(line) + "\n")
    else:
        for r in rows:
            out.stdout.write(out.clean("\t".join(r)) + "\n")
    out.stdout.flush()
    out.note(f"{len(plan.jobs)} job(s) planned from {args.file} ({plan.kind})")
    return 0


def _targets(args: argparse.Namespace, out: Any) -> list:
    from ..batch.targets import ComfyTarget
    from .replicate import batch_target as replicate_target
    from .runpod import batch_pool, batch_target

    named = [(url, None) for url in args.server] + [(None, name) for name in args.profile]
    if not named:
        raise BatchError("name the servers of the pool: --server URL and/or --profile NAME (repeatable)")
    targets = []
    for server, profile in named:
        special = batch_target(server, profile, args, out)  # RunPod pods and serverless endpoints
        if special is None:
            special = replicate_target(server, profile, args, out)  # Replicate models running workflows
        if special is not None:
            targets.append(special)
            continue
        config = resolve_server(server, profile=profile, config_path=args.config)
        out.secrets = [*out.secrets, *config.secrets()]
        for warning in config.warnings:
            out.note(f"warning: {warning}")
        target = ComfyTarget(config, capacity=args.window, preflight=not args.no_preflight)
        if args.insecure:
            target.client.verify_tls = False
        targets.append(target)
    return batch_pool(targets, args)


def cmd_batch_run(args: argparse.Namespace, out: Any) -> int:
    from ..batch.runner import BatchRunner, RunOptions

    if args.window < 1:
        raise BatchError("--window must be at least 1")
    master = None
    journal = args.out / JOURNAL_NAME
    if journal.exists():  # resume: reuse the master seed a random seed policy drew the first time
        master = replay(journal).header.get("master_seed")
    plan = load_batch(args.file, master_seed=master)
    sheet: Any = "auto"
    if args.contact_sheet:
        sheet = None if args.contact_sheet.lower() == "none" else args.contact_sheet
        if sheet is not None:
            from ..batch.sheet import axes_for_sheet

            axes_for_sheet(plan, sheet)  # fail now, not after the batch, on a wrong axis name
    if args.upload_to:
        from ..storage.s3 import S3Location

        S3Location.parse(args.upload_to)  # a wrong location fails before anything runs
    options = RunOptions(
        args.out,
        timeout=args.timeout,
        retries=args.retries,
        backoff=args.backoff,
        force_replan=args.force_replan,
        retry_failed=args.retry_failed,
        contact_sheet=sheet,
        lora_home=not args.no_lora_home,
        upload_to=args.upload_to,
        s3_endpoint=args.s3_endpoint,
    )
    runner = BatchRunner(plan, _targets(args, out), options, base=args.file.parent, on_message=out.note)
    counts = {"done": 0, "failed": 0, "timed_out": 0}
    total = len(plan.jobs)
    out.note(
        f"batch {args.file}: {total} job(s) on {len(runner.targets)} server(s), window {args.window}; "
        f"folder {args.out}"
    )

    async def main() -> None:
        async for outcome in runner.run():
            counts[outcome.state] = counts.get(outcome.state, 0) + 1
            finished = sum(counts.values())
            if out.json:
                out.record(
                    "job",
                    job=outcome.job.id,
                    folder=outcome.job.folder,
                    state=outcome.state,
                    prompt_id=outcome.prompt_id,
                    server=outcome.server,
                    skipped=outcome.skipped,
                    files=[str(f) for f in outcome.files],
                    reason=outcome.reason,
                )
            elif not outcome.skipped:
                extra = f" ({outcome.reason.splitlines()[0]})" if outcome.reason else ""
                out.note(f"[{finished}/{total}] {outcome.job.folder}: {outcome.state}{extra}")

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        out.note(f"interrupted; the journal is consistent - rerun the same command to resume ({args.out})")
        return 130
    summary = summary_of(args.out)
    if out.json:
        out.record("summary", **summary)
    else:
        out.stdout.write(out.clean(render_table(summary)) + "\n")
        out.stdout.flush()
    if summary["counts"]["done"] != total:
        return 1
    return 1 if args.upload_to and (summary.get("uploads") or {}).get("not_uploaded", 1) else 0


def cmd_batch_status(args: argparse.Namespace, out: Any) -> int:
    while True:
        summary = summary_of(args.dir)
        if args.json:
            out.record_line(summary, indent=2)
        else:
            if args.watch and out.stdout.isatty():
                out.stdout.write("\x1b[2J\x1b[H")  # our own screen clear; the table itself is cleaned
            out.stdout.write(out.clean(render_table(summary)) + "\n")
        out.stdout.flush()
        if not args.watch or not summary["running"]:
            break
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.watch)
    return 0
