"""The pack imports the way ComfyUI imports it, and survives missing optional packages."""

import importlib.util
import logging

import pytest

from cf_testing.comfyui import REPO_ROOT, load_pack_like_comfyui, node_info, run_node, unload_pack
from charforge import deps


def test_loads_from_repo_root_like_comfyui(loaded_pack, comfy_env):
    mappings = loaded_pack.NODE_CLASS_MAPPINGS
    assert "CharForgeListImages" in mappings
    assert set(loaded_pack.NODE_DISPLAY_NAME_MAPPINGS) == set(mappings)
    # Imported under its path, not as `charforge`: every internal import must be relative.
    assert mappings["CharForgeListImages"].__module__.startswith(str(REPO_ROOT))
    for node_id, cls in mappings.items():
        assert node_info(node_id, cls)["category"].startswith("CharForge/")
    # Loading registered the pack's model folders in ComfyUI's registry.
    assert "animatediff_models" in comfy_env.folder_paths.folder_names_and_paths


def test_loading_logs_what_to_install_and_still_loads(comfy_env, monkeypatch, caplog):
    real_find_spec = importlib.util.find_spec

    def without_insightface(name, *args, **kwargs):
        return None if name == "insightface" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_insightface)
    caplog.set_level(logging.WARNING, logger="charforge")
    module = load_pack_like_comfyui(REPO_ROOT)
    try:
        assert module.NODE_CLASS_MAPPINGS
        assert "insightface: needed for face identity scoring" in caplog.text
        assert "pip install insightface" in caplog.text
    finally:
        unload_pack(module)


def test_missing_dependency_error_names_package_and_command(monkeypatch):
    with pytest.raises(deps.MissingDependencyError) as caught:
        deps.require("insightface_not_here_for_sure")
    assert "pip install insightface_not_here_for_sure" in str(caught.value)

    def broken_import(name, *a, **k):
        raise ImportError("DLL load failed")

    monkeypatch.setattr(deps.importlib, "import_module", broken_import)
    with pytest.raises(deps.MissingDependencyError, match="face identity scoring.*DLL load failed"):
        deps.require("insightface")


def test_node_runs_when_loaded_like_comfyui(loaded_pack, tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    cls = loaded_pack.NODE_CLASS_MAPPINGS["CharForgeListImages"]
    run = run_node(cls, folder=str(tmp_path), recursive=False, max_preview=4, preview_size=64)
    assert run.result[1] == 1
