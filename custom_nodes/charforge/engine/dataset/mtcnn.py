"""A small MTCNN face detector run with torch, on the weights the ``mtcnn`` PyPI package ships.

MTCNN (Zhang et al., 2016) is three tiny convolutional networks applied in cascade: P-Net slides over an
image pyramid and proposes 12x12 windows, R-Net re-scores 24x24 crops of the proposals, O-Net re-scores
48x48 crops and refines the boxes. The ``mtcnn`` package (MIT licence) ships the trained weights as
``mtcnn/assets/weights/{pnet,rnet,onet}.lz4`` (joblib + lz4, lists of Keras-layout arrays) and runs them
with TensorFlow; CharForge only reads the weight files (the package is never imported, so TensorFlow is
not needed) and runs the networks here with torch, on photos shrunk to ~640 px.

Weight layouts (Keras): convolution kernels ``(kh, kw, in, out)``, PReLU slopes per channel, dense
``(in, out)``; R-Net and O-Net flatten their last feature map after swapping height and width.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

from ...deps import MissingDependencyError, require

PACKAGE = "mtcnn"
_weights_cache: dict[str, dict[str, list]] = {}
_weights_lock = threading.Lock()


def weights_folder() -> Path | None:
    """Where the installed ``mtcnn`` package keeps its weights, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "assets" / "weights"
        if all((folder / f"{net}.lz4").is_file() for net in ("pnet", "rnet", "onet")):
            return folder
    return None


def available() -> bool:
    """True when the weights and the two packages that read them (joblib, lz4) are installed."""
    return weights_folder() is not None and all(
        importlib.util.find_spec(name) is not None for name in ("joblib", "lz4")
    )


def _load_weights(folder: Path) -> dict[str, list]:
    with _weights_lock:
        key = str(folder)
        if key not in _weights_cache:
            try:
                joblib = require("joblib")
                require("lz4")
            except MissingDependencyError as exc:
                raise MissingDependencyError(
                    f"the MTCNN face detector needs joblib and lz4 (installed with mtcnn): {exc}"
                ) from exc
            _weights_cache[key] = _to_torch(
                {
                    net: [w.astype("float32") for w in joblib.load(os.fspath(folder / f"{net}.lz4"))]
                    for net in ("pnet", "rnet", "onet")
                }
            )
        return _weights_cache[key]


# ------------------------------------------------------------------------------------------------ layers
# Run with torch (ComfyUI always has it): its CPU convolutions are an order of magnitude faster than numpy.
# Feature maps are (N, C, H, W) tensors; weights are converted once from the Keras layouts.


def _to_torch(weights: dict[str, list]) -> dict[str, list]:
    torch = require("torch")
    converted = {}
    for net, arrays in weights.items():
        out = []
        for array in arrays:
            tensor = torch.from_numpy(array)
            if array.ndim == 4:  # conv kernel (kh, kw, in, out) -> (out, in, kh, kw)
                tensor = tensor.permute(3, 2, 0, 1).contiguous()
            elif array.ndim == 2:  # dense (in, out) -> (out, in) for F.linear
                tensor = tensor.t().contiguous()
            elif array.ndim == 3:  # PReLU slopes (1, 1, C)
                tensor = tensor.reshape(-1).contiguous()
            out.append(tensor)
        converted[net] = out
    return converted


def _block(F, x, w, i, pool=None):
    x = F.prelu(F.conv2d(x, w[i], w[i + 1]), w[i + 2])
    if pool is not None:  # (size, stride): Keras "same"/"valid" pooling both start at 0; ceil keeps the edge
        size, stride, same = pool
        x = F.max_pool2d(x, size, stride, ceil_mode=same)
    return x


def _pnet(w, x):
    F = require("torch.nn.functional")
    x = _block(F, x, w, 0, (2, 2, True))
    x = _block(F, x, w, 3)
    x = _block(F, x, w, 6)
    return F.conv2d(x, w[9], w[10]), F.softmax(F.conv2d(x, w[11], w[12]), dim=1)  # offsets, probability


