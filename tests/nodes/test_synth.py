"""CharForge/Synthesis nodes run as ComfyUI runs them (the stand-in), on tiny models of the real signatures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("insightface")
pytest.importorskip("spandrel")

from cf_testing.comfyui import image_batch as batch  # noqa: E402
from cf_testing.comfyui import run_node  # noqa: E402
from cf_testing.face_models import blank_image, face_image  # noqa: E402
from cf_testing.synth_models import build_compact_upscaler, build_restorer, build_swapper_onnx  # noqa: E402
from charforge.engine.control import Cancelled  # noqa: E402
from charforge.engine.dataset.images import write_rgb  # noqa: E402
from charforge.engine.synth import FaceSwapper  # noqa: E402
from charforge.engine.synth import models as synth_models  # noqa: E402
from charforge.nodes.dataset import CropDataset, DatasetReport, LoadDataset  # noqa: E402
from charforge.nodes.score import BuildIdentity, LoadFaceModels  # noqa: E402
from charforge.nodes.synth import (  # noqa: E402
    LoadFaceRestorer,
    LoadFaceSwapper,
    RestoreFaces,
    SwapFace,
    SynthesizeDataset,
)

SIZE = (320, 320)
FACE = ((160, 160, 102),)


@pytest.fixture(scope="session")
def synth_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-node-models")
    return {
        "swapper": build_swapper_onnx(root / "inswapper_128.onnx", mode="identity"),
        "restorer": build_restorer(root / "RestoreFormer-tiny.pth", "RestoreFormer"),
        # Real-ESRGAN Compact: Crop upscales five 320 px photos, ~14x cheaper than a tiny ESRGAN's dense blocks.
        "upscaler": build_compact_upscaler(root / "4x-tiny-compact.safetensors", scale=4),
    }


@pytest.fixture
def comfy(comfy_with_faces, synth_files):
    models = comfy_with_faces.base_dir / "models"
    shutil.copy(synth_files["swapper"], models / "insightface" / "inswapper_128.onnx")
    (models / "facerestore_models").mkdir(parents=True, exist_ok=True)
    shutil.copy(synth_files["restorer"], models / "facerestore_models" / "RestoreFormer-tiny.pth")
    yield comfy_with_faces
    FaceSwapper.clear_cache()
    synth_models.clear_cache()


def test_loaders_list_the_swapper_and_restorers_of_their_folders(comfy):
    swappers = LoadFaceSwapper.INPUT_TYPES()["required"]["swapper"][0]
    assert swappers == [
        "inswapper_128.onnx"
    ]  # the face packs below models/insightface/models are not swappers
    assert LoadFaceRestorer.INPUT_TYPES()["required"]["model"][0] == ["RestoreFormer-tiny.pth"]
    (swapper,) = run_node(LoadFaceSwapper, swapper="inswapper_128.onnx", provider="CPU").result
    (restorer,) = run_node(LoadFaceRestorer, model="RestoreFormer-tiny.pth").result
    assert swapper.size == 128 and restorer.architecture == "RestoreFormer"


def test_swap_and_restore_faces_on_a_batch(comfy):
    (face_models,) = run_node(LoadFaceModels, pack="buffalo_l", det_size=320, provider="CPU").result
    identity, *_ = run_node(
        BuildIdentity,
        face_models=face_models,
        name="hero",
        save=False,
        images=batch(face_image(SIZE, FACE, person=1)),
    ).result
    (swapper,) = run_node(LoadFaceSwapper, swapper="inswapper_128.onnx", provider="CPU").result
    images, swapped, report = run_node(
        SwapFace,
        images=batch(face_image(SIZE, FACE, person=2), blank_image(SIZE)),
        face_models=face_models,
        swapper=swapper,
        identity=identity,
        which="main",
    ).result
    assert images.shape == (2, 320, 320, 3) and swapped == 1
    assert "image 1: 0 face(s), 0 swapped" in report
    assert torch.equal(images[1], batch(blank_image(SIZE))[0])  # no face: passed through
    (restorer,) = run_node(LoadFaceRestorer, model="RestoreFormer-tiny.pth").result
    restored, faces = run_node(
        RestoreFaces,
        images=batch(face_image(SIZE, FACE, person=2)),
        face_models=face_models,
        restorer=restorer,
        which="all",
        blend=1.0,
        fidelity=0.5,
    ).result
    assert faces == 1 and restored.shape == (1, 320, 320, 3)


def _synthesis_inputs(photos: Path, sources: Path) -> dict:
    """Synthesize Dataset's inputs, from the loader nodes: `photos` loaded as the dataset ``hero`` with its
    identity, the face models and the swapper, `sources`; the main face swapped, no threshold, half synthetic."""
    (face_models,) = run_node(LoadFaceModels, pack="buffalo_l", det_size=320, provider="CPU").result
    identity, *_ = run_node(
        BuildIdentity, face_models=face_models, name="hero", save=False, folder=str(photos)
    ).result
    (swapper,) = run_node(LoadFaceSwapper, swapper="inswapper_128.onnx", provider="CPU").result
    dataset, *_ = run_node(
        LoadDataset, folder=str(photos), name="hero", recursive=False, read_captions=True, workers=1
    ).result
    return {
        "dataset": dataset,
        "sources": str(sources),
        "face_models": face_models,
        "swapper": swapper,
        "identity": identity,
        "which": "main",
        "threshold": 0.0,
        "max_share": 0.5,
    }


def test_synthesize_crop_with_comfys_upscale_model_and_report(comfy, tmp_path, synth_files):
    from spandrel import ModelLoader

    photos, sources = tmp_path / "photos", tmp_path / "sources"
    for i in range(3):
        write_rgb(photos / f"hero_{i}.png", face_image(SIZE, FACE, person=1, noise=6, seed=i))
    for i in range(2):
        write_rgb(sources / f"pose_{i}.png", face_image(SIZE, FACE, person=1, noise=6, seed=30 + i))
    write_rgb(sources / "stranger.png", face_image(SIZE, FACE, person=7))
    out = run_node(SynthesizeDataset, **_synthesis_inputs(photos, sources))
    manifest, summary, preview = out.result
    assert "3 synthetic image(s) from 3 source(s): 2 accepted" in summary
    assert preview.shape == (2, 320, 320, 3)
    assert any(
        p.node_id == "1" and p.value == p.total == 3 for p in comfy.progress
    )  # progress on the node's bar
    # ComfyUI's Load Upscale Model hands over a spandrel descriptor: Crop uses it for the small photos.
    upscale_model = ModelLoader().load_from_file(str(synth_files["upscaler"]))
    cropped, crop_summary = run_node(
        CropDataset,
        dataset=manifest,
        buckets="sd15",
        mode="face",
        headroom=0.15,
        square=True,
        upscale=False,
        format="png",
        workers=1,
        upscale_model=upscale_model,
    ).result
    assert "upscaled with Compact x4" in crop_summary
    assert all(e.upscaled == pytest.approx(1.6) for e in cropped.accepted)
    sheet, html_path, text = run_node(
        DatasetReport, dataset=cropped, trigger="", thumbnail_size=96, per_sheet=48, workers=1
    ).result
    report = json.loads((Path(cropped.folder) / "report" / "report.json").read_text(encoding="utf-8"))
    assert report["synthetic"]["accepted"] == 2 and report["synthetic"]["rejected"] == 1
    assert {Path(s["source"]).name for s in report["synthetic"]["images"]} == {
        "pose_0.png",
        "pose_1.png",
        "stranger.png",
    }
    assert "synthetic from" in Path(html_path).read_text(encoding="utf-8")


def test_synthesize_stops_on_cancel(comfy, tmp_path):
    photos, sources = tmp_path / "photos", tmp_path / "sources"
    write_rgb(photos / "hero.png", face_image(SIZE, FACE, person=1))
    write_rgb(sources / "pose.png", face_image(SIZE, FACE, person=1))
    inputs = _synthesis_inputs(photos, sources)
    comfy.interrupt()
    with pytest.raises(Cancelled):
        run_node(SynthesizeDataset, **inputs)
    assert not (Path(inputs["dataset"].folder) / "synthetic").exists()
