"""A tiny SD1.5 ControlNet in the original (LDM) file layout, which ComfyUI's ControlNetLoader reads and detects.

ComfyUI tells ControlNet files apart by their keys (comfy/controlnet.py ``load_controlnet_state_dict``): a diffusers
file (``controlnet_cond_embedding.conv_in.weight``) is matched against the full-size SD1.5 / SDXL configs only, so a
small one is not recognised; an LDM file (``control_model.zero_convs.0.0.weight``, as the control_v11p_sd15_*.pth
files are) has its U-Net configuration read from the tensor shapes (``model_config_from_unet``), so any size loads.

`build_sd15_controlnet` makes diffusers' ``ControlNetModel.from_unet`` of the test checkpoint's U-Net
(`models.SD15_COMFY_UNET`: full width, two levels; what `build_sd15_comfy_checkpoint` writes, so ComfyUI takes both
as SD1.5), gives the zero convolutions random weights (a fresh ControlNet's are zero, and its control would do
nothing), and writes it with the LDM names under ``control_model.``: the U-Net half through the engine's
``unet_to_ldm``, ``controlnet_down_blocks.N`` -> ``zero_convs.N.0``, ``controlnet_mid_block`` ->
``middle_block_out.0``, the conditioning embedding's convolutions -> ``input_hint_block.0, 2, 4 ... 14``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from charforge.engine.models.single_file import unet_to_ldm

from .models import SD15_COMFY_UNET, _unet


def controlnet_to_ldm(state_dict: dict[str, torch.Tensor], unet_config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel state dict in the original names, prefixed ``control_model.``."""
    unet_part, extra = {}, {}
    for key, value in state_dict.items():
        (extra if key.startswith(("controlnet_", "controlnet_cond_embedding")) else unet_part)[key] = value
    out = unet_to_ldm(unet_part, unet_config)
    blocks = sorted(
        {int(k.split(".")[2]) for k in extra if k.startswith("controlnet_cond_embedding.blocks.")}
    )
    for key, value in extra.items():
        name, _, param = key.rpartition(".")
        if name.startswith("controlnet_down_blocks."):
            out[f"zero_convs.{name.split('.')[1]}.0.{param}"] = value
        elif name == "controlnet_mid_block":
            out[f"middle_block_out.0.{param}"] = value
        elif name == "controlnet_cond_embedding.conv_in":
            out[f"input_hint_block.0.{param}"] = value
        elif name.startswith("controlnet_cond_embedding.blocks."):
            out[f"input_hint_block.{2 * (int(name.split('.')[2]) + 1)}.{param}"] = value
        elif name == "controlnet_cond_embedding.conv_out":
            out[f"input_hint_block.{2 * (len(blocks) + 1)}.{param}"] = value
        else:
            raise KeyError(f"unexpected ControlNet key {key}")
    return {f"control_model.{k}": v for k, v in out.items()}


def build_controlnet_model(seed: int = 0):
    """The diffusers ControlNetModel of the test checkpoint's U-Net, zero convolutions made random."""
    from diffusers import ControlNetModel

    unet = _unet(SD15_COMFY_UNET, seed)
    with (
        torch.random.fork_rng()
    ):  # the conditioning embedding's layers are new: the same seed, the same weights
        torch.manual_seed(seed + 5)
        controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        zero = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        zero.append(controlnet.controlnet_cond_embedding.conv_out)
        for conv in zero:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.05)
    return controlnet.eval()


def build_sd15_controlnet(path: str | Path, seed: int = 0) -> Path:
    """Write the ControlNet as an LDM-layout safetensors file (fp16) ComfyUI's ControlNetLoader loads."""
    from safetensors.torch import save_file

    controlnet = build_controlnet_model(seed)
    state = controlnet_to_ldm(controlnet.state_dict(), dict(SD15_COMFY_UNET))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path))
    return path


def tiny_video_controlnet(unet_config: dict, seed: int = 1):
    """diffusers' ControlNetModel.from_unet of a tiny U-Net of `unet_config` (the video tests' tiny SD1.5), with a
    small conditioning embedding (4, 8, 8, 16) and random zero convolutions."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
        with torch.no_grad():
            zero = [
                *net.controlnet_down_blocks,
                net.controlnet_mid_block,
                net.controlnet_cond_embedding.conv_out,
            ]
            for conv in zero:
                conv.weight.normal_(0, 0.3)
                conv.bias.normal_(0, 0.1)
    return net.eval()


def write_ldm_controlnet(net, unet_config: dict, path: str | Path) -> Path:
    """`net` as an original-layout (``control_model.``) safetensors file in float32."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = controlnet_to_ldm(net.state_dict(), unet_config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
