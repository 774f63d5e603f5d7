"""A local ComfyUI when no server is named: use the one on 127.0.0.1:8188, or start one from ``$COMFYUI_DIR``.

The started server listens on loopback only, on a free port, logs to a file (not the terminal), and is stopped
when the run ends. Its Python is ``$COMFYUI_PYTHON``, else the ``venv``/``.venv`` inside ``$COMFYUI_DIR``, else
the current interpreter. ``$COMFYUI_ARGS`` adds arguments (e.g. ``--cpu``).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError, ServerUnavailable

DEFAULT_LOCAL_URL = "http://127.0.0.1:8188"


def probe(url: str, timeout: float = 1.5) -> bool:
    """True when ``url`` answers ``GET /system_stats`` with 200 (no proxy, loopback only use)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url.rstrip("/") + "/system_stats", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_python(comfy_dir: Path, env: Mapping[str, str] | None = None) -> str:
    """The interpreter to run ComfyUI with."""
    env = os.environ if env is None else env
    if env.get("COMFYUI_PYTHON"):
        return env["COMFYUI_PYTHON"]
    for venv in ("venv", ".venv"):
        for rel in ("bin/python", "Scripts/python.exe"):
            candidate = comfy_dir / venv / rel
            if candidate.exists():
                return str(candidate)
    return sys.executable


class LocalComfyUI:
    """A ComfyUI process started by the driver. Use as a context manager or call :meth:`stop`."""

    def __init__(
        self,
        comfy_dir: str | Path,
        *,
        python: str | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
        log_path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.comfy_dir = Path(comfy_dir).expanduser()
        if not (self.comfy_dir / "main.py").is_file():
            raise ConfigError(f"COMFYUI_DIR={self.comfy_dir} does not contain ComfyUI's main.py")
        env = os.environ if env is None else env
        self.python = python or find_python(self.comfy_dir, env)
        self.port = port or free_port()
        self.extra_args = list(
            extra_args if extra_args is not None else shlex.split(env.get("COMFYUI_ARGS", ""))
        )
        self.log_path = (
            Path(log_path)
            if log_path
            else Path(tempfile.mkstemp(prefix="charforge-comfyui-", suffix=".log")[1])
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> str:
        """Start ComfyUI and wait until ``/system_stats`` answers; returns its URL."""
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), *self.extra_args]
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        try:
            self.process = subprocess.Popen(
                cmd, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        except OSError as exc:
            log.close()
            raise ServerUnavailable(f"cannot start ComfyUI with {self.python}: {exc}") from None
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerUnavailable(
                    f"ComfyUI exited with code {self.process.returncode} while starting; last "
                    f"lines of {self.log_path}:\n{self.log_tail()}"
                )
            if probe(self.url, timeout=1.0):
                return self.url
            time.sleep(0.5)
        self.stop()
        raise ServerUnavailable(
            f"ComfyUI did not answer within {timeout:g} s; see {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the process (kill it after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> LocalComfyUI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_server(env: Mapping[str, str] | None = None, *, on_message=None) -> tuple[str, LocalComfyUI | None]:
    """The URL of a local ComfyUI: the one answering on 127.0.0.1:8188, or one started from ``$COMFYUI_DIR``
    (returned too, so the caller can stop it)."""
    env = os.environ if env is None else env
    if probe(DEFAULT_LOCAL_URL):
        return DEFAULT_LOCAL_URL, None
    comfy_dir = env.get("COMFYUI_DIR")
    if not comfy_dir:
        raise ServerUnavailable(
            "no ComfyUI answers on http://127.0.0.1:8188 and no server was named; pass "
            "--server URL or --profile NAME, or set COMFYUI_DIR to start one"
        )
    server = LocalComfyUI(comfy_dir, env=env)
    if on_message is not None:
        on_message(f"starting ComfyUI from {server.comfy_dir} on port {server.port} (log: {server.log_path})")
    return server.start(), server
