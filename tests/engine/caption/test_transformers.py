"""BLIP, BLIP-2 and Florence-2 captioners on tiny random models of their real architectures and file formats."""

import json
import shutil

import pytest
from PIL import Image

from cf_testing.caption_models import BLIP_WORDS, write_tiny_blip, write_tiny_blip2, write_tiny_florence2
from charforge import bridge
from charforge.engine.caption.backends import hf
from charforge.engine.caption.backends.base import CaptionerError
from charforge.engine.caption.backends.hf import HFSettings, TransformersCaptioner, list_models, resolve_model

WRITERS = {"blip": write_tiny_blip, "blip2": write_tiny_blip2, "florence2": write_tiny_florence2}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_captioners")
    return {name: write(root / f"tiny-{name}") for name, write in WRITERS.items()}


@pytest.fixture
def models_dir(no_comfy, tiny_models, monkeypatch):
    """A ComfyUI-style models folder: BLIP models in models/blip, Florence-2 in models/LLM."""
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(no_comfy / "models"))
    shutil.copytree(tiny_models["blip"], no_comfy / "models" / "blip" / "tiny-blip")
    shutil.copytree(tiny_models["blip2"], no_comfy / "models" / "blip" / "tiny-blip2")
    shutil.copytree(tiny_models["florence2"], no_comfy / "models" / "LLM" / "tiny-florence2")
    return no_comfy / "models"


def _images():
    return [
        Image.new("RGB", (40, 30), (255, 0, 0)),
        Image.new("RGB", (30, 50), (0, 0, 255)),
        Image.new("RGBA", (64, 64), (0, 200, 0, 128)),
        Image.new("L", (20, 20), 90),
    ]


def test_saved_in_the_real_on_disk_format(tiny_models):
    for name, folder in tiny_models.items():
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= files, name
        assert "processor_config.json" in files or "preprocessor_config.json" in files
        expected = {"blip": "blip", "blip2": "blip-2", "florence2": "florence2"}[name]
        assert json.loads((folder / "config.json").read_text())["model_type"] == expected


def test_models_are_found_by_name_in_their_folders(models_dir):
    assert list_models("blip") == ["tiny-blip"]
    assert list_models("blip2") == ["tiny-blip2"]
    assert list_models("florence2") == ["tiny-florence2"]
    assert resolve_model("blip", "") == models_dir / "blip" / "tiny-blip"  # empty: the first one found
    with pytest.raises(CaptionerError, match="holds a 'blip' model, not a florence2"):
        resolve_model("florence2", str(models_dir / "blip" / "tiny-blip"))


@pytest.mark.parametrize("backend", ["blip", "blip2", "florence2"])
def test_batched_generation_is_deterministic_and_decoded(backend, tiny_models):
    settings = HFSettings(max_new_tokens=5, min_new_tokens=5, batch_size=3)
    with TransformersCaptioner(backend, str(tiny_models[backend]), settings) as captioner:
        assert captioner.device == "cpu" and str(captioner.dtype) == "torch.float32"
        images = _images()
        batched = captioner.caption(images)
        assert len(batched) == len(images) and all(isinstance(c, str) and c for c in batched)
        captioner.batch_size = 1
        assert captioner.caption(images) == batched  # same captions one at a time: batching is right
        captioner.batch_size = 12  # preprocessed in chunks on threads, generated as one batch
        many = images * 3
        assert len(many) > hf.PREPROCESS_CHUNK
        assert captioner.caption(many) == batched * 3
        captioner.batch_size = 3
        tokens = captioner.generate(images[:2])
        assert captioner.decode(tokens) == batched[:2]
        new = tokens.shape[1] - (1 if backend != "blip2" else 0)  # BLIP/BART start with a start token
        assert new == 5  # exactly the fixed length
        inputs = captioner._inputs(images[:1])
        size = captioner.model.config.vision_config.image_size if backend != "florence2" else 64
        assert tuple(inputs["pixel_values"].shape[-2:]) == (size, size)
        assert captioner.notes()[0].startswith(backend)
    assert captioner.model is None  # closed by the context manager
    with pytest.raises(CaptionerError, match="closed"):
        captioner.caption(images)