def _flatten_swapped(x):
    # Keras flattened (H, W, C) after swapping H and W: (N, C, H, W) -> (N, W, H, C).
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


def _rnet(w, x):
    F = require("torch.nn.functional")
    x = _block(F, x, w, 0, (3, 2, True))
    x = _block(F, x, w, 3, (3, 2, False))
    x = _block(F, x, w, 6)
    x = F.prelu(F.linear(_flatten_swapped(x), w[9], w[10]), w[11])
    return F.linear(x, w[12], w[13]), F.softmax(F.linear(x, w[14], w[15]), dim=1)


def _onet(w, x):
    F = require("torch.nn.functional")
    x = _block(F, x, w, 0, (3, 2, True))
    x = _block(F, x, w, 3, (3, 2, False))
    x = _block(F, x, w, 6, (2, 2, True))
    x = _block(F, x, w, 9)
    x = F.prelu(F.linear(_flatten_swapped(x), w[12], w[13]), w[14])
    return F.linear(x, w[15], w[16]), F.linear(x, w[17], w[18]), F.softmax(F.linear(x, w[19], w[20]), dim=1)


def _run(net, weights, batch):
    """Run a network on an (N, H, W, 3) float32 numpy batch; numpy outputs."""
    torch = require("torch")
    with torch.inference_mode():
        # channels-last is the tensors' natural layout here, and CPU pooling is several times faster in it.
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        outputs = net(weights, x)
    return [o.contiguous().numpy() for o in outputs]


# ------------------------------------------------------------------------------------------------ boxes


def _nms(boxes, scores, threshold: float, method: str = "union"):
    """Indices kept by non-maximum suppression, best score first."""
    np = require("numpy")
    order = np.argsort(-scores)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(
            0.0, np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]) + 1
        )
        h = np.maximum(
            0.0, np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]) + 1
        )
        inter = w * h
        overlap = (
            inter / np.minimum(areas[i], areas[rest])
            if method == "min"
            else inter / (areas[i] + areas[rest] - inter)
        )
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=int)


def _square(boxes):
    np = require("numpy")
    boxes = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    boxes[:, 0] += (w - side) / 2
    boxes[:, 1] += (h - side) / 2
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def _refine(boxes, offsets):
    np = require("numpy")
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes + offsets * np.stack([w, h, w, h], axis=1)


def _patches(image, boxes, size: int):
    """Crops of `boxes` (zero outside the image) resized to size x size, as one batch."""
    np = require("numpy")
    cv2 = require("cv2")
    height, width = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), dtype=np.float32)
    for index, (x1, y1, x2, y2) in enumerate(np.round(boxes[:, :4]).astype(int)):
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        if bw < 2 or bh < 2:
            continue
        patch = np.zeros((bh, bw, 3), dtype=np.float32)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2 + 1, width), min(y2 + 1, height)
        if sx2 <= sx1 or sy2 <= sy1:
            continue
        patch[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[sy1:sy2, sx1:sx2]
        out[index] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR)
    return out


