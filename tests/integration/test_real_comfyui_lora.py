"""Opt-in: LoRAs written by our exporter, loaded by a real ComfyUI's own loaders (COMFYUI_DIR set).

Full-size, random-weight models of the real architectures:

- **SD1.5**: a complete single-file checkpoint (U-Net, VAE, CLIP-L) that our trainer's loader reads with
  the shipped configs and ComfyUI's own tokenizer vocabulary, and ComfyUI's checkpoint loader reads too.
  The LoRA (kohya-wide + LoCon convs + text encoder) goes through ``comfy.sd.load_lora_for_models``:
  no key may be reported as not loaded, and the U-Net output ComfyUI computes with the LoRA patched in
  must equal the output of our peft model (fp32), as must the text encoder's.
- **SDXL**: the full U-Net (2.57 B parameters, bf16) loaded with ``comfy.sd.load_diffusion_model`` and a
  U-Net LoRA; the text-encoder keys (CLIP-L + bigG) are checked against ComfyUI's key map of its own SDXL
  text encoders built on the meta device.

The ComfyUI side runs in ComfyUI's Python (``COMFYUI_PYTHON`` or its venv) as a subprocess; this side
builds the files and the reference outputs. Needs about 14 GB of RAM and a few minutes on CPU.
"""

from __future__ import annotations

import gc
import json
import textwrap

import pytest
import torch

from cf_testing.real_comfyui import checkout, run_comfy_script, suite_marks

pytestmark = suite_marks()

COMFY_SIDE = textwrap.dedent(r"""
    import json, logging, os, sys
    sys.path.insert(0, os.getcwd())  # run with cwd = the ComfyUI folder
    job_path = sys.argv[-1]
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.lora, comfy.sd, comfy.utils, comfy.sdxl_clip

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines = []
        def emit(self, record):
            self.lines.append(record.getMessage())

    def not_loaded(lines):
        return [l for l in lines if "lora key not loaded" in l or l.startswith("NOT LOADED")]

    def unet_outputs(patcher, inputs, lora_patcher):
        x, t, ctx = inputs["x"], inputs["t"].float(), inputs["context"]
        kwargs = {"y": inputs["y"]} if "y" in inputs else {}
        net = patcher.model.diffusion_model
        dtype = next(net.parameters()).dtype
        cast = lambda v: v.to(dtype)
        with torch.no_grad():
            base = net(cast(x), timesteps=t, context=cast(ctx), **{k: cast(v) for k, v in kwargs.items()}).float()
            lora_patcher.patch_model()
            try:
                patched = lora_patcher.model.diffusion_model(cast(x), timesteps=t, context=cast(ctx),
                                                             **{k: cast(v) for k, v in kwargs.items()}).float()
            finally:
                lora_patcher.unpatch_model()
        return base, patched

    job = json.load(open(job_path))
    results = {}
    for task in job["tasks"]:
        handler = Collect()
        logging.getLogger().addHandler(handler)
        lora = comfy.utils.load_torch_file(task["lora"])
        out = {"lora_tensors": len(lora)}
        if task["kind"] == "checkpoint":
            model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
                task["file"], output_vae=False, output_clip=True,
                model_options={"dtype": torch.float32}, te_model_options={"dtype": torch.float32})
            out["model_class"] = type(model.model).__name__
            lora_model, lora_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
            out["unet_patches"] = len(lora_model.patches)
            out["clip_patches"] = len(lora_clip.patcher.patches)
            inputs = torch.load(task["inputs"])
            base, patched = unet_outputs(model, inputs, lora_model)
            tokens = clip.tokenize(task["prompt"])
            cond_base = clip.encode_from_tokens(tokens).float()
            cond_lora = lora_clip.encode_from_tokens(tokens).float()
            torch.save({"base": base, "lora": patched, "cond_base": cond_base, "cond_lora": cond_lora,
                        "tokens": torch.tensor([t for t, _ in tokens["l"][0]])}, task["out"])
        elif task["kind"] == "unet":
            model = comfy.sd.load_diffusion_model(task["file"], model_options={"dtype": getattr(torch, task["dtype"])})
            out["model_class"] = type(model.model).__name__
            lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 1.0)
            out["unet_patches"] = len(lora_model.patches)
            base, patched = unet_outputs(model, torch.load(task["inputs"]), lora_model)
            torch.save({"base": base, "lora": patched}, task["out"])
        elif task["kind"] == "sdxl_clip_keys":
            clip_model = comfy.sdxl_clip.SDXLClipModel(device="meta")
            key_map = comfy.lora.model_lora_keys_clip(clip_model, {})
            loaded = comfy.lora.load_lora(lora, key_map)
            out["clip_patches"] = len(loaded)
        logging.getLogger().removeHandler(handler)
        out["not_loaded"] = not_loaded(handler.lines)
        results[task["name"]] = out
        print("task done", task["name"], flush=True)
    print("RESULT " + json.dumps(results))
""")


