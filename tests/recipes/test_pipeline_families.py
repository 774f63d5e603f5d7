"""``charforge pipeline`` on Flux.1 and SD3/SD3.5 bases (issue 18): the family read from the base model's tensors,
the files it needs beside it, and the stages that differ (training preset, best-of-N workflow, no video).

The base models are tiny random models of the real architectures in the files ComfyUI users have: a FLUX.1
transformer in BFL names (diffusers' FluxTransformer2DModel converted by the engine's own key conversion) and
the SD3/SD3.5 single files of cf_testing.sd3_models. The stages run against a recording runner (as in
test_pipeline.py); each edited workflow is validated against the node definitions of the real ComfyUI 0.3.64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cf_testing.comfyui import REPO_ROOT, accepting, build_api
from charforge.common.characters import family_generation
from charforge.driver.workflow.preflight import preflight
from charforge.recipes import pipeline
from charforge.recipes.pipeline import families, stages
from charforge.recipes.pipeline.models import choose_models


def _write_flux(path: Path, guidance: bool) -> Path:
    """A tiny FLUX.1 transformer in BFL names, as in ComfyUI's diffusion_models folder."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from cf_testing.flow_models import TINY_FLUX
    from charforge.engine.models.flux_files import diffusers_to_bfl

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_FLUX, guidance_embeds=guidance)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl(model.state_dict()).items()}, str(path))
    return path


def _write(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.zeros(shape, np.float16) for k, shape in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory):
    from cf_testing.sd3_models import build_tiny_sd3

    root = tmp_path_factory.mktemp("sd3")
    return {
        variant: build_tiny_sd3(root / variant, variant)
        for variant in ("sd3-medium", "sd35-medium", "sd35-large")
    }


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {
        "flux-dev": _write_flux(root / "a.safetensors", guidance=True),
        "flux-schnell": _write_flux(root / "b.safetensors", guidance=False),
    }


def test_the_family_comes_from_the_tensors_for_every_supported_base(tmp_path, flux_files, sd3_files):
    import shutil

    models = tmp_path / "base" / "models"
    server = pipeline.Server("http://127.0.0.1:1", base_dir=tmp_path / "base")
    # Misleading names: only the tensors count.
    for family, source in flux_files.items():
        shutil.copy(source, _dir(models / "diffusion_models") / f"sdxl_{family}.safetensors")
        assert pipeline.checkpoint_arch(server, f"sdxl_{family}.safetensors", "diffusion_models") == family
    for variant, files in sd3_files.items():
        shutil.copy(files.checkpoint, _dir(models / "checkpoints") / f"xl_{variant}.safetensors")
        assert pipeline.checkpoint_arch(server, f"xl_{variant}.safetensors") == variant
        shutil.copy(
            files.mmdit, _dir(models / "unet") / f"{variant}_mmdit.safetensors"
        )  # ComfyUI's other name
        assert pipeline.checkpoint_arch(server, f"{variant}_mmdit.safetensors", "diffusion_models") == variant


def test_an_unknown_architecture_is_refused_by_name(tmp_path):
    folder = tmp_path / "base" / "models" / "checkpoints"
    _write(
        folder / "pixart.safetensors", {"transformer_blocks.0.attn1.to_q.weight": (4, 4), "pos_embed": (1, 4)}
    )
    _write(
        folder / "sd21.safetensors",
        {
            "model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3),
            "cond_stage_model.model.ln_final.weight": (4,),
            "first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3),
        },
    )
    server = pipeline.Server("http://127.0.0.1:1", base_dir=tmp_path / "base")
    for name in ("pixart.safetensors", "sd21.safetensors"):
        with pytest.raises(pipeline.PipelineError) as caught:
            pipeline.checkpoint_arch(server, name)
        message = str(caught.value)
        assert name in message and "FLUX.1-dev" in message and "SD3.5 Large" in message, message


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


class FakeClient:
    """Answers object_info with the given loaders' choices (what a real server lists from its folders)."""

    url = "http://127.0.0.1:1"

    def __init__(self, info: dict[str, Any]):
        self.info = info

    def object_info(self, refresh: bool = False) -> dict[str, Any]:
        return self.info


