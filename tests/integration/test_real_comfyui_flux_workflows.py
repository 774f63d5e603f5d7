"""Opt-in: the shipped Flux.1 and SD3.5 workflows in a real ComfyUI 0.3.64 (issue 18).

1. Every one of them (flux_lora, flux_best_of_n, flux_storyboard, sd35_lora, sd35_best_of_n, sd35_storyboard),
   unchanged, passes the driver's preflight against the real ``/object_info`` (the model files they name lie
   in the real folders, so the loaders list them) and ComfyUI's own validation on ``POST /prompt`` (no
   ``node_errors``). The files are placeholders, so the job then stops at a loader: nothing else may fail.
2. sd35_lora runs through ``/prompt`` to a saved image on a small SD3.5-Large-type model: an MMDiT that
   ComfyUI's CheckpointLoaderSimple detects from its tensors (2 joint blocks, hidden 128, q/k RMSNorm, with
   the real context width 4096 and pooled width 2048 the text encoders give) with a full-size 16-channel
   VAE in the checkpoint, and a kohya-layout character LoRA on the MMDiT through the stock
   LoraLoaderModelOnly, which must load every key. One node differs from the shipped graph: TripleCLIPLoader
   always builds ComfyUI's full T5-XXL and CLIP-G (about 5.4 billion parameters) whatever files it gets, so
   the run loads SD3's text encoder with CLIP-L alone (CLIPLoader type sd3, a full-size random CLIP-L; ComfyUI
   pads the missing encoders with zeros). Everything else runs as shipped: loaders, LoRA, ModelSamplingSD3,
   prompts, EmptySD3LatentImage, the KSampler's cfg / sampler / scheduler, VAEDecode and SaveImage.

Why no Flux run through /prompt: DualCLIPLoader type flux always builds ComfyUI's fixed T5-XXL (24 blocks of
width 4096, about 4.7 billion parameters) whatever file it is given, and ComfyUI's Flux is hard-coded to width
3072; neither fits a CPU-only test (tens of GB of memory, minutes per step). The Flux workflows are validated
by (1) instead; the Flux LoRA loading itself is tested on a full-width shallow Flux by the library's
real-ComfyUI tests.
"""

from __future__ import annotations

import json
import urllib.error
import uuid
from pathlib import Path

import cf_testing.real_comfyui as real
from cf_testing.comfyui import REPO_ROOT
from charforge.driver.workflow.preflight import preflight

pytestmark = real.suite_marks()

PORTS = range(19000, 19050)
WORKFLOWS = (
    "flux_lora",
    "flux_best_of_n",
    "flux_storyboard",
    "sd35_lora",
    "sd35_best_of_n",
    "sd35_storyboard",
)
LOADERS = {
    "UNETLoader",
    "DualCLIPLoader",
    "TripleCLIPLoader",
    "VAELoader",
    "CheckpointLoaderSimple",
    "LoraLoaderModelOnly",
    "CharForgeLoadFaceModels",
    "CharForgeLoadIdentity",
    "CharForgeLoadClip",
}


def _api(name: str) -> dict:
    return json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))


def _placeholders(models: Path) -> None:
    """A file (or folder) under every name the workflows load, in the folder ComfyUI lists it from."""
    from cf_testing.face_models import write_face_pack
    from charforge.engine import tiny

    names = {}
    for name in WORKFLOWS:
        for node in _api(name).values():
            for key, value in node["inputs"].items():
                if isinstance(value, str):  # not a link
                    names.setdefault((node["class_type"], key), set()).add(value)
    folders = {
        ("UNETLoader", "unet_name"): "diffusion_models",
        ("DualCLIPLoader", "clip_name1"): "text_encoders",
        ("DualCLIPLoader", "clip_name2"): "text_encoders",
        ("TripleCLIPLoader", "clip_name1"): "text_encoders",
        ("TripleCLIPLoader", "clip_name2"): "text_encoders",
        ("TripleCLIPLoader", "clip_name3"): "text_encoders",
        ("VAELoader", "vae_name"): "vae",
        ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
        ("LoraLoaderModelOnly", "lora_name"): "loras",
    }
    for where, folder in folders.items():
        for value in names.get(where, ()):
            (models / folder).mkdir(parents=True, exist_ok=True)
            (models / folder / value).write_bytes(b"not a model")
    (models / "charforge" / "identities").mkdir(parents=True)
    for value in names[("CharForgeLoadIdentity", "name")]:
        (models / "charforge" / "identities" / f"{value}.json").write_text("{}")
    write_face_pack(models / "insightface", *names[("CharForgeLoadFaceModels", "pack")])
    (clip_name,) = names[("CharForgeLoadClip", "model")]
    tiny.write_clip(models).rename(models / "clip_vision" / clip_name)


def _queue(server: real.RunningComfyUI, prompt: dict) -> tuple[str, dict]:
    """POST /prompt; returns (prompt id, ComfyUI's answer) also when it refuses the graph (HTTP 400)."""
    prompt_id = str(uuid.uuid4())
    try:
        answer = server.post("/prompt", {"prompt": prompt, "prompt_id": prompt_id, "client_id": "flux-wf"})
    except urllib.error.HTTPError as exc:
        answer = json.loads(exc.read() or b"{}")
    return prompt_id, answer


