"""Library nodes (menu: CharForge/Library): characters and LoRAs.

- Load Character: a character preset's prompt, negative prompt, LoRA stack, identity and generation settings
- Apply LoRA Stack: several LoRAs with per-LoRA weights on MODEL + CLIP through ComfyUI's own patching,
  trigger words from the LoRAs' metadata injected into the prompt
- Load LoRA (by name): one LoRA whose file name is a linked STRING (Train LoRA's lora_name), so one graph can
  train a LoRA and generate with it
- LoRA Info: what a LoRA file is (format, base model, rank, alpha, trigger words, training settings); SD1.5,
  SDXL, Flux.1 and SD3/SD3.5 LoRAs alike
- Merge LoRAs, Resize LoRA, Convert LoRA: write new files into the loras folder, never over an existing one

The logic lives in ``charforge.engine.library``.

Longer than 600 lines: most of it is the declarations of the stage's 7 nodes, every input documented in
its tooltip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import bridge
from ..common.characters import inject_trigger_words as add_trigger_words
from ..engine.library import characters as chars
from .types import CUSTOM_TYPES

CATEGORY = "CharForge/Library"
NONE = "None"
NO_CHARACTER = "(no character saved yet)"
LORA_STACK = "LORA_STACK"
FORMAT_CHOICES = ["kohya", "peft", "comfyui"]

# The LoRA stack is the shape other packs' stack nodes use (Efficiency Nodes, Comfyroll "LORA_STACK"), so
# stacks wire between them.
CUSTOM_TYPES.setdefault(
    LORA_STACK,
    "LoRAs to apply together: a list of (lora file name in the loras folder, "
    "model strength, clip strength) tuples, the shape other packs' LoRA stack "
    "nodes use (nodes/library.py).",
)


def _loras() -> list[str]:
    return bridge.list_models("loras")


def _lora_choices() -> list[str]:
    return [NONE] + _loras()


def _lora_path(name: str) -> str:
    return bridge.find_model("loras", name)


def _mtime(kind: str, name: str):
    try:
        return os.path.getmtime(bridge.find_model(kind, name))
    except (OSError, bridge.ModelNotFoundError):
        return name


def _output_path(name: str, default_stem: str) -> Path:
    """A new file in the first loras folder; a name that exists gets ``_2``, ``_3``... (never overwritten)."""
    from ..engine.library.formats import unique_path

    folder = bridge.first_model_folder("loras")
    stem = (name or "").strip() or default_stem
    stem = stem[: -len(".safetensors")] if stem.lower().endswith(".safetensors") else stem
    if "/" in stem or "\\" in stem or stem.startswith("."):
        raise ValueError(f"output name {name!r} must be a plain file name (no folders)")
    folder.mkdir(parents=True, exist_ok=True)
    return unique_path(folder, stem)


def _text_ui(text: str) -> dict:
    return {"text": [text]}


# --------------------------------------------------------------------------------------------------
# Characters


class LoadCharacter:
    """Load a character preset: prompt, negative prompt, LoRAs, identity and generation settings."""

    DESCRIPTION = (
        "Loads a character preset (models/charforge/characters/<name>.yaml): the prompt with the "
        "character's trigger words, the negative prompt, its LoRAs with their weights (wire into Apply "
        "LoRA Stack), its reference identity (wire into Score Identity) and its generation settings "
        "(wire into KSampler / Empty Latent Image; Flux's guidance into FluxGuidance, SD3.5's shift into "
        "ModelSamplingSD3). Create presets with `charforge character new` or "
        "the Train LoRA node's save_character input."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (
        "STRING",
        "STRING",
        LORA_STACK,
        "CHARFORGE_IDENTITY",
        "FLOAT",
        "INT",
        "FLOAT",
        "INT",
        "INT",
        "STRING",
        "FLOAT",
        "FLOAT",
    )
    RETURN_NAMES = (
        "prompt",
        "negative",
        "loras",
        "identity",
        "threshold",
        "steps",
        "cfg",
        "width",
        "height",
        "report",
        "guidance",
        "shift",
    )
    OUTPUT_TOOLTIPS = (
        "Trigger words + the character's base prompt + extra_prompt.",
        "The character's negative prompt.",
        "The character's LoRAs with their default weights.",
        "The character's reference identity (None when the preset names none: then leave it unwired).",
        "Identity similarity a render needs (0 = the identity's own suggestion).",
        "Sampling steps.",
        "CFG scale.",
        "Image width.",
        "Image height.",
        "Summary of the preset, with sampler and scheduler names.",
        "Flux's distilled guidance (FluxGuidance; Flux samples at cfg 1.0).",
        "SD3/SD3.5's sampling shift (ModelSamplingSD3).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = chars.list_characters() or [NO_CHARACTER]
        return {
            "required": {
                "character": (
                    names,
                    {
                        "default": names[0],
                        "tooltip": "A saved character (models/charforge/characters/<name>.yaml).",
                    },
                ),
                "extra_prompt": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "Added after the character's prompt (the scene, the outfit...).",
                    },
                ),
                "lora_weight_scale": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 4.0,
                        "step": 0.05,
                        "tooltip": "Multiplies every LoRA weight of the preset.",
                    },
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, character, **_):
        try:
            return os.path.getmtime(chars.character_path(character))
        except (OSError, ValueError):
            return character

    def load(self, character, extra_prompt="", lora_weight_scale=1.0):
        if character == NO_CHARACTER:
            raise ValueError(
                "no character is saved yet: create one with `charforge character new` or the Train "
                "LoRA node's save_character input"
            )
        preset = chars.load_character(character)
        identity = None
        notes = []
        if preset.identity:
            from ..engine.score import load_identity

            identity = load_identity(preset.identity)
        else:
            notes.append("no identity in the preset: leave the identity output unwired")
        stack = [
            (lora.name, lora.weight * lora_weight_scale, lora.strength_clip * lora_weight_scale)
            for lora in preset.loras
        ]
        gen = preset.generation
        lines = [
            f"character: {preset.display_name} ({preset.path})",
            f"trigger words: {', '.join(preset.trigger_words) or '-'}",
            "loras: " + (", ".join(f"{n} {w:g}/{c:g}" for n, w, c in stack) or "-"),
            f"sampler: {gen.sampler}, scheduler: {gen.scheduler}, steps {gen.steps}, cfg {gen.cfg:g}, "
            f"{gen.width}x{gen.height}" + (f", seed {gen.seed}" if gen.seed is not None else ""),
            f"threshold: {preset.threshold:g}",
        ] + notes
        if preset.base_model:
            lines.insert(1, f"base model: {preset.base_model}")
        if preset.base_model.startswith("flux"):
            lines.insert(-len(notes) or len(lines), f"guidance: {gen.guidance:g} (FluxGuidance)")
        elif preset.base_model.startswith("sd3"):
            lines.insert(-len(notes) or len(lines), f"shift: {gen.shift:g} (ModelSamplingSD3)")
        report = "\n".join(lines)
        return {
            "ui": _text_ui(report),
            "result": (
                preset.prompt_text(extra_prompt),
                preset.negative_prompt,
                stack,
                identity,
                float(preset.threshold),
                int(gen.steps),
                float(gen.cfg),
                int(gen.width),
                int(gen.height),
                report,
                float(gen.guidance),
                float(gen.shift),
            ),
        }


# --------------------------------------------------------------------------------------------------
# Composition


SLOTS = 3


class ApplyLoraStack:
    """Apply several LoRAs to MODEL and CLIP with per-LoRA weights, using ComfyUI's own LoRA patching."""

    DESCRIPTION = (
        "Patches every LoRA of the stack (e.g. from Load Character) and of the slots below into the "
        "model and text encoder, in order, exactly as ComfyUI's Load LoRA does (SD1.5, SDXL, Flux.1 and "
        "SD3/SD3.5 LoRAs: wire Load Diffusion Model's MODEL and the text encoders' CLIP). Adds the "
        "LoRAs' trigger words (from their metadata) to the prompt when they are missing, and reports each LoRA's base model and any key ComfyUI could not load."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "STRING")
    RETURN_NAMES = ("model", "clip", "prompt", "report")
    OUTPUT_TOOLTIPS = (
        "The model with the LoRAs.",
        "The text encoder with the LoRAs.",
        "The prompt with the LoRAs' trigger words added.",
        "What was applied.",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        choices = _lora_choices()
        optional: dict[str, tuple[Any, dict[str, Any]]] = {
            "loras": (
                LORA_STACK,
                {"tooltip": "A LoRA stack (Load Character, or another pack's stack node)."},
            ),
            "prompt": (
                "STRING",
                {
                    "forceInput": True,
                    "tooltip": "Prompt to add trigger words to (e.g. Load Character's prompt).",
                },
            ),
        }
        for slot in range(1, SLOTS + 1):
            optional[f"lora_{slot}"] = (
                choices,
                {"default": NONE, "tooltip": f"Extra LoRA {slot} (None = skip)."},
            )
            optional[f"strength_{slot}"] = (
                "FLOAT",
                {
                    "default": 1.0,
                    "min": -10.0,
                    "max": 10.0,
                    "step": 0.05,
                    "tooltip": f"Strength of LoRA {slot} on model and CLIP.",
                },
            )
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model."}),
                "clip": ("CLIP", {"tooltip": "The text encoder."}),
                "inject_trigger_words": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Add each LoRA's trigger words to the prompt."},
                ),
            },
            "optional": optional,
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return [_mtime("loras", kwargs.get(f"lora_{s}") or NONE) for s in range(1, SLOTS + 1)]

    def apply(self, model, clip, inject_trigger_words=True, loras=None, prompt="", node_id=None, **slots):
        from ..engine.library.inspect import inspect_lora

        stack = [
            (str(item[0]), float(item[1]), float(item[2] if len(item) > 2 else item[1]))
            for item in loras or []
        ]
        for slot in range(1, SLOTS + 1):
            name = slots.get(f"lora_{slot}") or NONE
            if name != NONE:
                strength = float(slots.get(f"strength_{slot}", 1.0))
                stack.append((name, strength, strength))
        progress = bridge.control(max(len(stack), 1), node_id=node_id, label="apply loras")
        lines, words = [], []
        for name, strength_model, strength_clip in stack:
            if strength_model == 0 and strength_clip == 0:
                lines.append(f"{name}: skipped (strength 0)")
                progress.advance()
                continue
            path = _lora_path(name)
            try:
                found = inspect_lora(path)
            except (ValueError, OSError) as exc:
                found, problem = None, exc
            model, clip, not_loaded = bridge.apply_lora(model, clip, path, strength_model, strength_clip)
            line = f"{name}: model {strength_model:g}" + (
                f", clip {strength_clip:g}" if clip is not None else ""
            )
            line += f" ({found.base_model} LoRA)" if found else ""
            if not_loaded:
                line += f"; {len(not_loaded)} key(s) NOT loaded, e.g. {not_loaded[0]}"
            lines.append(line)
            if inject_trigger_words:
                if found is None:
                    lines.append(f"{name}: no trigger words ({problem})")
                else:
                    words += [w for w in found.trigger_words if w not in words]
            progress.advance()
        text = prompt or ""
        if inject_trigger_words and words:
            text = add_trigger_words(text, words)
            lines.append(f"trigger words: {', '.join(words)}")
        report = "\n".join(lines) or "no LoRA in the stack"
        return {"ui": _text_ui(report), "result": (model, clip, text, report)}


