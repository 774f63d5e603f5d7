"""Opt-in: the IP-Adapter nodes against a real ComfyUI (COMFYUI_DIR set), in ComfyUI's own Python.

A tiny U-Net of ComfyUI's SD1.5 layout (ComfyUI's own model config, 32 base channels, text width 768, so
its 16 cross-attention layers are the SD1.5 slots) with random weights, a tiny CLIP vision model built by
ComfyUI's ``ClipVisionModel`` from a small config (ComfyUI's loader picks full-size ViT configs from a
file's keys, so a tiny encoder cannot come through Load CLIP Vision; the class and its ``encode_image`` are
the real ones), and a base IP-Adapter file of matching widths. Load IP-Adapter + Apply IP-Adapter patch
the MODEL; one step of ComfyUI's own sampler (``common_ksampler``, CFG 3) with the patched MODEL must give
a different latent from the plain MODEL, the same one (to float rounding: the patch's attention is
torch's, not ComfyUI's) at weight 0 and when start/end leave no step, and
the plain MODEL must be unchanged afterwards (the node patches a clone). A FaceID file with its LoRA goes
through Apply IP-Adapter FaceID: after ComfyUI loads the patched MODEL, the 128 attention projections hold
W + strength · up @ down (the expected keys written out for ComfyUI's SD1.5 layout) and no other weight
changed; loading the plain MODEL restores every weight.
"""

from __future__ import annotations

import textwrap

import cf_testing.real_comfyui as real
from cf_testing.comfyui import REPO_ROOT

pytestmark = real.suite_marks()

SETUP = real.comfy_script(
    """
    import comfy.clip_vision, comfy.model_patcher, comfy.supported_models
    import nodes
    from safetensors.torch import save_file
    """,
    r"""
    from charforge.nodes import guide

    torch.manual_seed(0)
    cfg = dict(job["unet_config"], dtype=torch.float32)
    model = comfy.supported_models.SD15(cfg).get_model({}, device="cpu")  # detection wants full size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape) / param[0].numel() ** 0.5)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    positive = [[torch.randn(1, 7, 768, generator=torch.Generator().manual_seed(5)), {}]]
    negative = [[torch.zeros(1, 7, 768), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def step(m):
        with torch.no_grad():
            return nodes.common_ksampler(m, 7, 1, 3.0, "euler", "normal", positive, negative, latent)[0]["samples"]
""",
)

COMFY_SIDE = SETUP + textwrap.dedent(r"""
    with open(job["clip_config"], "w") as f:
        json.dump(job["clip_vision"], f)
    clip_vision = comfy.clip_vision.ClipVisionModel(job["clip_config"])
    clip_vision.load_sd({k: torch.randn(v.shape) * 0.05 for k, v in clip_vision.get_sd().items()})

    embed, widths = job["clip_vision"]["projection_dim"], job["widths"]
    state = {"image_proj.proj.weight": torch.randn(4 * 768, embed) / embed ** 0.5,
             "image_proj.proj.bias": torch.zeros(4 * 768),
             "image_proj.norm.weight": torch.ones(768), "image_proj.norm.bias": torch.zeros(768)}
    for n, width in enumerate(widths):
        for key in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * n + 1}.{key}.weight"] = torch.randn(width, 768) / 768 ** 0.5 * 4
    save_file(state, job["adapter"])

    loaded, variant = guide.LoadIPAdapter().load(job["adapter"])["result"]
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))

    def apply(weight, start, end):
        return guide.ApplyIPAdapter().apply(patcher, loaded, clip_vision, image, weight, start, end)[0]

    plain = step(patcher)
    results = {"variant": variant}
    for name, args in {"on": (1.0, 0.0, 1.0), "weight0": (0.0, 0.0, 1.0), "closed": (1.0, 1.0, 1.0)}.items():
        out = step(apply(*args))
        results[name] = {"diff": float((out - plain).abs().max()), "finite": bool(torch.isfinite(out).all())}
    results["plain_again"] = float((step(patcher) - plain).abs().max())
    results["scale"] = float(plain.abs().max())
    print("RESULT " + json.dumps(results))
""")

