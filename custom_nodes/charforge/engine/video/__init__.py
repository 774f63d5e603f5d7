"""AnimateDiff video through diffusers: the character in motion, any length, saved the ComfyUI way.

- `motion`: motion-module files (original AnimateDiff and diffusers layouts), version detection, motion LoRAs;
- `models`: `VideoModelSpec` (what to load) -> `VideoModel` (loaded, cached, LoRAs as adapters);
- `generate`: the sampler (prompt travel, context windows, image / video to video, progress and cancel);
- `prompts`, `context`, `schedulers`: the pieces the sampler uses;
- `encode`: mp4 / webm / gif / webp files with ComfyUI's save-path convention, and reading them back;
- `interpolate`: optical-flow frame interpolation; `rife`: RIFE 4.7 - 4.9 (imported on use).
- `audio`: sound files read and muxed into saved clips; `audio_features`: beats, loudness, onsets, bands and the
  per-frame schedules made from them (both imported on use).
"""

from .context import ContextOptions, context_windows, window_weights
from .encode import FORMATS, SavedVideo, read_video, save_path, save_video, write_video
from .generate import VideoRequest, VideoResult, generate_video
from .interpolate import interpolate_frames, interpolated_count
from .models import LoraRef, RuntimeOptions, VideoModel, VideoModelError, VideoModelSpec, load_video_model
from .motion import MotionModuleError, MotionModuleInfo, inspect_motion_module, load_motion_adapter
from .prompts import Keyframe, parse_prompt_schedule
from .schedulers import BETA_SCHEDULES, SCHEDULERS

__all__ = [
    "BETA_SCHEDULES",
    "FORMATS",
    "SCHEDULERS",
    "ContextOptions",
    "Keyframe",
    "LoraRef",
    "MotionModuleError",
    "MotionModuleInfo",
    "RuntimeOptions",
    "SavedVideo",
    "VideoModel",
    "VideoModelError",
    "VideoModelSpec",
    "VideoRequest",
    "VideoResult",
    "context_windows",
    "generate_video",
    "inspect_motion_module",
    "interpolate_frames",
    "interpolated_count",
    "load_motion_adapter",
    "load_video_model",
    "parse_prompt_schedule",
    "read_video",
    "save_path",
    "save_video",
    "window_weights",
    "write_video",
]
