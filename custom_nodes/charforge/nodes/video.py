"""Video nodes (menu: CharForge/Video): AnimateDiff clips of the character through diffusers.

Load Video Model (base checkpoint + motion module) -> Video LoRA / Motion LoRA (chain as many as
needed) -> Generate Video -> Interpolate Frames -> Save Video. The model value passed between them is a
small description (`charforge.engine.video.VideoModelSpec`); the engine keeps the loaded pipeline.

Save Video reports its file under the UI key ``images`` with ``animated: [true]``, the shape ComfyUI's
own video nodes use, so the ComfyUI frontend previews it and API clients that read ``images`` from the
history find it (see docs/video.md).

Longer than 600 lines: most of it is the declarations of the stage's 6 nodes, every input documented in
its tooltip.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .. import bridge
from ..deps import require
from .train import DIFFUSERS_PREFIX, base_model_choices, comfyui_tokenizer_dirs, resolve_base_model

log = logging.getLogger("charforge")

CATEGORY = "CharForge/Video"
VIDEO_MODEL = "CHARFORGE_VIDEO_MODEL"
MOTION_FOLDER = "animatediff_models"
MOTION_LORA_FOLDER = "animatediff_motion_lora"
NONE = "(none)"
# Kept import-free (the engine pulls in torch); tests/nodes/test_video.py checks they match the engine.
SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
BETA_SCHEDULES = ("auto", "linear", "scaled_linear", "base")
FORMATS = ("mp4", "webm", "gif", "webp")
AUDIO_CODECS = ("auto", "aac", "opus", "flac")
DTYPES = ("auto", "fp32", "fp16", "bf16")
MULTIPLIERS = ("2", "4")
SEED_MAX = 0xFFFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------------------------------
# Model choices


def _is_motion_adapter(config: Path) -> bool:
    """A diffusers MotionAdapter folder, or HotShot-XL's unet folder (its own UNet3DConditionModel class)."""
    try:
        return json.loads(config.read_text()).get("_class_name") in ("MotionAdapter", "UNet3DConditionModel")
    except (OSError, ValueError):
        return False


def motion_module_choices() -> list[str]:
    """Motion-module files, then diffusers folders as ``[diffusers] <folder>`` (their weight files not repeated)."""
    folders = bridge.model_dirs(MOTION_FOLDER, "config.json", _is_motion_adapter)  # diffusers MotionAdapters
    files = [n for n in bridge.list_models(MOTION_FOLDER) if not any(n.startswith(f + "/") for f in folders)]
    choices = files + [DIFFUSERS_PREFIX + n for n in folders]
    return choices or ["(no motion modules found)"]


def resolve_motion_module(name: str) -> str:
    if name.startswith(DIFFUSERS_PREFIX):
        return bridge.find_model_dir(
            MOTION_FOLDER, name[len(DIFFUSERS_PREFIX) :], "config.json", what="motion module folder"
        )
    if name.startswith("(no "):
        raise bridge.ModelNotFoundError(
            "no motion module: download one (v3_sd15_mm.ckpt or mm_sd_v15_v2.ckpt for SD1.5, the AnimateDiff-SDXL "
            f"beta module or HotShot-XL's hsxl_temporal_layers.safetensors for SDXL) into ComfyUI's models/{MOTION_FOLDER} folder and reload the page"
        )
    return bridge.find_model(MOTION_FOLDER, name)


def _with_none(names: list[str]) -> list[str]:
    return [NONE, *names]


CONTROLNET_FOLDER = "controlnet"


def _is_controlnet(config: Path) -> bool:
    try:
        return json.loads(config.read_text()).get("_class_name") == "ControlNetModel"
    except (OSError, ValueError):
        return False


def controlnet_choices() -> list[str]:
    """(none), ControlNet files of models/controlnet, then diffusers ControlNet folders as ``[diffusers] <folder>``."""
    folders = bridge.model_dirs(CONTROLNET_FOLDER, "config.json", _is_controlnet)
    files = [
        n for n in bridge.list_models(CONTROLNET_FOLDER) if not any(n.startswith(f + "/") for f in folders)
    ]
    return _with_none(files + [DIFFUSERS_PREFIX + n for n in folders])


def resolve_controlnet(name: str) -> str:
    if name.startswith(DIFFUSERS_PREFIX):
        return bridge.find_model_dir(
            CONTROLNET_FOLDER, name[len(DIFFUSERS_PREFIX) :], "config.json", what="ControlNet folder"
        )
    return bridge.find_model(CONTROLNET_FOLDER, name)