def test_max_tokens_limits_the_caption(tiny_models):
    with TransformersCaptioner("blip", str(tiny_models["blip"]), HFSettings(max_new_tokens=2)) as short:
        words = short.caption(_images()[:1])[0].split()
    assert 1 <= len(words) <= 2
    assert all(
        w.lstrip("#") in {x.lstrip("#") for x in BLIP_WORDS} for w in words
    )  # decoded from the vocabulary


def test_blip_prompt_and_florence_tasks(tiny_models):
    with TransformersCaptioner(
        "blip", str(tiny_models["blip"]), HFSettings(prompt="a photo of", max_new_tokens=3)
    ) as c:
        ids = c._inputs(_images()[:1])["input_ids"][0].tolist()
        assert c.processor.tokenizer.decode(ids, skip_special_tokens=True) == "a photo of"
        assert c.caption(_images()[:1])[0].startswith("a photo of")
    for task, words in (
        ("<CAPTION>", "what does the image describe?"),
        ("<MORE_DETAILED_CAPTION>", "describe with a paragraph"),
    ):
        with TransformersCaptioner("florence2", str(tiny_models["florence2"]), HFSettings(task=task)) as c:
            ids = c._inputs(_images()[:1])["input_ids"][0].tolist()
            assert words in c.processor.tokenizer.decode(ids, skip_special_tokens=True).lower()
            assert ids.count(c.model.config.image_token_id) == c.processor.num_image_tokens
    with pytest.raises(CaptionerError, match="<DETAILED_CAPTION>"):
        TransformersCaptioner("florence2", str(tiny_models["florence2"]), HFSettings(task="<OD>"))


def test_missing_model_names_the_folder_and_files(models_dir):
    with pytest.raises(CaptionerError) as info:
        TransformersCaptioner("florence2", "Florence-2-large")
    message = str(info.value)
    assert str(models_dir / "LLM" / "Florence-2-large") in message
    assert "config.json" in message and "model.safetensors" in message and "tokenizer" in message
    assert "florence-community/Florence-2-large" in message and hf.DOWNLOAD_ENV in message


def test_opt_in_download_uses_the_hub_into_the_model_folder(models_dir, tiny_models, monkeypatch):
    calls = []

    def fake_download(repo, local_dir):
        calls.append((repo, local_dir))
        shutil.copytree(tiny_models["blip"], local_dir)
        return local_dir

    monkeypatch.setattr(hf, "downloader", fake_download)
    monkeypatch.delenv(hf.DOWNLOAD_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the suite sets it; the fake needs no network anyway
    with pytest.raises(CaptionerError, match="allow_download"):
        resolve_model("blip", "Salesforce/blip-image-captioning-base")
    assert calls == []  # never without consent
    folder = resolve_model("blip", "Salesforce/blip-image-captioning-base", allow_download=True)
    assert calls == [
        ("Salesforce/blip-image-captioning-base", str(models_dir / "blip" / "blip-image-captioning-base"))
    ]
    assert folder == models_dir / "blip" / "blip-image-captioning-base"
    # Second time: found on disk under the repository's name, no download.
    assert resolve_model("blip", "Salesforce/blip-image-captioning-base", allow_download=True) == folder
    assert len(calls) == 1
    # The environment variable allows it too; HF_HUB_OFFLINE refuses with a reason.
    monkeypatch.setenv(hf.DOWNLOAD_ENV, "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaptionerError, match="HF_HUB_OFFLINE"):
        resolve_model("blip", "Salesforce/blip-image-captioning-large")


def test_download_failure_is_reported(models_dir, monkeypatch):
    def broken(repo, local_dir):
        raise OSError("network unreachable")

    monkeypatch.setattr(hf, "downloader", broken)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CaptionerError, match="downloading Salesforce/x into .*network unreachable"):
        resolve_model("blip", "Salesforce/x", allow_download=True)


def test_blip_folder_is_registered_in_comfyui(comfy_env):
    assert "blip" in bridge.register_model_folders()


def test_precision_follows_the_device(monkeypatch):
    import torch

    assert hf.pick_dtype("cpu") == torch.float32 and hf.pick_dtype("cpu", "bf16") == torch.bfloat16
    assert hf.pick_dtype("cuda", "fp16") == torch.float16 and hf.pick_dtype("cuda", "fp32") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hf.pick_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hf.pick_dtype("cuda") == torch.float16  # older GPUs
    assert hf.pick_dtype("mps") == torch.float16
