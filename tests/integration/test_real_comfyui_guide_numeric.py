"""Opt-in: Apply IP-Adapter inside a real ComfyUI (COMFYUI_DIR set) gives diffusers' IP-Adapter numbers.

In ComfyUI's own Python, for an SD1.5-layout and an SDXL-layout U-Net (ComfyUI's ``SD15`` / ``SDXL`` model
classes at 32 base channels, so every cross-attention slot of the real layouts is there: 16 of width 768,
70 of width 2048 with SDXL's text-time conditioning) and for a base and a plus adapter:

- a tiny diffusers ``UNet2DConditionModel`` of the same layout gets random weights, and ComfyUI's model the
  same weights through ComfyUI's own diffusers -> LDM key map (``comfy.utils.unet_to_diffusers``, loaded
  strictly: every key used, none missing);
- a random IP-Adapter file of the U-Net's widths (published key names) lies in a models/ipadapter folder;
  Load IP-Adapter reads it by name and Apply IP-Adapter (weight 0.7) patches the MODEL as a user's graph
  does. Its CLIP vision input is ComfyUI's own ``ClipVisionModel`` built from a tiny config (ComfyUI's loader
  picks full-size ViT configs from a file's keys, so a tiny encoder cannot come through Load CLIP Vision);
- ComfyUI's sampler (``common_ksampler``, 3 Euler steps: σ at t = 999, 499.5 and 0, CFG 3, positive and
  negative prompt batched, so the patch sees ``cond_or_uncond``) runs the MODEL; a
  ``model_function_wrapper`` records every model call (its batch, sigma, ``cond_or_uncond`` and denoised
  output) and a hook on the U-Net its raw noise prediction.

The reference for each recorded call is diffusers' U-Net with ``_load_ip_adapter_weights`` of the same file
(scale 0.7) and ``image_embeds`` (the CLIP image embedding for base, penultimate hidden states for plus; the
negative rows get a zero embedding or an all-black image's hidden states, the node's documented choice),
on inputs built here from the call's batch and ``cond_or_uncond``: sample x / sqrt(σ² + 1) (ComfyUI's
epsilon input scaling), text of the positive or negative prompt per row, and for SDXL the pooled embedding
and size / crop time ids. The timestep is ComfyUI's own: it rounds σ to the nearest of the 1000 training
timesteps (asserted: a whole number within 0.5 of σ's place on SD's noise schedule, from diffusers'
``DDPMScheduler`` betas interpolated in log σ; the middle step's σ lies at 499.5 and ComfyUI takes 500),
and diffusers' U-Net gets that same number. Asserted: ComfyUI's U-Net input equals the scaled sample; its
noise prediction equals diffusers' within 1e-4 of its size (no adapter and with each adapter); its
denoised output equals x − σ · (diffusers' prediction); the adapter changes the prediction by more than
1e-3 of its size.

Measured (CPU, float32) in an earlier run of this file (2 steps, t = 999 and 0; diffusers then got σ's
interpolated place as its timestep): largest noise-prediction difference 1.0e-5 (SD1.5) and 5.0e-5 (SDXL
at t = 999, the float32 rounding of that timestep: with ComfyUI's whole timestep it is 8.1e-6, and 8.3e-7
at t = 500) against predictions of size 1.5-2.0, so about 5e-6 relative; the adapters changed the
prediction by 1.64 / 1.86 (SD1.5 base / plus) and 1.42 / 1.32 (SDXL), diffusers' by the same to 1e-5.
"""

from __future__ import annotations

import pytest

import cf_testing.real_comfyui as real
from cf_testing.comfyui import REPO_ROOT

pytestmark = real.suite_marks()