FACEID_SIDE = SETUP + textwrap.dedent(r"""
    import types
    import comfy.model_management

    # A FaceID file of the tiny U-Net's widths with its LoRA (rank 4) on every attention layer.
    widths, rank = job["widths"], 4
    state = {"image_proj.proj.0.weight": torch.randn(16, 512) / 512 ** 0.5, "image_proj.proj.0.bias": torch.zeros(16),
             "image_proj.proj.2.weight": torch.randn(2 * 768, 16) / 4, "image_proj.proj.2.bias": torch.zeros(2 * 768),
             "image_proj.norm.weight": torch.ones(768), "image_proj.norm.bias": torch.zeros(768)}
    for n, width in enumerate(widths):
        for key in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * n + 1}.{key}.weight"] = torch.randn(width, 768) / 768 ** 0.5
        for index in (2 * n, 2 * n + 1):
            for key in ("to_q", "to_k", "to_v", "to_out"):
                inp = 768 if index % 2 and key in ("to_k", "to_v") else width
                state[f"ip_adapter.{index}.{key}_lora.down.weight"] = torch.randn(rank, inp) / inp ** 0.5
                state[f"ip_adapter.{index}.{key}_lora.up.weight"] = torch.randn(width, rank) / rank ** 0.5
    save_file(state, job["adapter"])

    # Where each file layer's LoRA must land, written out for ComfyUI's SD1.5 layout: attention blocks in
    # the file's order (input 1, 2, 4, 5, 7, 8, output 3-11, middle), each one transformer with attn1, attn2.
    blocks = [f"input_blocks.{n}.1" for n in (1, 2, 4, 5, 7, 8)] + [f"output_blocks.{n}.1" for n in range(3, 12)]
    blocks.append("middle_block.1")
    projections = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
    targets = {}
    for b, block in enumerate(blocks):
        for offset, attn in enumerate(("attn1", "attn2")):
            for key, proj in projections.items():
                targets[f"diffusion_model.{block}.transformer_blocks.0.{attn}.{proj}.weight"] = f"{2 * b + offset}.{key}"

    loaded, variant = guide.LoadIPAdapter().load(job["adapter"])["result"]
    identity = types.SimpleNamespace(centroid=torch.nn.functional.normalize(torch.randn(512), dim=0).numpy())
    base = {k: v.detach().clone() for k, v in patcher.model_state_dict().items()}
    plain = step(patcher)

    def apply(lora_strength):
        return guide.ApplyIPAdapterFaceID().apply(
            patcher, loaded, identity, 1.0, 0.0, 1.0, 1.0, lora_strength=lora_strength)[0]

    strength = 0.7
    patched = apply(strength)
    comfy.model_management.load_model_gpu(patched)  # ComfyUI patches the weights as it does for a sampler
    now = {k: v.detach().clone() for k, v in patched.model.state_dict().items()}
    errors = []
    for key, stem in targets.items():
        want = base[key] + strength * (state[f"ip_adapter.{stem}_lora.up.weight"] @ state[f"ip_adapter.{stem}_lora.down.weight"])
        errors.append(float((now[key] - want).abs().max()))
    changed = sorted(k for k in base if not torch.equal(now[k], base[k]))
    results = {"variant": variant, "keys": len(targets), "max_error": max(errors), "changed": changed,
               "expected": sorted(targets)}
    on, lora_off = step(patched), step(apply(0.0))
    comfy.model_management.load_model_gpu(patcher)  # the plain MODEL again: ComfyUI takes the patches off
    restored = patcher.model.state_dict()
    results["plain_weights_diff"] = max(float((restored[k] - base[k]).abs().max()) for k in base)
    results["plain_again"] = float((step(patcher) - plain).abs().max())
    results["lora_effect"] = float((on - lora_off).abs().max())
    results["finite"] = bool(torch.isfinite(on).all())
    results["scale"] = float(plain.abs().max())
    print("RESULT " + json.dumps(results))
""")

# ComfyUI's SD1.5 U-Net config at 32 base channels (SD15 adds 8 heads).
UNET_CONFIG = real.small_unet_config("sd15")
# Cross-attention widths in the file's layer order (down blocks, up blocks, middle block).
WIDTHS = [32, 32, 64, 64, 128, 128] + [128] * 3 + [64] * 3 + [32] * 3 + [128]


def test_apply_ip_adapter_changes_a_comfyui_sampler_step(tmp_path):
    comfy = real.checkout()
    job = {
        "pack_parent": str(REPO_ROOT / "custom_nodes"),
        "unet_config": UNET_CONFIG,
        "widths": WIDTHS,
        "clip_vision": real.TINY_CLIP_VISION,
        "clip_config": str(tmp_path / "clip_vision.json"),
        "adapter": str(tmp_path / "ip-adapter_sd15_tiny.safetensors"),
    }
    result = real.run_comfy_script(comfy, tmp_path, COMFY_SIDE, job, timeout=600)
    assert result["variant"] == "base (sd15)"
    # The patched layers attend with torch's SDPA, ComfyUI's own layers with its CPU attention: the two
    # agree to float32 rounding, so "unchanged" means within 1e-4 of the output's size.
    tolerance = 1e-4 * max(result["scale"], 1.0)
    assert result["on"]["finite"] and result["on"]["diff"] > 100 * tolerance, result
    assert result["weight0"]["diff"] <= tolerance, result
    assert result["closed"]["diff"] <= tolerance, result
    assert result["plain_again"] == 0.0, result


def test_faceid_lora_is_patched_into_comfyui_weights(tmp_path):
    """The FaceID file's LoRA, patched by Apply IP-Adapter FaceID, is what ComfyUI's model loading writes
    into the U-Net's weights (W + strength · up @ down on exactly the 128 attention projections), and
    loading the plain MODEL afterwards restores every weight."""
    comfy = real.checkout()
    job = {
        "pack_parent": str(REPO_ROOT / "custom_nodes"),
        "unet_config": UNET_CONFIG,
        "widths": WIDTHS,
        "adapter": str(tmp_path / "ip-adapter-faceid_sd15_tiny.safetensors"),
    }
    result = real.run_comfy_script(comfy, tmp_path, FACEID_SIDE, job, timeout=600)
    assert result["variant"] == "faceid (sd15)"
    assert result["keys"] == 128 and result["changed"] == result["expected"], result["changed"][:8]
    assert result["max_error"] < 1e-5, result["max_error"]
    assert result["plain_weights_diff"] == 0.0 and result["plain_again"] == 0.0, result
    assert result["finite"] and result["lora_effect"] > 1e-3 * max(result["scale"], 1.0), result
