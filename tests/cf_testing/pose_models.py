"""DWPose stand-ins with the real files' I/O and planted outputs, for pose-map tests.

``yolox_l.onnx``: input ``images`` 1 x 3 x 640 x 640, output ``output`` 1 x 8400 x 85 (raw YOLOX: per anchor
of the 80x80, 40x40 and 20x20 grids x, y offsets in cells, log w, log h in cells, objectness, 80 class scores).
``dw-ll_ucoco_384.onnx``: input ``input`` 1 x 3 x 384 x 288, outputs ``simcc_x`` 1 x 133 x 576 and ``simcc_y``
1 x 133 x 768.

`write_pose_models`: both output constants (plus 0 x the input's mean, so the input is read): the detector one
person box, the pose model peaks at chosen SimCC bins with chosen heights.
`write_dot_pose_models`: both read the photo: the detector boxes its bright pixels, the pose model finds red,
green and blue dots in its crop, so a dot comes back at its pixel only if the whole pipeline is right.
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
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)]
    return _save(nodes, path.stem, inputs, graph_outputs, inits, path)


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


# Input-dependent stand-ins: the photo decides the outputs, so the letterbox, the person-box crop, the ImageNet
# normalisation and the SimCC decode are exercised end to end (a planted dot comes back at its pixel).

# ImageNet statistics in 0..255, RGB, as the real pose model was trained with (kept apart from the engine's own
# constants on purpose).
IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], np.float32)
BRIGHT = 128.0  # detector: a pixel with any channel above this (the letterbox grey 114 is not) is "person"
PERSON_SCORE = 0.9
LIVE_ANCHOR = 80 * 80 + 40 * 40  # first stride-32 anchor, grid cell (0, 0)
KEYPOINTS = 133


def _save(nodes, name, inputs, outputs, inits, path: Path) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="charforge-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def bright_box_detector(path: Path) -> Path:
    """YOLOX stand-in: one person, the bounding box of the input pixels brighter than BRIGHT in any channel
    (x2, y2 one past the last bright column and row), on the live anchor with score PERSON_SCORE; no bright pixel:
    score 0 (nobody)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    n = helper.make_node
    nodes = [
        n("ReduceMax", ["images"], ["level"], axes=[1], keepdims=0),  # 1 x 640 x 640
        n("Greater", ["level", "bright"], ["lit_bool"]),
        n("Cast", ["lit_bool"], ["lit"], to=TensorProto.FLOAT),
        n("ReduceMax", ["lit"], ["cols"], axes=[1], keepdims=0),  # 1 x 640: any lit pixel in each column
        n("ReduceMax", ["lit"], ["rows"], axes=[2], keepdims=0),
        n("ReduceMax", ["cols"], ["anyone"], axes=[1], keepdims=0),  # [1]
    ]
    for axis, profile in (("x", "cols"), ("y", "rows")):
        nodes += [
            n("ArgMax", [profile], [f"{axis}1_i"], axis=1, keepdims=0),
            n("ArgMax", [profile], [f"{axis}2_i"], axis=1, keepdims=0, select_last_index=1),
            n("Cast", [f"{axis}1_i"], [f"{axis}1"], to=TensorProto.FLOAT),
            n("Cast", [f"{axis}2_i"], [f"{axis}2_last"], to=TensorProto.FLOAT),
            n("Add", [f"{axis}2_last", "one"], [f"{axis}2"]),
            n("Add", [f"{axis}1", f"{axis}2"], [f"{axis}_sum"]),
            n("Div", [f"{axis}_sum", "sixty_four"], [f"{axis}_cell"]),  # centre / 32
            n("Sub", [f"{axis}2", f"{axis}1"], [f"{axis}_size"]),
            n("Div", [f"{axis}_size", "thirty_two"], [f"{axis}_cells"]),
            n("Log", [f"{axis}_cells"], [f"{axis}_log"]),
        ]
    nodes += [
        n("Mul", ["anyone", "person_score"], ["score"]),
        n("Concat", ["x_cell", "y_cell", "x_log", "y_log", "one", "score", "other_classes"], ["row"], axis=0),
        n("Reshape", ["row", "row_shape"], ["row3"]),
        n("Concat", ["before", "row3", "after"], ["output"], axis=1),
    ]
    inits = [
        const("bright", BRIGHT),
        const("one", [1.0]),
        const("sixty_four", 64.0),
        const("thirty_two", 32.0),
        const("person_score", PERSON_SCORE),
        const("other_classes", np.zeros(79)),
        const("row_shape", [1, 1, 85], np.int64),
        const("before", np.zeros((1, LIVE_ANCHOR, 85))),
        const("after", np.zeros((1, 8400 - LIVE_ANCHOR - 1, 85))),
    ]
    return _save(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8400, 85])],
        inits,
        path,
    )