class LoadLoraByName:
    """Apply one LoRA named by a linked STRING (e.g. Train LoRA's lora_name) to MODEL and CLIP."""

    DESCRIPTION = (
        "Like ComfyUI's Load LoRA, but the LoRA's file name comes in as a linked STRING instead of a "
        "pick from the list, so a LoRA trained earlier in the same graph (Train LoRA's lora_name "
        "output) can be used right away: the link also makes ComfyUI run the training first. The name "
        "is looked up in the loras folder(s) and patched in with ComfyUI's own LoRA code; keys ComfyUI "
        "could not load are reported."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = (
        "The model with the LoRA.",
        "The text encoder with the LoRA.",
        "What was applied, and any key ComfyUI did not load.",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model."}),
                "clip": ("CLIP", {"tooltip": "The text encoder."}),
                "lora_name": (
                    "STRING",
                    {
                        "forceInput": True,
                        "tooltip": (
                            "A LoRA file name in the loras folder, e.g. Train LoRA's lora_name output (my_character.safetensors;"
                            " the .safetensors may be left out)."
                        ),
                    },
                ),
                "strength_model": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -10.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "How strongly the LoRA changes the diffusion model.",
                    },
                ),
                "strength_clip": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -10.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "How strongly the LoRA changes the text encoder.",
                    },
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, lora_name=None, **_):
        # ComfyUI leaves linked inputs out here; the link's source already keys the cache then.
        return _mtime("loras", lora_name) if isinstance(lora_name, str) and lora_name else ""

    def apply(self, model, clip, lora_name, strength_model=1.0, strength_clip=1.0):
        name = resolve_lora_name(lora_name)
        bridge.check_cancelled()
        if strength_model == 0 and strength_clip == 0:
            report = f"{name}: skipped (strength 0)"
            return {"ui": _text_ui(report), "result": (model, clip, report)}
        model, clip, not_loaded = bridge.apply_lora(
            model, clip, _lora_path(name), float(strength_model), float(strength_clip)
        )
        report = f"{name}: model {strength_model:g}, clip {strength_clip:g}"
        if not_loaded:
            report += f"; {len(not_loaded)} key(s) NOT loaded, e.g. {not_loaded[0]}"
        return {"ui": _text_ui(report), "result": (model, clip, report)}


