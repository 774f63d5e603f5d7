"""The type checker's configuration covers what it should (issue 17 item 7).

`make lint` (run by CI's .ci/run before the tests) runs mypy over pyproject's [tool.mypy] packages: the node
pack (engine, shared code, nodes), the driver and the recipes, checked as the oldest Python the project
supports. These tests keep that configuration honest when packages or the minimum Python change.
"""

from pathlib import Path

from cf_testing.comfyui import REPO_ROOT
from cf_testing.compat import tomllib

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_mypy_checks_the_minimum_python():
    minimum = PYPROJECT["project"]["requires-python"].strip().removeprefix(">=").strip()
    assert PYPROJECT["tool"]["mypy"]["python_version"] == minimum


def test_mypy_checks_every_package():
    # mypy walks a package's folder; the driver and the recipes install from folders of their own, so every
    # package-dir root is named (a new root must be added to [tool.mypy] packages too).
    assert set(PYPROJECT["tool"]["mypy"]["packages"]) == set(PYPROJECT["tool"]["setuptools"]["package-dir"])


def _link_driver_and_recipes() -> None:
    links = REPO_ROOT / "build" / "mypy" / "charforge"
    links.mkdir(parents=True, exist_ok=True)
    for name in ("driver", "recipes"):
        link = links / name
        if not (link.is_symlink() and link.resolve() == (REPO_ROOT / name).resolve()):
            if link.is_symlink():
                link.unlink()
            link.symlink_to(Path("..", "..", "..", name), target_is_directory=True)
