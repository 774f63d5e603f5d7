"""Conversions between ComfyUI's values and the engine's plain values, and pictures shown on a node.

The one place for these adapters (every node module uses them):

- folders typed into a node: `resolve_folder`, and `folder_signature` for ``IS_CHANGED``;
- ComfyUI ``IMAGE`` batches (torch, [B, H, W, C], float 0..1) to the engine's arrays and PIL images and
  back: `image_frames`, `image_rgb8`, `image_to_pil`, `pil_to_image_batch`, `rgb8_to_image_batch`,
  `files_to_image_batch`, `stack_images`, `empty_image_batch`;
- ``ui.images`` entries that make the frontend show a picture on the node: `show_file` (a file the node
  wrote) and `show_picture` (a PIL image, saved to ComfyUI's temp folder).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from .. import bridge
from ..deps import require


def resolve_folder(folder: str) -> str:
    """An absolute folder as given, or a folder relative to ComfyUI's input directory."""
    folder = os.path.expanduser(folder.strip().strip('"'))
    if not folder:
        raise ValueError("folder is empty: type the path of a folder of photos")
    if os.path.isabs(folder):
        return folder
    return os.path.join(bridge.input_directory(), folder)


def input_files(suffixes: tuple[str, ...], empty: str) -> list[str]:
    """Files with one of `suffixes` in ComfyUI's input folder and its subfolders (``sub/name.ext``, hidden
    folders skipped), sorted; ``[empty]`` when there are none (a combo needs one entry)."""
    root = bridge.input_directory()
    names = []
    if os.path.isdir(root):
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(folder, root)
            names += [
                name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
                for name in files
                if name.lower().endswith(suffixes)
            ]
    return sorted(names) or [empty]


def resolve_input_file(name: str, empty: str, kind: str, none_chosen: str) -> str:
    """The full path of an input-folder file named as `input_files` names it; refuses the placeholder `empty`
    (with `none_chosen`, the fix to tell the user), paths outside the input folder and missing files."""
    root = os.path.abspath(bridge.input_directory())
    if name == empty or not name.strip():
        raise FileNotFoundError(none_chosen.format(root=root))
    path = os.path.abspath(os.path.join(root, name))
    if os.path.commonpath((root, path)) != root:
        raise ValueError(f"{kind} {name!r} is outside the input folder {root}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} file not found: {path} (put it into the input folder {root})")
    return path


def folder_signature(folder: str, recursive: bool = True):
    """What an ``IS_CHANGED`` returns for a folder input: it changes when image files in the folder are added,
    removed or modified, so ComfyUI re-runs the node (NaN, never equal, when the folder cannot be read)."""
    from ..engine.dataset import scan_folder

    try:
        result = scan_folder(resolve_folder(folder), recursive=recursive)
    except (OSError, ValueError):
        return float("nan")
    return "\n".join(f"{p}:{os.path.getmtime(p)}:{os.path.getsize(p)}" for p in result.images)


# --------------------------------------------------------------------------------------------------
# IMAGE batches


def image_frames(images) -> Iterator[Any]:
    """A ComfyUI IMAGE batch -> one [H, W, C] float array (0..1, as stored) per image, one at a time."""
    for index in range(int(images.shape[0])):
        yield images[index].cpu().numpy()


def image_rgb8(images) -> Iterator[Any]:
    """A ComfyUI IMAGE batch -> RGB uint8 arrays, one at a time (never the whole batch converted at once).

    RGBA drops its alpha and one-channel images become grey RGB."""
    np = require("numpy")
    for index in range(int(images.shape[0])):
        frame = images[index].detach().cpu().float().clamp(0, 1).numpy()
        if frame.shape[-1] == 4:
            frame = frame[..., :3]
        elif frame.shape[-1] == 1:
            frame = np.repeat(frame, 3, axis=-1)
        yield (frame * 255.0 + 0.5).astype(np.uint8)


def image_to_pil(image):
    """One IMAGE frame ([H, W, C] tensor, 0..1) -> a PIL RGB image."""
    from PIL import Image

    return Image.fromarray(next(image_rgb8(image[None])))


