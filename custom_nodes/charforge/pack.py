"""What ComfyUI loads: registers the pack's model folders, reports missing optional packages, and
exposes the node mappings. The repository root's ``__init__.py`` re-exports these names."""

from __future__ import annotations

import logging

from . import __version__, bridge, deps
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

log = logging.getLogger("charforge")


def _on_load() -> None:
    folders = bridge.register_model_folders()
    deps.log_startup_report()
    log.info("CharForge %s: %d nodes, model folders %s", __version__, len(NODE_CLASS_MAPPINGS), ", ".join(folders))


if bridge.in_comfyui():
    _on_load()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
