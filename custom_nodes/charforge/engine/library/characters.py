"""Character presets: one YAML file per character, in ``<models>/charforge/characters/<name>.yaml``.

The folder is the ``characters`` subfolder of the pack's ``charforge`` model folder (the same place
identities live in, ``identities/``): inside ComfyUI that is ``ComfyUI/models/charforge/characters``
(plus any ``charforge:`` path of ``extra_model_paths.yaml``); outside it ``CHARFORGE_PATH_CHARFORGE``,
the config file's ``models.folders.charforge`` / ``models.dir``, ``$CHARFORGE_MODELS_DIR`` or
``$COMFYUI_DIR/models`` (see `charforge.bridge`). New presets are written to the first folder.

The preset's fields, defaults and validation are the schema in ``charforge.common.characters``.

Stable public API (the storyboard, LoRA evaluation and the nodes use it): `load_character(name)` returns a
`Character` with ``name, display_name, trigger_words, loras [(file, weight, clip_weight)], lora_stack [(file,
weight)], prompt, negative_prompt, identity, reference_photos, threshold, generation`` and ``prompt_text(extra)``
(trigger words + base prompt + extra); `save_character`, `list_characters`, `read_character_file`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ... import bridge
from ...common.characters import (
    SUFFIXES,
    Character,
    CharacterError,
    CharacterLora,
    GenerationParams,
    default_size,
    safe_name,
    validate_character,
)
from ...common.safe_yaml import MAX_YAML_BYTES, UnsafeYaml, load_yaml, short_repr

FOLDER_KIND = "charforge"
SUBFOLDER = "characters"


# --------------------------------------------------------------------------------------------------
# Files


def character_folder() -> Path:
    """Where new presets are written: ``characters`` in the first ``charforge`` model folder."""
    folders = bridge.model_folders(FOLDER_KIND)
    if not folders:
        raise FileNotFoundError(
            "no charforge model folder is configured: inside ComfyUI it is models/charforge; "
            "outside, set CHARFORGE_MODELS_DIR or COMFYUI_DIR (or CHARFORGE_PATH_CHARFORGE)"
        )
    return Path(folders[0]) / SUBFOLDER


def list_characters(folder: str | os.PathLike | None = None) -> list[str]:
    """Names of the saved presets, sorted: in `folder` when given, else in every charforge model folder."""
    if folder is not None:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            return []
        return sorted(
            {
                p.name.rsplit(".", 1)[0]
                for p in folder.iterdir()
                if p.is_file() and p.name.lower().endswith(SUFFIXES)
            }
        )
    names = set()
    for entry in bridge.list_models(FOLDER_KIND):
        parts = entry.replace("\\", "/").split("/")
        if len(parts) == 2 and parts[0] == SUBFOLDER and parts[1].lower().endswith(SUFFIXES):
            names.add(parts[1].rsplit(".", 1)[0])
    return sorted(names)


def character_path(name_or_path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """The preset file for a name (in `folder` when given, else searched in the charforge folders) or a path
    to a ``.yaml`` file."""
    path = Path(str(name_or_path)).expanduser()
    if path.suffix.lower() in SUFFIXES and path.is_file():
        return path
    name = safe_name(str(name_or_path))
    if folder is not None:
        for suffix in SUFFIXES:
            candidate = Path(folder).expanduser() / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
        folders = [str(Path(folder).expanduser())]
    else:
        for suffix in SUFFIXES:
            try:
                return Path(bridge.find_model(FOLDER_KIND, f"{SUBFOLDER}/{name}{suffix}"))
            except bridge.ModelNotFoundError:
                continue
        folders = [str(Path(f) / SUBFOLDER) for f in bridge.model_folders(FOLDER_KIND)]
    known = list_characters(folder)
    hint = f" Saved characters: {', '.join(known)}." if known else " No character is saved yet."
    raise CharacterError(
        f"character {short_repr(name)} not found in {', '.join(folders) or 'any folder'}.{hint}"
    )


def read_character_file(path: str | os.PathLike) -> Character:
    """Parse and validate one preset file."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise UnsafeYaml(f"the file is {path.stat().st_size} bytes; a preset is at most {MAX_YAML_BYTES}")
        data = load_yaml(path.read_text(encoding="utf-8"), "the preset")
    except OSError as exc:
        raise CharacterError(f"cannot read: {exc}", path) from exc
    except UnsafeYaml as exc:
        raise CharacterError(str(exc), path) from None
    except yaml.YAMLError as exc:
        raise CharacterError(f"not valid YAML: {exc}", path) from None
    name = path.name.rsplit(".", 1)[0]
    if isinstance(data, dict) and data.get("name") not in (None, name):
        raise CharacterError(
            f"says name {short_repr(data.get('name'))} but the file is {path.name}: the file name is the "
            "character's name",
            path,
            "name",
        )
    return validate_character(data if data is not None else {}, name, path)


