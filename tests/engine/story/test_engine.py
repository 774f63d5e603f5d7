"""Storyboard engine: scene lists, LLM scene splitting against a loopback fake endpoint, frame selection on
planted scores, the sheet image, metadata.json and the ablation table."""

from __future__ import annotations

import json
import random

import pytest
from fakes.openai_chat import FakeChat, chat, scenes_json
from PIL import Image

from charforge.engine.score import ImageScore, ScoreSheet
from charforge.engine.story import (
    LLMSettings,
    Scene,
    SceneSplitError,
    SceneSplitter,
    Storyboard,
    StoryFrame,
    ablation_rows,
    ablation_to_dict,
    ablation_to_markdown,
    check_scene_count,
    ensure_face_first,
    frame_prompt,
    load_scenes,
    load_storyboard,
    parse_scene_reply,
    parse_scenes,
    pick_frame,
    storyboard_sheet,
    write_ablation,
)

SECRET = "sk-story-SECRET-42"


# --------------------------------------------------------------------------------------------------
# Scene lists


def test_text_scene_list_skips_blanks_comments_and_markers():
    scenes = parse_scenes(
        "# my story\n1. portrait of her face\n\n- she runs\n* she jumps\nScene 4: she sleeps\n"
        "she wakes, 2 cats watch\n"
    )
    assert [s.prompt for s in scenes] == [
        "portrait of her face",
        "she runs",
        "she jumps",
        "she sleeps",
        "she wakes, 2 cats watch",
    ]
    assert scenes[0].caption == "portrait of her face"


def test_json_and_yaml_scene_lists(tmp_path):
    data = {"scenes": ["close-up of the face", {"prompt": "walking  in   rain", "caption": "Rain"}]}
    (tmp_path / "s.json").write_text(json.dumps(data))
    (tmp_path / "s.yaml").write_text(
        "scenes:\n  - close-up of the face\n  - prompt: walking in rain\n    caption: Rain\n"
    )
    (tmp_path / "s.txt").write_text("close-up of the face\nwalking in rain\n")
    for name in ("s.json", "s.yaml"):
        scenes = load_scenes(tmp_path / name)
        assert [s.to_dict() for s in scenes] == [
            {"prompt": "close-up of the face", "caption": "close-up of the face"},
            {"prompt": "walking in rain", "caption": "Rain"},
        ]
    assert [s.prompt for s in load_scenes(tmp_path / "s.txt")] == ["close-up of the face", "walking in rain"]
    # auto detection of a bare JSON list and of YAML mappings
    assert len(parse_scenes('["a", "b"]')) == 2
    assert parse_scenes("- prompt: a\n  caption: A\n- prompt: b\n")[0].caption == "A"


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        ("", "auto", "holds no scene"),
        ("{not json", "json", "not valid JSON"),
        ('{"frames": []}', "json", "without a 'scenes' list"),
        ('[{"caption": "x"}]', "json", "has no 'prompt'"),
        ("[3]", "json", "must be a prompt string"),
        ("scenes: [a, [b", "yaml", "not valid YAML"),
    ],
)
def test_bad_scene_lists_say_what_is_wrong(text, fmt, message):
    with pytest.raises(ValueError, match=message):
        parse_scenes(text, fmt)


def test_scene_count_face_first_and_frame_prompt():
    six = [Scene(f"scene {i}") for i in range(6)]
    check_scene_count(six)
    with pytest.raises(ValueError, match="has 5: add scenes"):
        check_scene_count(six[:5])
    with pytest.raises(ValueError, match="has 11: remove scenes"):
        check_scene_count(six + six[:5])
    fixed = ensure_face_first(six)
    assert "face clearly visible" in fixed[0].prompt and fixed[1:] == six[1:]
    assert ensure_face_first([Scene("close-up portrait at night")])[0].prompt == "close-up portrait at night"
    assert frame_prompt(Scene("she runs"), "ohwx woman", "film still") == "ohwx woman, she runs, film still"
    assert frame_prompt(Scene("ohwx woman runs"), "ohwx woman", "") == "ohwx woman runs"


# --------------------------------------------------------------------------------------------------
# LLM scene splitting on a loopback fake endpoint


@pytest.fixture
def endpoint():
    fake = FakeChat()
    yield fake
    fake.close()


def splitter(endpoint, sleeps=None, **kw):
    settings = LLMSettings(
        base_url=endpoint.url, model="story-model", api_key_env="CF_STORY_KEY", timeout=5, **kw
    )
    return SceneSplitter(
        settings, sleep=(sleeps.append if sleeps is not None else lambda s: None), rng=random.Random(0)
    )


