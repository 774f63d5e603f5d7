"""The bridge: ComfyUI behaviour through the stand-in, plain-Python fallbacks without it."""

import logging

import pytest

from charforge import bridge

# ---------------------------------------------------------------------------- inside ComfyUI


def test_detects_comfyui(comfy_env):
    assert bridge.in_comfyui()


def test_registers_pack_folders_with_own_extensions(comfy_env):
    fp = comfy_env.folder_paths
    shared = fp.supported_pt_extensions
    keys = bridge.register_model_folders()
    assert {"animatediff_models", "insightface", "wd14_tagger"} <= set(keys)
    paths, exts = fp.folder_names_and_paths["insightface"]
    assert paths == [str(comfy_env.base_dir / "models" / "insightface")]
    assert exts == {".onnx"}
    # ComfyUI shares one extension set between many keys: it must not have been mutated.
    assert shared == {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
    assert fp.folder_names_and_paths["checkpoints"][1] is shared
    # Twice is harmless: no duplicate folder.
    bridge.register_model_folders()
    assert fp.get_folder_paths("insightface") == paths


def test_registration_keeps_paths_from_extra_model_paths_yaml(comfy_env, tmp_path):
    fp = comfy_env.folder_paths
    fp.add_model_folder_path("animatediff_models", str(tmp_path / "shared_motion"))  # what the yaml does
    bridge.register_model_folders()
    paths, exts = fp.folder_names_and_paths["animatediff_models"]
    assert paths[0] == str(tmp_path / "shared_motion")
    assert str(comfy_env.base_dir / "models" / "animatediff_models") in paths
    assert ".safetensors" in exts and "" not in exts


def test_models_found_through_folder_registry(comfy_env):
    bridge.register_model_folders()
    folder = comfy_env.base_dir / "models" / "insightface" / "models" / "buffalo_l"
    folder.mkdir(parents=True)
    (folder / "w600k_r50.onnx").write_bytes(b"x")
    (folder / "readme.txt").write_text("not a model")
    assert bridge.list_models("insightface") == ["models/buffalo_l/w600k_r50.onnx"]
    assert bridge.find_model("insightface", "models/buffalo_l/w600k_r50.onnx").endswith("w600k_r50.onnx")
    with pytest.raises(bridge.ModelNotFoundError, match="insightface"):
        bridge.find_model("insightface", "models/antelopev2/glintr100.onnx")


def test_progress_goes_through_comfy_progress_bar(comfy_env):
    progress = bridge.control(4, node_id="7")
    progress.advance()
    progress.advance(2)
    progress.progress(10)  # clamped to total, as ComfyUI does
    assert [(c.value, c.total, c.node_id) for c in comfy_env.progress] == [
        (1, 4, "7"),
        (3, 4, "7"),
        (4, 4, "7"),
    ]
    assert [m[0] for m in comfy_env.server.messages] == ["progress"] * 3


def test_interrupt_raises_comfyui_exception_and_clears_flag(comfy_env):
    progress = bridge.control(3)
    progress.advance()
    comfy_env.interrupt()
    with pytest.raises(comfy_env.model_management.InterruptProcessingException) as caught:
        progress.advance()
    # One exception that is both: ComfyUI reports the run as interrupted, the engine sees its own Cancelled.
    assert isinstance(caught.value, bridge.Cancelled) and bridge.is_cancellation(caught.value)
    assert not comfy_env.model_management.processing_interrupted()
    comfy_env.interrupt()
    with pytest.raises(comfy_env.model_management.InterruptProcessingException):
        bridge.check_cancelled()


def test_send_event_targets_the_prompt_client(comfy_env):
    comfy_env.server.client_id = "client-1"
    comfy_env.server.last_prompt_id = "prompt-9"
    bridge.send_event("status", {"step": 3}, node_id="12")
    event, data, sid = comfy_env.server.messages[-1]
    assert event == "charforge.status"
    assert sid == "client-1"
    assert data == {"step": 3, "prompt_id": "prompt-9", "node": "12"}


def test_directories_are_comfyuis(comfy_env):
    assert bridge.output_directory() == str(comfy_env.base_dir / "output")
    assert bridge.input_directory() == str(comfy_env.base_dir / "input")


# ---------------------------------------------------------------------------- plain Python


def test_fallback_model_folders_from_environment(no_comfy, monkeypatch):
    models = no_comfy / "models"
    (models / "loras").mkdir(parents=True)
    (models / "loras" / "hero.safetensors").write_bytes(b"x")
    (models / "loras" / "notes.txt").write_text("x")
    extra = no_comfy / "more_loras"
    (extra / "sub").mkdir(parents=True)
    (extra / "sub" / "villain.safetensors").write_bytes(b"x")
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(models))
    monkeypatch.setenv("CHARFORGE_PATH_LORAS", str(extra))
    assert bridge.list_models("loras") == ["hero.safetensors", "sub/villain.safetensors"]
    assert bridge.find_model("loras", "sub/villain.safetensors") == str(extra / "sub" / "villain.safetensors")
    assert bridge.register_model_folders() == []


