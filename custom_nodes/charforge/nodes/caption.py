"""Caption nodes (menu: CharForge/Caption).

The work is in ``charforge.engine.caption``. Longer than 600 lines: most of it is the declarations of the stage's 5 nodes, every input documented in
its tooltip.
"""

from __future__ import annotations

import os

from .. import bridge
from .convert import image_to_pil, show_picture
from .dataset import DATASET, _finish, _stage_progress

CATEGORY = "CharForge/Caption"
BACKENDS = ("wd14", "openai", "blip", "blip2", "florence2", "clip_interrogator", "ensemble")
SENTENCE_BACKENDS = ("florence2", "blip", "blip2", "none")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BACKEND_TOOLTIP = (
    "wd14: booru tags from an ONNX tagger in models/wd14_tagger (fast, local). openai: sentences from a vision "
    "model behind an OpenAI-compatible endpoint. blip / blip2: sentences from a BLIP / BLIP-2 folder in "
    "models/blip. florence2: sentences from a Florence-2 folder in models/LLM (task: florence_task). "
    "clip_interrogator: a sentence from sentence_backend plus the best-matching terms of the term lists, ranked "
    "by a CLIP model from models/clip_vision. ensemble: the backends listed in 'ensemble', joined in that order, "
    "each term once."
)
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
            raise FileNotFoundError(
                "tokenizer 'comfyui' needs ComfyUI (or $COMFYUI_DIR): its CLIP vocabulary is "
                "comfy/sd1_tokenizer; or give a tokenizer folder path"
            )
        return str(root / "comfy" / "sd1_tokenizer")
    return os.path.expanduser(value)


def _rule_inputs() -> dict:
    """The caption-rule widgets both nodes share."""
    return {
        "trigger": (
            "STRING",
            {
                "default": "ohwx",
                "tooltip": "Trigger word: comes first in every caption and is never repeated. "
                "Empty: no trigger.",
            },
        ),
        "class_tokens": (
            "STRING",
            {
                "default": "person",
                "tooltip": "What the character is (woman, man, person, cat...): fills {class} "
                "in the template.",
            },
        ),
        "template": (
            "STRING",
            {
                "default": DEFAULT_TEMPLATE,
                "tooltip": "How a caption is built: {trigger}, {class} and {caption} are replaced, "
                "e.g. 'a photo of {trigger} {class}, {caption}'. Without {caption} the "
                "caption is appended.",
            },
        ),
        "keep_tokens": (
            "STRING",
            {
                "default": "",
                "tooltip": "Comma-separated tags kept right after the trigger, in this order "
                "(with the trigger they are kohya's keep_tokens).",
            },
        ),
        "banned_words": (
            "STRING",
            {
                "default": "",
                "tooltip": "Comma-separated words or phrases removed from captions (whole words, "
                "any case), e.g. 'watermark, signature, blurry'.",
            },
        ),
        "style_tags": (
            "STRING",
            {
                "default": "",
                "tooltip": "Comma-separated tags added at the end of every caption "
                "(skipped when already present).",
            },
        ),
        "max_tokens": (
            "INT",
            {
                "default": 75,
                "min": 0,
                "max": 1024,
                "step": 1,
                "tooltip": "Longest caption in tokens (CLIP: 75). Tags are dropped from the end "
                "first; the trigger always stays. 0: no limit.",
            },
        ),
        "tokenizer": (
            "STRING",
            {
                "default": "",
                "tooltip": "Counts tokens for max_tokens: a CLIP tokenizer folder (vocab.json + "
                "merges.txt, e.g. a diffusers model's 'tokenizer' folder), 'comfyui' "
                "for ComfyUI's own CLIP vocabulary, or empty for an estimate "
                "(about ±20 %).",
            },
        ),
    }


