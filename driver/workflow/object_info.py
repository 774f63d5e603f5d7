"""The server's node definitions (``GET /object_info``): the one place that reads their shape.

An entry per node class: ``{"input": {"required": {NAME: SPEC}, "optional": {...}}, "input_order": {...},
"output": [TYPE, ...], "output_node": bool, "display_name": ...}``. An input's SPEC is ``[KIND, {options}]`` (the
options may be missing), where KIND is a type name (``"INT"``, ``"IMAGE"`` ...), ``"COMBO"`` with the choices in
``options["options"]``, or the list of choices itself (the older combo form). Conversion, overrides, preflight and
the recipes all read definitions through these functions.
"""

from __future__ import annotations

from typing import Any

#: Input options that mark a file-picking combo whose value can be a local file to upload.
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "upload")

#: ComfyUI's built-in nodes of a text-to-image graph with a LoRA (what ``charforge lora eval`` and ``charforge
#: story`` check a server for before they build one)
LORA_TXT2IMG_NODES = (
    "CheckpointLoaderSimple",
    "LoraLoader",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "KSampler",
    "VAEDecode",
    "SaveImage",
)

#: ``(kind, options)`` of one declared input (see the module docstring).
InputSpec = tuple[Any, dict[str, Any]]


def split_spec(spec: Any) -> InputSpec:
    """``(kind, options)`` of a declared input's SPEC (options ``{}`` when it has none)."""
    if isinstance(spec, (list, tuple)) and spec:
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return spec[0], options
    return spec, {}


def declared_inputs(object_info: dict[str, Any], class_type: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw ``(required, optional)`` input declarations of a node class (empty when it is unknown)."""
    inputs = (object_info.get(class_type) or {}).get("input") or {}
    return dict(inputs.get("required") or {}), dict(inputs.get("optional") or {})


def input_spec(object_info: dict[str, Any] | None, class_type: str | None, name: str) -> InputSpec | None:
    """``(kind, options)`` of an input from ``/object_info``, or None when the class or the input is unknown."""
    if not object_info or class_type not in object_info:
        return None
    inputs = object_info[class_type].get("input") or {}
    for section in ("required", "optional"):
        spec = (inputs.get(section) or {}).get(name)
        if spec is not None:
            return split_spec(spec)
    return None


def input_names(object_info: dict[str, Any] | None, class_type: str | None) -> list[str] | None:
    """The declared inputs of a node class, required first; None when the class is unknown."""
    if not object_info or class_type not in object_info:
        return None
    inputs = object_info[class_type].get("input") or {}
    return [*(inputs.get("required") or {}), *(inputs.get("optional") or {})]


def combo_choices(kind: Any, options: dict[str, Any]) -> list[Any] | None:
    """The choices of a combo input (either form), None for any other kind."""
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        choices = options.get("options")
        return choices if isinstance(choices, list) else []
    return None


def input_choices(object_info: dict[str, Any] | None, class_type: str, name: str) -> list[str] | None:
    """What the server offers for a combo input (model files, samplers ...), as text: ``[]`` when the input is not
    a combo, None when the node class or the input is absent (a custom-node pack not installed)."""
    spec = input_spec(object_info, class_type, name)
    if spec is None:
        return None
    choices = combo_choices(*spec)
    return [str(c) for c in choices] if choices is not None else []


def is_file_picker(options: dict[str, Any]) -> bool:
    """True when an input's options mark it as a file-picking combo (an upload button in the editor)."""
    return any(options.get(flag) for flag in UPLOAD_FLAGS)


def is_upload_input(spec: InputSpec | None) -> bool:
    """True for file-picking combos (LoadImage's ``image`` and the like)."""
    return spec is not None and is_file_picker(spec[1])


def upload_input_of(object_info: dict[str, Any] | None, class_type: str | None) -> str | None:
    """The file-picking input of a node class (``image`` for LoadImage), when it has exactly one."""
    names = input_names(object_info, class_type) or []
    found = [n for n in names if is_upload_input(input_spec(object_info, class_type, n))]
    return found[0] if len(found) == 1 else None


def is_output_node(object_info: dict[str, Any], class_type: Any) -> bool:
    """True for classes the server runs for their own sake (SaveImage, PreviewImage ...)."""
    return bool((object_info.get(class_type) or {}).get("output_node"))


def output_types(object_info: dict[str, Any], class_type: str) -> list[Any]:
    """The types of a node class's outputs, by index."""
    return list((object_info.get(class_type) or {}).get("output") or [])
