"""Caption nodes (menu: CharForge/Caption)."""

from __future__ import annotations

import os

from .. import bridge
from .dataset import DATASET, _finish, _StageProgress

CATEGORY = "CharForge/Caption"
BACKENDS = ("wd14", "openai")
COMFY_TOKENIZER = "comfyui"
DEFAULT_TEMPLATE = "{trigger}, {caption}"


def resolve_tokenizer(value: str) -> str | None:
    """'' -> None (approximate counts); 'comfyui' -> ComfyUI's own CLIP vocabulary; else a folder path."""
    value = (value or "").strip().strip('"')
    if not value:
        return None
    if value.lower() == COMFY_TOKENIZER:
        root = bridge.comfyui_root()
        if root is None:
            raise FileNotFoundError("tokenizer 'comfyui' needs ComfyUI (or $COMFYUI_DIR): its CLIP vocabulary is "
                                    "comfy/sd1_tokenizer; or give a tokenizer folder path")
        return str(root / "comfy" / "sd1_tokenizer")
    return os.path.expanduser(value)


def _rule_inputs() -> dict:
    """The caption-rule widgets both nodes share."""
    return {
        "trigger": ("STRING", {"default": "ohwx",
                               "tooltip": "Trigger word: comes first in every caption and is never repeated. "
                                          "Empty: no trigger."}),
        "class_tokens": ("STRING", {"default": "person",
                                    "tooltip": "What the character is (woman, man, person, cat...): fills {class} "
                                               "in the template."}),
        "template": ("STRING", {"default": DEFAULT_TEMPLATE,
                                "tooltip": "How a caption is built: {trigger}, {class} and {caption} are replaced, "
                                           "e.g. 'a photo of {trigger} {class}, {caption}'. Without {caption} the "
                                           "caption is appended."}),
        "keep_tokens": ("STRING", {"default": "",
                                   "tooltip": "Comma-separated tags kept right after the trigger, in this order "
                                              "(with the trigger they are kohya's keep_tokens)."}),
        "banned_words": ("STRING", {"default": "",
                                    "tooltip": "Comma-separated words or phrases removed from captions (whole words, "
                                               "any case), e.g. 'watermark, signature, blurry'."}),
        "style_tags": ("STRING", {"default": "",
                                  "tooltip": "Comma-separated tags added at the end of every caption "
                                             "(skipped when already present)."}),
        "max_tokens": ("INT", {"default": 75, "min": 0, "max": 1024, "step": 1,
                               "tooltip": "Longest caption in tokens (CLIP: 75). Tags are dropped from the end "
                                          "first; the trigger always stays. 0: no limit."}),
        "tokenizer": ("STRING", {"default": "",
                                 "tooltip": "Counts tokens for max_tokens: a CLIP tokenizer folder (vocab.json + "
                                            "merges.txt, e.g. a diffusers model's 'tokenizer' folder), 'comfyui' "
                                            "for ComfyUI's own CLIP vocabulary, or empty for an estimate "
                                            "(about ±20 %)."}),
    }


def _rules(trigger, class_tokens, template, keep_tokens, banned_words, style_tags, max_tokens, tokenizer,
           deduplicate=True):
    from ..engine.caption.postprocess import CaptionRules, split_list

    return CaptionRules(trigger=trigger.strip(), class_tokens=class_tokens.strip(), template=template,
                        keep_tokens=split_list(keep_tokens), banned_words=split_list(banned_words),
                        style_tags=split_list(style_tags), deduplicate=deduplicate, max_tokens=int(max_tokens),
                        tokenizer=resolve_tokenizer(tokenizer))


