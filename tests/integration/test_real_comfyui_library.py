"""Opt-in: the LoRA library and characters against a real ComfyUI (COMFYUI_DIR set).

1. Library level, full-size models: LoRAs on every layer of SD1.5 and SDXL (U-Net + text encoders), written
   by the library as kohya, converted to peft and comfyui, merged (exact and SVD) and resized, go through
   ComfyUI's own key maps of meta-device SD1.5 / SDXL models and CLIPs: no key may be reported as not loaded,
   and every module must be patched. On a full-size random-weight SD1.5 U-Net, ComfyUI's patching of each
   file changes the output; the three layouts of one LoRA give the same output, and the merged file gives
   what applying its inputs one after the other at their weights gives.
2. A server workflow: CheckpointLoaderSimple (the shallow full-width SD1.5 test checkpoint) + Load Character
   + Apply LoRA Stack + built-in text encode / sampler / SaveLatent, and stock LoraLoader nodes loading a
   merged and a converted file; no "lora key not loaded" in the log, and the LoRAs change the latent.

Ports 18400-18499.
"""

from __future__ import annotations

import json
import textwrap
import uuid

import torch
import yaml

import cf_testing.real_comfyui as real

pytestmark = real.suite_marks()

PORTS = range(18400, 18500)

COMFY_SIDE = textwrap.dedent(r"""
    import json, logging, os, sys
    sys.path.insert(0, os.getcwd())  # cwd = the ComfyUI folder
    job = json.load(open(sys.argv[-1]))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.lora, comfy.model_detection, comfy.model_patcher, comfy.sd, comfy.sd1_clip, comfy.sdxl_clip, comfy.utils

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines = []
        def emit(self, record):
            message = record.getMessage()
            if "lora key not loaded" in message or message.startswith("NOT LOADED"):
                self.lines.append(message)

    def model_config(arch):
        cfg = dict(job["unet_configs"][arch], dtype=torch.float32)
        return comfy.model_detection.model_config_from_unet_config(cfg)

    results = {"keys": {}, "numeric": {}}
    for arch, files in job["key_checks"].items():
        model = model_config(arch).get_model({}, device="meta")
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta") if arch == "sdxl" else comfy.sd1_clip.SD1ClipModel(device="meta")
        key_map = comfy.lora.model_lora_keys_unet(model, {})
        key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
        for name, path in files.items():
            handler = Collect()
            logging.getLogger().addHandler(handler)
            lora = comfy.utils.load_torch_file(path, safe_load=True)
            patches = comfy.lora.load_lora(lora, key_map)
            logging.getLogger().removeHandler(handler)
            results["keys"][f"{arch}/{name}"] = {"tensors": len(lora), "patches": len(patches),
                                                 "not_loaded": handler.lines}

    numeric = job["numeric"]
    torch.manual_seed(0)
    base_model = model_config("sd15").get_model({}, device="cpu")
    with torch.no_grad():
        for pname, param in base_model.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape) / param[0].numel() ** 0.5)
            elif pname.endswith("weight"):  # GroupNorm / LayerNorm scales (LDM names: in_layers.0, out.0, ...)
                param.fill_(1.0)
            else:
                param.zero_()
    patcher = comfy.model_patcher.ModelPatcher(base_model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500.0])

    def unet_only(path):
        sd = comfy.utils.load_torch_file(path, safe_load=True)
        return {k: v for k, v in sd.items() if not k.startswith(("lora_te", "text_encoder", "text_encoders"))}

    def output(stack):
        current = patcher
        handler = Collect()
        logging.getLogger().addHandler(handler)
        for path, strength in stack:
            current, _ = comfy.sd.load_lora_for_models(current, None, unet_only(path), strength, strength)
        logging.getLogger().removeHandler(handler)
        current.patch_model()
        try:
            with torch.no_grad():
                out = current.model.diffusion_model(x, timesteps=t, context=ctx).float()
        finally:
            current.unpatch_model()
        return out, handler.lines

    with torch.no_grad():
        base = base_model.diffusion_model(x, timesteps=t, context=ctx).float()
    outs = {}
    for name, stack in numeric.items():
        outs[name], lines = output(stack)
        results["numeric"][name] = {"changed": float((outs[name] - base).abs().max()), "not_loaded": lines,
                                    "finite": bool(torch.isfinite(outs[name]).all())}
    for a, b in job["compare"]:
        scale = float((outs[b] - base).abs().max())
        results["numeric"][f"{a} vs {b}"] = {"max_diff": float((outs[a] - outs[b]).abs().max()), "scale": scale}
    print("RESULT " + json.dumps(results))
""")

