"""Landmark models of InsightFace's I/O for face-motion tests, with set weights, and driving frames to match.

insightface routes an ``.onnx`` with a 1 x 3 x 192 x 192 input and one output to its ``Landmark`` class: 212
outputs are read as 106 2D points (``2d106det``), 3309 as 1103 3D points of which the last 68 count (``1k3d68``).
The class crops the face box (1.5 x its longer side, centred) to 192 x 192, feeds RGB scaled as
(pixel - 127.5) / 128, and maps the outputs, in -1..1 of the crop, back into the frame.

The stand-ins here compute their outputs from the crop instead of learning them: the centroid G of the pure
green pixels and the centroid B of the pure blue ones (black elsewhere) fix a similarity, and point k is
``G + t_x * d + t_y * perp(d)`` with d = B - G and perp(d) = (-d_y, d_x); its z (3D model) is ``t_z * |d|``.
So a frame with a green and a blue dot has known landmarks: the template `t` turned, scaled and moved by the
two dots, which the test moves, turns and hides as it likes. With the 68-point model and insightface's mean face
as the template, the 3D points are that face turned by the in-plane angle of d (roll), yaw and pitch 0.

`motion_frame` draws a frame: black, the planted detector's red cell (face_models) that gives the face box, and
the two dots, anti-aliased by supersampling so their centroids are where they are planted to a small fraction of
a pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .face_models import OPSET, _Graph, _save, write_face_pack

LANDMARK_106_FILE = "2d106det.onnx"
LANDMARK_68_FILE = "1k3d68.onnx"
CROP = 192


def template_106(seed: int = 0) -> np.ndarray:
    """106 2D points (in units of |d|, relative to G) for the 2D stand-in."""
    return np.random.default_rng(seed).uniform(-0.6, 0.6, (106, 2))


def template_68() -> np.ndarray:
    """insightface's mean face (68 x 3), the 3D stand-in's template."""
    from insightface.data import get_object

    return np.asarray(get_object("meanshape_68.pkl"), dtype=np.float64)


def build_landmark_model(path: str | Path, template: np.ndarray) -> Path:
    """Write the stand-in described above: 106 x 2 template -> a 2d106det-like file, 68 x 3 -> 1k3d68-like."""
    from onnx import TensorProto, helper

    template = np.asarray(template, dtype=np.float64)
    three_d = template.shape[1] == 3
    g = _Graph()
    x = "data"
    # Masks: green = relu(G - R - B - 1), blue = relu(B - R - G - 1) on the normalised input: 1 on a pure dot,
    # 0 on black, in proportion to a dot's coverage at its anti-aliased edge.
    weight = np.array([[-1, 1, -1], [-1, -1, 1]], np.float32).reshape(2, 3, 1, 1)
    conv = g.node(
        "Conv",
        [x, g.const("mask.weight", weight), g.const("mask.bias", np.full(2, -1.0, np.float32))],
        "mask.conv",
    )
    mask = g.node("Relu", [conv], "mask.relu")
    axes = g.const("axes.hw", np.array([2, 3], np.int64), trainable=False)
    grid = np.arange(CROP, dtype=np.float32) / (CROP / 2) - 1.0  # pixel centre j -> the model's -1..1 units
    total = g.node("ReduceSum", [mask, axes], "mask.total", keepdims=0)
    total = g.node(
        "Add", [total, g.const("eps", np.array(1e-6, np.float32), trainable=False)], "mask.total_eps"
    )
    sums = []
    for name, shape in (("x", (1, 1, 1, CROP)), ("y", (1, 1, CROP, 1))):
        weighted = g.node(
            "Mul", [mask, g.const(f"grid.{name}", grid.reshape(shape), trainable=False)], f"weighted.{name}"
        )
        summed = g.node("ReduceSum", [weighted, axes], f"sum.{name}", keepdims=0)
        sums.append(g.node("Div", [summed, total], f"centroid.{name}"))
    feats = g.node("Concat", sums, "anchors", axis=1)  # [gx, bx, gy, by]
    diff = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], np.float32)
    d = g.node("MatMul", [feats, g.const("diff", diff, trainable=False)], "d")
    square = g.node("Mul", [d, d], "d.square")
    norm = g.node(
        "Sqrt",
        [
            g.node(
                "ReduceSum",
                [square, g.const("axes.1", np.array([1], np.int64), trainable=False)],
                "d.sum",
                keepdims=1,
            )
        ],
        "d.norm",
    )
    features = g.node("Concat", [feats, norm], "features", axis=1)  # [gx, bx, gy, by, |d|]
    points = len(template)
    width = 3 if three_d else 2
    rows = 1103 if three_d else points
    matrix = np.zeros((5, rows * width), np.float32)
    offset = (rows - points) * width
    for k, t in enumerate(template):
        tx, ty = t[0], t[1]
        col = offset + k * width
        matrix[:, col] = [1 - tx, tx, ty, -ty, 0]
        matrix[:, col + 1] = [-ty, ty, 1 - tx, tx, 0]
        if three_d:
            matrix[4, col + 2] = t[2]
    out = g.node("MatMul", [features, g.const("points.weight", matrix)], "points")
    g.nodes[-1].output[0] = "fc1"
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, CROP, CROP])]
    outputs = [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, rows * width])]
    del out
    return _save(g, inputs, outputs, Path(path), "planted_landmarks")


def write_face_motion_pack(
    insightface_dir: str | Path, pack: str = "buffalo_l", landmarks=("68", "106")
) -> Path:
    """The planted detector and tiny recogniser (face_models) plus the landmark stand-ins in `landmarks`."""
    folder = write_face_pack(insightface_dir, pack)
    if "106" in landmarks:
        build_landmark_model(folder / LANDMARK_106_FILE, template_106())
    if "68" in landmarks:
        build_landmark_model(folder / LANDMARK_68_FILE, template_68())
    return folder


def planted_points(template: np.ndarray, green, blue) -> np.ndarray:
    """Where the stand-in puts the template's points (x, y) for dots at `green` and `blue`."""
    g, b = np.asarray(green, np.float64), np.asarray(blue, np.float64)
    d = b - g
    perp = np.array([-d[1], d[0]])
    t = np.asarray(template, np.float64)
    return g + t[:, :1] * d + t[:, 1:2] * perp


