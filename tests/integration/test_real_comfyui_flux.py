"""Opt-in: Flux.1 and SD3.5 transformers and CharForge LoRAs for them, loaded by a real ComfyUI (COMFYUI_DIR set).

- **Flux.1-dev**, full width and shallow (1 double + 1 single block, 545 M random parameters, bf16; written once
  per session into a temporary cache): ComfyUI's own ``UNETLoader`` must load it with no missing or unexpected
  tensor and detect Flux.1-dev (its guidance embedder), with the depth of the file.
- **SD3.5 Medium**-shaped, tiny (2 blocks of width 128, rms q/k norm, the second attention in block 0, a
  pre-only last block): ``UNETLoader`` must detect SD3 with exactly that structure.
- For each, a CharForge LoRA on every linear layer (all-linear; split diffusers modules fused by the library,
  as the trainer exports them) goes through the stock ``LoraLoaderModelOnly``, in the kohya layout (fused
  ``lora_unet_double_blocks_*`` / ``joint_blocks_*``) and in the diffusers/peft layout (split ``to_q`` /
  ``to_k`` / ``to_v``, ``proj_mlp``, ``norm_out.linear``: ComfyUI patches slices and swaps halves itself). No
  key may be reported as not loaded, every weight the LoRA adapts must be patched, and ComfyUI's patched
  weight minus the original must equal the LoRA's delta as the library computes it.

The ComfyUI side runs in ComfyUI's Python as a subprocess, like test_real_comfyui_lora.py.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file

from cf_testing.flow_checkpoints import (
    SHALLOW_FLUX,
    TINY_SD35,
    comfy_flux_folders,
    shallow_flux_shapes,
    write_tiny_sd35,
)
from cf_testing.real_comfyui import checkout, run_comfy_script, suite_marks
from charforge.engine.library import flow_layouts as fl
from charforge.engine.library import formats
from charforge.engine.library.formats import LoraModule, LoraState

pytestmark = suite_marks()

COMFY_SIDE = textwrap.dedent(r"""
    import json, logging, os, sys
    sys.path.insert(0, os.getcwd())  # run with cwd = the ComfyUI folder
    job = json.load(open(sys.argv[-1]))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import folder_paths
    import comfy.lora, comfy.utils
    import nodes

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines = []
        def emit(self, record):
            self.lines.append(record.getMessage())

    folder_paths.add_model_folder_path("diffusion_models", job["models"], is_default=True)
    folder_paths.add_model_folder_path("loras", job["loras"], is_default=True)
    results = {}
    for task in job["tasks"]:
        handler = Collect()
        logging.getLogger().addHandler(handler)
        (model,) = nodes.UNETLoader().load_unet(task["model"], "default")
        loading = list(handler.lines)
        handler.lines.clear()
        out = {
            "model_class": type(model.model).__name__,
            "config_class": type(model.model.model_config).__name__,
            "unet_config": {k: v for k, v in model.model.model_config.unet_config.items()
                            if isinstance(v, (int, float, str, bool, list)) or v is None},
            "missing_or_unexpected": [l for l in loading if l.startswith(("unet missing", "unet unexpected"))],
            "loras": {},
        }
        expected = comfy.utils.load_torch_file(task["expected"])
        for lora in task["loras"]:
            handler.lines.clear()
            (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora, 1.0)
            errors = {}
            for key, patches in patched.patches.items():
                base = comfy.utils.get_attr(patched.model, key).float()
                weight = comfy.lora.calculate_weight(patches, base.clone(), key)
                stem = key[len("diffusion_model."):-len(".weight")]
                delta = expected[stem + ".up"].float() @ expected[stem + ".down"].float()
                errors[stem] = float((weight - base - delta.reshape(base.shape)).norm() / delta.norm())
            out["loras"][lora] = {
                "patched": sorted(errors),
                "relative_error": errors,
                "not_loaded": [l for l in handler.lines if "lora key not loaded" in l or l.startswith("NOT LOADED")],
            }
        logging.getLogger().removeHandler(handler)
        results[task["name"]] = out
        print("task done", task["name"], flush=True)
    print("RESULT " + json.dumps(results))