# --------------------------------------------------------------------------------------------------
# Nodes


class LoadVideoModel:
    """Load an SD1.5 / SDXL checkpoint with an AnimateDiff motion module for video."""

    DESCRIPTION = (
        "Loads a base model (SD1.5 or SDXL checkpoint from the checkpoints folder, or a diffusers folder) and an "
        "AnimateDiff motion module from models/animatediff_models: the original files users download "
        "(mm_sd_v15_v2, v3_sd15_mm, mm_sd_v14/v15, the SDXL beta module; .ckpt or .safetensors), diffusers "
        "MotionAdapter folders, or HotShot-XL (hsxl_temporal_layers.safetensors, or its unet folder) for SDXL. "
        "The module version is read from its weights. Runs through diffusers, not "
        "ComfyUI's model patcher, so ComfyUI updates do not break it. Memory options: dtype, attention, "
        "VAE slicing / tiling, CPU offload, torch.compile."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (VIDEO_MODEL, "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = (
        "The video model: wire it into Video LoRA / Motion LoRA / Generate Video.",
        "What was loaded (base architecture, motion module version and its frame window).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        bases = base_model_choices()
        modules = motion_module_choices()
        return {
            "required": {
                "base_model": (
                    bases,
                    {
                        "default": bases[0],
                        "tooltip": (
                            "SD1.5 or SDXL checkpoint (checkpoints folder) or a diffusers folder (models/diffusers). It must "
                            "match the motion module: SD1.5 for v1/v2/v3, SDXL for the SDXL beta module and HotShot-XL."
                        ),
                    },
                ),
                "motion_module": (
                    modules,
                    {
                        "default": modules[0],
                        "tooltip": (
                            "AnimateDiff motion module from models/animatediff_models (file or diffusers folder). v3_sd15_mm "
                            "and mm_sd_v15_v2 are the usual SD1.5 choices; motion LoRAs need v2. For SDXL: the "
                            "AnimateDiff-SDXL beta module or HotShot-XL (hsxl_temporal_layers; 8-frame window)."
                        ),
                    },
                ),
                "dtype": (
                    list(DTYPES),
                    {
                        "default": "auto",
                        "tooltip": (
                            "Weights' precision. auto: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."
                        ),
                    },
                ),
                "attention": (
                    ["sdpa", "eager"],
                    {
                        "default": "sdpa",
                        "tooltip": (
                            "sdpa: PyTorch's fused attention (flash / memory-efficient kernels), fastest. eager: the plain "
                            "matmul version, for debugging."
                        ),
                    },
                ),
                "vae_slicing": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": (
                            "Decode 8 frames at a time instead of all at once (much less memory for long clips)."
                        ),
                    },
                ),
                "vae_tiling": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": (
                            "Also decode each frame in tiles: for large sizes on small GPUs; slightly slower."
                        ),
                    },
                ),
                "cpu_offload": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": (
                            "Keep the text encoder(s) and VAE in CPU memory and move them to the GPU only while used."
                        ),
                    },
                ),
                "compile": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": (
                            "Run the U-Net through torch.compile: the first clip takes a minute longer, later clips of "
                            "the same size are faster. Needs a working Triton / C++ compiler."
                        ),
                    },
                ),
            },
        }

    def load(
        self,
        base_model,
        motion_module,
        dtype="auto",
        attention="sdpa",
        vae_slicing=True,
        vae_tiling=False,
        cpu_offload=False,
        compile=False,
    ):
        require("diffusers")
        from ..engine.video import RuntimeOptions, VideoModelSpec, load_video_model

        options = RuntimeOptions(
            dtype=dtype,
            attention=attention,
            vae_slicing=bool(vae_slicing),
            vae_tiling=bool(vae_tiling),
            offload=bool(cpu_offload),
            compile=bool(compile),
        )
        motion_path = resolve_motion_module(motion_module)  # the file a new user is most likely missing
        spec = VideoModelSpec(
            base=resolve_base_model(base_model),
            motion_module=motion_path,
            options=options,
            tokenizer_dirs=comfyui_tokenizer_dirs(),
        )
        model, _ = load_video_model(spec)
        info = (
            f"{model.arch.upper()} base {Path(spec.base).name}; {model.motion.describe()}; window "
            f"{model.motion.window} frames; {str(model.dtype).removeprefix('torch.')} on {model.device}"
        )
        return (spec, info)