def motion_frame(
    size: tuple[int, int],
    cell: tuple[int, int] | None,
    green,
    blue,
    radius: float = 3.0,
    supersample: int = 8,
) -> np.ndarray:
    """A black RGB uint8 frame with the detector's red cell at `cell` (top-left, None = no face) and two dots."""
    width, height = size
    image = np.zeros((height, width, 3), np.float64)
    s = supersample
    offsets = (np.arange(s) + 0.5) / s - 0.5
    for centre, channel in ((green, 1), (blue, 2)):
        cx, cy = centre
        x0, x1 = int(np.floor(cx - radius - 1)), int(np.ceil(cx + radius + 1))
        y0, y1 = int(np.floor(cy - radius - 1)), int(np.ceil(cy + radius + 1))
        for y in range(max(y0, 0), min(y1 + 1, height)):
            for x in range(max(x0, 0), min(x1 + 1, width)):
                xs, ys = np.meshgrid(x + offsets, y + offsets)
                cover = float(np.mean((xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2))
                image[y, x, channel] = max(image[y, x, channel], cover)
    frame = np.round(image * 255).astype(np.uint8)
    if cell is not None:
        x, y = cell
        frame[y : y + 16, x : x + 16] = (255, 0, 0)
    return frame


__all__ = [
    "LANDMARK_106_FILE",
    "LANDMARK_68_FILE",
    "OPSET",
    "build_landmark_model",
    "motion_frame",
    "planted_points",
    "template_106",
    "template_68",
    "write_face_motion_pack",
]
