#!/usr/bin/env python3
"""Install the CharForge node pack into a ComfyUI.

    python install.py --comfyui PATH [--base-directory DIR] [--copy] [--python PY] [--no-deps]
                      [--start [-- ARGS...]]

Puts this repository into ``PATH/custom_nodes/charforge`` (``DIR/custom_nodes/charforge`` when ComfyUI
runs with ``--base-directory DIR``) (a symbolic link by default, a copy with
``--copy``), then installs requirements.txt into the Python that runs that ComfyUI, which may not be the
Python running this script: ``--python``, else ``$COMFYUI_PYTHON``, else a venv inside PATH
(``venv``, ``.venv``), else the portable build's ``python_embeded``, else this Python.

Run with no arguments from inside ``ComfyUI/custom_nodes/<pack>`` (what ComfyUI-Manager does after a
clone), it only installs the missing requirements into the current Python. Every run is idempotent:
requirements already satisfied are skipped, an existing link to this checkout is kept.

Uses the standard library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACK_NAME = "charforge"
REQUIREMENTS = HERE / "requirements.txt"
# Requirements whose failure leaves the pack usable (only some nodes need them): reported, not fatal.
OPTIONAL_REQUIREMENTS = {"insightface"}
# ComfyUI owns these; a pack must never reinstall or downgrade them.
NEVER_INSTALL = {"torch", "torchvision", "torchaudio", "torchsde"}
# What --copy copies: the files ComfyUI loads and serves, nothing else. An allow-list, not a deny-list: a
# checkout also holds build output (.venv, out/ with `make demo`'s ComfyUI, whose custom_nodes/charforge links
# back here), and copying "everything but" once copied the repository into itself through that link.
COPY_FILES = ("__init__.py", "install.py", "requirements.txt", "pyproject.toml", "README.md")
COPY_FILE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
# Folders copied with their subfolders, keeping only files with these suffixes. ComfyUI imports the pack from
# the root __init__.py (which reaches custom_nodes/charforge/ and its web/ extension for the editor, .js/.css)
# and serves workflows/ as the pack's templates (editor files with their .jpg thumbnails; api/ holds the twins
# `charforge run` takes).
# (folder, suffixes kept, with subfolders?)
COPY_FOLDERS = (
    ("custom_nodes/charforge", (".py", ".json", ".yaml", ".txt", ".csv", ".md", ".js", ".css"), True),
    ("workflows", (".json", ".jpg"), False),
    ("workflows/api", (".json",), False),
)

# Run inside the target Python: which requirement lines are not satisfied there. pip vendors `packaging`.
_PROBE = r"""
import json, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
missing = []
for line in json.loads(sys.argv[1]):
    req = Requirement(line)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        missing.append(line)
        continue
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        missing.append(line)
print(json.dumps(missing))
"""


class InstallError(Exception):
    pass


def say(message: str) -> None:
    print(f"[charforge] {message}", flush=True)


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def requirement_name(line: str) -> str:
    for sep in "<>=!~;[ ":
        line = line.split(sep, 1)[0]
    return line.strip().lower()


def check_comfyui(path: Path) -> Path:
    path = path.expanduser().resolve()
    if not (path / "main.py").is_file() or not (path / "folder_paths.py").is_file():
        raise InstallError(
            f"{path} does not look like a ComfyUI folder (no main.py and folder_paths.py there)"
        )
    return path


def find_comfy_python(comfyui: Path | None, explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    if comfyui is not None:
        candidates = [comfyui / v / "bin" / "python" for v in ("venv", ".venv")]
        candidates += [comfyui / v / "Scripts" / "python.exe" for v in ("venv", ".venv")]
        candidates += [comfyui.parent / "python_embeded" / "python.exe"]
        for candidate in candidates:
            if candidate.exists():
                return str(candidate)
        say(
            f"no venv found in {comfyui}; installing into this Python ({sys.executable}). "
            "Pass --python if ComfyUI runs with another one."
        )
    return sys.executable


def unsatisfied(python: str, lines: list[str]) -> list[str]:
    import json

    result = subprocess.run([python, "-c", _PROBE, json.dumps(lines)], capture_output=True, text=True)
    if result.returncode != 0:
        # Cannot tell: let pip decide for every line.
        return lines
    return json.loads(result.stdout)


def install_requirements(python: str, upgrade: bool = False) -> list[str]:
    """Install each missing requirement separately (one broken package must not block the rest).

    Returns the optional requirements that failed; raises InstallError if a required one failed.
    """
    lines = [line for line in read_requirements() if requirement_name(line) not in NEVER_INSTALL]
    todo = lines if upgrade else unsatisfied(python, lines)
    if not todo:
        say(f"requirements already satisfied in {python}")
        return []
    failed_required, failed_optional = [], []
    for line in todo:
        say(f"installing {line} into {python}")
        result = subprocess.run([python, "-m", "pip", "install", line])
        if result.returncode != 0:
            (failed_optional if requirement_name(line) in OPTIONAL_REQUIREMENTS else failed_required).append(
                line
            )
    for line in failed_optional:
        say(
            f"WARNING: {line} failed to install; the nodes that need it will explain what to do when used "
            f'(retry with: {python} -m pip install "{line}")'
        )
    if failed_required:
        raise InstallError(f"could not install: {', '.join(failed_required)} (see pip's output above)")
    return failed_optional


def pack_files(source: Path) -> list[Path]:
    """The files of the pack under `source` that --copy copies (relative paths, sorted).

    Symbolic links are never followed nor copied: a link inside a checkout points at something else
    (a model folder, a ComfyUI linking back to this repository), not at the pack's own files."""
    files = []
    for name in os.listdir(source):
        path = source / name
        if path.is_symlink() or not path.is_file():
            continue
        if name in COPY_FILES or name.upper().startswith(COPY_FILE_PREFIXES):
            files.append(Path(name))
    for tree, suffixes, recursive in COPY_FOLDERS:
        top = source / tree
        if top.is_symlink() or not top.is_dir():
            continue
        for folder, dirs, names in os.walk(top):  # os.walk does not descend into linked folders
            here = Path(folder)
            dirs[:] = sorted(
                d for d in dirs if recursive and d != "__pycache__" and not (here / d).is_symlink()
            )
            for name in names:
                path = here / name
                if path.suffix.lower() in suffixes and not path.is_symlink():
                    files.append(path.relative_to(source))
    return sorted(files)


