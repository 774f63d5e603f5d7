"""Library nodes on Flux.1 and SD3/SD3.5 LoRAs through the ComfyUI-like harness.

The stand-in MODEL holds the single-file weights a Flux / SD3 LoRA adapts (``diffusion_model.<path>.weight``,
toy widths), which is what ComfyUI's key map resolves ``lora_unet_<path>`` and ``diffusion_model.<path>`` to.
"""

from __future__ import annotations

import pytest
import torch

from cf_testing.comfyui import run_node
from cf_testing.lora_files import FLUX_TINY, SD3_TINY, random_flow_state, write
from charforge.common.characters import Character, CharacterLora, family_generation
from charforge.engine.library import characters as chars
from charforge.engine.library import formats
from charforge.nodes import library as nodes


@pytest.fixture
def env(loras_env):
    return loras_env  # cf_testing/fixtures.py


def _model(state):
    from comfy.model_patcher import ModelPatcher

    weights = {
        f"diffusion_model.{name}.weight": torch.randn(tuple(module.delta().shape))
        for (_, name), module in state.modules.items()
    }
    return ModelPatcher(weights)


@pytest.mark.parametrize("variant", [FLUX_TINY, SD3_TINY], ids=lambda v: v.family)
@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_apply_lora_stack_patches_every_fused_weight(env, variant, fmt):
    state = random_flow_state(variant, seed=1)
    state.metadata["modelspec.trigger_phrase"] = "sks person"
    write(state, env.loras / "alice.safetensors", fmt)
    model = _model(state)
    run = run_node(
        nodes.ApplyLoraStack,
        model=model,
        clip=None,
        inject_trigger_words=True,
        loras=[("alice.safetensors", 0.8, 0.8)],
        prompt="a photo in a park",
    )
    new_model, _, prompt, report = run.result
    assert prompt == "sks person, a photo in a park"
    assert "NOT loaded" not in report and f"({variant.family} LoRA)" in report
    for (_, name), module in state.modules.items():
        key = f"diffusion_model.{name}.weight"
        expected = model.weights[key] + 0.8 * module.delta().float()
        torch.testing.assert_close(new_model.patched_weight(key), expected, rtol=1e-4, atol=1e-4)


def test_lora_info_convert_merge_and_resize_nodes(env):
    write(random_flow_state(FLUX_TINY, seed=2), env.loras / "a.safetensors", "kohya")
    write(random_flow_state(FLUX_TINY, seed=3), env.loras / "b.safetensors", "comfyui")
    info = run_node(nodes.LoraInfo, lora="a.safetensors").result
    assert info[2] == "flux" and "base model: Flux.1" in info[0]

    name, report = run_node(nodes.ConvertLora, lora="a.safetensors", to="peft", output_name="").result
    assert name == "a_peft.safetensors" and "kohya -> peft (flux)" in report
    tensors, _ = formats.read_lora(env.loras / name)
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in tensors

    merged = run_node(
        nodes.MergeLoras,
        lora_1="a_peft.safetensors",
        weight_1=1.0,
        lora_2="b.safetensors",
        weight_2=-0.5,
        rank=0,
        output_name="ab",
        format="kohya",
    ).result[0]
    a, b, ab = (formats.read_state(env.loras / n) for n in ("a.safetensors", "b.safetensors", merged))
    for key, module in ab.modules.items():
        expected = a.modules[key].delta() - 0.5 * b.modules[key].delta()
        torch.testing.assert_close(module.delta(), expected, rtol=1e-4, atol=1e-4)

    name, energy, report = run_node(nodes.ResizeLora, lora=merged, rank=1, output_name="").result
    assert name == "ab_r1.safetensors" and 0 < energy < 1
    assert formats.read_state(env.loras / name).arch == "flux"


def test_load_character_gives_a_flux_presets_guidance_and_loras(env):
    write(random_flow_state(FLUX_TINY, seed=4), env.loras / "alice_flux.safetensors", "kohya")
    generation = family_generation("flux-dev")
    chars.save_character(
        Character(
            name="alice",
            trigger_words=["alice_cf"],
            prompt="photo of a woman",
            base_model="flux-dev",
            loras=[CharacterLora("alice_flux.safetensors", 0.9, 0.9)],
            generation=generation,
        )
    )
    result = run_node(nodes.LoadCharacter, character="alice", extra_prompt="", lora_weight_scale=1.0).result
    stack, cfg, report, guidance = result[2], result[6], result[9], result[10]
    assert stack == [("alice_flux.safetensors", 0.9, 0.9)]
    assert (cfg, guidance) == (generation.cfg, generation.guidance)
    assert "base model: flux-dev" in report and "FluxGuidance" in report
