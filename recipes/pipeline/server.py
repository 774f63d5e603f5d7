"""Finding or starting the ComfyUI the pipeline runs on: a given URL, the local one, one started from
``$COMFYUI_DIR`` or installed with comfy-cli, or a RunPod pod."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from charforge.common.model_folders import all_model_folders

from ...driver.client import ComfyClient
from ...driver.client.http import is_loopback
from ...driver.config import RunPodSettings, resolve_runpod, resolve_server
from ...driver.errors import ConfigError, DriverError, ServerUnavailable
from ...driver.local import DEFAULT_LOCAL_URL, LocalComfyUI, find_python, probe
from ...driver.runpod.pod import PodSession
from .options import REPO_ROOT, PipelineError, PipelineOptions, Say, Server

# ------------------------------------------------------------------------------------------------------------
# Finding or starting ComfyUI
# ------------------------------------------------------------------------------------------------------------


def _charforge_ready(url: str) -> tuple[bool, bool]:
    """(has CharForge's nodes, has a base model (a checkpoint, or a diffusion model such as Flux) and a CLIP
    model for scores) for the server at `url`."""
    try:
        with ComfyClient(resolve_server(url)) as client:
            info = client.object_info()
    except DriverError:
        return False, False
    base = _choices(info, "CheckpointLoaderSimple", "ckpt_name") or _choices(info, "UNETLoader", "unet_name")
    models = bool(base) and bool(_choices(info, "CharForgeLoadClip", "model"))
    return "CharForgeTrainLoRA" in info, models


def _choices(info: dict[str, Any], class_type: str, name: str) -> list[str]:
    entry = info.get(class_type) or {}
    for section in ("required", "optional"):
        spec = ((entry.get("input") or {}).get(section) or {}).get(name)
        if spec and isinstance(spec[0], list):
            return [c for c in spec[0] if isinstance(c, str) and not c.startswith("(")]
    return []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _online(host: str = "pypi.org", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _install_with_comfy_cli(out: Path, say: Say) -> Path:
    """Install ComfyUI with comfy-cli into ``out/ComfyUI`` (online only) and return its folder."""
    comfy = shutil.which("comfy")
    target = (out / "ComfyUI").resolve()
    if (target / "main.py").is_file():
        return target
    if comfy is None or not _online():
        raise ServerUnavailable(
            "no ComfyUI found: nothing answers on http://127.0.0.1:8188 and COMFYUI_DIR is not set"
            + ("" if comfy else ", and comfy-cli is not installed")
            + ("" if _online() else " (and this machine is offline, so nothing can be installed)")
            + ".\n"
            "Do one of these, then run the command again:\n"
            "  - point COMFYUI_DIR at a ComfyUI checkout (its Python: COMFYUI_PYTHON or a venv inside it);\n"
            "  - start ComfyUI yourself (python main.py) so it answers on 127.0.0.1:8188, or pass --server URL;\n"
            "  - pip install comfy-cli while online: the pipeline then installs ComfyUI into out/ComfyUI.\n"
            "In every case install CharForge into it: python install.py --comfyui /path/to/ComfyUI"
        )
    gpu = shutil.which("nvidia-smi") is not None
    command = [
        comfy,
        "--skip-prompt",
        "--workspace",
        str(target),
        "install",
        "--skip-manager",
        "--nvidia" if gpu else "--cpu",
    ]
    say(
        "installing ComfyUI with comfy-cli into "
        + str(target)
        + " (downloads ComfyUI and PyTorch"
        + (" for NVIDIA" if gpu else ", CPU build")
        + "; several minutes): "
        + " ".join(command)
    )
    subprocess.run(command, check=True)
    # comfy-cli installs ComfyUI's packages into the Python that runs comfy-cli (unless it made a venv inside).
    shebang = Path(comfy).read_text(errors="replace").splitlines()[0] if Path(comfy).is_file() else ""
    if shebang.startswith("#!") and not any((target / v).is_dir() for v in ("venv", ".venv")):
        os.environ.setdefault("COMFYUI_PYTHON", shebang[2:].strip().split()[0])
    return target


def install_pack(comfy_dir: Path, base_dir: Path, python: str, say: Say) -> None:
    """install.py into the base directory: the pack linked into its custom_nodes, the missing requirements
    installed into ComfyUI's Python (satisfied ones are skipped, so a rerun is quick and works offline)."""
    command = [
        sys.executable,
        str(REPO_ROOT / "install.py"),
        "--comfyui",
        str(comfy_dir),
        "--base-directory",
        str(base_dir),
        "--python",
        python,
    ]
    say("installing CharForge into it: " + " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(
            "install.py failed:\n" + "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        )


def extra_model_paths(models: Path) -> str:
    """The extra_model_paths.yaml that shows a ComfyUI every model folder CharForge uses in `models` (a ComfyUI
    install's models folder): ComfyUI's own and the pack's, from the one table in charforge.common.model_folders."""
    lines = ["comfyui_install:", f"  base_path: {json.dumps(str(models))}"]
    for key, names in all_model_folders().items():
        if len(names) == 1:
            lines.append(f"  {key}: {names[0]}/")
        else:  # a key ComfyUI fills from several folders (text_encoders: text_encoders/ and clip/)
            lines += [f"  {key}: |", *(f"    {name}/" for name in names)]
    return "\n".join(lines) + "\n"


def start_own_server(comfy_dir: Path, out: Path, say: Say, port: int | None = None) -> Server:
    """Start ComfyUI from `comfy_dir` with ``out/comfyui`` as its base directory (the pack linked into it, the
    ComfyUI folder's own models still found through extra_model_paths)."""
    base = (out / "comfyui").resolve()
    (base / "user").mkdir(parents=True, exist_ok=True)
    (base / "models").mkdir(parents=True, exist_ok=True)
    install_pack(comfy_dir, base, find_python(comfy_dir), say)
    extra = base / "extra_model_paths.yaml"
    extra.write_text(extra_model_paths((comfy_dir / "models").resolve()), encoding="utf-8")
    args = [
        "--base-directory",
        str(base),
        "--extra-model-paths-config",
        str(extra),
        "--database-url",
        f"sqlite:///{base / 'user' / 'comfyui.db'}",
    ]
    if shutil.which("nvidia-smi") is None:
        args.append("--cpu")
    server = LocalComfyUI(
        comfy_dir, port=port or _free_port(), extra_args=args, log_path=base / "comfyui.log"
    )
    say(f"starting ComfyUI from {comfy_dir} on {server.url} (base directory {base}, log {server.log_path})")
    url = server.start(timeout=300)
    return Server(url, server, base, comfy_dir, f"started by the pipeline from {comfy_dir}")


def _bring_up_pod(settings: RunPodSettings, opts: PipelineOptions, say: Say) -> Server:
    """A RunPod pod for the run: created or started per the profile and waited for; the run is remote."""
    if settings.kind != "pod":
        raise ConfigError(
            f"{opts.server} is a serverless endpoint: each stage would run on a fresh worker that returns "
            "images only and keeps no files for the next stage, so the pipeline cannot run there whole. Run it "
            "on a pod (runpod-pod:ID, or a profile with runpod: {pod: ...}), or run it on your server and train "
            f"on the endpoint: --train-on {opts.server} (docs/runpod.md)"
        )
    session = PodSession(settings, on_message=say)

    async def start() -> str:
        try:
            return await session.start()
        finally:
            await session.close_api()  # the session is finished from another event loop

    try:
        url = asyncio.run(start())
    except BaseException:
        _finish_pod(session, say)
        raise
    opts.remote = True
    return Server(url.rstrip("/"), pod=session, started_note=f"RunPod pod {session.pod_id}")


def _finish_pod(session: PodSession, say: Say) -> dict[str, Any]:
    """Stop, terminate or keep the pod (its profile's on_finish) and price its time."""
    action = asyncio.run(session.finish())
    seconds, cost = session.wall_seconds(), session.cost()
    record = {
        "id": session.pod_id,
        "finish": action,
        "seconds": round(seconds or 0.0, 1),
        "price_per_hour": session.price_per_hour,
        "cost_usd": None if cost is None else round(cost, 4),
    }
    if cost is not None:
        say(
            f"pod {session.pod_id}: {seconds:.0f} s at ${session.price_per_hour:.3f}/h = ${cost:.4f} "
            f"(boot and idle included); {action}"
        )
    return record


def acquire_server(opts: PipelineOptions, say: Say, env: dict[str, str] | None = None) -> Server:
    env = dict(os.environ if env is None else env)
    if opts.server:
        pod = resolve_runpod(opts.server)
        if pod is not None:
            return _bring_up_pod(pod, opts, say)
        url = str(resolve_server(opts.server).url).rstrip("/")
        # a server on this machine is probed here; a remote one (auth, proxies) answers the client's first call
        if is_loopback(urlsplit(url).netloc) and not probe(url):
            raise ServerUnavailable(f"{opts.server} does not answer")
        return Server(url)
    if probe(DEFAULT_LOCAL_URL):
        nodes, checkpoints = _charforge_ready(DEFAULT_LOCAL_URL)
        if nodes and (checkpoints or not env.get("COMFYUI_DIR")) and not opts.tiny:
            say(f"using the ComfyUI on {DEFAULT_LOCAL_URL}")
            return Server(DEFAULT_LOCAL_URL)
        why = (
            "has no CharForge nodes"
            if not nodes
            else "has no base checkpoint or no CLIP model (clip_vision)"
            if not checkpoints
            else "cannot take the tiny models (--tiny)"
        )
        if env.get("COMFYUI_DIR"):
            say(f"the ComfyUI on {DEFAULT_LOCAL_URL} {why}; starting a separate one from COMFYUI_DIR")
        else:
            raise ServerUnavailable(
                f"the ComfyUI on {DEFAULT_LOCAL_URL} {why}; install CharForge into it "
                "(python install.py --comfyui /path/to/ComfyUI) and restart it, or set "
                "COMFYUI_DIR so the pipeline starts its own"
            )
    comfy_dir = env.get("COMFYUI_DIR")
    if comfy_dir:
        path = Path(comfy_dir).expanduser().resolve()
        if not (path / "main.py").is_file():
            raise ConfigError(f"COMFYUI_DIR={path} does not contain ComfyUI's main.py")
    elif opts.install:
        path = _install_with_comfy_cli(opts.out, say)
    else:
        raise ServerUnavailable("no ComfyUI answers on 127.0.0.1:8188 and COMFYUI_DIR is not set")
    if not env.get("COMFYUI_PYTHON"):
        os.environ.setdefault("COMFYUI_PYTHON", find_python(path, env))
    return start_own_server(path, opts.out, say, port=opts.port)
