"""``charforge pipeline``: stage wiring, resuming, server discovery messages, tiny models, the shipped samples.

The real run (a started ComfyUI, tiny models, every stage) is tests/integration/test_real_comfyui_pipeline.py;
here the stages run against a recording stand-in for the server, so the wiring is checked offline in a second.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cf_testing.comfyui import REPO_ROOT
from charforge.driver.errors import ServerUnavailable
from charforge.recipes import pipeline
from charforge.recipes.cli import build_parser

SAMPLES = REPO_ROOT / "samples" / "character"


class RecordingRunner:
    """Stands in for pipeline.Runner: records each prompt, answers with the UI texts the real nodes write."""

    def __init__(self, tmp: Path, texts: dict[str, dict[str, str]]):
        self.tmp = tmp
        self.texts = texts
        self.prompts: list[dict[str, Any]] = []
        self.previews: list[str | None] = []
        self.server = None

    def run(self, prompt, out_dir, previews=None):
        self.prompts.append(prompt)
        self.previews.append(previews)
        classes = {n["class_type"] for n in prompt.values()}
        key = next(k for k in self.texts if k in classes)
        files = []
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            files = [out_dir / "file.png"]
            if "CharForgeSaveVideo" in classes:
                files.append(out_dir / "video_00001.mp4")
        return None, self.texts[key], files


def _opts(tmp_path, **kw):
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    return pipeline.PipelineOptions(
        photos=photos, out=tmp_path / "out", character="pip", trigger="zqx", class_tokens="cartoon boy", **kw
    )


def _tiny_models():
    return pipeline.Models(
        tiny=True,
        checkpoint="tiny.safetensors",
        train_base="[diffusers] tiny",
        arch="sd15",
        tagger="tiny-tagger",
        clip="tiny_clip",
        motion="tiny_mm.safetensors",
        faces=False,
    )


def _manifest(export: Path, entries: list[tuple[str, str, str]]) -> None:
    """A kohya export's manifest.json with (id, source, file) entries, as the Export node writes it."""
    export.mkdir(parents=True, exist_ok=True)
    (export / "manifest.json").write_text(
        json.dumps(
            {
                "name": export.parent.name,
                "entries": [{"id": i, "source": source, "file": file} for i, source, file in entries],
            }
        )
    )


def _canned(tmp_path: Path) -> dict[str, dict[str, str]]:
    """The server side of a run on photos a.jpg, b.jpg, c.jpg, d.jpg (c rejected): both exports renumber them."""
    ds = tmp_path / "server" / "datasets"
    photos = tmp_path / "photos"
    kohya = ds / "pip" / "kohya"
    _manifest(
        kohya,
        [
            ("0001", f"{photos}/a.jpg", "img/10_zqx cartoon boy/0001.jpg"),
            ("0002", f"{photos}/b.jpg", "img/10_zqx cartoon boy/0002.jpg"),
            ("0003", f"{photos}/c.jpg", f"{photos}/c.jpg"),  # rejected: never exported
            ("0004", f"{photos}/d.jpg", "img/10_zqx cartoon boy/0004.jpg"),
        ],
    )
    captioned = ds / "pip_captioned" / "captioned" / "img" / "10_zqx cartoon boy"
    captioned.mkdir(parents=True)
    _manifest(
        captioned.parent.parent,
        [
            (
                f"000{i + 1}",
                f"{kohya}/img/10_zqx cartoon boy/{old}.jpg",
                f"img/10_zqx cartoon boy/000{i + 1}.jpg",
            )
            for i, old in enumerate(("0001", "0002", "0004"))
        ],
    )
    for i in range(3):
        (captioned / f"000{i + 1}.txt").write_text(f"zqx, smile {i}")
    for name in ("pip", "pip_captioned"):
        report = ds / name / "report"
        report.mkdir(parents=True, exist_ok=True)
        (report / "report.html").write_text(f"<img src='contact_sheet_001.png'> {name}")
        (report / "report.json").write_text("{}")
        (report / "contact_sheet_001.png").write_bytes(b"png")
    return {
        "CharForgeLoadDataset": {},  # replaced below per workflow
        "CharForgeTrainLoRA": {
            "1": "pip.safetensors: 4 steps, final loss 0.1234; run folder /srv/train_runs/pip"
        },
        "CharForgeClipScore": {"10": "4 scored, mean 0.21", "11": "kept candidate 2 of 4"},
        "CharForgeSaveVideo": {},
    }


