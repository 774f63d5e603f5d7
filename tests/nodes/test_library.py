"""Library nodes through the ComfyUI-like harness (stand-in folder registry, LoRA patching and model patcher)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cf_testing.comfyui import run_node
from cf_testing.lora_files import dense_deltas, random_state, write
from charforge import bridge
from charforge.common.characters import Character, CharacterLora, GenerationParams
from charforge.engine.library import characters as chars
from charforge.engine.library import formats
from charforge.nodes import NODE_CLASS_MAPPINGS
from charforge.nodes import library as nodes


@pytest.fixture
def env(loras_env):
    return loras_env  # cf_testing/fixtures.py


def _patchers(state):
    """Stand-in MODEL and CLIP whose weights are exactly the layers `state` adapts (small shapes)."""
    from comfy.model_patcher import ModelPatcher

    unet, clip = {}, {}
    table = formats.module_table(state.arch)
    for (component, name), module in state.modules.items():
        shape = tuple(module.delta().shape)
        if component == "unet":
            unet[f"diffusion_model.{table.entries[(component, name)].ldm}.weight"] = torch.randn(shape)
        else:
            clip_name = "clip_l" if component == "te1" else "clip_g"
            clip[f"{clip_name}.transformer.{name}.weight"] = torch.randn(shape)
    return ModelPatcher(unet), ModelPatcher(clip, kind="clip")


def _weight_key(state, key):
    component, name = key
    if component == "unet":
        return f"diffusion_model.{formats.module_table(state.arch).entries[key].ldm}.weight"
    return f"{'clip_l' if component == 'te1' else 'clip_g'}.transformer.{name}.weight"


def test_nodes_are_registered():
    for node_id in (
        "CharForgeLoadCharacter",
        "CharForgeApplyLoraStack",
        "CharForgeLoraInfo",
        "CharForgeMergeLoras",
        "CharForgeResizeLora",
        "CharForgeConvertLora",
    ):
        assert NODE_CLASS_MAPPINGS[node_id].CATEGORY == "CharForge/Library"


def test_apply_lora_stack_patches_with_comfyui_and_injects_trigger_words(env):
    a = random_state("sdxl", seed=1)
    a.metadata = {"modelspec.trigger_phrase": "alice_cf"}
    b = random_state("sdxl", seed=2)
    b.metadata = {"ss_tag_frequency": '{"1_x": {"film grain": 3}}'}
    write(a, env.loras / "alice.safetensors", "kohya")
    write(b, env.loras / "style.safetensors", "comfyui")
    model, clip = _patchers(a)
    assert "style.safetensors" in nodes.ApplyLoraStack.INPUT_TYPES()["optional"]["lora_1"][0]
    run = run_node(
        nodes.ApplyLoraStack,
        model=model,
        clip=clip,
        inject_trigger_words=True,
        loras=[("alice.safetensors", 0.8, 0.5)],
        prompt="in a park",
        lora_1="style.safetensors",
        strength_1=-0.4,
    )
    new_model, new_clip, prompt, report = run.result
    assert new_model is not model and not model.patches  # ComfyUI clones; the input stays unpatched
    assert prompt == "alice_cf, film grain, in a park"
    assert "NOT loaded" not in report and run.ui["text"] == [report]
    da, db = dense_deltas(a), dense_deltas(b)
    for key in a.modules:
        weight_key = _weight_key(a, key)
        patcher, original = (new_model, model) if key[0] == "unet" else (new_clip, clip)
        strength_a = 0.8 if key[0] == "unet" else 0.5
        expected = original.weights[weight_key] + strength_a * da[key].float() - 0.4 * db[key].float()
        torch.testing.assert_close(patcher.patched_weight(weight_key), expected, rtol=1e-4, atol=1e-4)
    assert len(env.progress) == 2


def test_apply_lora_stack_reports_keys_comfyui_did_not_load(env, caplog):
    a = random_state("sdxl", seed=3)
    write(a, env.loras / "a.safetensors")
    model, _ = _patchers(a)
    with caplog.at_level(logging.WARNING):
        run = run_node(
            nodes.ApplyLoraStack,
            model=model,
            clip=None,
            inject_trigger_words=False,
            lora_1="a.safetensors",
            strength_1=1.0,
        )
    report = run.result[3]
    te_keys = sum(1 for m in a.modules.values() if m.component != "unet")
    assert f"{3 * te_keys} key(s) NOT loaded" in report and "lora_te" in report


def test_apply_lora_outside_comfyui_says_it_needs_comfyui(no_comfy):
    with pytest.raises(RuntimeError, match="needs ComfyUI"):
        bridge.apply_lora(object(), None, "x.safetensors", 1.0, 1.0)


def test_load_character_outputs(env):
    from charforge.engine.score import identity_from_embeddings, save_identity

    identity = identity_from_embeddings("alice", "buffalo_l", [("a.png", np.ones(512, np.float32), 1)])
    save_identity(identity)
    preset = Character(
        name="alice",
        trigger_words=["alice_cf"],
        prompt="photo of a woman",
        negative_prompt="blurry",
        identity="alice",
        threshold=0.4,
        loras=[CharacterLora("alice.safetensors", 0.8, 0.6)],
        generation=GenerationParams(steps=12, cfg=5.0, width=512, height=768),
    )
    chars.save_character(preset)
    assert nodes.LoadCharacter.INPUT_TYPES()["required"]["character"][0] == ["alice"]
    run = run_node(nodes.LoadCharacter, character="alice", extra_prompt="at the beach", lora_weight_scale=0.5)
    prompt, negative, stack, ident, threshold, steps, cfg, width, height, report, guidance, shift = run.result
    assert prompt == "alice_cf, photo of a woman, at the beach" and negative == "blurry"
    assert stack == [("alice.safetensors", 0.4, 0.3)]
    assert ident.name == "alice" and ident.model == "buffalo_l"
    assert (threshold, steps, cfg, width, height) == (0.4, 12, 5.0, 512, 768)
    assert "sampler: euler" in report
    with pytest.raises(ValueError, match="no character"):
        run_node(nodes.LoadCharacter, character=nodes.NO_CHARACTER, extra_prompt="", lora_weight_scale=1.0)


def test_info_merge_resize_convert_nodes_write_new_files(env):
    a, b = random_state("sd15", seed=4, rank=3), random_state("sd15", seed=5, rank=3)
    a.metadata = {"modelspec.trigger_phrase": "zk"}
    write(a, env.loras / "a.safetensors")
    write(b, env.loras / "b.safetensors")
    info = run_node(nodes.LoraInfo, lora="a.safetensors")
    assert info.result[1] == "zk" and info.result[2] == "sd15" and "kohya" in info.ui["text"][0]

    first = run_node(
        nodes.MergeLoras,
        lora_1="a.safetensors",
        weight_1=0.5,
        lora_2="b.safetensors",
        weight_2=0.5,
        rank=0,
        output_name="ab",
        format="comfyui",
    )
    second = run_node(
        nodes.MergeLoras,
        lora_1="a.safetensors",
        weight_1=0.5,
        lora_2="b.safetensors",
        weight_2=0.5,
        rank=2,
        output_name="ab",
        format="kohya",
    )
    assert (first.result[0], second.result[0]) == ("ab.safetensors", "ab_2.safetensors")  # never overwritten
    assert "energy kept" in second.result[1]
    merged = formats.read_state(env.loras / "ab.safetensors")
    assert merged.source_format == "comfyui"
    for key, delta in dense_deltas(merged).items():
        torch.testing.assert_close(delta, 0.5 * dense_deltas(a)[key] + 0.5 * dense_deltas(b)[key])

    resized = run_node(nodes.ResizeLora, lora="a.safetensors", rank=1, output_name="")
    assert resized.result[0] == "a_r1.safetensors" and 0 < resized.result[1] < 1
    converted = run_node(nodes.ConvertLora, lora="a.safetensors", to="peft", output_name="")
    assert converted.result[0] == "a_peft.safetensors"
    assert formats.read_state(env.loras / "a_peft.safetensors").source_format == "peft"
    with pytest.raises(ValueError, match="plain file name"):
        run_node(nodes.ConvertLora, lora="a.safetensors", to="peft", output_name="../x")


# --------------------------------------------------------------------------------------------------
# Load LoRA (by name): the LoRA's file name arrives as a linked STRING (Train LoRA's lora_name)


def test_load_lora_by_name_takes_a_linked_string_and_patches_with_comfyui(env):
    spec = nodes.LoadLoraByName.INPUT_TYPES()["required"]
    assert spec["lora_name"][0] == "STRING" and spec["lora_name"][1]["forceInput"] is True
    assert list(spec) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert NODE_CLASS_MAPPINGS["CharForgeLoadLoraByName"] is nodes.LoadLoraByName
    a = random_state("sdxl", seed=6)
    write(a, env.loras / "hero.safetensors", "kohya")
    model, clip = _patchers(a)
    run = run_node(
        nodes.LoadLoraByName,
        model=model,
        clip=clip,
        lora_name="hero.safetensors",
        strength_model=0.7,
        strength_clip=0.3,
    )
    new_model, new_clip, report = run.result
    assert report == "hero.safetensors: model 0.7, clip 0.3" and run.ui["text"] == [report]
    assert new_model is not model and not model.patches
    deltas = dense_deltas(a)
    for key in a.modules:
        weight_key = _weight_key(a, key)
        patcher, original, strength = (new_model, model, 0.7) if key[0] == "unet" else (new_clip, clip, 0.3)
        torch.testing.assert_close(
            patcher.patched_weight(weight_key),
            original.weights[weight_key] + strength * deltas[key].float(),
            rtol=1e-4,
            atol=1e-4,
        )
    # Train LoRA's output is "<name>.safetensors"; the extension may also be left out.
    again = run_node(
        nodes.LoadLoraByName, model=model, clip=None, lora_name="hero", strength_model=1.0, strength_clip=0.0
    ).result[2]
    assert again.startswith("hero.safetensors: model 1, clip 0")


def test_load_lora_by_name_reports_unloaded_keys_and_missing_files(env):
    a = random_state("sdxl", seed=7)
    write(a, env.loras / "a.safetensors")
    model, _ = _patchers(a)
    report = run_node(
        nodes.LoadLoraByName,
        model=model,
        clip=None,
        lora_name="a.safetensors",
        strength_model=1.0,
        strength_clip=1.0,
    ).result[2]
    te_keys = sum(1 for m in a.modules.values() if m.component != "unet")
    assert f"{3 * te_keys} key(s) NOT loaded" in report
    with pytest.raises(
        bridge.ModelNotFoundError, match=r"'missing' is not in the loras folder.*found: a\.safetensors"
    ):
        run_node(
            nodes.LoadLoraByName,
            model=model,
            clip=None,
            lora_name="missing",
            strength_model=1.0,
            strength_clip=1.0,
        )
    for bad in ("", "../a.safetensors", "/etc/a.safetensors"):
        with pytest.raises(ValueError):
            run_node(
                nodes.LoadLoraByName,
                model=model,
                clip=None,
                lora_name=bad,
                strength_model=1.0,
                strength_clip=1.0,
            )
    assert (
        nodes.LoadLoraByName.IS_CHANGED(lora_name="a.safetensors")
        == (env.loras / "a.safetensors").stat().st_mtime
    )
    assert (
        nodes.LoadLoraByName.IS_CHANGED() == ""
    )  # linked: ComfyUI passes nothing, the source keys the cache