def rgb8_to_image_batch(arrays: Iterable[Any]):
    """RGB uint8 arrays of one size -> ComfyUI IMAGE tensor [B, H, W, 3], float32 in 0..1."""
    np = require("numpy")
    torch = require("torch")
    arrays = [np.asarray(array, dtype=np.float32) / 255.0 for array in arrays]
    if not arrays:
        raise ValueError("cannot build an IMAGE batch from zero images")
    return torch.from_numpy(np.stack(arrays))


def pil_to_image_batch(images: list):
    """PIL images of one size -> ComfyUI IMAGE tensor [B, H, W, 3], float32 in 0..1."""
    return rgb8_to_image_batch(img.convert("RGB") for img in images)


def files_to_image_batch(paths: list[str], empty_size: int = 64):
    """Image files -> one IMAGE batch; files of another size are resized to the first one's (one IMAGE
    batch holds one size). No files: a black frame of `empty_size` (see `empty_image_batch`)."""
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    if not images:
        return empty_image_batch(empty_size)
    first = images[0].size
    return pil_to_image_batch([img if img.size == first else img.resize(first) for img in images])


def stack_images(images: list, torch):
    """IMAGE frames ([H, W, C] tensors) -> one batch; frames of another size are resized to the first
    one's (bilinear)."""
    height, width = int(images[0].shape[0]), int(images[0].shape[1])
    out = []
    for image in images:
        if tuple(image.shape[:2]) != (height, width):
            image = torch.nn.functional.interpolate(
                image.permute(2, 0, 1)[None].float(),
                size=(height, width),
                mode="bilinear",
                align_corners=False,
            )[0].permute(1, 2, 0)
        out.append(image.float())
    return torch.stack(out)


def threshold_input(tooltip: str) -> tuple[str, dict]:
    """A 0..1 FLOAT threshold input (0 by default, step 0.01) with ``tooltip``."""
    return ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": tooltip})


def empty_image_batch(size: int = 64, like=None):
    """A one-image black batch: what a node returns for IMAGE when it has nothing to show.

    ComfyUI has no empty IMAGE value that every downstream node accepts, so an empty result is shown as
    one black frame and the count output says 0. With `like` (an IMAGE batch) the frame has its size and dtype.
    """
    torch = require("torch")
    if like is not None:
        return torch.zeros((1, *like.shape[1:]), dtype=like.dtype)
    return torch.zeros((1, size, size, 3), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Pictures on the node (the ``ui.images`` entries ComfyUI's frontend shows)


def show_file(path: str) -> dict:
    """Show a file: as it is when it lies in ComfyUI's output folder, else a copy in the temp folder."""
    output = os.path.realpath(bridge.output_directory())
    folder = os.path.realpath(os.path.dirname(path))
    subfolder = os.path.relpath(folder, output)
    if subfolder.startswith(".."):
        target = os.path.join(bridge.temp_directory(), "charforge_" + os.path.basename(path))
        shutil.copyfile(path, target)
        return {"filename": os.path.basename(target), "subfolder": "", "type": "temp"}
    return {
        "filename": os.path.basename(path),
        "subfolder": "" if subfolder == "." else subfolder.replace(os.sep, "/"),
        "type": "output",
    }


def show_picture(
    picture, filename: str | None = None, subfolder: str = "", prefix: str = "charforge"
) -> dict:
    """Show a PIL image: saved into ComfyUI's temp folder (`subfolder` inside it) as `filename`
    (default ``<prefix>_<random>.png``; a ``.jpg`` name is saved as JPEG, quality 90)."""
    folder = os.path.join(bridge.temp_directory(), subfolder)
    os.makedirs(folder, exist_ok=True)
    filename = filename or f"{prefix}_{uuid.uuid4().hex[:12]}.png"
    options = {"quality": 90} if filename.lower().endswith((".jpg", ".jpeg")) else {"compress_level": 4}
    picture.save(os.path.join(folder, filename), **options)
    return {"filename": filename, "subfolder": subfolder, "type": "temp"}
