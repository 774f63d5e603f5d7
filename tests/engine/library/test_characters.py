"""Character presets: save/load round trip, folders, validation errors that name the file and field."""

from __future__ import annotations

import pytest
import yaml

from charforge.common.characters import (
    Character,
    CharacterError,
    CharacterLora,
    GenerationParams,
    inject_trigger_words,
)
from charforge.engine.library import characters as chars


def _alice() -> Character:
    return Character(
        name="alice",
        display_name="Alice Liddell",
        trigger_words=["alice_cf", "blue dress"],
        loras=[CharacterLora("alice.safetensors", 0.9), CharacterLora("styles/film.safetensors", 0.4, 0.2)],
        prompt="photo of a woman, natural light",
        negative_prompt="blurry, deformed",
        identity="alice",
        reference_photos="/data/alice",
        threshold=0.35,
        base_model="sdxl",
        generation=GenerationParams(
            steps=30, cfg=6.5, width=832, height=1216, sampler="dpmpp_2m", scheduler="karras", seed=42
        ),
    )


@pytest.fixture
def models_dir(no_comfy, monkeypatch):
    folder = no_comfy / "models"
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(folder))
    return folder


def test_round_trip_through_the_characters_folder(models_dir):
    path = chars.save_character(_alice())
    assert path == models_dir / "charforge" / "characters" / "alice.yaml"
    assert chars.list_characters() == ["alice"]
    loaded = chars.load_character("alice")
    expected = _alice()
    expected.path = str(path)
    assert loaded == expected
    assert chars.load_character(path) == loaded  # by path too
    assert loaded.lora_stack == [("alice.safetensors", 0.9), ("styles/film.safetensors", 0.4)]
    assert loaded.loras[1].strength_clip == 0.2 and loaded.loras[0].strength_clip == 0.9
    # what the storyboard uses
    assert (
        loaded.prompt_text("in a garden")
        == "alice_cf, blue dress, photo of a woman, natural light, in a garden"
    )


def test_never_overwrites_unless_asked(models_dir):
    chars.save_character(_alice())
    changed = _alice()
    changed.prompt = "changed"
    with pytest.raises(FileExistsError, match="alice.yaml"):
        chars.save_character(changed)
    assert chars.load_character("alice").prompt != "changed"
    chars.save_character(changed, overwrite=True)
    assert chars.load_character("alice").prompt == "changed"


def test_inside_comfyui_presets_live_in_models_charforge(comfy_env):
    from charforge import bridge

    bridge.register_model_folders()
    path = chars.save_character(_alice())
    assert path == comfy_env.base_dir / "models" / "charforge" / "characters" / "alice.yaml"
    assert chars.list_characters() == ["alice"]


def test_trigger_words_are_injected_once():
    assert (
        inject_trigger_words("photo of Alice_CF smiling", ["alice_cf", "sks"])
        == "sks, photo of Alice_CF smiling"
    )
    once = inject_trigger_words("a park", ["ohwx man"])
    assert inject_trigger_words(once, ["ohwx man"]) == once == "ohwx man, a park"
    assert inject_trigger_words("", ["x"]) == "x"


def test_unknown_name_lists_the_saved_ones(models_dir):
    chars.save_character(_alice())
    with pytest.raises(CharacterError, match="'bob' not found.*alice"):
        chars.load_character("bob")


BAD = [
    ({"generation": {"steps": "many"}}, "generation.steps", "integer"),
    ({"generation": {"width": 1001}}, "generation.width", "multiple of 8"),
    ({"generation": {"cfg": -1}}, "generation.cfg", "0.0..100.0"),
    ({"generation": {"sampeler": "euler"}}, "generation.sampeler", "unknown"),
    ({"loras": [{"name": "a.safetensors", "weight": "strong"}]}, "loras[0].weight", "number"),
    ({"loras": [{"weight": 1}]}, "loras[0].name", "file name"),
    ({"loras": "a.safetensors"}, "loras", "list"),
    ({"threshold": 3}, "threshold", "0.0..1.0"),
    ({"base_model": "sd3"}, "base_model", "sd15, sdxl"),
    ({"trigger_words": [1, 2]}, "trigger_words", "list of words"),
    ({"promt": "typo"}, "promt", "unknown field"),
    ({"name": "bob"}, "name", "file name is the character's name"),
]


@pytest.mark.parametrize(("data", "field", "message"), BAD, ids=[b[1] for b in BAD])
def test_bad_files_name_file_and_field(tmp_path, data, field, message):
    path = tmp_path / "alice.yaml"
    path.write_text(yaml.safe_dump({**_alice().to_dict(), **data}), encoding="utf-8")
    with pytest.raises(CharacterError) as caught:
        chars.load_character(path)
    assert caught.value.field == field
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_broken_yaml_and_wrong_top_level(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("prompt: [unclosed", encoding="utf-8")
    with pytest.raises(CharacterError, match="not valid YAML"):
        chars.load_character(path)
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(CharacterError, match="mapping"):
        chars.load_character(path)
    with pytest.raises(CharacterError, match="usable character name"):
        chars.save_character(Character(name="../evil"), folder=tmp_path)


def test_minimal_file_gets_defaults(tmp_path):
    path = tmp_path / "min.yaml"
    path.write_text("trigger_words: ohwx, man\nloras: [ohwx.safetensors]\n", encoding="utf-8")
    c = chars.load_character(path)
    assert c.trigger_words == ["ohwx", "man"] and c.lora_stack == [("ohwx.safetensors", 1.0)]
    assert c.display_name == "min" and c.generation == GenerationParams()


def test_training_hook_saves_once(models_dir):
    line = chars.save_training_character("Bob", "bob_run.safetensors", "ohwx man", "sd15", 512)
    assert "saved" in line
    c = chars.load_character("Bob")
    assert c.lora_stack == [("bob_run.safetensors", 1.0)] and c.trigger_words == ["ohwx man"]
    assert (c.generation.width, c.base_model) == (512, "sd15")
    assert "already exists" in chars.save_training_character("Bob", "other.safetensors", "x", "sd15")
    assert chars.load_character("Bob").lora_stack[0][0] == "bob_run.safetensors"