class VideoLoRA:
    """Add a character LoRA (kohya or diffusers format) to a video model."""

    DESCRIPTION = (
        "Adds a LoRA from the loras folder to the video model at a strength: kohya-format LoRAs (as CharForge's "
        "trainer and sd-scripts write them), diffusers / PEFT LoRAs and the other formats diffusers reads. Chain "
        "several nodes for several LoRAs; each stays a separate adapter with its own weight."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (VIDEO_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The video model with this LoRA added.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        loras = _with_none(bridge.list_models("loras"))
        return {
            "required": {
                "model": (
                    VIDEO_MODEL,
                    {"tooltip": "The video model from Load Video Model (or another LoRA node)."},
                ),
                "lora_name": (
                    loras,
                    {
                        "default": loras[min(1, len(loras) - 1)],
                        "tooltip": (
                            "A LoRA for the same base architecture (SD1.5 / SDXL), from the loras folder."
                        ),
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -4.0,
                        "max": 4.0,
                        "step": 0.05,
                        "tooltip": ("How strongly the LoRA applies (1.0 as trained; 0 switches it off)."),
                    },
                ),
            },
            "optional": {
                "lora_name_from": (
                    "STRING",
                    {
                        "forceInput": True,
                        "tooltip": (
                            "A LoRA file name in the loras folder as a linked STRING, e.g. Train LoRA's lora_name: used "
                            "instead of lora_name (set that to (none)), so a LoRA trained in the same graph feeds the video "
                            "and is trained first."
                        ),
                    },
                ),
            },
        }

    def add(self, model, lora_name, strength=1.0, lora_name_from=None):
        if lora_name_from is not None and str(lora_name_from).strip():
            from .library import resolve_lora_name

            lora_name = resolve_lora_name(lora_name_from)
        if lora_name == NONE or strength == 0:
            return (model,)
        return (model.with_lora(bridge.find_model("loras", lora_name), float(strength)),)


class MotionLoRA:
    """Add an AnimateDiff motion LoRA (camera moves such as zoom or pan) to a video model."""

    DESCRIPTION = (
        "Adds a motion LoRA from models/animatediff_motion_lora (the original AnimateDiff format, e.g. "
        "v2_lora_ZoomIn.ckpt, or diffusers format). Motion LoRAs were trained on the v2 module "
        "(mm_sd_v15_v2) and work best with it. Chain several nodes to mix moves."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (VIDEO_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The video model with this motion LoRA added.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        loras = _with_none(bridge.list_models(MOTION_LORA_FOLDER))
        return {
            "required": {
                "model": (
                    VIDEO_MODEL,
                    {"tooltip": "The video model from Load Video Model (or another LoRA node)."},
                ),
                "motion_lora": (
                    loras,
                    {
                        "default": loras[min(1, len(loras) - 1)],
                        "tooltip": ("A motion LoRA from models/animatediff_motion_lora."),
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -4.0,
                        "max": 4.0,
                        "step": 0.05,
                        "tooltip": ("How strongly the move applies (1.0 as trained)."),
                    },
                ),
            },
        }

    def add(self, model, motion_lora, strength=1.0):
        if motion_lora == NONE or strength == 0:
            return (model,)
        return (model.with_motion_lora(bridge.find_model(MOTION_LORA_FOLDER, motion_lora), float(strength)),)


class GenerateVideo:
    """Generate an AnimateDiff clip: prompt travel, long clips by context windows, optional init frames."""

    DESCRIPTION = (
        "Generates a clip with the video model. The prompt can travel: one '<frame>: <prompt>' line per keyframe "
        "(embeddings blend between keyframes; lines without a number are added to every keyframe). Clips longer "
        "than the context length are made in overlapping windows blended every step, so 64+ frames from a "
        "16-frame module use the memory of 16. Connect init_images (one image or a clip) for image / video to "
        "video, and control_frames with a ControlNet to steer every frame (face landmarks, pose). Progress per step; "
        "Cancel stops between steps."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "FLOAT", "STRING")
    RETURN_NAMES = ("frames", "fps", "info")
    OUTPUT_TOOLTIPS = (
        "The frames as an IMAGE batch (one image per frame).",
        "The frame rate chosen here, for Interpolate Frames / Save Video.",
        "The prompt schedule, context windows, seed and timing.",
    )
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    VIDEO_MODEL,
                    {"tooltip": "The video model (Load Video Model, then any LoRA nodes)."},
                ),
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "0: ohwx woman smiling, looking at the camera\n"
                        "16: ohwx woman laughing, turning her head\n"
                        "photo, natural light",
                        "tooltip": (
                            "The prompt, or a schedule: one '<frame>: <prompt>' line per keyframe; lines without a frame "
                            "number are appended to every keyframe."
                        ),
                    },
                ),
                "negative_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "blurry, low quality, deformed",
                        "tooltip": "What the clip should not show (all frames).",
                    },
                ),
                "frames": (
                    "INT",
                    {
                        "default": 16,
                        "min": 1,
                        "max": 1024,
                        "tooltip": (
                            "Number of frames. Above the context length the clip is made in overlapping windows."
                        ),
                    },
                ),
                "fps": (
                    "FLOAT",
                    {
                        "default": 8.0,
                        "min": 1.0,
                        "max": 60.0,
                        "step": 0.5,
                        "tooltip": (
                            "Playback frame rate passed on to Save Video (AnimateDiff modules were trained at about 8)."
                        ),
                    },
                ),
                "width": (
                    "INT",
                    {
                        "default": 512,
                        "min": 64,
                        "max": 2048,
                        "step": 8,
                        "tooltip": "Frame width in pixels (multiple of 8); SD1.5 512, SDXL 1024.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 512,
                        "min": 64,
                        "max": 2048,
                        "step": 8,
                        "tooltip": "Frame height in pixels (multiple of 8).",
                    },
                ),
                "steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip": "Denoising steps."}),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 7.5,
                        "min": 0.0,
                        "max": 30.0,
                        "step": 0.1,
                        "tooltip": (
                            "Classifier-free guidance: how closely to follow the prompt (1 or less turns it off and "
                            "halves the work)."
                        ),
                    },
                ),
                "scheduler": (
                    list(SCHEDULERS),
                    {
                        "default": "ddim",
                        "tooltip": (
                            "Sampler. ddim is AnimateDiff's reference; euler_a gives more motion variety; dpmpp_2m_karras "
                            "converges in fewer steps."
                        ),
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": SEED_MAX,
                        "control_after_generate": True,
                        "tooltip": "Noise seed: the same seed and settings give the same clip on any device.",
                    },
                ),
                "context_length": (
                    "INT",
                    {
                        "default": 16,
                        "min": 0,
                        "max": 32,
                        "tooltip": (
                            "Frames per context window (0 = the motion module's own window: 16, 8 for HotShot-XL). At "
                            "most the module's positional table (24 for v1 and HotShot-XL, 32 for v2/v3/SDXL beta)."
                        ),
                    },
                ),
                "context_overlap": (
                    "INT",
                    {
                        "default": 4,
                        "min": 0,
                        "max": 31,
                        "tooltip": (
                            "Frames shared by neighbouring windows; more overlap blends seams more smoothly but costs more "
                            "windows."
                        ),
                    },
                ),
            },
            "optional": {
                "init_images": (
                    "IMAGE",
                    {
                        "tooltip": (
                            "Image to video (one image) or video to video (a frame batch, e.g. from LoadVideo + "
                            "GetVideoComponents): resampled to the frame count and cropped to the size."
                        )
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 0.75,
                        "min": 0.01,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": (
                            "With init_images: how much is redrawn (1.0 ignores them, 0.3 keeps them mostly)."
                        ),
                    },
                ),
                "closed_loop": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": (
                            "Windows wrap around the end so the last frames blend into the first: for looping clips."
                        ),
                    },
                ),
                "blend_prompts": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": (
                            "Blend prompt embeddings between keyframes (off: switch at each keyframe)."
                        ),
                    },
                ),
                "beta_schedule": (
                    list(BETA_SCHEDULES),
                    {
                        "default": "auto",
                        "tooltip": (
                            "Noise schedule. auto = what the motion module was trained with: linear for AnimateDiff, "
                            "the checkpoint's own (scaled_linear) for HotShot-XL; base = the checkpoint's own schedule."
                        ),
                    },
                ),
                "clip_skip": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 4,
                        "tooltip": (
                            "Text-encoder layer to use, counted from the last (2 = penultimate, as many anime models "
                            "expect)."
                        ),
                    },
                ),
                "strength_schedule": (
                    "STRING",
                    {
                        "forceInput": True,
                        "tooltip": (
                            "With init_images: one strength per frame as '<frame>: <value>' lines (Audio Schedule's "
                            "schedule output; values between keyframes are interpolated), instead of strength. A "
                            "weaker frame is redrawn from a later step and stays nearer its init frame."
                        ),
                    },
                ),
                "control_frames": (
                    "IMAGE",
                    {
                        "tooltip": (
                            "Control images for the ControlNet, one per frame (e.g. Face Motion's control_frames: face "
                            "landmark dots, or pose / depth maps); resampled to the frame count and cropped to the "
                            "size like init_images. Each context window's U-Net calls see their own frames' images."
                        )
                    },
                ),
                "controlnet": (
                    controlnet_choices(),
                    {
                        "default": NONE,
                        "tooltip": (
                            "A ControlNet for the base (SD1.5 / SDXL) from models/controlnet: an original-layout file "
                            "(control_v11p_sd15_openpose.pth), a diffusers file or a diffusers folder. Used when "
                            "control_frames is connected."
                        ),
                    },
                ),
                "control_strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 2.0,
                        "step": 0.01,
                        "tooltip": "How strongly the ControlNet steers (its residuals are multiplied by this).",
                    },
                ),
                "control_start": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Fraction of the steps run before the ControlNet starts acting.",
                    },
                ),
                "control_end": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Fraction of the steps run after which the ControlNet stops acting.",
                    },
                ),
                "lora_strength_schedule": (
                    "STRING",
                    {
                        "forceInput": True,
                        "tooltip": (
                            "Per-frame multipliers of the LoRA strengths as '<frame>: <value>' lines (Audio Schedule's "
                            "schedule output). Applied per context window: each window's U-Net calls run at strength x "
                            "the mean over its frames (shorter windows follow the music more closely)."
                        ),
                    },
                ),
                "lora_schedule_applies_to": (
                    ["all", "lora", "motion"],
                    {
                        "default": "all",
                        "tooltip": (
                            "Which LoRAs the schedule scales: all, the character LoRAs (lora) or the motion LoRAs."
                        ),
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def generate(
        self,
        model,
        prompt,
        negative_prompt,
        frames,
        fps,
        width,
        height,
        steps,
        cfg,
        scheduler,
        seed,
        context_length,
        context_overlap,
        init_images=None,
        strength=0.75,
        closed_loop=False,
        blend_prompts=True,
        beta_schedule="auto",
        clip_skip=1,
        strength_schedule=None,
        control_frames=None,
        controlnet=NONE,
        control_strength=1.0,
        control_start=0.0,
        control_end=1.0,
        lora_strength_schedule=None,
        lora_schedule_applies_to="all",
        unique_id=None,
    ):
        require("diffusers")
        from ..engine.video import ContextOptions, VideoRequest, generate_video, load_video_model
        from ..engine.video.prompts import describe_schedule

        frame_strengths = None
        if init_images is not None and strength_schedule is not None and str(strength_schedule).strip():
            from ..engine.video.audio_features import parse_value_schedule

            frame_strengths = parse_value_schedule(str(strength_schedule), int(frames))

        lora_schedule = None
        if lora_strength_schedule is not None and str(lora_strength_schedule).strip():
            from ..engine.video.audio_features import parse_value_schedule
            from ..engine.video.lora_schedule import LoraSchedule

            lora_schedule = LoraSchedule(
                parse_value_schedule(str(lora_strength_schedule), int(frames)), str(lora_schedule_applies_to)
            )
        loaded, lora_report = load_video_model(model)
        controls = []
        if control_frames is not None and controlnet not in (None, "", NONE):
            from ..engine.video.controlnet import VideoControl, controlnet_for

            controls.append(
                VideoControl(
                    controlnet_for(loaded, resolve_controlnet(str(controlnet))),
                    control_frames,
                    float(control_strength),
                    float(control_start),
                    float(control_end),
                    name=str(controlnet),
                )
            )
        elif control_frames is not None:
            raise ValueError(
                "control_frames is connected but no ControlNet is chosen: pick one from models/controlnet"
            )
        request = VideoRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            frames=int(frames),
            width=int(width),
            height=int(height),
            steps=int(steps),
            cfg=float(cfg),
            scheduler=scheduler,
            beta_schedule=beta_schedule,
            seed=int(seed),
            clip_skip=int(clip_skip),
            blend_prompts=bool(blend_prompts),
            context=ContextOptions(
                length=int(context_length), overlap=int(context_overlap), loop=bool(closed_loop)
            ),
            init_frames=init_images,
            strength=float(strength) if init_images is not None else 1.0,
            frame_strengths=frame_strengths,
            controls=controls,
            lora_schedule=lora_schedule,
        )
        result = generate_video(
            loaded, request, bridge.control(int(steps) + 1, node_id=unique_id, label="generate video")
        )
        windows = result.windows
        lines = [
            f"{len(result.frames)} frames {width}x{height} at {fps:g} fps, seed {seed}, {result.steps_run} steps "
            f"({scheduler}), {result.seconds:.1f} s on {result.info['device']}",
            f"{model.describe()}",
            *lora_report,
            f"context: {len(windows)} window(s) of {result.info['context_length']} frames"
            + (f", overlap {context_overlap}" if len(windows) > 1 else ""),
            "prompt schedule:",
            describe_schedule(result.keyframes, int(frames)),
        ]
        if frame_strengths:
            lines.append(f"strength per frame: {min(frame_strengths):.2f} to {max(frame_strengths):.2f}")
        for c in controls:
            lines.append(f"ControlNet {c.name} x{c.strength:g}, steps {c.start:g} to {c.end:g}")
        if lora_schedule is not None:
            means = ", ".join(f"{m:.2f}" for m in result.info["lora_schedule"]["window_means"])
            lines.append(f"LoRA strength x per window ({lora_schedule.target}): {means}")
        return (result.frames, float(fps), "\n".join(lines))


# --------------------------------------------------------------------------------------------------
# Frame interpolators: OpenCV optical flow (no download) or a RIFE file.

INTERPOLATION_FOLDER = "frame_interpolation"
AUTO = "auto"
OPTICAL_FLOW = "optical flow"
# ComfyUI-Frame-Interpolation downloads its RIFE files into its own folder; they are offered too.
VFI_PACK = "ComfyUI-Frame-Interpolation"
VFI_PREFIX = f"[{VFI_PACK}] "


def _vfi_pack_dir() -> Path | None:
    # ComfyUI's custom_nodes folders (a --base-directory has its own), else <ComfyUI>/custom_nodes.
    roots = [Path(p) for p in bridge.model_folders("custom_nodes")]
    root = bridge.comfyui_root()
    if root is not None:
        roots.append(root / "custom_nodes")
    for custom_nodes in roots:
        folder = custom_nodes / VFI_PACK / "ckpts" / "rife"
        if folder.is_dir():
            return folder
    return None


def interpolator_files() -> list[str]:
    """RIFE candidates: files in the ``frame_interpolation`` model folder(s), then ComfyUI-Frame-Interpolation's."""
    names = list(bridge.list_models(INTERPOLATION_FOLDER))
    pack = _vfi_pack_dir()
    if pack is not None:
        names += sorted(
            VFI_PREFIX + p.name
            for p in pack.iterdir()
            if p.is_file() and p.suffix.lower() in (".pth", ".pkl", ".safetensors", ".ckpt")
        )
    return names


def interpolator_choices() -> list[str]:
    return [AUTO, OPTICAL_FLOW, *interpolator_files()]


def resolve_interpolator_file(name: str) -> str:
    if name.startswith(VFI_PREFIX):
        pack = _vfi_pack_dir()
        path = pack / name[len(VFI_PREFIX) :] if pack is not None else None
        if path is None or not path.is_file():
            raise bridge.ModelNotFoundError(f"{name!r} not found in {VFI_PACK}'s ckpts/rife folder")
        return str(path)
    return bridge.find_model(INTERPOLATION_FOLDER, name)


def _rife_rank(name: str) -> tuple:
    # "auto" tries the newest-looking RIFE file first: rife49 before rife47 (digits after "rife" as a version).
    match = re.search(r"rife[_-]?v?(\d)[._]?(\d+)?", Path(name).name.lower())
    if not match:
        return (0, 0, name)
    return (1, int(match.group(1)) * 1000 + int(match.group(2) or 0), name)


class InterpolateFrames:
    """Add in-between frames (x2 / x4 frames and frame rate): RIFE from a model file, or optical flow."""

    DESCRIPTION = (
        "Frame interpolation. With a RIFE 4.7 - 4.9 file (rife47.pth / rife49.pth in models/frame_interpolation "
        "or ComfyUI-Frame-Interpolation's ckpts/rife folder) the learned RIFE network draws the in-betweens; "
        "without one, OpenCV's Farneback optical flow does (each new frame is both neighbours warped part of "
        "the way along the flow and blended; no model file needed). N frames become (N-1)*multiplier+1 "
        "(N*multiplier with loop) and the frame rate is multiplied, so the clip keeps its length and plays "
        "smoother. interpolator 'auto' uses the newest supported RIFE file found, else optical flow."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("frames", "fps")
    OUTPUT_TOOLTIPS = ("The frames with in-betweens.", "The input frame rate times the multiplier.")
    FUNCTION = "interpolate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "The clip's frames (an IMAGE batch)."}),
                "multiplier": (
                    list(MULTIPLIERS),
                    {"default": "2", "tooltip": "2: double the frames, 4: four times."},
                ),
                "fps": (
                    "FLOAT",
                    {
                        "default": 8.0,
                        "min": 1.0,
                        "max": 240.0,
                        "step": 0.5,
                        "tooltip": ("Frame rate of the input (connect Generate Video's fps)."),
                    },
                ),
                "loop": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": (
                            "Also add in-betweens from the last frame back to the first (for looping clips)."
                        ),
                    },
                ),
            },
            # Optional and last, so workflows saved before it existed still load and validate (auto).
            "optional": {
                "interpolator": (
                    interpolator_choices(),
                    {
                        "default": AUTO,
                        "tooltip": (
                            "auto: the newest supported RIFE file found, else optical flow. 'optical flow': OpenCV, no "
                            "model file. Or a RIFE 4.7 - 4.9 file (rife47.pth, rife49.pth) from models/"
                            "frame_interpolation or ComfyUI-Frame-Interpolation's ckpts/rife folder."
                        ),
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def interpolate(self, frames, multiplier="2", fps=8.0, loop=False, interpolator=AUTO, unique_id=None):
        torch = require("torch")
        from ..engine.video import interpolated_count

        factor = int(multiplier)
        count = int(frames.shape[0])
        loaded = self._pick_rife(interpolator)
        if loaded is not None:
            from ..engine.video.rife import interpolate_rife

            tasks = max((count - 1 + (1 if loop and count > 1 else 0)) * (factor - 1), 1)
            out = interpolate_rife(
                frames,
                loaded,
                factor,
                bool(loop),
                control=bridge.control(tasks, node_id=unique_id, label="interpolate frames (RIFE)"),
            )
            log.info(
                "Interpolate Frames: RIFE %s (%s) on %s",
                loaded.version,
                Path(loaded.path).name,
                loaded.device,
            )
        else:
            require("cv2")
            from ..engine.video import interpolate_frames

            pairs = max(count - 1 + (1 if loop and count > 1 else 0), 1)
            control = bridge.control(pairs, node_id=unique_id, label="interpolate frames")
            out = torch.from_numpy(interpolate_frames(frames, factor, bool(loop), control))
        assert len(out) == interpolated_count(count, factor, bool(loop))
        return (out, float(fps) * (factor if count > 1 else 1))

    @staticmethod
    def _pick_rife(interpolator: str):
        """The loaded RIFE model for `interpolator`, or None for optical flow (auto with no usable file)."""
        if interpolator == OPTICAL_FLOW:
            return None
        from ..engine.video.rife import UnsupportedRIFEError, load_rife

        if interpolator != AUTO:
            return load_rife(resolve_interpolator_file(interpolator))
        for name in sorted(interpolator_files(), key=_rife_rank, reverse=True):
            try:
                return load_rife(resolve_interpolator_file(name))
            except UnsupportedRIFEError as exc:
                log.info("Interpolate Frames (auto): skipping %s", exc)
        return None


class SaveVideo:
    """Save frames as a video (mp4, webm, gif, animated webp) into ComfyUI's output folder."""

    DESCRIPTION = (
        "Writes the frames as H.264 MP4, VP9 WebM, GIF or animated WebP into the output folder, named the way "
        "ComfyUI names its files (prefix, 5-digit counter). PyAV (bundles its own FFmpeg) and Pillow do the "
        "encoding: no system ffmpeg needed. The file is reported under the standard 'images' key with "
        "animated: true, so the ComfyUI page previews it and API clients find it in the history. Connect audio "
        "to put a sound track into an mp4 / webm, in sync and as long as the clip."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The saved file's full path.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "The frames to save (an IMAGE batch)."}),
                "fps": (
                    "FLOAT",
                    {
                        "default": 8.0,
                        "min": 1.0,
                        "max": 240.0,
                        "step": 0.5,
                        "tooltip": (
                            "Playback frame rate (connect Generate Video's or Interpolate Frames' fps)."
                        ),
                    },
                ),
                "format": (
                    list(FORMATS),
                    {
                        "default": "mp4",
                        "tooltip": (
                            "mp4: H.264, plays everywhere. webm: VP9, smaller. gif: 256 colours. webp: animated WebP."
                        ),
                    },
                ),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "video/CharForge",
                        "tooltip": (
                            "File name prefix inside the output folder; may include a subfolder and %date% style "
                            "variables like ComfyUI's Save nodes."
                        ),
                    },
                ),
                "quality": (
                    "INT",
                    {
                        "default": 80,
                        "min": 0,
                        "max": 100,
                        "tooltip": (
                            "0-100. MP4: CRF 35-0.2*q (80 -> 19); WebM: CRF 50-0.25*q; WebP: quality; GIF ignores it."
                        ),
                    },
                ),
                "loop_count": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 100,
                        "tooltip": ("GIF / WebP: how often to play (0 = forever)."),
                    },
                ),
            },
            # Optional and last, so workflows saved before they existed still load (no sound).
            "optional": {
                "audio": (
                    "AUDIO",
                    {
                        "tooltip": (
                            "Sound to put into the mp4 / webm (Load Audio, CharForge's or ComfyUI's): cut or padded "
                            "with silence to the clip's length, in sync from its first frame."
                        )
                    },
                ),
                "audio_offset": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 36000.0,
                        "step": 0.01,
                        "tooltip": "Seconds into the sound where the clip's first frame starts.",
                    },
                ),
                "audio_codec": (
                    list(AUDIO_CODECS),
                    {
                        "default": "auto",
                        "tooltip": (
                            "auto: AAC in mp4, Opus in webm (every player). flac: lossless, in mp4 only."
                        ),
                    },
                ),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def save(
        self,
        frames,
        fps=8.0,
        format="mp4",
        filename_prefix="video/CharForge",
        quality=80,
        loop_count=0,
        audio=None,
        audio_offset=0.0,
        audio_codec="auto",
        prompt=None,
        unique_id=None,
    ):
        if format in ("mp4", "webm"):
            require("av")
        if audio is not None and format not in ("mp4", "webm"):
            raise ValueError(f"a {format} file has no sound: save as mp4 or webm to keep the audio")
        from ..engine.video import save_video
        from ..engine.video.encode import generation_metadata

        metadata = generation_metadata({"prompt": prompt}) if prompt else None
        saved = save_video(
            frames,
            bridge.output_directory(),
            filename_prefix,
            fps=float(fps),
            fmt=format,
            quality=int(quality),
            loop=int(loop_count),
            metadata=metadata,
        )
        if audio is not None:
            from ..engine.video.audio import mux_audio
            from .video_audio import to_engine_audio

            muxed = mux_audio(
                saved.path, to_engine_audio(audio), offset=float(audio_offset), codec=str(audio_codec)
            )
            log.info(
                "CharForge: %s audio from %g s, %.3f s beside %.3f s of video",
                muxed.codec,
                float(audio_offset),
                muxed.audio_seconds,
                muxed.video_seconds,
            )
        log.info(
            "CharForge: saved %s (%d frames, %dx%d, %g fps)",
            saved.path,
            saved.frame_count,
            saved.width,
            saved.height,
            saved.fps,
        )
        return {"ui": {"images": [saved.ui_entry()], "animated": [True]}, "result": (saved.path,)}


NODE_CLASS_MAPPINGS = {
    "CharForgeLoadVideoModel": LoadVideoModel,
    "CharForgeVideoLoRA": VideoLoRA,
    "CharForgeMotionLoRA": MotionLoRA,
    "CharForgeGenerateVideo": GenerateVideo,
    "CharForgeInterpolateFrames": InterpolateFrames,
    "CharForgeSaveVideo": SaveVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgeLoadVideoModel": "Load Video Model (CharForge)",
    "CharForgeVideoLoRA": "Video LoRA (CharForge)",
    "CharForgeMotionLoRA": "Motion LoRA (CharForge)",
    "CharForgeGenerateVideo": "Generate Video (CharForge)",
    "CharForgeInterpolateFrames": "Interpolate Frames (CharForge)",
    "CharForgeSaveVideo": "Save Video (CharForge)",
}
