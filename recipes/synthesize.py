"""``charforge dataset synthesize``: a character dataset from a few photos plus a folder of source images.

Runs on this machine through the engine (no ComfyUI server): the photos become a dataset
(``engine.dataset.load_folder``), the character's identity is built from them (or a saved identity is
loaded), the identity is swapped onto every source image, the swapped faces are restored when a restorer
is named, each result is scored against the identity, synthetic images are capped as a share of the
dataset, and the dataset's manifest and report are written to the output folder. The dataset then goes
through the usual stages (the nodes, or ``charforge pipeline``), where the report keeps marking the
synthetic images with their source.

Models are found like the nodes find them: ``<models>/insightface/models/<pack>/``,
``<models>/insightface/inswapper_128.onnx``, ``<models>/facerestore_models/``, with models =
``$CHARFORGE_MODELS_DIR``, the config file's ``models.dir`` or ``$COMFYUI_DIR/models``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class SynthesizeOptions:
    identity: str | None = None  # a saved identity (name or .json); default: built from the photos
    pack: str = "buffalo_l"
    det_size: int = 640
    swapper: str = "inswapper_128.onnx"
    restorer: str | None = None  # a file in facerestore_models
    blend: float = 1.0
    fidelity: float = 0.5
    which: str = "main"
    threshold: float | None = None
    max_share: float = 0.4
    recursive: bool = False


@dataclass
class SynthesizeResult:
    manifest: Any  # engine.dataset.DatasetManifest
    summary: Any  # engine.synth.SynthSummary
    identity: Any  # engine.score.ReferenceIdentity
    manifest_path: str
    report: dict[str, Any]


def synthesize_dataset(
    photos: str | os.PathLike,
    sources: str | os.PathLike,
    out: str | os.PathLike,
    options: SynthesizeOptions | None = None,
    note: Callable[[str], None] = lambda _: None,
    control: Any = None,
) -> SynthesizeResult:
    """Photos + sources -> a dataset in `out` with synthetic entries, its manifest.json and report/."""
    from charforge.engine.dataset import load_folder, read_rgb, scan_folder, write_report
    from charforge.engine.faces import FaceAnalyzer
    from charforge.engine.score import build_identity, load_identity
    from charforge.engine.synth import FaceSwapper, SynthSettings, load_face_restorer, synthesize

    options = options or SynthesizeOptions()
    photos, sources, out = Path(photos), Path(sources), Path(out)
    if out.resolve() == sources.resolve() or out.resolve() == photos.resolve():
        raise ValueError(f"--out {out} is the photo or source folder: give the dataset its own folder")
    analyzer = FaceAnalyzer.load(options.pack, det_size=options.det_size)
    if options.identity:
        identity = load_identity(options.identity)
        note(f"identity {identity.name!r} loaded ({identity.model})")
    else:
        images = (
            (Path(p).name, read_rgb(p).rgb) for p in scan_folder(photos, recursive=options.recursive).images
        )
        identity = build_identity(photos.name or "character", analyzer, images)
        note(identity.summary())
    swapper = FaceSwapper.load(options.swapper)
    restorer = load_face_restorer(options.restorer) if options.restorer else None
    note(
        f"swapper {swapper.name}"
        + (f", restorer {restorer.name} ({restorer.architecture})" if restorer else "")
    )
    manifest = load_folder(photos, out, recursive=options.recursive)
    settings = SynthSettings(
        which=options.which,
        threshold=options.threshold,
        max_share=options.max_share,
        restore=restorer is not None,
        blend=options.blend,
        fidelity=options.fidelity,
        recursive=options.recursive,
    )
    manifest, summary = synthesize(
        manifest, sources, identity, analyzer, swapper, restorer, settings, control
    )
    path = manifest.save()
    report = write_report(manifest)
    return SynthesizeResult(manifest, summary, identity, path, report)
