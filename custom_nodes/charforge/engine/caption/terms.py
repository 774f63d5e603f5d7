"""Term lists for the CLIP-interrogator-style captioner: small lists written for CharForge, plus user files.

Built-in lists (in `BUILTIN`): ``mediums``, ``styles``, ``lighting``, ``framing``, ``artists`` (kept short
and generic: movements and well-known historical painters only) and ``flavours`` (descriptive words).

User lists: every ``<list name>.txt`` in a terms folder, one term per line (``#`` starts a comment, blank
lines are ignored). A file named like a built-in list adds its terms to it; any other name makes a new
list. The default terms folder is ``models/charforge/caption_terms`` (the ``charforge`` model folder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

TERMS_SUBFOLDER = "caption_terms"

BUILTIN: dict[str, tuple[str, ...]] = {
    "mediums": (
        "a photograph",
        "a studio portrait photograph",
        "a candid snapshot",
        "a film photograph",
        "a polaroid photo",
        "a digital painting",
        "an oil painting",
        "a watercolor painting",
        "a pencil sketch",
        "a charcoal drawing",
        "an ink illustration",
        "a comic book panel",
        "an anime illustration",
        "a 3d render",
        "a vector illustration",
        "a pixel art image",
        "a screenshot from a video game",
        "a still from a movie",
        "a fashion editorial photo",
        "a selfie",
    ),
    "styles": (
        "photorealistic",
        "cinematic",
        "minimalist",
        "surrealist",
        "impressionist",
        "expressionist",
        "art nouveau",
        "baroque",
        "pop art",
        "cyberpunk",
        "steampunk",
        "film noir",
        "vaporwave",
        "fantasy art",
        "concept art",
        "documentary photography",
        "street photography",
        "fine art photography",
        "high fashion",
        "vintage",
    ),
    "lighting": (
        "soft natural light",
        "golden hour light",
        "harsh midday sun",
        "studio lighting",
        "rim lighting",
        "backlit",
        "neon lighting",
        "candlelight",
        "overcast light",
        "dramatic shadows",
        "low key lighting",
        "high key lighting",
        "moonlight",
        "window light",
    ),
    "framing": (
        "a close-up portrait",
        "a headshot",
        "an upper body shot",
        "a full body shot",
        "a wide shot",
        "a profile view",
        "a three-quarter view",
        "a view from behind",
        "a low angle shot",
        "a high angle shot",
        "an over-the-shoulder shot",
        "a mirror selfie",
    ),
    "artists": (
        "in the style of impressionism",
        "in the style of renaissance painting",
        "in the style of ukiyo-e",
        "in the style of art deco posters",
        "in the style of bauhaus",
        "in the style of cubism",
        "in the style of rembrandt",
        "in the style of vermeer",
        "in the style of van gogh",
        "in the style of monet",
        "in the style of klimt",
        "in the style of mucha",
        "in the style of hokusai",
        "in the style of caravaggio",
    ),
    "flavours": (
        "detailed",
        "sharp focus",
        "shallow depth of field",
        "bokeh",
        "film grain",
        "high contrast",
        "muted colors",
        "vibrant colors",
        "pastel colors",
        "monochrome",
        "black and white",
        "warm tones",
        "cool tones",
        "soft focus",
        "motion blur",
        "lens flare",
        "symmetrical",
        "moody",
        "serene",
        "dramatic",
        "elegant",
        "cozy",
        "gritty",
        "dreamy",
        "ethereal",
        "nostalgic",
        "whimsical",
        "urban",
        "rustic",
        "outdoors",
        "indoors",
        "smiling",
        "serious expression",
        "looking at the camera",
        "looking away",
    ),
}


def parse_terms(text: str) -> list[str]:
    """Terms of a term file: one per line; blank lines and ``#`` comments ignored; duplicates kept once."""
    out: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        term = " ".join(line.split("#", 1)[0].split())
        if term and term.lower() not in seen:
            seen.add(term.lower())
            out.append(term)
    return out


def default_terms_folders() -> list[Path]:
    """``<charforge model folder>/caption_terms`` for each configured charforge folder."""
    from ... import bridge

    return [Path(folder) / TERMS_SUBFOLDER for folder in bridge.model_folders("charforge")]


def load_term_lists(
    folders: Sequence[str | os.PathLike] | None = None, builtin: bool = True
) -> dict[str, list[str]]:
    """The built-in lists merged with the ``*.txt`` lists of `folders` (default: `default_terms_folders`)."""
    lists: dict[str, list[str]] = {name: list(terms) for name, terms in BUILTIN.items()} if builtin else {}
    for folder in default_terms_folders() if folders is None else [Path(f).expanduser() for f in folders]:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.txt")):
            terms = parse_terms(path.read_text(encoding="utf-8-sig"))
            merged = lists.setdefault(path.stem, [])
            known = {t.lower() for t in merged}
            merged += [t for t in terms if t.lower() not in known]
    return {name: terms for name, terms in lists.items() if terms}