def _rules(
    trigger,
    class_tokens,
    template,
    keep_tokens,
    banned_words,
    style_tags,
    max_tokens,
    tokenizer,
    deduplicate=True,
    *,
    resolve=resolve_tokenizer,
    **more,
):
    """The rules from the rule widgets; ``resolve`` turns the tokenizer widget into a folder (or None),
    ``more`` are further CaptionRules fields (text_encoder, sentences)."""
    from ..engine.caption.postprocess import CaptionRules, split_list

    return CaptionRules(
        trigger=trigger.strip(),
        class_tokens=class_tokens.strip(),
        template=template,
        keep_tokens=split_list(keep_tokens),
        banned_words=split_list(banned_words),
        style_tags=split_list(style_tags),
        deduplicate=deduplicate,
        max_tokens=int(max_tokens),
        tokenizer=resolve(tokenizer),
        **more,
    )


def _mode_input() -> tuple:
    """The dataset captioners' mode widget (what to do with photos that have a caption)."""
    from ..engine.caption.dataset import MODES

    return (
        list(MODES),
        {
            "default": MODES[0],
            "tooltip": "skip existing: leave photos that already have a caption alone. overwrite: caption "
            "every photo anew. append: add the new caption after the existing one.",
        },
    )


def _caption_run(dataset, captioner, rules, mode, node_id, label: str, settings: dict, notes=()):
    """Caption ``dataset`` with ``captioner`` (closed afterwards, also on cancel), record the stage and
    answer as the dataset captioners do: the report shown and (dataset, report)."""
    from ..engine.caption.dataset import caption_dataset

    try:
        run = caption_dataset(
            dataset,
            captioner,
            rules,
            mode=mode,
            batch_size=captioner.batch_size,
            on_image=_stage_progress(node_id, label),
        )
    finally:
        captioner.close()  # free the model even when cancelled
    run.notes.extend(notes)
    text = _finish(run.manifest, "caption", settings, run.summary)
    return {"ui": {"text": [text]}, "result": (run.manifest, run.summary)}


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
    OUTPUT_TOOLTIPS = (
        "The caption after the rules (one line).",
        "Its length in tokens (exact with a tokenizer, else estimated).",
        "What the rules did.",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "caption": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "The caption to clean up (newlines become spaces).",
                    },
                ),
                **_rule_inputs(),
                "deduplicate": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Keep repeated tags and back-to-back repeated phrases once (any case).",
                    },
                ),
            },
        }

    def apply(
        self,
        caption,
        trigger,
        class_tokens,
        template,
        keep_tokens,
        banned_words,
        style_tags,
        max_tokens,
        tokenizer,
        deduplicate,
    ):
        from ..engine.caption.postprocess import apply_rules

        rules = _rules(
            trigger,
            class_tokens,
            template,
            keep_tokens,
            banned_words,
            style_tags,
            max_tokens,
            tokenizer,
            deduplicate,
        )
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
        "models/wd14_tagger), BLIP / BLIP-2 (models/blip), Florence-2 (models/LLM), a CLIP-interrogator-style "
        "captioner, an ensemble of these, or any OpenAI-compatible vision endpoint (OpenAI, Ollama, vLLM), applies "
        "the caption rules (trigger first, template, cleaning, token limit) and writes each caption into the "
        "manifest and a one-line .txt sidecar next to the dataset's working file (captions/<id>.txt while that "
        "is still your original photo: your photo folder is never written to). Already-captioned photos are "
        "skipped unless mode says otherwise. The model is unloaded when the node finishes."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_TOOLTIPS = (
        "The dataset with its captions (connect to Export Dataset or Dataset Report).",
        "How many photos were captioned, skipped or left without a caption, and why.",
    )
    FUNCTION = "caption"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from ..engine.caption.backends.openai_compat import DEFAULT_PROMPT

        return {
            "required": {
                "dataset": (DATASET, {"tooltip": "The dataset from Load/Crop/Augment Dataset."}),
                "backend": (list(BACKENDS), {"default": BACKENDS[0], "tooltip": BACKEND_TOOLTIP}),
                "model": _model_input(),
                "mode": _mode_input(),
                **_rule_inputs(),
                "batch_size": (
                    "INT",
                    {
                        "default": 8,
                        "min": 1,
                        "max": 256,
                        "step": 1,
                        "tooltip": "Photos given to the model at once (openai: requests in flight at once).",
                    },
                ),
            },
            "optional": {
                "general_threshold": (
                    "FLOAT",
                    {
                        "default": 0.35,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "wd14: confidence a general tag needs.",
                    },
                ),
                "character_threshold": (
                    "FLOAT",
                    {
                        "default": 0.85,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "wd14: confidence a character tag needs.",
                    },
                ),
                "replace_underscore": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "wd14: 'long_hair' becomes 'long hair' (emoticons like ^_^ stay).",
                    },
                ),
                "exclude_tags": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "wd14: comma-separated tags never written (with or without underscores).",
                    },
                ),
                "base_url": (
                    "STRING",
                    {
                        "default": "https://api.openai.com/v1",
                        "tooltip": "openai: the endpoint's base URL, e.g. "
                        "http://127.0.0.1:11434/v1 for Ollama.",
                    },
                ),
                "api_key_env": (
                    "STRING",
                    {
                        "default": "OPENAI_API_KEY",
                        "tooltip": "openai: NAME of the environment variable holding the API key "
                        "(the key itself never goes into the workflow). Empty or "
                        "unset: no key (local servers).",
                    },
                ),
                "prompt": (
                    "STRING",
                    {
                        "default": DEFAULT_PROMPT,
                        "multiline": True,
                        "tooltip": "openai: the instruction sent with each photo.",
                    },
                ),
                **_local_backend_inputs(),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def caption(
        self,
        dataset,
        backend,
        model,
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
        node_id=None,
        **options,
    ):
        rules = _rules(
            trigger, class_tokens, template, keep_tokens, banned_words, style_tags, max_tokens, tokenizer
        )
        captioner = make_captioner(backend, model, batch_size, **options)
        settings = {
            "backend": backend,
            "model": model,
            "mode": mode,
            "trigger": trigger,
            "class_tokens": class_tokens,
            "template": template,
            "max_tokens": max_tokens,
        }
        return _caption_run(dataset, captioner, rules, mode, node_id, "caption dataset", settings)


