"""CLIP-interrogator-style captioner (tiny CLIP + tiny BLIP) and the ensemble of backends (tiny WD14 + BLIP)."""

import pytest
import torch
from PIL import Image

from cf_testing.caption_models import write_tiny_blip, write_tiny_wd14
from cf_testing.face_models import write_clip_folder
from charforge.engine.caption.backends.base import CaptionerError
from charforge.engine.caption.backends.ensemble import EnsembleCaptioner, merge_captions
from charforge.engine.caption.backends.hf import HFSettings, TransformersCaptioner
from charforge.engine.caption.backends.interrogator import ClipInterrogator, InterrogatorSettings
from charforge.engine.caption.backends.wd14 import WD14Tagger
from charforge.engine.caption.terms import BUILTIN, load_term_lists, parse_terms
from charforge.engine.score.clip import ClipScorer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrogator")
    clip = write_clip_folder(root / "tiny-clip")
    blip = write_tiny_blip(root / "tiny-blip")
    terms = root / "terms"
    terms.mkdir()
    (terms / "colours.txt").write_text(
        "# my colours\nred\nblue  # the sky\n\ngreen\nRed\nyellow\n", encoding="utf-8"
    )
    (terms / "mediums.txt").write_text("a tintype\n", encoding="utf-8")
    tagger = write_tiny_wd14(root / "wd14")
    yield {"clip": clip, "blip": blip, "terms": terms, "wd14": tagger}
    ClipScorer.clear_cache()


def _images():
    return [
        Image.new("RGB", (48, 32), (250, 10, 10)),
        Image.new("RGB", (32, 40), (10, 10, 250)),
        Image.new("RGB", (40, 40), (10, 250, 10)),
    ]


def test_term_files_extend_and_add_lists(folders):
    assert parse_terms("a\n# c\n b  b \nA\n") == ["a", "b b"]
    lists = load_term_lists([folders["terms"]])
    assert lists["colours"] == ["red", "blue", "green", "yellow"]
    assert lists["mediums"][:-1] == list(BUILTIN["mediums"]) and lists["mediums"][-1] == "a tintype"
    assert set(BUILTIN) <= set(lists)


def test_terms_are_ranked_by_clip_similarity(folders):
    from transformers import CLIPModel, CLIPProcessor

    settings = InterrogatorSettings(
        lists=("colours", "mediums"),
        top_k=2,
        top_k_per_list={"mediums": 1},
        terms_folders=[str(folders["terms"])],
        device="cpu",
    )
    with ClipInterrogator(str(folders["clip"]), None, settings) as interrogator:
        images = _images()
        ranked = interrogator.rank(images)
        captions = interrogator.caption(images)
    # The same similarities computed independently with transformers' own CLIP processor and model.
    model = CLIPModel.from_pretrained(str(folders["clip"])).eval()
    processor = CLIPProcessor.from_pretrained(str(folders["clip"]))
    terms = ["red", "blue", "green", "yellow"]
    with torch.no_grad():
        pixel = processor(images=images, return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixel)
        text = model.get_text_features(**processor.tokenizer(terms, padding=True, return_tensors="pt"))
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    sims = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    for i, caption in enumerate(captions):
        got = dict(ranked[i]["colours"])
        for j, term in enumerate(terms):
            assert got[term] == pytest.approx(float(sims[i, j]), abs=2e-3)
        values = [v for _, v in ranked[i]["colours"]]
        assert values == sorted(values, reverse=True)
        best = [t for t, _ in ranked[i]["colours"][:2]] + [ranked[i]["mediums"][0][0]]
        assert caption == ", ".join(best)


def test_sentence_caption_comes_first(folders):
    sentence = TransformersCaptioner(
        "blip", str(folders["blip"]), HFSettings(max_new_tokens=4, min_new_tokens=4)
    )
    alone = sentence.caption(_images()[:2])
    settings = InterrogatorSettings(
        lists=("flavours",), top_k_per_list={"flavours": 2}, device="cpu", terms_folders=[]
    )
    ClipScorer.clear_cache()
    with ClipInterrogator(str(folders["clip"]), sentence, settings) as interrogator:
        captions = interrogator.caption(_images()[:2])
        assert any("blip" in note for note in interrogator.notes())
        assert interrogator.scorer in ClipScorer._cache.values()
    assert interrogator.scorer not in ClipScorer._cache.values()  # the CLIP model it loaded is unloaded
    shared = ClipScorer.load(str(folders["clip"]), device="cpu")  # loaded by a CLIP score node: stays loaded
    with ClipInterrogator(str(folders["clip"]), None, settings) as interrogator:
        assert interrogator.scorer is shared
    assert shared in ClipScorer._cache.values()
    for caption, first in zip(captions, alone, strict=True):
        parts = caption.split(", ")
        assert parts[0] == first and len(parts) == 3 and set(parts[1:]) <= set(BUILTIN["flavours"])
    assert sentence.model is None  # closing the interrogator frees the sentence model


def test_unknown_list_and_missing_clip_are_explained(folders, no_comfy):
    with pytest.raises(CaptionerError, match="unknown term list.*nope.*colours"):
        ClipInterrogator(
            str(folders["clip"]),
            None,
            InterrogatorSettings(lists=("nope",), device="cpu", terms_folders=[str(folders["terms"])]),
        )
    with pytest.raises(CaptionerError, match="clip_vision"):
        ClipInterrogator("no-such-clip", None, InterrogatorSettings(device="cpu"))


def test_merge_keeps_order_and_each_term_once():
    assert (
        merge_captions(["a woman with long hair, smiling", "long_hair, Smiling, blue eyes, woman"])
        == "a woman with long hair, smiling, blue eyes"
    )
    assert (
        merge_captions(["a woman with long hair", "woman, long hair"], drop_contained=False)
        == "a woman with long hair, woman, long hair"
    )
    assert merge_captions(["", "red, red , blue"]) == "red, blue"


def test_ensemble_runs_members_in_order(folders):
    blip = TransformersCaptioner("blip", str(folders["blip"]), HFSettings(max_new_tokens=3, min_new_tokens=3))
    tagger = WD14Tagger(str(folders["wd14"]))
    sentences = blip.caption(_images())
    tags = tagger.caption(_images())
    with EnsembleCaptioner([blip, tagger]) as ensemble:
        assert ensemble.batch_size == min(blip.batch_size, tagger.batch_size)
        assert ensemble.max_side == max(blip.max_side, tagger.max_side)
        merged = ensemble.caption(_images())
        assert len(ensemble.notes()) == 2
    assert merged == [merge_captions([s, t]) for s, t in zip(sentences, tags, strict=True)]
    assert merged[0].startswith(sentences[0]) and "red theme" in merged[0]
    assert blip.model is None and tagger._session is None
    reverse = EnsembleCaptioner(
        [
            WD14Tagger(str(folders["wd14"])),
            TransformersCaptioner(
                "blip", str(folders["blip"]), HFSettings(max_new_tokens=3, min_new_tokens=3)
            ),
        ]
    )
    assert reverse.caption(_images()[:1])[0].startswith(tags[0])
    reverse.close()
    with pytest.raises(CaptionerError):
        EnsembleCaptioner([])
