"""InsightFace-format face models for tests and benchmarks, written as ONNX without any download.

insightface loads every ``.onnx`` in ``<root>/models/<pack>/`` and gives each a role from its signature
(docs/model-configs.md §10.5, checked against insightface's ``model_zoo.ModelRouter``):

- a **detector** has at least 5 outputs; with 9 outputs it is read as SCRFD with keypoints: strides
  8, 16, 32, two anchors per location, outputs ordered scores (N x 1) for each stride, then box distances
  (N x 4), then keypoint offsets (N x 10), with N = (H / stride) * (W / stride) * 2 in row-major order
  and the two anchors of one location next to each other. Box and keypoint values are in stride units;
  the input is NCHW RGB scaled as (pixel - 127.5) / 128, with free height and width;
- a **recogniser** has a square input of at least 112 pixels (a multiple of 16) and one output: here
  112 x 112 in, 512 out, batch dimension free. Its first nodes are not named ``Sub``/``Mul``, so
  insightface scales its input as (pixel - 127.5) / 127.5, as for ``w600k_r50``.

`write_face_pack` writes both into a ComfyUI-style ``models/insightface/models/<pack>/`` folder:

- the detector (``det_tiny.onnx``) has *set*, not random, weights, so a test can plant faces: it finds a
  face wherever a 16 x 16 pixel cell (aligned to the 16-pixel grid of the detection image) is pure red
  (red 255, green 0). The blue value of that cell sets the face size: blue 0 gives an 80 px box, blue 255
  a 160 px box (in detection-image pixels), centred on the cell's top-left corner, where SCRFD puts a
  cell's anchor point. The five keypoints sit where ArcFace's alignment template puts eyes, nose and
  mouth corners inside that box. Everything else in the image is ignored;
- the recogniser (``w600k_tiny.onnx``) is an IResNet (the architecture of ``w600k_r50``: 3x3 stem,
  IBasicBlocks with BN-conv-BN-PReLU-conv-BN and a strided 1x1 shortcut, BN, a 7x7 -> 512 fully
  connected layer, BN) with one block per stage, narrow widths and seeded random weights.

`build_iresnet_onnx` with the default arguments writes the full-size IResNet-50 (layers 3, 4, 14, 3;
43.6 M parameters; about 175 MB) for the benchmark.

The graphs are written node by node with ``onnx.helper`` (no exporter involved), so the same arguments
always give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from charforge.engine import tiny

DETECTOR_FILE = "det_tiny.onnx"
RECOGNISER_FILE = "w600k_tiny.onnx"
OPSET = 13
IR_VERSION = 8  # readable by every onnxruntime ComfyUI users run (1.15+)

STRIDES = (8, 16, 32)
FACE_STRIDE = 16  # the stride whose cells detect the planted faces
ANCHORS = 2

# ArcFace alignment template (insightface's face_align.arcface_dst) for a 112 x 112 crop: left eye, right eye,
# nose, left and right mouth corner.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

# Half the box side, in stride units, is HALF_SIZE_BASE + HALF_SIZE_PER_BLUE * blue, with blue the
# normalised blue value (-1 .. 1): 2.5 .. 5 cells of 16 px, i.e. an 80 .. 160 px box.
HALF_SIZE_BASE = 3.75
HALF_SIZE_PER_BLUE = 1.25
SCORE_GAIN = 40.0
# Red - green (normalised, -2..2) a cell needs on average: pure red gives 1.99, and 1.9 (about 243 of 255
# levels) keeps saturated reds in ordinary or generated pictures from counting as faces.
SCORE_OFFSET = 1.9


@dataclass
class _Graph:
    """A tiny helper that accumulates ONNX nodes and initializers."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    params: int = 0  # trainable parameters (BN running statistics excluded)

    def const(self, name: str, value: np.ndarray, trainable: bool = True) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        if trainable:
            self.params += int(value.size)
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name


