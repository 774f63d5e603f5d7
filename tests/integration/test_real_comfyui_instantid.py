"""Opt-in: Apply InstantID against a real ComfyUI (COMFYUI_DIR set), in ComfyUI's own Python.

Everything is tiny and built in-process with random weights, in the real layouts:

- a U-Net of ComfyUI's SDXL layout (``comfy.supported_models.SDXL``: the 70 cross-attention layers of SDXL in
  the same blocks, text width 2048, the ``adm`` input, 32 base channels);
- an SDXL-style ControlNet (ComfyUI's own ``cldm.ControlNet``, context 2048, ``adm``, 32 base channels) written
  as an original-layout ``control_model.`` file and read back by ComfyUI's ControlNetLoader (such files have
  their configuration read from the tensor shapes, so a small one loads);
- an InstantID ``ip-adapter.bin`` (resampler 512 -> 16 tokens of 2048, 70 key / value pairs of the U-Net's
  widths) read by Load IP-Adapter, and the test face models (planted-face detector, tiny recogniser) under
  the pack name antelopev2, read by Load Face Models.

One step of ComfyUI's own sampler (``common_ksampler``, CFG 3) must change with Apply InstantID; the ControlNet
must have been called with the face tokens as its context (captured at the ControlNet module: the positive's
tokens and the zero-embedding tokens, never the 77 text tokens) and with the keypoint hint; with the IP weight at
0 (ControlNet alone) swapping in another face's tokens must change the step (the ControlNet reads them); the
conditionings must match what ComfyUI's ControlNetApplyAdvanced makes from the same hint; the plain MODEL stays
unchanged.

A second test checks the full-size key layout: the published IdentityNet (a diffusers SDXL ControlNet) as
ComfyUI's ControlNetLoader reads it, on the meta device.
"""

from __future__ import annotations

import textwrap

import cf_testing.real_comfyui as real
from cf_testing.comfyui import REPO_ROOT

pytestmark = real.suite_marks()

