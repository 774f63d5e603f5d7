"""What the hosted-service command groups (``runpod``, ``replicate``) share: routing ``run``/``wait``/``status``/
``cancel``/``validate`` to the service when ``--server`` (or the profile) names one of its targets, the
``--input NODE=PATH`` map, and running one job on a target (submit, follow, cancel when interrupted)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from ..errors import DriverError, JobTimeout

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