COMFY_SIDE = real.comfy_script(
    """
    import numpy as np
    import comfy.clip_vision, comfy.model_patcher, comfy.supported_models, comfy.utils
    import folder_paths
    import nodes
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    """,
    r"""
    sys.path.append(job["tests_dir"])  # after ComfyUI's own modules: tests/ has folders named like them
    from charforge import bridge
    from charforge.nodes import guide
    from cf_testing.ipadapter_files import random_ip_adapter

    sdxl = job["family"] == "sdxl"
    cross = 2048 if sdxl else 768
    weight = job["weight"]
    results = {}

    # --- the diffusers U-Net, random weights; ComfyUI's model with the same weights ---------------------
    unet_args = {k: tuple(v) if isinstance(v, list) else v for k, v in job["diffusers_config"].items()}

    def diffusers_unet(state=None):
        unet = UNet2DConditionModel(**unet_args).eval()
        if state is not None:
            unet.load_state_dict(state)
        return unet

    unet = diffusers_unet()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            else:
                param.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}

    cfg = dict(job["unet_config"], dtype=torch.float32)
    model_class = comfy.supported_models.SDXL if sdxl else comfy.supported_models.SD15
    model = model_class(cfg).get_model({}, device="cpu")
    to_ldm = comfy.utils.unet_to_diffusers(job["unet_config"])
    unmapped = sorted(k for k in state if k not in to_ldm)
    ldm = {to_ldm[k]: v for k, v in state.items() if k in to_ldm}
    load = model.diffusion_model.load_state_dict(ldm, strict=False)
    results["weights"] = {"unmapped": unmapped, "missing": sorted(load.missing_keys),
                          "unexpected": sorted(load.unexpected_keys), "count": len(ldm), "of": len(state)}
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))

    raw = []  # what ComfyUI's U-Net got and predicted, call by call
    def hook(module, args, kwargs, output):
        raw.append({"xc": args[0].detach().clone(), "t": args[1].detach().clone(),
                    "eps": output.detach().float().clone()})
    model.diffusion_model.register_forward_hook(hook, with_kwargs=True)

    # --- prompt, sizes, reference image, CLIP vision ---------------------------------------------------
    gen = torch.Generator().manual_seed(5)
    text = {0: torch.randn(1, 7, cross, generator=gen), 1: 0.5 * torch.randn(1, 7, cross, generator=gen)}
    pooled = {0: torch.randn(1, 1280, generator=gen), 1: torch.randn(1, 1280, generator=gen)}
    sizes = {"width": 1152, "height": 896, "crop_w": 32, "crop_h": 16, "target_width": 960, "target_height": 1024}
    time_ids = torch.tensor([[896.0, 1152.0, 16.0, 32.0, 1024.0, 960.0]])  # diffusers: (h, w), (top, left), (h, w)
    extra = {i: ({"pooled_output": pooled[i], **sizes} if sdxl else {}) for i in (0, 1)}
    positive, negative = [[text[0], extra[0]]], [[text[1], extra[1]]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    with open(job["clip_config"], "w") as f:
        json.dump(job["clip_vision"], f)
    clip_vision = comfy.clip_vision.ClipVisionModel(job["clip_config"])
    clip_gen = torch.Generator().manual_seed(3)
    clip_vision.load_sd({k: torch.randn(v.shape, generator=clip_gen) * 0.05 for k, v in clip_vision.get_sd().items()})
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        encoded = clip_vision.encode_image(image)
        black = clip_vision.encode_image(torch.zeros(1, 224, 224, 3))["penultimate_hidden_states"].float()
    image_inputs = {  # (positive, negative) per variant, as diffusers' image_embeds rows
        "base": (encoded["image_embeds"].float()[:, None], torch.zeros_like(encoded["image_embeds"].float())[:, None]),
        "plus": (encoded["penultimate_hidden_states"].float()[:, None], black[:, None]),
    }

    # --- SD's noise schedule, independently of ComfyUI ------------------------------------------------
    schedule = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    cumprod = np.cumprod(1 - schedule.betas.double().numpy())  # in float64: a float32 product drifts
    log_sigmas = np.log(((1 - cumprod) / cumprod) ** 0.5)

    def run(m):
        m = m.clone()
        calls = []
        def wrapper(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            calls.append({"x": args["input"].detach().clone(), "sigma": args["timestep"].detach().clone(),
                          "rows": list(args["cond_or_uncond"]), "denoised": out.detach().float().clone()})
            return out
        m.set_model_unet_function_wrapper(wrapper)
        raw.clear()
        with torch.no_grad():
            nodes.common_ksampler(m, 7, 3, 3.0, "euler", "normal", positive, negative, latent)
        assert len(raw) == len(calls), (len(raw), len(calls))
        for call, seen in zip(calls, raw):
            call.update(seen)
        return calls

    def reference(unet, call, variant):
        rows, sigma, x = call["rows"], call["sigma"].double(), call["x"]
        sample = (x.double() / (sigma ** 2 + 1).sqrt().view(-1, 1, 1, 1)).float()
        # σ's place on SD's schedule. ComfyUI gives its U-Net the nearest whole training timestep (`compare`
        # checks it against this) and diffusers' U-Net below gets that same number
        t = torch.from_numpy(np.interp(np.log(sigma.numpy()), log_sigmas, np.arange(len(log_sigmas))))
        kwargs = {}
        if sdxl:
            kwargs = {"text_embeds": torch.cat([pooled[r] for r in rows]), "time_ids": time_ids.repeat(len(rows), 1)}
        if variant is not None:
            kwargs["image_embeds"] = [torch.cat([image_inputs[variant][r] for r in rows])]
        with torch.no_grad():
            eps = unet(sample, call["t"], torch.cat([text[r] for r in rows]), added_cond_kwargs=kwargs or None).sample
        return sample, t, eps

    def compare(unet, calls, variant):
        out = []
        for call in calls:
            sample, t, eps = reference(unet, call, variant)
            scale = float(eps.abs().max())
            sigma = call["sigma"].view(-1, 1, 1, 1)
            denoised = call["x"] - sigma * eps
            out.append({
                "rows": call["rows"], "sigma": float(call["sigma"][0]), "scale": scale,
                "eps_diff": float((call["eps"] - eps).abs().max()),
                "input_diff": float((call["xc"] - sample).abs().max()),
                "t_diff": float((call["t"].double() - t).abs().max()),
                "t_whole": float((call["t"] - call["t"].round()).abs().max()),
                "denoised_diff": float((call["denoised"] - denoised).abs().max()),
                "denoised_scale": float(denoised.abs().max()),
                "finite": bool(torch.isfinite(call["eps"]).all()),
            })
        return out

    plain_calls = run(patcher)
    results["plain"] = compare(unet, plain_calls, None)

    # --- each adapter: a file in models/ipadapter, Load IP-Adapter, Apply IP-Adapter ------------------
    bridge.register_model_folders()
    folder_paths.add_model_folder_path("ipadapter", job["ipadapter_dir"])
    os.makedirs(job["ipadapter_dir"], exist_ok=True)
    widths = [unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
              for name in unet.attn_processors if name.endswith("attn2.processor")]
    results["widths"] = widths
    embed = {"base": job["clip_vision"]["projection_dim"], "plus": job["clip_vision"]["hidden_size"]}
    for seed, variant in enumerate(("base", "plus"), start=10):
        groups = random_ip_adapter(variant, widths, cross, embed[variant], seed)
        name = f"ip-adapter{'-plus' if variant == 'plus' else ''}_{job['family']}_tiny.safetensors"
        save_file({f"{g}.{k}": v.contiguous() for g, sd in groups.items() for k, v in sd.items()},
                  os.path.join(job["ipadapter_dir"], name))
        listed = name in guide.LoadIPAdapter.INPUT_TYPES()["required"]["ipadapter_name"][0]
        loaded, shown = guide.LoadIPAdapter().load(name)["result"]
        (patched,) = guide.ApplyIPAdapter().apply(patcher, loaded, clip_vision, image, weight, 0.0, 1.0)
        calls = run(patched)

        ref_unet = diffusers_unet(state)
        ref_unet._load_ip_adapter_weights([groups])
        for processor in ref_unet.attn_processors.values():
            if hasattr(processor, "scale"):
                processor.scale = [weight]
        first_plain = reference(unet, calls[0], None)[2]
        first_ref = reference(ref_unet, calls[0], variant)[2]
        results[variant] = {
            "listed": listed, "shown": shown, "calls": compare(ref_unet, calls, variant),
            "effect": float((calls[0]["eps"] - plain_calls[0]["eps"]).abs().max()),
            "reference_effect": float((first_ref - first_plain).abs().max()),
            "same_first_input": bool(torch.equal(calls[0]["x"], plain_calls[0]["x"])),
        }
        del ref_unet, groups
    print("RESULT " + json.dumps(results))
""",
)