COMFY_SIDE = real.comfy_script(
    """
    import numpy as np
    import comfy.cldm.cldm, comfy.model_patcher, comfy.supported_models
    import folder_paths
    import nodes
    from safetensors.torch import save_file
    """,
    r"""
    from charforge.nodes import guide, score
    from charforge.nodes.guide_instantid import ApplyInstantID

    def randomise(module, seed):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if param.ndim >= 2:
                    param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
                elif name.endswith("weight"):
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)

    cfg = dict(job["unet_config"], dtype=torch.float32)
    model = comfy.supported_models.SDXL(cfg).get_model({}, device="cpu")
    randomise(model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))

    # the ControlNet: ComfyUI's class, written in the original layout, loaded by ComfyUI's loader
    cn_cfg = {k: v for k, v in job["unet_config"].items() if k not in ("out_channels", "transformer_depth_output")}
    cn_cfg |= {"transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1, "hint_channels": 3,
               "device": "cpu"}
    net = comfy.cldm.cldm.ControlNet(**cn_cfg)
    randomise(net, 1)
    os.makedirs(job["controlnet_dir"], exist_ok=True)
    save_file({"control_model." + k: v.contiguous() for k, v in net.state_dict().items()},
              os.path.join(job["controlnet_dir"], "identitynet_tiny.safetensors"))
    folder_paths.add_model_folder_path("controlnet", job["controlnet_dir"])
    folder_paths.add_model_folder_path("insightface", job["insightface_dir"])
    (control_net,) = nodes.ControlNetLoader().load_controlnet("identitynet_tiny.safetensors")

    seen = []
    def capture(module, args, kwargs):
        seen.append({"context": kwargs["context"].detach().clone(), "hint": kwargs["hint"].detach().clone()})
    control_net.control_model.register_forward_pre_hook(capture, with_kwargs=True)

    # InstantID's ip-adapter.bin with the tiny U-Net's widths
    gen = torch.Generator().manual_seed(2)
    r = lambda *shape: torch.randn(*shape, generator=gen)
    dim, ff = 64, 128
    proj = {"latents": r(1, 16, dim) / dim ** 0.5, "proj_in.weight": r(dim, 512) / 512 ** 0.5,
            "proj_in.bias": torch.zeros(dim), "proj_out.weight": r(2048, dim) / dim ** 0.5,
            "proj_out.bias": torch.zeros(2048), "norm_out.weight": torch.ones(2048), "norm_out.bias": torch.zeros(2048),
            "layers.0.0.norm1.weight": torch.ones(dim), "layers.0.0.norm1.bias": torch.zeros(dim),
            "layers.0.0.norm2.weight": torch.ones(dim), "layers.0.0.norm2.bias": torch.zeros(dim),
            "layers.0.0.to_q.weight": r(64, dim) / dim ** 0.5, "layers.0.0.to_kv.weight": r(128, dim) / dim ** 0.5,
            "layers.0.0.to_out.weight": r(dim, 64) / 8, "layers.0.1.0.weight": torch.ones(dim),
            "layers.0.1.0.bias": torch.zeros(dim), "layers.0.1.1.weight": r(ff, dim) / dim ** 0.5,
            "layers.0.1.3.weight": r(dim, ff) / ff ** 0.5}
    pairs = {f"{2 * n + 1}.{key}.weight": r(width, 2048) / 2048 ** 0.5 * 4
             for n, width in enumerate(job["widths"]) for key in ("to_k_ip", "to_v_ip")}
    torch.save({"image_proj": proj, "ip_adapter": pairs}, job["adapter"])
    loaded, variant = guide.LoadIPAdapter().load(job["adapter"])["result"]
    (face_models,) = score.LoadFaceModels().load("antelopev2", 320, "CPU")

    face = torch.from_numpy(np.load(job["face"])).float().div(255.0)[None]
    other = torch.from_numpy(np.load(job["other_face"])).float().div(255.0)[None]
    positive = [[r(1, 77, 2048), {"pooled_output": r(1, 1280)}]]
    negative = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def step(m, pos, neg):
        seen.clear()
        with torch.no_grad():
            return nodes.common_ksampler(m, 7, 1, 3.0, "euler", "normal", pos, neg, latent)[0]["samples"]

    def apply(image, weight, cn_strength=0.9):
        return ApplyInstantID().apply(patcher, loaded, control_net, face_models, image, positive, negative,
                                      weight, 0.0, 1.0, cn_strength)

    def diff(a, b):
        return float((a - b).abs().max())

    results = {"variant": variant, "controlnet": type(control_net).__name__}
    plain = step(patcher, positive, negative)
    results["scale"] = float(plain.abs().max())
    m, pos, neg, keypoints = apply(face, 0.8)
    full = step(m, pos, neg)
    results["full"] = diff(full, plain)
    results["finite"] = bool(torch.isfinite(full).all())
    cond, uncond = pos[0][1]["cross_attn_controlnet"], neg[0][1]["cross_attn_controlnet"]
    results["token_shapes"] = [list(cond.shape), list(uncond.shape)]
    results["calls"] = len(seen)
    contexts = torch.cat([s["context"] for s in seen])
    results["context_shape"] = list(contexts.shape)
    results["context_vs_cond"] = min(diff(c, cond[0]) for c in contexts)
    results["context_vs_uncond"] = min(diff(c, uncond[0]) for c in contexts)
    results["hint_shape"] = list(seen[0]["hint"].shape)
    results["hint_lit"] = float(seen[0]["hint"].abs().sum())
    results["keypoints_lit"] = float(keypoints.sum())

    m0, pos0, neg0, _ = apply(face, 0.0)
    controlnet_only = step(m0, pos0, neg0)
    results["controlnet_only"] = diff(controlnet_only, plain)
    _, pos_other, neg_other, _ = apply(other, 0.0)
    swapped = [[pos0[0][0], {**pos0[0][1], "cross_attn_controlnet": pos_other[0][1]["cross_attn_controlnet"]}]]
    results["other_tokens"] = diff(step(m0, swapped, neg0), controlnet_only)
    results["tokens_differ"] = diff(pos_other[0][1]["cross_attn_controlnet"], cond)
    m00, pos00, neg00, _ = apply(face, 0.0, cn_strength=0.0)
    results["nothing"] = diff(step(m00, pos00, neg00), plain)

    stock_pos, stock_neg = nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, control_net, keypoints, 0.9, 0.0, 1.0)
    same = []
    for ours, theirs in ((pos, stock_pos), (neg, stock_neg)):
        a, b = ours[0][1], theirs[0][1]
        same.append(sorted(set(a) - {"cross_attn_controlnet"}) == sorted(b)
                    and a["control_apply_to_uncond"] == b["control_apply_to_uncond"]
                    and torch.equal(a["control"].cond_hint_original, b["control"].cond_hint_original)
                    and a["control"].strength == b["control"].strength
                    and a["control"].timestep_percent_range == b["control"].timestep_percent_range
                    and a["control"].previous_controlnet is b["control"].previous_controlnet)
    results["same_as_stock"] = same
    results["plain_again"] = diff(step(patcher, positive, negative), plain)
    print("RESULT " + json.dumps(results))
""",
)

