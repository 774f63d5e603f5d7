"""The ``charforge`` command: the driver's command groups and the recipes', in one parser.

The driver's own command line (``python -m charforge.driver.cli``) has only the driver's groups, because the
driver never imports a recipe; this module hands the driver's parser every group, in the order ``charforge
--help`` lists them. A recipe's group module imports its recipe (and through it the engine) only when its
command runs, so ``charforge run`` and every other driver command start without torch, numpy or Pillow.
"""

from __future__ import annotations

from typing import IO

from charforge.driver import cli as driver_cli

COMMAND_MODULES: tuple[str, ...] = (
    "charforge.driver.cli.batch",
    "charforge.recipes.cli.story",
    "charforge.driver.cli.runpod",
    "charforge.driver.cli.replicate",
    "charforge.recipes.cli.train",
    "charforge.recipes.cli.library",
    "charforge.recipes.cli.dataset",
    "charforge.recipes.cli.tune",
    "charforge.recipes.cli.pipeline",
    "charforge.recipes.cli.video",
)


def build_parser():
    """The parser of every ``charforge`` command."""
    return driver_cli.build_parser(COMMAND_MODULES)


def main(
    argv: list[str] | None = None, *, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> int:
    """Run the ``charforge`` command line; returns the exit code (see ``charforge --help``)."""
    return driver_cli.main(argv, stdout=stdout, stderr=stderr, command_modules=COMMAND_MODULES)
