"""``charforge lora ...`` and ``charforge character ...``: the LoRA library and character presets.

Runs locally on files (no server), except ``lora eval``, which renders through a ComfyUI server (see
``recipes/lora_eval/``). The engine is imported only when a command runs: ``lora info`` needs nothing beyond
the standard library (with numpy it also checks the weights for NaN/Inf, and says when it could not), the
``character`` commands only PyYAML (a driver-only install has it); merge,
resize and convert need the node pack's extra (torch, diffusers): ``pip install "charforge[nodes]"``; eval
scores locally with the face models and CLIP: ``pip install "charforge[nodes,faces]"``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from charforge.common.characters import (
    BASE_MODELS,
    Character,
    CharacterLora,
    GenerationParams,
    family_generation,
    safe_name,
)

EXIT_BAD_INPUT = 2
FORMATS = ("kohya", "peft", "comfyui")


def register(sub: Any, *, server: argparse.ArgumentParser, output: Any) -> None:
    """Add the ``lora`` and ``character`` command groups."""
    del output
    _register_lora(sub, server)
    _register_character(sub)


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")


def _force_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")


def _register_lora(sub: Any, server: argparse.ArgumentParser) -> None:
    lora = sub.add_parser(
        "lora",
        help="inspect, merge, resize, convert and evaluate LoRA files",
        description="LoRA files: inspect them, merge several with weights, shrink the rank by "
        "SVD, convert between kohya, diffusers/peft and ComfyUI key layouts (all "
        "local), and evaluate one on a character through a ComfyUI server.",
    )
    lora_sub = lora.add_subparsers(dest="lora_command", metavar="LORA_COMMAND", required=True)

    info = lora_sub.add_parser(
        "info", help="format, base model, rank, alpha, trigger words, training settings"
    )
    info.add_argument("file", type=Path, help="a .safetensors LoRA")
    info.add_argument("--metadata", action="store_true", help="also print every metadata key")
    _json_flag(info)
    info.set_defaults(func=cmd_lora_info)

    merge = lora_sub.add_parser("merge", help="weighted merge of LoRAs: FILE:WEIGHT ... -o OUT")
    merge.add_argument(
        "sources", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA files with weights (default 1)"
    )
    merge.add_argument("-o", "--output", type=Path, required=True, help="the merged .safetensors file")
    merge.add_argument(
        "--rank", type=int, help="SVD-compress to at most this rank (default: exact, ranks add up)"
    )
    merge.add_argument("--format", choices=FORMATS, default="kohya", help="key layout of the output (kohya)")
    _force_flag(merge)
    _json_flag(merge)
    merge.set_defaults(func=cmd_lora_merge)

    resize = lora_sub.add_parser("resize", help="shrink a LoRA's rank by SVD and print the energy kept")
    resize.add_argument("file", type=Path, help="a .safetensors LoRA")
    resize.add_argument("--rank", type=int, required=True, help="target rank per module")
    resize.add_argument("-o", "--output", type=Path, required=True, help="the resized .safetensors file")
    resize.add_argument("--modules", action="store_true", help="print the energy kept per module")
    _force_flag(resize)
    _json_flag(resize)
    resize.set_defaults(func=cmd_lora_resize)

    convert = lora_sub.add_parser("convert", help="rewrite the keys in another layout")
    convert.add_argument("file", type=Path, help="a .safetensors LoRA")
    convert.add_argument("--to", choices=FORMATS, required=True, help="target key layout")
    convert.add_argument("-o", "--output", type=Path, required=True, help="the converted .safetensors file")
    _force_flag(convert)
    _json_flag(convert)
    convert.set_defaults(func=cmd_lora_convert)

    _register_lora_eval(lora_sub, server)
    from .tune import register_lora_bench

    register_lora_bench(lora_sub, server)


EVAL_EPILOG = """\
The grid: every strength renders the same prompts with the same seeds (the character's prompt, trigger words,
negative prompt and generation settings; --prompt/--prompts add the scene), through the batch runner: rerun the
same command to resume. Each image is scored here: identity = similarity of its face to the character's
reference (the preset's identity or reference_photos, or --reference), text = CLIP agreement with its prompt.
Per strength: combined = (identity weight x identity mean + text weight x 2.5 x max(text mean, 0)) / (sum of
the weights), images without a face counting 0 identity; best = highest combined, ties to the lower strength.

Output (--out DIR): grid.png (rows = strengths, columns = prompt x seed, scores under each image),
results.json (every image with strength, prompt, seed, scores; per-strength means; best strength),
table.md (the table printed), renders/ (the batch folder with the images).

Models for scoring are found like the nodes find them: <models>/insightface/models/<pack>/ and
<models>/clip_vision/<name>/, models = $CHARFORGE_MODELS_DIR, the config file's models.dir or
$COMFYUI_DIR/models (or --face-models DIR, --clip PATH). Needs: pip install "charforge[nodes,faces]".

exit codes: 0 every image rendered and scored; 1 some renders failed (the rest is still scored and written);
2 usage error (unknown character, LoRA or checkpoint not on the server, scoring models missing);
3 server unreachable; 130 interrupted (rerun to resume).
"""


def _register_lora_eval(lora_sub: Any, server: argparse.ArgumentParser) -> None:
    ev = lora_sub.add_parser(
        "eval",
        parents=[server],
        help="render a strength x prompt x seed grid of a LoRA on "
        "a character and score identity and text agreement",
        description="Evaluate a LoRA on a character: a fixed-seed grid across strengths and "
        "prompts rendered through a ComfyUI server, scored for identity and "
        "text agreement; writes a grid image and names the best strength.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument(
        "lora", help="the LoRA as the server's LoraLoader lists it (a file in ComfyUI/models/loras)"
    )
    ev.add_argument(
        "--character", required=True, metavar="NAME", help="a character preset (name or .yaml path)"
    )
    ev.add_argument(
        "--strengths",
        default="0.4,0.6,0.8,1.0",
        metavar="LIST",
        help="LoRA strengths, model and text encoder alike (default 0.4,0.6,0.8,1.0)",
    )
    prompts = ev.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompts", type=Path, metavar="FILE", help="scene prompts, one per line (# = comment)"
    )
    prompts.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="a scene prompt (repeatable); default: a portrait, an upper-body and a cafe scene",
    )
    ev.add_argument(
        "--seeds", default="1,2", metavar="LIST", help="seeds, the same for every cell (default 1,2)"
    )
    ev.add_argument(
        "--checkpoint", metavar="NAME", help="base checkpoint on the server (default: the first listed)"
    )
    ev.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="where the grid, results and renders go"
    )
    ev.add_argument("--timeout", type=float, metavar="S", help="limit per image job")
    ev.add_argument(
        "--window", type=int, default=2, metavar="N", help="jobs queued on the server at once (2)"
    )
    score = ev.add_argument_group("scoring (local)")
    score.add_argument(
        "--reference",
        metavar="DIR|IDENTITY",
        help="photos of the character or a saved identity (default: the preset's)",
    )
    score.add_argument("--face-pack", default="buffalo_l", help="InsightFace pack (default buffalo_l)")
    score.add_argument(
        "--face-models",
        metavar="DIR",
        help="an insightface folder holding models/<pack>/ (searched before the model folders)",
    )
    score.add_argument("--det-size", type=int, default=640, help="face detection size (default 640)")
    score.add_argument(
        "--clip",
        metavar="NAME|PATH",
        help="CLIP folder for text agreement (default: the first in "
        "clip_vision; 'none' scores identity only)",
    )
    score.add_argument(
        "--device", choices=("cpu", "cuda", "mps"), help="CLIP device (default: the best there is)"
    )
    score.add_argument(
        "--identity-weight", type=float, default=1.0, help="weight of identity in combined (1.0)"
    )
    score.add_argument(
        "--text-weight", type=float, default=0.5, help="weight of text agreement in combined (0.5)"
    )
    score.add_argument("--cell", type=int, default=256, metavar="PX", help="grid cell size in pixels (256)")
    ev.set_defaults(func=cmd_lora_eval)


def _register_character(sub: Any) -> None:
    character = sub.add_parser(
        "character",
        help="character presets: new, list, show",
        description="Character presets (YAML) in <models>/charforge/characters/: the "
        "folder comes from $CHARFORGE_PATH_CHARFORGE, the config file's "
        "models section, $CHARFORGE_MODELS_DIR or $COMFYUI_DIR/models.",
    )
    char_sub = character.add_subparsers(dest="character_command", metavar="CHARACTER_COMMAND", required=True)

    new = char_sub.add_parser("new", help="create a preset from flags (never overwrites without --force)")
    new.add_argument("name", help="the character's name (its file name)")
    new.add_argument("--display-name", default="", help="name shown in menus (default: NAME)")
    new.add_argument(
        "--trigger", action="append", default=[], metavar="WORDS", help="trigger word(s) (repeatable)"
    )
    new.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT[:CLIP_WEIGHT]]",
        help="a LoRA in the loras folder with its default weight (repeatable)",
    )
    new.add_argument("--prompt", default="", help="base prompt")
    new.add_argument("--negative", default="", help="negative prompt")
    new.add_argument("--identity", default="", help="saved identity name or path of its .json")
    new.add_argument("--photos", default="", help="folder of reference photos")
    new.add_argument(
        "--threshold", type=float, default=0.0, help="identity similarity needed (0 = identity's own)"
    )
    new.add_argument("--base-model", choices=BASE_MODELS, default="", help="the base model family")
    new.add_argument(
        "--steps", type=int, default=None, help=f"default: the base model's ({GenerationParams.steps} for SD)"
    )
    new.add_argument(
        "--cfg", type=float, default=None, help=f"default: the base model's ({GenerationParams.cfg} for SD)"
    )
    new.add_argument("--width", type=int, default=None, help="default 512 for sd15 (and none), else 1024")
    new.add_argument("--height", type=int, default=None, help="default 512 for sd15 (and none), else 1024")
    new.add_argument("--sampler", default=None, help="default: the base model's")
    new.add_argument("--scheduler", default=None, help="default: the base model's")
    new.add_argument("--seed", type=int, default=None)
    new.add_argument(
        "--folder",
        type=Path,
        help="write here instead of the characters folder (then list and show need the same --folder)",
    )
    new.add_argument(
        "--from-lora",
        type=Path,
        metavar="FILE",
        help="take trigger words and base model from this LoRA's metadata (and add it at --weight)",
    )
    new.add_argument("--weight", type=float, default=1.0, help="weight for --from-lora")
    _force_flag(new)
    _json_flag(new)
    new.set_defaults(func=cmd_character_new)

    listing = char_sub.add_parser("list", help="saved presets")
    listing.add_argument("--folder", type=Path, help="list this folder instead of the characters folder")
    _json_flag(listing)
    listing.set_defaults(func=cmd_character_list)

    show = char_sub.add_parser("show", help="a preset's fields and the prompt it produces")
    show.add_argument("name", help="a saved character name or a .yaml path")
    show.add_argument("--folder", type=Path, help="look in this folder instead of the characters folder")
    _json_flag(show)
    show.set_defaults(func=cmd_character_show)


# ------------------------------------------------------------------------------------------------------------


def _fail(out: Any, exc: BaseException) -> int:
    out.error(exc, EXIT_BAD_INPUT)
    return EXIT_BAD_INPUT


def _engine(module: str):
    import importlib

    try:
        return importlib.import_module(f"charforge.engine.library.{module}")
    except ImportError as exc:
        raise ImportError(
            f"this command needs the node pack's packages ({exc.name or exc}): "
            'pip install "charforge[nodes]"'
        ) from exc


def _split_weight(spec: str) -> tuple[str, float]:
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def cmd_lora_info(args: argparse.Namespace, out: Any) -> int:
    try:
        found = _engine("inspect").inspect_lora(args.file)
    except (OSError, ValueError, ImportError) as exc:
        return _fail(out, exc)
    if args.json:
        out.result("", **found.to_dict(with_metadata=args.metadata))
        return 0
    text = found.summary()
    if args.metadata:
        text += "\nmetadata:\n" + "\n".join(f"  {k} = {v}" for k, v in sorted(found.metadata.items()))
    out.result(text)
    return 0


def _energy_text(report: Any, per_module: bool = False) -> str:
    text = report.summary()
    if per_module:
        text += "\n" + "\n".join(
            f"  {100 * m.retained:7.3f}%  r{m.rank_before}->{m.rank_after}  {m.component} {m.name}"
            for m in report.modules
        )
    return text


def cmd_lora_merge(args: argparse.Namespace, out: Any) -> int:
    sources = [_split_weight(s) for s in args.sources]
    try:
        merge = _engine("merge")
        if args.output.exists() and not args.force:
            raise FileExistsError(f"{args.output} exists; choose another name or pass --force")
        path, report = merge.merge_files(
            sources, args.output, rank=args.rank, fmt=args.format, overwrite=args.force
        )
    except (OSError, ValueError, ImportError) as exc:
        return _fail(out, exc)
    data: dict[str, Any] = {"output": str(path), "sources": [{"file": p, "weight": w} for p, w in sources]}
    text = f"wrote {path} = " + " + ".join(f"{w:g} x {Path(p).name}" for p, w in sources)
    if report is not None:
        data["energy"] = report.to_dict()
        text += "\n" + _energy_text(report)
    out.result(text, **data)
    return 0


def cmd_lora_resize(args: argparse.Namespace, out: Any) -> int:
    try:
        merge = _engine("merge")
        path, report = merge.resize_file(args.file, args.output, args.rank, overwrite=args.force)
    except (OSError, ValueError, ImportError) as exc:
        return _fail(out, exc)
    out.result(
        f"wrote {path} (rank <= {args.rank})\n{_energy_text(report, args.modules)}",
        output=str(path),
        rank=args.rank,
        energy=report.to_dict(),
    )
    return 0


def cmd_lora_convert(args: argparse.Namespace, out: Any) -> int:
    try:
        formats = _engine("formats")
        state = formats.read_state(args.file)
        path = formats.write_state(state, args.output, args.to, overwrite=args.force)
    except (OSError, ValueError, ImportError) as exc:
        return _fail(out, exc)
    out.result(
        f"wrote {path}: {len(state.modules)} modules, {state.source_format} -> {args.to} ({state.arch})",
        output=str(path),
        modules=len(state.modules),
        source_format=state.source_format,
        format=args.to,
        base_model=state.arch,
    )
    return 0


def cmd_lora_eval(args: argparse.Namespace, out: Any) -> int:
    from charforge.driver.cli import connect

    from ..lora_eval import EvalOptions, evaluate_lora, load_character, parse_numbers, read_prompts

    options = EvalOptions(
        strengths=parse_numbers(args.strengths, float, "--strengths"),
        seeds=parse_numbers(args.seeds, int, "--seeds"),
        checkpoint=args.checkpoint,
        reference=args.reference,
        face_pack=args.face_pack,
        face_models_dir=args.face_models,
        det_size=args.det_size,
        clip_model=args.clip,
        device=args.device,
        identity_weight=args.identity_weight,
        text_weight=args.text_weight,
        window=max(1, args.window),
        timeout=args.timeout,
        verify_tls=False if args.insecure else None,
        cell=max(32, args.cell),
    )
    if args.prompts is not None:
        options.scenes = read_prompts(args.prompts)
    elif args.prompt:
        options.scenes = args.prompt
    character = load_character(args.character)  # before connecting: a typo fails at once
    with connect(args, out) as client:
        result = evaluate_lora(client, character, args.lora, args.out, options, note=out.note)
    best = result.best
    lines = [
        result.table_text,
        f"grid: {result.grid}",
        f"results: {result.results}",
        f"table: {result.table}",
    ]
    if result.failed:
        lines.append(
            f"{result.failed} of {len(result.images)} render(s) failed (see results.json); rerun the same "
            "command to retry them"
        )
    out.result(
        "\n".join(lines),
        best_strength=best.strength if best else None,
        per_strength=[s.to_dict() for s in result.strengths],
        grid=str(result.grid),
        results=str(result.results),
        table=str(result.table),
        failed=result.failed,
    )
    return 1 if result.failed else 0


def _lora_spec(spec: str):
    parts = spec.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2:
        try:
            weights.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    return ":".join(parts), (weights[0] if weights else 1.0), (weights[1] if len(weights) > 1 else None)


def cmd_character_new(args: argparse.Namespace, out: Any) -> int:
    try:
        chars = _engine("characters")
        triggers = [w.strip() for t in args.trigger for w in t.split(",") if w.strip()]
        loras = [CharacterLora(*_lora_spec(s)) for s in args.lora]
        base_model = args.base_model
        if args.from_lora is not None:
            found = _engine("inspect").inspect_lora(args.from_lora)
            triggers += [w for w in found.trigger_words if w not in triggers]
            if not base_model and found.base_model in BASE_MODELS:
                base_model = found.base_model
            elif not base_model and len(found.fits) == 1 and found.fits[0] in BASE_MODELS:
                base_model = found.fits[0]  # a Flux / SD3 LoRA whose shapes fit one variant (flux-dev ...)
            loras.insert(0, CharacterLora(args.from_lora.name, args.weight))
        defaults = family_generation(base_model)
        character = Character(
            name=safe_name(args.name),
            display_name=args.display_name or args.name,
            trigger_words=triggers,
            loras=loras,
            prompt=args.prompt,
            negative_prompt=args.negative,
            identity=args.identity,
            reference_photos=args.photos,
            threshold=args.threshold,
            base_model=base_model,
            generation=GenerationParams(
                steps=args.steps if args.steps is not None else defaults.steps,
                cfg=args.cfg if args.cfg is not None else defaults.cfg,
                width=args.width or defaults.width,
                height=args.height or defaults.height,
                sampler=args.sampler or defaults.sampler,
                scheduler=args.scheduler or defaults.scheduler,
                seed=args.seed,
                guidance=defaults.guidance,
                shift=defaults.shift,
            ),
        )
        path = chars.save_character(character, folder=args.folder, overwrite=args.force)
    except (OSError, ValueError, ImportError) as exc:
        return _fail(out, exc)
    message = f"wrote {path}"
    if args.folder is not None:
        # Outside the characters folder the name alone does not find it: say how to reach it.
        message += (
            f" (not in the characters folder: use 'charforge character show {character.name} --folder "
            f"{args.folder}' or the file's path; nodes and the storyboard take the path)"
        )
    out.result(message, path=str(path), name=character.name)
    return 0


def cmd_character_list(args: argparse.Namespace, out: Any) -> int:
    try:
        chars = _engine("characters")
        names = chars.list_characters(args.folder)
        rows = []
        for name in names:
            try:
                c = chars.load_character(name, args.folder)
                rows.append(
                    {
                        "name": name,
                        "display_name": c.display_name,
                        "trigger_words": c.trigger_words,
                        "loras": [lora.name for lora in c.loras],
                        "path": c.path,
                    }
                )
            except ValueError as exc:
                rows.append({"name": name, "error": str(exc)})
    except (OSError, ValueError, ImportError) as exc:
        return _fail(out, exc)
    if args.json:
        out.result("", characters=rows)
        return 0
    if not rows:
        out.note("no character saved yet: create one with 'charforge character new NAME ...'")
        return 0
    lines = [
        f"{r['name']}\t"
        + (
            f"INVALID: {r['error']}"
            if "error" in r
            else f"{r['display_name']}\t{', '.join(r['trigger_words'])}\t{', '.join(r['loras'])}"
        )
        for r in rows
    ]
    out.result("\n".join(lines))
    return 0


def cmd_character_show(args: argparse.Namespace, out: Any) -> int:
    try:
        c = _engine("characters").load_character(args.name, args.folder)
    except (OSError, ValueError, ImportError) as exc:
        return _fail(out, exc)
    data = {"name": c.name, "path": c.path, **c.to_dict(), "prompt_text": c.prompt_text()}
    if args.json:
        out.result("", **data)
        return 0
    import yaml

    out.result(
        f"# {c.path}\n"
        + yaml.safe_dump(c.to_dict(), sort_keys=False, allow_unicode=True).rstrip()
        + f"\n# prompt with trigger words: {json.dumps(c.prompt_text(), ensure_ascii=False)}"
    )
    return 0
