"""Editor (UI) workflow -> API format conversion."""

from __future__ import annotations

import copy
import json
import random

import pytest
from fakes.comfy_server import FakeComfyServer
from fakes.ui_workflows import classic, node

from charforge.driver.errors import ConversionError
from charforge.driver.workflow.convert import convert_workflow, expand_dynamic_prompt, map_widgets
from charforge.driver.workflow.preflight import preflight


@pytest.fixture(scope="module")
def object_info():
    server = FakeComfyServer()
    try:
        info = {name: node.object_info(server) for name, node in server.nodes.items()}
    finally:
        server.stop()
    # A V3-style node whose seed declares no control widget, and one with a list-valued widget.
    info["NoControlSeed"] = {
        "input": {
            "required": {
                "seed": ["INT", {"default": 0, "control_after_generate": False}],
                "steps": ["INT", {"default": 1}],
            }
        },
        "input_order": {"required": ["seed", "steps"]},
        "output": ["INT"],
        "output_node": False,
        "display_name": "No control seed",
    }
    info["Tags"] = {
        "input": {
            "required": {
                "tags": ["COMBO", {"options": ["a", "b", "c"], "multi_select": True}],
                "images": ["IMAGE"],
            }
        },
        "input_order": {"required": ["tags", "images"]},
        "output": [],
        "output_node": True,
        "display_name": "Tags",
    }
    return info