def resolve_lora_name(lora_name: str) -> str:
    """The name of `lora_name` as the loras folder lists it (``.safetensors`` added when left out).

    Raises :class:`bridge.ModelNotFoundError` naming the folders searched and the LoRAs found there.
    """
    name = str(lora_name or "").strip().replace("\\", "/")
    if not name:
        raise ValueError(
            "lora_name is empty: link Train LoRA's lora_name (or any STRING with a LoRA file name)"
        )
    if name.startswith("/") or name[1:2] == ":" or ".." in name.split("/"):
        raise ValueError(f"lora_name {lora_name!r} must be a name in the loras folder, not a path")
    listed = _loras()
    candidates = (
        [name] if name.lower().endswith((".safetensors", ".pt", ".ckpt")) else [name, name + ".safetensors"]
    )
    for candidate in candidates:
        if candidate in listed:
            return candidate
    for candidate in candidates:
        try:
            bridge.find_model("loras", candidate)
            return candidate
        except bridge.ModelNotFoundError:
            continue
    shown = ", ".join(listed[:10]) + (" ..." if len(listed) > 10 else "") if listed else "none"
    raise bridge.ModelNotFoundError(
        f"LoRA {name!r} is not in the loras folder(s) {bridge.model_folders('loras')} (found: {shown})"
    )


