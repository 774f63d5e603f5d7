"""Scene lists: what each frame of a storyboard shows.

A user writes them as plain text (one scene per line; blank lines and ``#`` comments skipped, list markers
such as ``1.`` or ``-`` dropped), as JSON or as YAML. JSON and YAML hold a list of scenes, or an object with
a ``scenes`` list; a scene is a string (its prompt) or an object with ``prompt``, an optional ``caption``
(the short line shown under the frame on the sheet) and an optional ``pose``: a photo or drawing of the pose
the frame should take (a path, relative to the scene file), which ``charforge story`` turns into a pose map
for a pose ControlNet when the server has one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...common.safe_yaml import UnsafeYaml, load_yaml, short_repr

MIN_FRAMES = 6
MAX_FRAMES = 10
FORMATS = ("auto", "text", "json", "yaml")
FACE_WORDS = ("face", "portrait", "close-up", "closeup", "close up", "headshot", "head and shoulders")
FACE_FIRST = "close-up portrait, face clearly visible, looking at the camera"
_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d{1,3}[.):]|(?:scene|frame)\s*\d{1,3}\s*[:.)-])\s*", re.IGNORECASE)


@dataclass
class Scene:
    """One frame of the story: the prompt that generates it and a short caption for the sheet."""

    prompt: str
    caption: str = ""
    pose: str = ""  # a pose reference image (path) for the frame; "" for none

    def __post_init__(self) -> None:
        self.prompt = " ".join(str(self.prompt).split())
        self.caption = " ".join(str(self.caption or "").split()) or _short(self.prompt)
        self.pose = str(self.pose or "").strip()

    def to_dict(self) -> dict[str, str]:
        data = {"prompt": self.prompt, "caption": self.caption}
        if self.pose:
            data["pose"] = self.pose
        return data


def _short(text: str, words: int = 8) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def _scene_from(item: Any, where: str) -> Scene:
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"{where} is empty")
        return Scene(item)
    if isinstance(item, dict):
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"{where} has no 'prompt' text (keys found: {short_repr(sorted(map(str, item)))})"
            )
        caption, pose = item.get("caption", ""), item.get("pose", "")
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"{where}: 'caption' must be text, got {type(caption).__name__}")
        if pose is not None and not isinstance(pose, str):
            raise ValueError(f"{where}: 'pose' must be the path of an image, got {type(pose).__name__}")
        return Scene(prompt, caption or "", pose or "")
    raise ValueError(f"{where} must be a prompt string or an object with 'prompt', got {type(item).__name__}")


def scenes_from_data(data: Any, source: str = "the scene list") -> list[Scene]:
    """Scenes from parsed JSON/YAML: a list, or an object whose ``scenes`` key holds the list."""
    if isinstance(data, dict):
        if "scenes" not in data:
            raise ValueError(
                f"{source} is an object without a 'scenes' list (keys: {short_repr(sorted(map(str, data)))})"
            )
        data = data["scenes"]
    if not isinstance(data, list):
        raise ValueError(f"{source} must be a list of scenes, got {type(data).__name__}")
    return [_scene_from(item, f"scene {i + 1} of {source}") for i, item in enumerate(data)]


def _guess_format(text: str) -> str:
    stripped = text.lstrip()
    if stripped[:1] in ("[", "{"):
        return "json"
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if any(re.match(r"^\s*scenes\s*:", ln) for ln in lines) or any(
        re.match(r"^\s*-\s+(prompt|caption)\s*:", ln) for ln in lines
    ):
        return "yaml"
    return "text"


def parse_scenes(text: str, fmt: str = "auto", source: str = "the scene list") -> list[Scene]:
    """Scenes from the text of a scene list in format `fmt` (``auto`` guesses JSON, YAML or one per line)."""
    if fmt not in FORMATS:
        raise ValueError(f"scene format must be one of {FORMATS}, got {short_repr(fmt)}")
    if fmt == "auto":
        fmt = _guess_format(text)
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} is not valid JSON: {exc}") from None
        scenes = scenes_from_data(data, source)
    elif fmt == "yaml":
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{source} is YAML but PyYAML is not installed: pip install PyYAML, or write one scene "
                f"per line"
            ) from None
        try:
            data = load_yaml(text, source)
        except UnsafeYaml as exc:
            raise ValueError(str(exc)) from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{source} is not valid YAML: {exc}") from None
        scenes = scenes_from_data(data, source)
    else:
        scenes = []
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            prompt = _MARKER.sub("", line, count=1).strip()
            if prompt:
                scenes.append(Scene(prompt))
    if not scenes:
        raise ValueError(f"{source} holds no scene: write one scene prompt per line")
    return scenes


def load_scenes(path: str | Path) -> list[Scene]:
    """Scenes from a file: ``.json``, ``.yaml``/``.yml``, anything else one scene per line (or guessed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the scene list {path}: {exc.strerror or exc}") from None
    fmt = {".json": "json", ".yaml": "yaml", ".yml": "yaml", ".txt": "text"}.get(path.suffix.lower(), "auto")
    scenes = parse_scenes(text, fmt, source=str(path))
    for scene in scenes:  # pose images are named relative to the scene file
        if scene.pose and not Path(scene.pose).expanduser().is_absolute():
            scene.pose = str(path.parent / scene.pose)
    return scenes


def check_scene_count(scenes: list[Scene], minimum: int = MIN_FRAMES, maximum: int = MAX_FRAMES) -> None:
    """Raise when a storyboard would have fewer than `minimum` or more than `maximum` frames."""
    if not minimum <= len(scenes) <= maximum:
        raise ValueError(
            f"a storyboard has {minimum}-{maximum} frames, the scene list has {len(scenes)}: "
            f"{'add' if len(scenes) < minimum else 'remove'} scenes"
        )


def shows_face(prompt: str) -> bool:
    low = prompt.lower()
    return any(word in low for word in FACE_WORDS)


def ensure_face_first(scenes: list[Scene]) -> list[Scene]:
    """Frame 1 establishes the character, so it must show the face clearly: add that to its prompt if missing."""
    if scenes and not shows_face(scenes[0].prompt):
        first = scenes[0]
        scenes = [Scene(f"{FACE_FIRST}, {first.prompt}", first.caption, first.pose), *scenes[1:]]
    return scenes


def frame_prompt(scene: Scene, trigger: str = "", style: str = "") -> str:
    """The prompt a frame is generated from: trigger words first (unless the scene has them), style last."""
    prompt = scene.prompt
    trigger = trigger.strip().strip(",")
    if trigger and trigger.lower() not in prompt.lower():
        prompt = f"{trigger}, {prompt}"
    style = style.strip().strip(",")
    if style and style.lower() not in prompt.lower():
        prompt = f"{prompt}, {style}"
    return prompt
