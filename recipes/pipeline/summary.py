"""The pipeline's state file (what makes a run resumable), its summary lines and the README in ``--out``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .options import STATE_FILE, TINY_MARK, Models, PipelineOptions

# ------------------------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------------------------


def load_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
    return {}


def save_state(out: Path, state: dict[str, Any]) -> None:
    path = out / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def _settings(opts: PipelineOptions, models: Models) -> dict[str, Any]:
    return {
        "photos": str(opts.photos.resolve()),
        "character": opts.character,
        "trigger": opts.trigger,
        "class_tokens": opts.class_tokens,
        "face_check": opts.face_check,
        "tiny": models.tiny,
        "checkpoint": models.checkpoint,
    }


def summary_lines(state: dict[str, Any], out: Path) -> list[str]:
    def shown(path: str | Path | None) -> str:
        if not path:
            return "-"
        try:
            return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(path)

    stages = state.get("stages", {})
    lines = ["", "WHERE TO LOOK"]
    if state.get("tiny"):
        lines.append(
            f"  (tiny random models: the files are real, their content is noise; names carry '{TINY_MARK}', "
            f"see {shown(out / README_FILE)})"
        )
    d, c = stages.get("dataset", {}), stages.get("captions", {})
    lines.append(
        f"  dataset report : {shown(c.get('report_html'))}  (the dataset as trained: photos, captions, "
        "trigger word, buckets)"
    )
    lines.append(
        f"  photo selection: {shown(d.get('report_html'))}  ({d.get('accepted', '?')} photos kept, why the "
        "others were not, duplicates)"
    )
    lines.append(
        f"  captions       : {shown(c.get('captions_dir'))}/  ({c.get('count', '?')} .txt files named after "
        "the photos)"
    )
    lines.append(f"  training folder: {shown(c.get('train_data_dir'))}")
    lo = stages.get("lora", {})
    lines.append(
        f"  LoRA           : {shown(lo.get('lora_path'))}  (loss curve and samples next to it; run folder: "
        f"{shown(lo.get('run_dir'))})"
    )
    im = stages.get("images", {})
    lines.append(
        f"  scored images  : {shown(out / 'images')}/  (scores: {shown(im.get('scores'))}, picked by "
        f"{im.get('by', '?')})"
    )
    lines += _retry_lines(im.get("retries"), shown)
    v = stages.get("video", {})
    lines.append(f"  video          : {shown(v.get('video')) if v.get('video') else v.get('skipped', '-')}")
    lines.append(
        f"  state          : {shown(out / STATE_FILE)} (a rerun skips finished stages; delete it to "
        "start over)"
    )
    pod = state.get("pod")
    if pod:
        cost = f"${pod['cost_usd']:.4f}" if pod.get("cost_usd") is not None else "price unknown"
        lines.append(
            f"  RunPod pod     : {pod['id']}: {pod.get('seconds', 0):.0f} s, {cost} (boot and idle included); "
            f"{pod.get('finish')}"
        )
    return lines


def _retry_lines(retries: dict[str, Any] | None, shown: Any) -> list[str]:
    """The images stage's rounds (pipeline/retry.py): which was kept, and a warning when none passed."""
    if not retries or not retries.get("rounds"):
        return []
    rounds = retries["rounds"]
    kept = retries.get("kept_round", 1)
    best = ", ".join(shown(p) for p in rounds[kept - 1].get("best") or []) or "-"
    lines = []
    if len(rounds) > 1 or not retries.get("passed"):
        lines.append(f"  best image     : {best}  (round {kept} of {len(rounds)} kept)")
    if not retries.get("passed"):
        lines.append(
            f"  !! no pick passed the thresholds in {len(rounds)} round(s) (CLIPScore >= "
            f"{retries.get('min_text')}, identity >= {rounds[kept - 1].get('min_identity') or '-'}); "
            "the best one is kept, every round's scores are in the state file"
        )
    return lines


README_FILE = "README.txt"


def out_readme(state: dict[str, Any]) -> str:
    """The text of ``out/README.txt``: what each folder of a pipeline run holds."""
    settings = state.get("settings", {})
    character = settings.get("character", "<character>")
    text = []
    if state.get("tiny"):
        text += [
            "TINY RANDOM MODELS - THE PICTURES, CAPTIONS, LoRA AND VIDEO HERE ARE NOISE",
            "",
            "No base checkpoint was found, so this run used tiny randomly initialised models of the real",
            "architectures (in comfyui/models). Every stage ran for real, through ComfyUI's own loaders,",
            "but the tagger's captions are arbitrary tags, the LoRA learned nothing useful and the images and",
            f"video are noise. Files made by these models carry '{TINY_MARK}' in their names. Put an SD1.5 or",
            "SDXL checkpoint into ComfyUI's models/checkpoints (and an AnimateDiff motion module into",
            "models/animatediff_models) and run the command again for real results.",
            "",
        ]
    text += [
        f"CharForge pipeline output for '{character}' (trigger word '{settings.get('trigger', '?')}',",
        f"photos from {settings.get('photos', '?')}).",
        "",
        "dataset/      the dataset report (report.html, written after captioning: every photo trained on",
        "              with its caption, trigger word, buckets) and its contact sheets; selection/ holds",
        "              the report of the photo selection (which photos were kept, why the others were not)",
        "captions/     one caption per photo, named after it (trigger word first)",
        "lora/         the LoRA (.safetensors), its loss curve and training samples",
        "images/       the generated candidates, the best one(s), scores.txt and the score table",
        "video/        the AnimateDiff clip (.mp4); with face checks also identity_drift.png",
        "comfyui/      the ComfyUI base directory when the pipeline started its own ComfyUI (its output,",
        "              models, log); the datasets and the training run folder are in comfyui/output/charforge",
        f"{STATE_FILE}  what finished, with every path; a rerun skips finished stages",
        "",
    ]
    return "\n".join(text)


def write_out_readme(out: Path, state: dict[str, Any]) -> None:
    (out / README_FILE).write_text(out_readme(state), encoding="utf-8")