def _listing(**choices: list[str]) -> dict[str, Any]:
    spec = {
        "CheckpointLoaderSimple": "ckpt_name",
        "UNETLoader": "unet_name",
        "DualCLIPLoader": "clip_name1",
        "VAELoader": "vae_name",
        "CharForgeLoadClip": "model",
        "CharForgeTrainLoRA": "base_model",
    }
    return {node: {"input": {"required": {name: [choices.get(node, [])]}}} for node, name in spec.items()}


def _flux_server(tmp_path, flux_files, encoders=("clip_l.safetensors", "t5xxl_fp16.safetensors")):
    import shutil

    models = tmp_path / "base" / "models"
    shutil.copy(flux_files["flux-dev"], _dir(models / "diffusion_models") / "flux1-dev.safetensors")
    _dir(models / "wd14_tagger")
    (models / "wd14_tagger" / "t.onnx").write_bytes(b"")
    (models / "wd14_tagger" / "t.csv").write_text("")
    for name in encoders:  # CLIP-L (width 768) and T5 (encoder blocks): read from the tensors
        if "t5" in name:
            _write(
                models / "text_encoders" / name, {"encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8)}
            )
        else:
            _write(
                models / "text_encoders" / name, {"text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768)}
            )
    _write(models / "vae" / "ae.safetensors", {"decoder.conv_in.weight": (512, 16, 3, 3)})
    info = _listing(
        UNETLoader=["flux1-dev.safetensors"],
        DualCLIPLoader=list(encoders),
        VAELoader=["ae.safetensors", "pixel_space"],
        CharForgeLoadClip=["clip-vit-large-patch14"],
    )
    return pipeline.Server("http://127.0.0.1:1", base_dir=tmp_path / "base"), FakeClient(info)


def _opts(tmp_path, **kw):
    photos = _dir(tmp_path / "photos")
    return pipeline.PipelineOptions(photos=photos, out=tmp_path / "out", character="pip", trigger="zqx", **kw)


def test_a_flux_diffusion_model_brings_its_text_encoders_and_vae_and_no_video(tmp_path, flux_files):
    server, client = _flux_server(tmp_path, flux_files)
    models = choose_models(client, server, _opts(tmp_path), print)
    assert (models.tiny, models.arch, models.checkpoint, models.base_folder) == (
        False,
        "flux-dev",
        "flux1-dev.safetensors",
        "diffusion_models",
    )
    assert models.train_base == "[diffusion model] flux1-dev.safetensors"  # Train LoRA's label for it
    assert models.text_encoders == {
        "clip_name1": "clip_l.safetensors",
        "clip_name2": "t5xxl_fp16.safetensors",
    }
    assert models.vae == "ae.safetensors" and models.motion is None
    assert any("no video stage" in note for note in models.notes)


def test_a_flux_base_without_t5_is_refused_naming_the_file_to_put_in_place(tmp_path, flux_files):
    server, client = _flux_server(tmp_path, flux_files, encoders=("clip_l.safetensors",))
    with pytest.raises(
        pipeline.PipelineError, match=r"models/text_encoders.*t5xxl_fp16\.safetensors missing"
    ):
        choose_models(client, server, _opts(tmp_path), print)


def _validate(prompt: dict[str, Any], info: dict[str, Any]) -> None:
    """Preflight against the recorded node definitions, with the run's model files in the loaders' lists."""
    problems = preflight(prompt, accepting(info, prompt))
    assert problems == [], "\n".join(map(str, problems))


@pytest.fixture(scope="module")
def recorded_info():
    return build_api().object_info()


class Recorder:
    def __init__(self):
        self.prompts: list[dict[str, Any]] = []

    def run(self, prompt, out_dir, previews=None):
        self.prompts.append(prompt)
        return None, {}, []


def _flow_models(family: str, faces: bool) -> pipeline.Models:
    flux = family.startswith("flux")
    return pipeline.Models(
        False,
        "flux1-dev.safetensors" if flux else "sd3.5_large.safetensors",
        "flux1-dev.safetensors" if flux else "sd3.5_large.safetensors",
        family,
        "",
        "clip-vit-large-patch14",
        None,
        faces,
        base_folder="diffusion_models" if flux else "checkpoints",
        text_encoders={"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8_e4m3fn.safetensors"}
        if flux
        else {
            "clip_name1": "clip_l.safetensors",
            "clip_name2": "clip_g.safetensors",
            "clip_name3": "t5xxl_fp16.safetensors",
        },
        vae="ae.safetensors" if flux else None,
    )


@pytest.mark.parametrize("family", ["flux-dev", "flux-schnell", "sd35-large", "sd35-medium"])
@pytest.mark.parametrize("faces", [True, False])
def test_the_images_stage_runs_the_familys_best_of_n_with_its_settings(
    tmp_path, family, faces, recorded_info
):
    opts = _opts(tmp_path, candidates=3)
    runner = Recorder()
    state = {"lora": {"lora_name": "pip.safetensors"}, "captions": {"train_data_dir": "/srv/pip"}}
    result = stages.stage_images(runner, opts, _flow_models(family, faces), state)
    prompt = runner.prompts[-1]
    assert result["family"] == family and result["by"] == ("identity" if faces else "clip")
    assert len(runner.prompts) == (2 if faces else 1)  # with faces the identity is built first
    _validate(prompt, recorded_info)
    by_class: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        by_class.setdefault(node["class_type"], []).append(node_id)
    gen = family_generation(family)
    (sampler,) = by_class["KSampler"]
    inputs = prompt[sampler]["inputs"]
    assert (inputs["steps"], inputs["cfg"], inputs["sampler_name"], inputs["scheduler"]) == (
        gen.steps,
        gen.cfg,
        gen.sampler,
        gen.scheduler,
    )
    if family == "flux-schnell":
        assert inputs["steps"] == 4
    (latent,) = by_class["EmptySD3LatentImage"]
    assert prompt[latent]["inputs"] == {"width": gen.width, "height": gen.height, "batch_size": 3}
    (lora,) = by_class["LoraLoaderModelOnly"]
    assert prompt[lora]["inputs"]["lora_name"] == "pip.safetensors"
    assert "zqx" in prompt[by_class["CLIPTextEncode"][0]]["inputs"]["text"]
    (best,) = by_class["CharForgeBestOfN"]
    assert prompt[best]["inputs"]["group_size"] == 3
    if family.startswith("flux"):
        assert prompt[by_class["UNETLoader"][0]]["inputs"]["unet_name"] == "flux1-dev.safetensors"
        assert prompt[by_class["DualCLIPLoader"][0]]["inputs"]["clip_name2"] == "t5xxl_fp8_e4m3fn.safetensors"
        assert prompt[by_class["DualCLIPLoader"][0]]["inputs"]["type"] == "flux"
        assert prompt[by_class["ModelSamplingFlux"][0]]["inputs"]["width"] == gen.width
    else:
        assert (
            prompt[by_class["CheckpointLoaderSimple"][0]]["inputs"]["ckpt_name"] == "sd3.5_large.safetensors"
        )
        assert prompt[by_class["TripleCLIPLoader"][0]]["inputs"]["clip_name2"] == "clip_g.safetensors"
        assert prompt[by_class["ModelSamplingSD3"][0]]["inputs"]["shift"] == gen.shift
    if faces:
        (combine,) = by_class["CharForgeCombineScores"]
        assert prompt[best]["inputs"]["scores"] == [combine, 0]
        assert prompt[by_class["CharForgeLoadIdentity"][0]]["inputs"]["name"] == "pip"
    else:  # no identity: CLIP alone ranks the candidates, and no face node is left to fail
        assert not {"CharForgeScoreIdentity", "CharForgeLoadFaceModels", "CharForgeCombineScores"} & set(
            by_class
        )
        assert prompt[best]["inputs"]["scores"] == [by_class["CharForgeClipScore"][0], 0]


def test_a_flux_all_in_one_checkpoint_loads_with_the_checkpoint_loader(tmp_path, recorded_info):
    models = _flow_models("flux-dev", faces=False)
    models.base_folder, models.checkpoint = "checkpoints", "flux1-dev-fp8.safetensors"
    prompt, _, _ = stages.flow_images_prompt(_opts(tmp_path), models, "pip.safetensors")
    _validate(prompt, recorded_info)
    assert "UNETLoader" not in {n["class_type"] for n in prompt.values()}
    (lora,) = [n for n in prompt.values() if n["class_type"] == "LoraLoaderModelOnly"]
    assert prompt[lora["inputs"]["model"][0]] == {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "flux1-dev-fp8.safetensors"},
    }


class TrainClient:
    url = "http://127.0.0.1:1"

    def __init__(self, bases, presets):
        self.info = {
            "CharForgeTrainLoRA": {"input": {"required": {"base_model": [bases], "preset": [presets]}}}
        }

    def object_info(self, refresh: bool = False):
        return self.info


class TrainRecorder(Recorder):
    def __init__(self, client):
        super().__init__()
        self.client = client

    def run(self, prompt, out_dir, previews=None):
        self.prompts.append(prompt)
        text = "pip.safetensors: 4 steps, loss 0.1; run folder /srv/runs/pip"
        return None, {"1": text}, []


def test_the_lora_stage_trains_on_the_flux_base_with_its_parts_or_refuses(tmp_path):
    models = _flow_models("flux-dev", faces=False)
    models.train_base = "[diffusion model] flux1-dev.safetensors"
    state = {"captions": {"train_data_dir": "/srv/pip/img"}}
    runner = TrainRecorder(TrainClient(["[diffusion model] flux1-dev.safetensors"], ["sdxl", "sd15", "fast"]))
    stages.stage_lora(runner, _opts(tmp_path), models, state)
    inputs = runner.prompts[-1]["1"]["inputs"]
    assert inputs["base_model"] == "[diffusion model] flux1-dev.safetensors"
    assert (inputs["clip_l"], inputs["t5xxl"], inputs["vae"]) == (
        "clip_l.safetensors",
        "t5xxl_fp8_e4m3fn.safetensors",
        "ae.safetensors",
    )
    assert inputs.get("clip_g", "(none)") == "(none)"  # Flux has no CLIP-G
    assert inputs["dataset_folder"] == "/srv/pip/img"
    old = TrainRecorder(TrainClient(["v1-5.safetensors"], ["sdxl", "sd15"]))
    with pytest.raises(
        pipeline.PipelineError,
        match=r"does not offer '\[diffusion model\] flux1-dev.safetensors'.*update CharForge",
    ):
        stages.stage_lora(old, _opts(tmp_path), models, state)
    assert old.prompts == []  # refused before anything is queued


def test_the_video_stage_is_skipped_for_flux_and_sd35(tmp_path):
    for family in ("flux-dev", "sd35-large"):
        result = stages.stage_video(Recorder(), _opts(tmp_path), _flow_models(family, False), {})
        assert "AnimateDiff" in result["skipped"]


def test_the_images_workflows_are_the_shipped_ones():
    for name in families.IMAGES_WORKFLOW.values():
        assert (REPO_ROOT / "workflows" / "api" / f"{name}.json").is_file()


def test_a_remote_base_models_family_is_read_by_the_server_from_its_tensors(comfy_env, flux_files, sd3_files):
    """A server elsewhere: its CharForge reads the file's tensors and reports the family in the transfer
    routes' model listing (?arch=1); a file it cannot use is refused with its reason."""
    import shutil

    from fakes.charforge_routes import transfer_server

    from charforge.driver.client import ComfyClient
    from charforge.driver.config import resolve_server
    from charforge.recipes.pipeline.remote_family import listed_family

    models = comfy_env.base_dir / "models"
    shutil.copy(flux_files["flux-schnell"], _dir(models / "diffusion_models") / "flux1-schnell.safetensors")
    shutil.copy(sd3_files["sd35-large"].checkpoint, _dir(models / "checkpoints") / "sd3.5_large.safetensors")
    _write(models / "checkpoints" / "other.safetensors", {"transformer_blocks.0.attn1.to_q.weight": (4, 4)})
    with transfer_server(comfy_env) as server, ComfyClient(resolve_server(server.url)) as client:
        assert listed_family(client, "diffusion_models", "flux1-schnell.safetensors") == "flux-schnell"
        assert listed_family(client, "checkpoints", "sd3.5_large.safetensors") == "sd35-large"
        assert listed_family(client, "checkpoints", "absent.safetensors") is None
        with pytest.raises(
            pipeline.PipelineError, match="other.safetensors.*not a model the pipeline can use"
        ):
            listed_family(client, "checkpoints", "other.safetensors")
