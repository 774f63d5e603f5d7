"""Caption nodes with the local transformers backends, the CLIP interrogator, the ensemble, Caption Images,
Caption Review and Caption Editor, run as ComfyUI runs them (stand-in modules, tiny real models)."""

import os
import shutil

import pytest
import torch
from PIL import Image

from cf_testing.caption_models import RULE_WIDGETS as RULES
from cf_testing.caption_models import write_tiny_blip, write_tiny_florence2, write_tiny_wd14
from cf_testing.comfyui import load_dataset, run_node
from cf_testing.face_models import write_clip_folder
from cf_testing.models import write_tiny_clip_tokenizer
from charforge import bridge
from charforge.engine.caption.backends.base import CaptionerError
from charforge.engine.caption.sidecars import read_sidecar, sidecar_path
from charforge.engine.dataset import DatasetManifest
from charforge.engine.score.clip import ClipScorer
from charforge.nodes.caption import CaptionDataset, CaptionEditor, CaptionImages, CaptionReview

LOCAL = {"max_new_tokens": 4}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_nodes")
    out = {
        "blip": write_tiny_blip(root / "tiny-blip"),
        "florence2": write_tiny_florence2(root / "tiny-florence2"),
        "clip": write_clip_folder(root / "tiny-clip"),
        "tokenizer": write_tiny_clip_tokenizer(root / "tok"),
    }
    write_tiny_wd14(root / "wd14")
    out["wd14"] = root / "wd14"
    yield out
    ClipScorer.clear_cache()


@pytest.fixture
def models(comfy_env, built):
    bridge.register_model_folders()
    base = comfy_env.base_dir / "models"
    shutil.copytree(built["blip"], base / "blip" / "tiny-blip")
    shutil.copytree(built["florence2"], base / "LLM" / "tiny-florence2")
    shutil.copytree(built["clip"], base / "clip_vision" / "tiny-clip")
    shutil.copytree(built["wd14"], base / "wd14_tagger")
    return base


@pytest.fixture
def photos(comfy_env):
    folder = comfy_env.base_dir / "input" / "hero"
    folder.mkdir(parents=True)
    for name, colour in (("a.png", (0, 0, 255)), ("b.jpg", (255, 0, 0)), ("c.png", (0, 255, 0))):
        Image.new("RGB", (48, 40), colour).save(folder / name)
    (folder / "c.txt").write_text("hand written caption\n", encoding="utf-8")
    return folder


def test_caption_dataset_with_blip_writes_sidecars_then_skips(comfy_env, models, photos):
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    run = run_node(
        CaptionDataset,
        node_id="5",
        dataset=load_dataset(photos),
        backend="blip",
        model="",
        mode="skip existing",
        batch_size=2,
        **RULES,
        **LOCAL,
    )
    manifest, report = run.result
    captions = {e.name: e.caption for e in manifest.entries}
    assert captions["c.png"] == "hand written caption"
    for name in ("a.png", "b.jpg"):
        assert (
            captions[name].startswith("ohwx woman, ") and len(captions[name].split(", ", 1)[1].split()) <= 4
        )
    assert "captioned 2" in report and "skipped 1" in report and "blip tiny-blip on cpu" in report
    for entry in manifest.entries[:2]:
        assert read_sidecar(sidecar_path(manifest, entry)) == entry.caption
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # the photo folder is untouched
    assert [c.value for c in comfy_env.progress if c.node_id == "5"] == [1, 2]
    again = run_node(
        CaptionDataset,
        dataset=manifest,
        backend="blip",
        model="tiny-blip",
        mode="skip existing",
        batch_size=2,
        **RULES,
        **LOCAL,
    )
    assert "captioned 0" in again.result[1] and "skipped 3" in again.result[1]


def test_florence_and_missing_model_message(comfy_env, models, photos):
    run = run_node(
        CaptionDataset,
        dataset=load_dataset(photos),
        backend="florence2",
        model="tiny-florence2",
        mode="overwrite",
        batch_size=3,
        florence_task="<DETAILED_CAPTION>",
        **RULES,
        max_new_tokens=3,
    )
    assert "task <DETAILED_CAPTION>" in run.result[1]
    with pytest.raises(CaptionerError, match=r"models/LLM.*config\.json"):
        run_node(
            CaptionDataset,
            dataset=load_dataset(photos),
            backend="florence2",
            model="Florence-2-base",
            mode="overwrite",
            batch_size=3,
            **RULES,
        )


def test_ensemble_and_interrogator_through_the_node(comfy_env, models, photos, built):
    run = run_node(
        CaptionDataset,
        dataset=load_dataset(photos),
        backend="ensemble",
        model="",
        mode="overwrite",
        batch_size=2,
        ensemble="blip:tiny-blip, wd14:tiny-tagger",
        **RULES,
        **LOCAL,
    )
    captions = {e.name: e.caption for e in run.result[0].entries}
    assert captions["a.png"].endswith("blue sky, ^_^") and captions["b.jpg"].endswith("red theme, ^_^")
    assert "blip tiny-blip" in run.result[1] and "tiny-tagger.onnx" in run.result[1]
    with pytest.raises(CaptionerError, match="ensemble member 'nope'"):
        run_node(
            CaptionDataset,
            dataset=load_dataset(photos),
            backend="ensemble",
            model="",
            mode="overwrite",
            batch_size=2,
            ensemble="blip, nope",
            **RULES,
        )
    terms = comfy_env.base_dir / "models" / "charforge" / "caption_terms"
    terms.mkdir(parents=True)
    (terms / "colours.txt").write_text("crimson\nnavy\nemerald\n", encoding="utf-8")
    run = run_node(
        CaptionDataset,
        dataset=load_dataset(photos),
        backend="clip_interrogator",
        model="tiny-blip",
        mode="overwrite",
        batch_size=2,
        sentence_backend="blip",
        clip_model="",
        term_lists="colours",
        terms_per_list=1,
        terms_folder="",
        **RULES,
        **LOCAL,
    )
    for entry in run.result[0].entries:
        assert entry.caption.split(", ")[-1] in {"crimson", "navy", "emerald"}
        assert len(entry.caption.split(", ")) == 3  # trigger+class, sentence, one term
    assert "CLIP terms from clip:tiny-clip" in run.result[1]


