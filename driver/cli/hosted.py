"""What the hosted-service command groups (``runpod``, ``replicate``) share: routing ``run``/``wait``/``status``/
``cancel``/``validate`` to the service when ``--server`` (or the profile) names one of its targets, the
``--input NODE=PATH`` map, and running one job on a target (submit, follow, cancel when interrupted)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from ..errors import DriverError, JobTimeout
from ..manifest import build_manifest, write_manifest

Command = Callable[[argparse.Namespace, Any], int]


class _Settings(Protocol):
    def secrets(self) -> list[str]: ...


S = TypeVar("S", bound=_Settings)

#: the driver's commands a hosted service may take over
ROUTED_COMMANDS = ("run", "wait", "status", "cancel", "validate")


def route_commands(
    sub: Any,
    resolve: Callable[..., S | None],
    dispatch: Callable[[str, Command, argparse.Namespace, S, Any], int],
) -> None:
    """Wrap the ComfyUI commands already in `sub` so that a server `resolve` recognises (``resolve_runpod``,
    ``resolve_replicate``: None for any other server) goes to `dispatch` with its settings, whose secrets are
    masked in all output from then on; any other server reaches the original command."""
    for name in ROUTED_COMMANDS:
        parser = sub.choices.get(name)
        if parser is not None and parser.get_default("func") is not None:
            parser.set_defaults(func=_routed(name, parser.get_default("func"), resolve, dispatch))


def _routed(
    name: str,
    original: Command,
    resolve: Callable[..., S | None],
    dispatch: Callable[[str, Command, argparse.Namespace, S, Any], int],
) -> Command:
    def command(args: argparse.Namespace, out: Any) -> int:
        settings = resolve(
            getattr(args, "server", None),
            profile=getattr(args, "profile", None),
            config_path=getattr(args, "config", None),
        )
        if settings is None:
            return original(args, out)
        out.secrets = [*out.secrets, *settings.secrets()]
        return dispatch(name, original, args, settings, out)

    command.__doc__ = original.__doc__
    return command


def input_map(items: list[str]) -> dict[str, str]:
    """``--input NODE=PATH`` arguments as {NODE: PATH}."""
    mapping: dict[str, str] = {}
    for text in items:
        left, _, path = text.partition("=")
        mapping[left.strip()] = path.strip()
    return mapping


async def run_job(
    target: Any,
    args: argparse.Namespace,
    out: Any,
    *,
    noun: str,
    submitted: Callable[[str], None],
    follow: Callable[[str], Awaitable[int]],
) -> int:
    """Open `target`, prepare ``args.workflow`` with its ``--set``/``--input`` values, submit it (`submitted` is
    told the job's id) and `follow` the job; an interrupt or a timeout cancels the job (``"<noun> ID: outcome"``).
    The target is closed in every case."""
    from ..batch.targets import JobSpec

    job_id = None
    try:
        await target.open()
        graph = await target.prepare(
            JobSpec(args.workflow, list(args.set), input_map(args.input), source=str(args.workflow))
        )
        for warning in target.warnings:
            out.note(f"warning: {warning}")
        job_id = await target.submit(graph, None)
        submitted(job_id)
        return await follow(job_id)
    except (KeyboardInterrupt, asyncio.CancelledError, JobTimeout):
        if job_id is not None:
            with contextlib.suppress(DriverError):
                out.note(f"{noun} {job_id}: {await target.cancel(job_id)}")
        raise
    finally:
        await target.close()


def run_main(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """``asyncio.run(main())``; 130 (the shell's code for Ctrl-C) when interrupted."""
    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130


async def finish_job(
    target: Any,
    settings: Any,
    result: Any,
    job_id: str,
    args: argparse.Namespace,
    out: Any,
    *,
    started: float,
    workflow_source: str | None,
    service: str,
    service_fields: dict[str, Any],
    summary: Callable[[dict[str, Any]], str],
    nothing: str,
    id_field: str,
) -> int:
    """Download a finished job's files (unless ``--no-download``) with the manifest (its `service` section:
    `service_fields`, the job's times, cost and price) and report them: `summary` of the times, the estimated
    cost, the files (`nothing` when there are none); the JSON record names the job by `id_field`."""
    downloads = [] if args.no_download else await target.download(result, args.out)
    times = target.job_times(job_id)
    cost = target.job_cost(job_id)
    manifest_path = None
    if not args.no_download:
        manifest = build_manifest(
            result,
            downloads,
            out_dir=args.out,
            server=settings.server,
            workflow_source=workflow_source,
            wall_seconds=time.monotonic() - started,
            warnings=target.warnings,
        )
        manifest[service] = {
            **service_fields,
            **times,
            "cost_usd": cost,
            "price_per_second": target.price_per_second,
        }
        manifest_path = write_manifest(args.out, manifest, secrets=settings.secrets())
    lines = [summary(times) + (f", about ${cost:.4f}" if cost is not None else "")]
    lines += [f"  {d.path}" for d in downloads]
    if not args.no_download and not downloads:
        lines.append(f"  ({nothing})")
    out.result(
        "\n".join(lines),
        **{id_field: job_id},
        files=[str(d.path) for d in downloads],
        cost_usd=cost,
        manifest=str(manifest_path) if manifest_path else None,
        **times,
    )
    return 0
