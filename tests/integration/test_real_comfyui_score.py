"""Opt-in: the score nodes in a real ComfyUI, used as a new user would.

Build an identity from reference photos, then in a generation workflow score a batch (photos plus one
freshly generated image), filter it and pick the best of each pair; the score table shows on the node
(served by /view like any preview). Runs when COMFYUI_DIR is set and ComfyUI's Python has insightface.
The face models are the InsightFace-format test models (tests/cf_testing/face_models.py), so "faces" are
the planted red cells those models detect; the generated image has none and must be reported, not raised.
"""

from __future__ import annotations

import urllib.request

from PIL import Image

import cf_testing.real_comfyui as real
from cf_testing.face_models import blank_image, face_image

pytestmark = real.suite_marks()


PORTS = range(8500, 8600)


def test_identity_score_filter_best_in_real_comfyui(tmp_path, monkeypatch, sd15_comfy_checkpoint):
    comfy, python, base = real.face_checkpoint_base(tmp_path, sd15_comfy_checkpoint)
    refs = base / "input" / "refs"
    refs.mkdir(parents=True)
    for seed in range(3):
        Image.fromarray(face_image(person=0, noise=2, seed=seed)).save(refs / f"ref{seed}.png")
    Image.fromarray(blank_image()).save(refs / "no_face.png")
    for name, image in (
        ("gen_a", face_image(person=0, noise=2, seed=7)),
        ("gen_b", face_image(person=5)),
        ("gen_c", face_image(person=0, noise=2, seed=8)),
        ("gen_d", blank_image()),
    ):
        Image.fromarray(image).save(base / "input" / f"{name}.png")

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    try:
        info = server.get("/object_info")
        assert info["CharForgeScoreIdentity"]["category"] == "CharForge/Score"
        assert "buffalo_l" in info["CharForgeLoadFaceModels"]["input"]["required"]["pack"][0]

        # 1. Build the identity from the reference folder.
        outputs = server.run_prompt(
            {
                "1": {
                    "class_type": "CharForgeLoadFaceModels",
                    "inputs": {"pack": "buffalo_l", "det_size": 640, "provider": "auto"},
                },
                "2": {
                    "class_type": "CharForgeBuildIdentity",
                    "inputs": {"face_models": ["1", 0], "name": "hero", "save": True, "folder": "refs"},
                },
            },
            "cf-score",
        )
        report = outputs["2"]["text"][0]
        assert "3 reference(s)" in report and "no_face.png (no face found)" in report and "saved to" in report
        assert (base / "models" / "charforge" / "identities" / "hero.json").is_file()
        assert (
            "hero"
            in server.get("/object_info/CharForgeLoadIdentity")["CharForgeLoadIdentity"]["input"]["required"][
                "name"
            ][0]
        )

        # 2. A generation workflow: the generated image joins three photos; score, filter, best of 2.
        prompt = {
            "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_tiny.safetensors"}},
            "11": {
                "class_type": "CLIPTextEncode",
                "inputs": {"clip": ["10", 1], "text": "a photo of sks person"},
            },
            "12": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["10", 1], "text": "blurry"}},
            "13": {
                "class_type": "EmptyLatentImage",
                "inputs": {"width": 128, "height": 128, "batch_size": 1},
            },
            "14": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["10", 0],
                    "positive": ["11", 0],
                    "negative": ["12", 0],
                    "latent_image": ["13", 0],
                    "seed": 1,
                    "steps": 2,
                    "cfg": 5.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                },
            },
            "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["10", 2]}},
            "16": {"class_type": "LoadImage", "inputs": {"image": "gen_a.png"}},
            "17": {"class_type": "LoadImage", "inputs": {"image": "gen_b.png"}},
            "18": {"class_type": "LoadImage", "inputs": {"image": "gen_c.png"}},
            "22": {"class_type": "LoadImage", "inputs": {"image": "gen_d.png"}},
            "19": {"class_type": "ImageBatch", "inputs": {"image1": ["16", 0], "image2": ["17", 0]}},
            "20": {"class_type": "ImageBatch", "inputs": {"image1": ["19", 0], "image2": ["18", 0]}},
            "23": {"class_type": "ImageBatch", "inputs": {"image1": ["20", 0], "image2": ["22", 0]}},
            "21": {"class_type": "ImageBatch", "inputs": {"image1": ["23", 0], "image2": ["15", 0]}},
            "1": {
                "class_type": "CharForgeLoadFaceModels",
                "inputs": {"pack": "buffalo_l", "det_size": 640, "provider": "auto"},
            },
            "2": {"class_type": "CharForgeLoadIdentity", "inputs": {"name": "hero"}},
            "3": {
                "class_type": "CharForgeScoreIdentity",
                "inputs": {
                    "face_models": ["1", 0],
                    "identity": ["2", 0],
                    "images": ["21", 0],
                    "threshold": 0.0,
                    "face_choice": "largest",
                },
            },
            "4": {
                "class_type": "CharForgeFilterByScore",
                "inputs": {"images": ["21", 0], "scores": ["3", 0], "threshold": 0.0},
            },
            "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
            "6": {
                "class_type": "CharForgeBestOfN",
                "inputs": {"images": ["21", 0], "scores": ["3", 0], "group_size": 2},
            },
            "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        }
        outputs = server.run_prompt(prompt, "cf-score")
        summary = outputs["3"]["text"][0]
        # Photos 0 and 2 show the character, 1 someone else, 3 no face: reported, not raised. Image 4 is the
        # generated one (random weights: whatever it shows, it is scored or reported like the others).
        assert "image 3: no face found" in summary and summary.count("image(s) pass") == 1
        table = outputs["3"]["images"][0]
        assert table["type"] == "temp"
        with urllib.request.urlopen(
            f"{server.url}/view?filename={table['filename']}&type=temp", timeout=30
        ) as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"  # the table image is served to the UI
        kept = outputs["4"]["text"][0]
        assert kept.startswith("kept ") and "of 5 image(s)" in kept and "image 1 (similarity" in kept
        assert "image 3 (no face found)" in kept and len(outputs["5"]["images"]) == int(kept.split()[1]) >= 2
        picks = outputs["6"]["text"][0]
        assert (
            len(outputs["7"]["images"]) == 3 and "group 1: image 0" in picks and "group 2: image 2" in picks
        )
        log = server.log()
        assert not real.pack_tracebacks(log), log[-4000:]
    finally:
        server.stop()
