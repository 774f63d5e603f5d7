"""Opt-in: the shipped synthesize_dataset workflow in a real ComfyUI, queued through /prompt.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (COMFYUI_PYTHON: its Python, with insightface,
onnxruntime and spandrel, which ComfyUI's own requirements include). The pack is linked into a throwaway base
directory with install.py; models are tiny ones of the real signatures (tests/cf_testing): the planted-face
InsightFace pack as buffalo_l, an inswapper_128-signature swapper whose weights keep the target face (so the
identity check has faces to judge: sources of the character pass, a stranger is rejected), and an ESRGAN upscaler
for ComfyUI's own Load Upscale Model. The editor file is converted with the driver's converter against the
server's /object_info, with Load Face Restorer bypassed as a user without a restorer would (the random-weight
restorers paint over the planted faces; restoration itself is covered by tests/test_synth_engine.py).

The run: photos -> Build Identity; Load Dataset -> Synthesize Dataset (sources) -> Analyse -> Filter ->
Deduplicate -> Crop (upscale model) -> Export -> Report. The report must mark the synthetic images with their
source, list the upscaled photos, and the source folder must be unchanged.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

import cf_testing.real_comfyui as real
from cf_testing.comfyui import REPO_ROOT
from cf_testing.photos import tree_hashes

pytestmark = real.suite_marks(slow=False)

WORKFLOW = REPO_ROOT / "workflows" / "synthesize_dataset.json"
SIZE = (320, 320)
FACE = ((160, 160, 102),)


def _editor_for_test(tmp_path: Path) -> Path:
    """The shipped editor file with the restorer bypassed and the test's model file names."""
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    for node in workflow["nodes"]:
        if node["type"] == "CharForgeLoadFaceRestorer":
            node["mode"] = 4  # bypassed (Ctrl+B in the editor)
    path = tmp_path / "synthesize_dataset.json"
    path.write_text(json.dumps(workflow), encoding="utf-8")
    return path


