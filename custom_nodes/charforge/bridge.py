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
- progress (`control`, the engine's `Control` for a node) is logged and passed to an optional callback;
- cancellation is a process-wide flag set with `request_cancel()`, raised as the engine's `Cancelled`;
- server messages are logged at debug level.

ComfyUI is detected once, lazily, on first use; `reset()` forgets the answer (tests use it).

Longer than the pack's usual 600 lines on purpose: it is the one module that may import ComfyUI, so
every ComfyUI call lives here.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .common.config_file import config_path
from .common.model_folders import COMFY_MODEL_FOLDERS, PACK_MODEL_FOLDERS, PT_EXTENSIONS
from .common.safe_yaml import load_yaml
from .engine.control import Cancelled, Control, ProgressHook  # noqa: F401 - Cancelled is re-exported for nodes

log = logging.getLogger("charforge")

EVENT_PREFIX = "charforge."


class ModelNotFoundError(FileNotFoundError):
    """A model file the user named is not in any folder of its kind."""


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
    folders += [
        str(Path(str(p)).expanduser()) for p in ([configured] if isinstance(configured, str) else configured)
    ]
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
    where = (
        ", ".join(folders)
        if folders
        else (
            f"no folder is configured (set CHARFORGE_MODELS_DIR or COMFYUI_DIR, or models.dir in {config_path()})"
        )
    )
    raise ModelNotFoundError(f"{kind} model {name!r} not found; looked in: {where}")


def model_dirs(
    kind: str, marker: str, accept: Callable[[Path], bool] | None = None, depths: tuple[int, ...] = (1, 2)
) -> list[str]:
    """Model *folders* of `kind` (diffusers folders, CLIP folders, ...): the folders `depths` levels inside a
    `kind` model folder that hold a `marker` file (``model_index.json``, ``config.json``) which `accept`, if
    given, accepts. Sorted names relative to their model folder, as `find_model_dir` takes them."""
    found: set[str] = set()
    for folder in model_folders(kind):
        base = Path(folder)
        if not base.is_dir():
            continue
        for depth in depths:
            for path in base.glob("/".join(["*"] * depth + [marker])):
                if accept is None or accept(path):
                    found.add(path.parent.relative_to(base).as_posix() or ".")
    return sorted(found)


def find_model_dir(kind: str, name: str, marker: str, what: str = "model folder") -> str:
    """Full path of the model folder `name` (as `model_dirs` lists it) that holds `marker`; raises
    `ModelNotFoundError` naming the folders it looked in."""
    for folder in model_folders(kind):
        candidate = Path(folder) / name
        if (candidate / marker).is_file():
            return str(candidate)
    raise ModelNotFoundError(f"{what} {name!r} not found in {model_folders(kind)}")


def first_model_folder(kind: str) -> Path:
    """The first model folder of `kind`: where the pack writes new files of that kind (LoRAs, identities)."""
    folders = model_folders(kind)
    if not folders:
        raise ModelNotFoundError(
            f"no {kind} model folder is configured: inside ComfyUI it is models/{kind}; "
            f"outside, set CHARFORGE_MODELS_DIR or COMFYUI_DIR (or CHARFORGE_PATH_{kind.upper()})"
        )
    return Path(folders[0])


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
        assert comfy.utils.__file__ is not None  # imported from ComfyUI's comfy/utils.py
        return Path(comfy.utils.__file__).resolve().parents[1]
    value = os.environ.get("COMFYUI_DIR")
    return Path(value).expanduser() if value else None


# --------------------------------------------------------------------------------------------------
# Progress and cancellation: the engine's Control, built for ComfyUI or for plain Python

_cancel = threading.Event()
_interrupted: dict[type, type] = {}


def request_cancel() -> None:
    """Outside ComfyUI: ask running work to stop at its next check."""
    _cancel.set()


def _interrupted_type(comfy_interrupt: type) -> type:
    """`Cancelled` that is also ComfyUI's ``InterruptProcessingException``: the engine recognises it as its own
    cancellation and ComfyUI's executor reports ``execution_interrupted``."""
    if comfy_interrupt not in _interrupted:
        _interrupted[comfy_interrupt] = type(
            "Interrupted",
            (Cancelled, comfy_interrupt),
            {"__doc__": "The user pressed Cancel in ComfyUI.", "__module__": __name__},
        )
    return _interrupted[comfy_interrupt]


class _ComfyControl(Control):
    """Progress on ComfyUI's progress bar (whose hook raises after Cancel), events to the browser."""

    def __init__(self, comfy: _Comfy, total: int, node_id: str | None, on_progress: ProgressHook | None):
        super().__init__(on_progress=on_progress, total=total)
        self._comfy = comfy
        self._node_id = node_id
        self._bar: Any = None  # comfy.utils.ProgressBar, made on the first update

    def _interrupt(self):
        interrupt = self._comfy.model_management.InterruptProcessingException
        return interrupt, _interrupted_type(interrupt)

    def check(self) -> None:
        interrupt, interrupted = self._interrupt()
        try:
            self._comfy.model_management.throw_exception_if_processing_interrupted()
        except interrupted:
            raise
        except interrupt:
            raise interrupted("cancelled in ComfyUI") from None

    def progress(self, done: int, total: int | None = None, text: str | None = None) -> None:
        if total is not None:
            self.total = max(int(total), 1)
        self.total = max(self.total, 1)
        self.done = min(int(done), self.total)
        self._report(self.done, self.total, text)
        if self._bar is None:
            self._bar = self._comfy.utils.ProgressBar(self.total, node_id=self._node_id)
        interrupt, interrupted = self._interrupt()
        try:  # ComfyUI's progress hook raises its interrupt after Cancel
            self._bar.update_absolute(self.done, self.total, None)
        except interrupted:
            raise
        except interrupt:
            raise interrupted("cancelled in ComfyUI") from None

    def event(self, name: str, data: dict[str, Any]) -> None:
        super().event(name, data)
        send_event(name, data, node_id=self._node_id)


class _PlainControl(Control):
    """Outside ComfyUI: progress is logged (every 2 s and at the end), the cancel flag stops the work."""

    def __init__(self, total: int, label: str, on_progress: ProgressHook | None):
        super().__init__(on_progress=on_progress, should_stop=self._flagged, total=total)
        self.label = label
        self._last_log = 0.0

    @staticmethod
    def _flagged() -> bool:
        if _cancel.is_set():
            _cancel.clear()  # consumed: the next run starts clean
            return True
        return False

    def _report(self, done: int, total: int, text: str | None) -> None:
        super()._report(done, total, text)
        now = time.monotonic()
        if done >= total or now - self._last_log >= 2.0:
            self._last_log = now
            log.info("%s: %d/%d%s", self.label, done, total, f" {text}" if text else "")

    def event(self, name: str, data: dict[str, Any]) -> None:
        super().event(name, data)
        send_event(name, data)


def control(
    total: int = 0,
    node_id: str | None = None,
    label: str = "charforge",
    on_progress: ProgressHook | None = None,
) -> Control:
    """The `Control` a node hands to the engine: ComfyUI's progress bar, Cancel and browser messages inside
    ComfyUI; log lines, `request_cancel()` and `on_progress` outside it."""
    comfy = _load_comfy()
    if comfy is not None:
        return _ComfyControl(comfy, total, node_id, on_progress)
    return _PlainControl(total, label, on_progress)


def check_cancelled() -> None:
    """Raise `Cancelled` if the user asked to stop (inside ComfyUI: ComfyUI's interrupt, which it clears)."""
    control().check()


def is_cancellation(exc: BaseException) -> bool:
    """True for the exceptions that mean "the user stopped this": broad handlers must re-raise them.

    `Cancelled` covers everything the pack raises; ComfyUI's own interrupt is recognised too, for ComfyUI
    code a node calls (samplers, LoRA patching).
    """
    if isinstance(exc, Cancelled):
        return True
    comfy = _load_comfy()
    return comfy is not None and isinstance(exc, comfy.model_management.InterruptProcessingException)


# --------------------------------------------------------------------------------------------------
# Server messages and routes


def add_route(method: str, path: str, handler: Callable[[Any], Any]) -> bool:
    """Register an aiohttp `handler` for ``METHOD path`` on ComfyUI's server, once (ComfyUI also serves it
    under ``/api``). Returns False outside ComfyUI, where there is no server."""
    comfy = _load_comfy()
    instance = getattr(getattr(getattr(comfy, "server", None), "PromptServer", None), "instance", None)
    if instance is None:
        return False
    # What was registered is remembered on the server object itself: a module-level set keyed by id() would
    # take a new server that reuses a collected one's id for one that already has the route.
    registered: set[tuple[str, str]] = instance.__dict__.setdefault("_charforge_routes", set())
    key = (method.upper(), path)
    if key not in registered:
        getattr(instance.routes, method.lower())(path)(handler)
        registered.add(key)
    return True


def _server_instance() -> Any:
    comfy = _load_comfy()
    return getattr(getattr(getattr(comfy, "server", None), "PromptServer", None), "instance", None)


def running_prompt_id() -> str | None:
    """The id of the prompt ComfyUI is executing now (None outside ComfyUI or when idle)."""
    queue = getattr(_server_instance(), "prompt_queue", None)
    if queue is None:
        return None
    running, _ = queue.get_current_queue()
    return str(running[0][1]) if running else None


def interrupt_prompt(prompt_id: str) -> bool:
    """ComfyUI's Cancel for one prompt (``POST /interrupt`` with its id): interrupts it only while it runs.
    Returns whether it was running."""
    queue = getattr(_server_instance(), "prompt_queue", None)
    if queue is None or not prompt_id:
        return False
    running, _ = queue.get_current_queue()
    if not any(str(item[1]) == str(prompt_id) for item in running):
        return False
    importlib.import_module("nodes").interrupt_processing()
    return True


class PromptRejected(ValueError):
    """ComfyUI's validation refused a prompt; `node_errors` is what ``POST /prompt`` would answer."""

    def __init__(self, error: Any, node_errors: Any):
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        super().__init__(f"ComfyUI refused the prompt: {message}")
        self.error, self.node_errors = error, node_errors


async def queue_prompt(
    prompt: dict[str, Any], client_id: str | None = None, workflow: dict[str, Any] | None = None
) -> str:
    """Queue an API-format prompt the way ``POST /prompt`` does (validated, numbered, at the back of the
    queue, progress messages to `client_id`); returns its prompt id. Raises `PromptRejected`."""
    instance = _server_instance()
    if instance is None:
        raise RuntimeError("queueing a prompt needs a running ComfyUI server")
    execution = importlib.import_module("execution")
    request = instance.trigger_on_prompt({"prompt": prompt, "client_id": client_id})
    prompt = request["prompt"]
    prompt_id = str(uuid.uuid4())
    valid = await execution.validate_prompt(prompt_id, prompt, None)
    if not valid[0]:
        raise PromptRejected(valid[1], valid[3])
    extra_data: dict[str, Any] = {"extra_pnginfo": {"workflow": workflow}} if workflow else {}
    if client_id:
        extra_data["client_id"] = client_id
    number = instance.number
    instance.number += 1
    instance.prompt_queue.put((number, prompt_id, prompt, extra_data, valid[2]))
    return prompt_id


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


def apply_lora(
    model: Any, clip: Any, path: str, strength_model: float, strength_clip: float
) -> tuple[Any, Any, list[str]]:
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


def percent_to_sigma(model: Any, percent: float) -> float:
    """The sigma at ``percent`` (0 = first step, 1 = last) of a MODEL's own noise schedule, as ComfyUI's
    samplers convert start / end percentages (``model_sampling.percent_to_sigma``)."""
    return float(model.get_model_object("model_sampling").percent_to_sigma(percent))


def patch_attn2(model: Any, make_patch: Callable[[tuple[str, int, int], Any], Any], slots: list) -> Any:
    """A clone of a MODEL with a cross-attention (``attn2``) replacement in each of ``slots``
    ((block name, block number, transformer index)). ``make_patch(slot, existing)`` gets the replacement
    already there (from an earlier node, or None) so chained nodes can combine theirs with it."""
    patched = model.clone()
    options = patched.model_options.get("transformer_options", {})
    existing = options.get("patches_replace", {}).get("attn2", {})
    for block, number, index in slots:
        slot = (block, number, index)
        patched.set_model_attn2_replace(make_patch(slot, existing.get(slot)), block, number, index)
    return patched


def add_lora_patches(model: Any, factors: dict[str, tuple[Any, Any]], strength: float) -> None:
    """Patch LoRA factors into a MODEL (changed in place: pass a clone): each weight ``key`` of the model's
    state dict (``diffusion_model.…``) becomes ``W + strength · up @ down`` when ComfyUI loads the model, as
    for a LoRA from a LoRA loader (``comfy.weight_adapter.LoRAAdapter`` without alpha, ``add_patches``).
    Raises ValueError naming the keys the model lacks or whose shape is not ``up.rows × down.columns``."""
    if _load_comfy() is None:
        raise RuntimeError("patching LoRA weights into a MODEL needs ComfyUI (run the node inside ComfyUI)")
    lora_adapter = importlib.import_module("comfy.weight_adapter").LoRAAdapter
    shapes = {key: tuple(value.shape) for key, value in model.model_state_dict().items()}
    wrong = [key for key, (up, down) in factors.items() if shapes.get(key) != (up.shape[0], down.shape[1])]
    if wrong:
        found = ", ".join(f"{key} {shapes.get(key, 'missing')}" for key in sorted(wrong)[:6])
        raise ValueError(f"{len(wrong)} LoRA weights do not fit the MODEL: {found}")
    patches = {
        key: lora_adapter(set(), (up, down, None, None, None, None)) for key, (up, down) in factors.items()
    }
    model.add_patches(patches, strength)


def apply_controlnet(
    positive: list, negative: list, control_net: Any, hint: Any, strength: float, start: float, end: float
) -> tuple[list, list]:
    """``positive`` and ``negative`` with a CONTROL_NET added by ComfyUI's own ControlNetApplyAdvanced
    (``hint``: IMAGE [B, H, W, 3]; ``start`` / ``end``: fractions of sampling; chained after any earlier
    ControlNet; strength 0 adds none)."""
    if _load_comfy() is None:
        raise RuntimeError("applying a ControlNet needs ComfyUI (run the node inside ComfyUI)")
    apply = importlib.import_module("nodes").ControlNetApplyAdvanced()
    return apply.apply_controlnet(positive, negative, control_net, hint, strength, start, end)
