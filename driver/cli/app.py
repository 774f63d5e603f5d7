"""The ``charforge`` command: the parser, the built-in commands (run, wait, validate, status, cancel, convert) and
the entry point; a thin layer over :class:`~charforge.driver.client.ComfyClient`.

Human-readable progress and messages go to stderr, results to stdout; ``--json`` prints newline-delimited
JSON events and a final ``result`` (or ``error``) record on stdout instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ..client.models import Job, JobResult
from ..client.sync_client import ComfyClient
from ..errors import DriverError, NodeProblem, ValidationError
from ..manifest import build_manifest, write_manifest
from ..outputs import check_out_dir
from ..progress import JobView, make_renderer
from ..terminal import safe_json_line
from ..workflow.load import load_workflow
from ..workflow.preflight import nodes_to_run
from .common import Output, connect, report_cancel

try:
    from charforge import __version__
except Exception:  # noqa: BLE001 - the node pack may be absent in a driver-only install
    __version__ = "0"

EXIT_CODES = """\
exit codes:
  0    success
  1    the job failed on the server (a node raised) or vanished
  2    usage error, bad workflow/override, or the workflow failed validation
  3    the server is unreachable or refused the credentials
  124  the job did not finish within --timeout
  130  cancelled (Ctrl-C) or interrupted on the server

server selection: --server URL, --profile NAME, $CHARFORGE_SERVER / $CHARFORGE_PROFILE, the config file's
default_profile; else ComfyUI on 127.0.0.1:8188, else one started from $COMFYUI_DIR.
auth: $CHARFORGE_TOKEN (bearer), $CHARFORGE_USERNAME/$CHARFORGE_PASSWORD (basic), $CHARFORGE_HEADERS (JSON),
or the profile's token_env / password_env / headers.
"""


# ------------------------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------------------------


def _server_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("server")
    group.add_argument(
        "--server",
        metavar="URL",
        help="ComfyUI URL, e.g. http://127.0.0.1:8188 or "
        "https://host/prefix/ (credentials in the URL = basic auth)",
    )
    group.add_argument("--profile", metavar="NAME", help="a profile of the config file (server + auth)")
    group.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="config file (default: $CHARFORGE_CONFIG or ~/.config/charforge/config.yaml)",
    )
    group.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    group.add_argument("--json", action="store_true", help="newline-delimited JSON on stdout")
    return parent


def build_parser(command_modules: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of the built-in commands plus the groups of `command_modules` (default: the driver's own)."""
    parser = argparse.ArgumentParser(
        prog="charforge",
        description="Run ComfyUI workflows on any server, follow them and bring their outputs home.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"charforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    server = _server_options()

    run = sub.add_parser(
        "run",
        parents=[server],
        help="run a workflow and download its outputs",
        description="Submit a workflow (API or editor format, or a PNG saved by ComfyUI), show "
        "its progress, download every output into --out with a manifest.json.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("workflow", type=Path, help="workflow file (.json, or .png with embedded workflow)")
    _add_override_options(run)
    run.add_argument(
        "--out",
        type=Path,
        default=Path("output"),
        metavar="DIR",
        help="where outputs and manifest.json go (default: ./output); files are never overwritten",
    )
    run.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="wall-clock limit for the whole job, queue "
        "wait included; the job is cancelled when it expires (default: the profile's, else none)",
    )
    run.add_argument("--no-download", action="store_true", help="do not download outputs")
    _add_download_limit(run)
    run.add_argument("--no-previews", action="store_true", help="skip temporary preview images")
    run.add_argument("--no-preflight", action="store_true", help="skip the check against /object_info")
    run.add_argument(
        "--allow-partial",
        action="store_true",
        help="run the valid outputs when the server rejects only some of them",
    )
    run.add_argument(
        "--progress",
        choices=["auto", "rich", "plain"],
        default="auto",
        help="progress display (default: bars on a terminal, lines otherwise)",
    )
    run.set_defaults(func=cmd_run)

    wait = sub.add_parser(
        "wait", parents=[server], help="follow an already submitted job and download outputs"
    )
    wait.add_argument("prompt_id")
    wait.add_argument("--out", type=Path, default=Path("output"), metavar="DIR")
    wait.add_argument("--timeout", type=float, metavar="S")
    wait.add_argument("--no-download", action="store_true")
    _add_download_limit(wait)
    wait.add_argument("--no-previews", action="store_true")
    wait.add_argument("--progress", choices=["auto", "rich", "plain"], default="auto")
    wait.set_defaults(func=cmd_wait)

    validate = sub.add_parser(
        "validate", parents=[server], help="check a workflow against a server, run nothing"
    )
    validate.add_argument("workflow", type=Path)
    _add_override_options(validate)
    validate.set_defaults(func=cmd_validate)

    status = sub.add_parser(
        "status", parents=[server], help="server version, devices and queue; or a job's state"
    )
    status.add_argument("prompt_id", nargs="?", help="a job to look up")
    status.set_defaults(func=cmd_status)

    cancel = sub.add_parser("cancel", parents=[server], help="cancel one job (and no other)")
    cancel.add_argument("prompt_id")
    cancel.set_defaults(func=cmd_cancel)

    convert = sub.add_parser(
        "convert",
        parents=[server],
        help="convert an editor workflow to the API format",
        description="Convert a workflow saved by the ComfyUI editor into the API format, "
        "using the server's /object_info for widget names.",
    )
    convert.add_argument("workflow", type=Path)
    convert.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FILE", help="API JSON ('-' = stdout)"
    )
    convert.set_defaults(func=cmd_convert)

    for name in COMMAND_MODULES if command_modules is None else command_modules:
        module = importlib.import_module(name)
        module.register(sub, server=server, output=Output)
    return parser


