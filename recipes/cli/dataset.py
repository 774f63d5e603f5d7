"""``charforge dataset``: dataset work done on this machine (see recipes/synthesize.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

EPILOG = """\
Models are found like the nodes find them, under <models> = $CHARFORGE_MODELS_DIR, the config file's models.dir
or $COMFYUI_DIR/models: insightface/models/<pack>/ (buffalo_l), insightface/inswapper_128.onnx, and
facerestore_models/<file> for --restore (GFPGAN, RestoreFormer; CodeFormer needs spandrel_extra_arches).
Needs: pip install "charforge[nodes,faces]".

Output (--out DATASET): manifest.json (every photo and synthetic image; synthetic ones name their source),
synthetic/ (the swapped images), report/ (report.json, report.html, contact sheets). The photo and source
folders are only read.

exit codes: 0 done; 2 usage error (missing models or folders, bad values); 130 interrupted.
"""


def register(sub: Any, *, server: argparse.ArgumentParser, output: Any) -> None:
    dataset = sub.add_parser(
        "dataset",
        help="build datasets on this machine (synthesis)",
        description="Dataset work that runs locally through the engine.",
    )
    dataset_sub = dataset.add_subparsers(dest="dataset_command", metavar="COMMAND", required=True)
    syn = dataset_sub.add_parser(
        "synthesize",
        help="more photos from few: swap the character onto source images, restore, score, cap",
        description="Build a dataset from a few photos of the character plus a folder of source images (poses, "
        "outfits, backgrounds): the character's face is swapped onto each source, optionally restored, "
        "scored against the identity and added as a synthetic image (capped as a share of the dataset).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    syn.add_argument("photos", type=Path, help="folder of photos of the character")
    syn.add_argument(
        "--sources", type=Path, required=True, metavar="DIR", help="folder of images to swap onto"
    )
    syn.add_argument("--out", type=Path, required=True, metavar="DATASET", help="the dataset folder to write")
    syn.add_argument(
        "--identity", metavar="NAME|FILE", help="a saved identity (default: built from the photos)"
    )
    syn.add_argument("--face-pack", default="buffalo_l", help="InsightFace pack (default buffalo_l)")
    syn.add_argument("--det-size", type=int, default=640, help="face detection size (default 640)")
    syn.add_argument(
        "--swapper",
        default="inswapper_128.onnx",
        help="swapper in models/insightface (default inswapper_128.onnx)",
    )
    syn.add_argument("--restore", metavar="FILE", help="face-restoration model in models/facerestore_models")
    syn.add_argument("--blend", type=float, default=1.0, help="share of the restored face, 0..1 (default 1)")
    syn.add_argument("--fidelity", type=float, default=0.5, help="CodeFormer fidelity, 0..1 (default 0.5)")
    syn.add_argument(
        "--faces", choices=("main", "all"), default="main", help="swap the main face or all (main)"
    )
    syn.add_argument(
        "--threshold",
        type=float,
        help="identity similarity a result needs (default: the identity's suggested threshold)",
    )
    syn.add_argument(
        "--max-share",
        type=float,
        default=0.4,
        help="largest synthetic share of the dataset (default 0.4; 1 = no cap)",
    )
    syn.add_argument("--recursive", action="store_true", help="also read photos and sources in subfolders")
    syn.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    syn.set_defaults(func=cmd_synthesize)


def cmd_synthesize(args: argparse.Namespace, out: Any) -> int:
    for flag, folder in (("PHOTOS", args.photos), ("--sources", args.sources)):
        if not folder.is_dir():
            out.error(FileNotFoundError(f"{flag} {folder} is not a folder"), EXIT_BAD_INPUT)
            return EXIT_BAD_INPUT
    try:
        from charforge.engine.control import Cancelled, Control

        from ..synthesize import SynthesizeOptions, synthesize_dataset
    except ImportError as exc:
        out.error(
            ImportError(
                f'this command needs the node pack\'s packages ({exc}): pip install "charforge[nodes,faces]"'
            ),
            EXIT_BAD_INPUT,
        )
        return EXIT_BAD_INPUT
    options = SynthesizeOptions(
        identity=args.identity,
        pack=args.face_pack,
        det_size=args.det_size,
        swapper=args.swapper,
        restorer=args.restore,
        blend=args.blend,
        fidelity=args.fidelity,
        which=args.faces,
        threshold=args.threshold,
        max_share=args.max_share,
        recursive=args.recursive,
    )
    progress = _Progress(out)
    try:
        result = synthesize_dataset(
            args.photos, args.sources, args.out, options, note=out.note, control=Control(on_progress=progress)
        )
    except Cancelled as exc:
        out.error(exc, EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except (OSError, ValueError, ImportError) as exc:
        out.error(exc, EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    finally:
        progress.close()
    summary = result.summary
    synthetic = [
        {"file": e.file, "source": e.synthesized_from, "accepted": e.accepted, "reasons": e.rejected}
        for e in result.manifest.entries
        if e.synthetic
    ]
    text = "\n".join(
        [
            summary.text(),
            result.manifest.summary(),
            f"manifest: {result.manifest_path}",
            f"report: {Path(result.manifest.folder) / 'report' / 'report.html'}",
        ]
    )
    out.result(
        text,
        manifest=result.manifest_path,
        identity=result.identity.name,
        threshold=summary.threshold,
        sources=summary.sources,
        made=summary.made,
        accepted=summary.accepted,
        below_threshold=summary.below_threshold,
        over_cap=summary.over_cap,
        skipped=[{"source": s, "reason": r} for s, r in summary.skipped],
        synthetic=synthetic,
    )
    return 0


class _Progress:
    """One updating line on stderr while sources are swapped (a ``progress`` record with --json)."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.shown = False

    def __call__(self, done: int, total: int, text: str | None) -> None:
        if self.out.json:
            self.out.record("progress", done=done, total=total, item=text)
            return
        if self.out.stderr.isatty() if hasattr(self.out.stderr, "isatty") else False:
            self.out.stderr.write(f"\rsynthesizing {done}/{total} {self.out.clean(text or '')[:40]:40}")
            self.out.stderr.flush()
            self.shown = True

    def close(self) -> None:
        if self.shown:
            self.out.stderr.write("\n")
            self.out.stderr.flush()