def test_every_stage_edits_the_nodes_it_means(tmp_path):
    canned = _canned(tmp_path)
    ds = tmp_path / "server" / "datasets"
    opts = _opts(tmp_path, face_check=False)
    models = _tiny_models()
    state: dict[str, Any] = {}
    runner = RecordingRunner(tmp_path, canned)

    runner.texts = {
        "CharForgeFilterDataset": {
            "6": f"11 image(s) exported to {ds / 'pip/kohya/img/10_zqx cartoon boy'} (11 written, 0 unchanged, 0 removed)",
            "7": f"11 accepted, 1 rejected (blurry: 1); 1 contact sheet page(s); report: {ds / 'pip/report/report.html'}",
        }
    }
    state["dataset"] = pipeline.stage_dataset(runner, opts, models, state)
    prompt = runner.prompts[-1]
    assert prompt["1"]["class_type"] == "CharForgeLoadDataset"
    assert (
        prompt["1"]["inputs"]["folder"] == str(opts.photos.resolve())
        and prompt["1"]["inputs"]["name"] == "pip"
    )
    assert prompt["2"]["inputs"]["face_detector"] == "none" and prompt["3"]["inputs"]["require_face"] is False
    assert prompt["6"]["class_type"] == "CharForgeExportDataset" and prompt["6"]["inputs"]["trigger"] == "zqx"
    assert prompt["5"]["inputs"]["buckets"] == "sd15"
    assert state["dataset"]["train_data_dir"] == str(ds / "pip/kohya/img")
    assert state["dataset"]["accepted"] == 11
    # The selection's report is copied next to its contact sheets (downloaded there, flat).
    selection = opts.out / "dataset" / "selection"
    assert (selection / "report.html").read_text().endswith(" pip") and (
        selection / "contact_sheet_001.png"
    ).exists()
    assert state["dataset"]["report_html"] == str(selection / "report.html")

    captioned = ds / "pip_captioned" / "captioned" / "img" / "10_zqx cartoon boy"
    runner.texts = {
        "CharForgeCaptionDataset": {
            "2": "3 captioned",
            "3": f"3 image(s) exported to {captioned} (3 written, 0 unchanged, 0 removed)",
            "4": f"3 accepted; report: {ds / 'pip_captioned/report/report.html'}",
        }
    }
    state["captions"] = pipeline.stage_captions(runner, opts, models, state)
    prompt = runner.prompts[-1]
    assert prompt["1"]["inputs"]["folder"] == state["dataset"]["train_data_dir"]
    assert (
        prompt["2"]["class_type"] == "CharForgeCaptionDataset"
        and prompt["2"]["inputs"]["model"] == "tiny-tagger"
    )
    assert state["captions"]["count"] == 3
    # Named after the photos they describe, though both exports renumbered them (c.jpg was rejected).
    captions = opts.out / "captions"
    assert sorted(p.name for p in captions.glob("*.txt")) == ["a.txt", "b.txt", "d.txt"]
    assert (captions / "d.txt").read_text() == "zqx, smile 2"
    # The dataset report is the one written after captioning, not the dataset stage's.
    assert state["captions"]["report_html"] == str(opts.out / "dataset" / "report.html")
    assert (opts.out / "dataset" / "report.html").read_text().endswith(" pip_captioned")
    assert (opts.out / "dataset" / "contact_sheet_001.png").exists() and not list(captions.glob("*.html"))

    runner.texts = {"CharForgeTrainLoRA": canned["CharForgeTrainLoRA"]}
    state["lora"] = pipeline.stage_lora(runner, opts, models, state)
    train = runner.prompts[-1]["1"]
    assert train["class_type"] == "CharForgeTrainLoRA" and train["inputs"]["preset"] == "sd15"
    assert train["inputs"]["dataset_folder"] == str(captioned.parent)
    assert train["inputs"]["base_model"] == "[diffusers] tiny" and train["inputs"]["steps"] == 4
    assert train["inputs"]["output_name"] == "pip_tiny_random"  # what tiny models made says so
    assert (
        state["lora"]["lora_name"] == "pip.safetensors" and state["lora"]["run_dir"] == "/srv/train_runs/pip"
    )

    runner.texts = {"CharForgeClipScore": canned["CharForgeClipScore"]}
    state["images"] = pipeline.stage_images(runner, opts, models, state)
    prompt = runner.prompts[-1]
    assert (
        prompt["2"]["class_type"] == "LoraLoader" and prompt["2"]["inputs"]["lora_name"] == "pip.safetensors"
    )
    assert prompt["1"]["inputs"]["ckpt_name"] == "tiny.safetensors"
    assert prompt["3"]["inputs"]["text"].startswith("photo of zqx cartoon boy")
    assert "zqx" not in prompt["10"]["inputs"]["prompt"]  # CLIP does not know the trigger word
    assert prompt["5"]["inputs"]["batch_size"] == prompt["11"]["inputs"]["group_size"] == opts.candidates
    assert "kept candidate 2 of 4" in Path(state["images"]["scores"]).read_text()
    assert prompt["8"]["inputs"]["filename_prefix"] == "charforge/pip/tiny_random_candidate"
    assert prompt["12"]["inputs"]["filename_prefix"] == "charforge/pip/tiny_random_best"
    assert runner.previews[-1] == "score_table"

    runner.texts = {"CharForgeSaveVideo": {}}
    state["video"] = pipeline.stage_video(runner, opts, models, state)
    prompt = runner.prompts[-1]
    assert prompt["2"]["inputs"]["lora_name"] == "pip.safetensors"
    assert prompt["1"]["inputs"]["motion_module"] == "tiny_mm.safetensors"
    assert "CharForgeIdentityDrift" not in {
        n["class_type"] for n in prompt.values()
    }  # no identity without faces
    assert state["video"]["video"].endswith(".mp4")
    assert prompt["4"]["inputs"]["filename_prefix"] == "charforge/pip/tiny_random_video"
    assert runner.previews[-1] is None  # no drift plot without faces

    lines = "\n".join(pipeline.summary_lines({"stages": state, "tiny": True}, opts.out))
    for needle in (
        "dataset/report.html",
        "dataset/selection/report.html",
        "captions",
        "LoRA",
        "scores.txt",
        ".mp4",
        "tiny random models",
        "README.txt",
    ):
        assert needle in lines, needle
    readme = pipeline.out_readme(
        {"stages": state, "tiny": True, "settings": pipeline._settings(opts, models)}
    )
    assert readme.startswith("TINY RANDOM MODELS") and "tiny_random" in readme and "'zqx'" in readme
    for folder in ("dataset/", "captions/", "lora/", "images/", "video/", "comfyui/", "pipeline_state.json"):
        assert f"\n{folder}" in readme, folder
    assert "NOISE" not in pipeline.out_readme({"stages": state, "tiny": False})