# ComfyUI's own U-Net configs for the two families (comfy/model_detection.py, unet_config_from_diffusers_unet).
UNET_CONFIGS = {
    "sd15": real.SD15_UNET_CONFIG,
    "sdxl": real.SDXL_UNET_CONFIG,
}


def _full_state(arch: str, seed: int, rank: int, alpha: float | None, entries=None, scale: float = 0.3):
    """A LoRA on every layer of the full-size model (or `entries`), small random but finite effect."""
    from charforge.engine.library import formats

    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for entry in entries or formats.module_table(arch).entries.values():
        out_dim, in_dim, *kernel = entry.shape
        down = (
            torch.randn(rank, in_dim, *kernel, generator=generator)
            / (in_dim * (kernel[0] * kernel[1] if kernel else 1)) ** 0.5
        )
        up = scale * torch.randn(out_dim, rank, *([1, 1] if kernel else []), generator=generator) / rank**0.5
        a = None if alpha is None else torch.tensor(float(alpha))
        modules[(entry.component, entry.name)] = formats.LoraModule(
            entry.component, entry.name, down.half(), up.half(), a
        )
    return formats.LoraState(arch, modules, {"modelspec.trigger_phrase": f"zk_{arch}"}, "")


def _run_comfy_side(comfy, tmp_path, job) -> dict:
    return real.run_comfy_script(comfy, tmp_path, COMFY_SIDE, job)


def test_library_files_load_in_comfyui_key_maps_and_patch_a_full_unet(tmp_path):
    from charforge.engine.library import formats, merge

    comfy = real.comfyui_dir()
    files: dict[str, dict[str, str]] = {}
    modules: dict[str, int] = {}
    for arch in ("sd15", "sdxl"):
        a = formats.write_state(_full_state(arch, 1, 4, 2.0), tmp_path / f"{arch}_a.safetensors", "kohya")
        b = formats.write_state(_full_state(arch, 2, 2, None), tmp_path / f"{arch}_b.safetensors", "peft")
        made = {"a_kohya": a, "b_peft": b}
        for fmt in ("peft", "comfyui"):
            made[f"a_{fmt}"] = formats.convert_file(a, tmp_path / f"{arch}_a_{fmt}.safetensors", fmt)
        made["a_peft_kohya"] = formats.convert_file(
            made["a_peft"], tmp_path / f"{arch}_a_pk.safetensors", "kohya"
        )
        made["merged"], _ = merge.merge_files([(a, 0.7), (b, 0.3)], tmp_path / f"{arch}_m.safetensors")
        made["merged_svd_comfyui"], report = merge.merge_files(
            [(a, 0.7), (b, 0.3)], tmp_path / f"{arch}_ms.safetensors", rank=3, fmt="comfyui"
        )
        assert 0 < report.retained < 1
        made["resized"], _ = merge.resize_file(a, tmp_path / f"{arch}_r.safetensors", rank=2)
        files[arch] = {name: str(path) for name, path in made.items()}
        modules[arch] = len(formats.module_table(arch).entries)
    sd15 = files["sd15"]
    job = {
        "unet_configs": UNET_CONFIGS,
        "key_checks": files,
        "numeric": {
            "a_kohya": [[sd15["a_kohya"], 1.0]],
            "a_peft": [[sd15["a_peft"], 1.0]],
            "a_comfyui": [[sd15["a_comfyui"], 1.0]],
            "merged": [[sd15["merged"], 1.0]],
            "sequential": [[sd15["a_kohya"], 0.7], [sd15["b_peft"], 0.3]],
            "merged_svd_comfyui": [[sd15["merged_svd_comfyui"], 1.0]],
            "resized": [[sd15["resized"], 1.0]],
        },
        "compare": [["a_peft", "a_kohya"], ["a_comfyui", "a_kohya"], ["merged", "sequential"]],
    }
    results = _run_comfy_side(comfy, tmp_path, job)
    print("library files in ComfyUI:", json.dumps(results))
    assert len(results["keys"]) == sum(len(made) for made in files.values())
    for name, entry in results["keys"].items():
        arch = name.split("/")[0]
        assert entry["not_loaded"] == [], (name, entry["not_loaded"][:5])
        assert entry["patches"] == modules[arch], (name, entry)  # every module reaches a model weight
    for name, entry in results["numeric"].items():
        if "vs" in name:
            assert entry["max_diff"] <= 1e-3 * max(entry["scale"], 1.0), (name, entry)
        else:
            assert entry["not_loaded"] == [] and entry["finite"], (name, entry)
            assert entry["changed"] > 1e-3, (name, entry)
    assert modules == {"sd15": 354, "sdxl": 1058}