class MtcnnDetector:
    """Face boxes, scores and five landmarks; no identity embedding."""

    name = "mtcnn"

    def __init__(
        self,
        weights: dict[str, list],
        min_face: int = 20,
        thresholds=(0.6, 0.7, 0.8),
        scale_factor: float = 0.709,
    ):
        self._w = weights
        self.min_face = min_face
        self.thresholds = thresholds
        self.scale_factor = scale_factor

    @classmethod
    def load(cls, **options) -> MtcnnDetector:
        """Load the weights of the installed ``mtcnn`` package; raises MissingDependencyError without it."""
        folder = weights_folder()
        if folder is None:
            raise MissingDependencyError(
                "the fallback face detector uses the weights shipped in the mtcnn package, which is not "
                f"installed. Install it into the Python that runs ComfyUI: {require_hint()}"
            )
        return cls(_load_weights(folder), **options)

    def detect_arrays(self, rgb):
        """(boxes N x 4 as x1, y1, x2, y2; scores N; landmarks N x 5 x 2), largest face first."""
        np = require("numpy")
        cv2 = require("cv2")
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        image = (rgb.astype(np.float32) - 127.5) / 128.0
        height, width = image.shape[:2]
        empty = (np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))

        # Stage 1: P-Net over the pyramid. A 12 px window at scale s sees a face of 12 / s pixels.
        candidates = []
        scale = 12.0 / self.min_face
        while min(height, width) * scale >= 12:
            # Resizing the 8-bit image is several times faster than resizing the float one.
            level = cv2.resize(
                rgb,
                (max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))),
                interpolation=cv2.INTER_AREA,
            )
            level = (level.astype(np.float32) - 127.5) / 128.0
            offsets, prob = _run(_pnet, self._w["pnet"], level[None])
            offsets = offsets.transpose(0, 2, 3, 1)
            prob = prob.transpose(0, 2, 3, 1)
            ys, xs = np.nonzero(prob[0, :, :, 1] > self.thresholds[0])
            if ys.size:
                x1 = (xs * 2.0) / scale
                y1 = (ys * 2.0) / scale
                x2 = (xs * 2.0 + 12) / scale
                y2 = (ys * 2.0 + 12) / scale
                boxes = np.stack([x1, y1, x2, y2], axis=1)
                boxes = boxes + offsets[0, ys, xs] * np.stack([x2 - x1, y2 - y1, x2 - x1, y2 - y1], axis=1)
                scores = prob[0, ys, xs, 1]
                keep = _nms(boxes, scores, 0.5)
                candidates.append(np.column_stack([boxes[keep], scores[keep]]))
            scale *= self.scale_factor
        if not candidates:
            return empty
        boxes = np.concatenate(candidates)
        boxes = boxes[_nms(boxes[:, :4], boxes[:, 4], 0.7)]

        # Stage 2: R-Net re-scores 24 x 24 crops.
        boxes[:, :4] = _square(boxes[:, :4])
        offsets, prob = _run(_rnet, self._w["rnet"], _patches(image, boxes, 24))
        keep = prob[:, 1] > self.thresholds[1]
        if not keep.any():
            return empty
        boxes = np.column_stack([_refine(boxes[keep, :4], offsets[keep]), prob[keep, 1]])
        boxes = boxes[_nms(boxes[:, :4], boxes[:, 4], 0.7)]

        # Stage 3: O-Net on 48 x 48 crops: final score, box and landmarks.
        boxes[:, :4] = _square(boxes[:, :4])
        offsets, marks, prob = _run(_onet, self._w["onet"], _patches(image, boxes, 48))
        keep = prob[:, 1] > self.thresholds[2]
        if not keep.any():
            return empty
        squares = boxes[keep, :4]
        w = (squares[:, 2] - squares[:, 0] + 1)[:, None]
        h = (squares[:, 3] - squares[:, 1] + 1)[:, None]
        landmarks = np.stack(
            [squares[:, [0]] + marks[keep, :5] * w, squares[:, [1]] + marks[keep, 5:] * h], axis=2
        )
        refined = _refine(squares, offsets[keep])
        scores = prob[keep, 1]
        order = _nms(refined, scores, 0.7, method="min")
        refined, scores, landmarks = refined[order], scores[order], landmarks[order]
        refined[:, [0, 2]] = refined[:, [0, 2]].clip(0, width)
        refined[:, [1, 3]] = refined[:, [1, 3]].clip(0, height)
        areas = (refined[:, 2] - refined[:, 0]) * (refined[:, 3] - refined[:, 1])
        by_size = np.argsort(-areas)
        return refined[by_size], scores[by_size], landmarks[by_size]


def require_hint() -> str:
    from ...deps import install_hint

    return install_hint([PACKAGE])