# --------------------------------------------------------------------------------------------------
# Inspection


class LoraInfo:
    """Show what a LoRA file is: format, base model, rank, alpha, trigger words, training settings."""

    DESCRIPTION = (
        "Reads a LoRA's metadata and keys: its format (kohya, diffusers/peft, ComfyUI), the base model "
        "it was trained for (SD1.5, SDXL, Flux.1, SD3/SD3.5) and which full-size models it fits (e.g. "
        "Flux.1-dev vs schnell, SD3.5 Medium vs Large), rank(s), alpha, trigger words, training settings "
        "and the most frequent caption tags."
    )
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "STRING")
    RETURN_NAMES = ("info", "trigger_words", "base_model")
    OUTPUT_TOOLTIPS = (
        "The readable summary.",
        "Trigger words, comma separated.",
        "sd15, sdxl, flux, sd3 or unknown.",
    )
    FUNCTION = "info"

    @classmethod
    def INPUT_TYPES(cls):
        names = _loras() or [NONE]
        return {
            "required": {"lora": (names, {"default": names[0], "tooltip": "A file in the loras folder."})}
        }

    @classmethod
    def IS_CHANGED(cls, lora, **_):
        return _mtime("loras", lora)

    def info(self, lora):
        from ..engine.library.inspect import inspect_lora

        if lora == NONE:
            raise ValueError("no LoRA file in the loras folder")
        found = inspect_lora(_lora_path(lora))
        text = found.summary()
        return {"ui": _text_ui(text), "result": (text, ", ".join(found.trigger_words), found.base_model)}