""")


def _split_origin_lora(variant, seed: int, rank: int = 4) -> LoraState:
    """A LoRA on every linear of `variant`, made the trainer's way: one random LoRA per diffusers module,
    fused by the library (block-diagonal qkv / linear1)."""
    generator = torch.Generator().manual_seed(seed)
    split = {}
    for name, shape in fl.lora_targets(variant).items():
        target = fl.target_from_single_file(variant.family, name)
        for part, rows in zip(target.parts, fl.part_rows(target, shape[0]), strict=True):
            down = torch.randn(rank, *shape[1:], generator=generator) / shape[1] ** 0.5
            up = torch.randn(rows, rank, *([1, 1] if len(shape) == 4 else []), generator=generator) * 0.1
            split[part] = fl.Factors(
                down.to(torch.bfloat16), up.to(torch.bfloat16), torch.tensor(float(rank) / 2)
            )
    fused = fl.fuse_modules(variant.family, split)
    modules = {("unet", n): LoraModule("unet", n, f.down, f.up, f.alpha) for n, f in fused.items()}
    return LoraState(variant.family, modules, {"modelspec.title": f"cf-{variant.arch}"}, "")


def _expected(state: LoraState, path) -> None:
    """Each adapted weight's delta as low-rank factors (up with alpha / rank folded in, down), float32."""
    tensors = {}
    for (_, name), module in state.modules.items():
        tensors[name + ".up"] = (module.up.float().flatten(1) * module.scale).contiguous()
        tensors[name + ".down"] = module.down.float().flatten(1).contiguous()
    save_file(tensors, str(path))


@pytest.fixture
def comfy():
    return checkout()


def test_flux_and_sd35_files_and_loras_in_real_comfyui(comfy, tmp_path):
    models, loras, _ = comfy_flux_folders(tmp_path)
    write_tiny_sd35(models / "sd35_tiny.safetensors")
    tasks = []
    for name, variant, model in (
        ("flux", SHALLOW_FLUX, "flux_shallow.safetensors"),
        ("sd3", TINY_SD35, "sd35_tiny.safetensors"),
    ):
        state = _split_origin_lora(variant, seed=len(tasks) + 1)
        for fmt in ("kohya", "peft"):
            formats.write_state(state, loras / f"{name}_{fmt}.safetensors", fmt)
        _expected(state, tmp_path / f"{name}_expected.safetensors")
        tasks.append(
            {
                "name": name,
                "model": model,
                "loras": [f"{name}_kohya.safetensors", f"{name}_peft.safetensors"],
                "expected": str(tmp_path / f"{name}_expected.safetensors"),
                "modules": len(state.modules),
            }
        )
    job = {"models": str(models), "loras": str(loras), "tasks": tasks}
    results = run_comfy_script(comfy, tmp_path, COMFY_SIDE, job)

    flux, sd3 = results["flux"], results["sd3"]
    assert (flux["model_class"], flux["config_class"]) == ("Flux", "Flux")  # dev: guidance_in present
    assert flux["unet_config"]["depth"] == 1 and flux["unet_config"]["depth_single_blocks"] == 1
    assert flux["unet_config"]["guidance_embed"] is True and flux["unet_config"]["hidden_size"] == 3072
    assert (sd3["model_class"], sd3["config_class"]) == ("SD3", "SD3")
    assert sd3["unet_config"]["depth"] == 2 and sd3["unet_config"]["qk_norm"] == "rms"
    assert sd3["unet_config"]["x_block_self_attn_layers"] == [0]
    for task, result in zip(tasks, (flux, sd3), strict=True):
        assert result["missing_or_unexpected"] == [], task["name"]
        expected = sorted(fl.lora_targets(SHALLOW_FLUX if task["name"] == "flux" else TINY_SD35))
        for lora in task["loras"]:
            loaded = result["loras"][lora]
            assert loaded["not_loaded"] == [], lora
            assert loaded["patched"] == expected and len(expected) == task["modules"], lora
            worst = max(loaded["relative_error"].items(), key=lambda item: item[1])
            assert worst[1] < 1e-5, (lora, worst)  # float32 arithmetic on the same bf16 factors
    assert len(shallow_flux_shapes()) == 2 * len(fl.lora_targets(SHALLOW_FLUX)) + 6
