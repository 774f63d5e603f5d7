"""ControlNet preprocessor nodes (menu: CharForge/Guide): pose, depth, Canny and line-art maps of IMAGE batches.

Each node returns an IMAGE batch of the input's size for ComfyUI's own Apply ControlNet (Advanced). Pose maps need
DWPose's ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx`` in a ``dwpose`` model folder, depth maps a Depth Anything
folder (config.json + weights) in ``depth_anything``; Canny and line art need no files. The work is in
``charforge.engine.guide`` (pose, depth, lines).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from .. import bridge
from .convert import image_rgb8, rgb8_to_image_batch

CATEGORY = "CharForge/Guide"
POSE_FOLDER = "dwpose"
DEPTH_FOLDER = "depth_anything"
NO_DEPTH_MODEL = "(no Depth Anything folder in models/depth_anything)"

_cache: dict[tuple[str, str], Any] = {}
_cache_lock = threading.Lock()


def _cached(kind: str, path: str, make):
    with _cache_lock:
        if (kind, path) not in _cache:
            _cache.clear()  # one preprocessor model held at a time
            _cache[(kind, path)] = make(path)
        return _cache[(kind, path)]


def pose_folder() -> str:
    """The first `dwpose` model folder holding both DWPose files, or an error naming folders and files."""
    from ..engine.guide.pose import DETECTOR_FILE, POSE_FILE, PoseModelsNotFoundError

    folders = bridge.model_folders(POSE_FOLDER)
    for folder in folders:
        if (Path(folder) / DETECTOR_FILE).is_file() and (Path(folder) / POSE_FILE).is_file():
            return folder
    raise PoseModelsNotFoundError(
        f"pose maps need DWPose's {DETECTOR_FILE} and {POSE_FILE} in a {POSE_FOLDER} model folder "
        f"({', '.join(folders) or 'models/' + POSE_FOLDER}); put both files there"
    )


def depth_choices() -> list[str]:
    return bridge.model_dirs(DEPTH_FOLDER, "config.json") or [NO_DEPTH_MODEL]


def _map_inputs(**options) -> dict[str, Any]:
    """A map node's inputs: the IMAGE batch, then that node's own ``options``, then the hidden node id."""
    return {
        "required": {
            "images": (
                "IMAGE",
                {"tooltip": "The photos or frames to turn into control maps (one map each)."},
            ),
            **options,
        },
        "hidden": {"unique_id": "UNIQUE_ID"},
    }


class _MapNode:
    """What the four map nodes declare alike: one IMAGE batch out of ``run``."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"


def _map_batch(images, draw, label: str, unique_id=None):
    total = int(images.shape[0])
    control = bridge.control(total, node_id=unique_id, label=label)
    maps = []
    for index, frame in enumerate(image_rgb8(images)):
        control.check()
        maps.append(draw(frame))
        control.progress(index + 1)
    return (rgb8_to_image_batch(maps),)


class PoseMap(_MapNode):
    """Pose maps for an OpenPose ControlNet: people and their 133 keypoints (DWPose), drawn in OpenPose colours."""

    DESCRIPTION = (
        "OpenPose-style pose maps from DWPose (models/dwpose: yolox_l.onnx finds people, dw-ll_ucoco_384.onnx "
        "places 133 body, feet, face and hand keypoints) drawn in the standard OpenPose colours on black, for an "
        "OpenPose ControlNet through Apply ControlNet."
    )
    RETURN_NAMES = ("pose_map",)
    OUTPUT_TOOLTIPS = ("One pose map per input image, same size.",)

    @classmethod
    def INPUT_TYPES(cls):
        return _map_inputs(
            body=("BOOLEAN", {"default": True, "tooltip": "Draw the 18 body points and limbs."}),
            hands=("BOOLEAN", {"default": True, "tooltip": "Draw both hands' 21 points and bones."}),
            face=("BOOLEAN", {"default": True, "tooltip": "Draw the 68 face points as white dots."}),
        )

    def run(self, images, body=True, hands=True, face=True, unique_id=None):
        from ..engine.guide.pose import PoseEstimator

        estimator = _cached("pose", pose_folder(), PoseEstimator)
        return _map_batch(
            images, lambda f: estimator.pose_map(f, body=body, face=face, hands=hands), "pose map", unique_id
        )