def test_fallback_uses_comfyui_dir_and_its_folder_names(no_comfy, monkeypatch):
    comfy = no_comfy / "ComfyUI"
    (comfy / "models" / "clip").mkdir(parents=True)
    (comfy / "models" / "clip" / "clip_l.safetensors").write_bytes(b"x")
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))
    assert bridge.list_models("text_encoders") == ["clip_l.safetensors"]


def test_missing_model_message_says_where_to_look(no_comfy):
    with pytest.raises(bridge.ModelNotFoundError, match="CHARFORGE_MODELS_DIR"):
        bridge.find_model("checkpoints", "sd15.safetensors")


def test_fallback_progress_logs_and_calls_back(no_comfy, caplog):
    seen = []
    caplog.set_level(logging.INFO, logger="charforge")
    progress = bridge.control(2, on_progress=lambda v, t, text: seen.append((v, t)), label="unit")
    progress.advance()
    progress.advance()
    assert seen == [(1, 2), (2, 2)]
    assert "unit: 2/2" in caplog.text


def test_fallback_cancel_flag(no_comfy):
    progress = bridge.control(5)
    progress.advance()
    bridge.request_cancel()
    with pytest.raises(bridge.Cancelled) as caught:
        progress.advance()
    assert bridge.is_cancellation(caught.value)
    progress.advance()  # the flag was consumed: work can start again
    assert not bridge.is_cancellation(ValueError("x"))


def test_fallback_directories(no_comfy, monkeypatch):
    monkeypatch.setenv("CHARFORGE_OUTPUT_DIR", str(no_comfy / "out"))
    assert bridge.output_directory() == str(no_comfy / "out")
    bridge.send_event("status", {"x": 1})  # no server: logged, not raised


def test_fallback_model_folders_from_config_file(no_comfy, monkeypatch):
    models = no_comfy / "studio" / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "sd15.safetensors").write_bytes(b"x")
    extra = no_comfy / "extra_ckpts"
    extra.mkdir()
    (extra / "sdxl.safetensors").write_bytes(b"x")
    config = no_comfy / "config.yaml"
    config.write_text(f"models:\n  dir: {models}\n  folders:\n    checkpoints: [{extra}]\nprofiles: {{}}\n")
    monkeypatch.setenv("CHARFORGE_CONFIG", str(config))
    assert bridge.list_models("checkpoints") == ["sd15.safetensors", "sdxl.safetensors"]
    assert bridge.model_folders("checkpoints")[0] == str(extra)  # explicit folders come first


def test_broken_config_file_is_reported_not_fatal(no_comfy, monkeypatch, caplog):
    config = no_comfy / "config.yaml"
    config.write_text("models: [unclosed\n")
    monkeypatch.setenv("CHARFORGE_CONFIG", str(config))
    with pytest.raises(bridge.ModelNotFoundError, match="models.dir"):
        bridge.find_model("loras", "x.safetensors")
    assert "ignoring config" in caplog.text


def test_add_route_registers_once_on_comfy_server(comfy_env):
    async def handler(request):
        return None

    assert bridge.add_route("GET", "/charforge/test", handler)
    assert bridge.add_route("GET", "/charforge/test", handler)  # twice: registered once
    assert comfy_env.server.routes.registered == [("GET", "/charforge/test", handler)]


def test_add_route_outside_comfyui_is_a_no_op(no_comfy):
    assert bridge.add_route("GET", "/charforge/test", lambda request: None) is False


def test_comfyui_root(comfy_env):
    root = bridge.comfyui_root()
    assert (root / "comfy" / "utils.py").exists()  # the folder holding comfy/, as in a real install


def test_comfyui_root_outside_comfyui(no_comfy, monkeypatch):
    assert bridge.comfyui_root() is None
    monkeypatch.setenv("COMFYUI_DIR", str(no_comfy / "ComfyUI"))
    assert bridge.comfyui_root() == no_comfy / "ComfyUI"


def test_model_folders_holding_a_marker_file(no_comfy, monkeypatch):
    root = no_comfy / "models"
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(root))
    for name in ("a", "group/b", "group/deeper/c"):
        (root / "diffusers" / name).mkdir(parents=True)
        (root / "diffusers" / name / "model_index.json").write_text("{}")
    (root / "diffusers" / "no_marker").mkdir()
    assert bridge.model_dirs("diffusers", "model_index.json") == ["a", "group/b"]  # one or two levels down
    assert bridge.model_dirs("diffusers", "model_index.json", lambda marker: marker.parent.name == "b") == [
        "group/b"
    ]
    assert bridge.find_model_dir("diffusers", "group/b", "model_index.json") == str(
        root / "diffusers" / "group" / "b"
    )
    with pytest.raises(bridge.ModelNotFoundError, match="diffusers model 'no_marker' not found"):
        bridge.find_model_dir("diffusers", "no_marker", "model_index.json", what="diffusers model")
    assert bridge.first_model_folder("loras") == root / "loras"


def test_no_model_folder_says_how_to_configure_one(no_comfy):
    with pytest.raises(bridge.ModelNotFoundError, match="CHARFORGE_MODELS_DIR"):
        bridge.first_model_folder("loras")
