"""Face-restoration and upscale model files, loaded through spandrel (the loader ComfyUI's upscale nodes use).

spandrel reads a ``.pth`` / ``.safetensors`` / ``.ckpt`` file, unwraps the containers released files use
(``params_ema``, ``params``, ``state_dict``), strips a ``module.`` prefix, recognises the architecture from its
key names and builds it with the sizes read from the tensors. CodeFormer lives in ``spandrel_extra_arches``
(a separate package under a non-commercial licence); it is registered when that package is installed.

Where the files are: ``models/facerestore_models`` (the folder name the popular face-restore packs use) and
ComfyUI's ``models/upscale_models``, both through the bridge's folder table.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import bridge
from ...deps import require

RESTORE_FOLDER = "facerestore_models"
UPSCALE_FOLDER = "upscale_models"
FACE_ARCHITECTURES = ("GFPGAN", "CodeFormer", "RestoreFormer")

_extra_lock = threading.Lock()
_extra_checked = False


class UnsupportedModelFile(ValueError):
    """A model file spandrel could not read, or one of the wrong kind (an upscaler given as a face model)."""


def _registry_with_extras():
    """spandrel's registry, with spandrel_extra_arches added once when it is installed (CodeFormer)."""
    global _extra_checked
    spandrel = require("spandrel")
    with _extra_lock:
        if not _extra_checked:
            _extra_checked = True
            try:
                import spandrel_extra_arches
            except ImportError:
                pass
            else:
                spandrel_extra_arches.install(ignore_duplicates=True)
    return spandrel.MAIN_REGISTRY


def extra_architectures_installed() -> bool:
    """True when spandrel_extra_arches (CodeFormer and others) is importable."""
    try:
        import spandrel_extra_arches  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ImageModel:
    """A loaded spandrel image model: the descriptor plus where it came from.

    `architecture` is spandrel's id (``GFPGAN``, ``CodeFormer``, ``RestoreFormer``, ``ESRGAN``, ...), `purpose`
    spandrel's purpose (``FaceSR`` for face restorers, ``SR`` for upscalers, ``Restoration``) and `scale` the
    output/input size ratio (1 for face restorers).
    """

    descriptor: Any  # spandrel.ImageModelDescriptor
    name: str  # the file name as the user picked it
    path: str

    @property
    def architecture(self) -> str:
        return str(self.descriptor.architecture.id)

    @property
    def purpose(self) -> str:
        return str(self.descriptor.purpose)

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    @property
    def device(self):
        return self.descriptor.device

    def to(self, device) -> ImageModel:
        self.descriptor.to(device)
        return self

    def __repr__(self) -> str:
        return f"ImageModel({self.name!r}, {self.architecture}, {self.purpose}, x{self.scale})"


def load_image_model(path: str, name: str | None = None, device: str | None = None) -> ImageModel:
    """Load any image model spandrel recognises from `path` onto `device` (default: the best one there is);
    raises `UnsupportedModelFile` saying why not."""
    spandrel = require("spandrel")
    registry = _registry_with_extras()
    if device is None:
        from ..models.devices import best_device

        device = best_device()
    try:
        descriptor = spandrel.ModelLoader(device=device, registry=registry).load_from_file(path)
    except spandrel.UnsupportedModelError as exc:
        hint = (
            ""
            if extra_architectures_installed()
            else (
                " If it is a CodeFormer model, install spandrel_extra_arches (`pip install spandrel_extra_arches`; "
                "non-commercial licence)."
            )
        )
        raise UnsupportedModelFile(
            f"{Path(path).name}: spandrel does not recognise this model's architecture ({exc}).{hint}"
        ) from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UnsupportedModelFile(
            f"{Path(path).name} is a {descriptor.architecture.id} model that needs a mask "
            f"(inpainting); it cannot restore or upscale an image"
        )
    descriptor.model.eval()
    return ImageModel(descriptor, name or Path(path).name, str(path))


_cache: dict[tuple, ImageModel] = {}
_cache_lock = threading.Lock()


def _cached(kind: str, name: str, device: str | None) -> ImageModel:
    path = bridge.find_model(kind, name)
    stat = Path(path).stat()
    key = (kind, str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, device)
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            model = load_image_model(path, name, device)
            for old in [k for k in _cache if k[:2] == key[:2]]:
                del _cache[old]
            _cache[key] = model
    return model


def load_face_restorer(name: str, device: str | None = None) -> ImageModel:
    """A face-restoration model (GFPGAN, CodeFormer, RestoreFormer) from the ``facerestore_models`` folder(s)."""
    model = _cached(RESTORE_FOLDER, name, device)
    if model.purpose != "FaceSR":
        raise UnsupportedModelFile(
            f"{name} is a {model.architecture} model ({model.purpose}), not a face-restoration model; face "
            f"restoration takes {', '.join(FACE_ARCHITECTURES)} files (put upscalers in {UPSCALE_FOLDER})"
        )
    return model


def load_upscaler(name: str, device: str | None = None) -> ImageModel:
    """An upscale model (ESRGAN, Real-ESRGAN, SwinIR, ... anything ComfyUI's upscale loader reads) from
    ``upscale_models``."""
    model = _cached(UPSCALE_FOLDER, name, device)
    if model.purpose == "FaceSR":
        raise UnsupportedModelFile(
            f"{name} is a face-restoration model ({model.architecture}); pick an upscaler"
        )
    if model.scale < 2:
        raise UnsupportedModelFile(
            f"{name} ({model.architecture}) does not enlarge (scale {model.scale}); "
            f"pick a 2x or 4x upscale model"
        )
    return model


def wrap_descriptor(descriptor: Any, name: str = "") -> ImageModel:
    """An `ImageModel` around a descriptor loaded elsewhere (ComfyUI's own UPSCALE_MODEL value)."""
    return ImageModel(descriptor, name or str(descriptor.architecture.id), "")


def clear_cache() -> None:
    """Forget every loaded restoration and upscale model."""
    with _cache_lock:
        _cache.clear()