# --------------------------------------------------------------------------------------------------
# Merge, resize, convert


class MergeLoras:
    """Merge up to four LoRAs with weights into a new LoRA file (optionally at a lower rank)."""

    DESCRIPTION = (
        "Writes a new LoRA whose effect is exactly the weighted sum of the inputs' effects (ranks "
        "concatenated). With a target rank the sum is compressed by SVD and the energy kept is reported. "
        "The file goes into the loras folder; an existing name gets a numeric suffix."
    )
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("lora_name", "report")
    OUTPUT_TOOLTIPS = ("The new file's name in the loras folder.", "What was merged and the energy kept.")
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls):
        names = _loras() or [NONE]
        choices = _lora_choices()
        required = {
            "lora_1": (names, {"default": names[0], "tooltip": "First LoRA."}),
            "weight_1": (
                "FLOAT",
                {
                    "default": 1.0,
                    "min": -10.0,
                    "max": 10.0,
                    "step": 0.05,
                    "tooltip": "Weight of the first LoRA's effect.",
                },
            ),
        }
        optional: dict[str, tuple[Any, dict[str, Any]]] = {}
        for slot in range(2, 5):
            optional[f"lora_{slot}"] = (
                choices,
                {"default": NONE, "tooltip": f"LoRA {slot} (None = unused)."},
            )
            optional[f"weight_{slot}"] = (
                "FLOAT",
                {
                    "default": 1.0,
                    "min": -10.0,
                    "max": 10.0,
                    "step": 0.05,
                    "tooltip": f"Weight of LoRA {slot}'s effect.",
                },
            )
        required.update(
            {
                "rank": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 1024,
                        "tooltip": "0 = exact merge (ranks add up); else SVD to at most this rank.",
                    },
                ),
                "output_name": (
                    "STRING",
                    {"default": "merged", "tooltip": "File name (without .safetensors)."},
                ),
                "format": (FORMAT_CHOICES, {"default": "kohya", "tooltip": "Key layout of the new file."}),
            }
        )
        return {"required": required, "optional": optional, "hidden": {"node_id": "UNIQUE_ID"}}

    def merge(self, lora_1, weight_1, rank, output_name, format, node_id=None, **slots):  # noqa: A002 - input name
        from ..engine.library.merge import merge_files

        sources = [(lora_1, float(weight_1))]
        for slot in range(2, 5):
            name = slots.get(f"lora_{slot}") or NONE
            if name != NONE:
                sources.append((name, float(slots.get(f"weight_{slot}", 1.0))))
        if lora_1 == NONE:
            raise ValueError("no LoRA file in the loras folder")
        target = _output_path(output_name, "merged")
        progress = bridge.control(1, node_id=node_id, label="merge loras")
        path, energy = merge_files(
            [(_lora_path(n), w) for n, w in sources],
            target,
            rank=rank or None,
            fmt=format,
            on_module=progress.check,
        )
        progress.advance()
        report = f"{path.name}: " + " + ".join(f"{w:g} x {n}" for n, w in sources)
        if energy is not None:
            report += f"\n{energy.summary()}"
        return {"ui": _text_ui(report), "result": (path.name, report)}


