"""Opt-in: the pack in a real ComfyUI, installed the three ways users install packs.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (COMFYUI_PYTHON: the Python that runs it, default
its venv). Each test starts its own server (``--cpu``, free loopback port, throwaway base directory),
checks /object_info and the startup log, runs a CharForge node through /prompt, and stops the server.
The clone and registry paths install what is committed (HEAD), as users get it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import cf_testing.real_comfyui as real
from cf_testing.comfyui import REPO_ROOT
from charforge.nodes import NODE_CLASS_MAPPINGS

pytestmark = real.suite_marks(slow=False)


@pytest.fixture
def comfy():
    path = real.comfyui_dir()
    assert (path / "main.py").exists(), f"COMFYUI_DIR={path} has no main.py"
    return path


def _check_server(server, pack_dir_name: str) -> None:
    info = server.get("/object_info")
    ours = {node_id: entry for node_id, entry in info.items() if node_id.startswith("CharForge")}
    assert set(ours) == set(NODE_CLASS_MAPPINGS), f"missing: {set(NODE_CLASS_MAPPINGS) - set(ours)}"
    for node_id, entry in ours.items():
        assert entry["category"].startswith("CharForge/"), (node_id, entry["category"])
        assert entry["python_module"] == f"custom_nodes.{pack_dir_name}"
        assert entry["description"]
    log = server.log()
    assert not real.pack_import_failures(log, pack_dir_name), real.pack_import_failures(log, pack_dir_name)
    assert "Unable to parse pyproject.toml" not in log
    assert "CharForge 0.1.0:" in log  # the pack's own startup line
    # The model folders the pack registers are real ComfyUI folder keys now.
    assert "animatediff_models" in server.get("/models")

    # Run a CharForge node through the real executor.
    photos = server.base_dir / "input" / "hero"
    photos.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate([(64, 48), (30, 90)]):
        Image.new("RGB", size, (200, 10 * index, 0)).save(photos / f"p{index}.png")
    (photos / "broken.jpg").write_bytes(b"not an image")
    prompt = {
        "1": {
            "class_type": "CharForgeListImages",
            "inputs": {"folder": "hero", "recursive": False, "max_preview": 4, "preview_size": 64},
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    if "cv2" not in server.hidden_modules:
        prompt["3"] = {
            "class_type": "CharForgeImageQuality",
            "inputs": {"images": ["1", 0], "min_sharpness": 60.0},
        }
    prompt_id = str(uuid.uuid4())
    reply = server.post("/prompt", {"prompt": prompt, "prompt_id": prompt_id, "client_id": "cf-test"})
    assert reply["node_errors"] == {}
    entry = server.wait_history(prompt_id)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert (
        "2 image(s)" in entry["outputs"]["1"]["text"][0] and "broken.jpg" in entry["outputs"]["1"]["text"][0]
    )
    assert len(entry["outputs"]["2"]["images"]) == 2
    if "3" in prompt:
        assert entry["outputs"]["3"]["text"][0].endswith("image(s) sharp (min_sharpness 60)")


def _clone(target: Path) -> None:
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if dirty:
        print("note: uncommitted changes are not part of the clone/registry installs")
    subprocess.run(
        ["git", "clone", "--quiet", "--depth", "1", f"file://{REPO_ROOT}", str(target)], check=True
    )


def test_install_py_into_comfyui(comfy, tmp_path):
    base = tmp_path / "base"
    python = real.comfyui_python(comfy)
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "install.py"),
            "--comfyui",
            str(comfy),
            "--base-directory",
            str(base),
            "--python",
            python,
        ],
        check=True,
    )
    assert (base / "custom_nodes" / "charforge").is_symlink()
    server = real.start_comfyui(comfy, base, python)
    try:
        _check_server(server, "charforge")
    finally:
        server.stop()


def _install_like_manager_and_check(comfy: Path, base: Path, pack: Path) -> None:
    """ComfyUI-Manager runs the pack's install.py with ComfyUI's Python, cwd = pack, COMFYUI_PATH set."""
    python = real.comfyui_python(comfy)
    subprocess.run(
        [python, "install.py"], cwd=pack, env=dict(os.environ, COMFYUI_PATH=str(comfy)), check=True
    )
    server = real.start_comfyui(comfy, base, python)
    try:
        _check_server(server, pack.name)
    finally:
        server.stop()


def test_cloned_into_custom_nodes_like_manager(comfy, tmp_path):
    base = tmp_path / "base"
    pack = base / "custom_nodes" / "CharForge"
    _clone(pack)
    _install_like_manager_and_check(comfy, base, pack)


def _registry_zip(work: Path) -> Path:
    """The archive the Comfy Registry serves: `comfy node pack` output when comfy-cli is installed, else the
    same selection (git-tracked files minus .comfyignore) made here."""
    clone = work / "clone"
    _clone(clone)
    comfy_cli = os.environ.get("COMFY_CLI") or shutil.which("comfy")
    if comfy_cli:
        subprocess.run(
            [comfy_cli, "--skip-prompt", "--no-enable-telemetry", "node", "pack"], cwd=clone, check=True
        )
        return clone / "node.zip"
    import fnmatch

    patterns = [p.strip() for p in (clone / ".comfyignore").read_text().splitlines() if p.strip()]
    files = subprocess.run(
        ["git", "ls-files"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout.split()
    archive = work / "node.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in files:
            if not any(fnmatch.fnmatch(name, p) or name.startswith(p.rstrip("/") + "/") for p in patterns):
                zf.write(clone / name, name)
    return archive


def test_registry_layout(comfy, tmp_path):
    archive = _registry_zip(tmp_path)
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert "__init__.py" in names and "pyproject.toml" in names and "requirements.txt" in names
        assert not any(n.startswith("tests/") for n in names), "tests are not shipped to the registry"
        base = tmp_path / "base"
        pack = base / "custom_nodes" / "charforge"
        zf.extractall(pack)
    _install_like_manager_and_check(comfy, base, pack)


def test_missing_optional_packages_do_not_stop_the_pack(comfy, tmp_path):
    """insightface and opencv hidden from ComfyUI's Python: the pack loads, the log says what to install."""
    base = tmp_path / "base"
    hide = tmp_path / "hide"
    hide.mkdir()
    # A None entry in sys.modules makes `import x` fail and find_spec('x') return None, as if not installed.
    (hide / "sitecustomize.py").write_text(
        "import sys\nsys.modules['insightface'] = None\nsys.modules['cv2'] = None\n"
    )
    python = real.comfyui_python(comfy)
    real.install_pack(comfy, base)
    server = real.start_comfyui(comfy, base, python, env={"PYTHONPATH": str(hide)})
    server.hidden_modules = {"cv2", "insightface"}
    try:
        log = server.log()
        assert "insightface: needed for face identity scoring" in log
        assert "opencv-python-headless: needed for" in log and "pip install" in log
        assert {"CharForgeListImages", "CharForgeImageQuality"} <= set(server.get("/object_info"))
        # The node that needs opencv fails with a message saying what to install; the server carries on.
        prompt_id = str(uuid.uuid4())
        server.post(
            "/prompt",
            {
                "prompt_id": prompt_id,
                "client_id": "cf-test",
                "prompt": {
                    "1": {
                        "class_type": "EmptyImage",
                        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
                    },
                    "2": {
                        "class_type": "CharForgeImageQuality",
                        "inputs": {"images": ["1", 0], "min_sharpness": 60.0},
                    },
                },
            },
        )
        entry = server.wait_history(prompt_id)
        assert entry["status"]["status_str"] == "error"
        errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
        assert errors and errors[0]["node_type"] == "CharForgeImageQuality"
        assert errors[0]["exception_type"].endswith("MissingDependencyError")
        assert "pip install opencv-python-headless" in errors[0]["exception_message"]
        _check_server(server, "charforge")
    finally:
        server.stop()