class DepthMap(_MapNode):
    """Depth maps for a depth ControlNet from a Depth Anything folder (transformers), nearest white."""

    DESCRIPTION = (
        "Depth maps from a Depth Anything model folder (models/depth_anything/<name>: config.json and weights from "
        "the Hugging Face hub), nearest white, farthest black, for a depth ControlNet through Apply ControlNet."
    )
    RETURN_NAMES = ("depth_map",)
    OUTPUT_TOOLTIPS = ("One depth map per input image, same size.",)

    @classmethod
    def INPUT_TYPES(cls):
        return _map_inputs(
            model=(depth_choices(), {"tooltip": "A Depth Anything folder in models/depth_anything."}),
            resolution=(
                "INT",
                {
                    "default": 518,
                    "min": 56,
                    "max": 2044,
                    "step": 14,
                    "tooltip": "Shorter side the model sees.",
                },
            ),
        )

    def run(self, images, model, resolution=518, unique_id=None):
        from ..engine.guide.depth import DepthEstimator, DepthModelNotFoundError

        if model == NO_DEPTH_MODEL:
            raise DepthModelNotFoundError(
                f"depth maps need a Depth Anything folder (config.json and model.safetensors, e.g. "
                f"depth-anything/Depth-Anything-V2-Small-hf) inside "
                f"{', '.join(bridge.model_folders(DEPTH_FOLDER)) or 'models/' + DEPTH_FOLDER}"
            )
        path = bridge.find_model_dir(DEPTH_FOLDER, model, "config.json", "Depth Anything folder")
        estimator = _cached("depth", path, DepthEstimator)
        estimator.size = int(resolution)
        return _map_batch(images, estimator.depth_map, "depth map", unique_id)


class CannyMap(_MapNode):
    """Canny edge maps for a Canny ControlNet (OpenCV), white edges on black."""

    DESCRIPTION = (
        "Canny edge maps (OpenCV, white edges on black) for a Canny ControlNet through Apply ControlNet."
    )
    RETURN_NAMES = ("edges",)

    @classmethod
    def INPUT_TYPES(cls):
        return _map_inputs(
            low_threshold=(
                "INT",
                {
                    "default": 100,
                    "min": 0,
                    "max": 255,
                    "tooltip": "Canny's lower hysteresis threshold (weak edges).",
                },
            ),
            high_threshold=(
                "INT",
                {
                    "default": 200,
                    "min": 0,
                    "max": 255,
                    "tooltip": "Canny's upper hysteresis threshold (strong edges).",
                },
            ),
        )

    def run(self, images, low_threshold=100, high_threshold=200, unique_id=None):
        from ..engine.guide.lines import canny_map

        return _map_batch(
            images, lambda f: canny_map(f, low_threshold, high_threshold), "canny map", unique_id
        )


class LineArtMap(_MapNode):
    """Model-free line-art maps for a line-art ControlNet, white lines on black."""

    DESCRIPTION = (
        "Model-free line drawings (white lines on black; the photo divided by its blur) for a line-art "
        "ControlNet through Apply ControlNet."
    )
    RETURN_NAMES = ("line_art",)

    @classmethod
    def INPUT_TYPES(cls):
        return _map_inputs(
            blur=(
                "FLOAT",
                {
                    "default": 4.0,
                    "min": 0.5,
                    "max": 32.0,
                    "step": 0.5,
                    "tooltip": "Gaussian blur (sigma, pixels) the photo is divided by: larger keeps broader strokes.",
                },
            ),
            strength=(
                "FLOAT",
                {
                    "default": 8.0,
                    "min": 1.0,
                    "max": 64.0,
                    "step": 0.5,
                    "tooltip": "How dark the lines are drawn: higher gives bolder lines.",
                },
            ),
        )

    def run(self, images, blur=4.0, strength=8.0, unique_id=None):
        from ..engine.guide.lines import line_art_map

        return _map_batch(images, lambda f: line_art_map(f, blur, strength), "line art", unique_id)


NODE_CLASS_MAPPINGS = {
    "CharForgePoseMap": PoseMap,
    "CharForgeDepthMap": DepthMap,
    "CharForgeCannyMap": CannyMap,
    "CharForgeLineArtMap": LineArtMap,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgePoseMap": "Pose Map (DWPose, CharForge)",
    "CharForgeDepthMap": "Depth Map (Depth Anything, CharForge)",
    "CharForgeCannyMap": "Canny Map (CharForge)",
    "CharForgeLineArtMap": "Line Art Map (CharForge)",
}
