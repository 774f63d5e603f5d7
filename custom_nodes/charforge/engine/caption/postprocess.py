"""Caption rules: template, trigger and keep-tokens first, cleaning, style tags, a token-length limit.

Pure functions on strings; `CaptionRules` holds the options. The order of `apply_rules`:

1. one line: newlines and runs of whitespace become one space;
2. template: ``{trigger}``, ``{class}`` and ``{caption}`` are filled in (an empty value leaves no stray
   comma or space behind), e.g. ``"a photo of {trigger} {class}, {caption}"``;
3. the text is split into comma-separated parts (the unit kohya's ``keep_tokens`` and tag shuffling use);
4. cleaning: banned words and phrases are removed (whole words, case-insensitive), a phrase repeated back
   to back inside a part is kept once ("long hair with long hair" -> "long hair"), and repeated parts are
   kept once, case-insensitively, the first occurrence winning;
5. front: the part that holds the trigger word goes first (the trigger becomes its own first part when
   the template did not place it), and every other occurrence of the trigger is removed, so it is never
   duplicated; then the keep-tokens in the order given; these leading parts are *protected*;
6. style tags are appended (skipping ones already present);
7. length: while the caption is longer than `max_tokens`, whole parts are dropped from the end (never a
   protected one); if the protected parts alone are still too long, words are cut from the end.
   With ``sentences`` (captions written as prose, for T5-conditioned bases such as Flux and SD3.5) whole
   sentences are dropped from the end instead, so the caption ends at a sentence end; only when not even
   the first sentence fits is that one cut, at its last comma that fits (then at a word), and closed with
   a full stop.

Token counts use a CLIP tokenizer folder (``vocab.json`` + ``merges.txt``, loaded with transformers'
``CLIPTokenizer``) when `tokenizer` is given, not counting the start and end tokens (CLIP's 77-token
context leaves 75 for the caption). Without one, `approx_token_count` estimates: each run of letters and
digits counts ceil(length / 6) tokens (CLIP's BPE splits long and rare words) and each punctuation mark
one token. The estimate is usually within about 20 % of CLIP's count on English captions; give the
tokenizer for an exact limit.

With ``text_encoder="t5"`` the limit counts T5 tokens (Flux and SD3.5 read captions through T5, whose
512-token context leaves 511 for the caption before its end token). A T5 tokenizer folder
(``tokenizer.json`` or ``spiece.model``, e.g. ComfyUI's ``comfy/text_encoders/t5_tokenizer`` or a diffusers
Flux model's ``tokenizer_2``) counts exactly; without one `approx_t5_token_count` estimates on the safe side
for English prose: ceil(length / 4) per ordinary word, ceil(length / 2) + 1 per word with digits, inner
capitals or non-ASCII letters (T5 splits those finely), one per punctuation mark. On prose captions it
over-counts T5 by 10-26 %; made-up words (a trigger such as ``ohwx``) can be split into single letters and
counted low, so give the tokenizer for an exact limit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

CLIP_CAPTION_TOKENS = 75  # 77-token context minus start and end tokens
T5_CAPTION_TOKENS = 511  # 512-token context minus the end token (Flux.1-dev, SD3.5)
TEXT_ENCODERS = ("clip", "t5")
DEFAULT_TEMPLATE = "{trigger}, {caption}"

_WORD_OR_MARK = re.compile(r"[^\W_]+|[^\w\s]|_", re.UNICODE)


@dataclass
class CaptionRules:
    """Options of `apply_rules` (see the module docstring for the order they act in)."""

    trigger: str = ""
    class_tokens: str = ""
    template: str = DEFAULT_TEMPLATE
    keep_tokens: list[str] = field(default_factory=list)  # kept right after the trigger, in this order
    banned_words: list[str] = field(default_factory=list)  # words or phrases removed, case-insensitive
    style_tags: list[str] = field(default_factory=list)  # appended at the end
    deduplicate: bool = True
    max_tokens: int = 0  # 0: no limit
    tokenizer: str | None = None  # a CLIP or T5 tokenizer folder; None: word-count approximation
    text_encoder: str = "clip"  # whose tokens max_tokens counts without a tokenizer folder: clip | t5
    sentences: bool = False  # prose captions: the limit drops whole sentences (see step 7)


@dataclass
class RuledCaption:
    """A caption after the rules, with what `apply_rules` did to it."""

    text: str
    tokens: int  # length in the tokens of the configured tokenizer (or the approximation)
    protected: int  # leading comma-separated parts kept in front (kohya's keep_tokens)
    truncated: bool = False
    exact_count: bool = False  # True when a real tokenizer counted


def split_list(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """A comma- or newline-separated widget value (or a list) as a list of non-empty stripped items."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else re.split(r"[,\n]", value)
    return [" ".join(str(item).split()) for item in items if str(item).strip()]


