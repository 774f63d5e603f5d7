"""Generate the API-format twins (``api/<name>.json``) of the shipped editor workflows (``<name>.json``).

The twins live in a subfolder because ComfyUI lists every top-level ``workflows/*.json`` as a template.

The node definitions are what ``GET /object_info`` would return: CharForge's nodes described from
``charforge.nodes.NODE_CLASS_MAPPINGS`` (the same shape ComfyUI builds), merged with the ComfyUI built-ins the
workflows use, recorded once from a real ComfyUI 0.3.64 server in ``object_info/builtin.json`` (a subfolder,
so ComfyUI does not list it as a template). Each editor file is converted with the driver's own converter.

    python workflows/build_api.py          # rewrite every api/<name>.json
    python workflows/build_api.py --check  # exit 1 when a committed twin differs from its editor file
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

WORKFLOWS_DIR = Path(__file__).resolve().parent
BUILTIN_OBJECT_INFO = WORKFLOWS_DIR / "object_info" / "builtin.json"
API_DIR_NAME = "api"

# Inputs whose choices are the files found in a model folder: the recorded or locally built choices say
# nothing about the user's machine, so checks accept any file name there (the driver's preflight checks them
# against the real server).
MODEL_FILE_INPUTS = frozenset({
    ("CheckpointLoaderSimple", "ckpt_name"),
    ("LoraLoader", "lora_name"),
    ("CreateHookLora", "lora_name"),
    ("ControlNetLoader", "control_net_name"),
    ("LoadImage", "image"),  # a file in the input folder
    ("CharForgeTrainLoRA", "base_model"),
    ("CharForgeLoadIdentity", "name"),
    ("CharForgeLoadVideoModel", "base_model"),
    ("CharForgeLoadVideoModel", "motion_module"),
    ("CharForgeVideoLoRA", "lora_name"),
    ("CharForgeMotionLoRA", "motion_lora"),
    ("CharForgeGenerateVideo", "controlnet"),
    ("CharForgeDepthMap", "model"),  # a folder in models/depth_anything
    ("CharForgeLoadIPAdapter", "ipadapter_name"),
    ("CharForgeLoadAudio", "audio"),  # a file in the input folder
    ("CharForgeFaceMotion", "video"),  # a file in the input folder
    ("CharForgeLoadClip", "model"),
    ("CharForgeLoadFaceSwapper", "swapper"),
    ("CharForgeLoadFaceRestorer", "model"),
    ("UpscaleModelLoader", "model_name"),
    ("UNETLoader", "unet_name"),
    ("LoraLoaderModelOnly", "lora_name"),
    ("DualCLIPLoader", "clip_name1"),
    ("DualCLIPLoader", "clip_name2"),
    ("TripleCLIPLoader", "clip_name1"),
    ("TripleCLIPLoader", "clip_name2"),
    ("TripleCLIPLoader", "clip_name3"),
    ("VAELoader", "vae_name"),
})


def node_info(node_id: str, cls: type, display_name: str | None = None,
              python_module: str = "custom_nodes.charforge") -> dict[str, Any]:
    """The ``/object_info`` entry ComfyUI builds for a V1 node class (of the pack at `python_module`)."""
    inputs = cls.INPUT_TYPES()
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": {section: list(values.keys()) for section, values in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": node_id,
        "display_name": display_name or node_id,
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": python_module,
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    return info


def charforge_object_info() -> dict[str, Any]:
    from charforge.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    return {name: node_info(name, cls, NODE_DISPLAY_NAME_MAPPINGS.get(name))
            for name, cls in NODE_CLASS_MAPPINGS.items()}


def builtin_object_info() -> dict[str, Any]:
    return json.loads(BUILTIN_OBJECT_INFO.read_text(encoding="utf-8"))


def object_info() -> dict[str, Any]:
    """ComfyUI's recorded built-ins plus CharForge's nodes, as one ``/object_info`` answer."""
    return {**builtin_object_info(), **charforge_object_info()}


def editor_files() -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob("*.json"))


def api_path(editor: Path) -> Path:
    return editor.parent / API_DIR_NAME / editor.name


def convert(editor: Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    from charforge.driver.workflow.convert import convert_workflow

    workflow = json.loads(editor.read_text(encoding="utf-8"))
    # A fixed generator: the shipped prompts have no {a|b} choices, but the output must not depend on luck.
    return convert_workflow(workflow, info if info is not None else object_info(), rng=random.Random(0))


def render(prompt: dict[str, Any]) -> str:
    return json.dumps(prompt, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a twin is out of date")
    args = parser.parse_args(argv)
    info = object_info()
    stale = []
    for editor in editor_files():
        text = render(convert(editor, info))
        target = api_path(editor)
        if args.check:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                stale.append(target.name)
        elif not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(WORKFLOWS_DIR.parent)}")
    if stale:
        print("out of date (run python workflows/build_api.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
