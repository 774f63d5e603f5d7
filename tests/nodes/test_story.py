"""CharForge/Story nodes run as ComfyUI runs them (list semantics as the executor applies them), on the
InsightFace-format test models: planted faces of known persons make the right candidate known in advance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cf_testing.comfyui import image_batch as batch
from cf_testing.comfyui import node_info, run_node
from cf_testing.face_models import blank_image, face_image
from cf_testing.fixtures import needs_insightface
from charforge.engine.faces import FaceAnalyzer
from charforge.engine.score import build_identity
from charforge.nodes import NODE_CLASS_MAPPINGS
from charforge.nodes.story import StoryboardSelect, StoryboardSheet, StoryScenes


def select(analyzer, character, images, prompts, mode, text_weight=0.5, **inputs):
    """Storyboard Select run as ComfyUI runs a list node (every input a list), scoring the largest face."""
    return run_node(
        StoryboardSelect,
        images=images,
        prompts=prompts,
        face_models=[analyzer],
        identity=[character],
        mode=[mode],
        identity_weight=[1.0],
        text_weight=[text_weight],
        face_choice=["largest"],
        **inputs,
    )


@pytest.fixture
def comfy(comfy_with_faces):
    return comfy_with_faces


def test_nodes_are_registered_with_list_semantics():
    assert {"CharForgeStoryScenes", "CharForgeStoryboardSelect", "CharForgeStoryboardSheet"} <= set(
        NODE_CLASS_MAPPINGS
    )
    info = node_info("CharForgeStoryScenes", StoryScenes)
    assert info["category"] == "CharForge/Story" and info["output_is_list"] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert StoryboardSelect.INPUT_IS_LIST is True


def test_story_scenes_from_a_list(no_comfy):
    run = run_node(
        StoryScenes,
        scenes="close-up portrait, face visible\nshe runs\n\n# comment\nshe sleeps",
        trigger="ohwx woman",
        style="film still",
        seed=7,
    )
    prompts, seeds, captions, listing, count = run.result
    assert prompts == [
        "ohwx woman, close-up portrait, face visible, film still",
        "ohwx woman, she runs, film still",
        "ohwx woman, she sleeps, film still",
    ]
    assert seeds == [7, 8, 9] and count == 3 and captions[1] == "she runs"
    assert json.loads(listing)[2] == {"prompt": prompts[2], "caption": "she sleeps", "seed": 9}
    assert "usually have 6-10 frames" in run.ui["text"][0]
    with pytest.raises(ValueError, match="no LLM endpoint"):
        run_node(StoryScenes, scenes="", story="a story", trigger="", style="", seed=0)


def test_story_scenes_from_an_llm(no_comfy):
    from fakes.openai_chat import FakeChat, chat, scenes_json

    endpoint = FakeChat()
    try:
        endpoint.script = [chat("not json"), chat(scenes_json(6))]
        run = run_node(
            StoryScenes,
            scenes="",
            story="she sails away",
            trigger="ohwx",
            style="",
            seed=1,
            llm_base_url=endpoint.url,
            llm_model="m",
            api_key_env="CF_NONE",
            frames=6,
        )
    finally:
        endpoint.close()
    prompts, seeds, _, _, count = run.result
    assert count == 6 and prompts[0].startswith("ohwx, close-up portrait") and seeds == list(range(1, 7))
    assert "1 malformed answer(s)" in run.ui["text"][0]


@needs_insightface
def test_select_keeps_the_character_and_reference_mode_follows_frame_1(comfy):
    analyzer = FaceAnalyzer.load("buffalo_l", det_size=320)
    character = build_identity(
        "hero", analyzer, [(f"ref{s}", face_image(person=0, noise=2, seed=s)) for s in range(3)]
    )
    # Three frames, three candidates each; the character (person 0) is at a known position in each frame.
    frames = [
        batch(face_image(person=4), face_image(person=0, noise=2, seed=11), blank_image()),
        batch(blank_image(), face_image(person=6), face_image(person=0, noise=2, seed=12)),
        batch(face_image(person=0, noise=2, seed=13), face_image(person=7), blank_image()),
    ]
    prompts = ["ohwx close-up", "ohwx walks", "ohwx sleeps"]
    run = select(
        analyzer,
        character,
        frames,
        prompts,
        "simple",
        node_id="5",
        seeds=[42, 43, 44],
        captions=["a", "b", "c"],
    )
    kept, record, report, scores = run.result
    board = json.loads(record)
    assert [f["chosen"] for f in board["frames"]] == [1, 2, 0]
    assert kept.shape == (3, 320, 320, 3) and torch.equal(kept[1], frames[1][2])
    assert [f["seed"] for f in board["frames"]] == [42, 43, 44] and board["mode"] == "simple"
    assert all(f["identity"] > 0.5 for f in board["frames"]) and len(scores) == 3
    assert board["frames"][0]["candidate_scores"][2]["identity"] is None  # the blank candidate: no face
    assert "frame 2: candidate 2 of 3" in report and run.ui["storyboard"][0] == json.dumps(json.loads(record))

    # Reference mode with a reference image of another person (5): frame 1 is still chosen by the character,
    # frames 2+ by identity to the reference.
    frames = [
        batch(face_image(person=0, noise=2, seed=21), face_image(person=5)),
        batch(face_image(person=0, noise=2, seed=22), face_image(person=5, noise=2, seed=3)),
        batch(face_image(person=5, noise=2, seed=4), face_image(person=0, noise=2, seed=23)),
    ]
    run = select(
        analyzer,
        character,
        frames,
        prompts,
        "reference",
        text_weight=0.0,
        reference=[batch(face_image(person=5, noise=2, seed=9))],
    )
    board = json.loads(run.result[1])
    assert [f["chosen"] for f in board["frames"]] == [0, 1, 0]
    assert board["frames"][0]["guide_identity"] is None and board["frames"][1]["guide_identity"] > 0.5
    assert board["frames"][1]["identity"] < board["frames"][1]["guide_identity"]  # vs the character: lower
    assert "selected by identity to reference image" in board["notes"][0]

    # One job per frame (as charforge story sends them): first_frame places it in the story.
    run = select(
        analyzer,
        character,
        [frames[1]],
        [prompts[1]],
        "reference",
        text_weight=0.0,
        reference=[frames[0][1:2]],
        first_frame=[2],
    )
    frame = json.loads(run.result[1])["frames"][0]
    assert frame["index"] == 1 and frame["chosen"] == 1 and frame["guide_identity"] is not None


@needs_insightface
def test_select_splits_one_batch_and_checks_counts(comfy):
    analyzer = FaceAnalyzer.load("buffalo_l", det_size=320)
    character = build_identity("hero", analyzer, [("ref", face_image(person=0))])
    one = batch(
        blank_image(), face_image(person=0), face_image(person=0, noise=2, seed=1), face_image(person=3)
    )
    run = select(analyzer, character, [one], ["a", "b"], "base")
    board = json.loads(run.result[1])
    assert [f["chosen"] for f in board["frames"]] == [1, 0] and board["mode"] == "base"
    with pytest.raises(ValueError, match="3 prompt"):
        select(analyzer, character, [one, one], ["a", "b", "c"], "simple")


def test_sheet_writes_frames_sheet_and_metadata(comfy_env):
    from charforge.engine.story import Storyboard, StoryFrame

    frames = [
        StoryFrame(
            index=i,
            prompt=f"prompt {i}",
            caption=f"scene {i}",
            seed=i,
            candidates=2,
            identity=0.5 + i / 10,
            text=0.3,
        )
        for i in range(6)
    ]
    record = Storyboard(mode="simple", frames=frames).to_json()
    images = torch.stack([torch.full((48, 64, 3), i / 6.0) for i in range(6)])
    run = run_node(
        StoryboardSheet,
        frames=images,
        storyboard=record,
        title="",
        filename_prefix="stories/board",
        columns=0,
        story="she sails away",
    )
    sheet, folder, metadata = run.result
    assert folder.endswith("board_00001") and sheet.shape[0] == 1 and sheet.shape[-1] == 3
    out = comfy_env.base_dir / "output" / "stories" / "board_00001"
    assert sorted(p.name for p in out.iterdir()) == [
        "frame_01.png",
        "frame_02.png",
        "frame_03.png",
        "frame_04.png",
        "frame_05.png",
        "frame_06.png",
        "metadata.json",
        "sheet.png",
    ]
    data = json.loads((out / "metadata.json").read_text())
    assert data == json.loads(metadata) and data["story"] == "she sails away"
    assert data["frames"][2]["image"] == "frame_03.png" and data["frames"][5]["identity"] == 1.0
    assert np.asarray(Image.open(out / "frame_04.png"))[0, 0].tolist() == [128, 128, 128]
    assert run.ui["images"][0] == {
        "filename": "sheet.png",
        "subfolder": "stories/board_00001",
        "type": "output",
    }
    assert len(run.ui["images"]) == 7
    again = run_node(
        StoryboardSheet,
        frames=images,
        storyboard=record,
        title="t",
        filename_prefix="stories/board",
        columns=3,
    )
    assert again.result[1].endswith("board_00002")
    with pytest.raises(ValueError, match="2 frame image"):
        run_node(
            StoryboardSheet, frames=images[:2], storyboard=record, title="", filename_prefix="x", columns=0
        )
    with pytest.raises(ValueError, match="inside the output folder"):
        run_node(
            StoryboardSheet, frames=images, storyboard=record, title="", filename_prefix="../x", columns=0
        )


@needs_insightface
def test_reference_mode_without_a_face_in_frame_1_falls_back_to_the_character(comfy):
    analyzer = FaceAnalyzer.load("buffalo_l", det_size=320)
    character = build_identity("hero", analyzer, [("ref", face_image(person=0))])
    frames = [
        batch(blank_image(), blank_image(value=120)),
        batch(face_image(person=5), face_image(person=0, noise=2, seed=1)),
    ]
    run = select(analyzer, character, frames, ["a", "b"], "reference")
    board = json.loads(run.result[1])
    assert [f["chosen"] for f in board["frames"]] == [0, 1] and board["frames"][1]["guide_identity"] is None
    assert "frame 1 shows no face" in board["notes"][0] and "kept the first" in board["frames"][0]["note"]


@needs_insightface
def test_select_with_clip_records_text_agreement(comfy, tmp_path):
    from cf_testing.face_models import write_clip_folder
    from charforge.engine.score.clip import ClipScorer, clip_sheet

    clip = ClipScorer.load(str(write_clip_folder(tmp_path / "tiny-clip")), device="cpu")
    try:
        analyzer = FaceAnalyzer.load("buffalo_l", det_size=320)
        character = build_identity("hero", analyzer, [("ref", face_image(person=0))])
        candidates = batch(
            face_image(person=0, noise=2, seed=1), face_image(person=0, noise=2, seed=2), blank_image()
        )
        run = select(analyzer, character, [candidates], ["ohwx at the harbour"], "simple", clip=[clip])
        frame = json.loads(run.result[1])["frames"][0]
        expected = clip_sheet(clip, candidates, ["ohwx at the harbour"]).values
        assert [c["text"] for c in frame["candidate_scores"]] == [round(v, 4) for v in expected]
        assert frame["text"] == round(expected[frame["chosen"]], 4) and frame["chosen"] in (0, 1)
        assert json.loads(run.result[1])["models"]["clip"] == clip.name
    finally:
        ClipScorer.clear_cache()