def _save(graph: _Graph, inputs: list, outputs: list, path: Path, name: str) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(
        helper.make_graph(graph.nodes, name, inputs, outputs, initializer=graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="charforge-tests",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------------------------------
# Detector


def _keypoint_directions() -> np.ndarray:
    """Keypoints relative to the box centre, in units of the half box side (10 values: x, y per point)."""
    return ((ARCFACE_TEMPLATE / 112.0 - 0.5) * 2.0).reshape(-1).astype(np.float32)


def build_planted_face_detector(path: str | Path) -> Path:
    """Write the SCRFD-signature detector described in the module docstring to `path`."""
    from onnx import TensorProto, helper

    g = _Graph()
    x = "input.1"
    blue = np.array([0.0, 0.0, 1.0], dtype=np.float32)
    directions = _keypoint_directions()
    scores, boxes, keypoints = [], [], []
    for stride in STRIDES:
        pooled = g.node(
            "AveragePool", [x], f"pool{stride}", kernel_shape=[stride, stride], strides=[stride, stride]
        )
        live = stride == FACE_STRIDE
        if live:
            w_score = np.tile(np.array([SCORE_GAIN, -SCORE_GAIN, 0.0], np.float32), (ANCHORS, 1))
            b_score = np.full(ANCHORS, -SCORE_GAIN * SCORE_OFFSET, np.float32)
        else:  # these strides never fire
            w_score = np.zeros((ANCHORS, 3), np.float32)
            b_score = np.full(ANCHORS, -30.0, np.float32)
        half_w = (
            np.tile(HALF_SIZE_PER_BLUE * blue, (ANCHORS * 4, 1))
            if live
            else np.zeros((ANCHORS * 4, 3), np.float32)
        )
        half_b = np.full(ANCHORS * 4, HALF_SIZE_BASE if live else 1.0, np.float32)
        kps_w = (
            np.concatenate([np.outer(directions, HALF_SIZE_PER_BLUE * blue)] * ANCHORS)
            if live
            else np.zeros((ANCHORS * 10, 3), np.float32)
        )
        kps_b = np.tile(directions * HALF_SIZE_BASE, ANCHORS) if live else np.zeros(ANCHORS * 10, np.float32)
        for kind, weight, bias, width, sink in (
            ("score", w_score, b_score, 1, scores),
            ("bbox", half_w, half_b, 4, boxes),
            ("kps", kps_w, kps_b, 10, keypoints),
        ):
            conv = g.node(
                "Conv",
                [
                    pooled,
                    g.const(f"{kind}{stride}.weight", weight.reshape(-1, 3, 1, 1).astype(np.float32)),
                    g.const(f"{kind}{stride}.bias", bias.astype(np.float32)),
                ],
                f"{kind}{stride}.conv",
            )
            if kind == "score":
                conv = g.node("Sigmoid", [conv], f"{kind}{stride}.sigmoid")
            nhwc = g.node("Transpose", [conv], f"{kind}{stride}.nhwc", perm=[0, 2, 3, 1])
            shape = g.const(f"{kind}{stride}.shape", np.array([-1, width], np.int64), trainable=False)
            sink.append((g.node("Reshape", [nhwc, shape], f"{kind}_{stride}"), width))
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, "height", "width"])]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{name.split('_')[1]}", width])
        for name, width in scores + boxes + keypoints
    ]
    return _save(g, inputs, outputs, Path(path), "planted_face_detector")


# --------------------------------------------------------------------------------------------------
# Recogniser: IResNet


def _bn(g: _Graph, x: str, name: str, channels: int) -> str:
    return g.node(
        "BatchNormalization",
        [
            x,
            g.const(f"{name}.weight", np.ones(channels, np.float32)),
            g.const(f"{name}.bias", np.zeros(channels, np.float32)),
            g.const(f"{name}.running_mean", np.zeros(channels, np.float32), trainable=False),
            g.const(f"{name}.running_var", np.ones(channels, np.float32), trainable=False),
        ],
        name,
        epsilon=1e-5,
    )