def _small_sd15_lora(seed: int, trigger: str, tags: dict | None = None):
    """A kohya-named LoRA for the shallow full-width SD1.5 test checkpoint: attention, resnet convs and CLIP-L."""
    from diffusers import UNet2DConditionModel

    from cf_testing.models import SD15_COMFY_UNET
    from charforge.engine.library import formats

    table = formats.module_table("sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_COMFY_UNET)
    entries = [
        formats.ModuleEntry("unet", name, "", tuple(module.weight.shape))
        for name, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        and ("unet", name) in table.entries
        and (".attentions." in name or ".resnets." in name)
    ]
    entries += [e for e in table.entries.values() if e.component == "te1"]
    state = _full_state("sd15", seed, 4, 4.0, entries=entries, scale=1.0)
    state.metadata = {"modelspec.trigger_phrase": trigger, "ss_tag_frequency": json.dumps(tags or {})}
    return state


def test_workflow_with_load_character_and_apply_lora_stack(tmp_path, monkeypatch, sd15_comfy_checkpoint):
    from safetensors.torch import load_file

    from charforge.common.characters import Character, CharacterLora, GenerationParams
    from charforge.engine.library import characters, formats, merge

    comfy = real.comfyui_dir()
    base = tmp_path / "base"
    real.link_pack(base)
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "sd15_tiny.safetensors").symlink_to(sd15_comfy_checkpoint.path)
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    alice = formats.write_state(_small_sd15_lora(1, "alice_cf"), loras / "alice.safetensors", "kohya")
    style = formats.write_state(
        _small_sd15_lora(2, "", {"1_style": {"film grain": 5}}), loras / "style.safetensors", "kohya"
    )
    formats.convert_file(alice, loras / "alice_peft.safetensors", "peft")
    merge.merge_files([(alice, 0.5), (style, 0.5)], loras / "merged.safetensors")
    preset = Character(
        name="alice",
        trigger_words=["alice_cf"],
        prompt="photo of a woman",
        negative_prompt="blurry",
        loras=[CharacterLora("alice.safetensors", 1.0)],
        generation=GenerationParams(
            steps=2, cfg=5.0, width=64, height=64, sampler="euler", scheduler="normal"
        ),
    )
    characters.save_character(preset, folder=base / "models" / "charforge" / "characters")
    (base / "models" / "charforge" / "characters" / "bad.yaml").write_text(yaml.safe_dump({"promt": "x"}))

    def sampled(tag: str, model: list, clip: list, text: list | str, scale_node: str) -> dict:
        n = {"pos": f"{tag}p", "neg": f"{tag}n", "lat": f"{tag}l", "ks": f"{tag}k", "save": f"{tag}s"}
        return {
            n["pos"]: {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}},
            n["neg"]: {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": [scale_node, 1]}},
            n["lat"]: {
                "class_type": "EmptyLatentImage",
                "inputs": {"width": [scale_node, 7], "height": [scale_node, 8], "batch_size": 1},
            },
            n["ks"]: {
                "class_type": "KSampler",
                "inputs": {
                    "model": model,
                    "positive": [n["pos"], 0],
                    "negative": [n["neg"], 0],
                    "latent_image": [n["lat"], 0],
                    "seed": 3,
                    "steps": [scale_node, 5],
                    "cfg": [scale_node, 6],
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                },
            },
            n["save"]: {
                "class_type": "SaveLatent",
                "inputs": {"samples": [n["ks"], 0], "filename_prefix": f"library/{tag}"},
            },
        }

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_tiny.safetensors"}},
        "2": {
            "class_type": "CharForgeLoadCharacter",
            "inputs": {"character": "alice", "extra_prompt": "at the beach", "lora_weight_scale": 1.0},
        },
        "3": {
            "class_type": "CharForgeApplyLoraStack",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "loras": ["2", 2],
                "prompt": ["2", 0],
                "inject_trigger_words": True,
                "lora_1": "style.safetensors",
                "strength_1": 0.5,
                "lora_2": "None",
                "strength_2": 1.0,
                "lora_3": "None",
                "strength_3": 1.0,
            },
        },
        "4": {
            "class_type": "CharForgeLoadCharacter",
            "inputs": {"character": "alice", "extra_prompt": "at the beach", "lora_weight_scale": 0.0},
        },
        "5": {
            "class_type": "CharForgeApplyLoraStack",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "loras": ["4", 2],
                "prompt": ["4", 0],
                "inject_trigger_words": True,
            },
        },
        "6": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "alice_peft.safetensors",
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        },
        "7": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["6", 0],
                "clip": ["6", 1],
                "lora_name": "merged.safetensors",
                "strength_model": 0.5,
                "strength_clip": 0.5,
            },
        },
        "8": {"class_type": "CharForgeLoraInfo", "inputs": {"lora": "merged.safetensors"}},
    }
    prompt.update(sampled("with", ["3", 0], ["3", 1], ["3", 2], "2"))
    prompt.update(sampled("without", ["5", 0], ["5", 1], ["5", 2], "4"))
    prompt.update(sampled("stock", ["7", 0], ["7", 1], ["2", 0], "2"))

    server = real.start_comfyui(comfy, base, real.comfyui_python(comfy), ports=PORTS)
    try:
        info = server.get("/object_info")
        assert info["CharForgeLoadCharacter"]["input"]["required"]["character"][0] == ["alice", "bad"]
        outputs = server.run_prompt(prompt, "cf-library", timeout=600)
        report = outputs["3"]["text"][0]
        assert "alice.safetensors: model 1, clip 1" in report and "style.safetensors: model 0.5" in report
        assert "NOT loaded" not in report
        assert "trigger words: alice_cf, film grain" in report
        assert "alice_cf" in outputs["8"]["text"][0]  # merged file keeps the trigger words
        assert "skipped (strength 0)" in outputs["5"]["text"][0]
        latents = {}
        for tag in ("with", "without", "stock"):
            (saved,) = outputs[f"{tag}s"]["latents"]
            latents[tag] = load_file(str(base / "output" / saved["subfolder"] / saved["filename"]))[
                "latent_tensor"
            ]
            assert latents[tag].shape == (1, 4, 8, 8) and torch.isfinite(latents[tag]).all()
        assert (latents["with"] - latents["without"]).abs().max() > 1e-3
        assert (latents["stock"] - latents["without"]).abs().max() > 1e-3
        log = server.log()
        assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-4000:]
        assert not real.pack_tracebacks(log), log[-4000:]

        # a broken preset fails with the file and field named, and nothing else breaks
        prompt_id = str(uuid.uuid4())
        server.post(
            "/prompt",
            {
                "prompt": {
                    "9": {
                        "class_type": "CharForgeLoadCharacter",
                        "inputs": {"character": "bad", "extra_prompt": "", "lora_weight_scale": 1.0},
                    },
                    "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}},
                },
                "prompt_id": prompt_id,
                "client_id": "cf-library",
            },
        )
        entry = server.wait_history(prompt_id, timeout=120)
        messages = json.dumps(entry["status"])
        assert entry["status"]["status_str"] == "error" and "bad.yaml" in messages and "promt" in messages
    finally:
        server.stop()