def test_the_identity_route_builds_an_identity_and_keeps_the_drift_check(tmp_path):
    runner = RecordingRunner(
        tmp_path,
        {
            "CharForgeBuildIdentity": {},
            "CharForgeScoreIdentity": {"10": "scores"},
            "CharForgeSaveVideo": {"7": "drift ok"},
        },
    )
    opts = _opts(tmp_path)
    models = pipeline.Models(
        tiny=False,
        checkpoint="v15.safetensors",
        train_base="v15.safetensors",
        arch="sd15",
        tagger="",
        clip="clip-l",
        motion="mm.ckpt",
        faces=True,
    )
    state = {"captions": {"train_data_dir": "/data/img"}, "lora": {"lora_name": "pip.safetensors"}}
    pipeline.stage_images(runner, opts, models, state)
    identity, generate = runner.prompts
    assert identity["2"]["inputs"]["folder"] == "/data/img" and identity["2"]["inputs"]["name"] == "pip"
    assert generate["9"]["class_type"] == "CharForgeLoadIdentity" and generate["9"]["inputs"]["name"] == "pip"
    pipeline.stage_video(runner, opts, models, state)
    video = runner.prompts[-1]
    assert video["6"]["inputs"]["name"] == "pip" and video["7"]["class_type"] == "CharForgeIdentityDrift"
    assert video["3"]["inputs"]["width"] == 512  # real models: the workflow's own size
    assert video["4"]["inputs"]["filename_prefix"] == "charforge/pip/video"  # real models: no tiny mark
    assert generate["13"]["inputs"]["filename_prefix"] == "charforge/pip/best"
    assert runner.previews == ["identity_table", "score_table", "identity_drift"]