def one_line(text: str) -> str:
    """Every newline, tab and run of spaces becomes one space; no leading or trailing space."""
    return " ".join((text or "").split())


def fill_template(template: str, trigger: str, class_tokens: str, caption: str) -> str:
    """Fill ``{trigger}``, ``{class}`` and ``{caption}``; empty values leave no stray separators.

    A template without ``{caption}`` gets the caption appended after a comma (the caption is never lost).
    Other braces are left as they are.
    """
    template = template or DEFAULT_TEMPLATE
    if "{caption}" not in template:
        template = template.rstrip(", ") + ", {caption}"
    values = {"trigger": one_line(trigger), "class": one_line(class_tokens), "caption": one_line(caption)}
    text = re.sub(r"\{(trigger|class|caption)\}", lambda m: values[m.group(1)], template)
    return _tidy(text)


def _tidy(text: str) -> str:
    text = one_line(text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)  # no space before punctuation
    text = re.sub(r",(\s*,)+", ",", text)  # empty parts
    text = re.sub(r",(?=\S)", ", ", text)
    return text.strip(" ,")


def split_parts(text: str) -> list[str]:
    return [part for part in (one_line(p) for p in text.split(",")) if part]


def join_parts(parts: list[str]) -> str:
    return ", ".join(parts)


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in phrase.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def remove_banned(part: str, banned: list[str]) -> str:
    """`part` without the banned words or phrases (whole words, case-insensitive)."""
    for phrase in banned:
        if phrase.strip():
            part = _phrase_pattern(phrase).sub(" ", part)
    return _tidy(part)


