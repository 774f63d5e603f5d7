"""Retries until a storyboard frame passes: regenerate a frame with new seeds while its scores are below threshold.

After a frame is rendered and scored (Storyboard Select on the server), :func:`passes` checks it against a
:class:`RetryPolicy` -- text agreement at least ``min_text`` on the CLIPScore scale (2.5 x max(CLIP cosine, 0),
Hessel et al.; 0.70 is a cosine of 0.28) when CLIP was measured, identity at least ``min_identity`` when that is
set (the character's threshold, else :data:`SAME_PERSON`). A frame that fails is queued again with
:func:`attempt_seed` (the frame seed and the attempt number, so a rerun makes the same attempts), up to
``retries`` more times. The best attempt is kept (a passing one first, then the highest score sum), and every
attempt -- seed, scores, passed, its image file -- is recorded on the frame (``StoryFrame.attempts``); a frame
none of whose attempts passed has ``passed = False`` and is marked on the sheet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED_STRIDE = 1_000_003  # attempt n of a frame: frame seed + n * stride (never another frame's seed)
SEED_LIMIT = 2**64  # ComfyUI's KSampler seed range
CLIPSCORE_SCALE = (
    2.5  # CLIPScore = 2.5 x max(cosine, 0), as Combine Scores rescales it (engine/score/select.py)
)
MAX_MIN_TEXT = CLIPSCORE_SCALE  # the highest CLIPScore there is (a cosine of 1)
# ArcFace cosine for "the same person at all" (engine/score/identity.py ARCFACE_SAME_PERSON, docs/scoring.md):
# the identity threshold when neither the user nor the character gives one
SAME_PERSON = 0.32


@dataclass
class RetryPolicy:
    retries: int = 2  # regenerations after the first attempt; 0 disables retrying
    min_text: float | None = 0.70  # CLIPScore (2.5 x CLIP cosine) text agreement; None: not checked
    min_identity: float | None = None  # identity to the character; None: not checked

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, got {self.retries}")
        if self.min_text is not None and not 0.0 <= self.min_text <= MAX_MIN_TEXT:
            raise ValueError(
                f"the text threshold is a CLIPScore (2.5 x CLIP cosine) from 0 to {MAX_MIN_TEXT:g}, "
                f"got {self.min_text}"
            )
        if self.min_identity is not None and not -1.0 <= self.min_identity <= 1.0:
            raise ValueError(f"the identity threshold is a cosine from -1 to 1, got {self.min_identity}")


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of attempt `attempt` (0 = the frame's own seed) of a frame whose seed is `seed`."""
    return (seed + attempt * SEED_STRIDE) % SEED_LIMIT


def clipscore(cosine: float | None) -> float | None:
    """CLIPScore of a CLIP image-text cosine: 2.5 x max(cosine, 0); None stays None."""
    return None if cosine is None else round(CLIPSCORE_SCALE * max(cosine, 0.0), 4)


def score_failures(identity: float | None, text: float | None, policy: RetryPolicy) -> list[str]:
    """Why an image with identity similarity `identity` and CLIP cosine `text` is below the thresholds; empty
    when it passes. Unmeasured text is not a failure; no identity (no face) fails an identity threshold."""
    why = []
    score = clipscore(text)
    if policy.min_text is not None and score is not None and score < policy.min_text:
        why.append(f"CLIPScore {score:.2f} < {policy.min_text:.2f} (cosine {text:.3f})")
    if policy.min_identity is not None:
        if identity is None:
            why.append("no face")
        elif identity < policy.min_identity:
            why.append(f"identity {identity:.2f} < {policy.min_identity:.2f}")
    return why


def failures(frame: Any, policy: RetryPolicy) -> list[str]:
    """Why `frame` (a StoryFrame: ``identity``, ``text``) is below threshold; empty when it passes."""
    return score_failures(frame.identity, frame.text, policy)


def passes(frame: Any, policy: RetryPolicy) -> bool:
    return not failures(frame, policy)


def rank(identity: float | None, text: float | None, passed: bool) -> tuple:
    """Which attempt to keep: a passing one first, then the highest identity + CLIP cosine."""
    return (passed, (identity or 0.0) + (text or 0.0))


def _rank(frame: Any, passed: bool) -> tuple:
    return rank(frame.identity, frame.text, passed)


def best_of_attempts(
    render: Callable[[int, int, str], Any],
    seed: int,
    policy: RetryPolicy,
    folder: Path,
    image_name: str,
) -> Any:
    """Render a frame (``render(seed, attempt, file_name)`` returns the scored StoryFrame whose image it wrote
    under `folder` as `file_name`) until it passes or the retries are spent; returns the best attempt's frame,
    its image copied to `image_name` (after more than one attempt each is kept as ``<stem>_tryK.png``), with every attempt in ``attempts`` and ``passed`` set."""
    stem = Path(image_name).stem
    tried: list[tuple[Any, bool]] = []
    records: list[dict[str, Any]] = []
    for attempt in range(policy.retries + 1):
        name = image_name if attempt == 0 else f"{stem}_try{attempt + 1}.png"
        frame = render(attempt_seed(seed, attempt), attempt, name)
        why = failures(frame, policy)
        tried.append((frame, not why))
        records.append(
            {
                "attempt": attempt + 1,
                "seed": frame.seed,
                "identity": frame.identity,
                "text": frame.text,
                "clipscore": clipscore(frame.text),
                "guide_identity": frame.guide_identity,
                "passed": not why,
                "why": "; ".join(why),
                "image": name,
            }
        )
        if not why:
            break
    best, passed = max(tried, key=lambda item: _rank(*item))
    if len(records) > 1:  # every attempt keeps its file; the kept one is also the frame's image
        first = folder / image_name
        shutil.copyfile(first, folder / f"{stem}_try1.png")
        records[0]["image"] = f"{stem}_try1.png"
        if best.image != image_name:
            shutil.copyfile(folder / best.image, first)
            best.image = image_name
    best.attempts = records
    best.passed = passed
    if len(records) > 1:
        kept = next(r["attempt"] for r in records if r["seed"] == best.seed)
        best.note = "; ".join(
            n
            for n in [
                best.note,
                f"attempt {kept} of {len(records)} kept" + ("" if passed else ", none passed"),
            ]
            if n
        )
    return best


class AttemptJournal:
    """The attempts a storyboard folder has already rendered, so a rerun into the same ``--out`` does not queue
    them again: ``.attempts/journal.json`` maps a key of the frame graph (the run id left out) to the scored
    frame record, and ``.attempts/<key>.png`` keeps that attempt's image."""

    def __init__(self, folder: Path) -> None:
        self.dir = Path(folder) / ".attempts"
        self.path = self.dir / "journal.json"
        self.entries: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.entries = {}  # an unreadable journal: the attempts are rendered again

    @staticmethod
    def key(graph: dict[str, Any], run_id: str) -> str:
        text = json.dumps(graph, sort_keys=True, ensure_ascii=False).replace(run_id, "")
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]

    def get(self, key: str) -> tuple[dict[str, Any], Path] | None:
        entry = self.entries.get(key)
        image = self.dir / f"{key}.png"
        return (entry, image) if entry is not None and image.is_file() else None

    def put(self, key: str, frame: dict[str, Any], image: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, self.dir / f"{key}.png")
        self.entries[key] = frame
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(temporary, self.path)
