"""A ComfyUI-like harness: load the pack as ComfyUI does, describe nodes as /object_info does, run nodes
as the executor does. Behaviour follows docs/comfyui-contract.md (sections 1 and 2)."""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
STUBS_DIR = Path(__file__).resolve().parent / "comfy_stubs"
STUB_MODULES = ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "server")

# Types ComfyUI itself defines (docs/comfyui-contract.md §2.1). Custom types come from charforge.nodes.types.
CORE_TYPES = frozenset(
    {
        "INT",
        "FLOAT",
        "STRING",
        "BOOLEAN",
        "COMBO",
        "IMAGE",
        "MASK",
        "LATENT",
        "CONDITIONING",
        "MODEL",
        "CLIP",
        "VAE",
        "CONTROL_NET",
        "CLIP_VISION",
        "CLIP_VISION_OUTPUT",
        "STYLE_MODEL",
        "UPSCALE_MODEL",
        "AUDIO",
        "VIDEO",
        "LORA_MODEL",
        "LOSS_MAP",
        "SIGMAS",
        "SAMPLER",
        "NOISE",
        "GUIDER",
    }
)
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
HIDDEN_KINDS = frozenset(
    {"UNIQUE_ID", "PROMPT", "EXTRA_PNGINFO", "DYNPROMPT", "AUTH_TOKEN_COMFY_ORG", "API_KEY_COMFY_ORG"}
)


def comfy_module_name(pack_dir: str | os.PathLike) -> str:
    """The sys.modules name ComfyUI gives a pack folder: its full path with '.' replaced by '_x_'."""
    return str(pack_dir).replace(".", "_x_")


def load_pack_like_comfyui(pack_dir: str | os.PathLike) -> ModuleType:
    """Import ``<pack_dir>/__init__.py`` the way ComfyUI's ``load_custom_node`` does.

    The folder is not on sys.path and the module is named after its path, so only relative imports
    inside the pack can work. Raises whatever the import raises (ComfyUI would log IMPORT FAILED).
    """
    pack_dir = Path(pack_dir)
    name = comfy_module_name(pack_dir)
    spec = importlib.util.spec_from_file_location(
        name, pack_dir / "__init__.py", submodule_search_locations=[str(pack_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def unload_pack(module: ModuleType) -> None:
    prefix = module.__name__
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def node_info(
    node_id: str, cls: type, display_name: str | None = None, python_module: str = "custom_nodes.x"
):
    """What ComfyUI's GET /object_info returns for a V1 node class (workflows/build_api.py builds it)."""
    return build_api().node_info(node_id, cls, display_name, python_module)


@dataclass
class NodeRun:
    """One execution of a node: the result tuple and the UI dict, as the executor splits them."""

    result: tuple
    ui: dict[str, list] = field(default_factory=dict)


def place_models(models: Path, diffusers: Mapping[str, Path], files: Sequence[tuple[str, Path]] = ()) -> None:
    """Put test models where a user would, below a ComfyUI `models` folder: each diffusers folder as
    models/diffusers/<name>, each (folder, file) copied into models/<folder>/."""
    for name, folder in diffusers.items():
        shutil.copytree(folder, models / "diffusers" / name)
    for folder, source in files:
        (models / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, models / folder)


def load_script(path: Path, name: str) -> ModuleType:
    """A script of the repository that is no package module (install.py, workflows/build_api.py, ...) imported by
    its path as module `name` (registered in sys.modules, where dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def image_batch(*images: Any) -> Any:
    """A ComfyUI IMAGE batch (float tensor, batch x height x width x channels, 0..1) of uint8 RGB images."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))


def run_node(cls: type, node_id: str = "1", instance: Any = None, **inputs) -> NodeRun:
    """Call a node like ComfyUI's executor: keyword inputs, hidden inputs filled, return value checked."""
    declared = cls.INPUT_TYPES()
    kwargs = dict(inputs)
    for name, kind in declared.get("hidden", {}).items():
        if kind == "UNIQUE_ID":
            kwargs.setdefault(name, node_id)
        elif kind == "PROMPT" or kind == "EXTRA_PNGINFO":
            kwargs.setdefault(name, {})
    missing = [n for n in declared.get("required", {}) if n not in kwargs]
    if missing:
        raise TypeError(f"required inputs missing: {missing}")
    instance = instance if instance is not None else cls()
    out = getattr(instance, cls.FUNCTION)(**kwargs)
    if inspect.iscoroutine(out):
        import asyncio

        out = asyncio.run(out)
    if isinstance(out, dict):
        ui = out.get("ui", {}) or {}
        for key, value in ui.items():
            if not isinstance(value, list):
                raise AssertionError(
                    f"ui[{key!r}] must be a list (ComfyUI concatenates them), got {type(value)}"
                )
        result = tuple(out.get("result", ()))
    else:
        ui, result = {}, tuple(out)
    if result and len(result) != len(cls.RETURN_TYPES):
        raise AssertionError(
            f"{cls.__name__} returned {len(result)} values for {len(cls.RETURN_TYPES)} outputs"
        )
    return NodeRun(result=result, ui=ui)


def load_dataset(folder: Any, name: str = "hero") -> Any:
    """The DATASET of Load Dataset on `folder` (its captions read, one worker), as a workflow starts."""
    from charforge.nodes.dataset import LoadDataset

    return run_node(
        LoadDataset, folder=str(folder), name=name, recursive=False, read_captions=True, workers=1
    ).result[0]


def build_api() -> ModuleType:
    """workflows/build_api.py (the API twins and the recorded node definitions) as a module."""
    return load_script(REPO_ROOT / "workflows" / "build_api.py", "charforge_workflows_build_api")


def accepting(info: dict, prompt: dict, extra: tuple[tuple[str, str], ...] = ()) -> dict:
    """A copy of recorded node definitions `info` (whose loader lists are empty: recorded on a server without
    models) with every model file `prompt` names, and the values of the (class, input) pairs in `extra`,
    added to its input's list of choices, so that a preflight accepts the graph's own file names."""
    import copy

    accepted = build_api().MODEL_FILE_INPUTS | set(extra)
    info = copy.deepcopy(info)
    for node in prompt.values():
        for name, value in node["inputs"].items():
            declared = (info[node["class_type"]]["input"].get("required") or {}).get(name)
            if declared is None or not isinstance(value, str) or (node["class_type"], name) not in accepted:
                continue
            kind, options = declared[0], (declared[1] if len(declared) > 1 else {})
            if kind == "COMBO":
                declared = [kind, {**options, "options": [*options.get("options", []), value]}]
            else:
                declared = [[*kind, value], options]
            info[node["class_type"]]["input"]["required"][name] = declared
    return info
