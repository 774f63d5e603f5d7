"""A trial finds its LoRA and run folder in the Train LoRA text of its training job's manifest (the driver's
parser, the same one batches bring LoRAs home with)."""

from __future__ import annotations

import json

from charforge.recipes.tune.trials import lora_from_outputs


def _manifest(folder, text):
    values = {"7": {"class_type": "CharForgeTrainLoRA", "text": [text]}}
    (folder / "manifest.json").write_text(json.dumps({"files": [], "values": values}))


def test_lora_and_run_folder_from_the_train_text(tmp_path):
    _manifest(
        tmp_path,
        "study_t3.safetensors: 40 steps, final loss 0.1; run folder /srv/out/charforge/train_runs/study_t3_r; "
        "preset 'sd15'",
    )
    assert lora_from_outputs(tmp_path, "study_t3") == ("study_t3.safetensors", "study_t3_r")


def test_a_windows_server_path_gives_the_run_folder_name(tmp_path):
    _manifest(
        tmp_path,
        r"a.safetensors: 4 steps, final loss 0.2; run folder C:\comfy\output\charforge\train_runs\a_2",
    )
    assert lora_from_outputs(tmp_path, "a") == ("a.safetensors", "a_2")


def test_without_a_train_text_the_output_name_is_assumed(tmp_path):
    _manifest(tmp_path, "not a summary")
    assert lora_from_outputs(tmp_path, "b") == ("b.safetensors", "b")
