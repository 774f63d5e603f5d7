"""The vision-language sentence captioner (Qwen2.5-VL, LLaVA / JoyCaption) on tiny random models of the real
architectures, saved with real processors, tokenizers and chat templates (cf_testing/vlm_models.py)."""

import json
import shutil

import pytest
from PIL import Image

from cf_testing.vlm_models import write_tiny_llava, write_tiny_qwen25vl
from charforge.engine.caption.backends import vlm
from charforge.engine.caption.backends.base import CaptionerError
from charforge.engine.caption.backends.vlm import STYLES, VLMCaptioner, VLMSettings
from charforge.engine.caption.dataset import caption_dataset
from charforge.engine.caption.postprocess import CaptionRules, apply_rules
from charforge.engine.control import Cancelled, Control
from charforge.engine.dataset import load_folder

WRITERS = {"qwen2_5_vl": write_tiny_qwen25vl, "llava": write_tiny_llava}
CLASSES = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_captioners")
    return {name: write(root / f"tiny-{name}") for name, write in WRITERS.items()}


@pytest.fixture
def models_dir(no_comfy, tiny_models, monkeypatch):
    """A ComfyUI-style models folder with both captioners in models/LLM and a CogVLM folder beside them."""
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(no_comfy / "models"))
    llm = no_comfy / "models" / "LLM"
    shutil.copytree(tiny_models["qwen2_5_vl"], llm / "tiny-qwen")
    shutil.copytree(tiny_models["llava"], llm / "joycaption" / "tiny-llava")
    cog = llm / "cogvlm2-llama3-chat-19B"
    cog.mkdir(parents=True)
    (cog / "config.json").write_text(
        json.dumps({"model_type": "cogvlm", "auto_map": {"AutoModelForCausalLM": "x"}})
    )
    return no_comfy / "models"


def _images():
    """Photos of different shapes: Qwen2.5-VL gives them different numbers of image tokens."""
    return [
        Image.new("RGB", (60, 40), (255, 0, 0)),
        Image.new("RGB", (30, 90), (0, 0, 255)),
        Image.new("RGBA", (80, 80), (0, 200, 0, 128)),
        Image.new("L", (50, 20), 90),
    ]


def _settings(**kw):
    return VLMSettings(**{"max_new_tokens": 6, "min_new_tokens": 6, **kw})


def test_saved_in_the_real_on_disk_format(tiny_models):
    import transformers

    for model_type, folder in tiny_models.items():
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
        assert {"processor_config.json", "chat_template.jinja", "generation_config.json"} <= files
        assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
        processor = transformers.AutoProcessor.from_pretrained(str(folder))
        assert type(processor).__name__ == CLASSES[model_type][1]


def test_models_are_found_in_the_llm_folder_and_others_refused_by_name(models_dir, tiny_models):
    assert vlm.list_models() == ["joycaption/tiny-llava", "tiny-qwen"]  # the CogVLM folder is not offered
    assert vlm.resolve_model("") == models_dir / "LLM" / "joycaption" / "tiny-llava"
    assert vlm.resolve_model("tiny-qwen") == models_dir / "LLM" / "tiny-qwen"
    with pytest.raises(CaptionerError) as info:
        VLMCaptioner("cogvlm2-llama3-chat-19B")
    message = str(info.value)
    assert "'cogvlm'" in message and "own modelling code" in message and "qwen2_5_vl or llava" in message
    odd = models_dir / "LLM" / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(CaptionerError, match="holds a 'mllama' model"):
        VLMCaptioner(str(odd))
    with pytest.raises(CaptionerError, match="holds a 'mllama' model"):
        vlm.architecture_of(odd)
    with pytest.raises(CaptionerError) as info:
        VLMCaptioner("Qwen2.5-VL-7B-Instruct")
    assert str(models_dir / "LLM" / "Qwen2.5-VL-7B-Instruct") in str(info.value)  # where it looked


