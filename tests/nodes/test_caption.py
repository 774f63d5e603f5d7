"""CharForge/Caption nodes run as ComfyUI runs them: Load Dataset -> Caption Dataset -> Export."""

from pathlib import Path

import pytest
from PIL import Image

from cf_testing.caption_models import RULE_WIDGETS as RULES
from cf_testing.caption_models import FakeEndpoint, write_tiny_wd14
from cf_testing.comfyui import load_dataset, run_node
from charforge import bridge
from charforge.engine.caption.backends.base import CaptionerError
from charforge.engine.caption.sidecars import read_sidecar, sidecar_path
from charforge.engine.dataset import DatasetManifest
from charforge.nodes.caption import CaptionDataset, CaptionRules
from charforge.nodes.dataset import ExportDataset


def _photo(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 48), color).save(path)


@pytest.fixture
def photos(comfy_env):
    folder = comfy_env.base_dir / "input" / "hero"
    _photo(folder / "a.png", (0, 0, 255))
    _photo(folder / "b.png", (255, 0, 0))
    _photo(folder / "c.png", (0, 255, 0))
    (folder / "c.txt").write_text("hand written caption\n", encoding="utf-8")
    return folder


@pytest.fixture
def tagger(comfy_env):
    bridge.register_model_folders()
    write_tiny_wd14(comfy_env.base_dir / "models" / "wd14_tagger")


def test_rules_node_standalone():
    run = run_node(
        CaptionRules,
        caption="1girl, Smiling,\nsmiling, watermark",
        trigger="ohwx",
        class_tokens="woman",
        template="a photo of {trigger} {class}, {caption}",
        keep_tokens="",
        banned_words="watermark",
        style_tags="film grain",
        max_tokens=75,
        tokenizer="",
        deduplicate=True,
    )
    caption, tokens, report = run.result
    assert caption == "a photo of ohwx woman, 1girl, Smiling, film grain"
    assert tokens > 0 and "estimated" in report
    assert run.ui["text"][0] == caption


def test_caption_dataset_with_wd14_skips_existing_and_writes_sidecars(comfy_env, photos, tagger):
    before = sorted(p.name for p in photos.iterdir())
    dataset = load_dataset(photos)
    run = run_node(
        CaptionDataset,
        node_id="9",
        dataset=dataset,
        backend="wd14",
        model="",
        mode="skip existing",
        batch_size=2,
        **RULES,
    )
    manifest, report = run.result
    assert isinstance(manifest, DatasetManifest)
    captions = {e.name: e.caption for e in manifest.entries}
    assert captions == {
        "a.png": "ohwx woman, blue sky, ^_^",
        "b.png": "ohwx woman, red theme, ^_^",
        "c.png": "hand written caption",
    }
    assert "captioned 2" in report and "skipped 1" in report and "tiny-tagger.onnx" in report
    for entry in manifest.entries[:2]:
        assert read_sidecar(sidecar_path(manifest, entry)) == entry.caption
    assert sorted(p.name for p in photos.iterdir()) == before  # nothing written next to the photos
    assert [c.value for c in comfy_env.progress if c.node_id == "9"] == [1, 2]
    saved = DatasetManifest.load(manifest.folder)
    assert saved.history[-1].stage == "caption" and saved.entries[0].caption == captions["a.png"]

    # Second run: everything is captioned already, the model is not asked again.
    again = run_node(
        CaptionDataset,
        dataset=manifest,
        backend="wd14",
        model="tiny-tagger",
        mode="skip existing",
        batch_size=2,
        **RULES,
    )
    assert "captioned 0" in again.result[1] and "skipped 3" in again.result[1]

    over = run_node(
        CaptionDataset,
        dataset=manifest,
        backend="wd14",
        model="tiny-tagger",
        mode="overwrite",
        batch_size=2,
        **RULES,
    )
    assert {e.name: e.caption for e in over.result[0].entries}["c.png"] == "ohwx woman, hero (character), ^_^"

    # Export takes the new captions.
    exported = run_node(
        ExportDataset,
        dataset=over.result[0],
        trigger="ohwx",
        class_tokens="woman",
        repeats=5,
        export_name="kohya",
        caption_mode="caption as is",
    )
    texts = sorted(p.read_text(encoding="utf-8") for p in Path(exported.result[1]).rglob("*.txt"))
    assert "ohwx woman, blue sky, ^_^\n" in texts