# Command groups that live in their own modules: each has ``register(sub, *, server, output)`` that adds its
# sub-parsers (``server`` is the parent parser with --server/--profile/--config/--insecure/--json; commands set
# ``func(args, out)`` like the built-in ones). These are the driver's own; the ``charforge`` command
# (charforge.recipes.cli) passes them with the recipes' groups to build_parser/main.
COMMAND_MODULES: tuple[str, ...] = (
    "charforge.driver.cli.batch",
    "charforge.driver.cli.runpod",
    "charforge.driver.cli.replicate",
)


def _add_download_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-download-mb",
        type=float,
        metavar="MB",
        help="refuse an output file larger than this (default: $CHARFORGE_MAX_DOWNLOAD_MB, the "
        "profile's max_download_mb, else 4096); the partial file is removed",
    )


def _add_override_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="override an input; NODE is an id, a title or a unique class; VALUE is typed "
        "(42, 0.5, true, null, JSON) and converted to the input's type (repeatable)",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NODE[.INPUT]=PATH",
        help="upload a local file and use it for a node's file input, e.g. 'Load Image=face.png' "
        "(repeatable)",
    )


# ------------------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is below it (shorter to read), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _cancel_quietly(client: ComfyClient, prompt_id: str) -> str:
    try:
        return client.cancel(prompt_id)
    except DriverError as exc:
        return f"unknown ({exc})"


def _follow(
    client: ComfyClient,
    job: Job | str,
    view: JobView,
    args: argparse.Namespace,
    out: Output,
    timeout: float | None,
) -> JobResult | None:
    """Render events until the job ends; on Ctrl-C cancel only this job and return None."""
    renderer = make_renderer(
        "json" if out.json else args.progress, view, stdout=out.stdout, stderr=out.stderr
    )
    prompt_id = job.prompt_id if isinstance(job, Job) else job
    renderer.start()
    watch = client.watch(job, timeout=timeout)
    try:
        for event in watch:
            renderer.handle(event)
    except KeyboardInterrupt:
        renderer.close()
        out.note(f"cancelling job {prompt_id} ...")
        outcome = _cancel_quietly(client, prompt_id)
        out.note(f"job {prompt_id}: {outcome}")
        if out.json:
            out.record("cancelled", prompt_id=prompt_id, outcome=outcome)
        return None
    except DriverError as exc:
        renderer.close()
        if getattr(exc, "exit_code", 0) == 124:
            outcome = _cancel_quietly(client, prompt_id)
            out.note(f"timed out; job {prompt_id}: {outcome}")
        raise
    finally:
        renderer.close()
    return watch.result


