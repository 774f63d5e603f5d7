"""CLIP score with a CLIP model of the real architecture (random weights) loaded from a model folder."""

import shutil

import numpy as np
import pytest
import torch

from cf_testing.comfyui import run_node
from cf_testing.face_models import write_clip_folder
from charforge import bridge
from charforge.engine.score import ImageScore, ScoreSheet
from charforge.engine.score.clip import ClipScorer, clip_sheet, list_clip_models, resolve_clip_model
from charforge.nodes.score import ClipScore, CombineScores, FilterByScore, LoadClip


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture
def comfy(comfy_env, clip_folder):
    shutil.copytree(clip_folder, comfy_env.base_dir / "models" / "clip_vision" / "tiny-clip")
    (comfy_env.base_dir / "models" / "clip_vision" / "CLIP-ViT-H-14.safetensors").write_bytes(b"vision only")
    yield comfy_env
    ClipScorer.clear_cache()


def test_clip_folders_are_found_and_single_files_explained(comfy):
    assert list_clip_models() == ["tiny-clip"]
    assert resolve_clip_model("tiny-clip").name == "tiny-clip"
    with pytest.raises(FileNotFoundError, match="single file; a CLIP score needs a full CLIP model folder"):
        resolve_clip_model("CLIP-ViT-H-14.safetensors")
    with pytest.raises(FileNotFoundError, match="CLIP folders found: tiny-clip"):
        resolve_clip_model("clip-vit-large-patch14")


def test_scores_are_cosines_independent_of_batching(comfy):
    scorer = ClipScorer.load("tiny-clip", device="cpu")
    assert ClipScorer.load("tiny-clip", device="cpu") is scorer and scorer.name == "clip:tiny-clip"
    images = torch.rand(5, 40, 56, 3, generator=torch.Generator().manual_seed(0))
    one = scorer.score(images, ["a photo of sks person"], batch_size=32)
    small = scorer.score(images, ["a photo of sks person"], batch_size=2)
    np.testing.assert_allclose(one, small, atol=1e-5)
    assert all(-1.0 <= v <= 1.0 for v in one)
    # Identical image and prompt give the identical score; another prompt a different one.
    twice = scorer.score(torch.cat([images[:1], images[:1]]), ["a photo of sks person"])
    assert twice[0] == pytest.approx(twice[1], abs=1e-6) and twice[0] == pytest.approx(one[0], abs=1e-5)
    other = scorer.score(images[:1], ["the thing on the ring"])
    assert other[0] != pytest.approx(one[0], abs=1e-4)
    per_image = scorer.score(images[:2], ["a photo of sks person", "the thing on the ring"])
    assert per_image == pytest.approx(
        [one[0], scorer.score(images[1:2], ["the thing on the ring"])[0]], abs=1e-5
    )
    with pytest.raises(ValueError, match="one prompt for all images or one per image"):
        scorer.score(images, ["a", "b"])


def test_preprocessing_matches_the_transformers_image_processor(comfy, clip_folder):
    import transformers
    from PIL import Image

    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_class.from_pretrained(str(clip_folder))
    scorer = ClipScorer.load("tiny-clip", device="cpu")
    yy, xx = np.mgrid[0:48, 0:80]  # a smooth picture: resampling filters agree closely on it
    picture = np.stack([xx / 80, yy / 48, (xx + yy) / 128], axis=-1).astype(np.float32)
    ours = scorer._pixels(torch.from_numpy(picture)[None])
    theirs = processor(images=Image.fromarray((picture * 255).round().astype(np.uint8)), return_tensors="pt")
    assert tuple(ours.shape) == tuple(theirs["pixel_values"].shape) == (1, 3, 32, 32)
    assert float((ours - theirs["pixel_values"]).abs().mean()) < 0.03


def test_long_prompts_are_noted(comfy):
    scorer = ClipScorer.load("tiny-clip", device="cpu")
    result = clip_sheet(scorer, torch.rand(1, 32, 32, 3), ["word " * 120])
    assert result.notes and "truncated" in result.notes[0]


def test_clip_nodes_load_score_and_combine(comfy):
    assert LoadClip.INPUT_TYPES()["required"]["model"][0] == ["tiny-clip"]
    (clip,) = run_node(LoadClip, model="tiny-clip", device="cpu").result
    images = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    run = run_node(
        ClipScore,
        node_id="4",
        clip=clip,
        images=images,
        prompt="a photo of sks person",
        one_per_line=False,
        threshold=0.0,
        batch_size=2,
    )
    sheet, mean, table, as_json = run.result
    assert len(sheet) == 4 and sheet.metric == "clip" and all(r.passed for r in sheet.rows)
    assert mean == pytest.approx(float(np.mean(sheet.values)), abs=1e-4) and run.ui["images"]
    assert [c.value for c in comfy.progress if c.node_id == "4"] == [2, 4]  # one step per batch of images

    identity = ScoreSheet(
        "identity",
        [
            ImageScore(i, v, v is not None and v >= 0.4, "", f"image {i}")
            for i, v in enumerate([0.8, None, 0.5, 0.3])
        ],
        0.4,
    )
    combined, ranking, table, as_json = run_node(
        CombineScores,
        identity_weight=1.0,
        text_weight=0.5,
        threshold=0.0,
        identity_scores=identity,
        clip_scores=sheet,
    ).result
    assert combined.rows[1].value is None and ranking.split(",")[0] == "0" and ranking.split(",")[-1] == "1"
    kept = run_node(FilterByScore, images=images, scores=combined, threshold=0.0).result
    assert kept[1] == 2 and kept[4] == "0,2"


def test_one_prompt_per_line_must_match_the_batch(comfy):
    (clip,) = run_node(LoadClip, model="tiny-clip", device="cpu").result
    with pytest.raises(ValueError, match="one prompt line per image"):
        run_node(
            ClipScore,
            clip=clip,
            images=torch.rand(3, 32, 32, 3),
            prompt="a\nb",
            one_per_line=True,
            threshold=0.0,
            batch_size=8,
        )


def test_load_clip_from_an_absolute_path_outside_comfyui(no_comfy, clip_folder):
    (clip,) = run_node(LoadClip, model="(no CLIP folder found)", device="auto", path=str(clip_folder)).result
    assert clip.device == "cpu" and clip.name == "clip:tiny-clip"
    assert bridge.in_comfyui() is False
    ClipScorer.clear_cache()