class ResizeLora:
    """Shrink a LoRA to a lower rank by SVD and report the energy each module keeps."""

    DESCRIPTION = (
        "Writes a copy of the LoRA with every module truncated to at most the given rank by SVD (the "
        "best approximation of its effect at that rank). Reports the share of the effect's energy "
        "(squared Frobenius norm) kept overall and for the worst module."
    )
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "FLOAT", "STRING")
    RETURN_NAMES = ("lora_name", "energy_kept", "report")
    OUTPUT_TOOLTIPS = (
        "The new file's name in the loras folder.",
        "Fraction of the energy kept (0..1).",
        "Summary.",
    )
    FUNCTION = "resize"

    @classmethod
    def INPUT_TYPES(cls):
        names = _loras() or [NONE]
        return {
            "required": {
                "lora": (names, {"default": names[0], "tooltip": "The LoRA to shrink."}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 1024, "tooltip": "Target rank per module."}),
                "output_name": ("STRING", {"default": "", "tooltip": "File name; empty = <lora>_r<rank>."}),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def resize(self, lora, rank, output_name, node_id=None):
        from ..engine.library.merge import resize_file

        if lora == NONE:
            raise ValueError("no LoRA file in the loras folder")
        target = _output_path(output_name, f"{Path(lora).stem}_r{rank}")
        path, energy = resize_file(_lora_path(lora), target, int(rank), on_module=bridge.check_cancelled)
        report = f"{path.name}: {energy.summary()}"
        return {"ui": _text_ui(report), "result": (path.name, float(energy.retained), report)}


class ConvertLora:
    """Rewrite a LoRA's keys in another layout (kohya, diffusers/peft, ComfyUI)."""

    DESCRIPTION = (
        "Writes a copy of the LoRA with its keys in the kohya (lora_unet_...), diffusers/peft "
        "(unet.... / transformer....lora_A) or ComfyUI (diffusion_model....) layout. Tensors and metadata "
        "are unchanged, so converting back gives the same file contents. Flux and SD3.5 LoRAs: kohya and "
        "ComfyUI fuse q, k, v (qkv, linear1) where diffusers/peft splits them (to_q, to_k, to_v, "
        "proj_mlp); the conversion fuses or splits without changing the LoRA's effect, and peft files "
        "carry alpha folded into the weights."
    )
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("lora_name", "report")
    OUTPUT_TOOLTIPS = ("The new file's name in the loras folder.", "Summary.")
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        names = _loras() or [NONE]
        return {
            "required": {
                "lora": (names, {"default": names[0], "tooltip": "The LoRA to convert."}),
                "to": (FORMAT_CHOICES, {"default": "kohya", "tooltip": "Target key layout."}),
                "output_name": ("STRING", {"default": "", "tooltip": "File name; empty = <lora>_<format>."}),
            }
        }

    def convert(self, lora, to, output_name):
        from ..engine.library.formats import read_state, write_state

        if lora == NONE:
            raise ValueError("no LoRA file in the loras folder")
        state = read_state(_lora_path(lora))
        target = _output_path(output_name, f"{Path(lora).stem}_{to}")
        path = write_state(state, target, to)
        report = f"{path.name}: {len(state.modules)} modules, {state.source_format} -> {to} ({state.arch})"
        return {"ui": _text_ui(report), "result": (path.name, report)}


NODE_CLASS_MAPPINGS = {
    "CharForgeLoadCharacter": LoadCharacter,
    "CharForgeApplyLoraStack": ApplyLoraStack,
    "CharForgeLoadLoraByName": LoadLoraByName,
    "CharForgeLoraInfo": LoraInfo,
    "CharForgeMergeLoras": MergeLoras,
    "CharForgeResizeLora": ResizeLora,
    "CharForgeConvertLora": ConvertLora,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgeLoadCharacter": "Load Character",
    "CharForgeApplyLoraStack": "Apply LoRA Stack",
    "CharForgeLoadLoraByName": "Load LoRA (by name)",
    "CharForgeLoraInfo": "LoRA Info",
    "CharForgeMergeLoras": "Merge LoRAs",
    "CharForgeResizeLora": "Resize LoRA",
    "CharForgeConvertLora": "Convert LoRA",
}
