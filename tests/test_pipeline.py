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
from charforge.driver import pipeline
from charforge.driver.cli import build_parser
from charforge.driver.errors import ServerUnavailable

SAMPLES = REPO_ROOT / "samples" / "character"


class RecordingRunner:
    """Stands in for pipeline.Runner: records each prompt, answers with the UI texts the real nodes write."""

    def __init__(self, tmp: Path, texts: dict[str, dict[str, str]]):
        self.tmp = tmp
        self.texts = texts
        self.prompts: list[dict[str, Any]] = []
        self.server = None

    def run(self, prompt, out_dir):
        self.prompts.append(prompt)
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
    return pipeline.PipelineOptions(photos=photos, out=tmp_path / "out", character="pip", trigger="zqx",
                                    class_tokens="cartoon boy", **kw)


def _tiny_models():
    return pipeline.Models(tiny=True, checkpoint="tiny.safetensors", train_base="[diffusers] tiny", arch="sd15",
                           tagger="tiny-tagger", clip="tiny_clip", motion="tiny_mm.safetensors", faces=False)


def _canned(tmp_path: Path) -> dict[str, dict[str, str]]:
    ds = tmp_path / "server" / "datasets"
    captioned = ds / "pip_captioned" / "captioned" / "img" / "10_zqx cartoon boy"
    captioned.mkdir(parents=True)
    for i in range(3):
        (captioned / f"{i}.txt").write_text("zqx, smile")
    return {
        "CharForgeLoadDataset": {},  # replaced below per workflow
        "CharForgeTrainLoRA": {"1": "pip.safetensors: 4 steps, final loss 0.1234; run folder /srv/train_runs/pip"},
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

    runner.texts = {"CharForgeFilterDataset": {
        "6": f"11 image(s) exported to {ds / 'pip/kohya/img/10_zqx cartoon boy'} (11 written, 0 unchanged, 0 removed)",
        "7": f"11 accepted, 1 rejected (blurry: 1); 1 contact sheet page(s); report: {ds / 'pip/report/report.html'}"}}
    state["dataset"] = pipeline.stage_dataset(runner, opts, models, state)
    prompt = runner.prompts[-1]
    assert prompt["1"]["class_type"] == "CharForgeLoadDataset"
    assert prompt["1"]["inputs"]["folder"] == str(opts.photos.resolve()) and prompt["1"]["inputs"]["name"] == "pip"
    assert prompt["2"]["inputs"]["face_detector"] == "none" and prompt["3"]["inputs"]["require_face"] is False
    assert prompt["6"]["class_type"] == "CharForgeExportDataset" and prompt["6"]["inputs"]["trigger"] == "zqx"
    assert prompt["5"]["inputs"]["buckets"] == "sd15"
    assert state["dataset"]["train_data_dir"] == str(ds / "pip/kohya/img")
    assert state["dataset"]["accepted"] == 11

    captioned = ds / "pip_captioned" / "captioned" / "img" / "10_zqx cartoon boy"
    runner.texts = {"CharForgeCaptionDataset": {
        "2": "3 captioned", "3": f"3 image(s) exported to {captioned} (3 written, 0 unchanged, 0 removed)",
        "4": f"3 accepted; report: {ds / 'pip_captioned/report/report.html'}"}}
    state["captions"] = pipeline.stage_captions(runner, opts, models, state)
    prompt = runner.prompts[-1]
    assert prompt["1"]["inputs"]["folder"] == state["dataset"]["train_data_dir"]
    assert prompt["2"]["class_type"] == "CharForgeCaptionDataset" and prompt["2"]["inputs"]["model"] == "tiny-tagger"
    assert state["captions"]["count"] == 3
    assert sorted(p.name for p in (opts.out / "captions").iterdir()) == ["0.txt", "1.txt", "2.txt"]

    runner.texts = {"CharForgeTrainLoRA": canned["CharForgeTrainLoRA"]}
    state["lora"] = pipeline.stage_lora(runner, opts, models, state)
    train = runner.prompts[-1]["1"]
    assert train["class_type"] == "CharForgeTrainLoRA" and train["inputs"]["preset"] == "sd15"
    assert train["inputs"]["dataset_folder"] == str(captioned.parent)
    assert train["inputs"]["base_model"] == "[diffusers] tiny" and train["inputs"]["steps"] == 4
    assert state["lora"]["lora_name"] == "pip.safetensors" and state["lora"]["run_dir"] == "/srv/train_runs/pip"

    runner.texts = {"CharForgeClipScore": canned["CharForgeClipScore"]}
    state["images"] = pipeline.stage_images(runner, opts, models, state)
    prompt = runner.prompts[-1]
    assert prompt["2"]["class_type"] == "LoraLoader" and prompt["2"]["inputs"]["lora_name"] == "pip.safetensors"
    assert prompt["1"]["inputs"]["ckpt_name"] == "tiny.safetensors"
    assert prompt["3"]["inputs"]["text"].startswith("photo of zqx cartoon boy")
    assert "zqx" not in prompt["10"]["inputs"]["prompt"]  # CLIP does not know the trigger word
    assert prompt["5"]["inputs"]["batch_size"] == prompt["11"]["inputs"]["group_size"] == opts.candidates
    assert "kept candidate 2 of 4" in Path(state["images"]["scores"]).read_text()

    runner.texts = {"CharForgeSaveVideo": {}}
    state["video"] = pipeline.stage_video(runner, opts, models, state)
    prompt = runner.prompts[-1]
    assert prompt["2"]["inputs"]["lora_name"] == "pip.safetensors"
    assert prompt["1"]["inputs"]["motion_module"] == "tiny_mm.safetensors"
    assert "CharForgeIdentityDrift" not in {n["class_type"] for n in prompt.values()}  # no identity without faces
    assert state["video"]["video"].endswith(".mp4")

    lines = "\n".join(pipeline.summary_lines({"stages": state, "tiny": True}, opts.out))
    for needle in ("report.html", "captions", "LoRA", "scores.txt", ".mp4",
                   "tiny random models"):
        assert needle in lines, needle


def test_the_identity_route_builds_an_identity_and_keeps_the_drift_check(tmp_path):
    runner = RecordingRunner(tmp_path, {"CharForgeBuildIdentity": {}, "CharForgeScoreIdentity": {"10": "scores"},
                                        "CharForgeSaveVideo": {"7": "drift ok"}})
    opts = _opts(tmp_path)
    models = pipeline.Models(tiny=False, checkpoint="v15.safetensors", train_base="v15.safetensors", arch="sd15",
                             tagger="", clip="clip-l", motion="mm.ckpt", faces=True)
    state = {"captions": {"train_data_dir": "/data/img"}, "lora": {"lora_name": "pip.safetensors"}}
    pipeline.stage_images(runner, opts, models, state)
    identity, generate = runner.prompts
    assert identity["2"]["inputs"]["folder"] == "/data/img" and identity["2"]["inputs"]["name"] == "pip"
    assert generate["9"]["class_type"] == "CharForgeLoadIdentity" and generate["9"]["inputs"]["name"] == "pip"
    pipeline.stage_video(runner, opts, models, state)
    video = runner.prompts[-1]
    assert video["6"]["inputs"]["name"] == "pip" and video["7"]["class_type"] == "CharForgeIdentityDrift"
    assert video["3"]["inputs"]["width"] == 512  # real models: the workflow's own size


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
    monkeypatch.setattr(pipeline, "probe", lambda url, timeout=1.5: False)
    monkeypatch.setattr(pipeline, "_online", lambda *a, **k: False)
    with pytest.raises(ServerUnavailable) as info:
        pipeline.acquire_server(_opts(tmp_path), print, env={})
    text = str(info.value)
    assert "COMFYUI_DIR" in text and "offline" in text and "install.py" in text and "comfy-cli" in text


def test_the_command_is_registered():
    args = build_parser().parse_args(["pipeline", "photos", "--out", "o", "--no-face-check", "--character", "pip"])
    assert args.func.__module__ == "charforge.driver.cli_pipeline"
    assert args.no_face_check and args.character == "pip" and str(args.out) == "o"


def test_the_stage_workflows_the_pipeline_edits_are_shipped():
    for name in ("dataset_prep", "caption_dataset", "train_lora_sd15", "train_lora_sdxl", "build_identity",
                 "score_best_of_n", "generate_best_of_n_clip", "video_animatediff"):
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


@pytest.mark.parametrize(("ready", "comfy_dir", "expected"), [
    ((True, True), "/opt/ComfyUI", "found"),  # CharForge and models on 8188: use it
    ((True, False), "/opt/ComfyUI", "own"),  # no models there: start our own, which can take tiny ones
    ((False, False), "/opt/ComfyUI", "own"),
    ((False, False), None, "error"),  # nothing to start: say how to install the pack
])
def test_which_comfyui_is_used(tmp_path, monkeypatch, ready, comfy_dir, expected):
    monkeypatch.setattr(pipeline, "probe", lambda url, timeout=1.5: url == pipeline.DEFAULT_LOCAL_URL)
    monkeypatch.setattr(pipeline, "_charforge_ready", lambda url: ready)
    monkeypatch.setattr(pipeline, "start_own_server", lambda path, out, say, port=None: pipeline.Server("own", None,
                                                                                                          path))
    (tmp_path / "ComfyUI").mkdir()
    (tmp_path / "ComfyUI" / "main.py").write_text("")
    env = {"COMFYUI_DIR": str(tmp_path / "ComfyUI"), "COMFYUI_PYTHON": "python"} if comfy_dir else {}
    if expected == "error":
        with pytest.raises(ServerUnavailable, match="install.py"):
            pipeline.acquire_server(_opts(tmp_path), print, env=env)
        return
    server = pipeline.acquire_server(_opts(tmp_path), print, env=env)
    assert (server.url == pipeline.DEFAULT_LOCAL_URL) == (expected == "found")


def test_the_base_model_family_comes_from_the_checkpoint_keys(tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "base" / "models" / "checkpoints"
    folder.mkdir(parents=True)
    tensor = np.zeros(1, np.float32)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": tensor,
               "conditioner.embedders.1.model.ln_final.weight": tensor}, str(folder / "ponyDiffusionV6.safetensors"))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": tensor,
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": tensor},
              str(folder / "my_xl_looking_sd15.safetensors"))
    server = pipeline.Server("http://127.0.0.1:1", base_dir=tmp_path / "base")
    assert pipeline.checkpoint_arch(server, "ponyDiffusionV6.safetensors") == "sdxl"  # no "xl" in the name
    assert pipeline.checkpoint_arch(server, "my_xl_looking_sd15.safetensors") == "sd15"  # the keys win
    assert pipeline.checkpoint_arch(server, "remote_juggernautXL.safetensors") == "sdxl"  # not local: the name
    assert pipeline.checkpoint_arch(server, "remote_dreamshaper.ckpt") == "sd15"