def load_character(name_or_path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Character:
    """Load a preset by name (``<folder>/<name>.yaml``, by default ``characters/<name>.yaml`` in the charforge
    folders) or by path."""
    return read_character_file(character_path(name_or_path, folder))


def save_character(
    character: Character, folder: str | os.PathLike | None = None, overwrite: bool = False
) -> Path:
    """Write the preset as ``<folder>/<name>.yaml`` (default `character_folder()`); never replaces an
    existing file unless `overwrite`. The written file is read back and validated."""
    import yaml

    name = safe_name(character.name)
    target = Path(folder) if folder is not None else character_folder()
    path = target / f"{name}.yaml"
    if path.exists() and not overwrite:
        raise FileExistsError(f"character {path} exists; choose another name or allow overwriting (--force)")
    data = character.to_dict()
    validate_character(data, name, path)
    target.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    header = f"# CharForge character preset: {character.display_name or name}\n"
    tmp.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def character_from_training(
    name: str,
    lora_name: str,
    trigger_words: list[str],
    *,
    weight: float = 1.0,
    base_model: str = "",
    prompt: str = "",
    identity: str = "",
    reference_photos: str = "",
    resolution: int | None = None,
) -> Character:
    """The preset a finished training run suggests: its LoRA at `weight`, its trigger words, size defaults."""
    size = resolution or default_size(base_model)
    return Character(
        name=safe_name(name),
        display_name=name,
        trigger_words=list(trigger_words),
        loras=[CharacterLora(lora_name, weight)],
        prompt=prompt,
        identity=identity,
        reference_photos=reference_photos,
        base_model=base_model,
        generation=GenerationParams(width=size, height=size),
    )


def save_training_character(
    name: str,
    lora_name: str,
    trigger_word: str,
    base_model: str = "",
    resolution: int | None = None,
    folder: str | os.PathLike | None = None,
) -> str:
    """The end-of-training hook: save a preset for the LoRA just trained, never replacing an existing one.

    Returns one line for the training report (where it was saved, or why not).
    """
    words = [w.strip() for w in trigger_word.split(",") if w.strip()]
    preset = character_from_training(name, lora_name, words, base_model=base_model, resolution=resolution)
    try:
        path = save_character(preset, folder=folder)
    except FileExistsError:
        return f"character {preset.name!r} already exists: not replaced (edit it or pick another name)"
    return f"character {preset.name!r} saved to {path}"


def character_cards() -> list[dict]:
    """Every saved preset as a card for a UI: name, display name, trigger words, LoRAs with their strengths,
    identity and threshold, base model and size; a preset that does not load carries its error instead."""
    cards: list[dict] = []
    for name in list_characters():
        try:
            character = load_character(name)
        except (CharacterError, OSError) as exc:
            cards.append({"name": name, "error": str(exc)})
            continue
        cards.append(
            {
                "name": character.name,
                "display_name": character.display_name or character.name,
                "trigger_words": list(character.trigger_words),
                "loras": [
                    {
                        "name": lora.name,
                        "weight": lora.weight,
                        "clip_weight": lora.weight if lora.clip_weight is None else lora.clip_weight,
                    }
                    for lora in character.loras
                ],
                "identity": character.identity,
                "threshold": character.threshold,
                "base_model": character.base_model,
                "prompt": character.prompt,
                "size": [character.generation.width, character.generation.height],
            }
        )
    return cards