def _model_input():
    return (
        "STRING",
        {
            "default": "",
            "tooltip": "wd14: the tagger's name in models/wd14_tagger (without .onnx) or a path to its .onnx. openai: the "
            "model name on the endpoint (empty: gpt-4o-mini). blip / blip2: a folder in models/blip; florence2: "
            "a folder in models/LLM; or an absolute folder path, or a hub repository (owner/name) when "
            "allow_download is on. clip_interrogator: the sentence model. Empty: the first one found.",
        },
    )


def _local_backend_inputs() -> dict:
    """Widgets of the transformers, CLIP-interrogator and ensemble backends (optional inputs)."""
    from ..engine.caption.backends.hf import FLORENCE_TASKS
    from ..engine.caption.backends.interrogator import DEFAULT_LISTS

    return {
        "florence_task": (
            list(FLORENCE_TASKS),
            {
                "default": FLORENCE_TASKS[0],
                "tooltip": "florence2: <CAPTION> one short sentence, <DETAILED_CAPTION> a few sentences, "
                "<MORE_DETAILED_CAPTION> a paragraph.",
            },
        ),
        "text_prompt": (
            "STRING",
            {
                "default": "",
                "tooltip": "blip: the caption starts with this (e.g. 'a photo of'); blip2: a "
                "question ('Question: what is she wearing? Answer:'). Empty: plain "
                "captioning.",
            },
        ),
        "max_new_tokens": (
            "INT",
            {
                "default": 40,
                "min": 1,
                "max": 1024,
                "step": 1,
                "tooltip": "blip / blip2 / florence2: longest generated caption in the model's "
                "own tokens (the token limit of the rules is applied afterwards).",
            },
        ),
        "num_beams": (
            "INT",
            {
                "default": 1,
                "min": 1,
                "max": 16,
                "step": 1,
                "tooltip": "blip / blip2 / florence2: beam search width; 1 is greedy decoding "
                "(fastest). Decoding never samples, so captions are reproducible.",
            },
        ),
        "precision": (
            list(PRECISIONS),
            {
                "default": "auto",
                "tooltip": "Local models: auto uses bf16 on GPUs that support it, else "
                "fp16, and fp32 on the CPU.",
            },
        ),
        "allow_download": (
            "BOOLEAN",
            {
                "default": False,
                "tooltip": "blip / blip2 / florence2: download a missing model from the "
                "Hugging Face hub into its model folder (also: "
                "CHARFORGE_ALLOW_DOWNLOAD=1). Off: a missing model is an error "
                "saying which files to put where.",
            },
        ),
        "sentence_backend": (
            list(SENTENCE_BACKENDS),
            {
                "default": SENTENCE_BACKENDS[0],
                "tooltip": "clip_interrogator: the backend writing the sentence ('model' names its folder); none: "
                "terms only.",
            },
        ),
        "clip_model": (
            "STRING",
            {
                "default": "",
                "tooltip": "clip_interrogator: a full CLIP folder in models/clip_vision (e.g. a "
                "download of openai/clip-vit-large-patch14) or its path. Empty: the "
                "first one found.",
            },
        ),
        "term_lists": (
            "STRING",
            {
                "default": ", ".join(DEFAULT_LISTS),
                "tooltip": "clip_interrogator: the term lists used, in output order. Built in: "
                "mediums, styles, lighting, framing, artists, flavours; your own: "
                "<name>.txt files in terms_folder.",
            },
        ),
        "terms_per_list": (
            "INT",
            {
                "default": 1,
                "min": 0,
                "max": 16,
                "step": 1,
                "tooltip": "clip_interrogator: best terms taken from each list (flavours: 3 when this is 1).",
            },
        ),
        "terms_folder": (
            "STRING",
            {
                "default": "",
                "tooltip": "clip_interrogator: a folder of <list>.txt term files (one term a "
                "line). Empty: models/charforge/caption_terms.",
            },
        ),
        "ensemble": (
            "STRING",
            {
                "default": "florence2, wd14",
                "tooltip": "ensemble: the backends to combine, in order, comma-separated; "
                "'backend:model' picks a model (e.g. 'florence2:Florence-2-large, "
                "wd14:wd-v1-4-moat-tagger-v2'). Repeated terms are kept once.",
            },
        ),
    }


