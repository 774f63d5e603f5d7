"""Caption Dataset, VLM (menu: CharForge/Caption): prose captions from a local vision-language model.

The work is in ``charforge.engine.caption.backends.vlm`` (the captioner) and the caption rules in prose mode
(``charforge.engine.caption.postprocess``: T5 token counts, cut at a sentence end). The shared rule widgets
(trigger, class, keep tokens, banned words, style tags) are the Caption Dataset node's own.
"""

from __future__ import annotations

import os

from .. import bridge
from .caption import CATEGORY, PRECISIONS, _caption_run, _mode_input, _rule_inputs, _rules, resolve_tokenizer
from .dataset import DATASET

SENTENCE_TEMPLATE = "{trigger} {class}, {caption}"
T5_TOKENIZER = "comfy/text_encoders/t5_tokenizer"  # ComfyUI's own copy of T5's vocabulary


def resolve_counting_tokenizer(value: str, text_encoder: str) -> str | None:
    """'' -> None (estimate); 'comfyui' -> ComfyUI's own T5 vocabulary (None, so the estimate, where this
    ComfyUI has none or there is no ComfyUI) or, for CLIP, its CLIP vocabulary; else a folder path."""
    value = (value or "").strip().strip('"')
    if text_encoder != "t5" or value.lower() != "comfyui":
        folder = resolve_tokenizer(value)
        if folder and not os.path.isdir(folder):
            raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
        return folder
    root = bridge.comfyui_root()
    t5 = root / T5_TOKENIZER if root is not None else None
    return str(t5) if t5 is not None and (t5 / "tokenizer.json").is_file() else None


def _counting_note(rules) -> str:
    if rules.tokenizer:
        return f"caption lengths: {rules.text_encoder} tokens counted by the tokenizer in {rules.tokenizer}"
    return f"caption lengths: {rules.text_encoder} tokens estimated (no tokenizer folder)"