def test_every_shipped_flux_and_sd35_workflow_validates_in_the_real_comfyui(tmp_path):
    comfy = real.comfyui_dir()
    base = tmp_path / "base"
    real.link_pack(base)
    _placeholders(base / "models")
    server = real.start_comfyui(comfy, base, real.comfyui_python(comfy), ports=PORTS)
    try:
        info = server.get("/object_info")
        for name in WORKFLOWS:
            prompt = _api(name)
            problems = preflight(prompt, info)
            assert problems == [], f"{name}:\n" + "\n".join(map(str, problems))
            prompt_id, answer = _queue(server, prompt)
            assert answer.get("node_errors") == {} and "error" not in answer, (name, answer)
            entry = server.wait_history(prompt_id, timeout=300)
            messages = dict(entry["status"].get("messages") or [])
            if entry["status"]["status_str"] == "error":  # a placeholder could not be loaded, nothing else
                failed = messages["execution_error"]
                assert failed["node_type"] in LOADERS, (name, failed)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------------------
# SD3.5 through /prompt on a small model


def _small_sd35(models: Path) -> dict[str, str]:
    """Checkpoint (MMDiT + VAE), CLIP-L and LoRA as ComfyUI users have them; returns their names."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from charforge.engine import tiny
    from charforge.engine.models import sd3_files
    from charforge.engine.models.single_file import vae_to_ldm

    transformer = tiny.seeded(
        0,
        lambda: SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,  # ComfyUI builds hidden / 64 blocks: 2 for hidden 128
            attention_head_dim=64,
            num_attention_heads=2,
            joint_attention_dim=4096,  # what ComfyUI's SD3 text encoder gives (CLIP zero-padded to T5's width)
            caption_projection_dim=128,
            pooled_projection_dim=2048,  # CLIP-L 768 + CLIP-G 1280 (zeros when absent)
            pos_embed_max_size=16,
            qk_norm="rms_norm",
        ).eval(),
    )
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # diffusers starts adaLN and outputs at zero
        torch.manual_seed(1)
        for param in transformer.parameters():
            if not param.abs().sum():
                param.normal_(0, 0.02)
    # ComfyUI's VAE has the SD layout's fixed widths (128, 256, 512, 512) and reads only its latent channels.
    vae = tiny.seeded(
        2,
        lambda: AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval(),
    )
    checkpoint = sd3_files.write_single_file(
        models / "checkpoints" / "small_sd35_large.safetensors",
        {k: v.half() for k, v in transformer.state_dict().items()},
        vae_ldm={k: v.half() for k, v in vae_to_ldm(vae.state_dict()).items()},
    )
    clip = tiny.seeded(
        3,
        lambda: CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
            )
        ).eval(),
    )
    (models / "text_encoders").mkdir(parents=True)
    # The file's names as published (text_model.*); transformers 5 leaves the prefix out of the state dict.
    save_file(
        {
            (k if k.startswith("text_model.") else f"text_model.{k}"): v.half().contiguous()
            for k, v in clip.state_dict().items()
            if not k.endswith("position_ids")
        },
        str(models / "text_encoders" / "clip_l.safetensors"),
    )
    # A character LoRA on the image and text attention of both joint blocks, in the kohya layout.
    generator = torch.Generator().manual_seed(4)
    lora = {}
    for block in (0, 1):
        for stream in ("x_block", "context_block"):
            base = f"lora_unet_joint_blocks_{block}_{stream}_attn_qkv"
            lora[f"{base}.lora_down.weight"] = torch.randn(4, 128, generator=generator) * 0.1
            lora[f"{base}.lora_up.weight"] = torch.randn(384, 4, generator=generator) * 0.1
            lora[f"{base}.alpha"] = torch.tensor(4.0)
    (models / "loras").mkdir(parents=True)
    save_file(lora, str(models / "loras" / "small_sd35_character.safetensors"))
    return {
        "checkpoint": checkpoint.name,
        "clip_l": "clip_l.safetensors",
        "lora": "small_sd35_character.safetensors",
    }


def test_sd35_lora_workflow_generates_through_prompt_with_a_small_sd35(tmp_path):
    comfy = real.comfyui_dir()
    base = tmp_path / "base"
    real.link_pack(base)
    files = _small_sd35(base / "models")
    prompt = _api("sd35_lora")
    ids = {node["class_type"]: node_id for node_id, node in prompt.items()}
    prompt[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = files["checkpoint"]
    prompt[ids["TripleCLIPLoader"]] = {
        "class_type": "CLIPLoader",
        "inputs": {"clip_name": files["clip_l"], "type": "sd3", "device": "default"},
    }
    prompt[ids["LoraLoaderModelOnly"]]["inputs"]["lora_name"] = files["lora"]
    prompt[ids["EmptySD3LatentImage"]]["inputs"].update(width=128, height=128)
    prompt[ids["KSampler"]]["inputs"]["steps"] = 2
    server = real.start_comfyui(comfy, base, real.comfyui_python(comfy), ports=PORTS)
    try:
        assert preflight(prompt, server.get("/object_info")) == []
        outputs = server.run_prompt(prompt, "flux-wf", timeout=240)
        log = server.log()
    finally:
        server.stop()
    (image,) = outputs[ids["SaveImage"]]["images"]
    from PIL import Image

    with Image.open(base / "output" / image["subfolder"] / image["filename"]) as saved:
        assert saved.size == (128, 128)
    assert "lora key not loaded" not in log, log[-3000:]
    assert "model_type FLOW" in log, "ComfyUI did not load a flow-matching (SD3) model"
