"""Workflow loading (format detection), overrides and input uploads, preflight."""

from __future__ import annotations

import json

import pytest
from fakes.comfy_server import FakeComfyServer, image_workflow, png_bytes, sampler_workflow

from charforge.driver.errors import OverrideError, ValidationError, WorkflowError
from charforge.driver.workflow.load import load_workflow, workflow_from_data
from charforge.driver.workflow.overrides import apply_overrides, parse_set, parse_value
from charforge.driver.workflow.preflight import check_workflow, preflight


@pytest.fixture(scope="module")
def object_info():
    server = FakeComfyServer()
    try:
        yield {name: node.object_info(server) for name, node in server.nodes.items()}
    finally:
        server.stop()


# ---- loading ---------------------------------------------------------------------------------------------


def test_detects_api_ui_and_wrapped_formats(tmp_path):
    api = image_workflow()
    assert workflow_from_data(api).format == "api"
    ui = {"nodes": [], "links": [], "version": 0.4}
    wf = workflow_from_data(ui)
    assert wf.format == "ui" and wf.prompt is None and wf.ui is ui
    wrapped = workflow_from_data({"prompt": api, "extra_data": {"extra_pnginfo": {"workflow": ui}}})
    assert wrapped.prompt == api and wrapped.ui == ui
    front = workflow_from_data({"output": api, "workflow": ui})
    assert front.prompt == api and front.ui == ui
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow"):
        workflow_from_data({"3": {"inputs": {}}})
    bad = tmp_path / "bad.json"
    bad.write_text('{"3": ')
    with pytest.raises(WorkflowError, match="not valid JSON"):
        load_workflow(bad)
    with pytest.raises(WorkflowError, match="not found"):
        load_workflow(tmp_path / "missing.json")


def test_loads_a_png_saved_by_comfyui(tmp_path):
    api = image_workflow()
    ui = {"nodes": [{"id": 1}], "links": []}
    path = tmp_path / "out.png"
    path.write_bytes(png_bytes(2, 2, (0, 0, 0), {"prompt": json.dumps(api), "workflow": json.dumps(ui)}))
    wf = load_workflow(path)
    assert wf.format == "png" and wf.prompt == api and wf.ui == ui


# ---- overrides ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("-3", -3),
        ("0.5", 0.5),
        ("1e3", 1000.0),
        ("true", True),
        ("False", False),
        ("null", None),
        ("[1, 2]", [1, 2]),
        ('{"a": 1}', {"a": 1}),
        ('"12"', "12"),
        ("a cat, 4k", "a cat, 4k"),
        ("[cat]", "[cat]"),
    ],
)
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_parse_set_allows_dots_in_titles():
    ov = parse_set("Load Image v1.2.image=face.png")
    assert (ov.node, ov.input, ov.value) == ("Load Image v1.2", "image", "face.png")
    ov = parse_set("6.text=a=b")
    assert (ov.node, ov.input, ov.value) == ("6", "text", "a=b")
    for bad in ("noequals", "nodot=1", ".x=1", "3.=1"):
        with pytest.raises(OverrideError):
            parse_set(bad)


def test_override_by_id_title_and_unique_class(object_info):
    prompt = sampler_workflow()
    new, applied = apply_overrides(
        prompt,
        [
            parse_set("3.seed=7"),
            parse_set("Positive.text=a dog"),
            parse_set("EmptyLatentImage.width=768"),
            parse_set("KSampler.cfg=5"),
            parse_set("Negative.text=123"),
        ],
        object_info,
    )
    assert new["3"]["inputs"]["seed"] == 7
    assert new["6"]["inputs"]["text"] == "a dog"
    assert new["5"]["inputs"]["width"] == 768
    assert new["3"]["inputs"]["cfg"] == 5.0 and isinstance(new["3"]["inputs"]["cfg"], float)
    assert new["7"]["inputs"]["text"] == "123"  # typed by the schema: STRING stays text
    assert prompt["3"]["inputs"]["seed"] == 1  # the original is untouched
    assert applied[0].previous == 1 and applied[0].class_type == "KSampler" and applied[1].node_id == "6"