def test_caption_images_gives_one_string_per_image(comfy_env, models, built):
    images = torch.zeros((3, 32, 40, 3))
    images[0, ..., 2] = 1.0
    images[1, ..., 0] = 1.0
    images[2, ..., 1] = 1.0
    assert CaptionImages.OUTPUT_IS_LIST == (True, False)
    run = run_node(
        CaptionImages,
        node_id="7",
        images=images,
        backend="wd14",
        model="tiny-tagger",
        batch_size=2,
        **{**RULES, "max_tokens": 0},
    )
    captions, text = run.result
    assert captions[0] == "ohwx woman, blue sky, ^_^" and captions[1] == "ohwx woman, red theme, ^_^"
    assert captions[2].startswith("ohwx woman") and text == "\n".join(captions)
    assert run.ui["text"] == [text]
    from charforge.engine.caption.postprocess import load_tokenizer

    tok = load_tokenizer(str(built["tokenizer"]))
    full = len(tok(captions[0], add_special_tokens=False)["input_ids"])
    limited = run_node(
        CaptionImages,
        images=images[:1],
        backend="wd14",
        model="tiny-tagger",
        batch_size=2,
        **{**RULES, "max_tokens": full - 1, "tokenizer": str(built["tokenizer"])},
    ).result[0]
    assert limited == ["ohwx woman, blue sky"]  # the last tag dropped to fit, counted in real CLIP tokens
    assert len(tok(limited[0], add_special_tokens=False)["input_ids"]) <= full - 1
    assert [c.value for c in comfy_env.progress if c.node_id == "7"] == [2, 3]
    blip = run_node(
        CaptionImages, images=images, backend="blip", model="tiny-blip", batch_size=3, **RULES, **LOCAL
    )
    assert len(blip.result[0]) == 3 and all(c.startswith("ohwx woman, ") for c in blip.result[0])


def test_review_shows_images_and_captions(comfy_env, models, photos):
    dataset = load_dataset(photos)
    run = run_node(CaptionReview, dataset=dataset, max_images=10, thumbnail_size=64, missing_first=True)
    images, texts = run.ui["images"], run.ui["text"]
    assert len(images) == 3 and all(
        i["type"] == "temp" and i["subfolder"] == "charforge_review" for i in images
    )
    for item in images:
        path = os.path.join(bridge.temp_directory(), item["subfolder"], item["filename"])
        assert Image.open(path).size[0] <= 64
    assert texts[0].startswith("3 photo(s), 2 without a caption")
    assert texts[-1] == "c.png: hand written caption" and "(no caption)" in texts[1]
    assert run.result[0].splitlines()[0] == texts[0]


def test_editor_dry_run_then_writes_only_dataset_sidecars(comfy_env, models, photos):
    dataset = run_node(
        CaptionDataset,
        dataset=load_dataset(photos),
        backend="wd14",
        model="tiny-tagger",
        mode="skip existing",
        batch_size=2,
        **RULES,
    ).result[0]
    source_caption = (photos / "c.txt").read_text(encoding="utf-8")
    dry = run_node(
        CaptionEditor,
        dataset=dataset,
        operation="find and replace",
        find="^_^",
        text="smiling",
        regex=False,
        case_sensitive=False,
        dry_run=True,
    )
    assert dry.result[0] is dataset and dry.result[1].startswith("would change 2 caption(s), 1 unchanged")
    assert "'ohwx woman, blue sky, ^_^' -> 'ohwx woman, blue sky, smiling'" in dry.result[1]
    assert read_sidecar(sidecar_path(dataset, dataset.entries[0])) == "ohwx woman, blue sky, ^_^"
    edited = run_node(
        CaptionEditor,
        dataset=dataset,
        operation="prepend",
        find="",
        text="photo",
        regex=False,
        case_sensitive=False,
        dry_run=False,
    ).result[0]
    assert [e.caption for e in edited.entries] == [
        "photo, ohwx woman, blue sky, ^_^",
        "photo, ohwx woman, red theme, ^_^",
        "photo, hand written caption",
    ]
    for entry in edited.entries:
        path = sidecar_path(edited, entry)
        assert path.resolve().is_relative_to(os.path.realpath(edited.folder))
        assert read_sidecar(path) == entry.caption
    assert (photos / "c.txt").read_text(
        encoding="utf-8"
    ) == source_caption  # the user's own sidecar is untouched
    saved = DatasetManifest.load(edited.folder)
    assert (
        saved.history[-1].stage == "caption edit"
        and saved.entries[2].caption == "photo, hand written caption"
    )
    removed = run_node(
        CaptionEditor,
        dataset=edited,
        operation="remove",
        find=r"\^_\^",
        text="",
        regex=True,
        case_sensitive=False,
        dry_run=False,
    ).result[0]
    assert removed.entries[0].caption == "photo, ohwx woman, blue sky"
    with pytest.raises(ValueError, match="regular expression"):
        run_node(
            CaptionEditor,
            dataset=edited,
            operation="remove",
            find="(",
            text="",
            regex=True,
            case_sensitive=False,
            dry_run=True,
        )