class CaptionRules:
    """Apply the caption rules (template, trigger first, cleaning, style tags, length) to a caption."""

    DESCRIPTION = (
        "Applies CharForge's caption rules to a caption you wrote or got from another node: fills the template "
        "({trigger}, {class}, {caption}), puts the trigger word first (never twice) followed by the keep tokens, "
        "cleans whitespace, repeated phrases and tags (any case) and banned words, adds style tags, and keeps "
        "the caption within max_tokens of a CLIP tokenizer. The result is one line, as trainers expect."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "INT", "STRING")
    RETURN_NAMES = ("caption", "tokens", "report")
    OUTPUT_TOOLTIPS = ("The caption after the rules (one line).",
                       "Its length in tokens (exact with a tokenizer, else estimated).",
                       "What the rules did.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "caption": ("STRING", {"default": "", "multiline": True,
                                       "tooltip": "The caption to clean up (newlines become spaces)."}),
                **_rule_inputs(),
                "deduplicate": ("BOOLEAN", {"default": True,
                                            "tooltip": "Keep repeated tags and back-to-back repeated phrases "
                                                       "once (any case)."}),
            },
        }

    def apply(self, caption, trigger, class_tokens, template, keep_tokens, banned_words, style_tags, max_tokens,
              tokenizer, deduplicate):
        from ..engine.caption.postprocess import apply_rules

        rules = _rules(trigger, class_tokens, template, keep_tokens, banned_words, style_tags, max_tokens,
                       tokenizer, deduplicate)
        out = apply_rules(caption, rules)
        kind = "tokens" if out.exact_count else "tokens (estimated)"
        report = f"{out.tokens} {kind}; {out.protected} protected tag(s) in front"
        if out.truncated:
            report += f"; shortened to fit {rules.max_tokens}"
        return {"ui": {"text": [out.text, report]}, "result": (out.text, out.tokens, report)}