def copy_pack(source: Path, target: Path) -> int:
    """Copy the pack's own files (:func:`pack_files`) from `source` into the new folder `target`."""
    files = pack_files(source)
    if not (source / "__init__.py").is_file() or not (source / "custom_nodes" / PACK_NAME).is_dir():
        raise InstallError(
            f"{source} is not a CharForge checkout (no __init__.py and custom_nodes/{PACK_NAME})"
        )
    for rel in files:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target / rel)
    return len(files)


def place_pack(custom_nodes: Path, copy: bool, force: bool) -> Path:
    """Link (or copy) this checkout into a ComfyUI custom_nodes folder; return the installed path."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    if HERE.parent == custom_nodes.resolve():
        say(f"this checkout is already a ComfyUI pack at {HERE}; nothing to link")
        return HERE
    target = custom_nodes / PACK_NAME
    if target.resolve() == HERE:
        if copy and target.is_symlink():
            target.unlink()
        else:
            say(f"{target} already points to this checkout")
            return target
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        if not (target / "install.py").exists() and not force:
            raise InstallError(
                f"{target} exists and is not a CharForge install; move it away or pass --force"
            )
        backup = target.with_name(f"{PACK_NAME}.old.disabled")  # ComfyUI skips *.disabled
        if backup.exists():
            shutil.rmtree(backup)
        target.rename(backup)
        say(f"previous install moved to {backup}")
    if copy:
        staging = target.with_name(f"{PACK_NAME}.partial.disabled")
        if staging.exists():
            shutil.rmtree(staging)
        count = copy_pack(HERE, staging)
        staging.rename(target)
        say(f"copied the pack ({count} files) to {target}")
    else:
        os.symlink(HERE, target, target_is_directory=True)
        say(f"linked {target} -> {HERE}")
    return target


def start_comfyui(comfyui: Path, python: str, extra: list[str]) -> int:
    command = [python, "main.py", *extra]
    say(f"starting ComfyUI: {' '.join(command)} (in {comfyui})")
    try:
        return subprocess.call(command, cwd=comfyui)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description="Install the CharForge node pack into a ComfyUI.")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI folder (the one holding main.py)")
    parser.add_argument(
        "--base-directory",
        type=Path,
        help="ComfyUI's --base-directory, if it runs with one (the pack goes into its custom_nodes)",
    )
    parser.add_argument("--python", help="Python that runs ComfyUI (default: found next to it, see above)")
    parser.add_argument("--copy", action="store_true", help="copy the pack instead of linking it")
    parser.add_argument("--force", action="store_true", help="replace an existing custom_nodes/charforge")
    parser.add_argument("--no-deps", action="store_true", help="do not install requirements")
    parser.add_argument(
        "--upgrade", action="store_true", help="reinstall every requirement, even satisfied ones"
    )
    parser.add_argument(
        "--start", action="store_true", help="start ComfyUI afterwards (arguments after -- go to it)"
    )
    args = parser.parse_args(argv)

    try:
        if args.comfyui is None:
            # ComfyUI-Manager runs this from custom_nodes/<pack> with ComfyUI's own Python.
            env_path = os.environ.get("COMFYUI_PATH")
            comfyui = check_comfyui(Path(env_path)) if env_path else None
            if not args.no_deps:
                install_requirements(args.python or sys.executable, upgrade=args.upgrade)
            if args.start:
                if comfyui is None:
                    raise InstallError("--start needs --comfyui PATH")
                return start_comfyui(comfyui, args.python or sys.executable, passthrough)
            return 0
        comfyui = check_comfyui(args.comfyui)
        python = find_comfy_python(comfyui, args.python)
        base = args.base_directory.expanduser().resolve() if args.base_directory else comfyui
        place_pack(base / "custom_nodes", copy=args.copy, force=args.force)
        if not args.no_deps:
            install_requirements(python, upgrade=args.upgrade)
        if not args.start:
            say("done: (re)start ComfyUI; the nodes are under the CharForge/ menu")
        else:
            if args.base_directory and "--base-directory" not in passthrough:
                passthrough = ["--base-directory", str(base), *passthrough]
            return start_comfyui(comfyui, python, passthrough)
        return 0
    except InstallError as exc:
        say(f"ERROR: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
