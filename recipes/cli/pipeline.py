"""``charforge pipeline PHOTOS_DIR --out out``: the end-to-end character pipeline in one command (see
recipes/pipeline/, imported when the command runs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Photos -> dataset -> captions -> LoRA -> scored images -> video, through a ComfyUI on this machine: --server
URL, else the one on 127.0.0.1:8188 (when it has CharForge and a base checkpoint), else one started from
$COMFYUI_DIR with OUT/comfyui as its base directory, else one installed with comfy-cli (online only).

Models: real ones when the server has an SD1.5/SDXL checkpoint; otherwise tiny random models of the real
architectures are written into OUT/comfyui/models and the run says plainly that its results are noise.
Finished stages are recorded in OUT/pipeline_state.json and skipped when the command runs again.

Remote (a RunPod pod's URL, any ComfyUI not on this machine, or --remote): the photo folder is uploaded to the
server (only what changed), every stage runs there, and the dataset folders, reports, LoRA and training run
folder come home into OUT, checked by sha256 (docs/remote.md)."""


def register(sub: Any, *, server: argparse.ArgumentParser, output: Any) -> None:
    p = sub.add_parser(
        "pipeline",
        parents=[server],
        help="run the end-to-end character pipeline on a photo folder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("photos", help="folder of photos (or drawings) of one character, or s3://bucket/prefix")
    p.add_argument(
        "--out", type=Path, default=Path("out"), metavar="DIR", help="where everything goes (default: ./out)"
    )
    p.add_argument(
        "--character",
        default="my_character",
        metavar="NAME",
        help="the character's name: dataset, LoRA and identity file names (default: my_character)",
    )
    p.add_argument("--trigger", help="trigger word (default: the character's name, e.g. pip)")
    p.add_argument(
        "--class",
        dest="class_tokens",
        default="person",
        metavar="WORDS",
        help="what the character is: person, woman, man, cartoon boy... (default: person)",
    )
    p.add_argument(
        "--no-face-check",
        action="store_true",
        help="drawn or non-human characters: no face rules in the dataset, images picked by CLIP score",
    )
    p.add_argument(
        "--base-model",
        metavar="MODEL",
        help="a checkpoint or diffusion model (FLUX.1) on the server (default: the first checkpoint); its family "
        "(SD1.5, SDXL, FLUX.1, SD3/SD3.5) is read from its tensors",
    )
    p.add_argument(
        "--tiny", action="store_true", help="use tiny random models even when real ones are installed"
    )
    p.add_argument(
        "--captioner",
        choices=["wd14", "vlm"],
        default="wd14",
        help="wd14: booru tags (default); vlm: sentences from a Qwen2.5-VL or JoyCaption folder in the server's "
        "models/LLM, as Flux and SD3.5 are trained (docs/captioning.md)",
    )
    p.add_argument(
        "--caption-model",
        default="",
        metavar="NAME",
        help="with --captioner vlm: the folder in models/LLM (default: the first Qwen2.5-VL/LLaVA one there)",
    )
    p.add_argument(
        "--candidates", type=int, default=4, metavar="N", help="images generated per pick (default: 4)"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="generate the candidates again with new seeds up to N more times while the pick is below "
        "threshold, so at most N + 1 rounds (default 2; 0: off)",
    )
    p.add_argument(
        "--min-text",
        type=float,
        default=0.70,
        metavar="X",
        help="text agreement the pick must reach as CLIPScore, 2.5 x CLIP cosine, where CLIP is measured "
        "(default 0.70, a cosine of 0.28)",
    )
    p.add_argument(
        "--min-identity",
        type=float,
        metavar="X",
        help="identity the pick must reach where faces are scored (default: the identity's suggested threshold)",
    )
    p.add_argument(
        "--port", type=int, metavar="PORT", help="port of a ComfyUI the pipeline starts (default: free)"
    )
    p.add_argument("--no-install", action="store_true", help="never install ComfyUI with comfy-cli")
    p.add_argument("--progress", choices=["auto", "rich", "plain"], default="auto")
    p.add_argument(
        "--remote",
        action="store_true",
        help="reach the server only over HTTP (on by itself for a server not on this machine)",
    )
    p.add_argument(
        "--models",
        metavar="MANIFEST",
        dest="models_manifest",
        help="model manifest (YAML/JSON, a file or s3://bucket/key) checked against the server before anything "
        "is queued",
    )
    p.add_argument(
        "--provision",
        action="store_true",
        help="let the server download the manifest's missing models from their URLs first",
    )
    p.add_argument(
        "--upload-to",
        metavar="s3://BUCKET/PREFIX",
        help="copy OUT (without comfyui/ and server/) to S3-compatible storage when the run is done; "
        "credentials: the usual AWS variables or profile",
    )
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3-compatible endpoint (R2, MinIO, RunPod volumes; default: AWS or $AWS_ENDPOINT_URL)",
    )
    p.add_argument(
        "--train-on",
        metavar="replicate:OWNER/MODEL[:VERSION]|runpod-serverless:ID",
        help="train the LoRA on this Replicate trainer or RunPod serverless endpoint (or a profile naming one) "
        "instead of the server; the LoRA comes home into OUT/lora and goes into the server's loras folder "
        "(docs/replicate.md, docs/runpod.md)",
    )
    p.add_argument(
        "--destination",
        metavar="OWNER/NAME",
        help="with --train-on: your Replicate model that receives the trained version (it must exist)",
    )
    p.set_defaults(func=cmd_pipeline)


