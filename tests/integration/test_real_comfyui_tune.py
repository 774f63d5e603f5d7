"""Opt-in: ``charforge tune`` with 4 trials over 2 real ComfyUI servers on loopback, tiny random models.

Each server is a real ComfyUI (COMFYUI_DIR) with CharForge linked in by install.py, the tiny SD1.5 of
``charforge.engine.tiny`` (a diffusers folder to train on, the single-file checkpoint to render with) and a
kohya dataset of planted-face drawings. The search trains with the real Train LoRA node in two segments (the
second resumes the first's run), renders the evaluation set with ComfyUI's own LoraLoader and KSampler, scores it
here with a tiny InsightFace pack and a tiny CLIP, and writes the report. Tiny random models draw noise, so the
scores say nothing about quality: this checks that the whole loop runs and what it leaves behind. Ports
18650-18699; 5-30 minutes on 2 CPU cores, depending on what else runs.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

import cf_testing.real_comfyui as real
from cf_testing.face_models import face_image, write_clip_folder, write_face_pack
from cf_testing.model_fixtures import train_inputs

pytestmark = real.suite_marks(pytest.mark.timeout(3600))

PORTS = range(18650, 18700)
SIZE = 64
TINY_OVERRIDES = {
    "sample_steps": 2,
    "sample_size": 64,
    "mixed_precision": "no",
    "bucket_step": 32,
    "min_bucket": 32,
}


def _base(tmp: Path, name: str, models: Path) -> Path:
    base = tmp / name
    real.install_pack(real.comfyui_dir(), base)
    shutil.copytree(models, base / "models", dirs_exist_ok=True)
    folder = base / "input" / "img" / "3_zqx person"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(face_image((SIZE, SIZE), faces=((16, 16, 128),), person=0, noise=4, seed=i)).save(
            folder / f"p{i}.png"
        )
        (folder / f"p{i}.txt").write_text("zqx person, portrait")
    return base


def test_tune_four_trials_over_two_real_servers(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    pytest.importorskip("insightface")
    from charforge.engine import tiny
    from charforge.engine.library.inspect import inspect_lora
    from charforge.recipes import cli

    comfy = real.comfyui_dir()
    python = real.comfyui_python(comfy)
    if (
        subprocess.run([python, "-c", "import diffusers, peft, transformers"], capture_output=True).returncode
        != 0
    ):
        pytest.skip("ComfyUI's Python lacks the pack's requirements (pip install -r requirements.txt)")
    models = tiny.write_tiny_models(tmp_path / "tiny_models", parts=("sd15",))
    # One thread each: two servers on a small machine otherwise fight over every core.
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    servers = [
        real.start_comfyui(comfy, _base(tmp_path, name, models), python, env=threads, ports=PORTS)
        for name in ("a", "b")
    ]
    try:
        # scoring happens here, with its own tiny face pack and CLIP, and the character's reference photos
        scoring = tmp_path / "scoring_models"
        write_face_pack(scoring / "insightface", "buffalo_l")
        write_clip_folder(scoring / "clip_vision" / "tiny-clip")
        monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(scoring))
        monkeypatch.setenv("CHARFORGE_PATH_CHARFORGE", str(tmp_path / "charforge"))
        refs = tmp_path / "refs"
        refs.mkdir()
        for i in range(3):
            Image.fromarray(
                face_image((SIZE, SIZE), faces=((16, 16, 128),), person=0, noise=4, seed=50 + i)
            ).save(refs / f"r{i}.png")
        characters = tmp_path / "charforge" / "characters"
        characters.mkdir(parents=True)
        (characters / "zqx.yaml").write_text(
            yaml.safe_dump(
                {
                    "trigger_words": ["zqx"],
                    "prompt": "photo of a person",
                    "negative_prompt": "blurry",
                    "reference_photos": str(refs),
                    "generation": {
                        "steps": 2,
                        "cfg": 4.0,
                        "width": SIZE,
                        "height": SIZE,
                        "sampler": "euler",
                        "scheduler": "normal",
                    },
                }
            )
        )
        train = {
            "1": {
                "class_type": "CharForgeTrainLoRA",
                "inputs": train_inputs(
                    base_model=f"[diffusers] {tiny.DIFFUSERS}",
                    trigger_word="zqx",
                    output_name="zqx",
                    steps=2,
                    learning_rate=1e-4,
                    overrides=json.dumps(TINY_OVERRIDES),
                    save_character="",
                    use_preset_values=False,
                ),
            }
        }
        (tmp_path / "train.json").write_text(json.dumps(train))
        search = tmp_path / "search.yaml"
        search.write_text(
            yaml.safe_dump(
                {
                    "name": "zqx_tune",
                    "character": "zqx",
                    "workflow": "train.json",
                    "fixed": {"schedule": "constant"},
                    "space": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "rank": [2, 4]},
                    "budget": {"trials": 4},
                    "seed": 1,
                    "pruning": {"segments": 2, "startup_trials": 1},
                    "eval": {
                        "scenes": ["portrait", "in a garden"],
                        "seeds": [1, 2],
                        "checkpoint": tiny.CHECKPOINT,
                    },
                    "scoring": {"det_size": SIZE},
                }
            )
        )
        out = tmp_path / "tune"
        stdout, stderr = io.StringIO(), io.StringIO()
        argv = [
            "tune",
            str(search),
            "--out",
            str(out),
            "--server",
            servers[0].url,
            "--server",
            servers[1].url,
            "--loras-dir",
            str(tmp_path / "loras"),
            "--timeout",
            "600",
        ]
        code = cli.main(argv, stdout=stdout, stderr=stderr)
        assert code == 0, (stderr.getvalue()[-4000:], servers[0].log()[-3000:])
    finally:
        for server in servers:
            server.stop()

    data = json.loads((out / "trials.json").read_text())
    trials = data["trials"]
    assert len(trials) == 4 and all(t["state"] in ("complete", "pruned") for t in trials), trials
    assert len({t["server"] for t in trials}) == 2  # both servers trained
    for name in (
        "report.html",
        "best.yaml",
        "report/pareto.png",
        "report/history.png",
        "report/importances.png",
        "report/best_grid.png",
    ):
        assert (out / name).is_file(), name
    best = yaml.safe_load((out / "best.yaml").read_text())
    lora = Path(best["copied_to"])
    info = inspect_lora(lora)
    assert info.modules > 0 and info.base_model == "sd15"
    complete = [t for t in trials if t["state"] == "complete"]
    for t in complete:
        images = json.loads((out / t["folder"] / "eval" / "images.json").read_text())
        assert len(images) == 4
        with Image.open(out / t["folder"] / "eval" / images[0]) as picture:
            assert picture.size == (SIZE, SIZE)
    print("report:", out / "report.html")
    print(stdout.getvalue())
    print(stderr.getvalue()[-3000:])
