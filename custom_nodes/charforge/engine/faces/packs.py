"""Where InsightFace model packs live, and what to tell the user when one is not where insightface looks.

ComfyUI packs keep InsightFace models in ``models/insightface/models/<pack>/*.onnx`` and insightface
loads every ``.onnx`` exactly one level below ``models/<pack>``. The official antelopev2 archive unpacks
to ``antelopev2/antelopev2/*.onnx``, which insightface then silently ignores; that double nesting (and
the files placed without the ``models`` level) is recognised here and explained with the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ... import bridge

FOLDER_KIND = "insightface"

# The files each well-known pack ships (docs/ecosystem.md §3).
KNOWN_PACKS: dict[str, dict[str, str]] = {
    "buffalo_l": {"detection": "det_10g.onnx", "recognition": "w600k_r50.onnx"},
    "antelopev2": {"detection": "scrfd_10g_bnkps.onnx", "recognition": "glintr100.onnx"},
}


class FaceModelsNotFoundError(FileNotFoundError):
    """An InsightFace pack is missing or misplaced; the message says where it looked and how to fix it."""


@dataclass(frozen=True)
class PackLocation:
    root: Path  # the insightface folder (insightface's `root`): the pack is in root/models/<name>
    name: str

    @property
    def folder(self) -> Path:
        return self.root / "models" / self.name

    def onnx_files(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("*.onnx") if p.is_file())


def insightface_roots() -> list[Path]:
    """The insightface model folders (ComfyUI's ``models/insightface`` and any extra paths)."""
    seen, roots = set(), []
    for folder in bridge.model_folders(FOLDER_KIND):
        path = Path(folder).expanduser()
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            roots.append(path)
    return roots


def _has_onnx(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.glob("*.onnx"))


def available_face_packs() -> list[str]:
    """Names of the packs that insightface can load from the insightface model folder(s), sorted."""
    names: set[str] = set()
    for root in insightface_roots():
        models = root / "models"
        if models.is_dir():
            names.update(p.name for p in models.iterdir() if _has_onnx(p))
    return sorted(names)


def expected_files(pack: str) -> str:
    files = KNOWN_PACKS.get(pack)
    if files:
        return f"{files['detection']} (detector) and {files['recognition']} (recogniser), plus the pack's other .onnx files"
    return "a detector .onnx (SCRFD/RetinaFace) and a recogniser .onnx (ArcFace, 112x112 input)"


def locate_pack(pack: str) -> PackLocation:
    """The folder insightface will load `pack` from; raises `FaceModelsNotFoundError` with the fix."""
    pack = pack.strip()
    if not pack or "/" in pack or "\\" in pack or pack in (".", ".."):
        raise FaceModelsNotFoundError(
            f"invalid face model pack name {pack!r}: give a folder name such as buffalo_l"
        )
    roots = insightface_roots()
    for root in roots:
        location = PackLocation(root, pack)
        if location.onnx_files():
            return location
    raise FaceModelsNotFoundError(_not_found_message(pack, roots))


def _not_found_message(pack: str, roots: list[Path]) -> str:
    if not roots:
        return (
            f"InsightFace pack {pack!r} not found: no insightface model folder is configured. Inside ComfyUI it is "
            f"ComfyUI/models/insightface; outside, set CHARFORGE_MODELS_DIR or COMFYUI_DIR (or "
            f"CHARFORGE_PATH_INSIGHTFACE). Put the files ({expected_files(pack)}) in "
            f"<models>/insightface/models/{pack}/."
        )
    for root in roots:
        folder = root / "models" / pack
        nested = [p for p in sorted(folder.iterdir()) if _has_onnx(p)] if folder.is_dir() else []
        if nested:
            inner = nested[0]
            return (
                f"InsightFace pack {pack!r} is nested one folder too deep: the .onnx files are in {inner}, but "
                f"insightface only loads files directly in {folder} (a common result of unzipping "
                f"{pack}.zip inside its own folder). Fix: move the files up one level, e.g. "
                f'`mv "{inner}"/*.onnx "{folder}/"` and remove the empty {inner.name} folder.'
            )
        flat = root / pack
        if _has_onnx(flat):
            return (
                f"InsightFace pack {pack!r} is in {flat}, but insightface looks in {folder} (note the extra "
                f"'models' level). Fix: move the folder: `mkdir -p \"{root / 'models'}\" && "
                f'mv "{flat}" "{folder}"`.'
            )
    searched = ", ".join(str(r / "models" / pack) for r in roots)
    found = available_face_packs()
    other = f" Packs found: {', '.join(found)}." if found else ""
    return (
        f"InsightFace pack {pack!r} not found; looked in: {searched}. Expected {expected_files(pack)} directly "
        f"in one of those folders.{other} buffalo_l is the usual choice; antelopev2 must be downloaded by hand "
        f"and its archive unpacks one folder too deep."
    )
