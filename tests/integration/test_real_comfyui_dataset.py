"""Opt-in: the dataset nodes on the planted-problem folder in a real ComfyUI, as a user would chain them.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (COMFYUI_PYTHON: its Python, which needs
insightface and onnxruntime for the face half). The pack is linked into a throwaway base directory
with install.py; an InsightFace-format test pack (tests/cf_testing/face_models.py: its detector finds
pure-red cells, its recogniser tells the texture around them apart) goes into models/insightface, so
Analyse runs real insightface inside ComfyUI. The planted folder (tests/cf_testing/photos.py, "cell"
markers) goes into ComfyUI's input folder; one prompt chains Load -> Analyse -> Filter -> Deduplicate
-> Crop -> Augment -> Export -> Report.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import cf_testing.real_comfyui as real
from cf_testing.photos import PLANTED_FILTER, tree_hashes

pytestmark = real.suite_marks(slow=False)


def _prompt(folder: str, pack: str) -> dict:
    def node(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}

    return {
        "1": node(
            "CharForgeLoadDataset",
            folder=folder,
            name="planted",
            recursive=False,
            read_captions=True,
            workers=2,
        ),
        "2": node(
            "CharForgeAnalyseDataset",
            dataset=["1", 0],
            face_detector="auto",
            insightface_pack=pack,
            workers=2,
        ),
        # The test pack's random recogniser separates people less than ArcFace does: a tighter threshold.
        "3": node(
            "CharForgeFilterDataset",
            dataset=["2", 0],
            **{**PLANTED_FILTER, "max_identity_distance": 0.3},
        ),
        "4": node("CharForgeDeduplicateDataset", dataset=["3", 0], threshold=8, hash="phash", workers=2),
        "5": node(
            "CharForgeCropDataset",
            dataset=["4", 0],
            buckets="sdxl",
            mode="face",
            headroom=0.15,
            square=False,
            upscale=False,
            format="jpg",
            workers=2,
        ),
        "6": node(
            "CharForgeAugmentDataset", dataset=["5", 0], flip=True, color_jitter=0.05, seed=1, workers=2
        ),
        "7": node(
            "CharForgeExportDataset",
            dataset=["6", 0],
            trigger="ohwx",
            class_tokens="woman",
            repeats=10,
            export_name="kohya",
            caption_mode="caption, trigger first",
        ),
        "8": node(
            "CharForgeDatasetReport",
            dataset=["7", 0],
            trigger="",
            thumbnail_size=160,
            per_sheet=48,
            workers=2,
        ),
        "9": node("PreviewImage", images=["8", 0]),
    }


EXPECTED = {  # first reason of each planted problem, with the test pack's red-cell detector
    "corrupt.jpg": "unreadable image",
    "good_03_blurred.jpg": "blurry",
    "tiny.png": "too small",
    "landscape.jpg": "no face found",
    "group.jpg": "several people",
    "someone_else.jpg": "different person",
    # The test pack's detector needs pure red: greyscale photos and the 255-colour palette lose it.
    "grey.png": "no face found",
    "grey16.png": "no face found",
    "palette.png": "no face found",
}


def test_planted_folder_through_real_comfyui(tmp_path):
    from cf_testing.face_models import write_face_pack
    from cf_testing.photos import make_planted_folder

    comfy = real.comfyui_dir()
    base = tmp_path / "base"
    python = real.comfyui_python(comfy)
    real.install_pack(comfy, base)
    write_face_pack(base / "models" / "insightface", pack="tiny")
    photos = make_planted_folder(base / "input" / "planted", marker="cell")
    before = tree_hashes(photos)

    server = real.start_comfyui(comfy, base, python)
    try:
        log = server.log()
        assert not real.pack_import_failures(log, "charforge"), real.pack_import_failures(log, "charforge")
        info = server.get("/object_info/CharForgeLoadDataset")["CharForgeLoadDataset"]
        assert info["category"] == "CharForge/Dataset" and info["output"][0] == "CHARFORGE_DATASET"

        prompt_id = str(uuid.uuid4())
        reply = server.post(
            "/prompt",
            {"prompt": _prompt("planted", "tiny"), "prompt_id": prompt_id, "client_id": "cf-dataset-test"},
        )
        assert reply["node_errors"] == {}, reply
        entry = server.wait_history(prompt_id, timeout=300)
        assert entry["status"]["status_str"] == "success", entry["status"]
        outputs = entry["outputs"]

        assert "face detector: insightface:tiny" in outputs["2"]["text"][0]
        report_text = outputs["8"]["text"][0]
        sheets = outputs["8"]["images"]
        assert sheets and all(s["type"] == "output" for s in sheets)
        for sheet in sheets:
            assert (base / "output" / sheet["subfolder"] / sheet["filename"]).is_file()
        assert outputs["9"]["images"]  # the IMAGE output previews like any ComfyUI image

        dataset = base / "output" / "charforge" / "datasets" / "planted"
        data = json.loads((dataset / "report" / "report.json").read_text(encoding="utf-8"))
        reasons = {img["name"]: img["reasons"] for img in data["images"] if not img["augmentations"]}
        for name, expected in EXPECTED.items():
            assert reasons[name] and reasons[name][0].startswith(expected), (name, reasons[name])
        for pair, reason in (
            (("good_01.jpg", "good_01 copy.jpg"), "exact duplicate of "),
            (("good_02.jpg", "good_02_resized.jpg"), "near duplicate of "),
        ):
            dropped = [n for n in pair if reasons[n]]
            assert len(dropped) == 1 and reasons[dropped[0]][0].startswith(reason), [reasons[n] for n in pair]
        accepted = sorted(name for name, why in reasons.items() if not why)
        assert len(accepted) == 9, (
            accepted
        )  # 4 good + 2 survivors of duplicate pairs + unicode, alpha, rotated
        assert "Élodie_été_写真.jpg" in accepted and "rotated.jpg" in accepted and "alpha.png" in accepted
        assert data["counts"]["accepted"] == 27  # each with a flipped and a jittered copy

        train_dir = Path(outputs["7"]["text"][0].split("train_data_dir = ")[1].splitlines()[0])
        assert train_dir == dataset / "kohya" / "img"
        subject = train_dir / "10_ohwx woman"
        assert len(list(subject.glob("*.jpg"))) == 27 and len(list(subject.glob("*.txt"))) == 27
        assert tree_hashes(photos) == before, "the source folder changed"
        print(report_text)
    finally:
        server.stop()