def test_split_sends_the_story_with_key_and_parses_scenes(endpoint, monkeypatch):
    monkeypatch.setenv("CF_STORY_KEY", SECRET)
    endpoint.script = [chat(scenes_json(7))]
    scenes = splitter(endpoint).split("She finds a map and sails to the island.")
    assert (
        len(scenes) == 7 and scenes[0].caption == "Hello" and scenes[6].prompt == "the character in scene 7"
    )
    request = endpoint.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {SECRET}"
    body = request["body"]
    assert body["model"] == "story-model" and body["response_format"] == {"type": "json_object"}
    assert "6 to 10" in body["messages"][0]["content"]
    assert body["messages"][1]["content"] == "Story: She finds a map and sails to the island."


def test_exact_frame_count_fenced_json_and_face_first(endpoint):
    endpoint.script = [chat("```json\n" + scenes_json(6, first="she wakes up in a small room") + "\n```")]
    scenes = splitter(endpoint).split("a day", frames=6)
    assert "exactly" not in endpoint.requests[0]["body"]["messages"][0]["content"]
    assert "6 to 6" in endpoint.requests[0]["body"]["messages"][0]["content"]
    assert scenes[0].prompt.startswith("close-up portrait, face clearly visible")


def test_429_backs_off_then_succeeds(endpoint):
    sleeps = []
    endpoint.script = [
        (429, {"error": {"message": "rate limited"}}, {"Retry-After": "2"}),
        (503, {"error": "busy"}, {}),
        chat(scenes_json(8)),
    ]
    s = splitter(endpoint, sleeps, base_delay=1.0)
    assert len(s.split("story")) == 8
    assert s.retries == 2 and sleeps[0] == 2.0 and 1.0 <= sleeps[1] <= 2.0  # Retry-After, then jittered 2**1


def test_malformed_json_is_asked_again_with_the_reason(endpoint):
    endpoint.script = [
        chat("Sure! Here are your scenes: 1. ..."),
        chat(json.dumps({"scenes": ["one", "two"]})),
        chat(scenes_json(6)),
    ]
    s = splitter(endpoint)
    assert len(s.split("story")) == 6
    assert len(s.malformed) == 2 and "not valid JSON" in s.malformed[0] and "has 2 scenes" in s.malformed[1]
    retry = endpoint.requests[1]["body"]["messages"]
    assert retry[2]["role"] == "assistant" and "rejected: the answer is not valid JSON" in retry[3]["content"]


def test_malformed_every_time_gives_a_clear_error(endpoint):
    endpoint.script = [chat("nope"), chat('{"scenes": "x"}'), chat("")]
    with pytest.raises(SceneSplitError, match=r"no usable scene list in 3 answer\(s\).*--scenes FILE"):
        splitter(endpoint).split("story")


def test_client_errors_fail_at_once_without_the_key(endpoint, monkeypatch):
    monkeypatch.setenv("CF_STORY_KEY", SECRET)
    endpoint.script = [(401, {"error": {"message": f"bad key {SECRET}"}}, {})]
    with pytest.raises(SceneSplitError) as info:
        splitter(endpoint).split("story")
    assert (
        "HTTP 401" in str(info.value) and "CF_STORY_KEY" in str(info.value) and SECRET not in str(info.value)
    )
    assert len(endpoint.requests) == 1


def test_retries_run_out():
    s = SceneSplitter(
        LLMSettings(base_url="http://127.0.0.1:9/v1", timeout=1, max_retries=2), sleep=lambda _: None
    )
    with pytest.raises(SceneSplitError, match=r"gave up after 3 attempt\(s\).*connection failed"):
        s.split("story")


def test_parse_scene_reply_limits():
    with pytest.raises(ValueError, match="11 scenes; 6 to 10"):
        parse_scene_reply(scenes_json(11))
    assert len(parse_scene_reply(json.dumps([f"s{i}" for i in range(10)]))) == 10
    with pytest.raises(SceneSplitError, match="empty"):
        SceneSplitter(LLMSettings(base_url="http://127.0.0.1:9/v1")).split("   ")


# --------------------------------------------------------------------------------------------------
# Selection on planted scores


def sheet(metric, values):
    return ScoreSheet(
        metric,
        [
            ImageScore(i, v, v is not None, "" if v is not None else "no face found")
            for i, v in enumerate(values)
        ],
    )