def make_captioner(backend: str, model: str = "", batch_size: int = 8, **options):
    """The captioner for `backend` with the node's options (the optional inputs of Caption Dataset)."""
    from ..engine.caption.backends.base import CaptionerError
    from ..engine.caption.postprocess import split_list

    o = options
    if backend == "wd14":
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
                    "selected_tags.csv, renamed)"
                )
            name = found[0]
        return WD14Tagger(
            name,
            WD14Settings(
                general_threshold=o.get("general_threshold", 0.35),
                character_threshold=o.get("character_threshold", 0.85),
                replace_underscore=o.get("replace_underscore", True),
                exclude_tags=split_list(o.get("exclude_tags", "")),
                batch_size=batch_size,
            ),
        )
    if backend == "openai":
        from ..engine.caption.backends.openai_compat import (
            DEFAULT_PROMPT,
            OpenAICompatCaptioner,
            OpenAISettings,
        )

        settings = OpenAISettings(
            base_url=o.get("base_url", "https://api.openai.com/v1").strip(),
            model=(model or "").strip() or "gpt-4o-mini",
            prompt=(o.get("prompt") or "").strip() or DEFAULT_PROMPT,
            api_key_env=o.get("api_key_env", "OPENAI_API_KEY").strip(),
            concurrency=max(1, batch_size),
        )
        captioner = OpenAICompatCaptioner(settings)
        captioner.batch_size = max(1, batch_size)
        return captioner
    if backend in ("blip", "blip2", "florence2"):
        from ..engine.caption.backends.hf import HFSettings, TransformersCaptioner

        hf_settings = HFSettings(
            dtype=o.get("precision", "auto"),
            max_new_tokens=int(o.get("max_new_tokens", 40)),
            num_beams=int(o.get("num_beams", 1)),
            batch_size=batch_size,
            prompt=o.get("text_prompt", "") if backend != "florence2" else "",
            task=o.get("florence_task", "<CAPTION>"),
            allow_download=bool(o.get("allow_download", False)),
        )
        return TransformersCaptioner(backend, model, hf_settings)
    if backend == "clip_interrogator":
        from ..engine.caption.backends.interrogator import ClipInterrogator, InterrogatorSettings
        from ..engine.score.clip import list_clip_models

        sentence_backend = o.get("sentence_backend", SENTENCE_BACKENDS[0])
        clip_model = (o.get("clip_model") or "").strip()
        if not clip_model:
            found = list_clip_models()
            if not found:
                raise CaptionerError(
                    "clip_interrogator needs a full CLIP model folder in models/clip_vision (e.g. "
                    "a download of openai/clip-vit-large-patch14): none found; set clip_model"
                )
            clip_model = found[0]
        per_list = int(o.get("terms_per_list", 1))
        folder = (o.get("terms_folder") or "").strip()
        interrogator_settings = InterrogatorSettings(
            lists=tuple(split_list(o.get("term_lists", "")) or InterrogatorSettings().lists),
            top_k=per_list,
            top_k_per_list={"flavours": 3} if per_list == 1 else {},
            batch_size=batch_size,
            terms_folders=[folder] if folder else None,
        )
        sentence = (
            None if sentence_backend == "none" else make_captioner(sentence_backend, model, batch_size, **o)
        )
        try:
            return ClipInterrogator(clip_model, sentence, interrogator_settings)
        except Exception:
            if sentence is not None:
                sentence.close()
            raise
    if backend == "ensemble":
        from ..engine.caption.backends.ensemble import EnsembleCaptioner

        members = []
        try:
            for item in split_list(o.get("ensemble", "")):
                name, _, member_model = item.partition(":")
                name = name.strip()
                if name == "ensemble" or name not in BACKENDS:
                    raise CaptionerError(
                        f"ensemble member {name!r} is not a backend: one of "
                        f"{', '.join(b for b in BACKENDS if b != 'ensemble')}"
                    )
                members.append(make_captioner(name, member_model.strip(), batch_size, **o))
            return EnsembleCaptioner(members)
        except Exception:
            for member in members:
                member.close()
            raise
    raise ValueError(f"unknown caption backend {backend!r}: choose one of {', '.join(BACKENDS)}")