def test_the_trigger_word_follows_the_character_unless_given():
    photos = Path("photos")
    assert pipeline.PipelineOptions(photos=photos, character="pip").trigger == "pip"
    assert pipeline.PipelineOptions(photos=photos, character="Sir Pip-2").trigger == "sir_pip_2"
    assert pipeline.PipelineOptions(photos=photos, character="pip", trigger="zqx").trigger == "zqx"
    args = build_parser().parse_args(["pipeline", "photos", "--character", "pip"])
    assert args.trigger is None  # cmd_pipeline passes it on; the options fill in the character's name


class _DownloadingClient:
    """Stands in for ComfyClient.download_outputs: writes each output where the driver would, subfolders and all."""

    def __init__(self, outputs: list[tuple[str, str, str]]):
        self.outputs = outputs  # (type, subfolder, filename)

    def download_outputs(self, result, out_dir, include_temp=True):
        from charforge.driver.outputs import DownloadedFile, OutputFile, local_path_for

        done = []
        for kind, subfolder, filename in self.outputs:
            if kind == "temp" and not include_temp:
                continue
            source = OutputFile(
                node_id="1", key="images", index=0, filename=filename, subfolder=subfolder, type=kind
            )
            path = local_path_for(Path(out_dir), source)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(filename.encode())
            done.append(DownloadedFile(source, path, len(filename), ""))
        return done


@pytest.mark.parametrize("previews", [None, "score_table"])
def test_stage_outputs_land_flat_and_temporary_previews_only_when_named(tmp_path, previews):
    runner = pipeline.Runner(
        _DownloadingClient(
            [
                ("output", "charforge/pip", "tiny_random_best_00001_.png"),
                ("output", "charforge/pip", "tiny_random_candidate_00001_.png"),
                ("temp", "", "charforge_score_ab12.png"),
            ]
        ),
        _opts(tmp_path),
        print,
    )
    out = tmp_path / "out" / "images"
    out.mkdir(parents=True)
    (out / "tiny_random_best_00001_.png").write_bytes(b"from an earlier run")
    files = runner.collect(object(), out, previews)
    expected = {"tiny_random_best_00001_-1.png", "tiny_random_candidate_00001_.png"}
    if previews:
        expected.add("score_table.png")
    assert {f.name for f in files} == expected
    assert {p.name for p in out.iterdir()} == expected | {"tiny_random_best_00001_.png"}  # flat, nothing else


class _FakeClient:
    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def object_info(self, refresh=False):
        return {"CharForgeTrainLoRA": {}}


def test_a_rerun_skips_finished_stages(tmp_path, monkeypatch):
    calls: list[str] = []
    fail = {"images"}

    def stage(name):
        def run(runner, opts, models, state):
            calls.append(name)
            if name in fail:
                raise pipeline.PipelineError("boom")
            return {"ok": name}

        return run

    monkeypatch.setattr(pipeline, "acquire_server", lambda opts, say: pipeline.Server("http://127.0.0.1:1"))
    monkeypatch.setattr(pipeline, "ComfyClient", _FakeClient)
    monkeypatch.setattr(pipeline, "choose_models", lambda *a: _tiny_models())
    monkeypatch.setattr(pipeline, "STAGE_FUNCTIONS", {s: stage(s) for s in pipeline.STAGES})
    said: list[str] = []
    opts = _opts(tmp_path)
    with pytest.raises(pipeline.PipelineError, match="stage 'images' failed"):
        pipeline.run_pipeline(opts, said.append)
    assert calls == ["dataset", "captions", "lora", "images"]
    assert any("TINY RANDOM MODELS" in line for line in said)
    fail.clear()
    calls.clear()
    state = pipeline.run_pipeline(_opts(tmp_path), said.append)
    assert calls == ["images", "video"]
    assert sum("finished in an earlier run, skipped" in line for line in said) == 3
    saved = json.loads((tmp_path / "out" / pipeline.STATE_FILE).read_text())
    assert saved["stages"] == state["stages"] and all(saved["stages"][s]["done"] for s in pipeline.STAGES)
    # Other settings: everything runs again.
    calls.clear()
    pipeline.run_pipeline(_opts(tmp_path, face_check=False), said.append)
    assert calls == list(pipeline.STAGES)


