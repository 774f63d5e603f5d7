"""Synthesis nodes (menu: CharForge/Synthesis): more photos from few, by face swap and restoration.

Load Face Swapper (inswapper_128) and Load Face Restorer (GFPGAN / CodeFormer / RestoreFormer, through
spandrel) load the models; Swap Face and Restore Faces work on IMAGE batches; Synthesize Dataset swaps the
character onto a folder of source images, scores the results against the identity, caps their share and
adds them to a dataset as synthetic entries. Upscaling uses ComfyUI's own Load Upscale Model, connected to
Crop & Resize Dataset. The logic lives in ``charforge.engine.synth``.
"""

from __future__ import annotations

from .. import bridge
from ..engine.synth import (
    DEFAULT_MAX_SHARE,
    DEFAULT_SWAPPER,
    RESTORE_FOLDER,
    FaceSwapper,
    RestoreSettings,
    SynthSettings,
    load_face_restorer,
    restore_faces,
    synthesize,
)
from ..engine.synth.swap import FACE_CHOICES, SWAPPER_FOLDER
from .convert import (
    files_to_image_batch,
    folder_signature,
    image_rgb8,
    resolve_folder,
    rgb8_to_image_batch,
    threshold_input,
)
from .score import PROVIDERS

CATEGORY = "CharForge/Synthesis"
DATASET = "CHARFORGE_DATASET"
NO_SWAPPER = "(put inswapper_128.onnx in models/insightface)"
NO_RESTORER = "(no model in models/facerestore_models)"
PREVIEW_LIMIT = 16

WHICH_TOOLTIP = "main: only the largest face of each image. all: every face with landmarks."
BLEND_TOOLTIP = "Share of the restored face in the result: 1 = fully restored, 0.5 = half way, 0 = unchanged."
FIDELITY_TOOLTIP = (
    "CodeFormer only: 0 = strongest restoration (may drift from the person), 1 = closest to the "
    "input face. 0.5-0.7 keeps the likeness on swapped faces."
)


def _swappers() -> list[str]:
    # Swappers lie directly in models/insightface; the face packs are below models/insightface/models/.
    names = [n for n in bridge.list_models(SWAPPER_FOLDER) if "/" not in n.replace("\\", "/")]
    return names or [NO_SWAPPER]


def _restorers() -> list[str]:
    return bridge.list_models(RESTORE_FOLDER) or [NO_RESTORER]