def _collect(
    client: ComfyClient,
    result: JobResult,
    args: argparse.Namespace,
    out: Output,
    *,
    source: str | None,
    applied: list | None = None,
    uploads: list | None = None,
    started: float,
    warnings: list[NodeProblem] | None = None,
    timeout: float | None = None,
) -> int:
    downloads = []
    manifest_path = None
    if not args.no_download:
        # --timeout covers the whole job: downloads get what is left of it.
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        downloads = client.download_outputs(
            result, args.out, include_temp=not args.no_previews, timeout=remaining
        )
        manifest = build_manifest(
            result,
            downloads,
            out_dir=args.out,
            server=client.url,
            workflow_source=source,
            overrides=applied,
            uploads=uploads,
            wall_seconds=time.monotonic() - started,
            warnings=[str(w) for w in warnings or []],
        )
        manifest_path = write_manifest(args.out, manifest, secrets=client.config.secrets())
    timings = result.timings
    files = [
        {
            "path": str(d.path),
            "node_id": d.source.node_id,
            "class_type": d.class_type,
            "title": d.title,
            "output": d.source.key,
            "animated": d.source.animated,
        }
        for d in downloads
    ]
    lines = []
    took = f"{time.monotonic() - started:.1f} s"
    if timings.execution_seconds is not None:
        took += f" (ran {timings.execution_seconds:.1f} s)"
    lines.append(f"done in {took}; prompt {result.prompt_id}")
    if result.cached_nodes:
        lines.append(
            f"{len(result.cached_nodes)} node(s) were cached (identical inputs re-use earlier results)"
        )
    for d in downloads:
        title = f' "{d.title}"' if d.title and d.title != d.class_type else ""
        lines.append(f"  {_shown(d.path)}  <- node {d.source.node_id}{title} ({d.class_type})")
    for values in result.values:
        for key, items in values.values.items():
            shown = ", ".join(str(v) for v in items)[:200]
            lines.append(f"  node {values.node_id} {key}: {shown}")
    if not args.no_download and not downloads:
        lines.append("  (the job produced no files)")
    if manifest_path is not None:
        lines.append(f"  manifest: {_shown(manifest_path)}")
    out.result(
        "\n".join(lines),
        prompt_id=result.prompt_id,
        files=files,
        values={v.node_id: v.values for v in result.values},
        cached_nodes=result.cached_nodes,
        manifest=str(manifest_path) if manifest_path else None,
        timings=timings.to_dict(),
    )
    return 0


def cmd_run(args: argparse.Namespace, out: Output) -> int:
    started = time.monotonic()
    if not args.no_download:
        check_out_dir(args.out)
    with connect(args, out) as client:
        prepared = client.prepare_run(
            args.workflow, sets=args.set, inputs=args.input, preflight=not args.no_preflight
        )
        for warning in prepared.warnings:
            out.note(f"warning: {warning}")
        for upload in prepared.uploads:
            out.note(f"uploaded {upload['local_path']} as {upload['uploaded_as']}")
        view = JobView(prepared.prompt, nodes_to_run(prepared.prompt, client.object_info()))
        timeout = args.timeout if args.timeout is not None else client.config.job_timeout
        prompt_id = str(uuid.uuid4())
        try:
            job = client.submit(prepared.workflow, prompt_id=prompt_id, allow_partial=args.allow_partial)
        except KeyboardInterrupt:
            out.note(f"cancelling job {prompt_id} ...")
            out.note(f"job {prompt_id}: {_cancel_quietly(client, prompt_id)}")
            return 130
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        result = _follow(client, job, view, args, out, remaining)
        if result is None:
            return 130
        return _collect(
            client,
            result,
            args,
            out,
            source=str(args.workflow),
            applied=prepared.applied,
            uploads=prepared.uploads,
            started=started,
            warnings=prepared.warnings,
            timeout=timeout,
        )


def cmd_wait(args: argparse.Namespace, out: Output) -> int:
    started = time.monotonic()
    if not args.no_download:
        check_out_dir(args.out)
    with connect(args, out) as client:
        queue = client.queue()
        prompt: dict[str, Any] = {}
        for item in queue["queue_running"] + queue["queue_pending"]:
            if len(item) > 2 and item[1] == args.prompt_id and isinstance(item[2], dict):
                prompt = item[2]
        try:
            object_info = client.object_info() if prompt else {}
        except DriverError:
            object_info = {}
        view = JobView(prompt, nodes_to_run(prompt, object_info) if prompt else [])
        result = _follow(client, args.prompt_id, view, args, out, args.timeout)
        if result is None:
            return 130
        return _collect(client, result, args, out, source=None, started=started, timeout=args.timeout)


