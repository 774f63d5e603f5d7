"""The storyboard record: one entry per frame (prompt, seed, the candidate kept, its scores, the image file)
plus the run's mode, models and settings, saved as ``metadata.json`` next to the frames."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..score.sheet import json_safe

FORMAT = "charforge.storyboard"
VERSION = 1
MODES = ("simple", "reference", "base")
MODE_LABELS = {
    "simple": "simple (character LoRA, best of N)",
    "reference": "reference-guided (frame 1 guides the rest)",
    "base": "base model without LoRA",
}
# How a reference-guided storyboard was guided (``charforge story --guidance``), as its label says it.
GUIDANCE_LABELS = {
    "ipadapter": "IP-Adapter (frame 1 guides the rest)",
    "faceid": "IP-Adapter FaceID (the character's identity)",
    "instantid": "InstantID (the character's identity and face keypoints)",
    "img2img": "image-to-image from frame 1",
}


@dataclass
class StoryFrame:
    """One frame. Scores are None when not measured (no CLIP model) or when the image shows no face."""

    index: int  # 0-based position in the story
    prompt: str  # the prompt the frame was generated from
    caption: str = ""
    seed: int | None = None
    candidates: int = 1
    chosen: int = 0  # which candidate (batch position) was kept
    identity: float | None = None  # similarity to the character's identity
    text: float | None = None  # CLIP cosine with the prompt (text agreement)
    guide_identity: float | None = None  # similarity to frame 1 (reference-guided mode)
    combined: float | None = None  # the value the candidate was selected by
    image: str = ""  # file name, relative to the storyboard folder
    guidance: str = ""  # how the frame was guided: "", "ipadapter", "faceid", "instantid", "img2img"
    pose: str = ""  # the pose reference the frame followed (pose ControlNet), "" for none
    note: str = ""
    candidate_scores: list[dict[str, Any]] = field(default_factory=list)
    # retries (charforge story --retries): every attempt's seed, scores and whether it passed the thresholds
    attempts: list[dict[str, Any]] = field(default_factory=list)
    passed: bool | None = None  # None: no threshold checked; False: no attempt passed (marked on the sheet)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoryFrame:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Storyboard:
    """A storyboard made in one mode (``simple``, ``reference`` or ``base``)."""

    mode: str
    frames: list[StoryFrame]
    story: str = ""
    character: dict[str, Any] = field(default_factory=dict)  # name, trigger, LoRAs, identity reference
    models: dict[str, Any] = field(
        default_factory=dict
    )  # checkpoint, LoRAs, face models, CLIP, guidance models
    settings: dict[str, Any] = field(default_factory=dict)  # steps, cfg, size, sampler, candidates, weights
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    notes: list[str] = field(default_factory=list)
    guidance: str = ""  # reference mode: the guidance kind (GUIDANCE_LABELS)
    name: str = ""  # the board's name in its run when it differs from the mode, e.g. "reference/faceid"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def key(self) -> str:
        """The board's name in its run: the mode, or e.g. ``reference/faceid`` when a run compares guidance kinds
        (also the folder its frames are in, relative to the run's)."""
        return self.name or self.mode

    @property
    def label(self) -> str:
        if self.mode == "reference" and self.guidance in GUIDANCE_LABELS:
            return f"reference-guided: {GUIDANCE_LABELS[self.guidance]}"
        return MODE_LABELS[self.mode]

    def stats(self) -> dict[str, Any]:
        """Frames, frames with a face, mean/min identity to the character, mean text agreement."""
        identities = [f.identity for f in self.frames if f.identity is not None]
        texts = [f.text for f in self.frames if f.text is not None]
        return {
            "frames": len(self.frames),
            "faces": len(identities),
            "identity_mean": round(sum(identities) / len(identities), 4) if identities else None,
            "identity_min": round(min(identities), 4) if identities else None,
            "text_mean": round(sum(texts) / len(texts), 4) if texts else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "format": FORMAT,
                "version": VERSION,
                "mode": self.mode,
                **({"name": self.name} if self.name else {}),
                **({"guidance": self.guidance} if self.guidance else {}),
                "label": self.label,
                "story": self.story,
                "created": self.created,
                "character": self.character,
                "models": self.models,
                "settings": self.settings,
                "summary": self.stats(),
                "notes": self.notes,
                "frames": [f.to_dict() for f in self.frames],
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Storyboard:
        if data.get("format") not in (None, FORMAT):
            raise ValueError(f"not a storyboard record (format {data.get('format')!r})")
        return cls(
            mode=data["mode"],
            frames=[StoryFrame.from_dict(f) for f in data.get("frames", [])],
            story=data.get("story", ""),
            character=dict(data.get("character") or {}),
            models=dict(data.get("models") or {}),
            settings=dict(data.get("settings") or {}),
            created=data.get("created", ""),
            notes=list(data.get("notes") or []),
            guidance=data.get("guidance", ""),
            name=data.get("name", ""),
        )

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def write(self, folder: str | Path, name: str = "metadata.json") -> Path:
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path


def load_storyboard(path: str | Path) -> Storyboard:
    """A storyboard from its ``metadata.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.json"
    return Storyboard.from_dict(json.loads(path.read_text(encoding="utf-8")))
