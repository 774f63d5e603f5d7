"""Node adapters, one module per stage. Each module exports NODE_CLASS_MAPPINGS and display names.

Adapters declare inputs and outputs, call the engine and convert values; they import heavy or optional
packages only inside the functions that run, so the pack always loads.
"""

from __future__ import annotations

from . import (
    caption,
    caption_vlm,
    dataset,
    guide,
    guide_instantid,
    guide_maps,
    library,
    score,
    score_multi,
    storage,
    story,
    synth,
    train,
    video,
    video_audio,
    video_face,
)

STAGE_MODULES = (
    dataset,
    synth,
    caption,
    caption_vlm,
    score,
    score_multi,
    train,
    storage,
    video,
    video_audio,
    video_face,
    story,
    library,
    guide,
    guide_instantid,
    guide_maps,
)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _module in STAGE_MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
