"""DWPose stand-ins with the real files' I/O and planted outputs, for pose-map tests.

``yolox_l.onnx``: input ``images`` 1 x 3 x 640 x 640, output ``output`` 1 x 8400 x 85 (raw YOLOX: per anchor
of the 80x80, 40x40 and 20x20 grids x, y offsets in cells, log w, log h in cells, objectness, 80 class scores).
``dw-ll_ucoco_384.onnx``: input ``input`` 1 x 3 x 384 x 288, outputs ``simcc_x`` 1 x 133 x 576 and ``simcc_y``
1 x 133 x 768. Both output constants (plus 0 x the input's mean, so the input is read): the detector one
person box, the pose model peaks at chosen SimCC bins with chosen heights.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
OPSET = 13
IR_VERSION = 8


def _constant_model(input_name: str, input_shape: list, outputs: dict[str, np.ndarray], path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
    ]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    graph_outputs = []
    for name, value in outputs.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_value"))
        nodes.append(helper.make_node("Add", [f"{name}_value", "nothing"], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
        graph_outputs,
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="charforge-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def detector_output(box_in_input: tuple[float, float, float, float], score: float = 0.9) -> np.ndarray:
    """Raw 1 x 8400 x 85 output whose one live anchor (on the stride-32 grid) decodes to `box_in_input`."""
    raw = np.zeros((1, 8400, 85), np.float32)
    x1, y1, x2, y2 = box_in_input
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    gx, gy = int(cx // 32), int(cy // 32)
    index = 80 * 80 + 40 * 40 + gy * 20 + gx
    raw[0, index, :5] = [cx / 32 - gx, cy / 32 - gy, math.log(w / 32), math.log(h / 32), 1.0]
    raw[0, index, 5] = score  # class 0: person
    return raw


def simcc_outputs(bins: dict[int, tuple[int, int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """simcc_x / simcc_y with keypoint k peaking at (x bin, y bin) with height h; every other keypoint 0."""
    simcc_x = np.zeros((1, 133, 576), np.float32)
    simcc_y = np.zeros((1, 133, 768), np.float32)
    for k, (bx, by, height) in bins.items():
        simcc_x[0, k, bx] = height
        simcc_y[0, k, by] = height
    return simcc_x, simcc_y


def write_pose_models(
    folder: Path, box_in_input: tuple[float, float, float, float], bins: dict[int, tuple[int, int, float]]
) -> Path:
    """Both DWPose stand-ins in `folder` (returned)."""
    _constant_model(
        "images", [1, 3, 640, 640], {"output": detector_output(box_in_input)}, folder / DETECTOR_FILE
    )
    simcc_x, simcc_y = simcc_outputs(bins)
    _constant_model("input", [1, 3, 384, 288], {"simcc_x": simcc_x, "simcc_y": simcc_y}, folder / POSE_FILE)
    return folder