@pytest.mark.parametrize("model_type", list(WRITERS))
def test_generation_equals_plain_transformers(model_type, tiny_models):
    """Our prompt, padding and generation give the token ids of transformers' documented usage on the same
    weights: the chat template rendered by the processor, left-padded batch, greedy generate."""
    import torch
    import transformers

    folder = tiny_models[model_type]
    images = _images()[:3]
    with VLMCaptioner(str(folder), _settings(batch_size=3)) as captioner:
        ours = captioner.generate(images)
    model_class, processor_class = (getattr(transformers, n) for n in CLASSES[model_type])
    processor = processor_class.from_pretrained(str(folder))
    processor.tokenizer.padding_side = "left"
    if model_type == "qwen2_5_vl":
        conversation = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": STYLES["training caption"]}],
            }
        ]
    else:  # as the JoyCaption model card writes it
        conversation = [
            {"role": "system", "content": "You are a helpful image captioner."},
            {"role": "user", "content": STYLES["training caption"]},
        ]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    inputs = processor(
        text=[text] * 3, images=[i.convert("RGB") for i in images], padding=True, return_tensors="pt"
    )
    model = model_class.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        reference = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    reference = reference[:, inputs["input_ids"].shape[1] :]
    assert ours.tolist() == reference.tolist()
    assert len({tuple(row) for row in ours.tolist()}) > 1  # the images matter: not one caption for all


@pytest.mark.parametrize("model_type", list(WRITERS))
def test_batched_equals_one_at_a_time_with_left_padding(model_type, tiny_models):
    with VLMCaptioner(str(tiny_models[model_type]), _settings(batch_size=4)) as captioner:
        assert captioner.device == "cpu" and str(captioner.dtype) == "torch.float32"
        images = _images()
        inputs = captioner.inputs(images)
        mask = inputs["attention_mask"]
        assert bool(mask[:, -1].all())  # every prompt ends at the last position: padding is on the left
        if model_type == "qwen2_5_vl":
            assert len(set(mask.sum(1).tolist())) > 1  # different image token counts: padding was needed
            assert not bool(mask[:, 0].all())
        batched = captioner.caption(images)
        captioner.batch_size = 1
        assert captioner.caption(images) == batched
        assert all(isinstance(c, str) for c in batched) and len(batched) == 4
        assert captioner.decode(captioner.generate(images[:1])) == batched[:1]
        assert captioner.notes()[0].startswith("vlm ")
    assert captioner.model is None
    with pytest.raises(CaptionerError, match="closed"):
        captioner.generate(images)


def test_llava_prompt_has_one_begin_token_and_one_image_token(tiny_models, tmp_path):
    folder = tmp_path / "bos-template"
    shutil.copytree(tiny_models["llava"], folder)
    template = folder / "chat_template.jinja"
    plain = VLMCaptioner(str(tiny_models["llava"]), _settings())
    # A template that writes the begin-of-text token itself: the tokenizer must not add a second one.
    template.write_text("{{ bos_token }}" + template.read_text())
    doubled = VLMCaptioner(str(folder), _settings())
    for captioner in (plain, doubled):
        ids = captioner.inputs(_images()[:1])["input_ids"][0].tolist()
        tokenizer = captioner.processor.tokenizer
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
        image_id = captioner.model.config.image_token_id
        assert ids.count(image_id) == 16  # one image placeholder, expanded to the 4 x 4 SigLIP patches
        system = tokenizer.encode("You are a helpful image captioner.", add_special_tokens=False)
        assert any(ids[i : i + len(system)] == system for i in range(len(ids)))
    assert plain.generate(_images()[:2]).tolist() == doubled.generate(_images()[:2]).tolist()