def _init_random(module: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), biases 0, norms 1: random but with sane activations at any depth."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()


def _materialize_lora(network, seed: int, scale: float = 0.5) -> None:
    """LoRA layers built on the meta device (or zero-initialised) -> real random matrices on the CPU."""
    import peft

    generator = torch.Generator().manual_seed(seed)
    for component in network.components.values():
        for module in component.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                for part in (module.lora_A["default"], module.lora_B["default"]):
                    if part.weight.is_meta:
                        part.to_empty(device="cpu")
                    with torch.no_grad():
                        fan_in = part.weight[0].numel()
                        part.weight.copy_(
                            scale * torch.randn(part.weight.shape, generator=generator) / fan_in**0.5
                        )


def _meta_unet(arch: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    from charforge.engine.train.models import shipped_config_dir

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(shipped_config_dir(arch) / "unet")
        )
    return unet.to(dtype)


def _run_comfy(comfy, tmp_path, tasks) -> dict:
    return run_comfy_script(comfy, tmp_path, COMFY_SIDE, {"tasks": tasks})


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _relative_error(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||a - b|| / ||scale|| (scale: b)."""
    return float((a.double() - b.double()).norm() / (b if scale is None else scale).double().norm())


def rounding_tolerance(dtype: torch.dtype, depth: int, margin: float = 3.0) -> float:
    """How far (relative L2 norm) two correct implementations of a `depth`-block network may disagree in `dtype`.

    Each block rounds its result to `dtype`: a relative error of about eps/2 per block. Rounding errors of
    independent operations add like a random walk, so after `depth` blocks one implementation is about
    sqrt(depth) * eps / 2 away from the exact result, and two implementations with different kernels (ComfyUI's
    and diffusers') are sqrt(2) times that apart. `margin` covers what the walk leaves out (attention's
    softmax, normalisations); a wrong conversion or an unapplied LoRA misses by the size of the output."""
    return margin * (2 * depth) ** 0.5 * torch.finfo(dtype).eps / 2


@pytest.fixture
def comfy():
    path = checkout()
    assert (path / "comfy" / "sd1_tokenizer" / "vocab.json").is_file()
    return path


def test_sd15_single_file_and_lora_in_real_comfyui(comfy, tmp_path, monkeypatch):
    """Full SD1.5 checkpoint: our loader (shipped configs, ComfyUI's vocabulary) and ComfyUI's loader agree,
    and ComfyUI applies our U-Net + text-encoder LoRA exactly as peft does."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from charforge.engine.models.single_file import pipeline_to_single_file_state_dict
    from charforge.engine.train.export import export_lora, lora_metadata
    from charforge.engine.train.lora import LoraSettings, add_lora
    from charforge.engine.train.models import encode_prompts, load_base_model, shipped_config_dir, tokenize

    monkeypatch.setenv("COMFYUI_DIR", str(comfy))
    monkeypatch.delenv("CHARFORGE_CLIP_TOKENIZER", raising=False)
    config_dir = shipped_config_dir("sd15")
    unet = _meta_unet("sd15", torch.float32).to_empty(device="cpu")
    _init_random(unet, 0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    state = pipeline_to_single_file_state_dict(
        unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), unet_config=dict(unet.config)
    )
    checkpoint = tmp_path / "sd15_full.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(checkpoint))
    del unet, vae, text_encoder, state
    gc.collect()

    model = load_base_model(checkpoint)  # shipped configs + comfy/sd1_tokenizer, offline
    assert model.arch == "sd15"
    assert sum(p.numel() for p in model.unet.parameters()) == 859_520_964
    assert model.tokenizers[0].name_or_path.endswith("sd1_tokenizer")
    prompt = "a photo of ohwx woman, smiling"
    generator = torch.Generator().manual_seed(5)
    inputs = {"x": torch.randn(1, 4, 8, 8, generator=generator), "t": torch.tensor([500])}
    with torch.no_grad():
        base_cond = encode_prompts(model, [prompt]).hidden
        inputs["context"] = torch.randn(1, 77, 768, generator=generator)
        base_out = model.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
    settings = LoraSettings(rank=8, alpha=4.0, conv_rank=4, conv_alpha=2.0, train_text_encoder=True)
    network = add_lora(model.components(), settings, seed=0)
    _materialize_lora(network, seed=2)
    with torch.no_grad():
        lora_cond = encode_prompts(model, [prompt]).hidden
        lora_out = model.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
    lora_path = export_lora(
        tmp_path / "sd15_lora.safetensors",
        network,
        "sd15",
        model.unet_config,
        lora_metadata(arch="sd15", settings=settings, title="t", trigger_phrase="ohwx"),
        dtype=torch.float32,
    )
    modules = network.modules()
    unet_modules = sum(m.component == "unet" for m in modules)
    ids = tokenize(model.tokenizers[0], [prompt])[0, 0]  # (prompts, windows, 77)
    torch.save(inputs, tmp_path / "inputs.pt")
    del model, network
    gc.collect()

    results = _run_comfy(
        comfy,
        tmp_path,
        [
            {
                "name": "sd15",
                "kind": "checkpoint",
                "file": str(checkpoint),
                "lora": str(lora_path),
                "inputs": str(tmp_path / "inputs.pt"),
                "prompt": prompt,
                "out": str(tmp_path / "sd15_out.pt"),
            }
        ],
    )
    result = results["sd15"]
    print("SD1.5 in ComfyUI:", json.dumps(result))
    assert result["model_class"] == "BaseModel"  # ComfyUI's SD1.5 model
    assert result["not_loaded"] == []
    assert result["lora_tensors"] == 3 * len(modules)
    assert result["unet_patches"] == unet_modules
    assert result["clip_patches"] == len(modules) - unet_modules
    out = torch.load(tmp_path / "sd15_out.pt")
    assert torch.equal(out["tokens"][: len(ids)], ids)  # the same vocabulary, the same ids
    torch.testing.assert_close(out["base"], base_out, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out["lora"], lora_out, rtol=1e-3, atol=1e-3)
    assert (out["lora"] - out["base"]).abs().max() > 1e-2
    torch.testing.assert_close(out["cond_base"], base_cond, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(out["cond_lora"], lora_cond, rtol=1e-3, atol=2e-3)
    assert (out["cond_lora"] - out["cond_base"]).abs().max() > 1e-2


def test_sdxl_unet_and_text_encoder_lora_in_real_comfyui(comfy, tmp_path):
    """Full SDXL U-Net (bf16) through ComfyUI's diffusion-model loader + our LoRA; SDXL text-encoder keys."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from charforge.engine.models.single_file import unet_to_ldm
    from charforge.engine.train.export import export_lora, lora_metadata
    from charforge.engine.train.lora import LoraSettings, add_lora
    from charforge.engine.train.models import shipped_config_dir

    unet = _meta_unet("sdxl", torch.bfloat16).to_empty(device="cpu")
    _init_random(unet, 0)
    unet_file = tmp_path / "sdxl_unet.safetensors"
    save_file(
        {k: v.contiguous() for k, v in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()},
        str(unet_file),
    )
    generator = torch.Generator().manual_seed(5)
    text_embeds, time_ids = (
        torch.randn(1, 1280, generator=generator),
        torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    )
    inputs = {
        "x": torch.randn(1, 4, 8, 8, generator=generator),
        "t": torch.tensor([500]),
        "context": torch.randn(1, 77, 2048, generator=generator),
    }
    with torch.no_grad():  # what ComfyUI calls y: pooled text + embedded size/crop ids
        time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(1, -1)
        inputs["y"] = torch.cat([text_embeds, time_embeds], dim=-1)
    added = {"text_embeds": text_embeds.to(torch.bfloat16), "time_ids": time_ids.to(torch.bfloat16)}

    def forward(unet):
        with torch.no_grad():
            return unet(
                inputs["x"].to(torch.bfloat16),
                inputs["t"],
                encoder_hidden_states=inputs["context"].to(torch.bfloat16),
                added_cond_kwargs=added,
            ).sample.float()

    base_out = forward(unet)
    # The blocks run one after another: each ResNet block and each transformer block rounds once to bf16.
    depth = sum(type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock") for m in unet.modules())
    settings = LoraSettings(rank=8, alpha=4.0)
    network = add_lora({"unet": unet}, settings, seed=0)
    _materialize_lora(network, seed=2)
    lora_out = forward(unet)
    meta = lora_metadata(arch="sdxl", settings=settings, title="t")
    unet_lora = export_lora(tmp_path / "sdxl_unet_lora.safetensors", network, "sdxl", dict(unet.config), meta)
    unet_modules = len(network.modules())
    torch.save(inputs, tmp_path / "inputs.pt")
    del unet, network
    gc.collect()

    # Text encoders at full size on the meta device; only the LoRA matrices are real.
    config_dir = shipped_config_dir("sdxl")
    with torch.device("meta"):
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
    te_settings = LoraSettings(rank=4, alpha=4.0, train_text_encoder=True)
    te_network = add_lora({"text_encoder": te1, "text_encoder_2": te2}, te_settings, seed=1)
    _materialize_lora(te_network, seed=3)
    te_lora = export_lora(tmp_path / "sdxl_te_lora.safetensors", te_network, "sdxl", {}, meta)
    te_modules = len(te_network.modules())
    assert te_modules == 6 * (12 + 32)

    results = _run_comfy(
        comfy,
        tmp_path,
        [
            {
                "name": "unet",
                "kind": "unet",
                "file": str(unet_file),
                "lora": str(unet_lora),
                "dtype": "bfloat16",
                "inputs": str(tmp_path / "inputs.pt"),
                "out": str(tmp_path / "sdxl_out.pt"),
            },
            {"name": "te", "kind": "sdxl_clip_keys", "lora": str(te_lora)},
        ],
    )
    print("SDXL in ComfyUI:", json.dumps(results))
    assert results["unet"]["model_class"] == "SDXL"
    assert results["unet"]["not_loaded"] == [] and results["te"]["not_loaded"] == []
    assert results["unet"]["lora_tensors"] == 3 * unet_modules == 3 * 722
    assert results["unet"]["unet_patches"] == unet_modules
    assert results["te"]["lora_tensors"] == 3 * te_modules and results["te"]["clip_patches"] == te_modules
    out = torch.load(tmp_path / "sdxl_out.pt")
    assert (out["lora"] - out["base"]).abs().max() > 1e-2
    # bf16 on both sides, different kernels: the outputs agree to bf16 rounding through `depth` blocks, and the
    # LoRA moves ComfyUI's output as it moves peft's: the deltas differ by no more than the two outputs' rounding.
    tolerance = rounding_tolerance(torch.bfloat16, depth)
    base_error = _relative_error(out["base"], base_out)
    delta, delta_ours = out["lora"] - out["base"], lora_out - base_out
    delta_error = _relative_error(delta, delta_ours, scale=base_out)  # in units of the output's size
    print(
        f"SDXL depth {depth}: tolerance {tolerance:.4f}, base error {base_error:.4f}, delta error {delta_error:.4f}, "
        f"delta size {float(delta_ours.norm() / base_out.norm()):.4f}, delta cosine {_cosine(delta, delta_ours):.4f}"
    )
    assert base_error < tolerance
    assert delta_error < 2 * tolerance
    # The LoRA's effect stands out of the rounding, so the two checks above can tell a LoRA that was not applied.
    assert float(delta_ours.norm() / base_out.norm()) > 4 * tolerance