def _varied(image, seed: int):
    """`image` with everything outside the face's neighbourhood repainted in coarse random blocks: the face (what
    the recogniser sees) stays, the whole picture differs, so Deduplicate keeps each one as a photo of its own."""
    import numpy as np

    blocks = np.random.default_rng(seed).integers(0, 200, (SIZE[1] // 40, SIZE[0] // 40, 3))
    out = np.kron(blocks, np.ones((40, 40, 1))).astype(np.uint8)
    out[80:240, 80:240] = image[80:240, 80:240]
    return out


def _by_class(prompt: dict, class_type: str) -> tuple[str, dict]:
    (found,) = [(key, node) for key, node in prompt.items() if node["class_type"] == class_type]
    return found


def test_shipped_synthesis_workflow_through_real_comfyui(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "workflows"))
    import build_api

    from cf_testing.face_models import blank_image, face_image, write_face_pack
    from cf_testing.synth_models import build_swapper_onnx, build_upscaler
    from charforge.engine.dataset.images import write_rgb

    comfy = real.comfyui_dir()
    base = tmp_path / "base"
    python = real.comfyui_python(comfy)
    real.install_pack(comfy, base)
    models = base / "models"
    write_face_pack(models / "insightface", pack="buffalo_l")
    build_swapper_onnx(models / "insightface" / "inswapper_128.onnx", mode="identity")
    build_upscaler(models / "upscale_models" / "4x-tiny-esrgan.safetensors", scale=4)
    photos = base / "input" / "charforge" / "my_character"
    sources = base / "input" / "charforge" / "sources"
    for i in range(3):
        write_rgb(photos / f"hero_{i}.png", _varied(face_image(SIZE, FACE, person=1, noise=6, seed=i), i))
    for i in range(2):
        write_rgb(
            sources / f"pose_{i}.png", _varied(face_image(SIZE, FACE, person=1, noise=6, seed=50 + i), 50 + i)
        )
    write_rgb(sources / "stranger.png", face_image(SIZE, FACE, person=7))
    write_rgb(sources / "empty.png", blank_image(SIZE))
    before = tree_hashes(sources)

    server = real.start_comfyui(comfy, base, python)
    try:
        log = server.log()
        assert not real.pack_import_failures(log, "charforge"), real.pack_import_failures(log, "charforge")
        info = server.get("/object_info")
        assert info["CharForgeSynthesizeDataset"]["category"] == "CharForge/Synthesis"
        prompt = build_api.convert(_editor_for_test(tmp_path), info)
        assert not any(n["class_type"] == "CharForgeLoadFaceRestorer" for n in prompt.values())
        _, synth = _by_class(prompt, "CharForgeSynthesizeDataset")
        assert "restorer" not in synth["inputs"]  # the bypassed loader's link is gone
        _by_class(prompt, "UpscaleModelLoader")[1]["inputs"]["model_name"] = "4x-tiny-esrgan.safetensors"
        _by_class(prompt, "CharForgeLoadFaceModels")[1]["inputs"]["det_size"] = 320
        # The test photos are 320 px with ~112 px faces (measured smaller at analysis size).
        _by_class(prompt, "CharForgeFilterDataset")[1]["inputs"].update(min_side=256, min_face_size=32)
        _by_class(prompt, "CharForgeCropDataset")[1]["inputs"].update(buckets="sd15", workers=1)
        synth["inputs"]["max_share"] = 0.5

        prompt_id = str(uuid.uuid4())
        reply = server.post(
            "/prompt", {"prompt": prompt, "prompt_id": prompt_id, "client_id": "cf-synth-test"}
        )
        assert reply["node_errors"] == {}, reply
        entry = server.wait_history(prompt_id, timeout=600)
        assert entry["status"]["status_str"] == "success", entry["status"]
        outputs = entry["outputs"]
        synth_id, _ = _by_class(prompt, "CharForgeSynthesizeDataset")
        summary = outputs[synth_id]["text"][0]
        assert "3 synthetic image(s) from 4 source(s): 2 accepted" in summary, summary

        dataset = base / "output" / "charforge" / "datasets" / "my_character"
        report = json.loads((dataset / "report" / "report.json").read_text(encoding="utf-8"))
        marked = {Path(s["source"]).name: s["status"] for s in report["synthetic"]["images"]}
        assert marked == {"pose_0.png": "accepted", "pose_1.png": "accepted", "stranger.png": "rejected"}, (
            marked
        )
        assert report["synthetic"]["accepted"] == 2 and report["counts"]["accepted"] == 5
        rows = {r["name"]: r for r in report["images"]}
        stranger = next(
            r for r in rows.values() if r["synthetic"] and r["synthesized_from"].endswith("stranger.png")
        )
        assert stranger["reasons"][0].startswith("identity check: similarity")
        # Every accepted photo went through the upscaler; the identity check kept or refused each result
        # (random-weight upscalers may well erase the planted faces), and only kept ones count as upscaled.
        enhanced = {e["name"]: e for e in report["enhanced"]["images"]}
        assert set(enhanced) == {n for n, r in rows.items() if r["status"] == "accepted"}, enhanced
        assert all(e["kept"] or e.get("reason") for e in enhanced.values()), enhanced
        assert {u["name"] for u in report["upscaled"]} == {n for n, e in enhanced.items() if e["kept"]}
        assert all(u["factor"] == pytest.approx(1.6) for u in report["upscaled"])
        html = (dataset / "report" / "report.html").read_text(encoding="utf-8")
        assert "Synthetic and upscaled images" in html and "stranger.png" in html
        assert tree_hashes(sources) == before, "the source folder changed"
        print(summary)
        print(json.dumps(report["synthetic"], indent=1))
    finally:
        server.stop()
        sys.path.remove(str(REPO_ROOT / "workflows"))