def colour_dot_pose_model(path: Path, channels: np.ndarray, heights: np.ndarray) -> Path:
    """RTMPose stand-in that finds dots: keypoint k's SimCC x (y) curve is the column (row) profile of the input
    crop's channel `channels[k]` (0 R, 1 G, 2 B; -1: none, score 0) above black, upsampled to two bins per pixel and
    scaled so its peak is `heights[k]`. The input less black normalised with the ImageNet statistics is pixel /
    std (0 on black); every height is multiplied by 1 - 100 x (summed per-channel smallest |input - normalised
    black|), so a crop with black in it normalised any other way scores about 0 (the test photos are black)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((KEYPOINTS, 3), np.float32)
    for k, c in enumerate(channels):
        if c >= 0:
            weights[k, c] = 1.0
    black = (-(IMAGENET_MEAN / IMAGENET_STD)).astype(np.float32).reshape(1, 3, 1, 1)
    n = helper.make_node
    nodes = [
        n("Sub", ["input", "black"], ["lift"]),  # 0 on black pixels, pixel / std elsewhere
        n("Abs", ["lift"], ["lift_abs"]),
        n("ReduceMin", ["lift_abs"], ["floor"], axes=[2, 3], keepdims=0),  # 1 x 3
        n("ReduceSum", ["floor"], ["floor_sum"], keepdims=0),
        n("Mul", ["floor_sum", "hundred"], ["penalty"]),
        n("Sub", ["one", "penalty"], ["gate_raw"]),
        n("Relu", ["gate_raw"], ["gate"]),
        n("Mul", ["heights", "gate"], ["peak"]),  # 133 x 1
    ]
    for name, upsample in (("simcc_x", "up_x"), ("simcc_y", "up_y")):
        nodes += [
            n("ReduceSum", ["lift", f"{name}_axis"], [f"{name}_per_channel"], keepdims=0),  # 1 x 3 x W (or H)
            n("MatMul", ["weights", f"{name}_per_channel"], [f"{name}_profile"]),  # 1 x 133 x W
            n("ReduceMax", [f"{name}_profile"], [f"{name}_top"], axes=[2], keepdims=1),
            n("Add", [f"{name}_top", "tiny"], [f"{name}_top_safe"]),
            n("Div", [f"{name}_profile", f"{name}_top_safe"], [f"{name}_unit"]),
            n("Mul", [f"{name}_unit", "peak"], [f"{name}_scaled"]),
            n("MatMul", [f"{name}_scaled", upsample], [name]),
        ]

    def const(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    inits = [
        const("black", black),
        const("hundred", 100.0),
        const("one", 1.0),
        const("tiny", 1e-6),
        const("weights", weights),
        const("heights", np.asarray(heights, np.float32).reshape(KEYPOINTS, 1)),
        const("simcc_x_axis", [2], np.int64),  # column profile: sum over rows
        const("simcc_y_axis", [3], np.int64),
        const("up_x", np.repeat(np.eye(288, dtype=np.float32), 2, axis=1)),  # pixel i -> bins 2i, 2i + 1
        const("up_y", np.repeat(np.eye(384, dtype=np.float32), 2, axis=1)),
    ]
    return _save(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 384, 288])],
        [
            helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, KEYPOINTS, 576]),
            helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, KEYPOINTS, 768]),
        ],
        inits,
        path,
    )


def write_dot_pose_models(folder: Path, channels: np.ndarray, heights: np.ndarray) -> Path:
    """Both input-dependent stand-ins in `folder` (returned)."""
    bright_box_detector(folder / DETECTOR_FILE)
    colour_dot_pose_model(folder / POSE_FILE, channels, heights)
    return folder