def test_no_comfyui_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.server, "probe", lambda url, timeout=1.5: False)
    monkeypatch.setattr(pipeline.server, "_online", lambda *a, **k: False)
    with pytest.raises(ServerUnavailable) as info:
        pipeline.acquire_server(_opts(tmp_path), print, env={})
    text = str(info.value)
    assert "COMFYUI_DIR" in text and "offline" in text and "install.py" in text and "comfy-cli" in text


def test_the_command_is_registered():
    args = build_parser().parse_args(
        ["pipeline", "photos", "--out", "o", "--no-face-check", "--character", "pip"]
    )
    assert args.func.__module__ == "charforge.recipes.cli.pipeline"
    assert args.no_face_check and args.character == "pip" and str(args.out) == "o"


def test_the_stage_workflows_the_pipeline_edits_are_shipped():
    for name in (
        "dataset_prep",
        "caption_dataset",
        "train_lora_sd15",
        "train_lora_sdxl",
        "build_identity",
        "score_best_of_n",
        "generate_best_of_n_clip",
        "video_animatediff",
    ):
        assert pipeline.load_stage_workflow(name)


# ------------------------------------------------------------------------------------------------------------
# Tiny models and samples
# ------------------------------------------------------------------------------------------------------------


def test_tiny_tagger_and_clip_load_where_the_product_loads_them(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from charforge.engine import tiny
    from charforge.engine.score.clip import ClipScorer

    tiny.write_tiny_models(tmp_path, parts=["tagger", "clip"])
    assert tiny.written_parts(tmp_path) == {"tagger", "clip"}
    from charforge.engine.caption.backends.wd14 import WD14Tagger

    tagger = WD14Tagger(str(tmp_path / "wd14_tagger" / f"{tiny.TAGGER}.onnx"))
    try:
        captions = tagger.caption([Image.fromarray(np.full((80, 60, 3), 120, np.uint8))])
    finally:
        tagger.close()
    # The general tags sit above the default threshold whatever the picture; rating tags are never written.
    general = {name.replace("_", " ") for _, name, category, _ in tiny.TAGS if category == 0}
    assert len(captions) == 1 and set(captions[0].split(", ")) == general
    scorer = ClipScorer.load(str(tmp_path / "clip_vision" / tiny.CLIP_FOLDER), device="cpu")
    assert scorer is not None


def test_tiny_architectures_match_the_test_factories():
    from cf_testing import face_models, models
    from charforge.engine import tiny

    assert tiny.TINY_CLIP == face_models.TINY_CLIP
    assert tiny.SD15_VAE == models.SD15_VAE
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert tiny.CLIP_L[key] == models.CLIP_L[key]
    # ComfyUI recognises SD1.5 by these two numbers; the test factory's checkpoint keeps them too.
    assert tiny.SD15_UNET["block_out_channels"][0] == models.SD15_COMFY_UNET["block_out_channels"][0] == 320
    assert tiny.SD15_UNET["cross_attention_dim"] == models.SD15_COMFY_UNET["cross_attention_dim"] == 768


def test_the_samples_are_small_made_by_the_script_and_one_character():
    files = sorted(SAMPLES.glob("*.jpg"))
    assert len(files) >= 10
    assert sum(f.stat().st_size for f in files) < 2 * 1024 * 1024
    spec = importlib.util.spec_from_file_location("make_samples", REPO_ROOT / "samples" / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for index in (0, 5):  # the committed files are what the script draws (JPEG-close)
        drawn = np.asarray(module.render(index), dtype=np.float32)
        stored = np.asarray(Image.open(files[index]).convert("RGB"), dtype=np.float32)
        assert drawn.shape == stored.shape and np.abs(drawn - stored).mean() < 4


@pytest.mark.parametrize(
    ("ready", "comfy_dir", "expected"),
    [
        ((True, True), "/opt/ComfyUI", "found"),  # CharForge and models on 8188: use it
        ((True, False), "/opt/ComfyUI", "own"),  # no models there: start our own, which can take tiny ones
        ((False, False), "/opt/ComfyUI", "own"),
        ((False, False), None, "error"),  # nothing to start: say how to install the pack
    ],
)
def test_which_comfyui_is_used(tmp_path, monkeypatch, ready, comfy_dir, expected):
    monkeypatch.setattr(
        pipeline.server, "probe", lambda url, timeout=1.5: url == pipeline.server.DEFAULT_LOCAL_URL
    )
    monkeypatch.setattr(pipeline.server, "_charforge_ready", lambda url: ready)
    monkeypatch.setattr(
        pipeline.server,
        "start_own_server",
        lambda path, out, say, port=None: pipeline.Server("own", None, path),
    )
    (tmp_path / "ComfyUI").mkdir()
    (tmp_path / "ComfyUI" / "main.py").write_text("")
    env = {"COMFYUI_DIR": str(tmp_path / "ComfyUI"), "COMFYUI_PYTHON": "python"} if comfy_dir else {}
    if expected == "error":
        with pytest.raises(ServerUnavailable, match="install.py"):
            pipeline.acquire_server(_opts(tmp_path), print, env=env)
        return
    server = pipeline.acquire_server(_opts(tmp_path), print, env=env)
    assert (server.url == pipeline.server.DEFAULT_LOCAL_URL) == (expected == "found")


def test_the_base_model_family_comes_from_the_checkpoint_keys(tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "base" / "models" / "checkpoints"
    folder.mkdir(parents=True)
    tensor = np.zeros(1, np.float32)
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": tensor,
            "conditioner.embedders.1.model.ln_final.weight": tensor,
        },
        str(folder / "ponyDiffusionV6.safetensors"),
    )
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": tensor,
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": tensor,
        },
        str(folder / "my_xl_looking_sd15.safetensors"),
    )
    server = pipeline.Server("http://127.0.0.1:1", base_dir=tmp_path / "base")
    assert pipeline.checkpoint_arch(server, "ponyDiffusionV6.safetensors") == "sdxl"  # no "xl" in the name
    assert pipeline.checkpoint_arch(server, "my_xl_looking_sd15.safetensors") == "sd15"  # the keys win
    assert (
        pipeline.checkpoint_arch(server, "remote_juggernautXL.safetensors") == "sdxl"
    )  # not local: the name
    assert pipeline.checkpoint_arch(server, "remote_dreamshaper.ckpt") == "sd15"


