"""The CharForge config file, shared by the pack (its ``models`` section) and the driver (``profiles``, ...)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$CHARFORGE_CONFIG``, else ``$XDG_CONFIG_HOME/charforge/config.yaml`` (``~/.config/charforge/config.yaml``
    when XDG_CONFIG_HOME is unset); `env` defaults to ``os.environ``."""
    env = os.environ if env is None else env
    if env.get("CHARFORGE_CONFIG"):
        return Path(env["CHARFORGE_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "charforge" / "config.yaml"
