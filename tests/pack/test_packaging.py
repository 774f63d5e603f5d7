"""Packaging: pyproject, requirements and install.py agree and do what users rely on."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cf_testing.comfyui import REPO_ROOT, load_script
from cf_testing.compat import tomllib

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


install = load_script(REPO_ROOT / "install.py", "cf_install")


def test_every_package_folder_is_packaged():
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO_ROOT / folder).parts
            sub = ".".join((name, *rel)) if rel else name
            if not any(
                sub.startswith(other + ".") or sub == other
                for other in mapping
                if other != name and other.startswith(name + ".")
            ):
                found.add(sub)
    assert found == declared


def test_requirements_match_the_nodes_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    wanted = {install.requirement_name(r) for r in extras["nodes"] + extras["faces"]} - install.NEVER_INSTALL
    listed = [install.requirement_name(r) for r in install.read_requirements()]
    assert set(listed) == wanted
    assert not set(listed) & install.NEVER_INSTALL, "ComfyUI owns torch: never list it"
    # ComfyUI-Manager installs line by line: no options, includes or inline comments.
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        assert not line.startswith("-") and " #" not in line


def test_registry_metadata():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "CharForge" and comfy["Icon"]
    assert PYPROJECT["project"]["name"] == "charforge"
    assert PYPROJECT["project"]["scripts"]["charforge"] == "charforge.recipes.cli:main"


def test_registry_icon_is_shipped():
    """[tool.comfy] Icon is a raw GitHub URL of a file on the main branch: that file must be in the repository."""
    from PIL import Image

    url = PYPROJECT["tool"]["comfy"]["Icon"]
    prefix = "https://raw.githubusercontent.com/charforge/charforge/main/"
    assert url.startswith(prefix)
    icon = REPO_ROOT / url[len(prefix) :]
    assert icon.is_file(), f"{icon} is missing (python docs/make_icon.py)"
    with Image.open(icon) as image:
        assert image.format == "PNG" and image.width == image.height and 64 <= image.width <= 400


def test_driver_dependencies_are_light():
    heavy = {"torch", "diffusers", "transformers", "insightface", "onnxruntime", "numpy"}
    assert not {install.requirement_name(d) for d in PYPROJECT["project"]["dependencies"]} & heavy


def _fake_comfyui(tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").write_text("")
    (comfy / "folder_paths.py").write_text("")
    return comfy


def test_install_links_and_is_idempotent(tmp_path):
    comfy = _fake_comfyui(tmp_path)
    args = [sys.executable, str(REPO_ROOT / "install.py"), "--comfyui", str(comfy), "--no-deps"]
    for _ in range(2):
        subprocess.run(args, check=True, capture_output=True)
    target = comfy / "custom_nodes" / "charforge"
    assert target.is_symlink() and target.resolve() == REPO_ROOT
    assert (target / "__init__.py").exists()


def test_install_copy_keeps_what_comfyui_needs_and_backs_up(tmp_path):
    comfy = _fake_comfyui(tmp_path)
    args = [sys.executable, str(REPO_ROOT / "install.py"), "--comfyui", str(comfy), "--no-deps", "--copy"]
    subprocess.run(args, check=True, capture_output=True)
    target = comfy / "custom_nodes" / "charforge"
    assert not target.is_symlink()
    assert (target / "__init__.py").exists() and (
        target / "custom_nodes" / "charforge" / "bridge.py"
    ).exists()
    assert not (target / ".git").exists() and not (target / ".venv").exists()
    subprocess.run(args, check=True, capture_output=True)  # update in place
    assert (comfy / "custom_nodes" / "charforge.old.disabled").exists()


def _checkout_after_demo(tmp_path):
    """A checkout as `make demo` leaves it: the pack's files plus build output, with out/comfyui's
    custom_nodes/charforge linking back to the checkout (a loop) and a link to a folder outside it."""
    repo = tmp_path / "repo"
    for rel in ("__init__.py", "install.py", "requirements.txt", "pyproject.toml", "README.md"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, repo / rel)
    pack = repo / "custom_nodes" / "charforge"
    (pack / "engine" / "train" / "configs" / "sd15").mkdir(parents=True)
    (pack / "__init__.py").write_text("")
    (pack / "pack.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    (pack / "engine" / "train" / "configs" / "sd15" / "unet.json").write_text("{}")
    (pack / "__pycache__").mkdir()
    (pack / "__pycache__" / "pack.cpython-311.pyc").write_bytes(b"0")
    (repo / "workflows" / "api").mkdir(parents=True)
    (repo / "workflows" / "object_info").mkdir()
    for rel in (
        "workflows/dataset_prep.json",
        "workflows/dataset_prep.jpg",
        "workflows/api/dataset_prep.json",
        "workflows/layout.py",
        "workflows/object_info/builtin.json",
        "LICENSE",
    ):
        (repo / rel).write_text("x")
    for rel in (
        "out/comfyui/output/charforge/big.png",
        ".venv/lib/site.py",
        "tests/test_x.py",
        "charforge.egg-info/PKG-INFO",
        "docs/pipeline.md",
    ):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    (repo / "out" / "comfyui" / "custom_nodes").mkdir(parents=True)
    (repo / "out" / "comfyui" / "custom_nodes" / "charforge").symlink_to(repo, target_is_directory=True)
    outside = tmp_path / "models"
    outside.mkdir()
    (outside / "huge.safetensors").write_text("x")
    (pack / "models").symlink_to(outside, target_is_directory=True)
    (pack / "linked.py").symlink_to(outside / "huge.safetensors")
    return repo


def test_install_copy_copies_only_the_pack_never_through_links(tmp_path):
    repo = _checkout_after_demo(tmp_path)
    comfy = _fake_comfyui(tmp_path)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(repo / "install.py"), "--comfyui", str(comfy), "--no-deps", "--copy"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    target = comfy / "custom_nodes" / "charforge"
    copied = sorted(str(p.relative_to(target)) for p in target.rglob("*") if not p.is_dir())
    assert copied == [
        "LICENSE",
        "README.md",
        "__init__.py",
        "custom_nodes/charforge/__init__.py",
        "custom_nodes/charforge/engine/train/configs/sd15/unet.json",
        "custom_nodes/charforge/pack.py",
        "install.py",
        "pyproject.toml",
        "requirements.txt",
        "workflows/api/dataset_prep.json",
        "workflows/dataset_prep.jpg",
        "workflows/dataset_prep.json",
    ]
    assert not any(p.is_symlink() for p in target.rglob("*"))
    assert "12 files" in result.stdout


def test_install_copy_of_this_checkout_is_the_allow_list():
    files = install.pack_files(REPO_ROOT)
    assert {Path("__init__.py"), Path("requirements.txt"), Path("install.py")} <= set(files)
    assert Path("custom_nodes/charforge/pack.py") in files
    assert {p.parts[0] for p in files} <= {
        "__init__.py",
        "install.py",
        "requirements.txt",
        "pyproject.toml",
        "README.md",
        "custom_nodes",
        "workflows",
    }
    assert all(p.parts[0] != "out" and "__pycache__" not in p.parts for p in files)
    shipped = {p.name for p in (REPO_ROOT / "workflows").glob("*.json")}
    assert shipped <= {p.name for p in files if p.parent == Path("workflows")}


def test_install_refuses_foreign_folder_and_non_comfyui(tmp_path):
    comfy = _fake_comfyui(tmp_path)
    (comfy / "custom_nodes" / "charforge").mkdir()
    (comfy / "custom_nodes" / "charforge" / "precious.txt").write_text("keep me")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "install.py"), "--comfyui", str(comfy), "--no-deps"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "--force" in result.stdout
    assert (comfy / "custom_nodes" / "charforge" / "precious.txt").exists()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "install.py"), "--comfyui", str(tmp_path), "--no-deps"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "does not look like a ComfyUI" in result.stdout


def test_finds_comfyui_venv_python(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PYTHON", raising=False)
    comfy = _fake_comfyui(tmp_path)
    python = comfy / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert install.find_comfy_python(comfy, None) == str(python)
    monkeypatch.setenv("COMFYUI_PYTHON", "/opt/other/python")
    assert install.find_comfy_python(comfy, None) == "/opt/other/python"
    assert install.find_comfy_python(comfy, "/explicit/python") == "/explicit/python"


def test_probe_reports_only_unsatisfied_requirements():
    lines = ["pytest>=1", "pytest>=999", "surely-not-installed-charforge-x"]
    assert install.unsatisfied(sys.executable, lines) == lines[1:]


def test_requirements_install_one_by_one_optional_failures_tolerated(monkeypatch):
    calls = []

    def fake_run(cmd, *a, **k):
        calls.append(cmd)
        if cmd[1] == "-c":
            return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(install.read_requirements()))
        return subprocess.CompletedProcess(cmd, 1 if "insightface" in cmd[-1] else 0)

    monkeypatch.setattr(install.subprocess, "run", fake_run)
    failed = install.install_requirements("/comfy/python")
    assert failed == [line for line in install.read_requirements() if line.startswith("insightface")]
    pip_calls = [c for c in calls if c[1] == "-m"]
    assert len(pip_calls) == len(install.read_requirements())
    assert all(c[:4] == ["/comfy/python", "-m", "pip", "install"] and len(c) == 5 for c in pip_calls)

    def fail_numpy(cmd, *a, **k):
        if cmd[1] == "-c":
            return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(["numpy>=1.24"]))
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(install.subprocess, "run", fail_numpy)
    with pytest.raises(install.InstallError, match="numpy"):
        install.install_requirements("/comfy/python")


def test_cli_entry_point_runs():
    for module in ("charforge.recipes.cli", "charforge.driver.cli"):  # every command; the driver's alone
        result = subprocess.run(
            [sys.executable, "-m", module, "--version"], capture_output=True, text=True, cwd=Path.home()
        )
        assert result.returncode == 0 and "charforge 0.1.0" in result.stdout, module


def test_the_charforge_command_has_every_group_and_starts_without_heavy_packages():
    """The console script lists the driver's and the recipes' commands in their usual order, without importing
    torch, numpy, Pillow, the engine or a recipe: a driver-only install runs it."""
    code = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "numpy", "PIL"):
            raise ImportError(f"{name} is blocked for this test")
sys.meta_path.insert(0, Blocked())
from charforge.recipes import cli
parser = cli.build_parser()
commands = next(a for a in parser._actions if a.dest == "command").choices
print(list(commands))
print(sorted(m for m in sys.modules if m.startswith(("charforge.engine", "charforge.nodes"))
             or m in ("charforge.recipes.story", "charforge.recipes.lora_eval", "charforge.recipes.pipeline")))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    listed, heavy = result.stdout.splitlines()
    assert listed == str(
        [
            "run",
            "wait",
            "validate",
            "status",
            "cancel",
            "convert",
            "batch",
            "story",
            "runpod",
            "replicate",
            "train",
            "lora",
            "character",
            "dataset",
            "tune",
            "pipeline",
            "video",
        ]
    )
    assert heavy == "[]"


def test_readme_node_catalogue_is_up_to_date():
    from charforge import catalogue

    readme = (REPO_ROOT / "README.md").read_text()
    assert catalogue.replace_block(readme, catalogue.render()) == readme, "run `make catalogue`"
    for node_id in catalogue.NODE_CLASS_MAPPINGS:
        assert f"`{node_id}`" in readme


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "make test" in first_block and "install.py" in first_block
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
