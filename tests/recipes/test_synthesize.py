"""``charforge dataset synthesize``: the synthesis recipe from the command line, on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("insightface")
pytest.importorskip("spandrel")

from cf_testing.cli import run_charforge as run  # noqa: E402
from cf_testing.face_models import blank_image, face_image, write_face_pack  # noqa: E402
from cf_testing.synth_models import build_restorer, build_swapper_onnx  # noqa: E402
from charforge.engine.dataset import DatasetManifest  # noqa: E402
from charforge.engine.dataset.images import write_rgb  # noqa: E402
from charforge.engine.faces import FaceAnalyzer  # noqa: E402
from charforge.engine.synth import FaceSwapper  # noqa: E402
from charforge.engine.synth import models as synth_models  # noqa: E402

SIZE = (320, 320)
FACE = ((160, 160, 102),)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    models = tmp_path_factory.mktemp("cli-models") / "models"
    write_face_pack(models / "insightface", "buffalo_l")
    build_swapper_onnx(models / "insightface" / "inswapper_128.onnx", mode="identity")
    build_restorer(models / "facerestore_models" / "RestoreFormer-tiny.pth", "RestoreFormer")
    return models


@pytest.fixture
def folders(no_comfy, models_root, monkeypatch, tmp_path):
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(models_root))
    photos, sources = tmp_path / "photos", tmp_path / "sources"
    for i in range(4):
        write_rgb(photos / f"hero_{i}.png", face_image(SIZE, FACE, person=1, noise=6, seed=i))
    for i in range(2):
        write_rgb(sources / f"pose_{i}.png", face_image(SIZE, FACE, person=1, noise=6, seed=40 + i))
    write_rgb(sources / "stranger.png", face_image(SIZE, FACE, person=7))
    write_rgb(sources / "empty.png", blank_image(SIZE))
    yield photos, sources, tmp_path / "dataset"
    FaceAnalyzer.clear_cache()
    FaceSwapper.clear_cache()
    synth_models.clear_cache()


def synthesize(photos: Path, sources: Path, out: Path, *options: str) -> tuple[int, str, str]:
    """``charforge dataset synthesize PHOTOS --sources SOURCES --out OUT OPTIONS``, in this process."""
    return run("dataset", "synthesize", str(photos), "--sources", str(sources), "--out", str(out), *options)


def test_synthesize_writes_a_marked_dataset_and_report(folders):
    photos, sources, out = folders
    code, stdout, stderr = synthesize(photos, sources, out, "--det-size", "320", "--json")
    assert code == 0, stderr + stdout
    records = [json.loads(line) for line in stdout.splitlines()]
    result = next(r for r in records if r["event"] == "result")
    assert result["made"] == 3 and result["accepted"] == 2 and result["below_threshold"] == 1
    assert result["skipped"] == [{"source": str(sources / "empty.png"), "reason": "no face found"}]
    assert any(r["event"] == "progress" and r["done"] == r["total"] == 4 for r in records)
    manifest = DatasetManifest.load(out)
    assert sum(e.synthetic for e in manifest.entries) == 3 and len(manifest.entries) == 7
    report = json.loads((out / "report" / "report.json").read_text(encoding="utf-8"))
    assert report["synthetic"]["accepted"] == 2 and (out / "report" / "report.html").is_file()


def test_synthesize_with_a_restorer_names_it(folders):
    photos, sources, out = folders
    shutil.rmtree(sources)
    write_rgb(sources / "pose.png", face_image(SIZE, FACE, person=1))
    code, stdout, stderr = synthesize(
        photos, sources, out, "--det-size", "320", "--restore", "RestoreFormer-tiny.pth", "--max-share", "1"
    )
    assert code == 0, stderr
    assert "restorer RestoreFormer-tiny.pth (RestoreFormer)" in stderr
    assert "1 synthetic image(s) from 1 source(s)" in stdout


def test_usage_errors_exit_2(folders):
    photos, sources, out = folders
    code, _, stderr = synthesize(photos / "nope", sources, out)
    assert code == 2 and "is not a folder" in stderr
    code, _, stderr = synthesize(photos, sources, out, "--swapper", "missing.onnx", "--det-size", "320")
    assert code == 2 and "inswapper_128.onnx directly in" in stderr
    code, _, stderr = synthesize(photos, sources, sources)
    assert code == 2 and "its own folder" in stderr