def test_missing_tagger_names_the_folder_and_files(comfy_env, photos):
    bridge.register_model_folders()
    with pytest.raises(CaptionerError, match=r"wd14_tagger.*\.onnx.*\.csv"):
        run_node(
            CaptionDataset,
            dataset=load_dataset(photos),
            backend="wd14",
            model="",
            mode="overwrite",
            batch_size=2,
            **RULES,
        )


def test_caption_dataset_with_openai_endpoint_and_a_429(comfy_env, photos, monkeypatch):
    monkeypatch.setenv("CF_NODE_KEY", "sk-node-secret")
    fake = FakeEndpoint()
    try:
        fake.script = [
            (429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"}),
            "caption",
            "refuse",
        ]
        run = run_node(
            CaptionDataset,
            dataset=load_dataset(photos),
            backend="openai",
            model="llava",
            mode="overwrite",
            batch_size=1,
            base_url=fake.url,
            api_key_env="CF_NODE_KEY",
            prompt="Describe.",
            **RULES,
        )
    finally:
        fake.close()
    manifest, report = run.result
    captions = {e.name: e.caption for e in manifest.entries}
    assert captions["a.png"] == "ohwx woman, A blue square."
    assert captions["b.png"] is None  # refused: no caption written
    assert captions["c.png"] == "ohwx woman, A blue square."  # the fake calls anything not red "blue"
    assert "refused 1" in report and "retried" in report
    assert all(r["auth"] == "Bearer sk-node-secret" for r in fake.requests)
    assert "sk-node-secret" not in report and "sk-node-secret" not in run.ui["text"][0]


def test_cancel_stops_between_images_and_frees_the_model(comfy_env, photos, tagger, monkeypatch):
    from charforge.engine.caption.backends import wd14

    closed = []
    monkeypatch.setattr(wd14.WD14Tagger, "close", lambda self: closed.append(True))
    dataset = load_dataset(photos)
    comfy_env.interrupt()
    with pytest.raises(comfy_env.model_management.InterruptProcessingException):
        run_node(
            CaptionDataset,
            dataset=dataset,
            backend="wd14",
            model="tiny-tagger",
            mode="overwrite",
            batch_size=1,
            **RULES,
        )
    assert closed == [True]


def test_tokenizer_choice_comfyui_uses_comfyuis_clip_vocabulary(no_comfy, monkeypatch):
    from cf_testing.models import write_tiny_clip_tokenizer
    from charforge.nodes.caption import resolve_tokenizer

    assert resolve_tokenizer("  ") is None
    with pytest.raises(FileNotFoundError, match="sd1_tokenizer"):
        resolve_tokenizer("comfyui")
    monkeypatch.setenv("COMFYUI_DIR", str(no_comfy / "ComfyUI"))
    folder = write_tiny_clip_tokenizer(no_comfy / "ComfyUI" / "comfy" / "sd1_tokenizer")
    assert resolve_tokenizer("ComfyUI") == str(folder)
    run = run_node(
        CaptionRules,
        caption="a b c d e f g h",
        trigger="ohwx",
        class_tokens="",
        template="{caption}",
        keep_tokens="",
        banned_words="",
        style_tags="",
        max_tokens=6,
        tokenizer="comfyui",
        deduplicate=True,
    )
    caption, tokens, report = run.result
    assert caption.startswith("ohwx") and tokens <= 6 and "shortened" in report and "estimated" not in report
