"""The video denoising step is ready for the GPU: one graph for torch.compile, and compiled == eager.

A window's guided prediction (`generate.window_prediction`: both prompts in one batch through diffusers'
motion U-Net, with a character LoRA on it as peft layers, then classifier-free guidance) on a motion U-Net
cut to one block of each kind SD1.5 + a v3 module has (graph breaks come from code paths, not from how many
blocks repeat them). The scheduler step after it is a few element-wise operations on the whole clip and stays
eager (its tables are indexed with CPU timesteps on purpose: generate.py).
"""

from __future__ import annotations

import pytest
import torch

from charforge.engine.video.generate import _WindowPlan, window_prediction
from charforge.engine.video.models import motion_unet

pytestmark = pytest.mark.usefixtures("one_thread")  # cf_testing/threads.py

FRAMES = 4
CFG = 7.5


@pytest.fixture(scope="module")
def step_parts():
    """(motion U-Net in eval mode, window latents, timestep, window plan) on the CPU, seeded."""
    from diffusers import MotionAdapter, UNet2DConditionModel
    from peft import LoraConfig

    from cf_testing.models import TINY_SD15_UNET
    from cf_testing.video_models import tiny_motion_config

    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(
        **{
            **TINY_SD15_UNET,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 32],
            "layers_per_block": 1,
        }
    )
    adapter = MotionAdapter(
        **{**tiny_motion_config("v3"), "block_out_channels": (32, 32), "motion_layers_per_block": 1}
    )
    for name, param in adapter.named_parameters():  # a fresh adapter's output projections are zero
        if "proj_out" in name:
            torch.nn.init.normal_(param, std=0.02)
    unet = motion_unet(unet2d, adapter).eval().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in unet.named_parameters():  # peft starts lora_B at zero: give the LoRA an effect
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    latents = torch.randn(1, 4, FRAMES, 8, 8)
    text = torch.randn(2 * FRAMES, 77, TINY_SD15_UNET["cross_attention_dim"])
    plan = _WindowPlan(torch.arange(FRAMES), torch.ones(FRAMES), text, {})
    return unet, latents, torch.tensor(501), plan


def test_the_window_step_is_one_graph_and_compiled_agrees_with_eager(step_parts):
    """One dynamo trace serves both checks (tracing the motion U-Net is most of this test's time).

    ``fullgraph=True`` raises at the first graph break, with its reason; the backend sees every graph dynamo
    makes. ``RuntimeOptions(compile=True)`` compiles the U-Net with inductor on the GPU; ``aot_eager`` here
    runs the same dynamo graph without building C++ kernels (minutes on two shared CPU cores)."""
    from torch._dynamo.backends.debugging import aot_eager

    unet, latents, timestep, plan = step_parts
    graphs: list[torch.fx.GraphModule] = []

    def recorded(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(window_prediction, backend=recorded, fullgraph=True)
    with torch.inference_mode():
        expected = window_prediction(unet, latents, timestep, plan, CFG)
        got = compiled(unet, latents, timestep, plan, CFG)
        positive_only = _WindowPlan(plan.index, plan.weight, plan.text[FRAMES:], {})
        no_guidance = window_prediction(unet, latents, timestep, positive_only, 1.0)
    [graph] = graphs  # one graph (a break would have raised above, naming its reason)
    # The motion U-Net itself is in the graph (operations counted as torch._dynamo.explain counts them).
    assert sum(node.op == "call_function" for node in graph.graph.nodes) > 50
    assert got.shape == latents.shape
    assert not torch.allclose(expected, no_guidance)  # guidance did mix two different predictions
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
