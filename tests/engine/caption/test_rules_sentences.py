"""Caption rules for prose captions (Flux, SD3.5): T5 token counts and limits that end at a sentence end."""

import os
from pathlib import Path

import pytest

from charforge.engine.caption.postprocess import (
    T5_CAPTION_TOKENS,
    CaptionRules,
    apply_rules,
    approx_t5_token_count,
    join_sentences,
    load_tokenizer,
)

CAPTION = (
    "A young woman with long, wavy auburn hair stands in a sunlit park. She wears a cream knit sweater and "
    "dark jeans, smiling softly at the camera. Soft golden-hour light, shallow depth of field."
)
WORDS = ["a", "woman", "stands", "in", "the", "park", "she", "wears", "red", "dress", "soft", "light", "with"]


def rules(**kw):
    base = {
        "trigger": "ohwx",
        "class_tokens": "woman",
        "template": "{trigger} {class}, {caption}",
        "text_encoder": "t5",
        "sentences": True,
    }
    return CaptionRules(**{**base, **kw})


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory):
    """A small T5 tokenizer (SentencePiece unigram) saved as T5 checkpoints ship it: tokenizer.json +
    tokenizer_config.json."""
    import transformers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0), (".", -2.0), (",", -2.0)]
    pieces += [("\u2581" + w, -2.0) for w in WORDS] + [(w, -3.0) for w in WORDS]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"]
    folder = tmp_path_factory.mktemp("t5_tokenizer")
    transformers.T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(str(folder))
    return str(folder)


def test_no_limit_keeps_the_prose_with_the_trigger_first():
    out = apply_rules(CAPTION, rules())
    assert out.text == "ohwx woman, " + CAPTION
    assert not out.truncated and out.protected == 1
    assert out.tokens == approx_t5_token_count(out.text) and not out.exact_count


@pytest.mark.parametrize("limit", [60, 45, 30, 25])
def test_limit_drops_whole_sentences_from_the_end(limit):
    full = apply_rules(CAPTION, rules())
    out = apply_rules(CAPTION, rules(max_tokens=limit))
    assert out.truncated and out.tokens <= limit
    assert full.text.startswith(out.text) and out.text.endswith(".")  # a prefix that ends a sentence
    assert out.text.startswith("ohwx woman, A young woman")
    # the longest such prefix: the next sentence would not have fitted
    rest = full.text[len(out.text) :].strip()
    next_sentence = rest.split(". ")[0]
    assert approx_t5_token_count(out.text + " " + next_sentence) > limit


def test_a_first_sentence_too_long_is_cut_at_a_comma_and_closed():
    out = apply_rules(CAPTION, rules(max_tokens=20))
    assert out.text == "ohwx woman, A young woman with long." and out.tokens <= 20
    out = apply_rules("one two three four five six seven eight nine ten eleven twelve.", rules(max_tokens=8))
    assert out.text.startswith("ohwx woman, one") and out.tokens <= 8 and out.truncated
    tiny = apply_rules(CAPTION, rules(max_tokens=3))
    assert tiny.text == "ohwx woman"  # the trigger part stays, whatever the limit


def test_style_tags_and_keep_tokens_in_prose():
    styled = rules(style_tags=["film grain"], keep_tokens=["smiling"])
    out = apply_rules(CAPTION, styled)
    assert out.text.startswith("ohwx woman, smiling, A young woman")
    assert out.text.endswith("depth of field. film grain")
    styled.max_tokens = out.tokens - 1
    cut = apply_rules(CAPTION, styled)
    assert cut.text.endswith("depth of field.")  # the trailing tags go first
    assert join_sentences(["a.", "b", "c"]) == "a. b, c"


def test_exact_t5_counts_and_limit(t5_tokenizer_dir):
    tok = load_tokenizer(t5_tokenizer_dir)
    assert type(tok).__name__ == "T5Tokenizer"
    full = apply_rules(CAPTION, rules(tokenizer=t5_tokenizer_dir))
    assert full.exact_count and full.tokens == len(tok(full.text, add_special_tokens=False)["input_ids"])
    limit = full.tokens - 10
    out = apply_rules(CAPTION, rules(tokenizer=t5_tokenizer_dir, max_tokens=limit))
    assert out.exact_count and out.truncated and out.text.endswith(".")
    assert len(tok(out.text, add_special_tokens=False)["input_ids"]) == out.tokens <= limit
    assert full.text.startswith(out.text)


def test_t5_estimate_rules():
    assert T5_CAPTION_TOKENS == 511
    assert approx_t5_token_count("a woman") == 3  # 1 + ceil(5 / 4)
    assert approx_t5_token_count("photorealistic") == 4  # ceil(14 / 4)
    assert approx_t5_token_count("35mm") == 3  # digits: ceil(4 / 2) + 1
    assert approx_t5_token_count("Beksiński") == 6  # non-ASCII: ceil(9 / 2) + 1
    assert approx_t5_token_count("red, blue.") == 4
    with pytest.raises(ValueError, match="clip, t5"):
        apply_rules("x", rules(text_encoder="bert", max_tokens=5))


def test_missing_tokenizer_folder_names_both_kinds(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json / spiece.model"):
        apply_rules("x", rules(tokenizer=str(tmp_path), max_tokens=10))


def _comfy_t5() -> Path | None:
    root = os.environ.get("COMFYUI_DIR")
    folder = Path(root) / "comfy" / "text_encoders" / "t5_tokenizer" if root else None
    return folder if folder and (folder / "tokenizer.json").is_file() else None


@pytest.mark.skipif(
    _comfy_t5() is None, reason="needs a ComfyUI checkout ($COMFYUI_DIR) for the real T5 vocabulary"
)
def test_estimate_is_on_the_high_side_of_real_t5_for_prose():
    tok = load_tokenizer(str(_comfy_t5()))
    captions = [
        CAPTION,
        "A close-up portrait of a middle-aged man with a salt-and-pepper beard and round tortoiseshell glasses, "
        "wearing a navy blazer over a white shirt. He looks slightly to the left with a neutral expression.",
        "A cyclist in a bright yellow jersey rides through a rain-soaked street at night, neon signs reflecting "
        "off puddles, motion blur, 35mm lens.",
    ]
    for caption in captions:
        real = len(tok(caption, add_special_tokens=False)["input_ids"])
        assert real <= approx_t5_token_count(caption) <= 1.3 * real
