"""Optional dependencies: checked cheaply at startup, imported for real only when a node needs them.

The pack must load in ComfyUI even when a heavy or fragile package (insightface above all) is missing
or broken. Node modules therefore never import these at module level; they call `require()` inside the
function that needs the package, which raises `MissingDependencyError` with the exact install command.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from types import ModuleType

log = logging.getLogger("charforge")


@dataclass(frozen=True)
class OptionalDependency:
    module: str  # import name
    package: str  # pip requirement
    used_by: str  # the features that need it, in the user's words


OPTIONAL: tuple[OptionalDependency, ...] = (
    OptionalDependency("numpy", "numpy", "every CharForge node"),
    OptionalDependency("PIL", "Pillow", "every CharForge node that reads images"),
    OptionalDependency("safetensors", "safetensors", "LoRA training, export and inspection"),
    OptionalDependency("diffusers", "diffusers", "LoRA training and AnimateDiff video"),
    OptionalDependency("transformers", "transformers", "captioning, CLIP score and training"),
    OptionalDependency("peft", "peft", "LoRA training"),
    OptionalDependency("cv2", "opencv-python-headless", "dataset analysis (sharpness, faces) and video"),
    OptionalDependency("onnxruntime", "onnxruntime", "WD14 tagging and face identity scoring"),
    OptionalDependency("insightface", "insightface", "face identity scoring (ArcFace) and face crops"),
    OptionalDependency("av", "av", "saving MP4 / WebM video"),
    OptionalDependency(
        "spandrel", "spandrel", "face restoration and model upscaling (dataset synthesis, crop)"
    ),
    OptionalDependency(
        "mtcnn",
        "mtcnn",
        "the fallback face detector of dataset analysis (used when no InsightFace pack is installed)",
    ),
)

_BY_MODULE = {dep.module: dep for dep in OPTIONAL}


class MissingDependencyError(ImportError):
    """A node needs a package that is not installed (or does not import) in ComfyUI's Python."""


def install_hint(packages: list[str]) -> str:
    return f"{sys.executable} -m pip install {' '.join(packages)}"


def require(module: str) -> ModuleType:
    """Import `module` or raise `MissingDependencyError` naming the feature and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        dep = _BY_MODULE.get(module, OptionalDependency(module, module, "this node"))
        raise MissingDependencyError(
            f"{dep.package} is needed for {dep.used_by} but could not be imported ({exc}). "
            f"Install it into the Python that runs ComfyUI: {install_hint([dep.package])}"
        ) from exc


def missing() -> list[OptionalDependency]:
    """Optional dependencies that are not installed. Uses find_spec only, so nothing heavy is imported."""
    absent = []
    for dep in OPTIONAL:
        try:
            found = importlib.util.find_spec(dep.module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            absent.append(dep)
    return absent


def log_startup_report() -> list[OptionalDependency]:
    """Log one warning listing what is missing and the command that installs it; return the missing ones."""
    absent = missing()
    if absent:
        lines = [f"  {dep.package}: needed for {dep.used_by}" for dep in absent]
        log.warning(
            "CharForge: %d optional package(s) not installed; the nodes that need them will say so when used:\n%s\n"
            "  install with: %s",
            len(absent),
            "\n".join(lines),
            install_hint([dep.package for dep in absent]),
        )
    return absent
