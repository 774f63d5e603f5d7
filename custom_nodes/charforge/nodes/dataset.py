"""Dataset nodes (menu: CharForge/Dataset).

The work is in ``charforge.engine.dataset``; these adapters convert ComfyUI values and pass the manifest
(CHARFORGE_DATASET) along. Longer than 600 lines because it declares the stage's ten nodes, each with every
input documented in its tooltip; what runs is a few lines per node.
"""

from __future__ import annotations

import os
from typing import Any

from .. import bridge
from ..engine.dataset import Rejected, letterbox, load_image, measure_quality, scan_folder, verify_image
from ..engine.dataset.crop import CROP_MODES, FORMATS
from ..engine.dataset.dedup import DEFAULT_THRESHOLD, HASH_KINDS
from ..engine.dataset.export import CAPTION_MODES
from ..engine.dataset.faces import DETECTOR_CHOICES
from ..engine.dataset.filters import FilterSettings
from ..engine.dataset.scan import rejection_reason
from .convert import (
    empty_image_batch,
    folder_signature,
    image_rgb8,
    pil_to_image_batch,
    resolve_folder,
    rgb8_to_image_batch,
    show_file,
)

CATEGORY = "CharForge/Dataset"
DATASET = "CHARFORGE_DATASET"
DATASETS_SUBFOLDER = ("charforge", "datasets")


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
                "folder": (
                    "STRING",
                    {
                        "default": "",
                        "placeholder": "/path/to/photos",
                        "tooltip": "Folder of photos: an absolute path, or a path relative to ComfyUI's input folder.",
                    },
                ),
                "recursive": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Also list images in subfolders (hidden folders are skipped).",
                    },
                ),
                "max_preview": (
                    "INT",
                    {
                        "default": 8,
                        "min": 1,
                        "max": 64,
                        "step": 1,
                        "tooltip": "How many images to include in the preview batch.",
                    },
                ),
                "preview_size": (
                    "INT",
                    {
                        "default": 256,
                        "min": 64,
                        "max": 1024,
                        "step": 8,
                        "tooltip": "Side of the square each preview image is fitted into, in pixels.",
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, folder, recursive, **_):
        # The folder's contents can change between runs with the same inputs: re-run when they do.
        return folder_signature(folder, recursive)

    def list_images(self, folder, recursive, max_preview, preview_size, node_id=None):
        result = scan_folder(resolve_folder(folder), recursive=recursive)
        progress = bridge.control(max(1, len(result.images)), node_id=node_id, label="list images")
        previews: list[Any] = []
        readable: list[str] = []
        rejected = list(result.rejected)
        for path in result.images:
            try:
                if len(previews) < max_preview:
                    previews.append(letterbox(load_image(path), preview_size))
                else:
                    verify_image(path)  # beyond the preview, a header check is enough
            except Exception as exc:  # noqa: BLE001 - any decoder failure: report the file, keep going
                rejected.append(Rejected(path, rejection_reason(exc)))
            else:
                readable.append(path)
            progress.advance()
        batch = pil_to_image_batch(previews) if previews else empty_image_batch(preview_size)
        report = f"{len(readable)} image(s) in {result.folder}"
        if rejected:
            report += f"; {len(rejected)} rejected: " + "; ".join(
                f"{os.path.basename(r.path)} ({r.reason})" for r in rejected
            )
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
                "min_sharpness": (
                    "FLOAT",
                    {
                        "default": 60.0,
                        "min": 0.0,
                        "max": 10000.0,
                        "step": 1.0,
                        "tooltip": "Sharpness an image needs to count as sharp. Above ~100 is usually crisp; "
                        "below ~30 is visibly blurred.",
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def measure(self, images, min_sharpness, node_id=None):
        import json

        progress = bridge.control(int(images.shape[0]), node_id=node_id, label="image quality")
        rows = []
        for index in range(int(images.shape[0])):
            quality = measure_quality(images[index].cpu().numpy())
            rows.append({"index": index, **quality.as_dict(), "sharp": quality.sharpness >= min_sharpness})
            progress.advance()
        sharp = sum(row["sharp"] for row in rows)
        summary = f"{sharp} of {len(rows)} image(s) sharp (min_sharpness {min_sharpness:g})"
        return {"ui": {"text": [summary]}, "result": (json.dumps(rows, indent=1), sharp)}


# --------------------------------------------------------------------------------------------------
# Dataset preparation: nodes that pass a dataset manifest (CHARFORGE_DATASET) along


def _datasets_root() -> str:
    return os.path.join(bridge.output_directory(), *DATASETS_SUBFOLDER)


def _stage_progress(node_id, label: str):
    """``on_image(done, total)`` for an engine stage: the node's progress bar, which also stops on Cancel."""
    return bridge.control(node_id=node_id, label=label).progress


def _workers_input():
    return (
        "INT",
        {
            "default": 0,
            "min": 0,
            "max": 64,
            "step": 1,
            "tooltip": "Images processed at once. 0 uses one per CPU core; 1 processes one image at a time.",
        },
    )


def _dataset_input(tooltip: str = "The dataset from the previous dataset node."):
    return (DATASET, {"tooltip": tooltip})


def _finish(manifest, stage: str, settings: dict, summary: str):
    """Record the stage in the manifest, save manifest.json next to the dataset, return the UI text."""
    if not manifest.history or manifest.history[-1].stage != stage:
        manifest.record(stage, settings, summary)
    manifest.save()
    return f"{summary}\n{manifest.summary()}"


class LoadDataset:
    """Start a dataset from a folder of photos and/or images from other nodes."""

    DESCRIPTION = (
        "Starts a character dataset: lists the photos of a folder (png, jpg, webp, bmp, tiff, gif; EXIF rotation "
        "respected) and/or takes images from other nodes, and writes a manifest to "
        "output/charforge/datasets/<name>/manifest.json. Pixels are read later by each stage, so photos of any "
        "size mix freely. Unreadable files are listed as rejected with the reason, never an error. Captions in "
        ".txt files next to the photos are picked up. The photo folder is never modified."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "INT", "STRING")
    RETURN_NAMES = ("dataset", "count", "summary")
    OUTPUT_TOOLTIPS = (
        "The dataset: connect to Analyse Dataset (or any dataset node).",
        "How many images were found (readable or not).",
        "What was loaded and what could not be read.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": (
                    "STRING",
                    {
                        "default": "",
                        "placeholder": "/path/to/photos",
                        "tooltip": "Folder of photos: an absolute path, or relative to ComfyUI's input folder. "
                        "Leave empty to use only the connected images.",
                    },
                ),
                "name": (
                    "STRING",
                    {
                        "default": "character",
                        "tooltip": "Dataset name: its files go to output/charforge/datasets/<name>/. "
                        "Loading again with the same name replaces that dataset's manifest.",
                    },
                ),
                "recursive": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Also load photos in subfolders (hidden folders are skipped).",
                    },
                ),
                "read_captions": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Use the first line of photo.txt next to photo.jpg as its caption (kohya convention).",
                    },
                ),
                "workers": _workers_input(),
            },
            "optional": {
                "images": (
                    "IMAGE",
                    {
                        "tooltip": "Images from other nodes, added after the folder's photos "
                        "(written into the dataset folder as PNG)."
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, folder, recursive, **_):
        # The folder's contents can change between runs with the same inputs: re-run when they do.
        if not (folder or "").strip():
            return ""
        return ListImages.IS_CHANGED(folder=folder, recursive=recursive)

    def load(self, folder, name, recursive, read_captions, workers, images=None, node_id=None):
        from ..engine.dataset import DatasetManifest, add_arrays, dataset_folder, load_folder

        target = dataset_folder(_datasets_root(), name)
        progress = _stage_progress(node_id, "load dataset")
        if (folder or "").strip():
            manifest = load_folder(
                resolve_folder(folder),
                target,
                name=target.name,
                recursive=recursive,
                read_captions=read_captions,
                workers=workers,
                on_image=progress,
            )
        elif images is None:
            raise ValueError("nothing to load: type the folder of your photos, or connect images")
        else:
            manifest = DatasetManifest(name=target.name, folder=str(target))
        if images is not None:
            add_arrays(
                manifest,
                image_rgb8(images),
                on_image=_stage_progress(node_id, "load images"),
                total=int(images.shape[0]),
            )
        unreadable = manifest.rejected
        summary = f"{len(manifest.entries)} image(s) loaded into {manifest.folder}"
        if unreadable:
            summary += (
                f"; {len(unreadable)} unreadable: "
                + "; ".join(f"{e.name} ({e.rejected[0]})" for e in unreadable[:10])
                + (" ..." if len(unreadable) > 10 else "")
            )
        text = _finish(
            manifest,
            "load",
            {"folder": folder, "recursive": recursive, "read_captions": read_captions},
            summary,
        )
        return {"ui": {"text": [text]}, "result": (manifest, len(manifest.entries), summary)}


class AnalyseDataset:
    """Measure every photo: resolution, sharpness, exposure, faces and identity distance."""

    DESCRIPTION = (
        "Measures each photo once at reduced size: resolution, sharpness (variance of the Laplacian at 512 px, so "
        "photo size does not matter), brightness and contrast, perceptual hashes, and faces (how many, how many "
        "people, the main face's box and size). Face detection uses InsightFace when a pack is in "
        "models/insightface (or Load Face Models is connected), which also measures each face's distance to the "
        "dataset's own average identity (catches photos of someone else); otherwise the MTCNN detector shipped "
        "in the mtcnn package, or OpenCV's Haar cascade. The summary says which detector ran."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = (
        "The dataset with measures filled in: connect to Filter or Deduplicate.",
        "Which face detector ran and what was found.",
    )
    FUNCTION = "analyse"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": _dataset_input(),
                "face_detector": (
                    list(DETECTOR_CHOICES),
                    {
                        "default": "auto",
                        "tooltip": "auto: InsightFace when a pack is installed, else the fallback. insightface: fail "
                        "if no pack. fallback: MTCNN (mtcnn package) or OpenCV Haar. none: skip faces.",
                    },
                ),
                "insightface_pack": (
                    "STRING",
                    {
                        "default": "buffalo_l",
                        "tooltip": "InsightFace pack folder under models/insightface/models/ (buffalo_l, antelopev2).",
                    },
                ),
                "workers": _workers_input(),
            },
            "optional": {
                "face_models": (
                    "CHARFORGE_FACE_MODELS",
                    {
                        "tooltip": "Already loaded InsightFace models (Load Face Models); overrides face_detector."
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def analyse(self, dataset, face_detector, insightface_pack, workers, face_models=None, node_id=None):
        from ..engine.dataset import analyse, choose_detector
        from ..engine.dataset.faces import DetectorChoice, InsightFaces

        if face_models is not None:
            choice = DetectorChoice(InsightFaces(face_models), "InsightFace models from the connected input")
        else:
            choice = choose_detector(face_detector, pack=insightface_pack.strip() or "buffalo_l")
        manifest = analyse(
            dataset,
            choice.detector,
            choice.name,
            workers=workers,
            on_image=_stage_progress(node_id, "analyse dataset"),
        )
        measured = [e for e in manifest.entries if e.scores.sharpness is not None]
        summary = f"face detector: {choice.name} ({choice.note}); {len(measured)} image(s) measured"
        if choice.detector is not None:
            no_face = sum(1 for e in measured if e.faces is not None and e.faces.count == 0)
            several = sum(1 for e in measured if e.faces is not None and e.faces.people > 1)
            summary += f", {no_face} without a face, {several} with several people"
        identity = [e for e in measured if e.scores.identity_distance is not None]
        if identity:
            summary += f", identity distance measured for {len(identity)}"
        text = _finish(manifest, "analyse", {"face_detector": choice.name}, summary)
        return {"ui": {"text": [text]}, "result": (manifest, summary)}


class DeduplicateDataset:
    """Group exact and near-duplicate photos and keep the best of each group."""

    DESCRIPTION = (
        "Finds exact copies (same file bytes) and near duplicates (resized, re-encoded or lightly edited copies: "
        "perceptual hashes within the Hamming threshold) among the accepted photos, keeps the sharpest (then the "
        "largest) of each group and rejects the rest, naming the photo that was kept."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "INT", "STRING")
    RETURN_NAMES = ("dataset", "duplicate_groups", "summary")
    OUTPUT_TOOLTIPS = (
        "The dataset with duplicates rejected.",
        "How many duplicate groups were found.",
        "The groups: which photo was kept and which were dropped.",
    )
    FUNCTION = "deduplicate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": _dataset_input(),
                "threshold": (
                    "INT",
                    {
                        "default": DEFAULT_THRESHOLD,
                        "min": 0,
                        "max": 32,
                        "step": 1,
                        "tooltip": "Bits (of 64) two hashes may differ by and still count as the same photo. 0: only "
                        "identical pixels; 4-10: re-encodes and resizes; above 12 starts matching "
                        "different photos of the same scene.",
                    },
                ),
                "hash": (
                    list(HASH_KINDS),
                    {
                        "default": "phash",
                        "tooltip": "phash: robust to blur and colour changes. dhash: stricter on edits. both: must "
                        "match on both (fewest false matches).",
                    },
                ),
                "workers": _workers_input(),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def deduplicate(self, dataset, threshold, hash, workers, node_id=None):
        from ..engine.dataset import deduplicate

        manifest = deduplicate(
            dataset,
            threshold=threshold,
            hash_kind=hash,
            workers=workers,
            on_image=_stage_progress(node_id, "deduplicate dataset"),
        )
        names = manifest.by_id()
        groups = [", ".join(names[i].name for i in group) for group in manifest.duplicate_groups]
        dropped = sum(len(g) - 1 for g in manifest.duplicate_groups)
        summary = f"{len(groups)} duplicate group(s), {dropped} photo(s) dropped"
        if groups:
            summary += " (kept first): " + " | ".join(groups[:20]) + (" ..." if len(groups) > 20 else "")
        text = _finish(manifest, "deduplicate", {"threshold": threshold, "hash": hash}, summary)
        return {"ui": {"text": [text]}, "result": (manifest, len(groups), summary)}


class FilterDataset:
    """Reject photos below the quality thresholds (size, sharpness, exposure, faces, identity)."""

    DESCRIPTION = (
        'Rejects photos that fail a threshold and records why ("blurry: sharpness 12 < 50"). Rules whose '
        "measure is missing are skipped (face rules need Analyse with a face detector; identity needs "
        "InsightFace). Never fails: when nothing passes, the dataset is empty and the summary says which rules "
        "rejected the photos. Set a threshold to 0 to switch its rule off."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "INT", "STRING")
    RETURN_NAMES = ("dataset", "accepted", "summary")
    OUTPUT_TOOLTIPS = (
        "The dataset with failing photos rejected.",
        "How many photos are still accepted.",
        "How many photos each rule rejected.",
    )
    FUNCTION = "filter"

    @classmethod
    def INPUT_TYPES(cls):
        d = FilterSettings()
        return {
            "required": {
                "dataset": _dataset_input(),
                "min_side": (
                    "INT",
                    {
                        "default": d.min_side,
                        "min": 0,
                        "max": 8192,
                        "step": 8,
                        "tooltip": "Shorter side in pixels a photo needs (512 for SD1.5, 768-1024 for SDXL).",
                    },
                ),
                "min_sharpness": (
                    "FLOAT",
                    {
                        "default": d.min_sharpness,
                        "min": 0.0,
                        "max": 10000.0,
                        "step": 1.0,
                        "tooltip": "Sharpness a photo needs. Above ~100 is crisp; below ~30 visibly blurred.",
                    },
                ),
                "min_brightness": (
                    "FLOAT",
                    {
                        "default": d.min_brightness,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Mean brightness (0 black .. 1 white) below which a photo is too dark.",
                    },
                ),
                "max_brightness": (
                    "FLOAT",
                    {
                        "default": d.max_brightness,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Mean brightness above which a photo is too bright "
                        "(1 switches the rule off).",
                    },
                ),
                "min_contrast": (
                    "FLOAT",
                    {
                        "default": d.min_contrast,
                        "min": 0.0,
                        "max": 0.5,
                        "step": 0.005,
                        "tooltip": "Spread of brightness a photo needs (flat, washed-out "
                        "photos score below ~0.03).",
                    },
                ),
                "require_face": (
                    "BOOLEAN",
                    {"default": d.require_face, "tooltip": "Reject photos in which no face was found."},
                ),
                "max_people": (
                    "INT",
                    {
                        "default": d.max_people,
                        "min": 0,
                        "max": 20,
                        "step": 1,
                        "tooltip": "Most faces of similar size (at least a quarter of the main "
                        "face's area) allowed; 1 rejects group photos. 0: no limit.",
                    },
                ),
                "min_face_size": (
                    "INT",
                    {
                        "default": d.min_face_size,
                        "min": 0,
                        "max": 4096,
                        "step": 8,
                        "tooltip": "Pixels the main face's shorter side needs.",
                    },
                ),
                "max_identity_distance": (
                    "FLOAT",
                    {
                        "default": d.max_identity_distance,
                        "min": 0.0,
                        "max": 2.0,
                        "step": 0.01,
                        "tooltip": "Largest distance of the main face to the dataset's average identity (InsightFace "
                        "only). The same person is usually below 0.5, someone else above 0.7.",
                    },
                ),
            },
        }

    def filter(
        self,
        dataset,
        min_side,
        min_sharpness,
        min_brightness,
        max_brightness,
        min_contrast,
        require_face,
        max_people,
        min_face_size,
        max_identity_distance,
    ):
        from ..engine.dataset import apply_filters

        settings = FilterSettings(
            min_side=min_side,
            min_sharpness=min_sharpness,
            min_brightness=min_brightness,
            max_brightness=max_brightness,
            min_contrast=min_contrast,
            require_face=require_face,
            max_people=max_people,
            min_face_size=min_face_size,
            max_identity_distance=max_identity_distance,
        )
        manifest, summary = apply_filters(dataset, settings)
        text = _finish(manifest, "filter", {}, summary)
        return {"ui": {"text": [text]}, "result": (manifest, len(manifest.accepted), summary)}


class CropDataset:
    """Crop each accepted photo to its SD1.5 or SDXL bucket, framed on the face, and resize it."""

    DESCRIPTION = (
        "Crops every accepted photo to the resolution bucket closest to its shape (SDXL: ~1 megapixel buckets, "
        "SD1.5: ~512x512 ones, 64-pixel steps) or to a square, keeping the face centred with some headroom above "
        "it (or a centre crop), and resizes it. Photos smaller than their bucket keep their size unless upscale "
        "is on, or an upscale model is connected: then they are enlarged to their bucket with it (tiled), and the "
        "report says which and by how much. Writes to the dataset folder; the originals are untouched."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("The dataset with cropped working files.", "Bucket histogram.")
    FUNCTION = "crop"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": _dataset_input(),
                "buckets": (
                    ["sdxl", "sd15"],
                    {
                        "default": "sdxl",
                        "tooltip": "sdxl: ~1024x1024-pixel buckets (SDXL, Pony, Flux). "
                        "sd15: ~512x512 (Stable Diffusion 1.5).",
                    },
                ),
                "mode": (
                    list(CROP_MODES),
                    {
                        "default": "face",
                        "tooltip": "face: frame on the main face (centre crop when none was "
                        "found). centre: always crop the middle.",
                    },
                ),
                "headroom": (
                    "FLOAT",
                    {
                        "default": 0.15,
                        "min": 0.0,
                        "max": 0.9,
                        "step": 0.01,
                        "tooltip": "Share of the crop's height kept above the top of the face.",
                    },
                ),
                "square": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Crop every photo square (1024x1024 or 512x512) instead of "
                        "to the bucket closest to its shape.",
                    },
                ),
                "upscale": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Enlarge photos smaller than their bucket. Off: they are "
                        "trained at their own size (less blur).",
                    },
                ),
                "format": (
                    list(FORMATS),
                    {
                        "default": "jpg",
                        "tooltip": "jpg: quality 95 (fast, small). png: lossless, but about 15 "
                        "times slower to write and 3 times larger.",
                    },
                ),
                "workers": _workers_input(),
            },
            "optional": {
                "upscale_model": (
                    "UPSCALE_MODEL",
                    {
                        "tooltip": "From ComfyUI's Load Upscale Model (models/upscale_models: ESRGAN, Real-ESRGAN, "
                        "SwinIR, ...). Photos smaller than their bucket are enlarged with it, tiled, instead "
                        "of a plain resize."
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def crop(
        self,
        dataset,
        buckets,
        mode,
        headroom,
        square,
        upscale,
        format,
        workers,
        upscale_model=None,
        node_id=None,
    ):
        from ..engine.dataset import CropSettings, crop_dataset

        settings = CropSettings(
            bucket_set=buckets, mode=mode, headroom=headroom, square=square, upscale=upscale, format=format
        )
        upscaler = None
        if upscale_model is not None:
            from ..engine.models.devices import best_device
            from ..engine.synth import wrap_descriptor

            # ComfyUI keeps loaded upscale models on the CPU and moves them to the GPU only while they run.
            upscaler = wrap_descriptor(
                upscale_model, f"{upscale_model.architecture.id} x{upscale_model.scale}"
            )
            upscaler.to(best_device())
        try:
            manifest = crop_dataset(
                dataset,
                settings,
                workers=workers,
                on_image=_stage_progress(node_id, "crop dataset"),
                upscaler=upscaler,
            )
        finally:
            if upscaler is not None:
                upscaler.to("cpu")
        summary = manifest.history[-1].summary
        text = _finish(manifest, "crop", {}, summary)
        return {"ui": {"text": [text]}, "result": (manifest, summary)}


class AugmentDataset:
    """Add mirrored and colour-jittered copies of the accepted photos (recorded in the manifest)."""

    DESCRIPTION = (
        "Adds a horizontally mirrored copy and/or a mildly colour-jittered copy (brightness, contrast, saturation) "
        "of every accepted photo. Copies are recorded in the manifest with what was done and share the "
        "original's caption. Skip flipping for characters with asymmetric features (parting, scar, logo)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("The dataset with the copies added.", "How many copies were made.")
    FUNCTION = "augment"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": _dataset_input(),
                "flip": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Add a horizontally mirrored copy of each photo."},
                ),
                "color_jitter": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 0.5,
                        "step": 0.01,
                        "tooltip": "Strength of a colour-jittered copy (0: none; 0.05-0.15 is mild).",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFF,
                        "step": 1,
                        "tooltip": "Seed of the colour jitter (the same seed gives the same copies).",
                    },
                ),
                "workers": _workers_input(),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def augment(self, dataset, flip, color_jitter, seed, workers, node_id=None):
        from ..engine.dataset import AugmentSettings, augment

        settings = AugmentSettings(flip=flip, color_jitter=color_jitter, seed=seed)
        manifest = augment(
            dataset, settings, workers=workers, on_image=_stage_progress(node_id, "augment dataset")
        )
        summary = manifest.history[-1].summary
        text = _finish(manifest, "augment", {}, summary)
        return {"ui": {"text": [text]}, "result": (manifest, summary)}


class ExportDataset:
    """Write the accepted photos in kohya's folder layout with .txt captions and the manifest."""

    DESCRIPTION = (
        "Copies the accepted photos into output/charforge/datasets/<name>/<export_name>/img/<repeats>_<trigger> "
        "<class>/ with a one-line .txt caption next to each (trigger word first), plus manifest.json and a "
        "kohya dataset.toml. Pass the img folder (train_data_dir output), not the inner one, to the trainer. "
        "Exporting again gives the same files and removes photos rejected since."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "STRING", "STRING")
    RETURN_NAMES = ("dataset", "train_data_dir", "summary")
    OUTPUT_TOOLTIPS = (
        "The dataset (with the export folder recorded).",
        "The img folder to give a kohya-style trainer as train_data_dir.",
        "What was written.",
    )
    FUNCTION = "export"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": _dataset_input(),
                "trigger": (
                    "STRING",
                    {
                        "default": "ohwx",
                        "tooltip": "Trigger word: a rare token the LoRA binds the character to. "
                        "Put first in every caption and in the folder name.",
                    },
                ),
                "class_tokens": (
                    "STRING",
                    {
                        "default": "person",
                        "tooltip": "What the character is (woman, man, person, cat...): "
                        "the caption of photos without one.",
                    },
                ),
                "repeats": (
                    "INT",
                    {
                        "default": 10,
                        "min": 1,
                        "max": 1000,
                        "step": 1,
                        "tooltip": "How often each photo is seen per epoch (the folder's number).",
                    },
                ),
                "export_name": (
                    "STRING",
                    {"default": "kohya", "tooltip": "Folder inside the dataset folder to export into."},
                ),
                "caption_mode": (
                    list(CAPTION_MODES),
                    {
                        "default": CAPTION_MODES[0],
                        "tooltip": "caption, trigger first: the photo's caption with the trigger put first. caption as "
                        "is: unchanged. trigger and class only: ignore captions. Photos without a "
                        'caption always get "trigger, class".',
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def export(self, dataset, trigger, class_tokens, repeats, export_name, caption_mode, node_id=None):
        from ..engine.dataset import export_kohya

        result = export_kohya(
            dataset,
            trigger,
            class_tokens,
            repeats=repeats,
            export_name=export_name,
            caption_mode=caption_mode,
            on_image=_stage_progress(node_id, "export dataset"),
        )
        text = _finish(result.manifest, "export", {}, result.summary)
        return {"ui": {"text": [text]}, "result": (result.manifest, result.train_data_dir, result.summary)}


class DatasetReport:
    """Show a contact sheet of every photo with its scores and rejection reasons; write JSON and HTML."""

    DESCRIPTION = (
        "Draws contact sheets: every photo's thumbnail with its face box, status (green accepted, red rejected "
        "with the reasons, grey augmented copy) and scores, shown on the node. Also writes report.json and "
        "report.html (counts, why photos were rejected, bucket histogram, duplicate groups, caption coverage, "
        "trigger-word presence) into the dataset's report folder."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("contact_sheet", "report_html", "summary")
    OUTPUT_TOOLTIPS = (
        "The contact sheet pages (up to 16) as an image batch.",
        "Path of report.html (report.json is next to it).",
        "Counts and the main rejection reasons.",
    )
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": _dataset_input(),
                "trigger": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Trigger word to look for in captions (empty: the one the last "
                        "export used).",
                    },
                ),
                "thumbnail_size": (
                    "INT",
                    {
                        "default": 192,
                        "min": 64,
                        "max": 512,
                        "step": 16,
                        "tooltip": "Side of each thumbnail in pixels.",
                    },
                ),
                "per_sheet": (
                    "INT",
                    {
                        "default": 48,
                        "min": 1,
                        "max": 400,
                        "step": 1,
                        "tooltip": "Photos per contact-sheet page.",
                    },
                ),
                "workers": _workers_input(),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def report(self, dataset, trigger, thumbnail_size, per_sheet, workers, node_id=None):
        from ..engine.dataset import write_report

        written = write_report(
            dataset,
            trigger=trigger,
            thumb_size=thumbnail_size,
            per_sheet=per_sheet,
            workers=workers,
            on_image=_stage_progress(node_id, "dataset report"),
        )
        data = written["data"]
        counts = data["counts"]
        reasons = ", ".join(f"{k}: {v}" for k, v in list(data["rejection_reasons"].items())[:6]) or "none"
        summary = (
            f"{counts['accepted']} accepted, {counts['rejected']} rejected ({reasons}); "
            f"{len(written['sheets'])} contact sheet page(s); report: {written['html']}"
        )
        images = [show_file(path) for path in written["sheets"]]
        batch = rgb8_to_image_batch(written["pages"])
        return {"ui": {"images": images, "text": [summary]}, "result": (batch, written["html"], summary)}


NODE_CLASS_MAPPINGS = {
    "CharForgeListImages": ListImages,
    "CharForgeImageQuality": ImageQuality,
    "CharForgeLoadDataset": LoadDataset,
    "CharForgeAnalyseDataset": AnalyseDataset,
    "CharForgeDeduplicateDataset": DeduplicateDataset,
    "CharForgeFilterDataset": FilterDataset,
    "CharForgeCropDataset": CropDataset,
    "CharForgeAugmentDataset": AugmentDataset,
    "CharForgeExportDataset": ExportDataset,
    "CharForgeDatasetReport": DatasetReport,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgeListImages": "List Images (CharForge)",
    "CharForgeImageQuality": "Image Quality (CharForge)",
    "CharForgeLoadDataset": "Load Dataset (CharForge)",
    "CharForgeAnalyseDataset": "Analyse Dataset (CharForge)",
    "CharForgeDeduplicateDataset": "Deduplicate Dataset (CharForge)",
    "CharForgeFilterDataset": "Filter Dataset (CharForge)",
    "CharForgeCropDataset": "Crop & Resize Dataset (CharForge)",
    "CharForgeAugmentDataset": "Augment Dataset (CharForge)",
    "CharForgeExportDataset": "Export Dataset, kohya (CharForge)",
    "CharForgeDatasetReport": "Dataset Report (CharForge)",
}
