"""What the Train LoRA node leaves for the panel: origin.json (the prompt to queue again, the workflow, the
prompt id) and the run's details as the panel reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cf_testing.comfyui import run_node
from cf_testing.model_fixtures import train_inputs

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]


INPUTS = train_inputs(
    steps=2,
    use_preset_values=False,
    overrides=json.dumps({"sample_steps": 1, "mixed_precision": "no", "bucket_step": 32, "min_bucket": 32}),
)


def test_the_node_records_its_prompt_for_the_panel(train_env):
    from charforge.engine.train.run import RunFolder, run_details
    from charforge.nodes.train import TrainLoRA, runs_directory

    prompt = {"1": {"class_type": "CharForgeTrainLoRA", "inputs": dict(INPUTS)}}
    workflow = {"nodes": [{"id": 1, "type": "CharForgeTrainLoRA"}]}
    run_node(TrainLoRA, prompt=prompt, extra_pnginfo={"workflow": workflow}, **INPUTS)

    folder = RunFolder(Path(runs_directory()) / "alice")
    origin = folder.read_origin()
    assert origin["prompt"] == prompt and origin["workflow"] == workflow and origin["node"] == "1"
    details = run_details(folder)
    assert details["state"] == "completed" and details["can_queue_again"]
    assert [m["step"] for m in details["metrics"]] == [1, 2]
    assert details["samples"] == [{"step": 2, "files": ["samples/step_000002_0.png"]}]


def test_no_origin_without_a_prompt(train_env):
    from charforge.engine.train.run import RunFolder, run_details
    from charforge.nodes.train import TrainLoRA, runs_directory

    run_node(TrainLoRA, **INPUTS)  # the stand-in passes an empty prompt, as a script calling the node would
    folder = RunFolder(Path(runs_directory()) / "alice")
    assert not folder.origin_path.exists() and not run_details(folder)["can_queue_again"]