def test_classic_workflow_with_seed_control_value(object_info):
    prompt = convert_workflow(classic(), object_info)
    assert set(prompt) == {"3", "4", "5", "6", "7", "8", "9"}  # the Note is gone
    assert prompt["3"] == {
        "class_type": "KSampler",
        "_meta": {"title": "KSampler"},
        "inputs": {
            "seed": 156680208700286,
            "steps": 20,
            "cfg": 8,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    }
    assert prompt["5"]["inputs"] == {"width": 512, "height": 512, "batch_size": 1}
    assert prompt["4"]["_meta"]["title"] == "Load Checkpoint"
    assert prompt["6"]["inputs"]["text"] == "a cat \n"  # dynamic prompt comment removed
    assert prompt["8"]["inputs"] == {"samples": ["3", 0], "vae": ["4", 2]}
    assert preflight(prompt, object_info) == []


def test_converted_widget_link_wins_over_its_saved_value(object_info):
    wf = classic()
    wf["nodes"].append(node(11, "CF_Wait", outputs=[("FLOAT", "FLOAT", [10])], widgets=[2.5, 4]))
    ks = next(n for n in wf["nodes"] if n["id"] == 3)
    ks["inputs"].append({"name": "cfg", "type": "FLOAT", "link": 10, "widget": {"name": "cfg"}})
    wf["links"].append([10, 11, 0, 3, 4, "FLOAT"])
    prompt = convert_workflow(wf, object_info)
    assert prompt["3"]["inputs"]["cfg"] == ["11", 0]
    assert prompt["3"]["inputs"]["steps"] == 20  # later widgets did not shift
    assert prompt["11"]["inputs"] == {"seconds": 2.5, "steps": 4}


def test_reroutes_are_followed(object_info):
    wf = classic()
    # VAE goes 4 -> reroute 20 -> reroute 21 -> VAEDecode
    wf["links"] = [lk for lk in wf["links"] if lk[0] != 8]
    wf["links"] += [[20, 4, 2, 20, 0, "*"], [21, 20, 0, 21, 0, "VAE"], [8, 21, 0, 8, 1, "VAE"]]
    wf["nodes"] += [
        node(20, "Reroute", inputs=[("", "*", 20)], outputs=[("", "VAE")]),
        node(21, "Reroute", inputs=[("", "*", 21)], outputs=[("", "VAE")]),
    ]
    prompt = convert_workflow(wf, object_info)
    assert prompt["8"]["inputs"]["vae"] == ["4", 2]
    assert "20" not in prompt and "21" not in prompt


def test_primitive_node_value_is_inlined(object_info):
    wf = classic()
    wf["nodes"].append(
        node(12, "PrimitiveNode", outputs=[("INT", "INT", [12])], widgets=[777, "fixed"], title="Seed")
    )
    ks = next(n for n in wf["nodes"] if n["id"] == 3)
    ks["inputs"].append({"name": "seed", "type": "INT", "link": 12, "widget": {"name": "seed"}})
    wf["links"].append([12, 12, 0, 3, 4, "INT"])
    prompt = convert_workflow(wf, object_info)
    assert prompt["3"]["inputs"]["seed"] == 777
    assert "12" not in prompt


def test_muted_nodes_are_dropped_and_bypassed_nodes_wired_through(object_info):
    wf = {
        "nodes": [
            node(1, "EmptyImage", outputs=[("IMAGE", "IMAGE")], widgets=[64, 64, 1, 0]),
            node(
                2,
                "ImageScale",
                inputs=[("image", "IMAGE", 1)],
                outputs=[("IMAGE", "IMAGE")],
                widgets=["nearest-exact", 32, 32, "disabled"],
                mode=4,
            ),
            node(3, "SaveImage", inputs=[("images", "IMAGE", 2)], widgets=["out"]),
            node(4, "PreviewImage", inputs=[("images", "IMAGE", 3)], mode=2),
            node(
                5,
                "ImageScale",
                inputs=[("image", "IMAGE", 4)],
                outputs=[("IMAGE", "IMAGE")],
                widgets=["bilinear", 8, 8, "center"],
                mode=2,
            ),
            node(6, "SaveImage", inputs=[("images", "IMAGE", 5)], widgets=["after-muted"]),
        ],
        "links": [
            [1, 1, 0, 2, 0, "IMAGE"],
            [2, 2, 0, 3, 0, "IMAGE"],
            [3, 1, 0, 4, 0, "IMAGE"],
            [4, 1, 0, 5, 0, "IMAGE"],
            [5, 5, 0, 6, 0, "IMAGE"],
        ],
        "version": 0.4,
    }
    prompt = convert_workflow(wf, object_info)
    assert set(prompt) == {"1", "3", "6"}
    assert prompt["3"]["inputs"] == {"filename_prefix": "out", "images": ["1", 0]}
    assert prompt["6"]["inputs"] == {"filename_prefix": "after-muted"}  # its source was muted


def test_bypass_picks_the_input_of_the_matching_type(object_info):
    wf = {
        "nodes": [
            node(
                1,
                "CheckpointLoaderSimple",
                outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
                widgets=["v1-5-pruned-emaonly.safetensors"],
            ),
            node(
                2,
                "LoraLoaderLike",
                inputs=[("model", "MODEL", 1), ("clip", "CLIP", 2)],
                outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP")],
                widgets=["x.safetensors", 1, 1],
                mode=4,
            ),
            node(
                3,
                "CLIPTextEncode",
                inputs=[("clip", "CLIP", 3)],
                outputs=[("CONDITIONING", "CONDITIONING")],
                widgets=["hi"],
            ),
            node(4, "CF_ShowText", inputs=[("text", "STRING", None)], widgets=[]),
        ],
        "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 2, 1, "CLIP"], [3, 2, 1, 3, 0, "CLIP"]],
        "version": 0.4,
    }
    prompt = convert_workflow(wf, object_info)  # the bypassed class need not be installed
    assert prompt["3"]["inputs"]["clip"] == ["1", 1]


def _subgraph_workflow():
    sub_id = "0d9c3b8e-8a1e-4d0b-9b7e-1c2d3e4f5a6b"
    definition = {
        "id": sub_id,
        "revision": 0,
        "name": "Resize block",
        "version": 1,
        "state": {},
        "inputNode": {"id": -10, "bounding": [0, 0, 10, 10]},
        "outputNode": {"id": -20, "bounding": [0, 0, 10, 10]},
        "inputs": [
            {"id": "a1", "name": "image", "type": "IMAGE", "linkIds": [1]},
            {"id": "a2", "name": "width", "type": "INT", "linkIds": [3]},
        ],
        "outputs": [{"id": "b1", "name": "IMAGE", "type": "IMAGE", "linkIds": [2]}],
        "widgets": [],
        "nodes": [
            node(
                1,
                "ImageScale",
                inputs=[("image", "IMAGE", 1), ("width", "INT", 3, "width")],
                outputs=[("IMAGE", "IMAGE")],
                widgets=["bilinear", 64, 48, "disabled"],
                title="Inner scale",
            )
        ],
        "links": [
            {"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "IMAGE"},
            {"id": 3, "origin_id": -10, "origin_slot": 1, "target_id": 1, "target_slot": 1, "type": "INT"},
            {"id": 2, "origin_id": 1, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "IMAGE"},
        ],
    }
    instance = node(
        10,
        sub_id,
        inputs=[("image", "IMAGE", 11), ("width", "INT", None, "width")],
        outputs=[("IMAGE", "IMAGE")],
        widgets=[24],
        title="Resize block",
    )
    return {
        "version": 0.4,
        "last_node_id": 12,
        "last_link_id": 12,
        "nodes": [
            node(5, "EmptyImage", outputs=[("IMAGE", "IMAGE")], widgets=[16, 16, 1, 255]),
            instance,
            node(12, "SaveImage", inputs=[("images", "IMAGE", 12)], widgets=["sub"]),
        ],
        "links": [[11, 5, 0, 10, 0, "IMAGE"], [12, 10, 0, 12, 0, "IMAGE"]],
        "definitions": {"subgraphs": [definition]},
    }


def test_subgraph_is_expanded_with_execution_ids(object_info):
    prompt = convert_workflow(_subgraph_workflow(), object_info)
    assert set(prompt) == {"5", "10:1", "12"}
    inner = prompt["10:1"]
    assert inner["class_type"] == "ImageScale" and inner["_meta"]["title"] == "Inner scale"
    assert inner["inputs"]["image"] == ["5", 0]
    assert inner["inputs"]["width"] == 24  # promoted widget value from the instance
    assert inner["inputs"]["height"] == 48
    assert prompt["12"]["inputs"]["images"] == ["10:1", 0]
    assert preflight(prompt, object_info) == []


def test_bypassed_subgraph_is_wired_through(object_info):
    wf = _subgraph_workflow()
    wf["nodes"][1]["mode"] = 4
    prompt = convert_workflow(wf, object_info)
    assert set(prompt) == {"5", "12"}
    assert prompt["12"]["inputs"]["images"] == ["5", 0]


def test_upload_value_list_widgets_force_input_and_legacy_seed(object_info):
    wf = {
        "version": 0.4,
        "nodes": [
            node(
                1,
                "LoadImage",
                outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                widgets=["example.png", "image"],
            ),
            node(2, "Tags", inputs=[("images", "IMAGE", 1)], widgets=[["a", "c"]]),
            node(
                3, "CF_ShowText", inputs=[("text", "STRING", None)], widgets=[0.5]
            ),  # forceInput text owns no slot
            node(4, "NoControlSeed", outputs=[("INT", "INT")], widgets=[5, 6]),
        ],
        "links": [[1, 1, 0, 2, 1, "IMAGE"]],
    }
    prompt = convert_workflow(wf, object_info)
    assert prompt["1"]["inputs"] == {"image": "example.png"}
    assert prompt["2"]["inputs"] == {"tags": {"__value__": ["a", "c"]}, "images": ["1", 0]}
    assert prompt["3"]["inputs"] == {"number": 0.5}
    assert prompt["4"]["inputs"] == {"seed": 5, "steps": 6}


def test_map_widgets_is_positional_like_the_editor(object_info):
    info = copy.deepcopy(object_info["KSampler"])
    del info["input"]["required"]["seed"][1]["control_after_generate"]
    info["input"]["required"]["noise"] = ["INT", {"default": 0}]
    info["input_order"]["required"].insert(2, "noise")
    # seed is a legacy name (control slot expected); "noise" declares none, so a stray value after it
    # shifts the rest exactly as the editor shifts it (preflight then flags steps="randomize").
    named = map_widgets(info, [1, "fixed", 7, "randomize", 20, 8.0, "euler", "normal", 1.0])
    assert named["seed"] == 1 and named["noise"] == 7 and named["steps"] == "randomize" and named["cfg"] == 20
    # Old files store `true` in the control slot; it is skipped like any control value.
    info = copy.deepcopy(object_info["KSampler"])
    named = map_widgets(info, [5, True, 20, 8.0, "euler", "normal", 1.0])
    assert named == {
        "seed": 5,
        "steps": 20,
        "cfg": 8.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "denoise": 1.0,
    }
    # Widgets the file has no value for (a newer node definition) get their defaults.
    assert (
        map_widgets(info, [5, "fixed", 30])["denoise"] == info["input"]["required"]["denoise"][1]["default"]
    )
    assert map_widgets(info, {"steps": 3, "bogus": 1})["steps"] == 3


def test_unknown_classes_and_group_nodes_are_reported(object_info):
    wf = classic()
    wf["nodes"].append(node(30, "ADE_AnimateDiffLoaderGen1", widgets=["mm_sd15_v3.safetensors"]))
    with pytest.raises(ConversionError, match=r"node 30 \(ADE_AnimateDiffLoaderGen1\)"):
        convert_workflow(wf, object_info)
    wf["nodes"][-1]["mode"] = 2  # muted: no longer needed
    assert "30" not in convert_workflow(wf, object_info)
    wf["nodes"].append(node(31, "workflow>My group"))
    with pytest.raises(ConversionError, match="legacy group nodes"):
        convert_workflow(wf, object_info)


def test_dynamic_prompts():
    rng = random.Random(1)
    seen = {expand_dynamic_prompt("a {red|green|blue} {cat|dog}", rng) for _ in range(60)}
    assert len(seen) > 3 and all(s.startswith("a ") for s in seen)
    assert expand_dynamic_prompt(r"keep \{this\} /* drop */ x", rng) == "keep {this}  x"
    assert expand_dynamic_prompt("{a|{b|b}}", random.Random(0)) in {"a", "b"}


def test_converted_workflow_runs_and_embeds_the_editor_workflow(client, fake_comfy):
    wf = classic()
    result = client.run(wf, timeout=10)
    post = next(r for r in fake_comfy.requests if r.path == "/prompt")
    assert post.body["extra_data"]["extra_pnginfo"]["workflow"]["nodes"][0]["id"] == 4
    assert post.body["prompt"]["3"]["inputs"]["seed"] == 156680208700286
    assert result.files
    saved = (fake_comfy.output_dir / result.files[0].filename).read_bytes()
    assert b"workflow" in saved and json.dumps(wf["nodes"][0]["widgets_values"]).encode()[:10] in saved
