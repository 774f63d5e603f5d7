"""Tiny models of the real signatures for the synthesis stage (face swap, restoration, upscaling).

No download, no copied weights:

- `build_swapper_onnx` writes an ONNX file with ``inswapper_128``'s signature: inputs ``target``
  (1 x 3 x 128 x 128, RGB in 0..1) and ``source`` (1 x 512, the identity latent), output ``output``
  (1 x 3 x 128 x 128, RGB in 0..1), and a 512 x 512 ``emap`` as the graph's *last* initializer, which is
  where insightface's ``INSwapper`` reads it from. insightface's model router recognises it as a swapper
  (two inputs, a 128 x 128 image). ``mode="random"`` gives seeded random weights; ``mode="identity"``
  *sets* the weights so the output is the target crop itself (the source latent is multiplied by zero),
  which lets a test follow a planted face through a swap and back out of the paste-back.
- `build_restorer` saves a GFPGAN (v1 clean), RestoreFormer or CodeFormer network built from spandrel's
  own architecture classes, with seeded random weights, under ``params_ema`` as the released ``.pth``
  files hold them (so the key layout is the published one and spandrel's detection sees it).
  GFPGAN's and CodeFormer's sizes are fixed by spandrel's loaders (GFPGAN is always the 512 px model);
  CodeFormer keeps one transformer layer and RestoreFormer is shrunk, which their loaders read back.
- `build_upscaler` saves an ESRGAN (RRDB) network from spandrel's class (the original ESRGAN key layout,
  ``model.0.weight``, ``model.1.sub.0.RDB1...``), narrow and one block deep, as ``.safetensors``.
- `build_compact_upscaler` saves a Real-ESRGAN Compact (SRVGG) upscaler: a few convolutions at the input
  size, spandrel's cheapest upscaler (an ESRGAN's fixed 32-channel dense blocks cost ~50x more per pixel),
  for tests that only need some upscaler of a real layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SWAPPER_FILE = "inswapper_128.onnx"
OPSET = 13
IR_VERSION = 8


def build_swapper_onnx(path: str | Path, mode: str = "random", seed: int = 0) -> Path:
    """Write a swapper with inswapper_128's inputs, output and emap to `path`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if mode not in ("random", "identity"):
        raise ValueError(f"mode must be 'random' or 'identity', got {mode!r}")
    rng = np.random.default_rng(seed)
    if mode == "random":
        conv = rng.normal(0.0, 0.2, (3, 3, 3, 3)).astype(np.float32)
        project = rng.normal(0.0, 0.05, (512, 3)).astype(np.float32)
    else:
        conv = np.zeros((3, 3, 3, 3), np.float32)
        for channel in range(3):
            conv[channel, channel, 1, 1] = 1.0
        project = np.zeros((512, 3), np.float32)
    emap = rng.normal(0.0, 1.0 / np.sqrt(512), (512, 512)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(conv, "conv.weight"),
        numpy_helper.from_array(np.zeros(3, np.float32), "conv.bias"),
        numpy_helper.from_array(project, "style.weight"),
        numpy_helper.from_array(np.array([1, 3, 1, 1], np.int64), "style.shape"),
        numpy_helper.from_array(np.array(0.0, np.float32), "clip.min"),
        numpy_helper.from_array(np.array(1.0, np.float32), "clip.max"),
        numpy_helper.from_array(emap, "emap"),  # last: insightface reads graph.initializer[-1]
    ]
    nodes = [
        helper.make_node("Conv", ["target", "conv.weight", "conv.bias"], ["features"], pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["source", "style.weight"], ["style"]),
        helper.make_node("Reshape", ["style", "style.shape"], ["style4"]),
        helper.make_node("Add", ["features", "style4"], ["styled"]),
        helper.make_node("Clip", ["styled", "clip.min", "clip.max"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_inswapper",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="charforge-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


RESTORERS = ("GFPGAN", "RestoreFormer", "CodeFormer")


def restorer_network(kind: str, seed: int = 0, full_size: bool = False):
    """A randomly initialised face-restoration network from spandrel's own classes (`full_size`: the released
    RestoreFormer and CodeFormer sizes, for benchmarks; GFPGAN is always full size)."""
    import torch

    torch.manual_seed(seed)
    if kind == "GFPGAN":
        from spandrel.architectures.GFPGAN import GFPGAN

        return GFPGAN(
            out_size=512,
            num_style_feat=512,
            channel_multiplier=2,
            decoder_load_path=None,
            fix_decoder=False,
            num_mlp=8,
            input_is_latent=True,
            different_w=True,
            narrow=1,
            sft_half=True,
        )
    if kind == "RestoreFormer":
        from spandrel.architectures.RestoreFormer import RestoreFormer

        if full_size:
            return RestoreFormer()  # spandrel's defaults are the released RestoreFormer.pth's sizes
        return RestoreFormer(
            n_embed=64,
            embed_dim=32,
            ch=32,
            ch_mult=(1, 1, 1, 1, 1, 1),
            num_res_blocks=1,
            z_channels=32,
            head_size=2,
        )
    if kind == "CodeFormer":
        from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

        return CodeFormer(
            dim_embd=512,
            n_head=8,
            n_layers=9 if full_size else 1,
            codebook_size=1024,
            latent_size=256,
            connect_list=["32", "64", "128", "256"],
            fix_modules=["quantize", "generator"],
        )
    raise ValueError(f"unknown restorer {kind!r}; one of {RESTORERS}")


def build_restorer(
    path: str | Path, kind: str, seed: int = 0, half: bool = True, full_size: bool = False
) -> Path:
    """Save a random-weight `kind` restorer as a released ``.pth`` holds it ({"params_ema": state dict}).

    `half` stores floating-point tensors as float16 (half the file; spandrel loads them into a float32 model).
    """
    import torch

    network = restorer_network(kind, seed, full_size)
    state = {
        key: (value.detach().half() if half and value.is_floating_point() else value.detach()).clone()
        for key, value in network.state_dict().items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": state}, path)
    return path


def build_upscaler(
    path: str | Path, scale: int = 4, num_filters: int = 8, num_blocks: int = 1, seed: int = 0
) -> Path:
    """Save a random-weight ESRGAN (RRDB, original key layout) upscaler as ``.safetensors`` or ``.pth``."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    network = ESRGAN(in_nc=3, out_nc=3, num_filters=num_filters, num_blocks=num_blocks, scale=scale)
    state = {key: value.detach().contiguous() for key, value in network.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def build_compact_upscaler(
    path: str | Path, scale: int = 4, num_feat: int = 8, num_conv: int = 2, seed: int = 0
) -> Path:
    """Save a random-weight Real-ESRGAN Compact (``SRVGGNetCompact``, its released key layout ``body.N``) as
    ``.safetensors``; spandrel reads `num_feat`, `num_conv` and `scale` back from the shapes."""
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    network = Compact(num_feat=num_feat, num_conv=num_conv, upscale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.detach().contiguous() for key, value in network.state_dict().items()}, str(path))
    return path
