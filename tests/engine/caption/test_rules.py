"""Caption rules: template, trigger placement, keep-tokens, cleaning, style tags, token limits."""

import pytest

from cf_testing.models import write_tiny_clip_tokenizer
from charforge.engine.caption.postprocess import (
    CaptionRules,
    apply_rules,
    approx_token_count,
    collapse_repeats,
    fill_template,
    load_tokenizer,
    split_list,
)


def rules(**kw):
    return CaptionRules(**{"trigger": "ohwx", "class_tokens": "woman", **kw})


def test_template_fills_trigger_class_and_caption():
    out = apply_rules("smiling at the beach", rules(template="a photo of {trigger} {class}, {caption}"))
    assert out.text == "a photo of ohwx woman, smiling at the beach"
    assert out.protected == 1


def test_empty_values_leave_no_stray_separators():
    assert fill_template("{trigger}, {class}, {caption}", "", "", "a cat") == "a cat"
    assert fill_template("a photo of {trigger} {class}, {caption}", "ohwx", "", "") == "a photo of ohwx"
    # a template without {caption} still keeps the caption
    assert fill_template("{trigger}", "ohwx", "", "red hat") == "ohwx, red hat"


def test_trigger_first_and_never_duplicated():
    out = apply_rules("smiling, ohwx, OHWX, a portrait of ohwx outdoors", rules(template="{caption}"))
    assert out.text.split(", ")[0] == "ohwx"
    assert out.text.lower().count("ohwx") == 1
    assert out.text == "ohwx, smiling, a portrait of outdoors"


def test_trigger_prepended_when_template_lacks_it():
    out = apply_rules("1girl, blue sky", rules(template="{caption}"))
    assert out.text == "ohwx, 1girl, blue sky"


def test_trigger_inside_template_part_is_that_part_first():
    out = apply_rules("ohwx smiling, red hat", rules(template="{caption}, photo of {trigger}"))
    # the first part holding the trigger goes first; the later one loses its copy of the trigger
    assert out.text.startswith("ohwx smiling,")
    assert out.text.lower().count("ohwx") == 1


def test_keep_tokens_follow_the_trigger_in_order():
    out = apply_rules(
        "red hat, woman, smiling, solo", rules(template="{caption}", keep_tokens=["solo", "woman"])
    )
    assert out.text == "ohwx, solo, woman, red hat, smiling"
    assert out.protected == 3


def test_cleaning_whitespace_repeats_and_banned_words():
    caption = "a  woman with long hair with long hair,\n smiling , Smiling, watermark, blurry photo of a park"
    out = apply_rules(caption, rules(template="{caption}", banned_words="watermark, blurry"))
    assert "\n" not in out.text and "  " not in out.text
    assert out.text == "ohwx, a woman with long hair, smiling, photo of a park"


def test_banned_words_are_whole_words_only():
    out = apply_rules("catwalk, cat, a cat sitting", rules(template="{caption}", banned_words=["cat"]))
    assert out.text == "ohwx, catwalk, a sitting"


def test_collapse_repeats_case_insensitive():
    assert collapse_repeats("the the The cat") == "the cat"
    assert collapse_repeats("red dress red dress red dress on stage") == "red dress on stage"
    assert collapse_repeats("no repeats here") == "no repeats here"


def test_deduplicate_can_be_switched_off():
    out = apply_rules("tag, tag", rules(template="{caption}", deduplicate=False))
    assert out.text == "ohwx, tag, tag"


def test_style_tags_appended_once():
    out = apply_rules("film grain, smiling", rules(template="{caption}", style_tags="film grain, bokeh"))
    assert out.text == "ohwx, film grain, smiling, bokeh"


def test_split_list_accepts_commas_newlines_and_lists():
    assert split_list("a, b\n c ,, ") == ["a", "b", "c"]
    assert split_list(["x ", "", " y  z"]) == ["x", "y z"]
    assert split_list(None) == []


def test_approximate_limit_drops_trailing_parts_never_the_trigger():
    caption = ", ".join(f"tag{i}" for i in range(40))
    out = apply_rules(caption, rules(template="{caption}", max_tokens=20))
    assert out.truncated and out.tokens <= 20 and not out.exact_count
    assert out.text.startswith("ohwx, tag0, tag1")
    assert approx_token_count(out.text) == out.tokens


def test_approximation_counts_long_words_and_punctuation():
    assert approx_token_count("a cat") == 2
    assert approx_token_count("photorealistic") == 3  # 14 letters -> ceil(14 / 6)
    assert approx_token_count("red, blue.") == 4


def test_long_protected_part_is_cut_by_words():
    out = apply_rules(
        "one two three four five six seven eight nine ten",
        rules(template="{trigger} {caption}", max_tokens=5),
    )
    assert out.text == "ohwx one two three four" and out.truncated


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    return str(write_tiny_clip_tokenizer(tmp_path_factory.mktemp("clip_tok")))


def test_limit_in_real_clip_tokens(clip_tokenizer_dir):
    tok = load_tokenizer(clip_tokenizer_dir)
    caption = (
        "a woman with long brown hair, wearing a red dress, standing in a sunny park, smiling at the camera"
    )
    full = apply_rules(caption, rules(template="{caption}", tokenizer=clip_tokenizer_dir))
    assert full.exact_count and not full.truncated
    assert full.tokens == len(tok(full.text, add_special_tokens=False)["input_ids"])
    limit = full.tokens // 2
    cut = apply_rules(caption, rules(template="{caption}", tokenizer=clip_tokenizer_dir, max_tokens=limit))
    assert cut.truncated and cut.exact_count
    assert len(tok(cut.text, add_special_tokens=False)["input_ids"]) == cut.tokens <= limit
    assert cut.text.startswith("ohwx, ") and full.text.startswith(cut.text)


def test_missing_tokenizer_folder_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        apply_rules("x", rules(tokenizer=str(tmp_path), max_tokens=10))
