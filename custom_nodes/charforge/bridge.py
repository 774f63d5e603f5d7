"""The one module that touches ComfyUI.

Everything else in the pack (engine and node adapters) goes through the functions here for model
folders, progress, cancellation and server messages. Inside ComfyUI they call ComfyUI's own modules
(`folder_paths`, `comfy.utils`, `comfy.model_management`, `server`); outside it (plain Python, the
test suite, a training script) they fall back to plain behaviour:

- model folders come from ``CHARFORGE_PATH_<KIND>`` (os.pathsep separated), then the ``models`` section of
  the CharForge config file (``charforge.common.config_file``: ``$CHARFORGE_CONFIG``, default
  ``$XDG_CONFIG_HOME/charforge/config.yaml``, i.e. ``~/.config/charforge/config.yaml``)::

      models:
        dir: /data/ComfyUI/models          # a ComfyUI-style models folder
        folders:                           # extra folders per kind
          loras: [/data/more_loras]

  then ``$CHARFORGE_MODELS_DIR`` (a ComfyUI-style ``models`` folder), then ``$COMFYUI_DIR/models``;
- progress is logged (and passed to an optional callback);
- cancellation is a process-wide flag set with `request_cancel()`;
- server messages are logged at debug level.

ComfyUI is detected once, lazily, on first use; `reset()` forgets the answer (tests use it).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .common.config_file import config_path
from .common.model_folders import COMFY_MODEL_FOLDERS, PACK_MODEL_FOLDERS, PT_EXTENSIONS
from .common.safe_yaml import load_yaml

log = logging.getLogger("charforge")

EVENT_PREFIX = "charforge."


class ModelNotFoundError(FileNotFoundError):
    """A model file the user named is not in any folder of its kind."""


class Cancelled(Exception):
    """Raised outside ComfyUI when `request_cancel()` was called while work was running."""


# --------------------------------------------------------------------------------------------------
# ComfyUI detection


@dataclass
class _Comfy:
    folder_paths: ModuleType
    utils: ModuleType
    model_management: ModuleType
    server: ModuleType | None


_UNSET = object()
_comfy: Any = _UNSET
_lock = threading.Lock()


def _load_comfy() -> _Comfy | None:
    global _comfy
    if _comfy is _UNSET:
        with _lock:
            if _comfy is _UNSET:
                try:
                    folder_paths = importlib.import_module("folder_paths")
                    utils = importlib.import_module("comfy.utils")
                    model_management = importlib.import_module("comfy.model_management")
                except ImportError:
                    _comfy = None
                else:
                    try:
                        server = importlib.import_module("server")
                    except ImportError:
                        server = None
                    _comfy = _Comfy(folder_paths, utils, model_management, server)
    return _comfy


def in_comfyui() -> bool:
    """True when running inside a ComfyUI process (its modules are importable)."""
    return _load_comfy() is not None


def reset() -> None:
    """Forget whether ComfyUI was found and clear the cancel flag (for tests and long-lived scripts)."""
    global _comfy
    with _lock:
        _comfy = _UNSET
    _cancel.clear()


# --------------------------------------------------------------------------------------------------
# Model folders


def register_model_folders() -> list[str]:
    """Register the pack's model folders in ComfyUI's folder registry; return the keys registered.

    Safe to call twice and when an ``extra_model_paths.yaml`` already created a key: the default folder
    ``models/<key>`` is added if missing and the key's extension set is replaced (never mutated: ComfyUI
    shares one set object between many keys). A no-op outside ComfyUI.
    """
    comfy = _load_comfy()
    if comfy is None:
        return []
    fp = comfy.folder_paths
    keys = []
    for folder in PACK_MODEL_FOLDERS:
        default = os.path.join(fp.models_dir, folder.key)
        if folder.key not in fp.folder_names_and_paths or default not in fp.get_folder_paths(folder.key):
            fp.add_model_folder_path(folder.key, default)
        paths, _ = fp.folder_names_and_paths[folder.key]
        fp.folder_names_and_paths[folder.key] = (paths, set(folder.extensions))
        keys.append(folder.key)
    return keys


def _models_config() -> dict[str, Any]:
    path = config_path()
    if not path.is_file():
        return {}
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except Exception as exc:  # noqa: BLE001 - a bad config must not break model lookup; say why instead
        log.warning("CharForge: ignoring config %s: %s", path, exc)
        return {}
    section = data.get("models", {}) if isinstance(data, dict) else {}
    return section if isinstance(section, dict) else {}


def _fallback_models_dirs() -> list[Path]:
    roots = []
    configured = _models_config().get("dir")
    if configured:
        roots.append(Path(str(configured)).expanduser())
    if os.environ.get("CHARFORGE_MODELS_DIR"):
        roots.append(Path(os.environ["CHARFORGE_MODELS_DIR"]).expanduser())
    if os.environ.get("COMFYUI_DIR"):
        roots.append(Path(os.environ["COMFYUI_DIR"]).expanduser() / "models")
    return roots


def _fallback_extensions(kind: str) -> frozenset[str]:
    for folder in PACK_MODEL_FOLDERS:
        if folder.key == kind:
            return folder.extensions
    return PT_EXTENSIONS


def model_folders(kind: str) -> list[str]:
    """Folders searched for models of `kind` (a ComfyUI folder key such as ``loras`` or ``insightface``)."""
    comfy = _load_comfy()
    if comfy is not None:
        try:
            return list(comfy.folder_paths.get_folder_paths(kind))
        except KeyError:
            return []
    folders: list[str] = []
    extra = os.environ.get(f"CHARFORGE_PATH_{kind.upper()}", "")
    folders += [str(Path(p).expanduser()) for p in extra.split(os.pathsep) if p]
    configured = (_models_config().get("folders") or {}).get(kind) or []
    folders += [str(Path(str(p)).expanduser()) for p in ([configured] if isinstance(configured, str) else configured)]
    names = COMFY_MODEL_FOLDERS.get(kind, (kind,))
    for root in _fallback_models_dirs():
        folders += [str(root / name) for name in names]
    return folders


def list_models(kind: str) -> list[str]:
    """Model files of `kind`, as sorted paths relative to their folder (ComfyUI's ``get_filename_list``)."""
    comfy = _load_comfy()
    if comfy is not None:
        try:
            return list(comfy.folder_paths.get_filename_list(kind))
        except KeyError:
            return []
    extensions = _fallback_extensions(kind)
    found: set[str] = set()
    for folder in model_folders(kind):
        base = Path(folder)
        if not base.is_dir():
            continue
        for path in base.rglob("*"):
            if path.is_file() and path.suffix.lower() in extensions:
                found.add(path.relative_to(base).as_posix())
    return sorted(found)


def find_model(kind: str, name: str) -> str:
    """Full path of the model `name` of `kind`; raises `ModelNotFoundError` saying where it looked."""
    if os.path.isabs(name) and os.path.exists(name):
        return name
    comfy = _load_comfy()
    if comfy is not None:
        try:
            path = comfy.folder_paths.get_full_path(kind, name)
        except KeyError:
            path = None
        if path:
            return path
    else:
        for folder in model_folders(kind):
            candidate = Path(folder) / name
            if candidate.exists():
                return str(candidate)
    folders = model_folders(kind)
    where = ", ".join(folders) if folders else (
        f"no folder is configured (set CHARFORGE_MODELS_DIR or COMFYUI_DIR, or models.dir in {config_path()})")
    raise ModelNotFoundError(f"{kind} model {name!r} not found; looked in: {where}")


def output_directory() -> str:
    """Where nodes write results: ComfyUI's output folder, else ``$CHARFORGE_OUTPUT_DIR`` or ``./output``."""
    comfy = _load_comfy()
    if comfy is not None:
        return comfy.folder_paths.get_output_directory()
    return os.path.abspath(os.environ.get("CHARFORGE_OUTPUT_DIR", "output"))


def input_directory() -> str:
    """ComfyUI's input folder, else ``$CHARFORGE_INPUT_DIR`` or ``./input``."""
    comfy = _load_comfy()
    if comfy is not None:
        return comfy.folder_paths.get_input_directory()
    return os.path.abspath(os.environ.get("CHARFORGE_INPUT_DIR", "input"))


def temp_directory() -> str:
    """ComfyUI's temp folder (wiped by ComfyUI at start and exit), else a ``charforge`` folder in the system temp."""
    comfy = _load_comfy()
    if comfy is not None:
        return comfy.folder_paths.get_temp_directory()
    import tempfile

    path = os.path.join(tempfile.gettempdir(), "charforge")
    os.makedirs(path, exist_ok=True)
    return path


def comfyui_root() -> Path | None:
    """The ComfyUI folder (holding ``main.py`` and ``comfy/``) inside ComfyUI, else ``$COMFYUI_DIR``.

    Files ComfyUI ships are found from here, e.g. its CLIP vocabulary in ``comfy/sd1_tokenizer``.
    """
    comfy = _load_comfy()
    if comfy is not None:
        return Path(comfy.utils.__file__).resolve().parents[1]
    value = os.environ.get("COMFYUI_DIR")
    return Path(value).expanduser() if value else None


# --------------------------------------------------------------------------------------------------
# Cancellation

_cancel = threading.Event()


def request_cancel() -> None:
    """Outside ComfyUI: ask running work to stop at its next `check_cancelled()`."""
    _cancel.set()


def check_cancelled() -> None:
    """Raise if the user asked to stop.

    Inside ComfyUI this raises ComfyUI's own ``InterruptProcessingException`` (and clears the flag, as
    ComfyUI does), so the server reports ``execution_interrupted``. Outside it raises `Cancelled`.
    """
    comfy = _load_comfy()
    if comfy is not None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        return
    if _cancel.is_set():
        _cancel.clear()
        raise Cancelled("cancelled by request")


def is_cancellation(exc: BaseException) -> bool:
    """True for the exceptions that mean "the user stopped this": broad handlers must re-raise them."""
    if isinstance(exc, Cancelled):
        return True
    comfy = _load_comfy()
    return comfy is not None and isinstance(exc, comfy.model_management.InterruptProcessingException)


# --------------------------------------------------------------------------------------------------
# Progress

ProgressCallback = Callable[[int, int], None]


class Progress:
    """Progress of one long piece of work, shown on the node in ComfyUI.

    Every update also checks for cancellation (inside ComfyUI, ComfyUI's progress hook does that), so a
    loop that reports progress stops promptly when the user presses Cancel.
    """

    def __init__(self, total: int, node_id: str | None = None, callback: ProgressCallback | None = None,
                 label: str = "charforge"):
        self.total = max(int(total), 1)
        self.value = 0
        self.label = label
        self._callback = callback
        self._last_log = 0.0
        comfy = _load_comfy()
        self._bar = comfy.utils.ProgressBar(self.total, node_id=node_id) if comfy is not None else None

    def update(self, n: int = 1, preview: Any = None) -> None:
        """Advance by `n` steps. `preview` is ComfyUI's ``("JPEG"|"PNG", PIL.Image, max_size)`` tuple."""
        self.set(self.value + n, preview=preview)

    def set(self, value: int, total: int | None = None, preview: Any = None) -> None:
        """Set the absolute position (and optionally a new total)."""
        if total is not None:
            self.total = max(int(total), 1)
        self.value = min(int(value), self.total)
        if self._callback is not None:
            self._callback(self.value, self.total)
        if self._bar is not None:
            self._bar.update_absolute(self.value, self.total, preview)
            return
        now = time.monotonic()
        if self.value == self.total or now - self._last_log >= 2.0:
            self._last_log = now
            log.info("%s: %d/%d", self.label, self.value, self.total)
        check_cancelled()


def track(items: Iterable[Any], total: int, node_id: str | None = None, label: str = "charforge") -> Iterable[Any]:
    """Iterate `items`, reporting one progress step (and checking for cancel) after each."""
    progress = Progress(total, node_id=node_id, label=label)
    for item in items:
        yield item
        progress.update(1)


# --------------------------------------------------------------------------------------------------
# Server messages and routes

_routes: set[tuple[int, str, str]] = set()


def add_route(method: str, path: str, handler: Callable[[Any], Any]) -> bool:
    """Register an aiohttp `handler` for ``METHOD path`` on ComfyUI's server, once (ComfyUI also serves it
    under ``/api``). Returns False outside ComfyUI, where there is no server."""
    comfy = _load_comfy()
    instance = getattr(getattr(getattr(comfy, "server", None), "PromptServer", None), "instance", None)
    if instance is None:
        return False
    key = (id(instance), method.upper(), path)
    if key not in _routes:
        getattr(instance.routes, method.lower())(path)(handler)
        _routes.add(key)
    return True



def send_event(event: str, data: dict[str, Any], node_id: str | None = None) -> None:
    """Send a ``charforge.<event>`` WebSocket message to the client that queued the running prompt.

    The prompt id and node id are added to `data` (ComfyUI adds neither). Outside ComfyUI the event is
    logged at debug level.
    """
    comfy = _load_comfy()
    server = getattr(getattr(comfy, "server", None), "PromptServer", None)
    instance = getattr(server, "instance", None)
    if instance is None:
        log.debug("event %s%s %s", EVENT_PREFIX, event, data)
        return
    payload = dict(data)
    payload.setdefault("prompt_id", getattr(instance, "last_prompt_id", None))
    if node_id is not None:
        payload.setdefault("node", node_id)
    instance.send_sync(EVENT_PREFIX + event, payload, getattr(instance, "client_id", None))


# --------------------------------------------------------------------------------------------------
# LoRA patching (ComfyUI's own)


class _LoraWarnings(logging.Handler):
    """Collects the lines ComfyUI logs for LoRA keys it could not use."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "lora key not loaded" in message or message.startswith("NOT LOADED"):
            self.lines.append(message)


def apply_lora(model: Any, clip: Any, path: str, strength_model: float,
               strength_clip: float) -> tuple[Any, Any, list[str]]:
    """Patch a LoRA file into ComfyUI's MODEL and CLIP the way the stock ``LoraLoader`` does
    (``comfy.utils.load_torch_file`` + ``comfy.sd.load_lora_for_models``).

    Returns the patched clones and the "lora key not loaded" / "NOT LOADED" lines ComfyUI logged, so
    callers can tell the user which keys had no effect. `clip` may be None (model only). Needs ComfyUI.
    """
    comfy = _load_comfy()
    if comfy is None:
        raise RuntimeError("applying a LoRA to a MODEL/CLIP needs ComfyUI (run the node inside ComfyUI)")
    sd_module = importlib.import_module("comfy.sd")
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    collector = _LoraWarnings()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        new_model, new_clip = sd_module.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
    finally:
        root.removeHandler(collector)
    return new_model, new_clip, collector.lines
