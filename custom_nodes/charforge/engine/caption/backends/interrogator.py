"""CLIP-interrogator-style captioner: a sentence caption plus the best-matching terms from term lists.

For each image, a sentence backend (BLIP, BLIP-2, Florence-2, ...; optional) writes the caption, then a
full CLIP model (the one the CLIP score uses, from ``models/clip_vision/<name>/``, see
`charforge.engine.score.clip`) ranks the terms of each chosen list (`charforge.engine.caption.terms`) by
the cosine similarity between the image and the term's text, and the `top_k` best of each list are
appended, list by list in the order given: ``"<caption>, <medium>, <framing>, <style>, <flavour>, ..."``.
Term embeddings are computed once per list and kept while the captioner is open.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import Captioner, CaptionerError

DEFAULT_LISTS = ("mediums", "framing", "lighting", "styles", "flavours")


@dataclass
class InterrogatorSettings:
    lists: tuple[str, ...] = DEFAULT_LISTS  # term lists used, in output order
    top_k: int = 1  # terms taken from each list
    top_k_per_list: dict[str, int] = field(default_factory=lambda: {"flavours": 3})
    min_similarity: float | None = None  # a term needs at least this cosine (None: always take top_k)
    terms_folders: list[str] | None = None  # None: models/charforge/caption_terms
    batch_size: int = 8
    device: str = ""
    half: bool | None = None  # fp16 on GPU unless False


class ClipInterrogator(Captioner):
    """Caption (from `sentence`, optional) + best CLIP-matching terms of each term list."""

    name = "clip_interrogator"

    def __init__(
        self,
        clip_model: str,
        sentence: Captioner | None = None,
        settings: InterrogatorSettings | None = None,
        scorer: Any = None,
    ):
        from ...score.clip import ClipScorer, default_device
        from ..terms import load_term_lists

        self.settings = s = settings or InterrogatorSettings()
        self.sentence = sentence
        cached = {id(v) for v in ClipScorer._cache.values()}
        try:
            self.scorer = scorer or ClipScorer.load(
                clip_model, device=s.device or default_device(), half=s.half
            )
        except FileNotFoundError as exc:
            raise CaptionerError(str(exc)) from exc
        # A CLIP model this captioner loaded is unloaded by `close()`; one the CLIP score nodes already
        # had loaded stays theirs.
        self._owns_scorer = scorer is None and id(self.scorer) not in cached
        available = load_term_lists(s.terms_folders)
        missing = [name for name in s.lists if name not in available]
        if missing:
            raise CaptionerError(
                f"unknown term list(s) {', '.join(missing)}: available are "
                f"{', '.join(sorted(available))} (add <name>.txt files to a terms folder)"
            )
        self.lists = {name: available[name] for name in s.lists}
        self.batch_size = max(1, min(s.batch_size, sentence.batch_size if sentence else s.batch_size))
        self.max_side = None
        self._term_embeddings: dict[str, Any] = {}

    def _embeddings(self, name: str):
        if name not in self._term_embeddings:
            import torch

            terms = self.lists[name]
            chunks = [self.scorer.embed_texts(terms[i : i + 256]) for i in range(0, len(terms), 256)]
            self._term_embeddings[name] = torch.cat(chunks)
        return self._term_embeddings[name]

    def _pixels(self, images: list[Any]):
        """PIL images -> a [B, H, W, 3] 0..1 tensor already resized and cropped as the CLIP model wants."""
        import numpy as np
        import torch
        from PIL import Image

        pre = self.scorer.preprocess
        arrays = []
        for image in images:
            image = image.convert("RGB")
            scale = pre.size / min(image.size)
            width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            crop_h, crop_w = pre.crop
            left, top = max(0, (width - crop_w) // 2), max(0, (height - crop_h) // 2)
            arrays.append(
                np.asarray(image.crop((left, top, left + crop_w, top + crop_h)), dtype=np.float32) / 255.0
            )
        return torch.from_numpy(np.stack(arrays))

    def rank(self, images: list[Any]) -> list[dict[str, list[tuple[str, float]]]]:
        """Per image, per list: every term with its cosine similarity, best first."""
        embeds = self.scorer.embed_images(self._pixels(images), batch_size=self.batch_size)
        out: list[dict[str, list[tuple[str, float]]]] = [{} for _ in images]
        for name, terms in self.lists.items():
            sims = (embeds @ self._embeddings(name).T).float().cpu()
            for i in range(len(images)):
                order = sims[i].argsort(descending=True).tolist()
                out[i][name] = [(terms[j], float(sims[i, j])) for j in order]
        return out

    def terms_for(self, ranked: dict[str, list[tuple[str, float]]]) -> list[str]:
        s = self.settings
        chosen: list[str] = []
        for name in self.lists:
            k = s.top_k_per_list.get(name, s.top_k)
            best = [
                term
                for term, sim in ranked[name][: max(0, k)]
                if s.min_similarity is None or sim >= s.min_similarity
            ]
            chosen += best
        return chosen

    def caption(self, images: list[Any]) -> list[str]:
        if not images:
            return []
        sentences = [""] * len(images)
        if self.sentence:
            sentences = self.sentence.caption(images)
            if len(sentences) != len(images):
                raise CaptionerError(
                    f"{self.sentence.name} returned {len(sentences)} captions for {len(images)} images"
                )
        out = []
        for sentence, ranked in zip(sentences, self.rank(images), strict=True):
            parts = ([sentence.strip()] if sentence and sentence.strip() else []) + self.terms_for(ranked)
            out.append(", ".join(parts))
        return out

    def notes(self) -> list[str]:
        notes = self.sentence.notes() if self.sentence else []
        return notes + [f"CLIP terms from {self.scorer.name}: lists {', '.join(self.lists)}"]

    def close(self) -> None:
        self._term_embeddings.clear()
        if self.sentence is not None:
            self.sentence.close()
        if getattr(self, "_owns_scorer", False):
            from ...score.clip import ClipScorer

            with ClipScorer._lock:
                for key in [k for k, v in ClipScorer._cache.items() if v is self.scorer]:
                    del ClipScorer._cache[key]
            self._owns_scorer = False
            if str(self.scorer.device).startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
