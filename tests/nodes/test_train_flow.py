"""The Train LoRA node on a Flux.1 base inside the ComfyUI stand-in: inputs for the parts, a kohya Flux LoRA out."""
# ruff: noqa: F811 - the tiny_flux fixture is imported, then requested by name

from __future__ import annotations

import json
import shutil

import pytest

from cf_testing.comfyui import run_node
from cf_testing.flow_models import tiny_flux  # noqa: F401 - a fixture
from cf_testing.model_fixtures import train_inputs

pytestmark = [pytest.mark.usefixtures("one_thread")]


def test_node_trains_a_flux_lora_from_a_diffusers_folder(train_env, tiny_flux):
    from charforge import bridge
    from charforge.engine.library.formats import read_lora
    from charforge.nodes.train import NONE, TrainLoRA

    shutil.copytree(tiny_flux.diffusers_dir, train_env.base_dir / "models" / "diffusers" / "tiny_flux")
    optional = TrainLoRA.INPUT_TYPES()["optional"]
    assert {"clip_l", "t5xxl", "clip_g", "vae", "lora_layout"} <= set(optional)
    assert optional["t5xxl"][0][0] == NONE
    inputs = train_inputs(
        base_model="[diffusers] tiny_flux",
        output_name="flux alice",
        steps=2,
        memory_profile="auto",
        use_preset_values=False,
        overrides=json.dumps({"mixed_precision": "no", "bucket_step": 32, "min_bucket": 32}),
    )
    out = run_node(TrainLoRA, **inputs)
    lora_name, run, _, _ = out.result
    assert lora_name == "flux_alice.safetensors" and lora_name in bridge.list_models("loras")
    assert run.step == 2
    tensors, meta = read_lora(run.lora_path)
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in tensors)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"


def test_diffusion_models_are_offered_as_bases(comfy_env, tiny_flux):
    from charforge.nodes.train import DIFFUSION_MODEL_PREFIX, TrainLoRA, resolve_base_model, resolve_parts

    folder = comfy_env.base_dir / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_flux.transformer_file, folder / "flux_tiny.safetensors")
    (comfy_env.base_dir / "models" / "text_encoders").mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_flux.clip_l_file, comfy_env.base_dir / "models" / "text_encoders" / "clip_l.safetensors")
    choice = DIFFUSION_MODEL_PREFIX + "flux_tiny.safetensors"
    assert choice in TrainLoRA.INPUT_TYPES()["required"]["base_model"][0]
    assert resolve_base_model(choice) == str(folder / "flux_tiny.safetensors")
    parts = resolve_parts(clip_l="clip_l.safetensors", t5="(none)")
    assert list(parts) == ["clip_l"] and parts["clip_l"].endswith("text_encoders/clip_l.safetensors")