def test_override_errors_list_candidates(object_info):
    prompt = sampler_workflow()
    with pytest.raises(OverrideError) as info:
        apply_overrides(prompt, [parse_set("CLIPTextEncode.text=x")], object_info)
    assert "2 nodes have class 'CLIPTextEncode'" in str(info.value)
    assert '6 "Positive" (CLIPTextEncode)' in str(info.value) and '7 "Negative"' in str(info.value)
    with pytest.raises(OverrideError) as info:
        apply_overrides(prompt, [parse_set("KSampelr.seed=1")], object_info)
    assert "did you mean 'KSampler'" in str(info.value)
    with pytest.raises(OverrideError) as info:
        apply_overrides(prompt, [parse_set("KSampler.sede=1")], object_info)
    assert "has no input 'sede'" in str(info.value) and "did you mean seed" in str(info.value)
    with pytest.raises(OverrideError, match="expects an integer"):
        apply_overrides(prompt, [parse_set("KSampler.steps=many")], object_info)
    twins = {
        "1": {"class_type": "EmptyImage", "inputs": {}, "_meta": {"title": "Same"}},
        "2": {"class_type": "EmptyImage", "inputs": {}, "_meta": {"title": "Same"}},
    }
    with pytest.raises(OverrideError, match="2 nodes are titled 'Same'"):
        apply_overrides(twins, [parse_set("Same.width=1")], object_info)


def test_override_values_lists_and_links(object_info):
    prompt = sampler_workflow()
    new, applied = apply_overrides(
        prompt, [parse_set("Positive.clip=[1, 2]"), parse_set("VAE Decode.vae=null")], None
    )
    assert new["6"]["inputs"]["clip"] == {"__value__": [1, 2]}  # a literal list is never read as a link
    assert applied[0].previous == {"link": ["4", 1]}
    assert new["8"]["inputs"]["vae"] is None


def test_override_a_new_optional_input_needs_the_schema(object_info):
    wf = {"1": {"class_type": "CF_Wait", "inputs": {"seconds": 1.0}}}
    new, _ = apply_overrides(wf, [parse_set("CF_Wait.steps=3")], object_info)
    assert new["1"]["inputs"]["steps"] == 3
    with pytest.raises(OverrideError, match="has no input 'steps' in this workflow"):
        apply_overrides(wf, [parse_set("CF_Wait.steps=3")], None)


def test_input_files_are_uploaded_and_wired(client, fake_comfy, tmp_path):
    face = tmp_path / "face.png"
    face.write_bytes(png_bytes(3, 3, (1, 2, 3)))
    other = tmp_path / "other.png"
    other.write_bytes(png_bytes(3, 3, (9, 9, 9)))
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Face"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Style"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "b"}},
    }
    prepared = client.prepare_run(wf, inputs=[f"Face={face}"], sets=[f"Style.image={other}"])
    assert prepared.prompt["1"]["inputs"]["image"] == "face.png"
    assert prepared.prompt["2"]["inputs"]["image"] == "other.png"
    assert (fake_comfy.input_dir / "face.png").read_bytes() == face.read_bytes()
    assert {u["uploaded_as"] for u in prepared.uploads} == {"face.png", "other.png"}
    assert prepared.applied[0].uploaded_from == str(other)
    result = client.run(prepared.workflow, timeout=10)
    assert len(result.files) == 2
    with pytest.raises(OverrideError, match="file not found"):
        client.prepare_run(wf, inputs=[f"Face={tmp_path / 'nope.png'}"])


# ---- preflight ---------------------------------------------------------------------------------------------


def test_preflight_accepts_good_workflows(object_info):
    assert preflight(sampler_workflow(), object_info) == []
    assert preflight(image_workflow(), object_info) == []


