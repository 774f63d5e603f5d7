"""The oldest Python in pyproject's requires-python really runs the code (CI has only one Python).

ComfyUI users run Python 3.10 to 3.12, so the pack promises 3.10. The machines and CI have a newer Python, so
instead of running the suite on 3.10 this test asks vermin (dev extra) which Python each tracked source file
needs, from its syntax and the standard-library names it uses. It honours ``sys.version_info`` guards, such
as the tomllib fallback in cf_testing/compat.py.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cf_testing.comfyui import REPO_ROOT
from cf_testing.compat import tomllib

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _minimum_python() -> str:
    match = re.fullmatch(r">=\s*(3\.\d+)", PYPROJECT["project"]["requires-python"].strip())
    assert match, f"requires-python should be a plain lower bound, got {PYPROJECT['project']['requires-python']!r}"
    return match.group(1)


def test_ruff_targets_the_minimum_python():
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py" + _minimum_python().replace(".", "")


def test_no_source_needs_a_newer_python_than_requires_python():
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if vermin is None:
        pytest.fail("vermin is missing: pip install -e '.[dev]' (make setup does)")
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert files
    result = subprocess.run([vermin, f"--target={_minimum_python()}-", "--violations", "--no-tips", "--quiet",
                             "--processes=1", *files], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"needs a newer Python than {_minimum_python()}:\n{result.stdout}{result.stderr}"
