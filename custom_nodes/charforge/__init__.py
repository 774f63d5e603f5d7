"""CharForge: character pipelines for ComfyUI.

This package holds the node pack (``charforge.nodes``), the ComfyUI-free engine (``charforge.engine``)
and the bridge to ComfyUI (``charforge.bridge``); the workflow driver installs as ``charforge.driver``.
Importing it is cheap: nothing heavy is imported until a node or engine function needs it. ComfyUI
loads the pack through the repository root's ``__init__.py``, which imports ``charforge.pack``.
"""

__version__ = "0.1.0"
