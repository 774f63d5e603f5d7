"""Tiny vision-language captioners in their real on-disk formats, built for the tests (no downloads).

- `write_tiny_qwen25vl`: a `Qwen2_5_VLForConditionalGeneration` (windowed ViT with 2x2 patch merging, a
  Qwen2 language model with multimodal rotary positions) and its `Qwen2_5_VLProcessor`: a
  `Qwen2VLImageProcessor` sized to a few 28-pixel cells (so photos of different shapes give different
  numbers of image tokens, which is what makes left padding matter), a byte-level BPE tokenizer with
  Qwen's special tokens (``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>`` ...) and a chat
  template in Qwen's ChatML format.
- `write_tiny_llava`: a `LlavaForConditionalGeneration` laid out like JoyCaption Beta One (a SigLIP
  vision tower, every patch kept, a Llama language model) and its `LlavaProcessor` with a Llama-3-style
  tokenizer (``<|begin_of_text|>`` added by the tokenizer's post-processor, header and end-of-turn
  tokens) and a chat template that puts ``<image>`` at the start of the first user turn, as JoyCaption's does.

Both are written as ``save_pretrained`` writes them (config.json, generation_config.json,
model.safetensors, tokenizer.json + tokenizer_config.json, the processor's configs and chat template).
The tokenizers are made with the `tokenizers` library: a byte-level BPE over the 256 byte symbols plus
some merges and whole words, then the special tokens. Seeded; a few hundred kilobytes; under a second.
"""

from __future__ import annotations

from pathlib import Path

from .models import _byte_symbols

WORDS = (
    "a",
    "the",
    "woman",
    "man",
    "person",
    "red",
    "blue",
    "green",
    "square",
    "stands",
    "in",
    "with",
    "long",
    "hair",
    "sky",
    "and",
    "on",
    "smiling",
    "wearing",
    "shirt",
    "dress",
    "park",
    "light",
    "soft",
    "photo",
    "she",
    "he",
    "is",
    "of",
    "front",
)

# ChatML as Qwen2.5-VL renders it: a default system turn, each image as vision-start, image pad, vision-end
# inside the user turn, then the text; the generation prompt opens the assistant turn.
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Llama-3 turns; the first user turn starts with the image token: JoyCaption's model card passes the
# conversation as plain strings, so its template must add the token. No begin-of-text: the tokenizer adds it.
LLAVA_CHAT_TEMPLATE = (
    "{% set seen = namespace(image=false) %}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'user' and not seen.image %}<image>{% set seen.image = true %}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] | trim }}"
    "{% endfor %}{% endif %}"
    "<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<image>",
)


def _byte_level_bpe(specials: tuple[str, ...], bos: str | None = None):
    """A `tokenizers.Tokenizer`: byte-level BPE over the byte symbols, a few merges, the test words (with the
    leading-space symbol), then `specials` as special tokens; `bos` is prepended by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    space = "\u0120"
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for symbol in _byte_symbols():
        vocab.setdefault(symbol, len(vocab))

    def add_word(word: str) -> None:
        # a merge chain left to right: w + o -> wo, wo + m -> wom, ...
        pieces = list(word)
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if merged not in vocab:
                merges.append((current, piece))
                vocab[merged] = len(vocab)
            current = merged

    for word in WORDS:
        add_word(word)
        merges.append((space, word))  # " woman" is one token, as in the real vocabularies
        vocab.setdefault(space + word, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(specials))
    if bos is not None:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


TINY_QWEN_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},  # head_dim 8: 4 rotary pairs
    "initializer_range": 0.2,  # at the real 0.02 a model this small ignores the image: every caption alike
}
TINY_QWEN_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 4,
    "out_hidden_size": 32,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 56,
    "fullatt_block_indexes": [1],
    "initializer_range": 0.2,
}


def _save_random(folder: Path, model_class, config, generation: dict, processor, seed: int) -> Path:
    """`model_class(config)` with random weights from `seed`, greedy decoding with the `generation` token ids,
    saved with `processor` in `folder`."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(**generation, do_sample=False)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def write_tiny_qwen25vl(folder: str | Path, seed: int = 0, max_cells: int = 9) -> Path:
    """A tiny `Qwen2_5_VLForConditionalGeneration` + `Qwen2_5_VLProcessor` in `folder`.

    Images are resized to at most `max_cells` cells of 28x28 pixels (one cell = one image token after the
    2x2 merge), keeping their aspect ratio, as the real processor does with its pixel budget."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = _byte_level_bpe(QWEN_SPECIALS)
    tokenizer = Qwen2Tokenizer(tokenizer_object=backend, unk_token=None, pad_token="<|endoftext|>")
    tokenizer.eos_token = "<|im_end|>"
    ids = {token: backend.token_to_id(token) for token in QWEN_SPECIALS}
    cell = 28
    pixels = {
        "min_pixels": cell * cell,
        "max_pixels": max_cells * cell * cell,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
    }
    image_processor = Qwen2VLImageProcessor(**pixels)
    video_processor = Qwen2VLVideoProcessor(**pixels)
    config = Qwen2_5_VLConfig(
        text_config={
            **TINY_QWEN_TEXT,
            "vocab_size": backend.get_vocab_size(),
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config=TINY_QWEN_VISION,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return _save_random(folder, Qwen2_5_VLForConditionalGeneration, config, generation, processor, seed)


TINY_SIGLIP = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rope_theta": 500000.0,
}


def write_tiny_llava(folder: str | Path, seed: int = 0) -> Path:
    """A tiny `LlavaForConditionalGeneration` shaped like JoyCaption (SigLIP vision tower, all patches kept
    with ``vision_feature_select_strategy="full"``, a Llama text model) + `LlavaProcessor` in `folder`."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
        SiglipImageProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = _byte_level_bpe(LLAMA3_SPECIALS, bos="<|begin_of_text|>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    ids = {token: backend.token_to_id(token) for token in LLAMA3_SPECIALS}
    size = TINY_SIGLIP["image_size"]
    image_processor = SiglipImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    config = LlavaConfig(
        vision_config=TINY_SIGLIP,
        text_config={
            **TINY_LLAMA,
            "vocab_size": backend.get_vocab_size(),
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
            "pad_token_id": ids["<|finetune_right_pad_id|>"],
        },
        image_token_index=ids["<image>"],
        image_seq_length=(size // TINY_SIGLIP["patch_size"]) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-2,
    )
    generation = {
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
        "pad_token_id": ids["<|finetune_right_pad_id|>"],
    }
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY_SIGLIP["patch_size"],
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return _save_random(folder, LlavaForConditionalGeneration, config, generation, processor, seed)
