"""Opt-in: caption a dataset folder with a tiny BLIP in a real ComfyUI, as a new user would.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (COMFYUI_PYTHON: its Python, with transformers).
The pack is linked into a throwaway base directory with install.py; a tiny random BLIP of the real
architecture (tests/cf_testing/caption_models.py) goes into models/blip/tiny-blip, photos (one with the
user's own caption next to it) into ComfyUI's input folder. One prompt chains Load Dataset -> Caption
Dataset (blip, trigger word) -> Caption Review; a second prompt (another batch size, so ComfyUI runs the
node again) must skip every photo. The server listens on a port in 18700-18799.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cf_testing.real_comfyui as real

pytestmark = real.suite_marks(slow=False)
PORTS = range(18700, 18800)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def _prompt(batch_size: int) -> dict:
    def node(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}

    return {
        "1": node(
            "CharForgeLoadDataset", folder="hero", name="hero", recursive=False, read_captions=True, workers=1
        ),
        "2": node(
            "CharForgeCaptionDataset",
            dataset=["1", 0],
            backend="blip",
            model="tiny-blip",
            mode="skip existing",
            trigger="ohwx",
            class_tokens="woman",
            template="{trigger} {class}, {caption}",
            keep_tokens="",
            banned_words="",
            style_tags="",
            max_tokens=75,
            tokenizer="",
            batch_size=batch_size,
            max_new_tokens=6,
        ),
        "3": node(
            "CharForgeCaptionReview", dataset=["2", 0], max_images=10, thumbnail_size=128, missing_first=True
        ),
    }


def test_caption_a_dataset_folder_in_real_comfyui(tmp_path, monkeypatch):
    from PIL import Image

    from cf_testing.caption_models import write_tiny_blip

    comfy = real.comfyui_dir()
    base = tmp_path / "base"
    real.install_pack(comfy, base)
    write_tiny_blip(base / "models" / "blip" / "tiny-blip")
    photos = base / "input" / "hero"
    photos.mkdir(parents=True)
    for name, colour in (("a.jpg", (200, 30, 30)), ("b.png", (30, 30, 200)), ("c.jpg", (30, 200, 30))):
        Image.new("RGB", (96, 80), colour).save(photos / name)
    (photos / "c.txt").write_text("my own caption\n", encoding="utf-8")
    before = _hashes(photos)

    server = real.start_comfyui(comfy, base, real.comfyui_python(comfy), ports=PORTS)
    try:
        assert int(server.url.rsplit(":", 1)[1]) in PORTS
        failures = real.pack_import_failures(server.log(), "charforge")
        assert not failures, failures
        info = server.get("/object_info/CharForgeCaptionDataset")["CharForgeCaptionDataset"]
        assert "blip" in info["input"]["required"]["backend"][0]

        def run(batch_size: int) -> dict:
            return server.run_prompt(_prompt(batch_size), "cf-caption-test")

        first = run(2)
        report = first["2"]["text"][0]
        assert "captioned 2" in report and "skipped 1" in report and "blip tiny-blip" in report, report
        sidecars = sorted((base / "output" / "charforge" / "datasets" / "hero").rglob("*.txt"))
        assert len(sidecars) == 2
        for sidecar in sidecars:
            assert sidecar.read_text(encoding="utf-8").startswith("ohwx woman, ")

        review = first["3"]
        assert len(review["images"]) == 3 and all(i["type"] == "temp" for i in review["images"])
        for image in review["images"]:
            assert (base / "temp" / image["subfolder"] / image["filename"]).is_file()
        assert review["text"][0].startswith("3 photo(s), 0 without a caption")
        assert any(t == "c.jpg: my own caption" for t in review["text"])
        assert sum(t.split(": ", 1)[1].startswith("ohwx woman, ") for t in review["text"][1:]) == 2

        second = run(1)  # another batch size: ComfyUI runs the node again; every photo is captioned already
        assert "captioned 0" in second["2"]["text"][0] and "skipped 3" in second["2"]["text"][0]
        assert sorted((base / "output" / "charforge" / "datasets" / "hero").rglob("*.txt")) == sidecars
        assert _hashes(photos) == before, "the photo folder changed"
    finally:
        server.stop()