def test_preflight_reports_what_the_server_would_and_more(object_info):
    wf = sampler_workflow()
    wf["10"] = {"class_type": "ADE_AnimateDiffLoaderGen1", "inputs": {}, "_meta": {"title": "AnimateDiff"}}
    wf["3"]["inputs"]["steps"] = 0  # below min
    wf["3"]["inputs"]["sampler_name"] = "eulr"  # not in list
    wf["3"]["inputs"]["cfg"] = "high"  # not a number
    del wf["3"]["inputs"]["negative"]  # required link missing
    wf["8"]["inputs"]["vae"] = ["4", 1]  # CLIP into VAE
    wf["5"]["inputs"]["width"] = {"__value__": [1]}
    with pytest.raises(ValidationError) as info:
        check_workflow(wf, object_info)
    err = info.value
    text = str(err)
    assert err.source == "preflight" and "nothing was queued" in text
    assert "node class 'ADE_AnimateDiffLoaderGen1' is not installed" in text and "custom-node pack" in text
    assert "steps: 0 is below the minimum 1" in text
    assert "sampler_name: 'eulr' is not one of the allowed values; did you mean 'euler'" in text
    assert "cfg: 'high' is not a number" in text
    assert "negative: required input is missing (connect a CONDITIONING output to it)" in text
    assert "vae: connected to node 4 output 1 of type CLIP, but the input takes VAE" in text
    assert "width: [1] is not an integer" in text
    kinds = {p.kind for p in err.problems}
    assert {
        "missing_node_class",
        "value_smaller_than_min",
        "value_not_in_list",
        "required_input_missing",
        "return_type_mismatch",
        "invalid_input_type",
    } <= kinds
    assert [p.node_id for p in err.problems] == sorted((p.node_id for p in err.problems), key=int)


def test_preflight_dangling_and_malformed_links(object_info):
    wf = image_workflow()
    wf["3"]["inputs"]["images"] = ["99", 0]
    wf["2"]["inputs"]["image"] = ["1", 5]
    problems = preflight(wf, object_info)
    assert [str(p) for p in problems] == [
        'node 3 "Save" (SaveImage): images: links to node 99, which is not in the workflow'
    ]
    wf["3"]["inputs"]["images"] = ["2", 0]
    problems = preflight(wf, object_info)
    assert "links to output 5 of node 1 (EmptyImage), which has 1 output(s)" in problems[0].message
    wf["2"]["inputs"]["image"] = ["1", 0, 1]
    assert "bad link" in preflight(wf, object_info)[0].message


def test_preflight_only_checks_what_runs_and_warns_on_unchecked(object_info):
    wf = image_workflow()
    wf["7"] = {"class_type": "EmptyImage", "inputs": {"width": -1}}  # not connected to an output: ignored
    wf["8"] = {"class_type": "CF_Mode", "inputs": {"mode": "fastt", "value": "x"}}
    wf["9"] = {"class_type": "CF_ShowText", "inputs": {"text": ["8", 0]}}
    wf["3"]["inputs"]["filename_prefx"] = "x"
    problems = check_workflow(wf, object_info)  # warnings only: no exception
    assert all(p.severity == "warning" for p in problems)
    messages = [str(p) for p in problems]
    assert any("'fastt' is not one of the listed options" in m and "'fast'" in m for m in messages)
    assert any("has no input 'filename_prefx'" in m and "filename_prefix" in m for m in messages)
    assert not any(p.node_id == "7" for p in problems)


def test_preflight_missing_upload_file_and_no_outputs(object_info):
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    problems = preflight(wf, object_info)
    assert (
        len(problems) == 1
        and "not in the server's input folder; upload it with --input" in problems[0].message
    )
    wf["1"]["inputs"]["image"] = "sub/face.png"  # only the server's own check can tell
    assert preflight(wf, object_info) == []
    lonely = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}}
    }
    assert "no output node" in preflight(lonely, object_info)[0].message
