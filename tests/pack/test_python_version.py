"""The oldest Python in pyproject's requires-python is the one the tools check against.

ComfyUI users run Python 3.10 to 3.12, so the pack promises 3.10. CI has a newer Python only, so instead of
running the suite on 3.10, `make lint` (run by .ci/run) asks vermin which Python each tracked source file needs;
these tests keep ruff's and vermin's targets equal to requires-python.
"""

import re

from cf_testing.comfyui import REPO_ROOT
from cf_testing.compat import tomllib

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _minimum_python() -> str:
    match = re.fullmatch(r">=\s*(3\.\d+)", PYPROJECT["project"]["requires-python"].strip())
    assert match, (
        f"requires-python should be a plain lower bound, got {PYPROJECT['project']['requires-python']!r}"
    )
    return match.group(1)


def test_ruff_targets_the_minimum_python():
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py" + _minimum_python().replace(".", "")
