"""The command lines run in this process, as a test calls them: ``(exit code, stdout, stderr)`` of one call."""

from __future__ import annotations

import io
from pathlib import Path


def run_driver_cli(*argv: str) -> tuple[int, str, str]:
    """The driver's own command line (``python -m charforge.driver.cli``)."""
    from charforge.driver import cli

    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def run_charforge(*argv: str) -> tuple[int, str, str]:
    """The ``charforge`` command: the driver's command groups and the recipes'."""
    from charforge.recipes import cli

    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def point_cli_at(monkeypatch, env: dict[str, str], config: Path, config_text: str | None = None) -> None:
    """Point the command line at a fake server: its environment variables (`env`) set, the user's own choice of
    server (``CHARFORGE_SERVER``, ``_PROFILE``, ``_TOKEN``) cleared, and ``CHARFORGE_CONFIG`` at `config`,
    written with `config_text` when given (a missing file is an empty configuration)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("CHARFORGE_SERVER", "CHARFORGE_PROFILE", "CHARFORGE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    if config_text is not None:
        config.write_text(config_text, encoding="utf-8")
    monkeypatch.setenv("CHARFORGE_CONFIG", str(config))
