"""The SD3 / SD3.5 single files the tests write are what ComfyUI reads, and its MMDiT computes what the
trainer's diffusers transformer (loaded from the same file) computes.

ComfyUI's own model detection runs on each tiny checkpoint in ComfyUI's Python: it must name the model SD3,
build the MMDiT with every tensor of the file in place (no missing, unexpected or reshaped key), and its
forward pass on fixed inputs must equal ``SD3Transformer2DModel`` loaded by ``flow.sd3.load_sd3``.
"""

from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch

from cf_testing.real_comfyui import comfyui_dir, comfyui_python, suite_marks
from cf_testing.sd3_models import build_tiny_sd3
from charforge.engine.train.flow import sd3

pytestmark = suite_marks(slow=False)


def _comfy_forward(comfy, python: str, checkpoint, inputs_path, output_path) -> str:
    script = textwrap.dedent(
        f"""
        import sys
        sys.argv = [sys.argv[0], "--cpu"]
        import comfy.options
        comfy.options.enable_args_parsing()
        import torch
        import comfy.model_detection, comfy.utils

        prefix = "model.diffusion_model."
        sd = comfy.utils.load_torch_file({str(checkpoint)!r})
        config = comfy.model_detection.model_config_from_unet(sd, prefix)
        model = config.get_model(sd, prefix, device="cpu").diffusion_model.float()
        own = model.state_dict()
        file = {{k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}}
        bad = sorted(set(own) ^ set(file)) + [k for k in own if k in file and own[k].shape != file[k].shape]
        model.load_state_dict({{k: v.float() for k, v in file.items()}})
        inputs = torch.load({str(inputs_path)!r})
        with torch.no_grad():
            out = model(inputs["x"], inputs["t"], context=inputs["context"], y=inputs["y"])
        torch.save(out, {str(output_path)!r})
        print(type(config).__name__, len(bad), bad[:5])
        """
    )
    done = subprocess.run([python, "-c", script], cwd=comfy, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("variant", ["sd3-medium", "sd35-medium", "sd35-large"])
def test_comfyui_reads_the_sd3_checkpoint_and_computes_the_same(variant, tmp_path):
    comfy = comfyui_dir()
    assert comfy is not None
    tiny = build_tiny_sd3(tmp_path / "model", variant)
    model = sd3.load_sd3(
        tiny.checkpoint,
        dtype="fp32",
        config_dir=tiny.config_dir,
        tokenizer_candidates=[tiny.clip_vocab],
        t5_tokenizer_candidates=[tiny.t5_tokenizer],
    )
    assert model.arch == variant
    generator = torch.Generator().manual_seed(0)
    config = tiny.transformer_config
    inputs = {
        "x": torch.randn(1, 16, 8, 8, generator=generator),
        "t": torch.tensor([370.0]),  # σ = 0.37: ComfyUI's SD3 sampling passes σ x 1000 as diffusers does
        "context": torch.randn(1, 21, config["joint_attention_dim"], generator=generator),
        "y": torch.randn(1, config["pooled_projection_dim"], generator=generator),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    report = _comfy_forward(
        comfy, comfyui_python(comfy), tiny.checkpoint, tmp_path / "inputs.pt", tmp_path / "out.pt"
    )
    assert report.startswith("SD3 0 "), report  # detected as SD3, every key in place
    with torch.no_grad():
        ours = model.transformer(
            hidden_states=inputs["x"],
            encoder_hidden_states=inputs["context"],
            pooled_projections=inputs["y"],
            timestep=inputs["t"],
        ).sample
    theirs = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
