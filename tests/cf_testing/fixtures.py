"""Pytest fixtures shared by the whole suite (registered as a plugin in tests/conftest.py)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .comfyui import REPO_ROOT, STUB_MODULES, STUBS_DIR, load_pack_like_comfyui, unload_pack

#: marks a test that runs InsightFace's real load path (skipped where the ``faces`` extra is not installed)
needs_insightface = pytest.mark.skipif(
    importlib.util.find_spec("insightface") is None,
    reason="insightface is not installed (pip install -e '.[faces]'); the real load path cannot run",
)


@dataclass
class ProgressCall:
    value: int
    total: int
    node_id: str | None
    preview: Any


@dataclass
class ComfyEnv:
    """The ComfyUI stand-in as a test sees it."""

    base_dir: Path
    folder_paths: ModuleType
    model_management: ModuleType
    utils: ModuleType
    server: Any  # the PromptServer instance
    progress: list[ProgressCall] = field(default_factory=list)

    def interrupt(self) -> None:
        """What POST /interrupt does: set the flag."""
        self.model_management.interrupt_current_processing(True)


def _drop_stub_modules() -> None:
    for name in STUB_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def comfy_env(tmp_path):
    """Run the test as if inside ComfyUI: stand-in modules importable, a fresh base directory."""
    from charforge import bridge

    _drop_stub_modules()
    sys.path.insert(0, str(STUBS_DIR))
    try:
        folder_paths = importlib.import_module("folder_paths")
        utils = importlib.import_module("comfy.utils")
        model_management = importlib.import_module("comfy.model_management")
        server_module = importlib.import_module("server")
        folder_paths.set_base_directory(tmp_path / "comfy")
        server = server_module.PromptServer()
        env = ComfyEnv(tmp_path / "comfy", folder_paths, model_management, utils, server)

        def hook(value, total, preview, prompt_id=None, node_id=None):
            # Same order as ComfyUI's main.hijack_progress: interrupt check first, then the message.
            model_management.throw_exception_if_processing_interrupted()
            env.progress.append(ProgressCall(value, total, node_id, preview))
            server.send_sync(
                "progress",
                {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                server.client_id,
            )

        utils.set_progress_bar_global_hook(hook)
        bridge.reset()
        yield env
    finally:
        sys.path.remove(str(STUBS_DIR))
        _drop_stub_modules()
        bridge.reset()


@pytest.fixture
def no_comfy(monkeypatch, tmp_path):
    """Run the test as plain Python: no ComfyUI modules, fallback folders under tmp_path."""
    from charforge import bridge

    _drop_stub_modules()
    for var in ("COMFYUI_DIR", "CHARFORGE_MODELS_DIR", "CHARFORGE_OUTPUT_DIR", "CHARFORGE_INPUT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CHARFORGE_CONFIG", str(tmp_path / "no-config.yaml"))  # never the user's own config
    bridge.reset()
    assert not bridge.in_comfyui(), "a real ComfyUI module is importable; these tests need plain Python"
    yield tmp_path
    bridge.reset()


@pytest.fixture
def loaded_pack(comfy_env):
    """The repository imported as ComfyUI imports a pack cloned into custom_nodes/."""
    module = load_pack_like_comfyui(REPO_ROOT)
    try:
        yield module
    finally:
        unload_pack(module)


@pytest.fixture(scope="session")
def face_pack_models(tmp_path_factory):
    """A models folder with the InsightFace-format test pack in insightface/models/buffalo_l (built once)."""
    from .face_models import write_face_pack

    return write_face_pack(tmp_path_factory.mktemp("pack") / "insightface", "buffalo_l").parent.parent


@pytest.fixture
def comfy_with_faces(comfy_env, face_pack_models):
    """The ComfyUI stand-in with the pack's model folders registered and buffalo_l in models/insightface."""
    import shutil

    from charforge import bridge
    from charforge.engine.faces import FaceAnalyzer

    bridge.register_model_folders()
    shutil.copytree(face_pack_models, comfy_env.base_dir / "models" / "insightface")
    yield comfy_env
    FaceAnalyzer.clear_cache()


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3-compatible server (moto, fakes/moto_s3.py) on loopback for one test module; its endpoint URL."""
    pytest.importorskip("moto")
    from fakes.moto_s3 import moto_s3

    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def loras_env(comfy_env):
    """The ComfyUI stand-in with the pack's model folders registered and an empty ``models/loras``
    (``.loras``); the stand-in's LoRA modules (comfy.sd, comfy.model_patcher) are dropped afterwards."""
    from charforge import bridge

    bridge.register_model_folders()
    loras = comfy_env.base_dir / "models" / "loras"
    loras.mkdir(parents=True)
    comfy_env.loras = loras
    yield comfy_env
    for name in ("comfy.sd", "comfy.model_patcher"):
        sys.modules.pop(name, None)


@pytest.fixture
def ipadapter_env(loras_env):
    """`loras_env` with an empty ``models/ipadapter`` (``.ipadapter``), where Load IP-Adapter looks."""
    folder = loras_env.base_dir / "models" / "ipadapter"
    folder.mkdir(parents=True)
    loras_env.ipadapter = folder
    return loras_env
