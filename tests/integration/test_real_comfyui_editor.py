"""Opt-in: every shipped workflow opens cleanly in the real ComfyUI editor, as a template of the pack.

Runs when COMFYUI_DIR points at a ComfyUI whose frontend package is installed, a Chromium is at ``$CHROMIUM``
or ``/usr/bin/chromium`` and Python Playwright is importable (its browsers are not needed). Starts its own
ComfyUI (``--cpu``, free loopback port, throwaway base directory) with the pack linked by install.py, then
loads each workflow the way the template browser does (workflows/thumbnails.py) and checks that the editor
raised no warning, error or toast (the schema check of the workflow's id was one), holds every node, and shows
the Note; and that the server lists each workflow as a template with its thumbnail.
"""

from __future__ import annotations

import shutil
import urllib.request

import pytest

from cf_testing.comfyui import REPO_ROOT, load_script
from cf_testing.real_comfyui import (
    CHROMIUM,
    browser_skip_reason,
    comfyui_dir,
    comfyui_python,
    install_pack,
    start_comfyui,
)

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(browser_skip_reason() is not None, reason=str(browser_skip_reason())),
]


thumbnails = load_script(REPO_ROOT / "workflows" / "thumbnails.py", "charforge_workflows_thumbnails")
NAMES = thumbnails.workflow_names()


@pytest.fixture(scope="module")
def editor_server(tmp_path_factory):
    comfy = comfyui_dir()
    base = tmp_path_factory.mktemp("editor_base")
    install_pack(comfy, base, capture_output=True)
    # A ComfyUI folder ships input/example.png, which LoadImage nodes (controlnet_lora) show by default; a fresh
    # base directory has no input folder of its own.
    if (comfy / "input" / "example.png").is_file():
        (base / "input").mkdir(exist_ok=True)
        shutil.copy2(comfy / "input" / "example.png", base / "input" / "example.png")
    server = start_comfyui(comfy, base, comfyui_python(comfy))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def loaded(editor_server, tmp_path_factory):
    shots = tmp_path_factory.mktemp("editor_screenshots")
    results, _ = thumbnails.open_workflows(editor_server.url, NAMES, chromium=CHROMIUM, screenshots=shots)
    return {result.name: result for result in results}


def test_the_server_lists_every_workflow_as_a_template_with_its_thumbnail(editor_server):
    assert thumbnails.served_templates(editor_server.url) == NAMES
    for name in NAMES:
        url = f"{editor_server.url}/api/workflow_templates/{thumbnails.PACK_MODULE}/{name}.jpg"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"
            assert response.read() == (REPO_ROOT / "workflows" / f"{name}.jpg").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_the_editor_opens_the_workflow_without_a_warning(loaded, name):
    result = loaded[name]
    assert result.problems == [], "\n".join(result.problems)
    assert not any("zod" in line.lower() or "uuid" in line.lower() for line in result.console + result.toasts)
    assert result.notes_on_screen
