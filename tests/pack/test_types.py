"""The type checker passes (issue 17 item 7), so CI's `make test` catches what `make lint` reports.

mypy reads pyproject's [tool.mypy]: the node pack (engine, shared code, nodes), the driver and the recipes,
checked as Python 3.10. The driver and the recipes install as ``charforge.driver`` and ``charforge.recipes``, a layout mypy cannot
see in the editable install, so the test links them as build/mypy/charforge/{driver,recipes} (on mypy_path), as
the Makefile's lint target does: same paths in the reports, one cache.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_mypy_is_clean():
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    if mypy is None:
        pytest.fail("mypy is missing: pip install -e '.[dev]' (make setup does)")
    _link_driver_and_recipes()
    result = subprocess.run([mypy], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"mypy found type errors (make lint shows them too):\n{result.stdout}{result.stderr}"