class LoadFaceSwapper:
    """Load InsightFace's face swapper (inswapper_128.onnx) from models/insightface."""

    DESCRIPTION = (
        "Loads the InsightFace face swapper (inswapper_128.onnx, the file ReActor users already have in "
        "models/insightface/) with ONNX Runtime on the best available device. It swaps an identity "
        "built with the buffalo_l face pack onto faces."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CHARFORGE_FACE_SWAPPER",)
    RETURN_NAMES = ("swapper",)
    OUTPUT_TOOLTIPS = ("The loaded swapper: connect to Swap Face or Synthesize Dataset.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = _swappers()
        return {
            "required": {
                "swapper": (
                    names,
                    {
                        "default": DEFAULT_SWAPPER if DEFAULT_SWAPPER in names else names[0],
                        "tooltip": "A swapper .onnx directly in models/insightface/ (inswapper_128.onnx).",
                    },
                ),
                "provider": (
                    list(PROVIDERS),
                    {"default": "auto", "tooltip": "ONNX Runtime device; auto picks the best."},
                ),
            }
        }

    def load(self, swapper, provider):
        if swapper == NO_SWAPPER:
            raise ValueError(
                "no face swapper found: put inswapper_128.onnx directly in ComfyUI/models/insightface/"
            )
        return (FaceSwapper.load(swapper, providers=PROVIDERS.get(provider)),)


class LoadFaceRestorer:
    """Load a face-restoration model (GFPGAN, CodeFormer, RestoreFormer) from models/facerestore_models."""

    DESCRIPTION = (
        "Loads a face-restoration model through spandrel, which recognises GFPGAN (v1.3, v1.4), "
        "RestoreFormer and, with the spandrel_extra_arches package installed, CodeFormer from the file "
        "itself. Files go in models/facerestore_models/ (the folder the popular face-restore packs use)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CHARFORGE_FACE_RESTORER",)
    RETURN_NAMES = ("restorer",)
    OUTPUT_TOOLTIPS = ("The loaded restorer: connect to Restore Faces, Swap Face or Synthesize Dataset.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = _restorers()
        return {
            "required": {
                "model": (
                    names,
                    {
                        "default": names[0],
                        "tooltip": "A GFPGAN / CodeFormer / RestoreFormer file in "
                        "models/facerestore_models/.",
                    },
                )
            }
        }

    def load(self, model):
        if model == NO_RESTORER:
            raise ValueError(
                "no face-restoration model found: put GFPGANv1.4.pth (or codeformer.pth, "
                "RestoreFormer.pth) in ComfyUI/models/facerestore_models/"
            )
        return (load_face_restorer(model),)


class SwapFace:
    """Swap the character's face (an identity) onto the faces of every image of a batch."""

    DESCRIPTION = (
        "Replaces the main face (or every face) of each image with the identity's face, using the "
        "face swapper, and pastes it back with a feathered mask so nothing outside the face changes. "
        "With a restorer connected, the swapped faces are restored afterwards (inswapper works at 128 px, "
        "so swapped faces are soft). Images without a face pass through unchanged."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "INT", "STRING")
    RETURN_NAMES = ("images", "swapped", "report")
    OUTPUT_TOOLTIPS = (
        "The images with the faces swapped.",
        "How many images had a face swapped.",
        "Per image: faces found and swapped.",
    )
    FUNCTION = "swap"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": (
                    "IMAGE",
                    {"tooltip": "The images whose faces are replaced (poses, outfits, backgrounds)."},
                ),
                "face_models": (
                    "CHARFORGE_FACE_MODELS",
                    {"tooltip": "From Load Face Models (finds the faces)."},
                ),
                "swapper": ("CHARFORGE_FACE_SWAPPER", {"tooltip": "From Load Face Swapper."}),
                "identity": (
                    "CHARFORGE_IDENTITY",
                    {
                        "tooltip": "The character, from Build Identity or Load Identity "
                        "(built with buffalo_l)."
                    },
                ),
                "which": (list(FACE_CHOICES), {"default": "main", "tooltip": WHICH_TOOLTIP}),
            },
            "optional": {
                "restorer": (
                    "CHARFORGE_FACE_RESTORER",
                    {"tooltip": "Optional: restore the swapped faces with it."},
                ),
                "blend": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": BLEND_TOOLTIP},
                ),
                "fidelity": (
                    "FLOAT",
                    {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": FIDELITY_TOOLTIP},
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def swap(
        self,
        images,
        face_models,
        swapper,
        identity,
        which,
        restorer=None,
        blend=1.0,
        fidelity=0.5,
        node_id=None,
    ):
        control = bridge.control(int(images.shape[0]), node_id=node_id, label="swap face")
        results, lines, count = [], [], 0
        for index, rgb in enumerate(image_rgb8(images)):
            faces = face_models.detect(rgb)
            swapped = swapper.swap(rgb, faces, identity.centroid, which)
            out = swapped.rgb
            if restorer is not None and swapped.swapped:
                out = restore_faces(
                    restorer, out, face_models.detect(out), RestoreSettings(blend, fidelity, which), control
                ).rgb
            count += bool(swapped.swapped)
            lines.append(f"image {index}: {swapped.faces_found} face(s), {len(swapped.swapped)} swapped")
            results.append(out)
            control.advance()
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (rgb8_to_image_batch(results), count, report)}


class RestoreFaces:
    """Restore the faces of every image of a batch with GFPGAN, CodeFormer or RestoreFormer."""

    DESCRIPTION = (
        "Finds the faces of each image, aligns each to the 512 px template face-restoration models were "
        "trained on, restores it, mixes it with the original by blend and pastes it back with a "
        "feathered mask: only the faces change."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("images", "faces")
    OUTPUT_TOOLTIPS = ("The images with restored faces.", "How many faces were restored.")
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Images whose faces are restored."}),
                "face_models": (
                    "CHARFORGE_FACE_MODELS",
                    {"tooltip": "From Load Face Models (finds the faces)."},
                ),
                "restorer": ("CHARFORGE_FACE_RESTORER", {"tooltip": "From Load Face Restorer."}),
                "which": (list(FACE_CHOICES), {"default": "all", "tooltip": WHICH_TOOLTIP}),
                "blend": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": BLEND_TOOLTIP},
                ),
                "fidelity": (
                    "FLOAT",
                    {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": FIDELITY_TOOLTIP},
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def restore(self, images, face_models, restorer, which, blend, fidelity, node_id=None):
        control = bridge.control(int(images.shape[0]), node_id=node_id, label="restore faces")
        results, total = [], 0
        for rgb in image_rgb8(images):
            result = restore_faces(
                restorer, rgb, face_models.detect(rgb), RestoreSettings(blend, fidelity, which), control
            )
            total += len(result.restored)
            results.append(result.rgb)
            control.advance()
        return (rgb8_to_image_batch(results), total)


class SynthesizeDataset:
    """Add synthetic photos to a dataset: the character's face swapped onto a folder of source images."""

    DESCRIPTION = (
        "For every image of the source folder (poses, outfits, backgrounds): swaps the character's face onto its "
        "main face (or all), optionally restores it, scores the result against the identity and adds it to the "
        "dataset as a synthetic entry that names its source image. Results below the threshold stay in the "
        "dataset as rejected, with the similarity; at most max_share of the dataset may be synthetic (the "
        "best-scoring are kept). The source folder is only read. Continue with Analyse, Filter, Crop, Export and "
        "Dataset Report as for photos: the report marks synthetic images."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "STRING", "IMAGE")
    RETURN_NAMES = ("dataset", "summary", "synthetic")
    OUTPUT_TOOLTIPS = (
        "The dataset with the synthetic entries added.",
        "What was made, accepted and rejected.",
        f"The accepted synthetic images (up to {PREVIEW_LIMIT}; one black frame when none).",
    )
    FUNCTION = "synthesize"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": (
                    DATASET,
                    {"tooltip": "The dataset of the character's photos (from Load Dataset)."},
                ),
                "sources": (
                    "STRING",
                    {
                        "default": "",
                        "placeholder": "/path/to/source/images",
                        "tooltip": "Folder of images to put the character into (absolute, or relative "
                        "to ComfyUI's input folder). Only read.",
                    },
                ),
                "face_models": ("CHARFORGE_FACE_MODELS", {"tooltip": "From Load Face Models (buffalo_l)."}),
                "swapper": ("CHARFORGE_FACE_SWAPPER", {"tooltip": "From Load Face Swapper."}),
                "identity": (
                    "CHARFORGE_IDENTITY",
                    {
                        "tooltip": "The character, from Build Identity (e.g. on the "
                        "photo folder) or Load Identity."
                    },
                ),
                "which": (list(FACE_CHOICES), {"default": "main", "tooltip": WHICH_TOOLTIP}),
                "threshold": threshold_input(
                    "Identity similarity a result needs to be kept. 0 = the identity's suggested threshold."
                ),
                "max_share": (
                    "FLOAT",
                    {
                        "default": DEFAULT_MAX_SHARE,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "Largest share of the dataset's accepted images that may be "
                        "synthetic (0.4: at most 4 in 10). 1 = no cap.",
                    },
                ),
            },
            "optional": {
                "restorer": ("CHARFORGE_FACE_RESTORER", {"tooltip": "Optional: restore the swapped faces."}),
                "blend": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": BLEND_TOOLTIP},
                ),
                "fidelity": (
                    "FLOAT",
                    {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": FIDELITY_TOOLTIP},
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, sources="", **_):
        return folder_signature(sources) if sources and sources.strip() else ""

    def synthesize(
        self,
        dataset,
        sources,
        face_models,
        swapper,
        identity,
        which,
        threshold,
        max_share,
        restorer=None,
        blend=1.0,
        fidelity=0.5,
        node_id=None,
    ):
        settings = SynthSettings(
            which=which,
            threshold=None if threshold <= 0 else float(threshold),
            max_share=max_share,
            restore=restorer is not None,
            blend=blend,
            fidelity=fidelity,
        )
        control = bridge.control(node_id=node_id, label="synthesize dataset")
        manifest, summary = synthesize(
            dataset, resolve_folder(sources), identity, face_models, swapper, restorer, settings, control
        )
        manifest.save()
        kept = [entry.file for entry in manifest.entries if entry.synthetic and entry.accepted][
            :PREVIEW_LIMIT
        ]
        text = f"{summary.text()}\n{manifest.summary()}"
        return {"ui": {"text": [text]}, "result": (manifest, text, files_to_image_batch(kept))}


NODE_CLASS_MAPPINGS = {
    "CharForgeLoadFaceSwapper": LoadFaceSwapper,
    "CharForgeLoadFaceRestorer": LoadFaceRestorer,
    "CharForgeSwapFace": SwapFace,
    "CharForgeRestoreFaces": RestoreFaces,
    "CharForgeSynthesizeDataset": SynthesizeDataset,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgeLoadFaceSwapper": "Load Face Swapper (CharForge)",
    "CharForgeLoadFaceRestorer": "Load Face Restorer (CharForge)",
    "CharForgeSwapFace": "Swap Face (CharForge)",
    "CharForgeRestoreFaces": "Restore Faces (CharForge)",
    "CharForgeSynthesizeDataset": "Synthesize Dataset (CharForge)",
}
