"""``charforge lora ...`` and ``charforge character ...``: the LoRA library and character presets.

Runs locally on files (no server). The engine is imported only when a command runs: ``lora info`` and the
``character`` commands need only safetensors, numpy and PyYAML (a driver-only install has them); merge,
resize and convert need the node pack's extra (torch, diffusers): ``pip install "charforge[nodes]"``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
FORMATS = ("kohya", "peft", "comfyui")


def register(sub: Any, *, server: argparse.ArgumentParser, output: Any) -> None:
    """Add the ``lora`` and ``character`` command groups."""
    del server, output  # local commands: no server options
    _register_lora(sub)
    _register_character(sub)


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")


def _force_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")


def _register_lora(sub: Any) -> None:
    lora = sub.add_parser("lora", help="inspect, merge, resize and convert LoRA files (local, no server)",
                          description="LoRA files: inspect them, merge several with weights, shrink the rank by "
                                      "SVD, convert between kohya, diffusers/peft and ComfyUI key layouts.")
    lora_sub = lora.add_subparsers(dest="lora_command", metavar="LORA_COMMAND", required=True)

    info = lora_sub.add_parser("info", help="format, base model, rank, alpha, trigger words, training settings")
    info.add_argument("file", type=Path, help="a .safetensors LoRA")
    info.add_argument("--metadata", action="store_true", help="also print every metadata key")
    _json_flag(info)
    info.set_defaults(func=cmd_lora_info)

    merge = lora_sub.add_parser("merge", help="weighted merge of LoRAs: FILE:WEIGHT ... -o OUT")
    merge.add_argument("sources", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA files with weights (default 1)")
    merge.add_argument("-o", "--output", type=Path, required=True, help="the merged .safetensors file")
    merge.add_argument("--rank", type=int, help="SVD-compress to at most this rank (default: exact, ranks add up)")
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


def _register_character(sub: Any) -> None:
    character = sub.add_parser("character", help="character presets: new, list, show",
                               description="Character presets (YAML) in <models>/charforge/characters/: the "
                                           "folder comes from $CHARFORGE_PATH_CHARFORGE, the config file's "
                                           "models section, $CHARFORGE_MODELS_DIR or $COMFYUI_DIR/models.")
    char_sub = character.add_subparsers(dest="character_command", metavar="CHARACTER_COMMAND", required=True)

    new = char_sub.add_parser("new", help="create a preset from flags (never overwrites without --force)")
    new.add_argument("name", help="the character's name (its file name)")
    new.add_argument("--display-name", default="", help="name shown in menus (default: NAME)")
    new.add_argument("--trigger", action="append", default=[], metavar="WORDS", help="trigger word(s) (repeatable)")
    new.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT[:CLIP_WEIGHT]]",
                     help="a LoRA in the loras folder with its default weight (repeatable)")
    new.add_argument("--prompt", default="", help="base prompt")
    new.add_argument("--negative", default="", help="negative prompt")
    new.add_argument("--identity", default="", help="saved identity name or path of its .json")
    new.add_argument("--photos", default="", help="folder of reference photos")
    new.add_argument("--threshold", type=float, default=0.0, help="identity similarity needed (0 = identity's own)")
    new.add_argument("--base-model", choices=("", "sd15", "sdxl"), default="", help="the base model family")
    new.add_argument("--steps", type=int, default=25)
    new.add_argument("--cfg", type=float, default=7.0)
    new.add_argument("--width", type=int, default=None, help="default 1024 for sdxl, else 512")
    new.add_argument("--height", type=int, default=None, help="default 1024 for sdxl, else 512")
    new.add_argument("--sampler", default="euler")
    new.add_argument("--scheduler", default="normal")
    new.add_argument("--seed", type=int, default=None)
    new.add_argument("--folder", type=Path, help="write here instead of the characters folder")
    new.add_argument("--from-lora", type=Path, metavar="FILE",
                     help="take trigger words and base model from this LoRA's metadata (and add it at --weight)")
    new.add_argument("--weight", type=float, default=1.0, help="weight for --from-lora")
    _force_flag(new)
    _json_flag(new)
    new.set_defaults(func=cmd_character_new)

    listing = char_sub.add_parser("list", help="saved presets")
    _json_flag(listing)
    listing.set_defaults(func=cmd_character_list)

    show = char_sub.add_parser("show", help="a preset's fields and the prompt it produces")
    show.add_argument("name", help="a saved character name or a .yaml path")
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
        raise ImportError(f"this command needs the node pack's packages ({exc.name or exc}): "
                          'pip install "charforge[nodes]"') from exc


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
        text += "\n" + "\n".join(f"  {100 * m.retained:7.3f}%  r{m.rank_before}->{m.rank_after}  {m.component} {m.name}"
                                 for m in report.modules)
    return text


def cmd_lora_merge(args: argparse.Namespace, out: Any) -> int:
    sources = [_split_weight(s) for s in args.sources]
    try:
        merge = _engine("merge")
        if args.output.exists() and not args.force:
            raise FileExistsError(f"{args.output} exists; choose another name or pass --force")
        path, report = merge.merge_files(sources, args.output, rank=args.rank, fmt=args.format,
                                         overwrite=args.force)
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
    out.result(f"wrote {path} (rank <= {args.rank})\n{_energy_text(report, args.modules)}",
               output=str(path), rank=args.rank, energy=report.to_dict())
    return 0


def cmd_lora_convert(args: argparse.Namespace, out: Any) -> int:
    try:
        formats = _engine("formats")
        state = formats.read_state(args.file)
        path = formats.write_state(state, args.output, args.to, overwrite=args.force)
    except (OSError, ValueError, ImportError) as exc:
        return _fail(out, exc)
    out.result(f"wrote {path}: {len(state.modules)} modules, {state.source_format} -> {args.to} ({state.arch})",
               output=str(path), modules=len(state.modules), source_format=state.source_format,
               format=args.to, base_model=state.arch)
    return 0


def _lora_spec(spec: str):
    parts = spec.split(":")
    weights = []
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
        loras = [chars.CharacterLora(*_lora_spec(s)) for s in args.lora]
        base_model = args.base_model
        if args.from_lora is not None:
            found = _engine("inspect").inspect_lora(args.from_lora)
            triggers += [w for w in found.trigger_words if w not in triggers]
            base_model = base_model or (found.base_model if found.base_model in ("sd15", "sdxl") else "")
            loras.insert(0, chars.CharacterLora(args.from_lora.name, args.weight))
        size = 1024 if base_model == "sdxl" else 512
        character = chars.Character(
            name=chars.safe_name(args.name), display_name=args.display_name or args.name, trigger_words=triggers,
            loras=loras, prompt=args.prompt, negative_prompt=args.negative, identity=args.identity,
            reference_photos=args.photos, threshold=args.threshold, base_model=base_model,
            generation=chars.GenerationParams(steps=args.steps, cfg=args.cfg, width=args.width or size,
                                              height=args.height or size, sampler=args.sampler,
                                              scheduler=args.scheduler, seed=args.seed))
        path = chars.save_character(character, folder=args.folder, overwrite=args.force)
    except (OSError, ValueError, ImportError) as exc:
        return _fail(out, exc)
    out.result(f"wrote {path}", path=str(path), name=character.name)
    return 0


def cmd_character_list(args: argparse.Namespace, out: Any) -> int:
    try:
        chars = _engine("characters")
        names = chars.list_characters()
        rows = []
        for name in names:
            try:
                c = chars.load_character(name)
                rows.append({"name": name, "display_name": c.display_name, "trigger_words": c.trigger_words,
                             "loras": [lora.name for lora in c.loras], "path": c.path})
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
    lines = [f"{r['name']}\t" + (f"INVALID: {r['error']}" if "error" in r else
                                 f"{r['display_name']}\t{', '.join(r['trigger_words'])}\t{', '.join(r['loras'])}")
             for r in rows]
    out.result("\n".join(lines))
    return 0


def cmd_character_show(args: argparse.Namespace, out: Any) -> int:
    try:
        c = _engine("characters").load_character(args.name)
    except (OSError, ValueError, ImportError) as exc:
        return _fail(out, exc)
    data = {"name": c.name, "path": c.path, **c.to_dict(), "prompt_text": c.prompt_text()}
    if args.json:
        out.result("", **data)
        return 0
    import yaml

    out.result(f"# {c.path}\n" + yaml.safe_dump(c.to_dict(), sort_keys=False, allow_unicode=True).rstrip()
               + f"\n# prompt with trigger words: {json.dumps(c.prompt_text(), ensure_ascii=False)}")
    return 0
