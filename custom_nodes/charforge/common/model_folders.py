"""The model folders CharForge uses: the ones the pack registers in ComfyUI and ComfyUI's own that it reads.

One table for every side: the bridge registers `PACK_MODEL_FOLDERS` inside ComfyUI and falls back to
`COMFY_MODEL_FOLDERS` outside it; the pipeline recipe maps `all_model_folders()` of a ComfyUI install into the
ComfyUI it starts (extra_model_paths.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

# ComfyUI's `supported_pt_extensions` (folder_paths), repeated here for the plain-Python fallback.
PT_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})


@dataclass(frozen=True)
class ModelFolder:
    """A model folder the pack registers in ComfyUI, named as other popular packs name it."""

    key: str
    extensions: frozenset[str]
    purpose: str


# Folders that ComfyUI itself does not define. Names follow the conventions users already have on disk
# (AnimateDiff-Evolved, InsightFace packs, WD14 tagger, Florence-2 packs), so existing downloads are found.
PACK_MODEL_FOLDERS: tuple[ModelFolder, ...] = (
    ModelFolder(
        "animatediff_models", PT_EXTENSIONS, "AnimateDiff motion modules (mm_sd_v15_v2, v3_sd15_mm, ...)"
    ),
    ModelFolder("animatediff_motion_lora", PT_EXTENSIONS, "AnimateDiff motion LoRAs"),
    ModelFolder("insightface", frozenset({".onnx"}), "InsightFace packs: insightface/models/<pack>/*.onnx"),
    ModelFolder("ipadapter", PT_EXTENSIONS, "IP-Adapter / FaceID / InstantID adapters (.safetensors, .bin)"),
    ModelFolder("dwpose", frozenset({".onnx"}), "DWPose pose maps: yolox_l.onnx + dw-ll_ucoco_384.onnx"),
    ModelFolder(
        "depth_anything", frozenset({".json", ".safetensors", ".bin"}), "Depth Anything folders (depth maps)"
    ),
    ModelFolder("wd14_tagger", frozenset({".onnx", ".csv"}), "WD14-style taggers: <name>.onnx + <name>.csv"),
    ModelFolder(
        "LLM",
        frozenset({".json", ".safetensors", ".bin"}),
        "captioners as Hugging Face folders (Florence-2, BLIP, Qwen2.5-VL, JoyCaption / LLaVA)",
    ),
    ModelFolder(
        "blip",
        frozenset({".json", ".safetensors", ".bin"}),
        "BLIP / BLIP-2 captioners as Hugging Face folders",
    ),
    ModelFolder("frame_interpolation", PT_EXTENSIONS, "frame interpolation checkpoints (RIFE, FILM)"),
    ModelFolder(
        "facerestore_models", PT_EXTENSIONS, "face restoration models (GFPGAN, CodeFormer, RestoreFormer)"
    ),
    ModelFolder(
        "charforge",
        frozenset({".json", ".yaml", ".yml", ".safetensors"}),
        "CharForge identities and characters",
    ),
)

# Built-in ComfyUI keys the pack reads, with their folder names under a ComfyUI ``models`` folder.
COMFY_MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "loras": ("loras",),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
    "diffusion_models": ("unet", "diffusion_models"),
    "controlnet": ("controlnet", "t2i_adapter"),
    "clip_vision": ("clip_vision",),
    "upscale_models": ("upscale_models",),
    "embeddings": ("embeddings",),
    "diffusers": ("diffusers",),
}


def all_model_folders() -> dict[str, tuple[str, ...]]:
    """Every model-folder key CharForge uses (ComfyUI's, then the pack's) -> its folder names under ``models``."""
    return {**COMFY_MODEL_FOLDERS, **{folder.key: (folder.key,) for folder in PACK_MODEL_FOLDERS}}
