"""The driver's command line, ``python -m charforge.driver.cli`` (the ``charforge`` command adds the recipes'
groups, see ``charforge.recipes.cli``).

- :mod:`.app`: the parser, the built-in commands (run, wait, validate, status, cancel, convert), ``main``
- :mod:`.common`: :class:`~.common.Output` and :func:`~.common.connect`, shared by every command module
- :mod:`.batch`: ``charforge batch plan|run|status``
- :mod:`.runpod`: ``charforge runpod ...`` and RunPod server strings for run/wait/status/cancel/validate

A command group is a module with ``register(sub, *, server, output)``, listed in ``COMMAND_MODULES``.
"""

from .app import COMMAND_MODULES, build_parser, main
from .common import Output, connect

__all__ = ["COMMAND_MODULES", "Output", "build_parser", "connect", "main"]
