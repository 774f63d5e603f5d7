"""Character presets and scene lists refuse YAML alias bombs quickly, with short messages."""

from __future__ import annotations

import time

import pytest

from charforge.common.characters import CharacterError, validate_character
from charforge.common.safe_yaml import UnsafeYaml, load_yaml, short_repr
from charforge.engine.library.characters import read_character_file
from charforge.engine.story.scenes import parse_scenes

# Nine levels of nine aliases: 9**9 (387 million) strings once expanded, from under a kilobyte.
LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


def test_billion_laughs_preset_is_refused_quickly_with_a_short_message(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text("trigger_words: *i\n" + LAUGHS, encoding="utf-8")
    start = time.perf_counter()
    with pytest.raises(CharacterError) as info:
        read_character_file(path)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "aliases" in message and "bomb.yaml" in message and len(message) < 400


def test_billion_laughs_scene_list_is_refused():
    with pytest.raises(ValueError, match="aliases") as info:
        parse_scenes("scenes: *i\n" + LAUGHS, "yaml", "story.yaml")
    assert len(str(info.value)) < 400


def test_oversized_document_is_refused_before_parsing():
    with pytest.raises(UnsafeYaml, match="at most 100 bytes"):
        load_yaml("x: " + "y" * 200, max_bytes=100)
    assert load_yaml("x: [1, 2]") == {"x": [1, 2]}
    assert load_yaml("base: &b 1\nother: 2") == {"base": 1, "other": 2}  # an anchor alone expands nothing


def test_validation_messages_quote_a_short_repr_of_huge_values():
    huge = [["lol"] * 1000] * 1000  # what an expanded alias would look like, built directly
    with pytest.raises(CharacterError) as info:
        validate_character({"trigger_words": huge}, "x")
    assert len(str(info.value)) < 400
    with pytest.raises(CharacterError) as info:
        validate_character({"loras": [{"name": "a", "weight": "w" * 100_000}]}, "x")
    assert len(str(info.value)) < 400
    with pytest.raises(CharacterError) as info:
        validate_character({f"field{i}": 1 for i in range(10_000)}, "x")
    assert len(str(info.value)) < 600
    assert len(short_repr("z" * 10_000)) < 100
