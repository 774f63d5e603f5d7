"""Opt-in: caption a dataset folder in sentences with tiny Qwen2.5-VL and LLaVA models in a real ComfyUI.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (COMFYUI_PYTHON: its Python, with transformers).
The pack is linked into a throwaway base directory with install.py; tiny random models of the real
architectures (tests/cf_testing/vlm_models.py) go into models/LLM (the LLaVA one nested, as JoyCaption
downloads often are), with a CogVLM-typed folder beside them; photos into ComfyUI's input folder. The node
must be in /object_info; Load Dataset -> Caption Dataset, VLM (Qwen2.5-VL) -> Caption Review runs through
/prompt with the limit counted by ComfyUI's own T5 vocabulary; the LLaVA model then overwrites the captions;
the CogVLM folder is refused by name. The server listens on a port in 19150-19199.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from cf_testing.real_comfyui import (
    comfyui_dir,
    comfyui_python,
    install_pack,
    pack_import_failures,
    start_comfyui,
    suite_marks,
)

pytestmark = suite_marks(slow=False)
PORTS = range(19150, 19200)
MAX_TOKENS = 40


def _prompt(model: str, mode: str) -> dict:
    def node(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}

    return {
        "1": node(
            "CharForgeLoadDataset", folder="hero", name="hero", recursive=False, read_captions=True, workers=1
        ),
        "2": node(
            "CharForgeCaptionDatasetVLM",
            dataset=["1", 0],
            model=model,
            style="training caption",
            mode=mode,
            trigger="ohwx",
            class_tokens="woman",
            template="{trigger} {class}, {caption}",
            keep_tokens="",
            banned_words="",
            style_tags="",
            max_tokens=MAX_TOKENS,
            tokenizer="comfyui",
            batch_size=2,
            max_new_tokens=60,
        ),
        "3": node(
            "CharForgeCaptionReview", dataset=["2", 0], max_images=10, thumbnail_size=128, missing_first=True
        ),
    }


def _sidecars(base: Path) -> dict[str, str]:
    folder = base / "output" / "charforge" / "datasets" / "hero"
    return {p.name: p.read_text(encoding="utf-8").strip() for p in sorted(folder.rglob("*.txt"))}


def test_vlm_captions_in_real_comfyui(tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer

    from cf_testing.vlm_models import write_tiny_llava, write_tiny_qwen25vl

    comfy = comfyui_dir()
    base = tmp_path / "base"
    install_pack(comfy, base)
    llm = base / "models" / "LLM"
    write_tiny_qwen25vl(llm / "tiny-qwen")
    write_tiny_llava(llm / "joycaption" / "tiny-llava")
    (llm / "cogvlm-chat").mkdir(parents=True)
    (llm / "cogvlm-chat" / "config.json").write_text(json.dumps({"model_type": "cogvlm"}), encoding="utf-8")
    photos = base / "input" / "hero"
    photos.mkdir(parents=True)
    for name, colour, size in (("a.jpg", (200, 30, 30), (96, 80)), ("b.png", (30, 30, 200), (60, 120))):
        Image.new("RGB", size, colour).save(photos / name)
    t5 = AutoTokenizer.from_pretrained(str(comfy / "comfy" / "text_encoders" / "t5_tokenizer"))

    server = start_comfyui(comfy, base, comfyui_python(comfy), ports=PORTS)
    try:
        failures = pack_import_failures(server.log(), "charforge")
        assert not failures, failures
        info = server.get("/object_info/CharForgeCaptionDatasetVLM")["CharForgeCaptionDatasetVLM"]
        assert info["display_name"] == "Caption Dataset, VLM (CharForge)"
        assert info["input"]["required"]["style"][0] == ["training caption", "descriptive", "detailed"]
        assert info["input"]["required"]["max_tokens"][1]["default"] == 511

        first = server.run_prompt(_prompt("tiny-qwen", "skip existing"), "cf-vlm-test")
        report = first["2"]["text"][0]
        assert "captioned 2" in report and "vlm Qwen2.5-VL tiny-qwen" in report, report
        assert "t5 tokens counted by the tokenizer in " in report and "t5_tokenizer" in report, report
        qwen = _sidecars(base)
        assert len(qwen) == 2
        for caption in qwen.values():
            assert caption.startswith("ohwx woman, ")
            assert len(t5(caption, add_special_tokens=False)["input_ids"]) <= MAX_TOKENS
        review = first["3"]
        assert review["text"][0].startswith("2 photo(s), 0 without a caption")

        second = server.run_prompt(_prompt("joycaption/tiny-llava", "overwrite"), "cf-vlm-test")
        assert "vlm LLaVA (JoyCaption) tiny-llava" in second["2"]["text"][0]
        llava = _sidecars(base)
        assert set(llava) == set(qwen) and llava != qwen  # the other model wrote new captions
        assert all(c.startswith("ohwx woman, ") for c in llava.values())

        prompt_id = str(uuid.uuid4())
        server.post(
            "/prompt",
            {"prompt": _prompt("cogvlm-chat", "overwrite"), "prompt_id": prompt_id, "client_id": "x"},
        )
        entry = server.wait_history(prompt_id)
        assert entry["status"]["status_str"] == "error"
        errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
        assert errors and errors[0]["node_type"] == "CharForgeCaptionDatasetVLM"
        assert (
            "'cogvlm'" in errors[0]["exception_message"]
            and "own modelling code" in errors[0]["exception_message"]
        )
        assert _sidecars(base) == llava  # nothing written by the refused run
    finally:
        server.stop()