def collapse_repeats(part: str, longest: int = 8) -> str:
    """A phrase of 1..`longest` words repeated back to back is kept once, case-insensitively."""
    words = part.split()
    changed = True
    while changed:
        changed = False
        for size in range(1, min(longest, len(words) // 2) + 1):
            i = 0
            while i + 2 * size <= len(words):
                first = [w.lower() for w in words[i : i + size]]
                second = [w.lower() for w in words[i + size : i + 2 * size]]
                if first == second:
                    del words[i + size : i + 2 * size]
                    changed = True
                else:
                    i += 1
    return " ".join(words)


def dedupe_parts(parts: list[str]) -> list[str]:
    """Repeated parts kept once, case-insensitively; the first occurrence keeps its place and spelling."""
    seen, kept = set(), []
    for part in parts:
        key = part.lower()
        if key not in seen:
            seen.add(key)
            kept.append(part)
    return kept


def _contains_word(part: str, word: str) -> bool:
    return bool(word) and _phrase_pattern(word).search(part) is not None


def put_front(parts: list[str], trigger: str, keep_tokens: list[str]) -> tuple[list[str], int]:
    """Trigger part first (never duplicated), then the keep-tokens; returns the parts and how many lead."""
    trigger = one_line(trigger)
    front: list[str] = []
    rest = list(parts)
    if trigger:
        holder = next((i for i, p in enumerate(rest) if _contains_word(p, trigger)), None)
        if holder is None:
            front.append(trigger)
        else:
            front.append(rest.pop(holder))
        # every other occurrence goes: parts that are just the trigger, and the word inside other parts
        pattern = _phrase_pattern(trigger)
        rest = [p for p in (_tidy(pattern.sub(" ", p)) for p in rest) if p]
    for token in keep_tokens:
        low = token.lower()
        if low == trigger.lower() or any(p.lower() == low for p in front):
            continue
        rest = [p for p in rest if p.lower() != low]
        front.append(token)
    return front + rest, len(front)


# ------------------------------------------------------------------------------------------ tokens


def approx_token_count(text: str) -> int:
    """Estimated CLIP tokens: ceil(len / 6) per run of letters/digits, one per punctuation mark."""
    return sum(
        math.ceil(len(m.group()) / 6) if m.group()[0].isalnum() else 1 for m in _WORD_OR_MARK.finditer(text)
    )


def _fine_word(word: str) -> bool:
    """A word T5 splits finely: digits, capitals after the first letter, or non-ASCII letters."""
    return any(c.isdigit() for c in word) or any(c.isupper() for c in word[1:]) or not word.isascii()


def approx_t5_token_count(text: str) -> int:
    """Estimated T5 tokens, on the high side for prose (see the module docstring)."""
    total = 0
    for m in _WORD_OR_MARK.finditer(text):
        word = m.group()
        if not word[0].isalnum():
            total += 1
        elif _fine_word(word):
            total += math.ceil(len(word) / 2) + 1
        else:
            total += math.ceil(len(word) / 4)
    return total


@lru_cache(maxsize=4)
def load_tokenizer(folder: str):
    """The tokenizer in `folder` (cached): a transformers ``CLIPTokenizer`` when it has ``vocab.json`` and
    ``merges.txt``, else a T5 tokenizer from ``tokenizer.json`` or ``spiece.model``."""
    from ...deps import require

    path = Path(folder).expanduser()
    transformers = require("transformers")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return transformers.CLIPTokenizer.from_pretrained(str(path))
    if (path / "tokenizer.json").is_file() or (path / "spiece.model").is_file():
        if (path / "tokenizer_config.json").is_file():
            return transformers.AutoTokenizer.from_pretrained(str(path))
        if (path / "tokenizer.json").is_file():
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        return transformers.T5Tokenizer(str(path / "spiece.model"))
    raise FileNotFoundError(
        f"tokenizer folder {str(path)!r} needs vocab.json and merges.txt (a CLIP tokenizer, e.g. the "
        "'tokenizer' folder of a diffusers SD1.5/SDXL model) or tokenizer.json / spiece.model (a T5 tokenizer, "
        "e.g. ComfyUI's comfy/text_encoders/t5_tokenizer or the 'tokenizer_2' folder of a diffusers Flux model)"
    )


def token_counter(tokenizer: str | None, text_encoder: str = "clip"):
    """A function text -> token count, and whether it is exact (a real tokenizer). Without a tokenizer
    folder, the estimate for `text_encoder` ("clip" or "t5")."""
    if text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"text encoder {text_encoder!r} is not one of {', '.join(TEXT_ENCODERS)}")
    if not tokenizer:
        return (approx_t5_token_count if text_encoder == "t5" else approx_token_count), False
    tok = load_tokenizer(str(tokenizer))

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count, True


def limit_tokens(
    parts: list[str], protected: int, max_tokens: int, count, trigger: str = "", join=join_parts
) -> tuple[list[str], bool]:
    """Drop unprotected parts from the end, then words, until ``count(join(parts)) <= max_tokens``.

    Words are never cut up to and including the trigger word (a caption must keep its trigger even when
    the trigger alone is longer than the limit)."""
    if max_tokens <= 0 or count(join(parts)) <= max_tokens:
        return parts, False
    parts = list(parts)
    while len(parts) > max(protected, 1) and count(join(parts)) > max_tokens:
        parts.pop()
    text = join(parts)
    if count(text) > max_tokens:
        words = text.split(" ")
        keep_min = 1
        if trigger:
            pattern = _phrase_pattern(trigger)
            for index in range(len(words)):
                if pattern.search(" ".join(words[: index + 1])):
                    keep_min = index + 1
                    break
        lo, hi = keep_min, len(words)
        while lo < hi:  # longest word prefix that fits
            mid = (lo + hi + 1) // 2
            if count(" ".join(words[:mid]).rstrip(",")) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        parts = split_parts(" ".join(words[:lo]).rstrip(","))
    return parts, True


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def join_sentences(parts: list[str]) -> str:
    """Parts joined by ", ", except after a part that ends a sentence (then one space)."""
    text = ""
    for part in parts:
        text += part if not text else (" " if text[-1] in ".!?" else ", ") + part
    return text


def limit_sentences(
    parts: list[str], protected: int, max_tokens: int, count, trigger: str = ""
) -> tuple[list[str], bool]:
    """Drop whole sentences from the end until ``count(join_sentences(parts)) <= max_tokens``; the protected
    parts always stay. When not even the first sentence fits, it is cut at its last comma that fits (then at
    a word, as `limit_tokens` does) and ends with a full stop when that still fits."""
    if max_tokens <= 0 or count(join_sentences(parts)) <= max_tokens:
        return parts, False
    head = parts[:protected]
    sentences = [s for s in _SENTENCE_END.split(join_sentences(parts[protected:])) if s]
    for n in range(len(sentences) - 1, 0, -1):
        candidate = head + split_parts(" ".join(sentences[:n]))
        if count(join_sentences(candidate)) <= max_tokens:
            return candidate, True
    cut = head + (split_parts(sentences[0]) if sentences else [])
    while len(cut) > protected + 1 and count(join_sentences(cut)) > max_tokens:
        cut.pop()  # the first sentence's clauses, from the end; its first clause is cut by words if need be
    cut, _ = limit_tokens(cut, len(cut), max_tokens, count, trigger, join=join_sentences)
    if len(cut) > protected and cut[-1][-1] not in ".!?":
        closed = [*cut[:-1], cut[-1] + "."]
        if count(join_sentences(closed)) <= max_tokens:
            cut = closed
    return cut, True


# ------------------------------------------------------------------------------------------ all rules


def apply_rules(caption: str, rules: CaptionRules) -> RuledCaption:
    """Apply every rule to one caption (see the module docstring for the order)."""
    text = fill_template(rules.template, rules.trigger, rules.class_tokens, caption)
    banned = split_list(rules.banned_words)
    trigger = one_line(rules.trigger)
    parts = []
    for part in split_parts(text):
        if banned and not (trigger and part.lower() == trigger.lower()):
            part = remove_banned(part, banned)
        if rules.deduplicate:
            part = collapse_repeats(part)
        if part:
            parts.append(part)
    if rules.deduplicate:
        parts = dedupe_parts(parts)
    parts, protected = put_front(parts, trigger, split_list(rules.keep_tokens))
    present = {p.lower() for p in parts}
    for tag in split_list(rules.style_tags):
        if tag.lower() not in present:
            parts.append(tag)
            present.add(tag.lower())
    count, exact = token_counter(rules.tokenizer, rules.text_encoder)
    if rules.sentences:
        parts, truncated = limit_sentences(parts, protected, rules.max_tokens, count, trigger)
        final = join_sentences(parts)
    else:
        parts, truncated = limit_tokens(parts, protected, rules.max_tokens, count, trigger)
        final = join_parts(parts)
    return RuledCaption(final, count(final), min(protected, len(parts)), truncated, exact)


def apply_rules_text(caption: str, rules: CaptionRules) -> str:
    return apply_rules(caption, rules).text
