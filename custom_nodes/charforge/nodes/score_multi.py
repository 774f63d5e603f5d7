"""Score Characters (menu: CharForge/Score): several characters in one image, one face each.

The logic (similarity matrix, one-to-one assignment, missing characters) lives in
``charforge.engine.score.multi``; this adapter converts the ComfyUI batch and shows the table.
"""

from __future__ import annotations

from .. import bridge
from ..engine.score.multi import score_characters
from .convert import image_frames, threshold_input

CATEGORY = "CharForge/Score"
MAX_CHARACTERS = 4


class ScoreCharacters:
    """Score each image against several identities, pairing faces and characters one-to-one."""

    DESCRIPTION = (
        "For each image: detects faces, compares every face with every identity (ArcFace cosine similarity) and "
        "pairs faces with characters one-to-one so that the total similarity is largest (not greedily). Each "
        "character gets its face's similarity and pass/fail at the threshold; a character left without a face is "
        "reported missing and fails. Outputs a text table, JSON and each character's mean similarity."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "STRING", "INT", "FLOAT", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = (
        "table",
        "json",
        "pass_count",
        "similarity_1",
        "similarity_2",
        "similarity_3",
        "similarity_4",
    )
    OUTPUT_TOOLTIPS = (
        "One line per image and character (face, similarity, threshold, pass or why not), then a summary per "
        "character.",
        "The same as JSON: per image the similarity matrix and each character's face, box, similarity, pass.",
        "How many images have every character present and passing.",
        *(
            f"Mean similarity of character {i} over the images where it has a face (0 when it never has one)."
            for i in range(1, MAX_CHARACTERS + 1)
        ),
    )
    FUNCTION = "score"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        identity = "From Build Identity or Load Identity (same face models for every character)."
        return {
            "required": {
                "face_models": ("CHARFORGE_FACE_MODELS", {"tooltip": "From Load Face Models."}),
                "images": ("IMAGE", {"tooltip": "The images to score, each meant to show every character."}),
                "identity_1": ("CHARFORGE_IDENTITY", {"tooltip": f"Character 1. {identity}"}),
                "identity_2": ("CHARFORGE_IDENTITY", {"tooltip": f"Character 2. {identity}"}),
                "threshold": threshold_input(
                    "Cosine similarity each character's face needs to pass. 0 = each identity's "
                    "suggested threshold."
                ),
            },
            "optional": {
                "identity_3": ("CHARFORGE_IDENTITY", {"tooltip": f"Character 3 (optional). {identity}"}),
                "identity_4": ("CHARFORGE_IDENTITY", {"tooltip": f"Character 4 (optional). {identity}"}),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def score(
        self,
        face_models,
        images,
        identity_1,
        identity_2,
        threshold,
        identity_3=None,
        identity_4=None,
        node_id=None,
    ):
        identities = [i for i in (identity_1, identity_2, identity_3, identity_4) if i is not None]
        progress = bridge.control(int(images.shape[0]), node_id=node_id, label="score characters")
        frames = ((f"image {i}", frame) for i, frame in enumerate(image_frames(images)))
        sheet = score_characters(
            face_models, identities, frames, None if threshold <= 0 else float(threshold), control=progress
        )
        summary = sheet.per_character()
        means = [float(summary[name]["mean_similarity"] or 0.0) for name in sheet.names]
        means += [0.0] * (MAX_CHARACTERS - len(means))
        table = sheet.table()
        passed = sum(row.passed for row in sheet.rows)
        return {"ui": {"text": [table]}, "result": (table, sheet.to_json(), passed, *means)}


NODE_CLASS_MAPPINGS = {"CharForgeScoreCharacters": ScoreCharacters}
NODE_DISPLAY_NAME_MAPPINGS = {"CharForgeScoreCharacters": "Score Characters (CharForge)"}