# ComfyUI's SD1.5 U-Net config (comfy/model_detection.py) at 32 base channels (SD15 adds 8 heads), and
# the diffusers config of the same U-Net (attention_head_dim is the number of heads in diffusers' SD1.5).
SD15_UNET_CONFIG = real.small_unet_config("sd15")
SD15_DIFFUSERS = {
    "sample_size": 8,
    "layers_per_block": 2,
    "block_out_channels": [32, 64, 128, 128],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# ComfyUI's SDXL U-Net config at 32 base channels (the 70 transformer blocks of SDXL; ComfyUI's SDXL class
# sets 64-wide heads, as in SDXL), and diffusers' SDXL config at the same widths (1 and 2 heads of 64).
SDXL_UNET_CONFIG = real.small_unet_config("sdxl")
SDXL_DIFFUSERS = {
    "sample_size": 8,
    "layers_per_block": 2,
    "block_out_channels": [32, 64, 128],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [1, 1, 2],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# Cross-attention widths in the file's layer order (down blocks, up blocks, middle block).
WIDTHS = {
    "sd15": [32, 32, 64, 64, 128, 128] + [128] * 3 + [64] * 3 + [32] * 3 + [128],
    "sdxl": [64] * 4 + [128] * 20 + [128] * 30 + [64] * 6 + [128] * 10,
}
WEIGHT = 0.7


def _check_calls(calls, what):
    """Every recorded model call: ComfyUI's U-Net input, timestep, noise prediction and denoised output
    equal the diffusers reference (1e-4 of the prediction's size; the input tighter); the timestep is the
    training timestep nearest σ."""
    assert len(calls) == 3, (what, calls)  # 3 Euler steps, positive and negative batched in one call each
    for call in calls:
        assert sorted(call["rows"]) == [0, 1], (what, call)
        assert call["finite"], (what, call)
        assert call["input_diff"] <= 1e-5 * max(call["scale"], 1.0), (what, call)
        assert call["t_whole"] == 0.0 and call["t_diff"] <= 0.5 + 1e-3, (what, call)
        assert call["eps_diff"] <= 1e-4 * max(call["scale"], 1.0), (what, call)
        assert call["denoised_diff"] <= 1e-4 * max(call["denoised_scale"], 1.0), (what, call)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_apply_ip_adapter_in_comfyui_matches_diffusers(tmp_path, family):
    comfy = real.checkout()
    sdxl = family == "sdxl"
    job = {
        "family": family,
        "pack_parent": str(REPO_ROOT / "custom_nodes"),
        "tests_dir": str(REPO_ROOT / "tests"),
        "unet_config": SDXL_UNET_CONFIG if sdxl else SD15_UNET_CONFIG,
        "diffusers_config": SDXL_DIFFUSERS if sdxl else SD15_DIFFUSERS,
        "clip_vision": real.TINY_CLIP_VISION,
        "clip_config": str(tmp_path / "clip_vision.json"),
        "ipadapter_dir": str(tmp_path / "models" / "ipadapter"),
        "weight": WEIGHT,
    }
    result = real.run_comfy_script(comfy, tmp_path, COMFY_SIDE, job, timeout=900)
    print(result)  # the measured differences, for the record (pytest -s)
    weights = result["weights"]
    assert weights["unmapped"] == [] and weights["missing"] == [] and weights["unexpected"] == [], weights
    assert weights["count"] == weights["of"], weights  # no two diffusers weights onto one ComfyUI weight
    assert result["widths"] == WIDTHS[family]
    _check_calls(result["plain"], "no adapter")
    for variant in ("base", "plus"):
        outcome = result[variant]
        assert outcome["listed"] and outcome["shown"] == f"{variant} ({family})", outcome
        _check_calls(outcome["calls"], variant)
        # the first call sees the same noisy latent as without the adapter: the adapter must change it
        assert outcome["same_first_input"], outcome
        scale = max(outcome["calls"][0]["scale"], 1.0)
        assert outcome["effect"] > 1e-3 * scale and outcome["reference_effect"] > 1e-3 * scale, outcome
