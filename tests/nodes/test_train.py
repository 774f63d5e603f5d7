"""The Train LoRA node inside the ComfyUI stand-in: outputs, progress, interrupt + resume, the runs route."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from cf_testing.comfyui import run_node
from cf_testing.model_fixtures import train_inputs

# diffusers' Euler scheduler (sample images) trips a numpy 2 deprecation; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),  # cf_testing/threads.py
]


def test_node_trains_reports_progress_and_interrupts_then_resumes(train_env):
    from charforge import bridge
    from charforge.nodes.train import TrainLoRA, runs_directory

    assert "[diffusers] tiny_sd15" in TrainLoRA.INPUT_TYPES()["required"]["base_model"][0]

    # Press Cancel while step 2 is reported: ComfyUI's hook raises at the next progress update.
    original = train_env.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, prompt_id=None, node_id=None):
        original(value, total, preview, prompt_id=prompt_id, node_id=node_id)
        if value == 2:
            train_env.interrupt()

    train_env.utils.set_progress_bar_global_hook(hook)
    # ComfyUI's executor runs every node under inference mode; training must still get gradients.
    with pytest.raises(train_env.model_management.InterruptProcessingException), torch.inference_mode():
        run_node(TrainLoRA, node_id="7", **train_inputs())
    status = json.loads((Path(runs_directory()) / "alice" / "status.json").read_text())
    assert status["state"] == "cancelled" and status["state_step"] == 2
    assert [c.value for c in train_env.progress] == [1, 2] and train_env.progress[0].node_id == "7"
    assert "alice.safetensors" not in bridge.list_models("loras")

    # Queued again: resumes at step 2 and finishes.
    train_env.utils.set_progress_bar_global_hook(original)
    train_env.progress.clear()
    with torch.inference_mode():
        out = run_node(TrainLoRA, node_id="7", **train_inputs())
    lora_name, run, loss_curve, samples = out.result
    assert lora_name == "alice.safetensors" and lora_name in bridge.list_models("loras")
    assert run.step == 4 and run.state == "completed" and run.lora_name == lora_name
    assert [c.value for c in train_env.progress] == [3, 4]
    assert loss_curve.shape == (1, 384, 768, 3) and samples.shape == (1, 64, 64, 3)
    assert "resumed at step 2" in out.ui["text"][0]
    assert {"filename": "loss.png", "subfolder": "charforge/train_runs/alice", "type": "output"} in out.ui[
        "images"
    ]
    events = [data for event, data, _ in train_env.server.messages if event == "charforge.train.progress"]
    assert events and events[-1]["phase"] == "done" and all(e["run"] == "alice" for e in events)
    assert any(e.get("phase") == "training" and "eta_seconds" in e for e in events)


def test_node_takes_a_dataset_manifest(train_env):
    manifest_module = pytest.importorskip("charforge.engine.dataset.manifest")
    from charforge import bridge
    from charforge.nodes.train import TrainLoRA

    folder = Path(bridge.input_directory()) / "img" / "3_sks person"
    entries = [
        manifest_module.ImageEntry(id=p.stem, source=str(p), file=str(p), caption="sks person")
        for p in sorted(folder.glob("*.png"))
    ]
    manifest = manifest_module.DatasetManifest(name="ds", folder=str(folder.parent), entries=entries)
    out = run_node(
        TrainLoRA, **train_inputs(dataset=manifest, dataset_folder="", output_name="from manifest", steps=1)
    )
    assert out.result[0] == "from_manifest.safetensors"


def test_tokenizer_is_looked_for_in_comfyui(comfy_env):
    from charforge.nodes.train import comfyui_tokenizer_dirs

    [folder] = comfyui_tokenizer_dirs()  # next to the running ComfyUI's `comfy` package
    assert folder.endswith("comfy/sd1_tokenizer") and "comfy_stubs" in folder


def test_node_errors_are_actionable(train_env):
    from charforge.nodes.train import TrainLoRA

    with pytest.raises(ValueError, match="no training data"):
        run_node(TrainLoRA, **train_inputs(dataset_folder=""))
    with pytest.raises(ValueError, match="JSON object"):
        run_node(TrainLoRA, **train_inputs(overrides="rank=4"))
    with pytest.raises(ValueError, match="unknown training setting"):
        run_node(TrainLoRA, **train_inputs(overrides='{"rnak": 4}'))


def test_runs_route(train_env):
    from charforge.engine.train.run import RunFolder
    from charforge.nodes.train import register_routes, runs_directory

    assert register_routes()
    assert register_routes()  # once per server
    routes = [(m, p, h) for m, p, h in train_env.server.routes.registered if p == "/charforge/runs"]
    assert len(routes) == 1 and routes[0][0] == "GET"
    folder = RunFolder.create(runs_directory(), "bob")
    folder.update_status(state="running", step=5, total_steps=10, loss=0.1, eta_seconds=3.0)

    response = asyncio.run(routes[0][2](None))
    body = json.loads(response.body)
    [run] = body["runs"]
    # Nobody in this process trains "bob" but its status is fresh: still reported as running.
    assert (run["name"], run["state"], run["step"], run["total_steps"]) == ("bob", "running", 5, 10)
    status = json.loads(folder.status_path.read_text())
    status["updated_at"] = 0
    folder.status_path.write_text(json.dumps(status))
    [stale] = json.loads(asyncio.run(routes[0][2](None)).body)["runs"]
    assert stale["state"] == "failed" and "resume" in stale["error"]