def test_pick_combines_identity_and_text():
    identity = sheet("identity", [0.50, 0.62, None, 0.60])
    text = sheet("clip", [0.30, 0.10, 0.35, 0.33])
    # identity only: candidate 1; with text weight 1, candidate 3 (0.60 + 0.825) beats 1 (0.62 + 0.25)
    assert pick_frame(identity, None).index == 1
    pick = pick_frame(identity, text, 1.0, 1.0)
    assert pick.index == 3 and pick.identity == 0.60 and pick.text == 0.33
    assert pick.combined == pytest.approx((0.60 + 2.5 * 0.33) / 2)
    assert pick.ranking[-1] == 2  # no face: ranked last
    assert pick.to_dict()["candidates"] == 4


def test_pick_without_faces_falls_back():
    no_faces = sheet("identity", [None, None, None])
    pick = pick_frame(no_faces, sheet("clip", [0.1, 0.3, 0.2]))
    assert pick.index == 1 and "picked by text" in pick.note and pick.identity is None
    pick = pick_frame(no_faces)
    assert pick.index == 0 and "kept the first" in pick.note
    with pytest.raises(ValueError, match="different candidates"):
        pick_frame(sheet("identity", [0.1]), sheet("clip", [0.1, 0.2]))


# --------------------------------------------------------------------------------------------------
# Storyboard record, sheet, ablation


def board(mode, identities, texts):
    frames = [
        StoryFrame(
            index=i,
            prompt=f"prompt {i}",
            caption=f"caption {i}",
            seed=42 + i,
            candidates=4,
            chosen=i % 4,
            identity=v,
            text=t,
            image=f"frame_{i + 1:02d}.png",
        )
        for i, (v, t) in enumerate(zip(identities, texts, strict=True))
    ]
    return Storyboard(mode=mode, frames=frames, story="a story", models={"checkpoint": "tiny.safetensors"})


def test_metadata_round_trip(tmp_path):
    b = board("reference", [0.5, None, 0.7], [0.3, 0.2, None])
    b.frames[1].guide_identity = 0.81234567
    path = b.write(tmp_path)
    data = json.loads(path.read_text())
    assert data["format"] == "charforge.storyboard" and data["mode"] == "reference"
    assert data["summary"] == {
        "frames": 3,
        "faces": 2,
        "identity_mean": 0.6,
        "identity_min": 0.5,
        "text_mean": 0.25,
    }
    assert [f["seed"] for f in data["frames"]] == [42, 43, 44] and data["frames"][1][
        "guide_identity"
    ] == 0.8123
    again = load_storyboard(tmp_path)
    assert again.to_dict() == b.to_dict()
    with pytest.raises(ValueError, match="mode must be one of"):
        Storyboard(mode="fancy", frames=[])


def test_sheet_draws_every_frame_in_a_grid():
    colours = [
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
        (0, 255, 255),
        (255, 0, 255),
        (90, 90, 90),
    ]
    images = [Image.new("RGB", (64, 48), c) for c in colours]
    b = board("simple", [0.5, None, 0.7, 0.4, 0.3, 0.2, 0.1], [0.3] * 7)
    picture = storyboard_sheet(images, b.frames, "title", thumb=100)
    # 7 frames -> 4 columns, 2 rows
    assert picture.width == 16 * 2 + 4 * 100 + 3 * 14
    pixels = picture.load()
    found = set()
    for x in range(0, picture.width, 4):
        for y in range(0, picture.height, 4):
            found.add(pixels[x, y])
    assert set(colours) <= found
    with pytest.raises(ValueError, match="one image per frame"):
        storyboard_sheet(images[:2], b.frames)


def test_ablation_table_compares_the_modes(tmp_path):
    boards = [
        board("simple", [0.5, 0.6], [0.30, 0.32]),
        board("reference", [0.7, 0.8], [0.28, 0.26]),
        board("base", [0.1, None], [None, None]),
    ]
    rows = ablation_rows(boards)
    assert [(r.mode, r.faces, r.identity_mean, r.text_mean) for r in rows] == [
        ("simple", 2, 0.55, 0.31),
        ("reference", 2, 0.75, 0.27),
        ("base", 1, 0.1, None),
    ]
    data = ablation_to_dict(rows)
    assert data["best_identity"] == "reference" and data["best_text"] == "simple"
    markdown = ablation_to_markdown(rows)
    assert "| reference-guided (frame 1 guides the rest) | 2 | 2 | 0.750 | 0.700 | 0.270 |" in markdown
    assert "| base model without LoRA | 2 | 1 | 0.100 | 0.100 | - |" in markdown
    md, js = write_ablation(rows, tmp_path)
    assert md.read_text() == markdown and json.loads(js.read_text())["modes"][2]["identity_mean"] == 0.1