def test_templates_without_the_image_token_in_string_turns(tiny_models, tmp_path):
    """A llava-hf style template (image as a content part) and one that knows no images both get one token."""
    hf_style = tmp_path / "llava-hf-template"
    shutil.copytree(tiny_models["llava"], hf_style)
    (hf_style / "chat_template.jinja").write_text(
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
        "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"
    )
    no_images = tmp_path / "text-only-template"
    shutil.copytree(tiny_models["llava"], no_images)
    (no_images / "chat_template.jinja").write_text(
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% endif %}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    for folder in (hf_style, no_images):
        captioner = VLMCaptioner(str(folder), _settings())
        assert captioner.prompt.count("<image>") == 1
        assert "<image>" + STYLES["training caption"] in captioner.prompt.replace("<image>\n", "<image>")
        assert len(captioner.caption(_images()[:2])) == 2
    missing = tmp_path / "no-template"
    shutil.copytree(tiny_models["llava"], missing)
    (missing / "chat_template.jinja").unlink()
    with pytest.raises(CaptionerError, match="no chat template"):
        VLMCaptioner(str(missing), _settings())


def test_styles_and_own_prompt(tiny_models):
    folder = str(tiny_models["qwen2_5_vl"])
    with VLMCaptioner(folder, _settings(style="descriptive")) as captioner:
        assert captioner.instruction == STYLES["descriptive"]
        ids = captioner.inputs(_images()[:1])["input_ids"][0].tolist()
        assert STYLES["descriptive"] in captioner.processor.tokenizer.decode(ids)
    own = "Describe the {class} called {trigger} in one sentence."
    with VLMCaptioner(folder, _settings(prompt=own, trigger="ohwx", class_tokens="woman")) as captioner:
        assert captioner.instruction == "Describe the woman called ohwx in one sentence."
        assert "own prompt" in captioner.notes()[0]
    with pytest.raises(CaptionerError, match="training caption"):
        VLMCaptioner(folder, _settings(style="haiku"))


def test_cancel_stops_between_batches_and_during_a_caption(tiny_models):
    asked = []
    stop_after = {"n": 10**9}

    def should_stop():
        asked.append(1)
        return len(asked) > stop_after["n"]

    control = Control(should_stop=should_stop)
    with VLMCaptioner(str(tiny_models["llava"]), _settings(batch_size=2), control=control) as captioner:
        generated = []
        real_generate = captioner.generate
        captioner.generate = lambda images: generated.append(len(images)) or real_generate(images)
        captioner.caption(_images())
        checks_per_batch = len(asked) // 2  # one before the batch + one per generated token
        assert checks_per_batch == 1 + 6
        # Cancel during the second batch's check: the first batch finished, the second never generated.
        asked.clear()
        generated.clear()
        stop_after["n"] = checks_per_batch
        with pytest.raises(Cancelled):
            captioner.caption(_images())
        assert generated == [2]
        # Cancel after the third token of a caption: generate itself stops.
        asked.clear()
        generated.clear()
        stop_after["n"] = 1 + 3
        with pytest.raises(Cancelled):
            captioner.caption(_images())
        assert generated == [2]


def test_dataset_captions_go_through_the_rules(no_comfy, tiny_models, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255)), ("c", (0, 255, 0))):
        Image.new("RGB", (48, 32), colour).save(photos / f"{name}.png")
    ds = load_folder(photos, tmp_path / "ds")
    rules = CaptionRules(
        trigger="ohwx",
        class_tokens="woman",
        template="{trigger} {class}, {caption}",
        max_tokens=30,
        text_encoder="t5",
        sentences=True,
    )
    with VLMCaptioner(str(tiny_models["qwen2_5_vl"]), _settings(max_new_tokens=40, min_new_tokens=40)) as c:
        raw = c.caption([Image.open(photos / f"{n}.png") for n in "abc"])
        run = caption_dataset(ds, c, rules, mode="overwrite")
    assert len(run.captioned) == 3
    for entry, text in zip(run.manifest.accepted, raw, strict=True):
        assert entry.caption == apply_rules(text, rules).text
        assert entry.caption.startswith("ohwx woman")
        assert apply_rules(text, rules).tokens <= 30
    assert "vlm Qwen2.5-VL" in run.summary
