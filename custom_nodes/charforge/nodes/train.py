"""Training nodes (menu: CharForge/Train) and the runs list route ``GET /charforge/runs``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .. import bridge
from ..deps import require
from ..engine.train.presets import BASIC_DEFAULTS, PRESETS
from .convert import files_to_image_batch, resolve_folder, show_file

log = logging.getLogger("charforge")

CATEGORY = "CharForge/Train"
TRAINING_RUN = "CHARFORGE_TRAINING_RUN"
DATASET = "CHARFORGE_DATASET"
DIFFUSERS_PREFIX = "[diffusers] "
DIFFUSION_MODEL_PREFIX = "[diffusion model] "
NONE = "(none)"


def runs_directory() -> str:
    """Where run folders go: ``<ComfyUI output>/charforge/train_runs``."""
    return os.path.join(bridge.output_directory(), "charforge", "train_runs")


def base_model_choices() -> list[str]:
    """Checkpoint files, diffusers folders (with model_index.json) as ``[diffusers] <folder>``, then
    diffusion-model files (Flux.1 / SD3 transformers from ``diffusion_models`` / ``unet``) as
    ``[diffusion model] <file>``."""
    choices = (
        list(bridge.list_models("checkpoints"))
        + [DIFFUSERS_PREFIX + n for n in bridge.model_dirs("diffusers", "model_index.json")]
        + [DIFFUSION_MODEL_PREFIX + n for n in bridge.list_models("diffusion_models")]
    )
    return choices or ["(no checkpoints found)"]


def part_choices(kind: str) -> list[str]:
    """``(none)`` then the files of a model folder (text encoders, VAEs) for a Flux.1 / SD3 part input."""
    return [NONE, *bridge.list_models(kind)]


def resolve_parts(**chosen: str | None) -> dict[str, str]:
    """Full paths of the chosen Flux.1 / SD3 parts (``clip_l``, ``clip_g``, ``t5``: text_encoders; ``vae``)."""
    out = {}
    for name, value in chosen.items():
        if value and value != NONE:
            out[name] = bridge.find_model("vae" if name == "vae" else "text_encoders", value)
    return out


def resolve_base_model(name: str) -> str:
    """Full path of a ``checkpoints`` file or a ``[diffusers] <folder>`` choice (or an absolute path)."""
    if name.startswith(DIFFUSION_MODEL_PREFIX):
        return bridge.find_model("diffusion_models", name[len(DIFFUSION_MODEL_PREFIX) :])
    if name.startswith(DIFFUSERS_PREFIX):
        return bridge.find_model_dir(
            "diffusers", name[len(DIFFUSERS_PREFIX) :], "model_index.json", what="diffusers model"
        )
    if name.startswith("(no "):
        raise bridge.ModelNotFoundError(
            "no base model: put an SD1.5 / SDXL checkpoint into ComfyUI's checkpoints folder, a Flux.1 / SD3 "
            "diffusion model into models/diffusion_models (or a diffusers folder into models/diffusers) and "
            "reload the page"
        )
    return bridge.find_model("checkpoints", name)


def comfyui_tokenizer_dirs() -> tuple[str, ...]:
    """ComfyUI's own CLIP vocabulary (``comfy/sd1_tokenizer``) when ComfyUI's folder is known."""
    root = bridge.comfyui_root()
    return (str(root / "comfy" / "sd1_tokenizer"),) if root is not None else ()


def comfyui_t5_tokenizer_dirs() -> tuple[str, ...]:
    """ComfyUI's own T5 tokenizer (``comfy/text_encoders/t5_tokenizer``) when ComfyUI's folder is known."""
    root = bridge.comfyui_root()
    return (str(root / "comfy" / "text_encoders" / "t5_tokenizer"),) if root is not None else ()


def _parse_overrides(text: str) -> dict:
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f'overrides must be a JSON object like {{"rank": 16}}: {exc}') from exc
    if not isinstance(value, dict):
        raise ValueError('overrides must be a JSON object like {"rank": 16, "noise_offset": 0.05}')
    return value


def _origin(prompt, extra_pnginfo, node_id) -> dict | None:
    """The prompt that queued this node (and the editor's workflow), with the running prompt's id."""
    if not isinstance(prompt, dict) or not prompt:
        return None
    workflow = extra_pnginfo.get("workflow") if isinstance(extra_pnginfo, dict) else None
    return {"prompt": prompt, "prompt_id": bridge.running_prompt_id(), "node": node_id, "workflow": workflow}


class TrainLoRA:
    """Train a character LoRA for SD1.5, SDXL, Flux.1 or SD3.x and save it into ComfyUI's loras folder."""

    DESCRIPTION = (
        "Trains a LoRA (kohya-style keys, loads in ComfyUI's LoRA loaders, diffusers and kohya tools) on a kohya "
        "dataset folder (<repeats>_<trigger class>/ with .txt captions) or a CharForge dataset, from an SD1.5 / "
        "SDXL checkpoint or a Flux.1 (dev, schnell) / SD3.5 diffusion model with its text encoders and VAE "
        "chosen below. Checks memory first and picks gradient checkpointing / 8-bit Adam / an fp8 base when needed. "
        "Writes a run folder (config, metrics.csv, loss.png, samples, checkpoints, resumable state) under "
        "output/charforge/train_runs. Cancel stops within a step; queue it again to resume where it stopped."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", TRAINING_RUN, "IMAGE", "IMAGE")
    RETURN_NAMES = ("lora_name", "run", "loss_curve", "samples")
    OUTPUT_TOOLTIPS = (
        "The LoRA's file name in the loras folder: wire it into a LoRA loader's lora_name.",
        "The training run (folder, state, step, loss, LoRA path).",
        "The loss curve.",
        "The last sample images (fixed seeds, trigger word in the prompt).",
    )
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        choices = base_model_choices()
        return {
            "required": {
                "base_model": (
                    choices,
                    {
                        "default": choices[0],
                        "tooltip": "SD1.5 / SDXL / SD3.5 checkpoint from the checkpoints folder, a Flux.1 or SD3.5 "
                        "diffusion model from models/diffusion_models (choose its text encoders and VAE below), "
                        "or a diffusers folder from models/diffusers. The architecture is read from the file.",
                    },
                ),
                "dataset_folder": (
                    "STRING",
                    {
                        "default": "",
                        "placeholder": "/path/to/img (contains 10_ohwx woman/)",
                        "tooltip": "Kohya dataset folder: the folder that CONTAINS '<repeats>_<trigger class>' "
                        "subfolders (a relative path is read from ComfyUI's input folder). Ignored when a "
                        "dataset is connected.",
                    },
                ),
                "trigger_word": (
                    "STRING",
                    {
                        "default": "ohwx",
                        "tooltip": "The word the LoRA is bound to; used in sample prompts and written into the "
                        "LoRA's metadata (modelspec.trigger_phrase).",
                    },
                ),
                "output_name": (
                    "STRING",
                    {
                        "default": "my_character",
                        "tooltip": "Name of the run and of the LoRA file (<name>.safetensors in the loras folder). "
                        "The same name with the same settings resumes an unfinished run.",
                    },
                ),
                "preset": (
                    list(PRESETS),
                    {
                        "default": "sdxl",
                        "tooltip": "sdxl / sd15: balanced (rank 32, 1500 steps). fast: rank 16, 500 steps. "
                        "high_quality: rank 64 + conv layers, 2500 steps. Resolution follows the model "
                        "(1024 SDXL, 512 SD1.5).",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": BASIC_DEFAULTS["steps"],
                        "min": 0,
                        "max": 100000,
                        "step": 1,
                        "tooltip": "Training steps. Used when use_preset_values is off (0 = the preset's).",
                    },
                ),
                "learning_rate": (
                    "FLOAT",
                    {
                        "default": BASIC_DEFAULTS["learning_rate"],
                        "min": 0.0,
                        "max": 10.0,
                        "step": 1e-5,
                        "round": 1e-6,
                        "tooltip": "U-Net learning rate. Used when use_preset_values is off "
                        "(0 = the preset's).",
                    },
                ),
                "rank": (
                    "INT",
                    {
                        "default": BASIC_DEFAULTS["rank"],
                        "min": 0,
                        "max": 256,
                        "step": 1,
                        "tooltip": "LoRA rank (alpha follows at half the rank). Used when "
                        "use_preset_values is off (0 = the preset's).",
                    },
                ),
                "resolution": (
                    "INT",
                    {
                        "default": BASIC_DEFAULTS["resolution"],
                        "min": 0,
                        "max": 2048,
                        "step": 64,
                        "tooltip": "Training resolution in pixels (buckets keep about this area). "
                        "Used when use_preset_values is off (0 = the model's: 1024 "
                        "SDXL, 512 SD1.5).",
                    },
                ),
                "batch_size": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 64,
                        "step": 1,
                        "tooltip": "Images per step (one bucket size per batch).",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 2**31 - 1,
                        "step": 1,
                        "tooltip": "Seed for LoRA initialisation, data order and noise.",
                    },
                ),
                "resume": (
                    ["auto", "never"],
                    {
                        "default": "auto",
                        "tooltip": "auto: continue an unfinished (or cancelled) run with the same name, model, data "
                        "and settings; never: always start a new run.",
                    },
                ),
                "memory_profile": (
                    ["auto", "check", "off"],
                    {
                        "default": "auto",
                        "tooltip": "auto: estimate memory first and turn on gradient checkpointing / 8-bit Adam / "
                        "smaller batches when needed; check: refuse if it does not fit; off: no check.",
                    },
                ),
            },
            "optional": {
                "dataset": (
                    DATASET,
                    {
                        "tooltip": "A CharForge dataset (its kohya export, or its accepted photos "
                        "and captions). Takes precedence over dataset_folder."
                    },
                ),
                "overrides": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": 'More settings as JSON, by name: e.g. {"noise_offset": 0.05, "flip": true, '
                        '"train_text_encoder": true, "optimizer": "prodigy", "learning_rate": 1.0, '
                        '"sample_every": 100, "sample_prompts": ["ohwx at the beach"]}. '
                        "See docs/training.md for every name.",
                    },
                ),
                "save_character": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "When set, save a character preset of this name for the trained LoRA (trigger word, "
                        "LoRA at weight 1, size defaults) for Load Character; an existing one is kept.",
                    },
                ),
                # Last, so workflows saved before it existed load their widget values in the right places.
                "use_preset_values": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "label_on": "preset's steps, LR, rank, resolution",
                        "label_off": "steps, LR, rank, resolution above",
                        "tooltip": "On: steps, learning_rate, rank and resolution come from the preset (the numbers "
                        "above are ignored; the defaults show the sdxl preset's). Off: the numbers above "
                        "are used (0 = the preset's).",
                    },
                ),
                # Flux.1 / SD3 parts a diffusion-model file lacks (after the older inputs, for saved workflows).
                "clip_l": (
                    part_choices("text_encoders"),
                    {
                        "default": NONE,
                        "tooltip": "Flux.1 / SD3: the CLIP-L text encoder (models/text_encoders).",
                    },
                ),
                "t5xxl": (
                    part_choices("text_encoders"),
                    {
                        "default": NONE,
                        "tooltip": "Flux.1 / SD3: T5-XXL (fp16 or fp8) from models/text_encoders.",
                    },
                ),
                "clip_g": (
                    part_choices("text_encoders"),
                    {"default": NONE, "tooltip": "SD3: the CLIP-G text encoder (models/text_encoders)."},
                ),
                "vae": (
                    part_choices("vae"),
                    {"default": NONE, "tooltip": "Flux.1: ae.safetensors; SD3: its VAE (models/vae)."},
                ),
                "lora_layout": (
                    ["kohya", "peft"],
                    {
                        "default": "kohya",
                        "tooltip": "Flux.1 / SD3 LoRA keys: kohya (fused lora_unet_double_blocks_..., what ComfyUI, "
                        "Forge and kohya load) or peft (diffusers' names). SD1.5 / SDXL always kohya.",
                    },
                ),
            },
            # The prompt (and the editor's workflow) go into the run folder's origin.json: the CharForge panel
            # queues them again to resume the run.
            "hidden": {"node_id": "UNIQUE_ID", "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def train(
        self,
        base_model,
        dataset_folder,
        trigger_word,
        output_name,
        preset,
        steps,
        learning_rate,
        rank,
        resolution,
        batch_size,
        seed,
        resume,
        memory_profile,
        dataset=None,
        overrides="",
        node_id=None,
        save_character="",
        use_preset_values=None,
        prompt=None,
        extra_pnginfo=None,
        clip_l=NONE,
        t5xxl=NONE,
        clip_g=NONE,
        vae=NONE,
        lora_layout="kohya",
    ):
        for module in ("torch", "diffusers", "transformers", "peft", "safetensors"):
            require(module)
        from ..engine.train.config import fit_warmup, ignored_basic_settings, preset_config, with_overrides
        from ..engine.train.job import TrainRequest, train
        from ..engine.train.models import detect_arch
        from ..engine.train.presets import basic_settings
        from ..engine.train.run import TrainingRun, safe_run_name

        model_path = resolve_base_model(base_model)
        arch = detect_arch(model_path)
        config = preset_config(preset, arch)
        basic = {"steps": steps, "learning_rate": learning_rate, "rank": rank, "resolution": resolution}
        ignored = ignored_basic_settings(config, **basic) if use_preset_values else []
        settings: dict = {
            "seed": int(seed),
            "batch_size": int(batch_size),
            "trigger_word": trigger_word.strip(),
        }
        settings.update(basic_settings(**basic, use_preset_values=use_preset_values))
        settings.update(_parse_overrides(overrides))
        config = fit_warmup(with_overrides(config, settings))

        source = (
            dataset
            if dataset is not None
            else (resolve_folder(dataset_folder) if dataset_folder.strip() else "")
        )
        if not source:
            raise ValueError(
                "no training data: connect a CharForge dataset or type a kohya dataset folder "
                "(the folder that contains '<repeats>_<trigger class>' subfolders)"
            )
        name = safe_run_name(output_name)
        request = TrainRequest(
            base_model=model_path,
            dataset=source,
            runs_dir=runs_directory(),
            name=name,
            config=config,
            lora_dir=str(bridge.first_model_folder("loras")),
            resume=resume,
            memory_profile=memory_profile,
            tokenizer_dirs=comfyui_tokenizer_dirs(),
            t5_tokenizer_dirs=comfyui_t5_tokenizer_dirs(),
            parts=resolve_parts(clip_l=clip_l, t5=t5xxl, clip_g=clip_g, vae=vae),
            lora_layout=lora_layout,
            origin=_origin(prompt, extra_pnginfo, node_id),
        )
        result = train(request, bridge.control(config.steps, node_id=node_id, label=f"train {name}"))

        lora_name = Path(result.exported_path or result.lora_path).name
        run = TrainingRun(
            name=Path(result.run_dir).name,
            run_dir=result.run_dir,
            state="completed",
            step=result.step,
            total_steps=config.steps,
            loss=result.loss,
            lora_path=result.exported_path or result.lora_path,
            lora_name=lora_name,
            samples=tuple(result.samples),
            loss_curve=result.loss_curve,
        )
        summary = (
            f"{lora_name}: {result.step} steps, final loss {result.loss:.4f}"
            + (f" (resumed at step {result.resumed_from})" if result.resumed_from else "")
            + f"; run folder {result.run_dir}"
        )
        if ignored:
            summary += (
                f"; preset {preset!r} values used, not {', '.join(ignored)} (turn use_preset_values off)"
            )
        if save_character.strip():
            from ..engine.library.characters import save_training_character

            summary += "; " + save_training_character(
                save_character.strip(), lora_name, trigger_word, arch, config.data.resolution
            )
        ui = {"text": [summary], "images": [show_file(p) for p in [result.loss_curve, *result.samples]]}
        return {
            "ui": ui,
            "result": (
                lora_name,
                run,
                files_to_image_batch([result.loss_curve]),
                files_to_image_batch(result.samples),
            ),
        }


async def _runs_handler(request):
    from aiohttp import web

    from ..engine.train.run import list_runs

    return web.json_response({"runs": list_runs(runs_directory())})


def register_routes() -> bool:
    """Add ``GET /charforge/runs`` to ComfyUI's server (at import; a no-op outside ComfyUI)."""
    return bridge.add_route("GET", "/charforge/runs", _runs_handler)


register_routes()

NODE_CLASS_MAPPINGS = {"CharForgeTrainLoRA": TrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"CharForgeTrainLoRA": "Train LoRA (CharForge)"}