def test_the_readme_and_out_readme_describe_the_same_layout():
    """README's table of out/ and the README.txt the pipeline writes into out/ name the same folders."""
    import re

    readme = (REPO_ROOT / "README.md").read_text()
    folders = set(re.findall(r"^\| `out/([a-z]+)/", readme, re.MULTILINE))
    assert folders >= {"dataset", "captions", "lora", "images", "video", "comfyui"}
    described = set(re.findall(r"^([a-z]+)/ ", pipeline.out_readme({"stages": {}}), re.MULTILINE))
    assert folders == described
    assert (
        "datasets/pip/report/report.html" not in readme
    )  # the report the demo leaves is out/dataset/report.html


def test_own_server_sees_every_model_folder_of_the_comfyui_install(tmp_path):
    """The ComfyUI the pipeline starts maps every folder of the one model-folder table (the pack's too)."""
    import yaml

    from charforge.common.model_folders import all_model_folders

    data = yaml.safe_load(pipeline.extra_model_paths(tmp_path / "ComfyUI" / "models"))["comfyui_install"]
    assert data.pop("base_path") == str(tmp_path / "ComfyUI" / "models")
    assert {key: value.split() for key, value in data.items()} == {
        key: [f"{name}/" for name in names] for key, names in all_model_folders().items()
    }
    assert {"blip", "frame_interpolation", "charforge", "checkpoints"} <= set(data)
