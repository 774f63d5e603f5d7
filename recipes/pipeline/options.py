"""The pipeline's options, the server and models it runs with, its stage list and the tiny-model settings."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...driver.errors import ConfigError, DriverError
from ...driver.local import LocalComfyUI
from ...driver.runpod.pod import PodSession
from ..story_retry import RetryPolicy

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
WORKFLOWS = REPO_ROOT / "workflows" / "api"
STAGES = ("dataset", "captions", "lora", "images", "video")
STATE_FILE = "pipeline_state.json"
TINY_WARNING = (
    "TINY RANDOM MODELS: no base checkpoint was found, so every model is a tiny randomly initialised "
    "one of the real architecture. The chain runs for real, but the captions are arbitrary tags, the "
    "LoRA learns nothing useful and the images and video are noise. Put an SD1.5/SDXL checkpoint into "
    "ComfyUI's models/checkpoints (and an AnimateDiff motion module into models/animatediff_models) "
    "for real results."
)
# In the names of what tiny models made (the LoRA, images, video), so no file passes for a real result.
TINY_MARK = "tiny_random"
# Training, generation and video settings with tiny models: minutes on a CPU.
TINY_TRAIN = {
    "steps": 4,
    "rank": 4,
    "resolution": 64,
    "memory_profile": "off",
    "overrides": json.dumps(
        {
            "sample_steps": 2,
            "sample_size": 64,
            "mixed_precision": "no",
            "bucket_step": 32,
            "min_bucket": 32,
            "sample_every": 0,
        }
    ),
}

Say = Callable[[str], None]


@dataclass
class PipelineOptions:
    photos: Path
    out: Path = Path("out")
    character: str = "my_character"
    trigger: str | None = None  # default: the character's name (one word)
    class_tokens: str = "person"
    face_check: bool = True  # off for drawn / non-human characters: no face rules, CLIP picks the best image
    server: str | None = None
    base_model: str | None = None  # a checkpoint name on the server; default: the first one
    tiny: bool = False  # use tiny random models even when real ones exist
    candidates: int = 4
    port: int | None = None  # port for a ComfyUI the pipeline starts
    install: bool = True  # allow installing ComfyUI with comfy-cli when none is found
    progress: str = "auto"
    stage_timeout: float | None = None
    #: reach the server only over HTTP: photos go up, results come home (docs/remote.md); on by itself for a
    #: server that is not on this machine
    remote: bool = False
    #: a model manifest checked against the server before the first stage (missing models named)
    models_manifest: Path | None = None
    #: let the server download the manifest's missing models from their URLs
    provision: bool = False
    #: train the LoRA on this Replicate trainer (replicate:OWNER/MODEL) into `destination` (recipes/train_stage.py)
    train_on: str | None = None
    destination: str | None = None
    replicate: Any = None  # its resolved ReplicateSettings (the CLI resolves them; else from train_on)
    runpod: Any = None  # or the RunPodSettings of a serverless endpoint (--train-on runpod-serverless:ID)
    #: the captions stage: "wd14" tags, or "vlm" sentences (Flux, SD3.5) from a Qwen2.5-VL / JoyCaption folder
    #: in the server's models/LLM (`caption_model`; empty: the first one there)
    captioner: str = "wd14"
    caption_model: str = ""
    #: the images stage's retries (pipeline/retry.py): a best-of-N round whose pick is below threshold is run
    #: again with new seeds, up to `retries` more rounds; CLIPScore (2.5 x CLIP cosine) at least `min_text`,
    #: identity at least `min_identity` (None: the identity's suggested threshold)
    retries: int = 2
    min_text: float | None = 0.70
    min_identity: float | None = None

    def __post_init__(self) -> None:
        if not self.trigger:
            self.trigger = default_trigger(self.character)
        try:
            self.retry_policy()
        except ValueError as exc:
            raise ConfigError(f"--retries / --min-text / --min-identity: {exc}") from None

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, min_text=self.min_text, min_identity=self.min_identity)


def default_trigger(character: str) -> str:
    """The trigger word a character gets when none is given: its name as one lower-case word."""
    return re.sub(r"\W+", "_", character.strip().lower()).strip("_") or "my_character"


@dataclass
class Server:
    url: str
    local: LocalComfyUI | None = None  # started by us (stopped at the end)
    base_dir: Path | None = None  # our base directory (models we may write into)
    comfy_dir: Path | None = None
    started_note: str = ""
    pod: PodSession | None = None  # a RunPod pod brought up for this run (stopped/terminated per its profile)


@dataclass
class Models:
    tiny: bool
    checkpoint: (
        str  # the base model: CheckpointLoaderSimple's (or, base_folder diffusion_models, UNETLoader's)
    )
    train_base: str  # for CharForge's Train LoRA / Load Video Model
    arch: str  # the family: sd15 / sdxl / flux-dev / flux-schnell / sd3-medium / sd35-medium / sd35-large
    tagger: str  # "" = the first tagger in models/wd14_tagger
    clip: str | None
    motion: str | None
    faces: bool  # identity scoring (InsightFace pack installed and face checks on)
    notes: list[str] = field(default_factory=list)
    base_folder: str = "checkpoints"  # or diffusion_models (a Flux model on its own)
    #: Flux / SD3: the text-encoder loader's inputs (clip_name1, ...) -> file, and Flux's VAE file
    text_encoders: dict[str, str] = field(default_factory=dict)
    vae: str | None = None


class PipelineError(DriverError):
    exit_code = 1