class CaptionDatasetVLM:
    """Caption every accepted photo of a dataset in sentences with Qwen2.5-VL or JoyCaption (models/LLM)."""

    DESCRIPTION = (
        "Captions the accepted photos of a dataset in plain sentences, as Flux and SD3.5 are trained, with a local "
        "vision-language model from models/LLM: Qwen2.5-VL (e.g. Qwen2.5-VL-7B-Instruct) or a LLaVA-format "
        "captioner such as JoyCaption Beta One (llama-joycaption-beta-one-hf-llava), run by transformers' own "
        "classes (no downloaded code). The folder's config.json says which one it is; other models are refused "
        "by name. Then the caption rules: the trigger word (and class) first, cleaning, style tags, and the "
        "length limit in T5 tokens (512 for Flux.1-dev and SD3.5, not CLIP's 77), cut at the end of a sentence. "
        "Captions go into the manifest and .txt sidecars as with Caption Dataset. Progress per photo; Cancel "
        "stops within a caption; the model is unloaded when the node finishes."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_TOOLTIPS = (
        "The dataset with its captions (connect to Export Dataset or Dataset Report).",
        "How many photos were captioned, skipped or left without a caption, and the model used.",
    )
    FUNCTION = "caption"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from ..engine.caption.backends.vlm import DEFAULT_STYLE, STYLES
        from ..engine.caption.postprocess import T5_CAPTION_TOKENS, TEXT_ENCODERS

        rules = _rule_inputs()
        return {
            "required": {
                "dataset": (DATASET, {"tooltip": "The dataset from Load/Crop/Augment Dataset."}),
                "model": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "A Qwen2.5-VL or LLaVA-format (JoyCaption) folder in models/LLM, by name "
                        "(e.g. Qwen2.5-VL-7B-Instruct), or an absolute folder path. Empty: the first one found.",
                    },
                ),
                "style": (
                    list(STYLES),
                    {
                        "default": DEFAULT_STYLE,
                        "tooltip": "training caption: two to four factual sentences (subject, clothing, pose, "
                        "setting, light, framing). descriptive: one or two sentences. detailed: a long paragraph. "
                        "A prompt below replaces the style's instruction.",
                    },
                ),
                "mode": _mode_input(),
                "trigger": rules["trigger"],
                "class_tokens": rules["class_tokens"],
                "template": (
                    "STRING",
                    {
                        "default": SENTENCE_TEMPLATE,
                        "tooltip": "How a caption is built: {trigger}, {class} and {caption} are replaced. The "
                        "default puts 'ohwx person, ' before the model's sentences.",
                    },
                ),
                "keep_tokens": rules["keep_tokens"],
                "banned_words": rules["banned_words"],
                "style_tags": rules["style_tags"],
                "max_tokens": (
                    "INT",
                    {
                        "default": T5_CAPTION_TOKENS,
                        "min": 0,
                        "max": 4096,
                        "step": 1,
                        "tooltip": "Longest caption in text_encoder tokens: 511 fits T5's 512 (Flux.1-dev, "
                        "SD3.5); 255 for a Flux.1-schnell trained at 256; 75 for CLIP. Whole sentences are "
                        "dropped from the end; the trigger always stays. 0: no limit.",
                    },
                ),
                "tokenizer": (
                    "STRING",
                    {
                        "default": "comfyui",
                        "tooltip": "Counts tokens for max_tokens: 'comfyui' for ComfyUI's own T5 vocabulary "
                        "(comfy/text_encoders/t5_tokenizer, the estimate where it is missing; CLIP's when "
                        "text_encoder is clip), a tokenizer folder (T5: tokenizer.json or spiece.model, e.g. a "
                        "diffusers Flux model's tokenizer_2), or empty for an estimate that counts prose 10-26 % "
                        "high. The report says which counted.",
                    },
                ),
                "batch_size": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": 64,
                        "step": 1,
                        "tooltip": "Photos given to the model at once (left-padded; more uses more GPU memory).",
                    },
                ),
            },
            "optional": {
                "prompt": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "Your own instruction instead of the style's; {trigger} and {class} are "
                        "filled in (e.g. 'Describe {class} in two sentences.').",
                    },
                ),
                "max_new_tokens": (
                    "INT",
                    {
                        "default": 300,
                        "min": 1,
                        "max": 2048,
                        "step": 1,
                        "tooltip": "Longest generated answer in the model's own tokens (the rules' limit is "
                        "applied afterwards). Decoding is greedy: captions are reproducible.",
                    },
                ),
                "image_side": (
                    "INT",
                    {
                        "default": 768,
                        "min": 64,
                        "max": 4096,
                        "step": 8,
                        "tooltip": "Photos are shrunk to this long side first. Qwen2.5-VL's image tokens (and "
                        "time, memory) grow with it; JoyCaption resizes to 384 itself.",
                    },
                ),
                "text_encoder": (
                    list(TEXT_ENCODERS),
                    {
                        "default": "t5",
                        "tooltip": "Whose tokens max_tokens counts: t5 (Flux, SD3.5) or clip (SD1.5, SDXL).",
                    },
                ),
                "precision": (
                    list(PRECISIONS),
                    {
                        "default": "auto",
                        "tooltip": "auto: bf16 on GPUs that support it, else fp16; fp32 on the CPU.",
                    },
                ),
                "allow_download": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Download a missing model from the Hugging Face hub into models/LLM "
                        "(give the repository, e.g. Qwen/Qwen2.5-VL-7B-Instruct; also CHARFORGE_ALLOW_DOWNLOAD=1). "
                        "Off: a missing model is an error saying what to put where.",
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def caption(
        self,
        dataset,
        model,
        style,
        mode,
        trigger,
        class_tokens,
        template,
        keep_tokens,
        banned_words,
        style_tags,
        max_tokens,
        tokenizer,
        batch_size,
        prompt="",
        max_new_tokens=300,
        image_side=768,
        text_encoder="t5",
        precision="auto",
        allow_download=False,
        node_id=None,
    ):
        from ..engine.caption.backends.vlm import VLMCaptioner, VLMSettings

        rules = _rules(
            trigger,
            class_tokens,
            template,
            keep_tokens,
            banned_words,
            style_tags,
            max_tokens,
            tokenizer,
            resolve=lambda value: resolve_counting_tokenizer(value, text_encoder),
            text_encoder=text_encoder,
            sentences=True,
        )
        settings = VLMSettings(
            dtype=precision,
            style=style,
            prompt=prompt or "",
            trigger=rules.trigger,
            class_tokens=rules.class_tokens,
            max_new_tokens=int(max_new_tokens),
            batch_size=int(batch_size),
            image_side=int(image_side),
            allow_download=bool(allow_download),
        )
        captioner = VLMCaptioner(
            model, settings, control=bridge.control(node_id=node_id, label="caption (vlm)")
        )
        settings_record = {
            "backend": "vlm",
            "model": model,
            "style": style if not (prompt or "").strip() else "own prompt",
            "mode": mode,
            "trigger": trigger,
            "class_tokens": class_tokens,
            "template": template,
            "max_tokens": max_tokens,
            "text_encoder": text_encoder,
        }
        notes = [_counting_note(rules)]
        return _caption_run(
            dataset, captioner, rules, mode, node_id, "caption dataset (vlm)", settings_record, notes
        )


NODE_CLASS_MAPPINGS = {"CharForgeCaptionDatasetVLM": CaptionDatasetVLM}
NODE_DISPLAY_NAME_MAPPINGS = {"CharForgeCaptionDatasetVLM": "Caption Dataset, VLM (CharForge)"}