def _conv(g: _Graph, x: str, name: str, rng, c_in: int, c_out: int, kernel: int, stride: int) -> str:
    weight = rng.normal(0.0, np.sqrt(2.0 / (c_in * kernel * kernel)), (c_out, c_in, kernel, kernel)).astype(
        np.float32
    )
    pad = kernel // 2
    return g.node(
        "Conv",
        [x, g.const(f"{name}.weight", weight)],
        name,
        kernel_shape=[kernel, kernel],
        strides=[stride, stride],
        pads=[pad, pad, pad, pad],
    )


def _prelu(g: _Graph, x: str, name: str, channels: int) -> str:
    return g.node("PRelu", [x, g.const(f"{name}.weight", np.full((channels, 1, 1), 0.25, np.float32))], name)


def _block(g: _Graph, x: str, name: str, rng, c_in: int, c_out: int, stride: int) -> str:
    out = _bn(g, x, f"{name}.bn1", c_in)
    out = _conv(g, out, f"{name}.conv1", rng, c_in, c_out, 3, 1)
    out = _bn(g, out, f"{name}.bn2", c_out)
    out = _prelu(g, out, f"{name}.prelu", c_out)
    out = _conv(g, out, f"{name}.conv2", rng, c_out, c_out, 3, stride)
    out = _bn(g, out, f"{name}.bn3", c_out)
    identity = x
    if stride != 1 or c_in != c_out:
        identity = _conv(g, x, f"{name}.downsample.0", rng, c_in, c_out, 1, stride)
        identity = _bn(g, identity, f"{name}.downsample.1", c_out)
    return g.node("Add", [out, identity], f"{name}.add")


@dataclass(frozen=True)
class IResNetSpec:
    layers: tuple[int, ...] = (3, 4, 14, 3)  # IResNet-50
    widths: tuple[int, ...] = (64, 128, 256, 512)
    embedding_size: int = 512
    input_size: int = 112


IRESNET50 = IResNetSpec()
TINY_IRESNET = IResNetSpec(layers=(1, 1, 1, 1), widths=(8, 16, 16, 32))


