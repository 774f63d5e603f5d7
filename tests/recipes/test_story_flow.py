"""``charforge story`` on FLUX.1 and SD3.5 bases (issue 18): the frame graph uses the family's loaders and
sampling nodes, validated against the node definitions recorded from a real ComfyUI 0.3.64 and CharForge's own."""

from __future__ import annotations

from typing import Any

import pytest

from cf_testing.comfyui import accepting, build_api
from charforge.common.characters import family_generation
from charforge.driver.errors import UsageError
from charforge.driver.workflow.preflight import preflight
from charforge.recipes import story, story_flow
from charforge.recipes.pipeline.families import FamilyFiles


@pytest.fixture(scope="module")
def recorded_info() -> dict[str, Any]:
    return build_api().object_info()


def _accepting(info: dict[str, Any], prompt: dict[str, Any]) -> dict[str, Any]:
    """The recorded definitions with the graph's model files and saved names in the loaders' lists."""
    return accepting(info, prompt, extra=(("CharForgeLoadIdentity", "name"),))


FLUX = story_flow.FlowBase(
    "flux-dev",
    "diffusion_models",
    FamilyFiles(
        {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8.safetensors"}, "ae.safetensors"
    ),
)
SD35 = story_flow.FlowBase(
    "sd35-large",
    "checkpoints",
    FamilyFiles(
        {
            "clip_name1": "clip_l.safetensors",
            "clip_name2": "clip_g.safetensors",
            "clip_name3": "t5xxl_fp16.safetensors",
        }
    ),
)


def _graph(base: story_flow.FlowBase, **kw) -> dict[str, Any]:
    character = story.Character(
        name="alice",
        trigger="alice_cf",
        loras=[("alice_flux.safetensors", 0.9), ("grain.safetensors", 0.3, 0.1)],
        generation=family_generation(base.family),
        base_model=base.family,
    )
    return story.frame_graph(
        character=character,
        checkpoint="flux1-dev.safetensors" if base.kind == "flux" else "sd3.5_large.safetensors",
        prompt="alice_cf at the harbour",
        seed=7,
        candidates=3,
        mode="simple",
        identity={"name": "alice"},
        face_pack="buffalo_l",
        clip_model=None,
        weights=(1.0, 0.5),
        frame=1,
        save_prefix="charforge_story/x/simple/frame_01",
        flow=base,
        **kw,
    )


def _by_class(graph: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node_id, node in graph.items():
        out.setdefault(node["class_type"], []).append(node_id)
    return out


@pytest.mark.parametrize("base", [FLUX, SD35], ids=["flux", "sd35"])
def test_a_frame_on_flux_or_sd35_loads_the_familys_files_and_samples_with_its_settings(base, recorded_info):
    graph = _graph(base)
    assert preflight(graph, _accepting(recorded_info, graph)) == []
    ids = _by_class(graph)
    gen = family_generation(base.family)
    assert "LoraLoader" not in ids and "EmptyLatentImage" not in ids
    # Both LoRAs on the diffusion model, in order, then the sampling shift, then the sampler.
    first, second = ids["LoraLoaderModelOnly"]
    assert graph[first]["inputs"]["model"] == ["1", 0] and graph[second]["inputs"]["model"] == [first, 0]
    assert [graph[n]["inputs"]["strength_model"] for n in (first, second)] == [0.9, 0.3]
    (sampler,) = ids["KSampler"]
    shift = graph[sampler]["inputs"]["model"][0]
    assert graph[shift]["inputs"]["model"] == [second, 0]
    inputs = graph[sampler]["inputs"]
    assert (inputs["steps"], inputs["cfg"], inputs["sampler_name"], inputs["scheduler"]) == (
        gen.steps,
        gen.cfg,
        gen.sampler,
        gen.scheduler,
    )
    (latent,) = ids["EmptySD3LatentImage"]
    assert graph[latent]["inputs"] == {"width": gen.width, "height": gen.height, "batch_size": 3}
    positive = graph[inputs["positive"][0]]
    if base.kind == "flux":
        assert graph["1"]["class_type"] == "UNETLoader" and graph[shift]["class_type"] == "ModelSamplingFlux"
        assert (graph[shift]["inputs"]["width"], graph[shift]["inputs"]["height"]) == (gen.width, gen.height)
        assert positive["class_type"] == "FluxGuidance" and positive["inputs"]["guidance"] == 3.5
        assert graph[ids["DualCLIPLoader"][0]]["inputs"]["clip_name2"] == "t5xxl_fp8.safetensors"
        assert graph[ids["VAEDecode"][0]]["inputs"]["vae"] == [ids["VAELoader"][0], 0]
    else:
        assert graph["1"]["class_type"] == "CheckpointLoaderSimple" and graph[shift]["inputs"]["shift"] == 3.0
        assert positive["class_type"] == "CLIPTextEncode"
        assert graph[ids["TripleCLIPLoader"][0]]["inputs"]["clip_name2"] == "clip_g.safetensors"
        assert graph[ids["VAEDecode"][0]]["inputs"]["vae"] == ["1", 2]


def test_reference_frames_on_flux_encode_frame_1_with_the_flux_vae():
    graph = _graph(
        FLUX, guide_image="charforge_story/frame_01.png", guidance=story.Guidance("img2img"), denoise=0.5
    )
    ids = _by_class(graph)
    (encode,) = ids["VAEEncode"]
    assert graph[encode]["inputs"]["vae"] == [ids["VAELoader"][0], 0]
    assert graph[ids["KSampler"][0]]["inputs"]["denoise"] == 0.5


def test_the_base_graph_of_the_ablation_has_no_lora():
    graph = _graph(FLUX, use_loras=False)
    assert "LoraLoaderModelOnly" not in _by_class(graph)
    assert graph["2s"]["inputs"]["model"] == ["1", 0]


def _info(**choices: list[str]) -> dict[str, Any]:
    inputs = {
        "CheckpointLoaderSimple": "ckpt_name",
        "UNETLoader": "unet_name",
        "DualCLIPLoader": "clip_name1",
        "VAELoader": "vae_name",
    }
    info = {node: {"input": {"required": {name: [choices.get(node, [])]}}} for node, name in inputs.items()}
    for node in (
        "TripleCLIPLoader",
        "ModelSamplingFlux",
        "FluxGuidance",
        "ModelSamplingSD3",
        *story_flow.COMMON_NODES,
    ):
        info.setdefault(node, {"input": {"required": {}}})
    return info


def test_the_family_and_its_files_come_from_the_preset_or_the_server(monkeypatch):
    info = _info(
        UNETLoader=["flux1-schnell.safetensors"],
        DualCLIPLoader=["clip_l.safetensors", "t5xxl_fp16.safetensors"],
        VAELoader=["ae.safetensors"],
    )
    asked = []
    monkeypatch.setattr(
        story_flow, "listed_family", lambda client, kind, name: asked.append((kind, name)) or "flux-schnell"
    )
    base = story_flow.flow_base(None, info, "", "flux1-schnell.safetensors")
    assert asked == [("diffusion_models", "flux1-schnell.safetensors")]
    assert (base.family, base.base_folder, base.files.vae) == (
        "flux-schnell",
        "diffusion_models",
        "ae.safetensors",
    )
    assert base.files.text_encoders == {
        "clip_name1": "clip_l.safetensors",
        "clip_name2": "t5xxl_fp16.safetensors",
    }
    # A preset naming its family is not asked about; an SD1.5/SDXL one keeps the SD graph.
    asked.clear()
    assert story_flow.flow_base(None, info, "sdxl", "flux1-schnell.safetensors") is None and asked == []
    with pytest.raises(UsageError, match="t5xxl_fp16.safetensors missing"):
        story_flow.flow_base(
            None,
            _info(DualCLIPLoader=["clip_l.safetensors"], VAELoader=["ae.safetensors"]),
            "flux-dev",
            "flux1-dev.safetensors",
        )