# ComfyUI's SDXL U-Net config at 32 base channels and 32-wide heads.
UNET_CONFIG = real.small_unet_config("sdxl", num_head_channels=32)
# Cross-attention widths in the file's layer order (down blocks, up blocks, middle block).
WIDTHS = [64] * 4 + [128] * 20 + [128] * 30 + [64] * 6 + [128] * 10


def test_apply_instantid_in_a_comfyui_sampler_step(tmp_path):
    import numpy as np

    from cf_testing.face_models import face_image, write_face_pack

    comfy = real.checkout()
    real.require_module(real.comfyui_python(comfy), "insightface")
    write_face_pack(tmp_path / "insightface", "antelopev2")
    np.save(tmp_path / "face.npy", face_image((320, 320), ((160, 144, 128),), person=0))
    np.save(tmp_path / "other.npy", face_image((320, 320), ((160, 144, 128),), person=5))
    job = {
        "pack_parent": str(REPO_ROOT / "custom_nodes"),
        "unet_config": UNET_CONFIG,
        "widths": WIDTHS,
        "adapter": str(tmp_path / "ip-adapter.bin"),
        "controlnet_dir": str(tmp_path / "controlnet"),
        "insightface_dir": str(tmp_path / "insightface"),
        "face": str(tmp_path / "face.npy"),
        "other_face": str(tmp_path / "other.npy"),
    }
    result = real.run_comfy_script(comfy, tmp_path, COMFY_SIDE, job, timeout=900)
    assert result["variant"] == "instantid (sdxl)" and result["controlnet"] == "ControlNet", result
    tolerance = 1e-4 * max(result["scale"], 1.0)
    assert result["finite"] and result["full"] > 100 * tolerance, result
    # the ControlNet ran on the face tokens (positive and negative chunk), not on the 77 text tokens
    assert result["token_shapes"] == [[1, 16, 2048], [1, 16, 2048]], result
    assert result["calls"] >= 1 and result["context_shape"][1:] == [16, 2048], result
    assert result["context_vs_cond"] < 1e-5 and result["context_vs_uncond"] < 1e-5, result
    assert result["hint_shape"][1:] == [3, 64, 64] and result["hint_lit"] > 0, (
        result
    )  # keypoints at 8 x latent
    # the ControlNet alone changes the step, and reads the tokens: another face's tokens give another step
    assert result["controlnet_only"] > 100 * tolerance, result
    assert result["tokens_differ"] > 1e-3 and result["other_tokens"] > 100 * tolerance, result
    # weight 0 and cn_strength 0: the plain step, to float rounding (the patched layers use torch's attention)
    assert result["nothing"] <= 10 * tolerance, result
    assert result["same_as_stock"] == [True, True], result
    assert result["plain_again"] == 0.0, result


