"""Caption Dataset, VLM run as ComfyUI runs it (stand-in modules) with tiny Qwen2.5-VL and LLaVA models."""

import json
import shutil

import pytest
from PIL import Image

from cf_testing.caption_models import RULE_WIDGETS
from cf_testing.comfyui import load_dataset, run_node
from cf_testing.vlm_models import write_tiny_llava, write_tiny_qwen25vl
from charforge import bridge
from charforge.engine.caption.backends.base import CaptionerError
from charforge.engine.caption.postprocess import approx_t5_token_count
from charforge.engine.caption.sidecars import read_sidecar, sidecar_path
from charforge.nodes.caption_vlm import CaptionDatasetVLM

INPUTS = {
    **RULE_WIDGETS,
    "max_tokens": 40,
    "tokenizer": "comfyui",
    "batch_size": 2,
    "style": "training caption",
    "max_new_tokens": 60,
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_nodes")
    return {"qwen": write_tiny_qwen25vl(root / "tiny-qwen"), "llava": write_tiny_llava(root / "tiny-llava")}


@pytest.fixture
def models(comfy_env, built):
    bridge.register_model_folders()
    llm = comfy_env.base_dir / "models" / "LLM"
    shutil.copytree(built["qwen"], llm / "tiny-qwen")
    shutil.copytree(built["llava"], llm / "tiny-llava")
    return llm


@pytest.fixture
def photos(comfy_env):
    folder = comfy_env.base_dir / "input" / "hero"
    folder.mkdir(parents=True)
    for name, colour, size in (("a.png", (0, 0, 255), (48, 40)), ("b.jpg", (255, 0, 0), (40, 70))):
        Image.new("RGB", size, colour).save(folder / name)
    (folder / "c.png").write_bytes((folder / "a.png").read_bytes())
    (folder / "c.txt").write_text("hand written caption\n", encoding="utf-8")
    return folder


def test_caption_dataset_vlm_writes_prose_captions_trigger_first(comfy_env, models, photos):
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    run = run_node(
        CaptionDatasetVLM, dataset=load_dataset(photos), model="tiny-qwen", mode="skip existing", **INPUTS
    )
    manifest, report = run.result
    captions = {e.name: e.caption for e in manifest.entries}
    assert captions["c.png"] == "hand written caption"  # skipped: it had one
    for name in ("a.png", "b.jpg"):
        caption = captions[name]
        assert caption.startswith("ohwx woman, ") and caption.lower().count("ohwx") == 1
        assert approx_t5_token_count(caption) <= 40
        entry = next(e for e in manifest.entries if e.name == name)
        assert read_sidecar(sidecar_path(manifest, entry)) == caption
    assert "captioned 2" in report and "skipped 1" in report
    assert "vlm Qwen2.5-VL tiny-qwen on cpu (float32), training caption" in report
    assert "t5 tokens estimated" in report  # the stand-in ComfyUI has no T5 vocabulary
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # the photo folder is untouched
    assert manifest.history[-1].settings["backend"] == "vlm"
    # Run again: everything already captioned, the model is asked nothing.
    again = run_node(CaptionDatasetVLM, dataset=manifest, model="tiny-qwen", mode="skip existing", **INPUTS)
    assert "captioned 0" in again.result[1] and "skipped 3" in again.result[1]


def test_llava_with_comfyuis_t5_vocabulary_counts_exactly(comfy_env, models, photos, tmp_path, monkeypatch):
    import transformers

    root = tmp_path / "ComfyUI"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,"]
    t5 = transformers.T5Tokenizer(vocab=pieces, extra_ids=0)
    t5.save_pretrained(str(root / "comfy" / "text_encoders" / "t5_tokenizer"))
    monkeypatch.setattr(bridge, "comfyui_root", lambda: root)
    run = run_node(
        CaptionDatasetVLM,
        dataset=load_dataset(photos),
        model=str(models / "tiny-llava"),
        mode="overwrite",
        **{**INPUTS, "max_tokens": 30, "prompt": "Describe the {class} in one sentence."},
    )
    manifest, report = run.result
    assert "vlm LLaVA (JoyCaption) tiny-llava" in report and "own prompt" in report
    assert "counted by the tokenizer in " + str(root / "comfy" / "text_encoders" / "t5_tokenizer") in report
    for entry in manifest.accepted:
        assert entry.caption.startswith("ohwx woman")
        assert len(t5(entry.caption, add_special_tokens=False)["input_ids"]) <= 30


def test_unknown_architecture_is_refused_by_name(comfy_env, models, photos):
    cog = models / "cogvlm-chat-hf"
    cog.mkdir()
    (cog / "config.json").write_text(json.dumps({"model_type": "cogvlm"}))
    with pytest.raises(CaptionerError, match="holds a 'cogvlm' model.*own modelling code"):
        run_node(
            CaptionDatasetVLM,
            dataset=load_dataset(photos),
            model="cogvlm-chat-hf",
            mode="overwrite",
            **INPUTS,
        )


def test_cancel_stops_and_frees_the_model(comfy_env, models, photos, monkeypatch):
    from charforge.engine.caption.backends import vlm

    closed = []
    real_close = vlm.VLMCaptioner.close
    monkeypatch.setattr(vlm.VLMCaptioner, "close", lambda self: closed.append(True) or real_close(self))
    dataset = load_dataset(photos)
    comfy_env.interrupt()
    with pytest.raises(comfy_env.model_management.InterruptProcessingException):
        run_node(CaptionDatasetVLM, dataset=dataset, model="tiny-qwen", mode="overwrite", **INPUTS)
    assert closed == [True]
