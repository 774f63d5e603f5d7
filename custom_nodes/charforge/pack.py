"""What ComfyUI loads: registers the pack's model folders, reports missing optional packages, and
exposes the node mappings and the panel's routes. The repository root's ``__init__.py`` re-exports these
names and ``WEB_DIRECTORY`` (the editor extension in ``web/``)."""

from __future__ import annotations

import logging

from . import __version__, bridge, deps
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, panel, transfer

log = logging.getLogger("charforge")


def _on_load() -> None:
    folders = bridge.register_model_folders()
    deps.log_startup_report()
    panel.register_routes()  # the editor's CharForge tab (web/) reads runs, datasets and characters here
    transfer.register_routes()  # a remote driver's photos up, results home, models in place
    log.info(
        "CharForge %s: %d nodes, model folders %s", __version__, len(NODE_CLASS_MAPPINGS), ", ".join(folders)
    )


if bridge.in_comfyui():
    _on_load()

# The CharForge sidebar tab of the editor: plain ES modules ComfyUI serves and loads (relative to the
# repository root, whose __init__.py re-exports this).
WEB_DIRECTORY = "./custom_nodes/charforge/web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