class CaptionImages:
    """Caption an IMAGE batch: one caption string per image."""

    DESCRIPTION = (
        "Captions each image of an IMAGE batch with the chosen backend (the same backends and options as Caption "
        "Dataset) and applies the caption rules. Outputs the captions as a list (one string per image, so "
        "downstream nodes run once per caption) and as one text with a caption per line. The model is unloaded "
        "when the node finishes."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("captions", "text")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_TOOLTIPS = ("One caption per image, in batch order (a list).", "All captions, one per line.")
    FUNCTION = "caption"

    @classmethod
    def INPUT_TYPES(cls):
        from ..engine.caption.backends.openai_compat import DEFAULT_PROMPT

        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to caption."}),
                "backend": (list(BACKENDS), {"default": "florence2", "tooltip": BACKEND_TOOLTIP}),
                "model": _model_input(),
                **_rule_inputs(),
                "batch_size": (
                    "INT",
                    {
                        "default": 8,
                        "min": 1,
                        "max": 256,
                        "step": 1,
                        "tooltip": "Images given to the model at once.",
                    },
                ),
            },
            "optional": {
                "general_threshold": (
                    "FLOAT",
                    {
                        "default": 0.35,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "wd14: confidence a general tag needs.",
                    },
                ),
                "base_url": (
                    "STRING",
                    {"default": "https://api.openai.com/v1", "tooltip": "openai: the endpoint's base URL."},
                ),
                "api_key_env": (
                    "STRING",
                    {
                        "default": "OPENAI_API_KEY",
                        "tooltip": "openai: NAME of the environment variable holding the key.",
                    },
                ),
                "prompt": (
                    "STRING",
                    {
                        "default": DEFAULT_PROMPT,
                        "multiline": True,
                        "tooltip": "openai: the instruction sent with each image.",
                    },
                ),
                **_local_backend_inputs(),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def caption(
        self,
        images,
        backend,
        model,
        trigger,
        class_tokens,
        template,
        keep_tokens,
        banned_words,
        style_tags,
        max_tokens,
        tokenizer,
        batch_size,
        node_id=None,
        **options,
    ):
        from ..engine.caption.postprocess import apply_rules

        rules = _rules(
            trigger, class_tokens, template, keep_tokens, banned_words, style_tags, max_tokens, tokenizer
        )
        total = int(images.shape[0])
        progress = bridge.control(total, node_id=node_id, label="caption images")
        captions: list[str] = []
        captioner = make_captioner(backend, model, batch_size, **options)
        try:
            step = max(1, captioner.batch_size)
            for start in range(0, total, step):
                progress.check()
                batch = [image_to_pil(images[i]) for i in range(start, min(start + step, total))]
                if captioner.max_side:
                    for image in batch:
                        image.thumbnail((captioner.max_side, captioner.max_side))
                raw = captioner.caption(batch)
                captions += [apply_rules(text, rules).text if text.strip() else "" for text in raw]
                progress.advance(len(batch))
        finally:
            captioner.close()
        text = "\n".join(captions)
        return {"ui": {"text": [text]}, "result": (captions, text)}


class CaptionReview:
    """Show a dataset's photos with their captions in the UI."""

    DESCRIPTION = (
        "Shows the accepted photos of a dataset with their captions, as preview images (temp files, like "
        "Preview Image) and the caption text under them, so you can check the captions before training. Photos "
        "without a caption are listed first when 'missing first' is on. Changes nothing."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("Each shown photo's name and caption, one per line.",)
    FUNCTION = "review"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": (
                    DATASET,
                    {"tooltip": "The captioned dataset (from Caption Dataset or Load Dataset)."},
                ),
                "max_images": (
                    "INT",
                    {"default": 48, "min": 1, "max": 1000, "step": 1, "tooltip": "How many photos to show."},
                ),
                "thumbnail_size": (
                    "INT",
                    {
                        "default": 384,
                        "min": 64,
                        "max": 2048,
                        "step": 32,
                        "tooltip": "Long side of the preview images in pixels.",
                    },
                ),
                "missing_first": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Show photos without a caption first."},
                ),
            },
        }

    def review(self, dataset, max_images, thumbnail_size, missing_first):
        import uuid

        from PIL import Image

        from ..engine.caption.sidecars import existing_caption
        from ..engine.dataset.images import read_rgb

        entries = [(entry, existing_caption(dataset, entry) or "") for entry in dataset.accepted]
        if missing_first:
            entries.sort(key=lambda item: bool(item[1]))
        prefix = uuid.uuid4().hex[:8]
        images, texts, lines = [], [], []
        for index, (entry, caption) in enumerate(entries[:max_images]):
            shown = caption or "(no caption)"
            lines.append(f"{entry.name}: {shown}")
            try:
                rgb = read_rgb(entry.file, max_side=thumbnail_size).rgb
            except Exception as exc:  # noqa: BLE001 - an unreadable photo is reported, the rest shown
                lines[-1] += f" [not shown: {exc}]"
                continue
            filename = f"review_{prefix}_{index:04d}.jpg"
            images.append(show_picture(Image.fromarray(rgb), filename, subfolder="charforge_review"))
            texts.append(f"{entry.name}: {shown}")
        missing = sum(1 for _, caption in entries if not caption)
        head = (
            f"{len(entries)} photo(s), {missing} without a caption; showing {min(len(entries), max_images)}"
        )
        report = "\n".join([head, *lines])
        return {"ui": {"images": images, "text": [head, *texts]}, "result": (report,)}


