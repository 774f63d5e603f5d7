"""What the ``charforge`` command modules share: :class:`Output` (where and how everything is written) and
:func:`connect` (the client for the server the arguments name). Command-group modules get these passed or import
them from here, never from the main command module.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..client.sync_client import ComfyClient
from ..config import Limits, resolve_server, server_named
from ..local import LocalComfyUI, local_server
from ..secrets import mask, mask_data
from ..terminal import safe_json_line, safe_text


class Output:
    """Where the CLI writes: results to stdout, messages to stderr, or JSON records to stdout.

    Everything written passes through :meth:`clean` (human text) or :meth:`record` (JSON): secrets are masked
    and control characters from server- or file-supplied text cannot act on the terminal.
    """

    def __init__(self, json_mode: bool, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> None:
        self.json = json_mode
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.secrets: list[str] = []

    def clean(self, text: str) -> str:
        """``text`` as it may be shown: secrets masked, control characters made visible."""
        return safe_text(mask(text, self.secrets))

    def record(self, kind: str, **data: Any) -> None:
        """One NDJSON record ``{"event": kind, "time": ..., **data}`` on stdout."""
        self.record_line({"event": kind, "time": round(time.time(), 3), **data})

    def record_line(self, data: Any, indent: int | None = None) -> None:
        """``data`` as JSON on stdout (secrets masked, raw control characters escaped)."""
        line = json.dumps(mask_data(data, self.secrets), default=str, ensure_ascii=False, indent=indent)
        self.stdout.write(safe_json_line(mask(line, self.secrets)) + "\n")
        self.stdout.flush()

    def note(self, text: str) -> None:
        """A progress/status message for humans (a ``message`` record in JSON mode)."""
        if self.json:
            self.record("message", text=text)
        else:
            self.stderr.write(self.clean(text) + "\n")
            self.stderr.flush()

    def result(self, text: str, **data: Any) -> None:
        if self.json:
            self.record("result", **data)
        else:
            self.stdout.write(self.clean(text) + "\n")
            self.stdout.flush()

    def error(self, exc: BaseException, exit_code: int) -> None:
        if self.json:
            data: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc), "exit_code": exit_code}
            problems = getattr(exc, "problems", None)
            if problems:
                data["problems"] = [p.to_dict() for p in problems]
            for attr in (
                "prompt_id",
                "node_id",
                "node_type",
                "exception_type",
                "exception_message",
                "traceback",
            ):
                if getattr(exc, attr, None) is not None:
                    data[attr] = getattr(exc, attr)
            self.record("error", **data)
        else:
            self.stderr.write(self.clean(f"error: {exc}") + "\n")
            self.stderr.flush()


def add_pool_options(parser: argparse.ArgumentParser, server_help: str) -> None:
    """The options naming a pool of servers (``charforge batch run``, ``charforge tune``): ``--server`` and
    ``--profile``, both repeatable, ``--config`` and ``--insecure``; `server_help` says which kinds of server."""
    parser.add_argument("--server", action="append", default=[], metavar="URL", help=server_help)
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="NAME",
        help="a config-file profile of the pool (repeatable)",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="config file for --profile")
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")


def report_cancel(
    out: Output, what: str, job_id: str, outcome: str, texts: dict[str, str], id_field: str = "prompt_id"
) -> int:
    """Say how cancelling `what` `job_id` ended, in the server kind's words for each outcome (`texts`:
    ``removed``, ``interrupted``, ``not_active``), and return the exit code: 1 when nothing was active."""
    out.result(f"{what} {job_id}: {texts[outcome]}", **{id_field: job_id}, outcome=outcome)
    return 0 if outcome != "not_active" else 1


@contextlib.contextmanager
def connect(args: argparse.Namespace, out: Output) -> Iterator[ComfyClient]:
    """A client for the server the arguments name (or a local one); stops a server it started."""
    local: LocalComfyUI | None = None
    config_path = getattr(args, "config", None)
    if server_named(args.server, args.profile, config_path=config_path):
        config = resolve_server(args.server, profile=args.profile, config_path=config_path)
    else:
        url, local = local_server(on_message=out.note)
        config = resolve_server(url, config_path=config_path)
    out.secrets = config.secrets()
    for warning in config.warnings:
        out.note(f"warning: {warning}")
    download_mb = getattr(args, "max_download_mb", None)
    if download_mb is not None:
        chosen = Limits.resolve(download_mb=download_mb).max_download_bytes
        config = dataclasses.replace(
            config, limits=dataclasses.replace(config.limits, max_download_bytes=chosen)
        )
    client = ComfyClient(config, verify_tls=False if args.insecure else None)
    try:
        yield client
    finally:
        client.close()
        if local is not None:
            local.stop()
