"""Score nodes (menu: CharForge/Score): is it still the same character?

Face identity (InsightFace/ArcFace) and CLIP image-prompt agreement, with filters and selectors that act on
the scores without breaking a batch. The logic lives in ``charforge.engine.score`` (checkpoint groups, set
scoring and the CSV in ``engine.score.sets``, the tables in ``engine.score.render``); these adapters convert
ComfyUI values and show the tables on the nodes.

Longer than 600 lines because it declares the stage's twelve nodes, each with every input documented in
its tooltip; what runs is a few lines per node.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .. import bridge
from ..engine.faces import FaceAnalyzer, available_face_packs
from ..engine.faces.packs import KNOWN_PACKS
from ..engine.score import (
    FACE_CHOICES,
    best_of_n,
    best_of_n_report,
    best_set,
    build_identity,
    combine,
    filter_passing,
    identity_drift,
    list_identities,
    load_identity,
    rank,
    save_identity,
    score_identity,
    summarise_set,
)
from ..engine.score.render import line_plot, sets_table, sheet_table, table_image
from ..engine.score.sets import (
    checkpoint_groups,
    folder_images,
    labelled_images,
    natural_key,
    record_run_scores,
    run_folder_of,
    sample_prompts,
    score_set,
    write_sets_csv,
)
from .convert import (
    empty_image_batch,
    folder_signature,
    image_frames,
    pil_to_image_batch,
    resolve_folder,
    show_picture,
    threshold_input,
)

CATEGORY = "CharForge/Score"
PROVIDERS = {
    "auto": None,
    "CPU": ["CPUExecutionProvider"],
    "CUDA": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "CoreML": ["CoreMLExecutionProvider", "CPUExecutionProvider"],
    "DirectML": ["DmlExecutionProvider", "CPUExecutionProvider"],
}
NO_IDENTITY = "(no identity saved yet)"
NO_CLIP = "(no CLIP folder found)"
THRESHOLD_TOOLTIP = (
    "Cosine similarity an image's face needs to pass (ArcFace: ~0.32+ is usually the same person "
    "on real photos). 0 = use the identity's suggested threshold, calibrated on its references."
)


# --------------------------------------------------------------------------------------------------
# Helpers


def _show_table(picture) -> dict:
    return show_picture(picture, prefix="charforge_score")


def _image_of(picture):
    return pil_to_image_batch([picture])


def _threshold(value: float) -> float | None:
    return None if value <= 0 else float(value)


# --------------------------------------------------------------------------------------------------
# Face models and identities


class LoadFaceModels:
    """Load an InsightFace model pack (face detector + ArcFace recogniser) for identity scoring."""

    DESCRIPTION = (
        "Loads an InsightFace pack from ComfyUI's models/insightface/models/<pack>/ folder (buffalo_l or "
        "antelopev2) with ONNX Runtime on the best available device. Needs the insightface package; the error "
        "says how to install it, and how to fix a pack unzipped one folder too deep."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CHARFORGE_FACE_MODELS",)
    RETURN_NAMES = ("face_models",)
    OUTPUT_TOOLTIPS = ("The loaded face models: connect to Build Identity, Score Identity, Identity Drift.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        packs = sorted(set(available_face_packs()) | set(KNOWN_PACKS))
        return {
            "required": {
                "pack": (
                    packs,
                    {
                        "default": "buffalo_l",
                        "tooltip": "InsightFace pack folder in models/insightface/models/. buffalo_l is the usual choice; "
                        "an identity only compares with faces from the pack it was built with.",
                    },
                ),
                "det_size": (
                    "INT",
                    {
                        "default": 640,
                        "min": 160,
                        "max": 1280,
                        "step": 32,
                        "tooltip": "Detection resolution in pixels. 640 suits most images; when nothing is found the "
                        "detector retries smaller sizes (close-ups) automatically.",
                    },
                ),
                "provider": (
                    list(PROVIDERS),
                    {
                        "default": "auto",
                        "tooltip": "ONNX Runtime device. auto picks CUDA, CoreML or DirectML when available, else CPU.",
                    },
                ),
            },
        }

    def load(self, pack, det_size, provider):
        return (FaceAnalyzer.load(pack, det_size=det_size, providers=PROVIDERS.get(provider)),)


class BuildIdentity:
    """Build a reference identity from photos of the character and save it for reuse."""

    DESCRIPTION = (
        "Averages the ArcFace embeddings of the main face in each reference photo into an identity. Reports how "
        "similar the references are to each other (the baseline a generated image is measured against), "
        "flags outliers, and suggests a threshold. Saved as models/charforge/identities/<name>.json so other "
        "workflows can load it. Photos without a face are skipped and named, never an error."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CHARFORGE_IDENTITY", "FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("identity", "suggested_threshold", "report", "table")
    OUTPUT_TOOLTIPS = (
        "The reference identity.",
        "Threshold suggested from the references' agreement (use it in Score Identity or leave that at 0).",
        "What was built: baseline, outliers, skipped photos.",
        "The references as a table image.",
    )
    FUNCTION = "build"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "face_models": ("CHARFORGE_FACE_MODELS", {"tooltip": "From Load Face Models."}),
                "name": (
                    "STRING",
                    {
                        "default": "my_character",
                        "tooltip": "Identity name; also the file name in models/charforge/identities/.",
                    },
                ),
                "save": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Save (overwrite) the identity file so Load Identity can use it.",
                    },
                ),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Reference photos as a batch (e.g. from Load Image)."}),
                "folder": (
                    "STRING",
                    {
                        "default": "",
                        "placeholder": "/path/to/reference/photos",
                        "tooltip": "Or a folder of reference photos (absolute, or relative to ComfyUI's input folder), "
                        "e.g. the dataset folder. Both may be given.",
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, folder="", **_):
        return folder_signature(folder) if folder and folder.strip() else ""

    def build(self, face_models, name, save, images=None, folder="", node_id=None):
        sources: list[tuple[str, Any]] = []
        skipped: list[tuple[str, str]] = []
        if images is not None:
            sources += [(f"image {i}", frame) for i, frame in enumerate(image_frames(images))]
        if folder and folder.strip():
            found, skipped = folder_images(resolve_folder(folder))
            sources += found
        if not sources:
            raise ValueError(
                "no reference photos: connect images or give a folder of photos of the character"
            )
        progress = bridge.control(len(sources), node_id=node_id, label="build identity")
        identity = build_identity(name, face_models, sources, control=progress)
        identity.skipped = skipped + identity.skipped
        report = identity.summary()
        if save:
            report += f"; saved to {save_identity(identity)}"
        rows = [
            [r.source, r.faces_found, r.similarity, "outlier" if r.outlier else ""]
            for r in identity.references
        ]
        rows += [[source, 0, None, why] for source, why in identity.skipped]
        status = [("fail" if r.outlier else "pass") for r in identity.references] + ["none"] * len(
            identity.skipped
        )
        table = table_image(
            f"identity {identity.name}: {len(identity.references)} reference(s)",
            ["reference", "faces", "vs others", "note"],
            rows,
            status,
            footer=f"suggested threshold {identity.suggested_threshold:.3f}; baseline {identity.baseline}",
        )
        return {
            "ui": {"text": [report], "images": [_show_table(table)]},
            "result": (identity, identity.suggested_threshold, report, _image_of(table)),
        }


class LoadIdentity:
    """Load a saved reference identity by name."""

    DESCRIPTION = (
        "Loads an identity saved by Build Identity from models/charforge/identities/. The identity "
        "only compares with faces from the same InsightFace pack it was built with."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CHARFORGE_IDENTITY", "FLOAT", "STRING")
    RETURN_NAMES = ("identity", "suggested_threshold", "report")
    OUTPUT_TOOLTIPS = ("The reference identity.", "Its suggested threshold.", "Summary of the identity.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = list_identities() or [NO_IDENTITY]
        return {
            "required": {
                "name": (
                    names,
                    {
                        "default": names[0],
                        "tooltip": "A saved identity (models/charforge/identities/<name>.json).",
                    },
                )
            }
        }

    @classmethod
    def IS_CHANGED(cls, name, **_):
        try:
            return os.path.getmtime(bridge.find_model("charforge", f"identities/{name}.json"))
        except (OSError, bridge.ModelNotFoundError):
            return name

    def load(self, name):
        if name == NO_IDENTITY:
            raise ValueError("no identity is saved yet: run Build Identity with save on first")
        identity = load_identity(name)
        return (identity, identity.suggested_threshold, identity.summary())


# --------------------------------------------------------------------------------------------------
# Scoring


class ScoreIdentity:
    """Score each image by how similar its main face is to the reference identity."""

    DESCRIPTION = (
        "For each image: detects faces, takes the main one (largest, or best match for group shots), and measures "
        "the cosine similarity of its ArcFace embedding to the identity, with pass/fail at the threshold. Images "
        "without a face get no score and the reason. Shows a table on the node; outputs scores for Filter, Best "
        "of N and Combine, plus JSON."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CHARFORGE_SCORES", "INT", "FLOAT", "IMAGE", "STRING")
    RETURN_NAMES = ("scores", "pass_count", "mean_similarity", "table", "json")
    OUTPUT_TOOLTIPS = (
        "Per-image scores: connect to Filter by Score, Best of N or Combine Scores.",
        "How many images pass.",
        "Mean similarity of the images with a face (0 when none has one).",
        "The scores as a table image.",
        "The scores as JSON (one entry per image: value, passed, reason, face box).",
    )
    FUNCTION = "score"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "face_models": (
                    "CHARFORGE_FACE_MODELS",
                    {"tooltip": "From Load Face Models (same pack as the identity)."},
                ),
                "identity": ("CHARFORGE_IDENTITY", {"tooltip": "From Build Identity or Load Identity."}),
                "images": ("IMAGE", {"tooltip": "The images to score, e.g. a generated batch."}),
                "threshold": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": THRESHOLD_TOOLTIP},
                ),
                "face_choice": (
                    list(FACE_CHOICES),
                    {
                        "default": "largest",
                        "tooltip": "Which face counts when there are several: the largest, or the one most like the "
                        "identity (group shots).",
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def score(self, face_models, identity, images, threshold, face_choice, node_id=None):
        progress = bridge.control(int(images.shape[0]), node_id=node_id, label="score identity")
        frames = ((f"image {i}", frame) for i, frame in enumerate(image_frames(images)))
        sheet = score_identity(
            face_models, identity, frames, _threshold(threshold), face_choice, control=progress
        )
        table = sheet_table(sheet, f"identity vs {identity.name} ({face_models.name})")
        mean = sheet.stats()["mean"] or 0.0
        return {
            # "scores": every image's value in the job's history (the pipeline's retries read it)
            "ui": {
                "text": [sheet.summary()],
                "images": [_show_table(table)],
                "scores": [sheet.to_json(None)],
            },
            "result": (sheet, len(sheet.passed_indices), float(mean), _image_of(table), sheet.to_json()),
        }


class FilterByScore:
    """Keep the images whose score passes; when none pass, say so instead of failing."""

    DESCRIPTION = (
        "Passes on the images that pass their score (identity, CLIP or combined). When none pass, the images output "
        "is a single black frame of the batch's size (ComfyUI has no empty image batch), count is 0 and the report "
        "says why, so the workflow does not fail; use count to decide what happens next."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "INT", "STRING", "CHARFORGE_SCORES", "STRING")
    RETURN_NAMES = ("images", "count", "report", "scores", "indices")
    OUTPUT_TOOLTIPS = (
        "The passing images, in batch order (one black frame when none pass).",
        "How many images passed (0 when the images output is the black placeholder).",
        "Which images were dropped and why.",
        "The scores of the passing images.",
        "Batch positions of the passing images, comma separated.",
    )
    FUNCTION = "filter"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The batch that was scored (same order)."}),
                "scores": (
                    "CHARFORGE_SCORES",
                    {"tooltip": "From Score Identity, CLIP Score or Combine Scores."},
                ),
                "threshold": threshold_input(
                    "Pass mark. 0 = keep the threshold the scores were judged with."
                ),
            },
        }

    def filter(self, images, scores, threshold):
        torch = _torch()
        _check_batch(images, scores)
        result = filter_passing(scores, _threshold(threshold))
        if result.kept:
            out = images[torch.tensor(result.kept, dtype=torch.long)]
        else:
            out = empty_image_batch(like=images)
        kept_sheet = scores.subset(result.kept)
        return {
            "ui": {"text": [result.report]},
            "result": (out, len(result.kept), result.report, kept_sheet, ",".join(map(str, result.kept))),
        }


class BestOfN:
    """Pick the best-scoring image of every group of N candidates (e.g. per storyboard frame)."""

    DESCRIPTION = (
        "Splits the batch into consecutive groups of N candidates (generate with batch size N per frame, or "
        "N x frames in one batch) and keeps the best-scoring image of each group, so a storyboard keeps one image "
        "per frame. A group where no candidate has a face keeps its first image and the report says so."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING", "CHARFORGE_SCORES", "STRING")
    RETURN_NAMES = ("images", "report", "scores", "indices")
    OUTPUT_TOOLTIPS = (
        "One image per group, in group order.",
        "The pick of each group with its score and any warning.",
        "The scores of the picked images.",
        "Batch positions of the picks, comma separated.",
    )
    FUNCTION = "pick"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "All candidates, group after group."}),
                "scores": (
                    "CHARFORGE_SCORES",
                    {"tooltip": "Scores of the same batch (identity, CLIP or combined)."},
                ),
                "group_size": (
                    "INT",
                    {"default": 4, "min": 1, "max": 256, "step": 1, "tooltip": "Candidates per group (N)."},
                ),
            },
        }

    def pick(self, images, scores, group_size):
        torch = _torch()
        _check_batch(images, scores)
        picks = best_of_n(scores, group_size)
        indices = [p.index for p in picks]
        report = best_of_n_report(picks, scores.metric)
        return {
            # "picks": each group's kept index, for readers of the job's history (the pipeline's retries)
            "ui": {"text": [report], "picks": [",".join(map(str, indices))]},
            "result": (
                images[torch.tensor(indices, dtype=torch.long)],
                report,
                scores.subset(indices),
                ",".join(map(str, indices)),
            ),
        }


class IdentityDrift:
    """Plot how the character's identity holds across the frames of a video."""

    DESCRIPTION = (
        "Scores every frame against the identity and plots the similarity per frame with the threshold. Reports "
        "the mean and minimum and lists the frames that drift below the threshold (and frames without a face)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "FLOAT", "FLOAT", "STRING", "STRING", "CHARFORGE_SCORES")
    RETURN_NAMES = ("plot", "mean", "min", "drifting_frames", "report", "scores")
    OUTPUT_TOOLTIPS = (
        "Similarity per frame as a plot image.",
        "Mean similarity over frames with a face (0 when none has one).",
        "Lowest similarity (0 when no frame has a face).",
        "Frames below the threshold, comma separated (0-based).",
        "JSON: mean, min, worst frame, drifting and no-face frames.",
        "Per-frame scores.",
    )
    FUNCTION = "drift"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "face_models": ("CHARFORGE_FACE_MODELS", {"tooltip": "From Load Face Models."}),
                "identity": ("CHARFORGE_IDENTITY", {"tooltip": "From Build Identity or Load Identity."}),
                "frames": (
                    "IMAGE",
                    {"tooltip": "Video frames as an image batch (e.g. from a video loader)."},
                ),
                "threshold": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": THRESHOLD_TOOLTIP},
                ),
                "face_choice": (
                    list(FACE_CHOICES),
                    {"default": "largest", "tooltip": "Which face counts when a frame has several."},
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def drift(self, face_models, identity, frames, threshold, face_choice, node_id=None):
        progress = bridge.control(int(frames.shape[0]), node_id=node_id, label="identity drift")
        labelled = ((f"frame {i}", frame) for i, frame in enumerate(image_frames(frames)))
        sheet = score_identity(
            face_models, identity, labelled, _threshold(threshold), face_choice, control=progress
        )
        report = identity_drift(sheet)
        plot = line_plot(
            f"identity vs {identity.name}: mean {report.mean if report.mean is not None else '-'}, "
            f"min {report.min if report.min is not None else '-'}",
            sheet.values,
            sheet.threshold,
        )
        return {
            "ui": {"text": [report.summary()], "images": [_show_table(plot)]},
            "result": (
                _image_of(plot),
                float(report.mean or 0.0),
                float(report.min or 0.0),
                ",".join(map(str, report.drifting)),
                json.dumps(report.to_dict(), indent=1),
                sheet,
            ),
        }


# --------------------------------------------------------------------------------------------------
# CLIP


class LoadClip:
    """Load a full CLIP model (image and text towers) for CLIP scores."""

    DESCRIPTION = (
        "Loads a Hugging Face CLIP folder (config.json, weights, tokenizer, preprocessor_config.json), e.g. "
        "openai/clip-vit-large-patch14, from models/clip_vision/<name>/ or from an absolute path. Vision-only "
        "single files (the IPAdapter clip_vision downloads) cannot score text. Uses the GPU when there is one."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CHARFORGE_CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("The loaded CLIP model: connect to CLIP Score, Pick Checkpoint or Compare Sets.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        from ..engine.score.clip import list_clip_models

        names = list_clip_models() or [NO_CLIP]
        return {
            "required": {
                "model": (
                    names,
                    {"default": names[0], "tooltip": "A CLIP folder inside models/clip_vision/."},
                ),
                "device": (
                    ["auto", "cpu", "cuda"],
                    {"default": "auto", "tooltip": "auto: the GPU when there is one (fp16), else CPU."},
                ),
            },
            "optional": {
                "path": (
                    "STRING",
                    {"default": "", "tooltip": "Absolute path of a CLIP folder; overrides model when set."},
                ),
            },
        }

    def load(self, model, device, path=""):
        from ..engine.score.clip import ClipScorer

        name = path.strip() or model
        if name == NO_CLIP:
            raise FileNotFoundError(
                "no CLIP folder found in models/clip_vision/: put a Hugging Face CLIP folder "
                "there (e.g. openai/clip-vit-large-patch14) or give its path"
            )
        return (ClipScorer.load(name, device=None if device == "auto" else device),)


class ClipScore:
    """Measure how well each image matches its prompt with CLIP."""

    DESCRIPTION = (
        "CLIP score: cosine similarity between each image and its prompt (one prompt for the batch, or one line "
        "per image), computed in batches. Matching pairs typically score 0.25-0.35 with ViT-L/14; compare values "
        "from the same CLIP model only. Outputs scores for Filter, Best of N and Combine Scores."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CHARFORGE_SCORES", "FLOAT", "IMAGE", "STRING")
    RETURN_NAMES = ("scores", "mean", "table", "json")
    OUTPUT_TOOLTIPS = (
        "Per-image CLIP scores.",
        "Mean CLIP score of the batch.",
        "The scores as a table image.",
        "The scores as JSON.",
    )
    FUNCTION = "score"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CHARFORGE_CLIP", {"tooltip": "From Load CLIP (CharForge)."}),
                "images": ("IMAGE", {"tooltip": "The images to score."}),
                "prompt": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "The prompt the images were made from (or one per line).",
                    },
                ),
                "one_per_line": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Each line of prompt belongs to the image at the same position.",
                    },
                ),
                "threshold": threshold_input("CLIP score an image needs to pass; 0 = every image passes."),
                "batch_size": (
                    "INT",
                    {
                        "default": 32,
                        "min": 1,
                        "max": 512,
                        "step": 1,
                        "tooltip": "Images per CLIP forward pass (lower it if memory runs out).",
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def score(self, clip, images, prompt, one_per_line, threshold, batch_size, node_id=None):
        from ..engine.score.clip import batch_prompts, clip_sheet

        count = int(images.shape[0])
        progress = bridge.control(count, node_id=node_id, label="clip score")
        sheet = clip_sheet(
            clip,
            images,
            batch_prompts(prompt, one_per_line, count),
            _threshold(threshold),
            batch_size=batch_size,
            control=progress,
        )
        table = sheet_table(sheet, f"CLIP scores ({clip.name})")
        return {
            "ui": {
                "text": [sheet.summary()],
                "images": [_show_table(table)],
                "scores": [sheet.to_json(None)],
            },
            "result": (sheet, float(sheet.stats()["mean"] or 0.0), _image_of(table), sheet.to_json()),
        }


class CombineScores:
    """Rank images by identity and prompt agreement together, with weights."""

    DESCRIPTION = (
        "Combines identity similarity and CLIP score per image into one weighted score (CLIP cosine rescaled as "
        "CLIPScore = 2.5 x max(cos, 0) so both are on a similar scale). An image without a face gets no combined "
        "score. Feed the result to Best of N or Filter by Score."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CHARFORGE_SCORES", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("scores", "ranking", "table", "json")
    OUTPUT_TOOLTIPS = (
        "Combined per-image scores.",
        "Batch positions from best to worst, comma separated.",
        "The combined scores as a table image.",
        "The combined scores as JSON.",
    )
    FUNCTION = "combine"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "identity_weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.05,
                        "tooltip": "Weight of identity similarity.",
                    },
                ),
                "text_weight": (
                    "FLOAT",
                    {
                        "default": 0.5,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.05,
                        "tooltip": "Weight of the CLIPScore (2.5 x CLIP cosine).",
                    },
                ),
                "threshold": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 2.5,
                        "step": 0.01,
                        "tooltip": "Combined score needed to pass; 0 = pass when every weighted "
                        "score passes its own threshold.",
                    },
                ),
            },
            "optional": {
                "identity_scores": ("CHARFORGE_SCORES", {"tooltip": "From Score Identity."}),
                "clip_scores": (
                    "CHARFORGE_SCORES",
                    {"tooltip": "From CLIP Score (same images, same order)."},
                ),
            },
        }

    def combine(self, identity_weight, text_weight, threshold, identity_scores=None, clip_scores=None):
        sheet = combine(identity_scores, clip_scores, identity_weight, text_weight, _threshold(threshold))
        order = rank(sheet)
        table = sheet_table(sheet, f"combined: {sheet.source}")
        return {
            "ui": {
                "text": [sheet.summary() + "; best first: " + ",".join(map(str, order[:16]))],
                "images": [_show_table(table)],
            },
            "result": (sheet, ",".join(map(str, order)), _image_of(table), sheet.to_json()),
        }


