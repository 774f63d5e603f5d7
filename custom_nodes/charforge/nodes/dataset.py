"""Dataset nodes (menu: CharForge/Dataset)."""

from __future__ import annotations

import os

from .. import bridge
from ..engine.dataset import Rejected, letterbox, load_image, measure_quality, scan_folder, verify_image
from .convert import empty_image_batch, pil_to_image_batch

CATEGORY = "CharForge/Dataset"


def resolve_folder(folder: str) -> str:
    """An absolute folder as given, or a folder relative to ComfyUI's input directory."""
    folder = os.path.expanduser(folder.strip().strip('"'))
    if not folder:
        raise ValueError("folder is empty: type the path of a folder of photos")
    if os.path.isabs(folder):
        return folder
    return os.path.join(bridge.input_directory(), folder)


class ListImages:
    """List the photos in a folder: how many there are, their paths, and a preview of the first ones."""

    DESCRIPTION = (
        "Lists the images (png, jpg, webp, bmp, tiff, gif) in a folder and shows a preview of the first ones. "
        "Unreadable files are counted as rejected and named in the report instead of failing the node. "
        "The folder is never modified."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "INT", "STRING")
    RETURN_NAMES = ("preview", "count", "paths")
    OUTPUT_TOOLTIPS = (
        "The first images, each fitted into a square of preview_size pixels (one black frame if none).",
        "How many readable images the folder holds.",
        "Full paths of the readable images, one per line.",
    )
    FUNCTION = "list_images"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {
                    "default": "",
                    "placeholder": "/path/to/photos",
                    "tooltip": "Folder of photos: an absolute path, or a path relative to ComfyUI's input folder.",
                }),
                "recursive": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Also list images in subfolders (hidden folders are skipped).",
                }),
                "max_preview": ("INT", {
                    "default": 8, "min": 1, "max": 64, "step": 1,
                    "tooltip": "How many images to include in the preview batch.",
                }),
                "preview_size": ("INT", {
                    "default": 256, "min": 64, "max": 1024, "step": 8,
                    "tooltip": "Side of the square each preview image is fitted into, in pixels.",
                }),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, folder, recursive, **_):
        # The folder's contents can change between runs with the same inputs: re-run when they do.
        try:
            path = resolve_folder(folder)
            result = scan_folder(path, recursive=recursive)
        except (OSError, ValueError):
            return float("nan")
        return "\n".join(f"{p}:{os.path.getmtime(p)}:{os.path.getsize(p)}" for p in result.images)

    def list_images(self, folder, recursive, max_preview, preview_size, node_id=None):
        result = scan_folder(resolve_folder(folder), recursive=recursive)
        progress = bridge.Progress(max(1, len(result.images)), node_id=node_id, label="list images")
        previews, readable, rejected = [], [], list(result.rejected)
        for path in result.images:
            try:
                if len(previews) < max_preview:
                    previews.append(letterbox(load_image(path), preview_size))
                else:
                    verify_image(path)  # beyond the preview, a header check is enough
            except Exception as exc:  # noqa: BLE001 - any decoder failure: report the file, keep going
                rejected.append(Rejected(path, f"unreadable image: {exc}"))
            else:
                readable.append(path)
            progress.update(1)
        batch = pil_to_image_batch(previews) if previews else empty_image_batch(preview_size)
        report = f"{len(readable)} image(s) in {result.folder}"
        if rejected:
            report += f"; {len(rejected)} rejected: " + "; ".join(
                f"{os.path.basename(r.path)} ({r.reason})" for r in rejected)
        return {"ui": {"text": [report]}, "result": (batch, len(readable), "\n".join(readable))}


class ImageQuality:
    """Measure sharpness and exposure of each image in a batch and say which are sharp enough."""

    DESCRIPTION = (
        "Measures each image's sharpness (variance of the Laplacian at a fixed 512 px scale, so photo size does "
        "not matter) and exposure (brightness, contrast, crushed shadows, blown highlights). Returns a JSON report "
        "and how many images reach min_sharpness. Needs opencv-python-headless."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "INT")
    RETURN_NAMES = ("report", "sharp_count")
    OUTPUT_TOOLTIPS = (
        "JSON list, one entry per image: index, sharpness, brightness, contrast, dark/bright fractions, sharp.",
        "How many images reach min_sharpness.",
    )
    FUNCTION = "measure"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to measure."}),
                "min_sharpness": ("FLOAT", {
                    "default": 60.0, "min": 0.0, "max": 10000.0, "step": 1.0,
                    "tooltip": "Sharpness an image needs to count as sharp. Above ~100 is usually crisp; "
                               "below ~30 is visibly blurred.",
                }),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def measure(self, images, min_sharpness, node_id=None):
        import json

        progress = bridge.Progress(int(images.shape[0]), node_id=node_id, label="image quality")
        rows = []
        for index in range(int(images.shape[0])):
            quality = measure_quality(images[index].cpu().numpy())
            rows.append({"index": index, **quality.as_dict(), "sharp": quality.sharpness >= min_sharpness})
            progress.update(1)
        sharp = sum(row["sharp"] for row in rows)
        summary = f"{sharp} of {len(rows)} image(s) sharp (min_sharpness {min_sharpness:g})"
        return {"ui": {"text": [summary]}, "result": (json.dumps(rows, indent=1), sharp)}


NODE_CLASS_MAPPINGS = {"CharForgeListImages": ListImages, "CharForgeImageQuality": ImageQuality}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgeListImages": "List Images (CharForge)",
    "CharForgeImageQuality": "Image Quality (CharForge)",
}