KEYS_SIDE = textwrap.dedent(r"""
    import json, os, sys
    sys.path.insert(0, os.getcwd())  # cwd = the ComfyUI folder
    shapes = json.load(open(json.load(open(sys.argv[-1]))["shapes"]))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.cldm.cldm, comfy.model_detection, comfy.utils

    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    config = comfy.model_detection.unet_config_from_diffusers_unet(dict(state))
    keys = ("model_channels", "context_dim", "adm_in_channels", "transformer_depth", "transformer_depth_middle")
    out = {"detected": {key: config[key] for key in keys}}
    to_ldm = comfy.utils.unet_to_diffusers(config)
    unet_keys = [key for key in shapes if not key.startswith("controlnet_")]
    out["unmapped"] = [key for key in unet_keys if key not in to_ldm]
    mapped = {to_ldm[key]: shapes[key] for key in unet_keys if key in to_ldm}
    # the ControlNet's own parts, named as ComfyUI's loader renames them
    n = 0
    while f"controlnet_down_blocks.{n}.weight" in shapes:
        for p in ("weight", "bias"):
            mapped[f"zero_convs.{n}.0.{p}"] = shapes[f"controlnet_down_blocks.{n}.{p}"]
        n += 1
    blocks = len({key.split(".")[2] for key in shapes if key.startswith("controlnet_cond_embedding.blocks.")})
    for p in ("weight", "bias"):
        mapped[f"middle_block_out.0.{p}"] = shapes[f"controlnet_mid_block.{p}"]
        mapped[f"input_hint_block.0.{p}"] = shapes[f"controlnet_cond_embedding.conv_in.{p}"]
        for i in range(blocks):
            mapped[f"input_hint_block.{2 * (i + 1)}.{p}"] = shapes[f"controlnet_cond_embedding.blocks.{i}.{p}"]
        mapped[f"input_hint_block.{2 * (blocks + 1)}.{p}"] = shapes[f"controlnet_cond_embedding.conv_out.{p}"]
    settings = {k: v for k, v in config.items() if k != "out_channels"}
    settings |= {"hint_channels": 3, "dtype": torch.float16, "device": "meta"}  # detection leaves dtype None
    net = comfy.cldm.cldm.ControlNet(**settings)
    expected = {key: list(value.shape) for key, value in net.state_dict().items()}
    out["parameters"] = sum(value.numel() for value in net.state_dict().values())
    out["missing"] = sorted(set(expected) - set(mapped))[:10]
    out["unexpected"] = sorted(set(mapped) - set(expected))[:10]
    out["wrong_shape"] = [key for key in expected if key in mapped and mapped[key] != expected[key]][:10]
    print("RESULT " + json.dumps(out))
""")


def test_full_size_identitynet_layout_loads_as_an_sdxl_controlnet(tmp_path):
    """InstantID's IdentityNet is a diffusers ControlNetModel of SDXL's U-Net configuration (1.25 B parameters).
    Its keys and shapes (built on the meta device from SDXL's U-Net config) are recognised by ComfyUI's diffusers
    ControlNet detection as SDXL, every U-Net key has ComfyUI's original-layout name, and with the ControlNet's own
    parts renamed as ComfyUI's loader does they are exactly the parameters of ComfyUI's SDXL ``cldm.ControlNet``."""
    import inspect
    import json

    import torch
    from diffusers import ControlNetModel

    config = json.loads(
        (REPO_ROOT / "custom_nodes/charforge/engine/train/configs/sdxl/unet/config.json").read_text()
    )
    accepted = inspect.signature(ControlNetModel.__init__).parameters
    with torch.device("meta"):
        net = ControlNetModel(**{k: v for k, v in config.items() if k in accepted})
    shapes = {key: list(value.shape) for key, value in net.state_dict().items()}
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    result = real.run_comfy_script(
        real.checkout(), tmp_path, KEYS_SIDE, {"shapes": str(tmp_path / "shapes.json")}, timeout=300
    )
    assert result["detected"] == {
        "model_channels": 320,
        "context_dim": 2048,
        "adm_in_channels": 2816,
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_middle": 10,
    }, result
    assert result["unmapped"] == [] and result["missing"] == [] and result["unexpected"] == [], result
    assert result["wrong_shape"] == [], result
    assert result["parameters"] == sum(torch.Size(s).numel() for s in shapes.values()) > 1.2e9, result
