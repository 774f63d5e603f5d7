"""Opt-in: the one-graph character pipeline (workflows/character_pipeline.json) against a real ComfyUI.

ComfyUI is started from COMFYUI_DIR the way ``charforge pipeline`` starts it (base directory under tmp, CharForge
linked in by install.py, a loopback port in 18850-18899), with the tiny random models of the real architectures
(charforge.engine.tiny) and a planted-face InsightFace pack (tests/cf_testing/face_models.py) in its model
folders. The editor file converted with the live node definitions must equal the shipped API twin; that twin,
set to those models and to small sizes, is queued ONCE through the driver; it must
run to completion and leave a dataset report, captions, a LoRA that ComfyUI's own LoRA code loaded with every
key, CLIP and identity scores with a best-of-N pick, and a video that decodes. The executed-node order shows
that the training ran before generation. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

import cf_testing.real_comfyui as real
from cf_testing.comfyui import REPO_ROOT

pytestmark = real.suite_marks()

PORTS = range(18850, 18900)
WORKFLOW = REPO_ROOT / "workflows" / "api" / "character_pipeline.json"
TRIGGER = "zqx"


def _by_class(prompt: dict) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        ids.setdefault(node["class_type"], []).append(node_id)
    return ids


def _tiny_prompt(refs: Path, face_pack: str) -> dict:
    """The shipped workflow set to the tiny models and sizes (what a user changes in the editor)."""
    from charforge.engine import tiny
    from charforge.recipes.pipeline import TINY_TRAIN

    prompt = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    ids = _by_class(prompt)

    def only(class_type: str) -> dict:
        (node_id,) = ids[class_type]
        return prompt[node_id]["inputs"]

    only("CharForgeLoadDataset").update(folder=str(REPO_ROOT / "samples" / "character"), name="pip")
    only("CharForgeAnalyseDataset")["face_detector"] = "none"  # drawings: no face rules for the dataset
    only("CharForgeFilterDataset")["require_face"] = False
    only("CharForgeCaptionDataset").update(model=tiny.TAGGER, trigger=TRIGGER, class_tokens="cartoon boy")
    only("CharForgeExportDataset").update(trigger=TRIGGER, class_tokens="cartoon boy")
    only("CharForgeDatasetReport")["trigger"] = TRIGGER
    train = only("CharForgeTrainLoRA")
    train.update(base_model=f"[diffusers] {tiny.DIFFUSERS}", trigger_word=TRIGGER, output_name="pip_graph")
    train.update(TINY_TRAIN)
    only("CheckpointLoaderSimple")["ckpt_name"] = tiny.CHECKPOINT
    positive = prompt[ids["CLIPTextEncode"][0]]["inputs"]
    positive["text"] = positive["text"].replace("ohwx person", f"{TRIGGER} cartoon boy")
    only("EmptyLatentImage").update(width=128, height=128, batch_size=4)
    only("KSampler")["steps"] = 4
    only("CharForgeLoadFaceModels")["pack"] = face_pack
    only("CharForgeBuildIdentity").update(name="pip_graph", folder=str(refs))
    only("CharForgeLoadClip")["model"] = tiny.CLIP_FOLDER
    only("CharForgeLoadVideoModel").update(
        base_model=f"[diffusers] {tiny.DIFFUSERS}", motion_module=tiny.MOTION_MODULE
    )
    generate = only("CharForgeGenerateVideo")
    generate.update(
        prompt=f"0: photo of {TRIGGER} cartoon boy\n4: {TRIGGER} cartoon boy smiling",
        frames=8,
        width=64,
        height=64,
        steps=2,
        context_length=8,
        context_overlap=2,
    )
    return prompt


def test_character_pipeline_graph_runs_in_one_queue(tmp_path, monkeypatch):
    from safetensors import safe_open

    from cf_testing.face_models import face_image, write_face_pack
    from charforge.driver.client import ComfyClient
    from charforge.engine import tiny
    from charforge.engine.video import read_video
    from charforge.recipes.pipeline import start_own_server

    comfy = real.comfyui_dir()
    python = real.comfyui_python(comfy)
    probe = "import av, diffusers, peft, cv2, onnxruntime, transformers, insightface"
    if subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        pytest.skip("ComfyUI's Python lacks the pack's requirements (pip install -r requirements.txt)")
    out = tmp_path / "out"
    said: list[str] = []
    monkeypatch.setenv("COMFYUI_PYTHON", python)
    server = start_own_server(comfy, out, said.append, port=real.free_port(PORTS))
    try:
        models = server.base_dir / "models"
        tiny.write_tiny_models(models, parts=("sd15", "motion", "tagger", "clip"))
        write_face_pack(models / "insightface", "tinyface")
        refs = tmp_path / "refs"
        refs.mkdir()
        for seed in range(3):
            Image.fromarray(face_image(person=0, noise=2, seed=seed)).save(refs / f"ref_{seed}.png")
        prompt = _tiny_prompt(refs, "tinyface")
        ids = _by_class(prompt)
        executed: list[str] = []
        with ComfyClient(server.url) as client:
            client.object_info(refresh=True)  # the models written after the start
            # The editor file, converted with the live server's node definitions, is the shipped API twin.
            editor = client.prepare(REPO_ROOT / "workflows" / "character_pipeline.json")
            assert editor.prompt == json.loads(WORKFLOW.read_text(encoding="utf-8"))
            prepared = client.prepare_run(prompt, preflight=True, upload=False)
            result = client.run(
                prepared.workflow,
                timeout=1800,
                on_event=lambda e: e.type == "executing" and e.node and executed.append(e.node),
            )
            downloads = client.download_outputs(result, out / "files", include_temp=True)
        texts = {v.node_id: "\n".join(str(t) for t in v.values.get("text") or []) for v in result.values}
        log = server.local.log_path.read_text(errors="replace")
    finally:
        server.local.stop()

    def text(class_type: str) -> str:
        (node_id,) = ids[class_type]
        return texts.get(node_id, "")

    # ComfyUI ran the training before anything that uses the LoRA (the STRING link orders them).
    (train,) = ids["CharForgeTrainLoRA"]
    for user in (
        ids["CharForgeLoadLoraByName"]
        + ids["KSampler"]
        + ids["CharForgeVideoLoRA"]
        + ids["CharForgeGenerateVideo"]
    ):
        assert executed.index(train) < executed.index(user), executed

    # Dataset report and captions
    report = Path(re.search(r"report: (\S+report\.html)", text("CharForgeDatasetReport")).group(1))
    assert report.is_file() and (report.parent / "report.json").is_file()
    accepted = json.loads((report.parent / "report.json").read_text())["counts"]["accepted"]
    exported = re.search(r"exported to (.+?) \(\d+ written", text("CharForgeExportDataset")).group(1)
    captions = sorted(Path(exported).glob("*.txt"))
    assert accepted >= 8 and len(captions) == accepted
    for caption in captions:
        words = caption.read_text().strip()
        assert words.startswith(f"{TRIGGER}, ") and len(words.split(", ")) > 2, words

    # The LoRA: written by Train LoRA, found by name, loaded by ComfyUI's own LoRA code with every key
    lora_name = re.search(r"^(\S+\.safetensors):", text("CharForgeTrainLoRA"), re.MULTILINE).group(1)
    assert lora_name == "pip_graph.safetensors"
    lora = server.base_dir / "models" / "loras" / lora_name
    with safe_open(str(lora), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert text("CharForgeLoadLoraByName") == f"{lora_name}: model 0.9, clip 0.9"  # no "NOT loaded" keys
    assert "lora key not loaded" not in log

    # Scores: CLIP for every candidate, identity built from the references, best of N kept
    assert re.search(r"mean \d\.\d+", text("CharForgeClipScore")), text("CharForgeClipScore")
    assert "from 3 reference(s)" in text("CharForgeBuildIdentity"), text("CharForgeBuildIdentity")
    assert text("CharForgeBestOfN")
    pngs = [d.path for d in downloads if d.path.suffix == ".png"]
    assert len([p for p in pngs if "pipeline_candidate" in p.name]) == 4
    assert len([p for p in pngs if "pipeline_best" in p.name]) == 1

    # The video with the trained LoRA, and its drift check
    videos = [d.path for d in downloads if d.path.suffix == ".mp4"]
    assert len(videos) == 1
    decoded = read_video(videos[0])
    assert (decoded.frame_count, decoded.width, decoded.height) == (8, 64, 64)
    assert text("CharForgeIdentityDrift")
    assert not [line for line in log.splitlines() if "Failed to validate prompt" in line]