def _storage(args: argparse.Namespace) -> Any:
    from ...driver.storage import S3Storage

    return S3Storage(endpoint_url=args.s3_endpoint)


def _train_on(args: argparse.Namespace, opts: Any, out: Any) -> None:
    """Resolve ``--train-on`` (as ``charforge train --backend``) before any stage runs; its token is masked."""
    from ...driver.config import resolve_replicate, resolve_runpod
    from ...driver.errors import ConfigError, UsageError

    if not args.train_on.startswith("replicate:"):
        endpoint = resolve_runpod(args.train_on, config_path=args.config)
        if endpoint is not None:
            if endpoint.kind != "serverless":
                raise UsageError(
                    f"--train-on {args.train_on!r} is a pod: run the whole pipeline there (--server {args.train_on})"
                )
            out.secrets = [*out.secrets, *endpoint.secrets()]
            opts.train_on, opts.runpod = args.train_on, endpoint
            return
    settings = resolve_replicate(args.train_on, config_path=args.config)
    if settings is None:
        raise ConfigError(f"--train-on {args.train_on!r}: name a Replicate trainer (replicate:OWNER/MODEL)")
    if not args.destination:
        raise UsageError("--train-on needs --destination OWNER/NAME (your Replicate model; it must exist)")
    out.secrets = [*out.secrets, *settings.secrets()]
    opts.train_on, opts.destination, opts.replicate = args.train_on, args.destination, settings


def cmd_pipeline(args: argparse.Namespace, out: Any) -> int:
    from charforge.common.transfer import UPLOAD_TYPES

    from ...driver.storage import S3Location, is_s3
    from ..pipeline import PipelineOptions, run_pipeline, summary_lines

    target = S3Location.parse(args.upload_to) if args.upload_to else None  # a wrong location fails first
    photos = Path(args.photos)
    if is_s3(args.photos):
        photos = Path(args.out) / "photos"
        got = _storage(args).download_tree(S3Location.parse(args.photos), photos, suffixes=UPLOAD_TYPES)
        out.note(
            f"photos from {args.photos}: {sum(e['downloaded'] for e in got)} downloaded, "
            f"{len(got)} in {photos}"
        )
    manifest = Path(args.models_manifest) if args.models_manifest else None
    if is_s3(args.models_manifest):
        got = _storage(args).fetch_object(args.models_manifest, Path(args.out) / "models_manifest")
        manifest = Path(got["path"])
        out.note(f"model manifest from {args.models_manifest}: {manifest}")
    opts = PipelineOptions(
        photos=photos,
        out=args.out,
        character=args.character,
        trigger=args.trigger,
        class_tokens=args.class_tokens,
        face_check=not args.no_face_check,
        server=args.server,
        base_model=args.base_model,
        tiny=args.tiny,
        candidates=args.candidates,
        retries=args.retries,
        min_text=args.min_text,
        min_identity=args.min_identity,
        port=args.port,
        install=not args.no_install,
        progress="plain" if out.json else args.progress,
        remote=args.remote,
        models_manifest=manifest,
        provision=args.provision,
        captioner=args.captioner,
        caption_model=args.caption_model,
    )
    if args.train_on:
        _train_on(args, opts, out)
    state = run_pipeline(opts, out.note, stderr=out.stderr)
    lines = summary_lines(state, opts.out)
    lines.insert(1, f"pipeline finished in {state.get('seconds', 0):.0f} s; everything is under {opts.out}")
    if target is not None:
        entries = _storage(args).upload_tree(opts.out, target, exclude=frozenset({"comfyui", "server"}))
        (opts.out / "s3_manifest.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
        sent = [e for e in entries if e["uploaded"]]
        lines.append(
            f"  uploaded to {target}: {len(sent)} file(s) sent, {len(entries) - len(sent)} already there "
            f"(list: {opts.out / 's3_manifest.json'})"
        )
    out.result("\n".join(lines), out=str(opts.out), tiny=state.get("tiny"), stages=state.get("stages"))
    return 0
