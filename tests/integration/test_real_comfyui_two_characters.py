"""Opt-in: the shipped two_characters workflow in a real ComfyUI (COMFYUI_DIR set), through /prompt.

ComfyUI's own hook nodes carry two random LoRAs (real SD1.5 layer names, full-size tensors) on two masked
prompts into KSampler with the shallow full-width SD1.5 test checkpoint. Checked: the workflow as shipped
runs (sizes shrunk), the hook LoRAs change the picture (the same seed with both hook strengths at 0 gives
another image), and Score Characters reports each character. The random-weight checkpoint draws no face the
test face models find, so both characters are reported missing there; a second prompt scores a planted
picture of the two people side by side (left and right swapped) through the same node, which gives each
character its similarity.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

import cf_testing.real_comfyui as real
from cf_testing import two_characters as two

pytestmark = real.suite_marks()

PORTS = range(8860, 8880)
WORKFLOW = real.REPO_ROOT / "workflows" / "api" / "two_characters.json"
WIDTH, HEIGHT = 128, 64


def _shipped(strength: float) -> dict:
    prompt = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if two.fit_node(kind, inputs, WIDTH, HEIGHT, steps=2):
            continue
        if kind == "CreateHookLora":
            inputs["strength_model"] = inputs["strength_clip"] = strength
        elif kind == "SaveImage":
            inputs["filename_prefix"] = f"two_{strength:g}"
    return prompt


def test_two_characters_workflow_in_real_comfyui(tmp_path, sd15_comfy_checkpoint):
    comfy, python, base = two.two_character_base(
        tmp_path, sd15_comfy_checkpoint, ("character_a", "character_b")
    )
    Image.fromarray(two.face_pair(0, 1)).save(base / "input" / "ab.png")
    Image.fromarray(two.face_pair(1, 0)).save(base / "input" / "ba.png")

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    try:
        # The two identities, saved under the names the workflow loads.
        two.save_identities(server, "cf-two")
        assert (base / "models" / "charforge" / "identities" / "character_b.json").is_file()

        # 1. The shipped workflow, hooks on and off.
        images = {}
        for strength in (1.0, 0.0):
            prompt = _shipped(strength)
            outputs = server.run_prompt(prompt, "cf-two")
            (score,) = [k for k, v in prompt.items() if v["class_type"] == "CharForgeScoreCharacters"]
            (save,) = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
            table = outputs[score]["text"][0]
            assert "character_a" in table and "character_b" in table and "missing" in table
            saved = outputs[save]["images"][0]
            with Image.open(base / "output" / saved.get("subfolder", "") / saved["filename"]) as image:
                assert image.size == (WIDTH, HEIGHT)
                images[strength] = np.asarray(image.convert("RGB"), dtype=np.int16)
        assert np.abs(images[1.0] - images[0.0]).mean() > 0.5, "the hook LoRAs did not change the picture"

        # 2. Score Characters on two people side by side: each keeps its own face, wherever it stands.
        outputs = server.run_prompt(
            {
                "1": {
                    "class_type": "CharForgeLoadFaceModels",
                    "inputs": {"pack": "buffalo_l", "det_size": 640, "provider": "CPU"},
                },
                "2": {"class_type": "CharForgeLoadIdentity", "inputs": {"name": "character_a"}},
                "3": {"class_type": "CharForgeLoadIdentity", "inputs": {"name": "character_b"}},
                "4": {"class_type": "LoadImage", "inputs": {"image": "ab.png"}},
                "5": {"class_type": "LoadImage", "inputs": {"image": "ba.png"}},
                "6": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["5", 0]}},
                "7": {
                    "class_type": "CharForgeScoreCharacters",
                    "inputs": {
                        "face_models": ["1", 0],
                        "images": ["6", 0],
                        "identity_1": ["2", 0],
                        "identity_2": ["3", 0],
                        "threshold": 0.5,
                    },
                },
            },
            "cf-two",
        )
        table = outputs["7"]["text"][0]
        print(table)
        assert "FAIL" not in table and "passed 2/2, missing 0" in table
    finally:
        server.stop()
