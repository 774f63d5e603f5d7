"""SCRFD-10GF (InsightFace ``det_10g``) rebuilt in PyTorch with random weights, exported to ONNX for benchmarks.

The layout follows the published SCRFD_10G_KPS configuration (deepinsight/insightface ``detection/scrfd``):

- backbone: ResNet-v1e with a deep stem (three 3x3 convs 3 -> 28 -> 28 -> 56, the first strided, then a
  3x3 max pool) and BasicBlock stages of (3, 4, 2, 3) blocks with (56, 88, 88, 224) channels, strides
  (1, 2, 2, 2); downsampling shortcuts average-pool then 1x1 conv (the "v1d/e" trick);
- neck: PAFPN over the last three stages (88, 88, 224 channels -> 56): lateral 1x1 convs, a top-down path
  with nearest upsampling, 3x3 output convs, then a bottom-up path of strided 3x3 convs and 3x3 convs;
- head: one head shared by the strides 8, 16, 32 (as the 3.86 M published parameters imply): three 3x3 convs of 80 channels with GroupNorm (16
  groups) and ReLU, then 3x3 convs for the class score (2 anchors), box distances (2 x 4) and keypoints
  (2 x 10).

Output signature as insightface's SCRFD reader expects (9 outputs: scores of strides 8/16/32, then boxes,
then keypoints; N x 1 / N x 4 / N x 10 with N = H/s * W/s * 2).

Random weights would "detect" faces at random, so every output is ``planted + 0 x network``: the whole
network runs (ONNX Runtime cannot fold a multiplication whose other input is computed), and the values come
from the planted detector of ``tests/cf_testing/face_models.py`` so a benchmark image holds exactly one face.
The parameter and MAC counts printed by ``python benchmarks/scrfd_10g.py`` are checked against the
published 3.86 M parameters and 9.98 G(MAC) at 640 x 480 (docs/model-configs.md §9.1, §9.2).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
STEM = (28, 28, 56)
STAGES = ((3, 56, 1), (4, 88, 2), (2, 88, 2), (3, 224, 2))  # (blocks, channels, stride)
NECK = 56
HEAD = 80
ANCHORS = 2
STRIDES = (8, 16, 32)


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c_in, c_out, 3, stride), conv_bn(c_out, c_out, 3, 1, relu=False))
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            pool = (
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                if stride > 1
                else nn.Identity()
            )
            self.short = nn.Sequential(pool, conv_bn(c_in, c_out, 1, 1, relu=False))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.short(x))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        convs: list[nn.Module] = []
        for i in range(3):
            convs += [
                nn.Conv2d(NECK if i == 0 else HEAD, HEAD, 3, 1, 1, bias=False),
                nn.GroupNorm(16, HEAD),
                nn.ReLU(inplace=True),
            ]
        self.convs = nn.Sequential(*convs)
        self.cls = nn.Conv2d(HEAD, ANCHORS, 3, 1, 1)
        self.reg = nn.Conv2d(HEAD, ANCHORS * 4, 3, 1, 1)
        self.kps = nn.Conv2d(HEAD, ANCHORS * 10, 3, 1, 1)

    def forward(self, x):
        x = self.convs(x)
        return self.cls(x).sigmoid(), self.reg(x), self.kps(x)


class SCRFD10G(nn.Module):
    def __init__(self, planted: dict[str, torch.Tensor] | None = None):
        super().__init__()
        c_in, stem = 3, []
        for i, c in enumerate(STEM):
            stem.append(conv_bn(c_in, c, 3, 2 if i == 0 else 1))
            c_in = c
        self.stem = nn.Sequential(*stem, nn.MaxPool2d(3, 2, 1))
        stages = []
        for blocks, c, stride in STAGES:
            stages.append(
                nn.Sequential(
                    *[BasicBlock(c_in if b == 0 else c, c, stride if b == 0 else 1) for b in range(blocks)]
                )
            )
            c_in = c
        self.stages = nn.ModuleList(stages)
        widths = [c for _, c, _ in STAGES[1:]]
        self.lateral = nn.ModuleList(nn.Conv2d(w, NECK, 1) for w in widths)
        self.fpn = nn.ModuleList(nn.Conv2d(NECK, NECK, 3, 1, 1) for _ in widths)
        self.down = nn.ModuleList(nn.Conv2d(NECK, NECK, 3, 2, 1) for _ in widths[1:])
        self.pafpn = nn.ModuleList(nn.Conv2d(NECK, NECK, 3, 1, 1) for _ in widths[1:])
        self.head = Head()
        self.planted = planted

    def network(self, x):
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        lat = [conv(f) for conv, f in zip(self.lateral, feats[1:], strict=True)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + nn.functional.interpolate(
                lat[i], size=lat[i - 1].shape[-2:], mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.fpn, lat, strict=True)]
        for i in range(len(outs) - 1):
            outs[i + 1] = outs[i + 1] + self.down[i](outs[i])
        outs = [outs[0]] + [conv(x) for conv, x in zip(self.pafpn, outs[1:], strict=True)]
        return [self.head(x) for x in outs]

    def forward(self, image):
        results = self.network(image)
        scores, boxes, points = [], [], []
        for stride, (cls, reg, kps) in zip(STRIDES, results, strict=True):
            for kind, value, width, sink in (
                ("score", cls, 1, scores),
                ("bbox", reg, 4, boxes),
                ("kps", kps, 10, points),
            ):
                if self.planted is not None:
                    pooled = nn.functional.avg_pool2d(image, stride, stride)
                    plant = nn.functional.conv2d(
                        pooled, self.planted[f"{kind}{stride}.weight"], self.planted[f"{kind}{stride}.bias"]
                    )
                    if kind == "score":
                        plant = plant.sigmoid()
                    value = plant + value * 0.0
                sink.append(value.permute(0, 2, 3, 1).reshape(-1, width))
        return (*scores, *boxes, *points)


def planted_weights(path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
        for t in model.graph.initializer
        if t.name.endswith((".weight", ".bias"))
    }


def count_macs(model: nn.Module, height: int = 480, width: int = 640) -> int:
    """Multiply-accumulates of convolutions (the mmcv convention SCRFD's table uses) for one image."""
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        macs += output.numel() * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.network(torch.zeros(1, 3, height, width))
    for h in handles:
        h.remove()
    return macs


def write_scrfd_10g(path: str | Path, planted_detector: str | Path, seed: int = 0) -> dict[str, int]:
    """Write the ONNX file; returns its parameter count (network only) and MACs at 640 x 480."""
    torch.manual_seed(seed)
    model = SCRFD10G(planted_weights(Path(planted_detector))).eval()
    for m in model.modules():  # keep activations in a sane range through 40+ random layers
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.fill_(1.0)
    params = sum(p.numel() for name, p in model.named_parameters())
    macs = count_macs(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in STRIDES]
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 640, 640),),
            str(path),
            input_names=["input.1"],
            output_names=names,
            dynamic_axes={"input.1": {2: "height", 3: "width"}},
            opset_version=13,
            dynamo=False,
        )
    return {"params": params, "macs_640x480": macs}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    model = SCRFD10G()
    print(
        {
            "params": sum(p.numel() for p in model.parameters()),
            "macs_640x480": count_macs(model),
            "published": {"params": 3.86e6, "gmacs_640x480": 9.98},
        }
    )
