"""The repository stands on its own: no file points at material that lives outside it.

Facts the code relies on (ComfyUI's behaviour, file conventions, model configs and FLOP counts, code style)
are written down in docs/; comments cite those pages by section ("docs/model-configs.md §9.1"). This test
fails when a tracked file points outside the repository again, or cites a section a page does not have.
"""

import re
import subprocess
from pathlib import Path

import pytest

from cf_testing.comfyui import REPO_ROOT

THIS_FILE = Path(__file__).resolve().relative_to(REPO_ROOT).as_posix()
# Spelt in pieces so that this file does not match itself.
OUTSIDE = [s.replace("|", "") for s in ("shared|/reference", "shared|/STYLE", "..|/shared", "/work|/shared")]
CITED_PAGES = ("comfyui-contract.md", "ecosystem.md", "model-configs.md")
CITATION = re.compile(r"docs/(" + "|".join(re.escape(p) for p in CITED_PAGES) + r")`{0,2} §(\d+(?:\.\d+)?)")


def _tracked_texts() -> dict[str, str]:
    try:
        names = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    texts = {}
    for name in names.decode().split("\0"):
        path = REPO_ROOT / name
        if not name or name == THIS_FILE or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" not in data[:8192]:  # text files only
            texts[name] = data.decode("utf-8", errors="replace")
    return texts


def test_no_tracked_file_points_outside_the_repository():
    found = [
        f"{name}:{number}: {line.strip()}"
        for name, text in _tracked_texts().items()
        for number, line in enumerate(text.splitlines(), 1)
        if any(marker in line for marker in OUTSIDE)
    ]
    assert not found, (
        "these lines point at files outside the repository; write the fact into docs/ in our "
        "own words and cite that page instead:\n" + "\n".join(found)
    )


def test_cited_sections_exist():
    headings = {}
    for page in CITED_PAGES:
        text = (REPO_ROOT / "docs" / page).read_text()
        headings[page] = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", text, re.M))
    missing = [
        f"{name}: docs/{page} §{section}"
        for name, text in _tracked_texts().items()
        for page, section in CITATION.findall(text)
        if section not in headings[page]
    ]
    assert not missing, "citations of sections that do not exist:\n" + "\n".join(missing)