# --------------------------------------------------------------------------------------------------
# Sets: checkpoints and ablations


class PickCheckpoint:
    """Rank the checkpoints of a training run by identity (and CLIP) score of their sample images."""

    DESCRIPTION = (
        "Reads the sample images of each checkpoint (one subfolder per checkpoint, or sd-scripts / ai-toolkit sample "
        "names), scores every sample against the identity (and the prompt with CLIP when connected), and names the "
        "checkpoint with the best combined mean. Samples without a face count as 0 identity, so a checkpoint that "
        "loses the face ranks low."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("best_checkpoint", "table", "json")
    OUTPUT_TOOLTIPS = (
        "Name of the best checkpoint (subfolder name, or epoch/step tag).",
        "All checkpoints as a table image.",
        "Per-checkpoint metrics as JSON.",
    )
    FUNCTION = "pick"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "face_models": ("CHARFORGE_FACE_MODELS", {"tooltip": "From Load Face Models."}),
                "identity": ("CHARFORGE_IDENTITY", {"tooltip": "The character the run was trained on."}),
                "samples_folder": (
                    "STRING",
                    {
                        "default": "",
                        "placeholder": "/path/to/run/sample",
                        "tooltip": "Folder of the run's sample images.",
                    },
                ),
                "threshold": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": THRESHOLD_TOOLTIP},
                ),
                "identity_weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.05,
                        "tooltip": "Weight of identity in the ranking.",
                    },
                ),
                "text_weight": (
                    "FLOAT",
                    {
                        "default": 0.5,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.05,
                        "tooltip": "Weight of CLIPScore in the ranking (only with clip connected).",
                    },
                ),
            },
            "optional": {
                "clip": ("CHARFORGE_CLIP", {"tooltip": "Optional: also rank by prompt agreement."}),
                "prompts": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "The sample prompts, one per line in sample order (sd-scripts "
                        "numbers them _00_, _01_, ...), or one prompt for all.",
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, samples_folder="", **_):
        return folder_signature(samples_folder)

    def pick(
        self,
        face_models,
        identity,
        samples_folder,
        threshold,
        identity_weight,
        text_weight,
        clip=None,
        prompts="",
        node_id=None,
    ):
        from ..engine.score.clip import prompt_lines

        root = resolve_folder(samples_folder)
        groups = checkpoint_groups(root)
        lines = prompt_lines(prompts)
        progress = bridge.control(
            sum(len(v) for v in groups.values()), node_id=node_id, label="pick checkpoint"
        )
        summaries = []
        for name in sorted(groups, key=natural_key):
            frames, _ = labelled_images(groups[name])
            chosen = sample_prompts([label for label, _ in frames], lines)
            sheet, text = score_set(
                frames, face_models, identity, clip, chosen, _threshold(threshold), progress
            )
            summaries.append(summarise_set(name, sheet, text, identity_weight, text_weight))
        best = best_set(summaries)
        table = sets_table(f"checkpoints vs {identity.name}", summaries, best)
        name = best.name if best else ""
        report = f"best checkpoint: {name}" if best else "no checkpoint sample showed a face"
        data = {"best": name, "checkpoints": [s.as_dict() for s in summaries]}
        run_dir = run_folder_of(root)
        if run_dir:  # a CharForge run's samples: the panel shows the scores beside them
            basis = {
                "identity": identity.name,
                "clip_model": getattr(clip, "name", None) if clip is not None and lines else None,
                "threshold": _threshold(threshold),
                "identity_weight": identity_weight,
                "text_weight": text_weight,
            }
            try:
                record_run_scores(run_dir, summaries, basis)
                report += f"; scores saved in {os.path.basename(run_dir)}/scores.json"
            except OSError as exc:
                report += f"; scores not saved in the run folder ({exc})"
        return {
            "ui": {"text": [report], "images": [_show_table(table)]},
            "result": (name, _image_of(table), json.dumps(data, indent=1)),
        }


