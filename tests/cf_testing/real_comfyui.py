"""Start and stop a real ComfyUI for the opt-in integration suite (``COMFYUI_DIR`` set).

Each server gets its own throwaway ``--base-directory`` and a free loopback port, runs with ``--cpu``,
and writes its log to a file the tests read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from .comfyui import REPO_ROOT, place_models

#: why an opt-in real-ComfyUI test module is skipped when no ComfyUI is named
SKIP_REASON = (
    "set COMFYUI_DIR (and optionally COMFYUI_PYTHON) to run the real-ComfyUI suite; see CONTRIBUTING.md"
)
#: the browser the editor tests drive (Playwright's own browsers are never downloaded)
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


# ComfyUI's own SD1.5 U-Net config (comfy/model_detection.py, unet_config_from_diffusers_unet).
SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# ComfyUI's own SDXL U-Net config (the same function): 70 transformer blocks, text width 2048, the adm input.
SDXL_UNET_CONFIG = {key: value for key, value in SD15_UNET_CONFIG.items() if key != "num_heads"} | {
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
}

# A tiny CLIP vision config for ComfyUI's ClipVisionModel (its loader picks full-size ViT configs from a
# file's keys, so the tests build the model from this config instead).
TINY_CLIP_VISION = {
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    "image_size": 28,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 14,
    "projection_dim": 24,
}


def small_unet_config(family: str, **changes) -> dict:
    """ComfyUI's U-Net config of `family` ("sd15" or "sdxl") at 32 base channels: every block and
    cross-attention slot of the full-size layout, narrower. SD1.5 leaves its heads to ComfyUI's ``SD15``
    class (it sets 8); `changes` replace entries."""
    full = SDXL_UNET_CONFIG if family == "sdxl" else SD15_UNET_CONFIG
    return (
        {key: value for key, value in full.items() if key != "num_heads"} | {"model_channels": 32} | changes
    )


# How every ComfyUI-side script starts: ComfyUI's folder (the working directory) first on sys.path, the job
# read from the last argument, ComfyUI's argument parser given --cpu before any of its modules loads.
_SCRIPT_START = """\
import json, os, sys
sys.path.insert(0, os.getcwd())  # cwd = the ComfyUI folder
job = json.load(open(sys.argv[-1]))
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
"""


def comfy_script(imports: str, body: str) -> str:
    """A script for `run_comfy_script`: ComfyUI started on the CPU (``json``, ``os``, ``sys``, ``torch`` and
    ``job`` defined), then `imports` (ComfyUI's modules and others), then the pack's parent folder
    (``job["pack_parent"]``) put first on sys.path, then `body`. Both are dedented."""
    pack = 'sys.path.insert(0, job["pack_parent"])\n'
    return _SCRIPT_START + textwrap.dedent(imports).strip() + "\n" + pack + textwrap.dedent(body).lstrip("\n")


def comfyui_dir() -> Path | None:
    value = os.environ.get("COMFYUI_DIR")
    return Path(value).expanduser().resolve() if value else None


def comfyui_python(comfy: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    for candidate in (comfy / "venv" / "bin" / "python", comfy / ".venv" / "bin" / "python"):
        if candidate.exists():
            return str(candidate)
    return sys.executable


def checkout() -> Path:
    """The ComfyUI checkout of ``COMFYUI_DIR`` (the suite is skipped without it), asserted to be one."""
    path = comfyui_dir()
    assert path is not None and (path / "main.py").exists(), f"COMFYUI_DIR={path} has no main.py"
    return path


def run_comfy_script(comfy: Path, folder: Path, script: str, job: dict, timeout: float = 1800) -> dict:
    """Run `script` (written to `folder`) in ComfyUI's Python with the ComfyUI folder as working directory
    and a JSON file of `job` as its last argument; returns the JSON its last ``RESULT `` line printed
    (the test fails with the tails of its output when it failed or printed none)."""
    import json
    import subprocess

    (folder / "job.json").write_text(json.dumps(job))
    (folder / "comfy_side.py").write_text(script)
    proc = subprocess.run(
        [comfyui_python(comfy), str(folder / "comfy_side.py"), str(folder / "job.json")],
        cwd=comfy,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"ComfyUI side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def suite_marks(*extra: pytest.MarkDecorator, slow: bool = True) -> list[pytest.MarkDecorator]:
    """The ``pytestmark`` of an opt-in real-ComfyUI test module: marked ``comfyui`` (and ``slow``, and any
    `extra` marks such as a longer timeout), skipped with :data:`SKIP_REASON` when ``COMFYUI_DIR`` is unset."""
    return [
        pytest.mark.comfyui,
        *([pytest.mark.slow] if slow else []),
        *extra,
        pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON),
    ]


def browser_skip_reason() -> str | None:
    """Why a browser test of the editor cannot run here (no ComfyUI, no Chromium, no Playwright), or None."""
    if comfyui_dir() is None:
        return "set COMFYUI_DIR (and optionally COMFYUI_PYTHON) to run the real-ComfyUI suite"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if importlib.util.find_spec("playwright") is None:
        return "Python Playwright is not installed (pip install playwright; no `playwright install` needed)"
    return None


def install_pack(comfy: Path, base: Path, *, capture_output: bool = False) -> None:
    """Link the pack into the throwaway `base` directory of ComfyUI `comfy` with install.py, as a user would
    (``--no-deps``: the test ComfyUI's Python has the packages already)."""
    command = [sys.executable, str(REPO_ROOT / "install.py"), "--comfyui", str(comfy)]
    subprocess.run(
        [*command, "--base-directory", str(base), "--no-deps"], check=True, capture_output=capture_output
    )


def link_pack(base: Path) -> None:
    """Link the pack into `base`/custom_nodes directly (the tests that do not exercise install.py)."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "charforge").symlink_to(REPO_ROOT)


def base_with_models(
    tmp_path: Path, diffusers: Mapping[str, Path], files: Sequence[tuple[str, Path]] = ()
) -> Path:
    """A throwaway base directory (`tmp_path`/base) with the pack linked and models where a user puts them:
    each diffusers folder copied to models/diffusers/<name>, each (folder, file) copied into models/<folder>/."""
    base = tmp_path / "base"
    link_pack(base)
    place_models(base / "models", diffusers, files)
    return base


def face_checkpoint_base(
    tmp_path: Path, checkpoint, *, clip_folder: bool = False, character_lora: bool = False
) -> tuple[Path, str, Path]:
    """ComfyUI (skipping without insightface), its Python and a base (`tmp_path`/base) with the pack linked,
    the test face models (buffalo_l), `checkpoint` (an sd15_comfy_checkpoint) as sd15_tiny.safetensors and,
    when asked, a tiny CLIP folder (clip_vision/tiny_clip) and a tiny character LoRA (loras/hero.safetensors)."""
    from .face_models import write_clip_folder, write_face_pack

    comfy = comfyui_dir()
    python = comfyui_python(comfy)
    require_module(python, "insightface")
    base = tmp_path / "base"
    link_pack(base)
    write_face_pack(base / "models" / "insightface", "buffalo_l")
    if clip_folder:
        write_clip_folder(base / "models" / "clip_vision" / "tiny_clip")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "sd15_tiny.safetensors").symlink_to(checkpoint.path)
    if character_lora:
        from .video_models import build_tiny_character_lora

        build_tiny_character_lora(base / "models" / "loras" / "hero.safetensors", checkpoint.unet_config)
    return comfy, python, base


def story_inputs(tmp_path: Path, monkeypatch, scenes: Sequence[str], references: int) -> tuple[Path, Path]:
    """A story run's inputs under `tmp_path`: `references` test-face photos of one person (refs/ref<seed>.png)
    and the `scenes` file, with no user config read; returns (refs folder, scenes file)."""
    from PIL import Image

    from .face_models import face_image

    refs = tmp_path / "refs"
    refs.mkdir()
    for seed in range(references):
        Image.fromarray(face_image(person=0, noise=2, seed=seed)).save(refs / f"ref{seed}.png")
    scenes_file = tmp_path / "scenes.txt"
    scenes_file.write_text("\n".join(scenes) + "\n")
    monkeypatch.setenv("CHARFORGE_CONFIG", str(tmp_path / "no-config.yaml"))
    return refs, scenes_file


def require_packages(python: str, *modules: str) -> None:
    """Skip the test when ComfyUI's Python cannot import all of `modules` (the pack's requirements)."""
    if subprocess.run([python, "-c", f"import {', '.join(modules)}"], capture_output=True).returncode != 0:
        pytest.skip(f"ComfyUI's Python lacks {' / '.join(modules)} (pip install -r requirements.txt)")


def require_module(python: str, module: str) -> None:
    """Skip the test when ComfyUI's Python cannot import `module` (an optional package such as insightface)."""
    if subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode != 0:
        pytest.skip(f"ComfyUI's Python has no {module}")


def free_port(ports: range | None = None) -> int:
    """A free loopback port: any (the OS picks), or the first free one of `ports`.

    A fixed range outside the ephemeral one keeps a port from being taken by another program while a test
    has closed it on purpose (a proxy restarted on the same port)."""
    if ports is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {ports.start}-{ports.stop - 1}")


@dataclass
class RunningComfyUI:
    url: str
    base_dir: Path
    log_path: Path
    process: subprocess.Popen
    hidden_modules: frozenset[str] = frozenset()  # optional packages hidden from this server's Python

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return json.loads(body) if body else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_history(self, prompt_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}")
            if entry:
                return entry[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s; log:\n{self.log()[-3000:]}")

    def run_prompt(self, prompt: dict, client_id: str, timeout: float = 300) -> dict:
        """Queue `prompt`, wait for it and return its outputs; it must validate and succeed (log in the message)."""
        prompt_id = str(uuid.uuid4())
        reply = self.post("/prompt", {"prompt": prompt, "prompt_id": prompt_id, "client_id": client_id})
        assert reply["node_errors"] == {}, reply
        entry = self.wait_history(prompt_id, timeout=timeout)
        assert entry["status"]["status_str"] == "success", (entry["status"], self.log()[-4000:])
        return entry["outputs"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_comfyui(
    comfy: Path,
    base_dir: Path,
    python: str | None = None,
    timeout: float = 240,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    ports: range | None = None,
    port: int | None = None,
) -> RunningComfyUI:
    """Start ComfyUI on a free loopback port (the first free one of `ports` when given: a test module's own
    range keeps parallel runs of the suite apart; `port` to restart a server on the port it had) and wait until
    /system_stats answers. The log (``<base_dir>/comfyui.log``) is appended to, so a restart keeps the first
    run's lines."""
    # ComfyUI 0.3.64 crashes at start when <base>/custom_nodes is missing, and keeps its database in its
    # own folder unless told otherwise.
    (base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base_dir / "user").mkdir(parents=True, exist_ok=True)
    port = port or free_port(ports)
    log_path = base_dir / "comfyui.log"
    log_file = open(log_path, "a")  # noqa: SIM115 - stays open for the server's lifetime
    command = [
        python or comfyui_python(comfy),
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base_dir),
        "--database-url",
        f"sqlite:///{base_dir / 'user' / 'comfyui.db'}",
        *extra_args,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    process = subprocess.Popen(command, cwd=comfy, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = RunningComfyUI(f"http://127.0.0.1:{port}", base_dir, log_path, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {process.returncode}; log:\n{server.log()[-5000:]}")
        try:
            server.get("/system_stats", timeout=2)
            return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"ComfyUI did not answer within {timeout}s; log:\n{server.log()[-5000:]}")


def slow_workflow(color: int, size: int, batch: int, scales: int, prefix: str) -> dict:
    """A job that keeps a CPU ComfyUI busy for seconds without any model: EmptyImage, then ImageScale (lanczos)
    up to twice `size` and back `scales` times, then SaveImage (node ``"99"``) under `prefix`. A new `color`
    per job keeps ComfyUI's cache from skipping it."""
    workflow: dict = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": batch, "color": color},
        }
    }
    previous = "1"
    for i in range(2, 2 + scales):
        side = size * 2 if i % 2 == 0 else size
        workflow[str(i)] = {
            "class_type": "ImageScale",
            "inputs": {
                "image": [previous, 0],
                "upscale_method": "lanczos",
                "width": side,
                "height": side,
                "crop": "disabled",
            },
        }
        previous = str(i)
    workflow["99"] = {
        "class_type": "SaveImage",
        "inputs": {"images": [previous, 0], "filename_prefix": prefix},
    }
    return workflow


def pack_import_failures(log: str, pack_marker: str) -> list[str]:
    """Lines of a ComfyUI startup log that report a failed import of the pack named by `pack_marker`."""
    bad = []
    for line in log.splitlines():
        if pack_marker in line and ("IMPORT FAILED" in line or "Cannot import" in line or "Skip " in line):
            bad.append(line)
    return bad


def pack_tracebacks(log: str) -> list[str]:
    """The tracebacks in a ComfyUI log, less ComfyUI's own optional node modules failing to import.

    ComfyUI imports every ``comfy_extras`` module at start and logs a traceback for each one whose optional
    dependency is missing (``torchaudio`` for its audio nodes, say); those say nothing about CharForge and
    differ from machine to machine. Every other traceback is returned, whole, for the assertion message.
    """
    blocks = []
    for block in log.split("Traceback (most recent call last):")[1:]:
        # A traceback ends where ComfyUI's next line that is not indented starts after the exception line.
        lines = block.splitlines()
        end = next(
            (i for i, line in enumerate(lines[1:], 1) if line and not line.startswith(" ") and ":" in line),
            len(lines) - 1,
        )
        text = "\n".join(lines[: end + 1])
        optional_extra = "/comfy_extras/" in text and "ModuleNotFoundError" in lines[end]
        if not optional_extra:
            blocks.append("Traceback (most recent call last):" + text)
    return blocks