class CaptionEditor:
    """Find/replace, prepend, append or remove text in every caption of a dataset."""

    DESCRIPTION = (
        "Edits the captions of all accepted photos of a dataset at once: find and replace (words, or a regular "
        "expression), prepend or append a tag (not added twice), or remove a word or phrase; commas and spaces "
        "are tidied. With dry_run on (the default) it only shows what would change. Otherwise the new captions "
        "go into the manifest and the dataset's own .txt sidecars; files outside the dataset folder (your "
        "photos and their captions) are never touched."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_TOOLTIPS = (
        "The dataset with the edited captions (unchanged on a dry run).",
        "What changed (or would change), with before and after of the first captions.",
    )
    FUNCTION = "edit"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from ..engine.caption.editor import OPERATIONS

        return {
            "required": {
                "dataset": (DATASET, {"tooltip": "The captioned dataset."}),
                "operation": (
                    list(OPERATIONS),
                    {
                        "default": OPERATIONS[0],
                        "tooltip": "find and replace: replace 'find' by 'text'. prepend / "
                        "append: add 'text' as the first / last part. remove: "
                        "delete 'find'.",
                    },
                ),
                "find": ("STRING", {"default": "", "tooltip": "The word or phrase to find (whole words)."}),
                "text": (
                    "STRING",
                    {"default": "", "tooltip": "The replacement, or the text to prepend/append."},
                ),
                "regex": ("BOOLEAN", {"default": False, "tooltip": "'find' is a regular expression."}),
                "case_sensitive": ("BOOLEAN", {"default": False, "tooltip": "Match case when finding."}),
                "dry_run": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Only show what would change; write nothing."},
                ),
            },
        }

    def edit(self, dataset, operation, find, text, regex, case_sensitive, dry_run):
        from ..engine.caption.editor import edit_captions

        run = edit_captions(dataset, operation, find, text, regex, case_sensitive, dry_run)
        summary = run.summary()
        if dry_run:
            return {"ui": {"text": [summary]}, "result": (dataset, summary)}
        settings = {
            "operation": operation,
            "find": find,
            "text": text,
            "regex": regex,
            "case_sensitive": case_sensitive,
        }
        shown = _finish(run.manifest, "caption edit", settings, summary)
        return {"ui": {"text": [shown]}, "result": (run.manifest, summary)}


NODE_CLASS_MAPPINGS = {
    "CharForgeCaptionRules": CaptionRules,
    "CharForgeCaptionDataset": CaptionDataset,
    "CharForgeCaptionImages": CaptionImages,
    "CharForgeCaptionReview": CaptionReview,
    "CharForgeCaptionEditor": CaptionEditor,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgeCaptionRules": "Caption Rules (CharForge)",
    "CharForgeCaptionDataset": "Caption Dataset (CharForge)",
    "CharForgeCaptionImages": "Caption Images (CharForge)",
    "CharForgeCaptionReview": "Caption Review (CharForge)",
    "CharForgeCaptionEditor": "Caption Editor (CharForge)",
}
