"""Storyboards: a story told in 6-10 frames with the same character in every frame.

- `scenes`: scene lists the user writes (text one per line, JSON, YAML) and the prompt of each frame
- `llm`: a story sentence split into scene prompts by any OpenAI-compatible chat endpoint
- `select`: the best candidate of a frame by identity and text agreement (on `charforge.engine.score` sheets)
- `storyboard`: the storyboard record (frames, prompts, seeds, scores, mode, models) and its metadata.json
- `sheet`: the storyboard sheet image (frames in a grid with captions and scores)
- `ablation`: simple vs reference-guided vs base model, as a markdown and JSON table

Nothing here imports ComfyUI, torch or numpy; the sheet needs Pillow only when it is drawn.
"""

from .ablation import AblationRow, ablation_rows, ablation_to_dict, ablation_to_markdown, write_ablation
from .llm import LLMSettings, SceneSplitError, SceneSplitter, parse_scene_reply
from .scenes import (
    MAX_FRAMES,
    MIN_FRAMES,
    Scene,
    check_scene_count,
    ensure_face_first,
    frame_prompt,
    load_scenes,
    parse_scenes,
)
from .select import FramePick, pick_frame
from .sheet import storyboard_sheet
from .storyboard import GUIDANCE_LABELS, MODE_LABELS, MODES, Storyboard, StoryFrame, load_storyboard

__all__ = [
    "AblationRow",
    "ablation_rows",
    "ablation_to_dict",
    "ablation_to_markdown",
    "write_ablation",
    "LLMSettings",
    "SceneSplitError",
    "SceneSplitter",
    "parse_scene_reply",
    "MAX_FRAMES",
    "MIN_FRAMES",
    "Scene",
    "check_scene_count",
    "ensure_face_first",
    "frame_prompt",
    "load_scenes",
    "parse_scenes",
    "FramePick",
    "pick_frame",
    "GUIDANCE_LABELS",
    "MODE_LABELS",
    "MODES",
    "StoryFrame",
    "Storyboard",
    "load_storyboard",
    "storyboard_sheet",
]