def build_iresnet_onnx(path: str | Path, spec: IResNetSpec = IRESNET50, seed: int = 0) -> tuple[Path, int]:
    """Write an IResNet recogniser with seeded random weights; return the path and its parameter count."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    g = _Graph()
    x = "input.1"
    out = _conv(g, x, "conv1", rng, 3, spec.widths[0], 3, 1)
    out = _bn(g, out, "bn1", spec.widths[0])
    out = _prelu(g, out, "prelu", spec.widths[0])
    c_in = spec.widths[0]
    for stage, (blocks, width) in enumerate(zip(spec.layers, spec.widths, strict=True), start=1):
        for index in range(blocks):
            out = _block(g, out, f"layer{stage}.{index}", rng, c_in, width, 2 if index == 0 else 1)
            c_in = width
    out = _bn(g, out, "bn2", c_in)
    out = g.node("Flatten", [out], "flatten", axis=1)
    side = spec.input_size // 16
    fc_in = c_in * side * side
    fc_weight = rng.normal(0.0, np.sqrt(1.0 / fc_in), (spec.embedding_size, fc_in)).astype(np.float32)
    out = g.node(
        "Gemm",
        [out, g.const("fc.weight", fc_weight), g.const("fc.bias", np.zeros(spec.embedding_size, np.float32))],
        "fc",
        transB=1,
    )
    out = _bn(g, out, "features", spec.embedding_size)
    g.nodes[-1].output[0] = "embedding"
    inputs = [
        helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 3, spec.input_size, spec.input_size])
    ]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", spec.embedding_size])]
    return _save(g, inputs, outputs, Path(path), "iresnet"), g.params


# --------------------------------------------------------------------------------------------------
# Packs and test images


def write_face_pack(
    insightface_dir: str | Path, pack: str = "buffalo_l", seed: int = 0, nested: bool = False
) -> Path:
    """Write detector + tiny recogniser into ``<insightface_dir>/models/<pack>/`` and return that folder.

    With `nested`, the files go one level deeper (``<pack>/<pack>/``), as the antelopev2 archive unpacks.
    """
    folder = Path(insightface_dir) / "models" / pack
    if nested:
        folder = folder / pack
    build_planted_face_detector(folder / DETECTOR_FILE)
    build_iresnet_onnx(folder / RECOGNISER_FILE, TINY_IRESNET, seed=seed)
    return folder.parent if nested else folder


def face_image(
    size: tuple[int, int] = (320, 320),
    faces: tuple[tuple[int, int, int], ...] = ((160, 160, 128),),
    person: int = 0,
    noise: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """An RGB uint8 image with planted faces for the detector above.

    `faces` holds (x, y, blue) per face: the top-left corner of its 16 x 16 red cell (multiples of 16 keep
    it on the detector's grid when the image is not rescaled) and the blue value that sets its size.
    `person` picks the texture around the cell, which is what the recogniser sees: the same person
    gives the same texture (plus `noise`, in 0..255 units), different persons different textures.
    """
    width, height = size
    texture = np.random.default_rng(1000 + person).integers(0, 256, (height // 8 + 1, width // 8 + 1, 3))
    image = np.kron(texture, np.ones((8, 8, 1)))[:height, :width].astype(np.float32)
    image[..., 0] = np.minimum(image[..., 0], 160)  # keep the texture itself from looking like a marker
    if noise:
        image += np.random.default_rng(seed).normal(0.0, noise, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for x, y, blue in faces:
        image[y : y + 16, x : x + 16] = (255, 0, blue)
    return image


def blank_image(size: tuple[int, int] = (320, 320), value: int = 90) -> np.ndarray:
    """A featureless grey image: the planted-face detector finds nothing in it."""
    return np.full((size[1], size[0], 3), value, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# CLIP (the score stage's other model): a full CLIPModel folder as Hugging Face saves it


# ViT-L/14 (openai/clip-vit-large-patch14): the architecture the CLIP-score benchmark measures.
CLIP_VIT_L14 = {
    "vision": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
    },
    "text": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "projection_dim": 768,
}
TINY_CLIP = tiny.TINY_CLIP  # the demo's tiny CLIP sizes


def clip_config(spec: dict = TINY_CLIP):
    """A `transformers.CLIPConfig` of the real CLIP architecture with the sizes in `spec` and the tiny vocabulary."""
    from transformers import CLIPConfig

    from .models import TINY_VOCAB_SIZE, tiny_clip_vocab

    vocab = tiny_clip_vocab()
    text = {
        **spec["text"],
        "vocab_size": TINY_VOCAB_SIZE,
        "max_position_embeddings": 77,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    return CLIPConfig(
        text_config=text, vision_config=dict(spec["vision"]), projection_dim=spec["projection_dim"]
    )


def write_clip_folder(directory: str | Path, spec: dict = TINY_CLIP, seed: int = 0) -> Path:
    """Save a randomly initialised `CLIPModel` with tokenizer and preprocessor config, as a hub download looks."""
    import json

    import torch
    from transformers import CLIPModel

    from .models import write_tiny_clip_tokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    model = CLIPModel(clip_config(spec)).eval()
    model.save_pretrained(str(directory))
    write_tiny_clip_tokenizer(directory)
    size = spec["vision"]["image_size"]
    (directory / "preprocessor_config.json").write_text(
        json.dumps(tiny.clip_preprocessor_config(size), indent=2)
    )
    return directory


def write_scoring_models(root: Path) -> Path:
    """A models folder for scoring on this machine: the tiny InsightFace pack (``insightface/buffalo_l``) and
    a tiny CLIP (``clip_vision/tiny-clip``)."""
    write_face_pack(root / "insightface", "buffalo_l")
    write_clip_folder(root / "clip_vision" / "tiny-clip")
    return root


def use_scoring_models(monkeypatch, models: Path, home: Path) -> None:
    """Plain Python scoring with `models` and characters under `home`/charforge: no server, profile, token,
    InsightFace path or ComfyUI from the user's environment."""
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(models))
    monkeypatch.setenv("CHARFORGE_PATH_CHARFORGE", str(home / "charforge"))
    for var in ("CHARFORGE_SERVER", "CHARFORGE_PROFILE", "CHARFORGE_TOKEN", "CHARFORGE_PATH_INSIGHTFACE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