def cmd_validate(args: argparse.Namespace, out: Output) -> int:
    with connect(args, out) as client:
        prepared = client.prepare_run(args.workflow, sets=args.set, inputs=[], preflight=True, upload=False)
        running = nodes_to_run(prepared.prompt, client.object_info())
        for warning in prepared.warnings:
            out.note(f"warning: {warning}")
        if args.input:
            out.note("note: --input files are not uploaded by validate")
        out.result(
            f"ok: {len(prepared.prompt)} nodes, {len(running)} would run on {client.url}",
            valid=True,
            nodes=len(prepared.prompt),
            nodes_to_run=running,
            warnings=[w.to_dict() for w in prepared.warnings],
            format=prepared.workflow.format,
        )
    return 0


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    with connect(args, out) as client:
        if args.prompt_id:
            state, ahead = client.job_state(args.prompt_id)
            detail = ""
            data: dict[str, Any] = {"prompt_id": args.prompt_id, "state": state, "ahead": ahead}
            if state == "finished":
                entry = client.history(args.prompt_id) or {}
                status = (entry.get("status") or {}).get("status_str", "unknown")
                data["status"] = status
                detail = f" ({status})"
            elif state == "pending":
                detail = f" ({ahead} ahead)"
            out.result(f"job {args.prompt_id}: {state}{detail}", **data)
            return 0 if state != "unknown" else 1
        stats = client.system_stats()
        queue = client.queue()
        system = stats.get("system") or {}
        devices = stats.get("devices") or []
        lines = [
            f"server: {client.url}",
            f"ComfyUI {system.get('comfyui_version', '?')}, Python {str(system.get('python_version', '?')).split()[0]}, "
            f"PyTorch {system.get('pytorch_version', '?')}",
        ]
        for d in devices:
            total = d.get("vram_total") or 0
            free = d.get("vram_free") or 0
            mem = f", VRAM {free / 2**30:.1f}/{total / 2**30:.1f} GiB free" if total else ""
            lines.append(f"device: {d.get('name')} ({d.get('type')}){mem}")
        lines.append(f"queue: {len(queue['queue_running'])} running, {len(queue['queue_pending'])} pending")
        out.result(
            "\n".join(lines),
            server=client.url,
            system=system,
            devices=devices,
            running=[item[1] for item in queue["queue_running"] if len(item) > 1],
            pending=[item[1] for item in queue["queue_pending"] if len(item) > 1],
        )
    return 0


def cmd_cancel(args: argparse.Namespace, out: Output) -> int:
    with connect(args, out) as client:
        texts = {
            "removed": "removed from the queue",
            "interrupted": "interrupted",
            "not_active": "not queued or running (already finished, or unknown)",
        }
        return report_cancel(out, "job", args.prompt_id, client.cancel(args.prompt_id), texts)


def cmd_convert(args: argparse.Namespace, out: Output) -> int:
    wf = load_workflow(args.workflow)
    if wf.prompt is not None:
        prompt = wf.prompt
        out.note(f"{args.workflow} is already in the API format")
    else:
        with connect(args, out) as client:
            prompt = client.prepare(wf).prompt or {}
    text = safe_json_line(json.dumps(prompt, indent=2, ensure_ascii=False)) + "\n"
    if str(args.output) == "-":
        out.stdout.write(text)
        out.stdout.flush()
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    out.result(f"wrote {args.output} ({len(prompt)} nodes)", output=str(args.output), nodes=len(prompt))
    return 0


# ------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------


def main(
    argv: list[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    command_modules: Sequence[str] | None = None,
) -> int:
    """Run the command line with the groups of `command_modules` (default: the driver's own); returns the exit
    code (see ``charforge --help``)."""
    parser = build_parser(command_modules)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(stdout)
        return 0
    out = Output(args.json, stdout, stderr)
    try:
        return int(args.func(args, out))
    except KeyboardInterrupt:
        out.note("interrupted")
        return 130
    except ValidationError as exc:
        out.error(exc, exc.exit_code)
        return exc.exit_code
    except DriverError as exc:
        out.error(exc, exc.exit_code)
        return exc.exit_code
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
