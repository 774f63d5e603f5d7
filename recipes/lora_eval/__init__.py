"""Evaluate a LoRA on a character: ``charforge lora eval`` as a Python API.

For a LoRA and a character preset the driver builds one API-format graph of ComfyUI's own nodes
(CheckpointLoaderSimple -> LoraLoader -> CLIPTextEncode x 2 -> EmptyLatentImage -> KSampler -> VAEDecode ->
SaveImage) with the character's prompt, trigger words, negative prompt and generation settings, and expands it
into a strength x prompt x seed grid with the batch sweep (:func:`~charforge.driver.batch.parse_sweep`): the
LoRA's model and text-encoder strengths vary together, and every strength renders the same prompts with the same
seeds, so rows differ only by the strength. The grid runs through the batch runner
(:class:`~charforge.driver.batch.Batch`): preflight against the server's ``/object_info``, retries, and a
journal, so running the same command again resumes instead of rendering twice.

Each image is scored here, in the driver's process, as soon as it is downloaded:

* **identity**: cosine similarity of the main face to the character's reference identity (ArcFace embeddings of
  an InsightFace pack, ``charforge.engine.score``); no face = no score;
* **text agreement**: CLIP cosine between the image and its prompt (``charforge.engine.score.clip``), the
  prompt without the trigger words (tokens CLIP has never seen; they are the same in every cell anyway).

Per strength, ``combined`` is CharForge's set score (``charforge.engine.score.select.summarise_set``, the one the
Pick Checkpoint node ranks checkpoints by)::

    combined = (identity_weight * identity_all + text_weight * 2.5 * max(text_mean, 0))
               / (identity_weight + text_weight)

where ``identity_all`` is the mean identity with images without a face counting 0 (a strength that loses the
face is not rewarded for it; the reported ``identity_mean`` is over the images with a face) and 2.5 x the CLIP
cosine is CLIPScore's scale. The best strength has the highest ``combined`` (4 decimals);
ties go to the lower strength (less risk of overcooking). Scoring needs the node pack's and the face extras:
``pip install "charforge[nodes,faces]"``.

The package: :mod:`.plan` (options, arguments, the graph and its grid, what the server offers), :mod:`.scoring`
(the local scoring models, per-strength summaries), :mod:`.sheet` (the score table and the grid image) and
:mod:`.run` (:class:`~.run.LoraEval`: the grid through the batch runner). Its public names are importable from here.
"""

from __future__ import annotations

from .plan import (
    CHECKPOINT,
    DECODE,
    DEFAULT_SCENES,
    DEFAULT_SEEDS,
    DEFAULT_STRENGTHS,
    FORMAT,
    GENERATION_NODES,
    GRID_NAME,
    IMAGE_SUFFIXES,
    LATENT,
    LORA,
    NEGATIVE,
    POSITIVE,
    RENDERS,
    RESULTS_NAME,
    SAMPLER,
    SAVE,
    SCORING_INSTALL,
    TABLE_NAME,
    VERSION,
    EvalImage,
    EvalOptions,
    EvalResult,
    StrengthSummary,
    check_server,
    eval_graph,
    load_character,
    parse_numbers,
    plan_grid,
    read_prompts,
)
from .run import LoraEval, check_resumable, evaluate_lora, first_image
from .scoring import Scoring, missing_scoring_packages, photo_files, summarise
from .sheet import GridLayout, draw_grid, grid_layout, strength_label, table_text

__all__ = [
    "FORMAT",
    "VERSION",
    "DEFAULT_STRENGTHS",
    "DEFAULT_SEEDS",
    "DEFAULT_SCENES",
    "GENERATION_NODES",
    "IMAGE_SUFFIXES",
    "RENDERS",
    "RESULTS_NAME",
    "GRID_NAME",
    "TABLE_NAME",
    "SCORING_INSTALL",
    "CHECKPOINT",
    "LORA",
    "POSITIVE",
    "NEGATIVE",
    "LATENT",
    "SAMPLER",
    "DECODE",
    "SAVE",
    "EvalOptions",
    "EvalImage",
    "StrengthSummary",
    "EvalResult",
    "parse_numbers",
    "read_prompts",
    "load_character",
    "eval_graph",
    "plan_grid",
    "check_server",
    "missing_scoring_packages",
    "photo_files",
    "Scoring",
    "summarise",
    "strength_label",
    "table_text",
    "GridLayout",
    "grid_layout",
    "draw_grid",
    "first_image",
    "check_resumable",
    "LoraEval",
    "evaluate_lora",
]