class CaptionDataset:
    """Caption every accepted photo of a dataset with a chosen backend; write sidecars and the manifest."""

    DESCRIPTION = (
        "Captions the accepted photos of a dataset with a WD14 tagger (ONNX model + tag CSV from "
        "models/wd14_tagger) or any OpenAI-compatible vision endpoint (OpenAI, Ollama, vLLM, LM Studio), applies "
        "the caption rules (trigger first, template, cleaning, token limit) and writes each caption into the "
        "manifest and a one-line .txt sidecar next to the dataset's working file (captions/<id>.txt while that "
        "is still your original photo: your photo folder is never written to). Already-captioned photos are "
        "skipped unless mode says otherwise. The model is unloaded when the node finishes."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_TOOLTIPS = ("The dataset with its captions (connect to Export Dataset or Dataset Report).",
                       "How many photos were captioned, skipped or left without a caption, and why.")
    FUNCTION = "caption"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from ..engine.caption.backends.openai_compat import DEFAULT_PROMPT
        from ..engine.caption.dataset import MODES

        return {
            "required": {
                "dataset": (DATASET, {"tooltip": "The dataset from Load/Crop/Augment Dataset."}),
                "backend": (list(BACKENDS), {
                    "default": BACKENDS[0],
                    "tooltip": "wd14: booru tags from an ONNX tagger in models/wd14_tagger (fast, local). openai: "
                               "sentences from a vision model behind an OpenAI-compatible endpoint."}),
                "model": ("STRING", {
                    "default": "",
                    "tooltip": "wd14: the tagger's name in models/wd14_tagger (without .onnx; empty: the first one "
                               "found) or a path to its .onnx. openai: the model name on the endpoint (empty: "
                               "gpt-4o-mini)."}),
                "mode": (list(MODES), {
                    "default": MODES[0],
                    "tooltip": "skip existing: leave photos that already have a caption alone. overwrite: caption "
                               "every photo anew. append: add the new caption after the existing one."}),
                **_rule_inputs(),
                "batch_size": ("INT", {"default": 8, "min": 1, "max": 256, "step": 1,
                                       "tooltip": "Photos given to the model at once (openai: requests in "
                                                  "flight at once)."}),
            },
            "optional": {
                "general_threshold": ("FLOAT", {"default": 0.35, "min": 0.0, "max": 1.0, "step": 0.01,
                                                "tooltip": "wd14: confidence a general tag needs."}),
                "character_threshold": ("FLOAT", {"default": 0.85, "min": 0.0, "max": 1.0, "step": 0.01,
                                                  "tooltip": "wd14: confidence a character tag needs."}),
                "replace_underscore": ("BOOLEAN", {"default": True,
                                                   "tooltip": "wd14: 'long_hair' becomes 'long hair' (emoticons "
                                                              "like ^_^ stay)."}),
                "exclude_tags": ("STRING", {"default": "",
                                            "tooltip": "wd14: comma-separated tags never written (with or without "
                                                       "underscores)."}),
                "base_url": ("STRING", {"default": "https://api.openai.com/v1",
                                        "tooltip": "openai: the endpoint's base URL, e.g. "
                                                   "http://127.0.0.1:11434/v1 for Ollama."}),
                "api_key_env": ("STRING", {"default": "OPENAI_API_KEY",
                                           "tooltip": "openai: NAME of the environment variable holding the API key "
                                                      "(the key itself never goes into the workflow). Empty or "
                                                      "unset: no key (local servers)."}),
                "prompt": ("STRING", {"default": DEFAULT_PROMPT, "multiline": True,
                                      "tooltip": "openai: the instruction sent with each photo."}),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def caption(self, dataset, backend, model, mode, trigger, class_tokens, template, keep_tokens, banned_words,
                style_tags, max_tokens, tokenizer, batch_size, general_threshold=0.35, character_threshold=0.85,
                replace_underscore=True, exclude_tags="", base_url="https://api.openai.com/v1",
                api_key_env="OPENAI_API_KEY", prompt="", node_id=None):
        from ..engine.caption.dataset import caption_dataset
        from ..engine.caption.postprocess import split_list

        rules = _rules(trigger, class_tokens, template, keep_tokens, banned_words, style_tags, max_tokens, tokenizer)
        captioner = _make_captioner(backend, model, batch_size, general_threshold, character_threshold,
                                    replace_underscore, split_list(exclude_tags), base_url, api_key_env, prompt)
        try:
            run = caption_dataset(dataset, captioner, rules, mode=mode, batch_size=captioner.batch_size,
                                  on_image=_StageProgress(node_id, "caption dataset"))
        finally:
            captioner.close()  # free the model even when cancelled
        settings = {"backend": backend, "model": model, "mode": mode, "trigger": trigger,
                    "class_tokens": class_tokens, "template": template, "max_tokens": max_tokens}
        text = _finish(run.manifest, "caption", settings, run.summary)
        return {"ui": {"text": [text]}, "result": (run.manifest, run.summary)}


def _make_captioner(backend, model, batch_size, general_threshold, character_threshold, replace_underscore,
                    exclude_tags, base_url, api_key_env, prompt):
    if backend == "wd14":
        from ..engine.caption.backends.base import CaptionerError
        from ..engine.caption.backends.wd14 import (
            DEFAULT_MODEL,
            MODEL_FOLDER,
            WD14Settings,
            WD14Tagger,
            list_taggers,
        )

        name = (model or "").strip()
        if not name:
            found = list_taggers()
            if not found:
                raise CaptionerError(
                    f"no WD14 tagger in the {MODEL_FOLDER} model folder ({', '.join(bridge.model_folders(MODEL_FOLDER))}"
                    f"): put e.g. {DEFAULT_MODEL}.onnx and {DEFAULT_MODEL}.csv there (the model's model.onnx and "
                    "selected_tags.csv, renamed)")
            name = found[0]
        return WD14Tagger(name, WD14Settings(general_threshold=general_threshold,
                                             character_threshold=character_threshold,
                                             replace_underscore=replace_underscore, exclude_tags=exclude_tags,
                                             batch_size=batch_size))
    if backend == "openai":
        from ..engine.caption.backends.openai_compat import (
            DEFAULT_PROMPT,
            OpenAICompatCaptioner,
            OpenAISettings,
        )

        settings = OpenAISettings(base_url=base_url.strip(), model=(model or "").strip() or "gpt-4o-mini",
                                  prompt=(prompt or "").strip() or DEFAULT_PROMPT, api_key_env=api_key_env.strip(),
                                  concurrency=max(1, batch_size))
        captioner = OpenAICompatCaptioner(settings)
        captioner.batch_size = max(1, batch_size)
        return captioner
    raise ValueError(f"unknown caption backend {backend!r}: choose one of {', '.join(BACKENDS)}")


NODE_CLASS_MAPPINGS = {
    "CharForgeCaptionRules": CaptionRules,
    "CharForgeCaptionDataset": CaptionDataset,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgeCaptionRules": "Caption Rules (CharForge)",
    "CharForgeCaptionDataset": "Caption Dataset (CharForge)",
}
