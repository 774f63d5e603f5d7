"""`charforge pipeline --captioner vlm`: the captions stage runs Caption Dataset, VLM with the base model's limit."""

import pytest

from cf_testing.comfyui import REPO_ROOT, load_script
from charforge.driver.workflow.preflight import nodes_to_run, preflight
from charforge.recipes.cli import build_parser
from charforge.recipes.pipeline import PipelineOptions
from charforge.recipes.pipeline.stages import load_stage_workflow, vlm_caption_node

build_api = load_script(REPO_ROOT / "workflows" / "build_api.py", "charforge_workflows_build_api")


@pytest.mark.parametrize(
    ("arch", "text_encoder", "max_tokens"),
    [("flux-dev", "t5", 511), ("flux-schnell", "t5", 255), ("sd35-large", "t5", 511), ("sdxl", "clip", 75)],
)
def test_vlm_caption_stage_fits_the_node_and_the_base_model(tmp_path, arch, text_encoder, max_tokens):
    opts = PipelineOptions(photos=tmp_path, character="Pip", class_tokens="cartoon boy", caption_model="joy")
    prompt = load_stage_workflow("caption_dataset")
    prompt["2"] = vlm_caption_node(opts, arch)
    info = build_api.object_info()
    assert preflight(prompt, info) == []  # every input declared, every value allowed
    assert set(nodes_to_run(prompt, info)) == set(prompt)
    inputs = prompt["2"]["inputs"]
    assert prompt["2"]["class_type"] == "CharForgeCaptionDatasetVLM"
    assert (inputs["text_encoder"], inputs["max_tokens"]) == (text_encoder, max_tokens)
    assert (inputs["trigger"], inputs["class_tokens"], inputs["model"]) == ("pip", "cartoon boy", "joy")
    assert prompt["3"]["inputs"]["dataset"] == ["2", 0]  # the export still reads the captioned dataset


def test_cli_options_choose_the_captioner():
    args = build_parser().parse_args(["pipeline", "photos", "--captioner", "vlm", "--caption-model", "qwen"])
    assert (args.captioner, args.caption_model) == ("vlm", "qwen")
    default = build_parser().parse_args(["pipeline", "photos"])
    assert default.captioner == "wd14" and PipelineOptions(photos=REPO_ROOT).captioner == "wd14"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pipeline", "photos", "--captioner", "blip"])