class CompareSets:
    """Write a metrics table comparing several sets of frames (the ablation: does the setup help?)."""

    DESCRIPTION = (
        "Scores up to four sets of images (e.g. storyboards made the simple way, with reference guidance, and with "
        "the plain base model) against the identity and optionally the prompt with CLIP, and writes a table of mean "
        "and min identity similarity, pass rate and mean CLIP score per set, as an image, JSON and a CSV file in "
        "the output folder."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("table", "json", "csv_path")
    OUTPUT_TOOLTIPS = (
        "The comparison table as an image.",
        "Per-set metrics as JSON.",
        "Path of the CSV written under output/charforge/.",
    )
    FUNCTION = "compare"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        sets = {f"set_{i}": ("IMAGE", {"tooltip": f"Images of set {i}."}) for i in range(2, 5)}
        return {
            "required": {
                "face_models": ("CHARFORGE_FACE_MODELS", {"tooltip": "From Load Face Models."}),
                "identity": ("CHARFORGE_IDENTITY", {"tooltip": "The character every set should show."}),
                "set_1": ("IMAGE", {"tooltip": "Images of set 1."}),
                "names": (
                    "STRING",
                    {
                        "default": "simple, reference-guided, base model",
                        "tooltip": "Set names, comma separated, in set order.",
                    },
                ),
                "threshold": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": THRESHOLD_TOOLTIP},
                ),
            },
            "optional": {
                **sets,
                "clip": ("CHARFORGE_CLIP", {"tooltip": "Optional: also measure prompt agreement."}),
                "prompt": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "Prompt(s) for the CLIP score: one for all images, or one line "
                        "per image of each set.",
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def compare(
        self,
        face_models,
        identity,
        set_1,
        names,
        threshold,
        set_2=None,
        set_3=None,
        set_4=None,
        clip=None,
        prompt="",
        node_id=None,
    ):
        sets = [s for s in (set_1, set_2, set_3, set_4) if s is not None]
        labels = [n.strip() for n in names.split(",") if n.strip()]
        labels += [f"set {i + 1}" for i in range(len(labels), len(sets))]
        from ..engine.score.clip import prompt_lines

        lines = prompt_lines(prompt)
        progress = bridge.control(sum(int(s.shape[0]) for s in sets), node_id=node_id, label="compare sets")
        summaries = []
        for name, images in zip(labels, sets, strict=False):
            frames = [(f"{name} {i}", f) for i, f in enumerate(image_frames(images))]
            sheet, text = score_set(
                frames, face_models, identity, clip, lines, _threshold(threshold), progress
            )
            summaries.append(summarise_set(name, sheet, text))
        best = best_set(summaries)
        table = sets_table(f"sets vs {identity.name}", summaries, best)
        path = write_sets_csv(summaries, os.path.join(bridge.output_directory(), "charforge"), "compare_sets")
        data = {"best": best.name if best else None, "sets": [s.as_dict() for s in summaries], "csv": path}
        summary = "; ".join(
            f"{s.name}: identity mean {s.identity_mean}, min {s.identity_min}" for s in summaries
        )
        return {
            "ui": {"text": [summary], "images": [_show_table(table)]},
            "result": (_image_of(table), json.dumps(data, indent=1), path),
        }


# --------------------------------------------------------------------------------------------------


def _torch():
    from ..deps import require

    return require("torch")


def _check_batch(images, scores) -> None:
    if int(images.shape[0]) != len(scores):
        raise ValueError(
            f"the scores are for {len(scores)} image(s) but the batch has {int(images.shape[0])}: "
            f"connect the same batch that was scored"
        )


NODE_CLASS_MAPPINGS = {
    "CharForgeLoadFaceModels": LoadFaceModels,
    "CharForgeBuildIdentity": BuildIdentity,
    "CharForgeLoadIdentity": LoadIdentity,
    "CharForgeScoreIdentity": ScoreIdentity,
    "CharForgeFilterByScore": FilterByScore,
    "CharForgeBestOfN": BestOfN,
    "CharForgeIdentityDrift": IdentityDrift,
    "CharForgeLoadClip": LoadClip,
    "CharForgeClipScore": ClipScore,
    "CharForgeCombineScores": CombineScores,
    "CharForgePickCheckpoint": PickCheckpoint,
    "CharForgeCompareSets": CompareSets,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgeLoadFaceModels": "Load Face Models (CharForge)",
    "CharForgeBuildIdentity": "Build Identity (CharForge)",
    "CharForgeLoadIdentity": "Load Identity (CharForge)",
    "CharForgeScoreIdentity": "Score Identity (CharForge)",
    "CharForgeFilterByScore": "Filter by Score (CharForge)",
    "CharForgeBestOfN": "Best of N (CharForge)",
    "CharForgeIdentityDrift": "Identity Drift (CharForge)",
    "CharForgeLoadClip": "Load CLIP (CharForge)",
    "CharForgeClipScore": "CLIP Score (CharForge)",
    "CharForgeCombineScores": "Combine Scores (CharForge)",
    "CharForgePickCheckpoint": "Pick Checkpoint (CharForge)",
    "CharForgeCompareSets": "Compare Sets (CharForge)",
}
