"""``charforge lora ...`` and ``charforge character ...``."""

from __future__ import annotations

import json

import pytest
import torch

from cf_testing.cli import run_charforge as _run
from cf_testing.lora_files import dense_deltas, random_state, write
from charforge.engine.library import formats


@pytest.fixture
def loras(tmp_path):
    a = random_state("sdxl", seed=1, rank=4)
    a.metadata = {"modelspec.trigger_phrase": "alice_cf", "ss_base_model_version": "sdxl_base_v1-0"}
    b = random_state("sdxl", seed=2, rank=2)
    return a, b, write(a, tmp_path / "a.safetensors"), write(b, tmp_path / "b.safetensors", "peft")


def test_info_text_and_json(loras):
    _, _, a, _ = loras
    code, out, _ = _run("lora", "info", str(a))
    assert code == 0 and "alice_cf" in out and "Stable Diffusion XL" in out
    code, out, _ = _run("lora", "info", str(a), "--json", "--metadata")
    record = json.loads(out.strip().splitlines()[-1])
    assert record["event"] == "result" and record["base_model"] == "sdxl" and record["format"] == "kohya"
    assert (
        record["trigger_words"] == ["alice_cf"]
        and record["metadata"]["modelspec.trigger_phrase"] == "alice_cf"
    )


def test_merge_resize_convert(loras, tmp_path):
    a, b, pa, pb = loras
    code, out, _ = _run("lora", "merge", f"{pa}:0.7", f"{pb}:0.3", "-o", str(tmp_path / "m.safetensors"))
    assert code == 0 and "0.7 x a.safetensors" in out
    merged = formats.read_state(tmp_path / "m.safetensors")
    for key, delta in dense_deltas(merged).items():
        expected = 0.7 * dense_deltas(a)[key] + 0.3 * dense_deltas(b)[key]
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
    # never overwrites without --force
    code, _, err = _run("lora", "merge", str(pa), "-o", str(tmp_path / "m.safetensors"))
    assert code == 2 and "exists" in err
    code, out, _ = _run(
        "lora", "resize", str(pa), "--rank", "2", "-o", str(tmp_path / "r.safetensors"), "--json"
    )
    record = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and 0 < record["energy"]["retained"] < 1
    code, out, _ = _run(
        "lora", "resize", str(pa), "--rank", "1", "-o", str(tmp_path / "r1.safetensors"), "--modules"
    )
    assert "energy kept" in out and "r4->1" in out
    code, out, _ = _run("lora", "convert", str(pa), "--to", "comfyui", "-o", str(tmp_path / "c.safetensors"))
    assert code == 0 and "kohya -> comfyui" in out
    assert formats.read_state(tmp_path / "c.safetensors").source_format == "comfyui"
    code, _, err = _run("lora", "info", str(tmp_path / "missing.safetensors"))
    assert code == 2 and "does not exist" in err


def test_character_new_list_show(no_comfy, monkeypatch, loras):
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(no_comfy / "models"))
    _, _, pa, _ = loras
    code, out, err = _run(
        "character",
        "new",
        "alice",
        "--from-lora",
        str(pa),
        "--weight",
        "0.8",
        "--lora",
        "film.safetensors:0.4:0.2",
        "--prompt",
        "photo of a woman",
        "--negative",
        "blurry",
        "--identity",
        "alice",
        "--threshold",
        "0.35",
        "--steps",
        "30",
        "--seed",
        "7",
    )
    assert code == 0, err
    path = no_comfy / "models" / "charforge" / "characters" / "alice.yaml"
    assert str(path) in out
    code, _, err = _run("character", "new", "alice")
    assert code == 2 and "--force" in err
    code, out, _ = _run("character", "list")
    assert out.startswith("alice\t") and "alice_cf" in out
    code, out, _ = _run("character", "show", "alice", "--json")
    record = json.loads(out.strip().splitlines()[-1])
    assert record["loras"] == [
        {"name": "a.safetensors", "weight": 0.8},
        {"name": "film.safetensors", "weight": 0.4, "clip_weight": 0.2},
    ]
    assert record["base_model"] == "sdxl" and record["generation"]["width"] == 1024
    assert record["generation"]["seed"] == 7 and record["prompt_text"] == "alice_cf, photo of a woman"
    path.write_text(path.read_text() + "bogus: 1\n")
    code, out, _ = _run("character", "list")
    assert "INVALID" in out and "bogus" in out
    code, _, err = _run("character", "show", "alice")
    assert code == 2 and "bogus" in err


def test_character_new_with_folder_is_found_by_list_and_show_with_the_same_folder(
    no_comfy, monkeypatch, tmp_path
):
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(no_comfy / "models"))
    elsewhere = tmp_path / "my presets"
    code, out, err = _run("character", "new", "bob", "--trigger", "bob_cf", "--folder", str(elsewhere))
    assert code == 0, err
    assert str(elsewhere / "bob.yaml") in out and "--folder" in out  # says where it went and how to reach it
    code, out, _ = _run("character", "list", "--folder", str(elsewhere))
    assert out.startswith("bob\t") and "bob_cf" in out
    code, out, err = _run("character", "show", "bob", "--folder", str(elsewhere), "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["trigger_words"] == ["bob_cf"]
    code, _, err = _run("character", "show", "bob")  # not in the characters folder, as the message said
    assert code == 2 and "not found" in err


def test_flux_lora_info_and_a_preset_from_it(no_comfy, monkeypatch, tmp_path):
    from cf_testing.lora_files import FLUX_TINY, random_flow_state
    from charforge.engine.library import flow_layouts as fl
    from charforge.engine.library.formats import LoraModule, LoraState

    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(no_comfy / "models"))
    tiny = write(random_flow_state(FLUX_TINY), tmp_path / "tiny.safetensors")
    code, out, err = _run("lora", "info", str(tiny), "--json")
    record = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and record["base_model"] == "flux" and record["fits"] == []
    # A full-size Flux.1-dev LoRA (guidance embedder adapted): the preset gets flux-dev and its sampling.
    shape = fl.lora_targets(fl.VARIANTS["flux-dev"])["guidance_in.in_layer"]
    module = LoraModule(
        "unet", "guidance_in.in_layer", torch.ones(2, shape[1]), torch.ones(shape[0], 2), None
    )
    state = LoraState("flux", {("unet", module.name): module}, {"modelspec.trigger_phrase": "sks"}, "")
    dev = write(state, tmp_path / "dev.safetensors")
    code, out, err = _run("character", "new", "sks", "--from-lora", str(dev))
    assert code == 0, err
    code, out, _ = _run("character", "show", "sks", "--json")
    record = json.loads(out.strip().splitlines()[-1])
    assert record["base_model"] == "flux-dev" and record["trigger_words"] == ["sks"]
    assert record["generation"]["cfg"] == 1.0 and record["generation"]["width"] == 1024
