"""The pipeline's stages: each stage workflow run through :class:`Runner`, its outputs placed under ``--out``."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ...driver.client import ComfyClient
from ...driver.errors import ConfigError, DriverError
from ...driver.progress import JobView, make_renderer
from ...driver.sync import parse_train_summary
from ...driver.workflow.preflight import nodes_to_run
from ..remote import RemoteFiles
from .families import FAMILY_NAMES, IMAGES_WORKFLOW, encoders_by_role, group
from .options import TINY_MARK, TINY_TRAIN, WORKFLOWS, Models, PipelineError, PipelineOptions, Say, Server

# ------------------------------------------------------------------------------------------------------------
# Running one stage workflow
# ------------------------------------------------------------------------------------------------------------


def load_stage_workflow(name: str) -> dict[str, Any]:
    path = WORKFLOWS / f"{name}.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: charforge pipeline runs from a checkout of the CharForge repository"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _texts(result) -> dict[str, str]:
    """Each node's UI text, joined."""
    out = {}
    for values in result.values:
        text = values.values.get("text")
        if text:
            out[values.node_id] = "\n".join(str(t) for t in text)
    return out


class Runner:
    """Submits stage workflows to one server, shows their progress, downloads their outputs."""

    #: the server's files over HTTP when the pipeline runs remotely (recipes/remote.py)
    remote: RemoteFiles | None = None

    def __init__(self, client: ComfyClient, opts: PipelineOptions, say: Say, stderr: IO[str] | None = None):
        self.client = client
        self.opts = opts
        self.say = say
        self.stderr = stderr or sys.stderr

    def run(
        self, prompt: dict[str, Any], out_dir: Path | None, previews: str | None = None
    ) -> tuple[Any, dict[str, str], list[Path]]:
        """Run one stage workflow; its saved files land flat in `out_dir` (none when it is None).

        ComfyUI's temporary previews (Preview Image and the nodes' own previews) mostly show what is saved
        anyway: they are left on the server, unless `previews` names them (``score_table`` -> score_table.png)."""
        info = self.client.object_info(refresh=True)  # earlier stages add files (the LoRA) to the choices
        prepared = self.client.prepare_run(prompt, preflight=True, upload=False)
        view = JobView(prepared.prompt, nodes_to_run(prepared.prompt, info))
        renderer = make_renderer(self.opts.progress, view, stderr=self.stderr)
        job = self.client.submit(prepared.workflow)
        renderer.start()
        watch = self.client.watch(job, timeout=self.opts.stage_timeout)
        try:
            for event in watch:
                renderer.handle(event)
        except KeyboardInterrupt:
            renderer.close()
            self.say(f"cancelling job {job.prompt_id} ...")
            self.client.cancel(job.prompt_id)
            raise
        finally:
            renderer.close()
        result = watch.result
        files = self.collect(result, out_dir, previews) if out_dir is not None else []
        return result, _texts(result), files

    def collect(self, result: Any, out_dir: Path, previews: str | None = None) -> list[Path]:
        """Download a finished job's files into `out_dir`, flat (see :meth:`run`); returns their paths."""
        staging = out_dir / ".download"
        shutil.rmtree(staging, ignore_errors=True)
        downloads = self.client.download_outputs(result, staging, include_temp=previews is not None)
        files = [
            _place(d.path, out_dir, f"{previews}{d.path.suffix}" if d.source.type == "temp" else None)
            for d in downloads
        ]
        shutil.rmtree(staging, ignore_errors=True)
        return files


def _place(path: Path, folder: Path, name: str | None = None) -> Path:
    """Move a downloaded file into `folder` (flat) under its own name or `name`; a taken name gets -1, -2..."""
    target = folder / (name or path.name)
    number = 1
    while target.exists():
        target = folder / f"{Path(name or path.name).stem}-{number}{path.suffix}"
        number += 1
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.move(str(path), str(target)))


# ------------------------------------------------------------------------------------------------------------
# The stages
# ------------------------------------------------------------------------------------------------------------


def _match(pattern: str, text: str, what: str) -> str:
    found = re.search(pattern, text)
    if not found:
        raise PipelineError(f"could not find {what} in the node's message: {text[:300]}")
    return found.group(1).strip()


def stage_dataset(
    runner: Runner, opts: PipelineOptions, models: Models, state: dict[str, Any]
) -> dict[str, Any]:
    prompt = load_stage_workflow("dataset_prep")
    remote = _remote(runner)
    photos = remote.upload_photos(opts.photos, opts.character) if remote else str(opts.photos.resolve())
    prompt["1"]["inputs"].update(folder=photos, name=opts.character)
    if not opts.face_check:
        prompt["2"]["inputs"]["face_detector"] = "none"
        prompt["3"]["inputs"]["require_face"] = False
    prompt["5"]["inputs"]["buckets"] = "sd15" if models.arch == "sd15" else "sdxl"  # Flux, SD3: 1024 px too
    prompt["6"]["inputs"].update(trigger=opts.trigger, class_tokens=opts.class_tokens, export_name="kohya")
    prompt["7"]["inputs"]["trigger"] = opts.trigger
    _, texts, files = runner.run(prompt, opts.out / "dataset" / "selection")
    subject = _match(r"exported to (.+?) \(\d+ written", texts.get("6", ""), "the export folder")
    report = _match(r"report: (\S+report\.html)", texts.get("7", ""), "the report")
    accepted = int(_match(r"^(\d+) image\(s\) exported", texts.get("6", ""), "the number of photos"))
    if accepted == 0:
        raise PipelineError(
            "no photo passed the dataset filters: "
            + texts.get("7", "")
            + (" (drawn or non-human characters: pass --no-face-check)" if opts.face_check else "")
        )
    return {
        "train_data_dir": str(Path(subject).parent),
        "accepted": accepted,
        "report_html": _copy_report(report, opts.out / "dataset" / "selection", remote),
        "server_report_html": report,
        "contact_sheets": [str(f) for f in files],
        "summary": texts.get("7", ""),
    }


def _remote(runner: Any) -> RemoteFiles | None:
    return getattr(runner, "remote", None)


def _copy_report(report_html: str, folder: Path, remote: RemoteFiles | None = None) -> str:
    """Copy a Dataset Report's report.html and report.json (its contact sheets are downloaded next to them, the
    names it links to) into `folder`; returns the copy's path, or the server's path when it is not local."""
    if remote is not None:
        source = remote.local(report_html)
        report_html = str(source)
    source = Path(report_html)
    if not source.is_file():
        return report_html
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("report.html", "report.json", *(p.name for p in source.parent.glob("contact_sheet_*.png"))):
        if (source.parent / name).is_file():
            shutil.copy2(source.parent / name, folder / name)
    return str(folder / "report.html")


def _manifest_entries(export_dir: Path) -> list[dict[str, Any]]:
    """The entries of a kohya export's manifest.json (``[]`` when there is none)."""
    try:
        return json.loads((export_dir / "manifest.json").read_text(encoding="utf-8")).get("entries") or []
    except (OSError, ValueError, AttributeError):
        return []


def caption_names(
    captioned_export: Path, first_export: Path, to_local: Callable[[str], Path] | None = None
) -> dict[Path, str]:
    """Each caption file of the captioned export -> the name of the photo it belongs to (``pip_11.txt``).

    The chain renumbers files: the dataset stage exports the photos as 0001.jpg, ... and the caption stage loads
    that export as a new dataset and exports it again, numbered anew. The two exports' manifests lead back:
    a captioned file's source is a file of the first export, whose source is the photo. `to_local` maps a
    server path in a manifest to its downloaded twin (remote runs)."""
    photo_of = {
        str((first_export / e["file"]).resolve()): e.get("source")
        for e in _manifest_entries(first_export)
        if e.get("file")
    }
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for entry in _manifest_entries(captioned_export):
        if not entry.get("file"):
            continue
        caption = (captioned_export / entry["file"]).with_suffix(".txt")
        source = entry.get("source") or ""
        photo = photo_of.get(str(Path(_twin(to_local, source)).resolve())) or source
        stem = Path(photo).stem or caption.stem
        name = stem if stem not in taken else f"{stem}_{entry.get('id', len(taken))}"
        taken.add(name)
        names[caption] = f"{name}.txt"
    return names


def _twin(to_local: Callable[[str], Path] | None, source: str) -> str:
    if to_local is None or not source:
        return source
    try:
        return str(to_local(source))
    except DriverError:
        return source


def vlm_caption_node(opts: PipelineOptions, arch: str) -> dict[str, Any]:
    """Caption Dataset, VLM in place of the tagger: sentences, trigger and class first, limited to what the base
    model's text encoder reads (T5's 512 for Flux.1-dev and SD3/SD3.5, 256 for schnell; CLIP's 77 for SD1.5/SDXL)."""
    text_encoder = "clip" if group(arch) == "sd" else "t5"
    max_tokens = 75 if text_encoder == "clip" else 255 if arch == "flux-schnell" else 511
    return {
        "inputs": {
            "dataset": ["1", 0],
            "model": opts.caption_model,
            "style": "training caption",
            "mode": "overwrite",
            "trigger": opts.trigger,
            "class_tokens": opts.class_tokens,
            "template": "{trigger} {class}, {caption}",
            "keep_tokens": "",
            "banned_words": "",
            "style_tags": "",
            "max_tokens": max_tokens,
            "tokenizer": "comfyui",
            "batch_size": 4,
            "text_encoder": text_encoder,
        },
        "class_type": "CharForgeCaptionDatasetVLM",
        "_meta": {"title": "Caption Dataset, VLM (CharForge)"},
    }


def stage_captions(
    runner: Runner, opts: PipelineOptions, models: Models, state: dict[str, Any]
) -> dict[str, Any]:
    prompt = load_stage_workflow("caption_dataset")
    prompt["1"]["inputs"].update(
        folder=state["dataset"]["train_data_dir"], name=f"{opts.character}_captioned"
    )
    if opts.captioner == "vlm":
        prompt["2"] = vlm_caption_node(opts, models.arch)
    else:
        prompt["2"]["inputs"].update(
            backend="wd14", model=models.tagger, trigger=opts.trigger, class_tokens=opts.class_tokens
        )
    prompt["3"]["inputs"].update(
        trigger=opts.trigger, class_tokens=opts.class_tokens, export_name="captioned"
    )
    prompt["4"]["inputs"]["trigger"] = opts.trigger
    _, texts, _ = runner.run(prompt, None)
    subject = _match(r"exported to (.+?) \(\d+ written", texts.get("3", ""), "the export folder")
    remote = _remote(runner)
    export = remote.local(subject) if remote else Path(subject)  # remote: the dataset folders come home
    first = (
        remote.local(state["dataset"]["train_data_dir"])
        if remote
        else Path(state["dataset"]["train_data_dir"])
    )
    captions = sorted(export.glob("*.txt"))
    names = caption_names(export.parent.parent, first.parent, remote.twin if remote else None)
    target = opts.out / "captions"
    shutil.rmtree(target, ignore_errors=True)  # a rerun must not leave the names of an earlier run
    target.mkdir(parents=True)
    for caption in captions:
        shutil.copy2(caption, target / names.get(caption, caption.name))
    report = _match(r"report: (\S+report\.html)", texts.get("4", ""), "the report")
    return {
        "train_data_dir": str(Path(subject).parent),
        "captions_dir": str(target),
        "count": len(captions),
        "report_html": _copy_report(report, opts.out / "dataset", remote),
        "server_report_html": report,
        "summary": texts.get("2", ""),
    }


def stage_lora(
    runner: Runner, opts: PipelineOptions, models: Models, state: dict[str, Any]
) -> dict[str, Any]:
    if opts.train_on:  # on a hosted Replicate trainer or a RunPod serverless endpoint instead of the server
        from ..train_stage import stage_lora_elsewhere

        return stage_lora_elsewhere(runner, opts, models, state)
    prompt = load_stage_workflow("train_lora_sd15" if models.arch == "sd15" else "train_lora_sdxl")
    inputs = prompt["1"]["inputs"]
    if group(models.arch) != "sd":
        _flow_training(runner, models, inputs)
    inputs.update(
        base_model=models.train_base,
        dataset_folder=state["captions"]["train_data_dir"],
        trigger_word=opts.trigger,
        output_name=_marked(opts.character, models, suffix=True),
    )
    if models.tiny:
        inputs.update(TINY_TRAIN)
    _, texts, files = runner.run(prompt, opts.out / "lora")
    summary = texts.get("1", "")
    trained = parse_train_summary(
        summary
    )  # the same reading as `charforge batch run`'s (driver/sync/training.py)
    if trained is None:
        raise PipelineError(
            f"could not find the LoRA's name and run folder in the node's message: {summary[:300]}"
        )
    lora_name, run_dir = trained.lora, trained.run_dir
    remote = _remote(runner)
    if (
        remote is not None
    ):  # the LoRA (checked against the server's sha256) and the whole run folder come home
        home = remote.fetch_lora(lora_name, opts.out / "lora")
        run_files = remote.fetch(run_dir, opts.out / "lora" / "run")
        return {
            "lora_name": lora_name,
            "lora_path": home["path"],
            "lora_sha256": home["sha256"],
            "run_dir": run_dir,
            "run_copy": str(opts.out / "lora" / "run"),
            "run_files": len(run_files),
            "summary": summary,
            "files": [str(f) for f in files],
        }
    lora_path = None
    for folder in runner_server_models(runner) or []:
        candidate = folder / "loras" / lora_name
        if candidate.is_file():
            lora_path = candidate
            target = opts.out / "lora" / lora_name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(candidate, target)
            lora_path = target
    return {
        "lora_name": lora_name,
        "lora_path": str(lora_path) if lora_path else f"models/loras/{lora_name} on the server",
        "run_dir": run_dir,
        "summary": summary,
        "files": [str(f) for f in files],
    }


def _flow_training(runner: Runner, models: Models, inputs: dict[str, Any]) -> None:
    """Train LoRA's inputs for a Flux / SD3 base: its text encoders and VAE as the node's part inputs (the
    preset keeps its name: on these bases each preset is the transformer recipe). Refuses, naming the server,
    when its Train LoRA does not offer the base model (a CharForge without Flux/SD3.5 training)."""
    from .server import _choices

    client = getattr(runner, "client", None)
    info = client.object_info(refresh=True) if client is not None else {}
    if (
        client is not None
        and info
        and models.train_base not in _choices(info, "CharForgeTrainLoRA", "base_model")
    ):
        raise PipelineError(
            f"the Train LoRA node on {client.url} does not offer {models.train_base!r} "
            f"({FAMILY_NAMES[models.arch]}): update CharForge there to train {FAMILY_NAMES[models.arch]} LoRAs, "
            "or train elsewhere (--train-on)"
        )
    inputs.update(encoders_by_role(models.arch, models.text_encoders))
    if models.vae:
        inputs["vae"] = models.vae


def runner_server_models(runner: Runner) -> list[Path]:
    server: Server | None = getattr(runner, "server", None)
    if server is None:
        return []
    return [
        p
        for p in ([server.base_dir / "models"] if server.base_dir else [])
        + ([server.comfy_dir / "models"] if server.comfy_dir else [])
        if p.is_dir()
    ]


def _marked(name: str, models: Models, suffix: bool = False) -> str:
    """`name` with :data:`TINY_MARK` (before it, or after it with `suffix`) when tiny models made the file."""
    if not models.tiny:
        return name
    return f"{name}_{TINY_MARK}" if suffix else f"{TINY_MARK}_{name}"


def _prefix(opts: PipelineOptions, models: Models, kind: str) -> str:
    """A SaveImage / Save Video filename_prefix: the character's folder under ComfyUI's output folder."""
    return f"charforge/{opts.character}/{_marked(kind, models)}"


def _positive(opts: PipelineOptions) -> str:
    return (
        f"photo of {opts.trigger} {opts.class_tokens}, head and shoulders portrait, looking at the camera, "
        "natural light, sharp focus"
    )


def _build_identity(runner: Runner, opts: PipelineOptions, state: dict[str, Any]) -> None:
    identity = load_stage_workflow("build_identity")
    identity["2"]["inputs"].update(name=opts.character, folder=state["captions"]["train_data_dir"])
    runner.run(identity, opts.out / "images" / "identity", previews="identity_table")


def _best_of_n(
    runner: Runner, opts: PipelineOptions, models: Models, prompt: dict[str, Any], nodes: tuple[str, str]
) -> dict[str, Any]:
    """Run the best-of-N workflow, again with new seeds while its pick is below threshold (pipeline/retry.py);
    writes images/scores.txt (score node and Best of N reports of every round)."""
    from .retry import run_images

    header = f"scored by {'identity (InsightFace)' if models.faces else 'CLIP score'}"
    say = lambda text: runner.say(text)  # noqa: E731 - a stand-in runner may have no say until it retries
    return run_images(runner, prompt, opts.retry_policy(), opts.out / "images", header, nodes, say)


def _nodes(prompt: dict[str, Any], class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


def flow_images_prompt(opts: PipelineOptions, models: Models, lora: str) -> tuple[dict[str, Any], str, str]:
    """The Flux / SD3.5 best-of-N workflow set up for this run: (prompt, scores node, report node).

    The base model, its text encoders and VAE, the LoRA, the prompts, N and the family's sampling defaults;
    without an identity the face nodes go and the candidates are ranked by CLIP score alone."""
    from charforge.common.characters import family_generation

    gen = family_generation(models.arch)
    prompt = load_stage_workflow(IMAGES_WORKFLOW[group(models.arch)])
    (base,) = [n for n in prompt if prompt[n]["class_type"] in ("UNETLoader", "CheckpointLoaderSimple")]
    if models.base_folder == "checkpoints":  # a Flux all-in-one file: its MODEL output is the same socket
        prompt[base] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.checkpoint}}
    else:
        prompt[base] = {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": models.checkpoint, "weight_dtype": "default"},
        }
    (encoders,) = _nodes(prompt, "DualCLIPLoader") + _nodes(prompt, "TripleCLIPLoader")
    prompt[encoders]["inputs"].update(models.text_encoders)
    for vae in _nodes(prompt, "VAELoader"):
        prompt[vae]["inputs"]["vae_name"] = models.vae
    (lora_node,) = _nodes(prompt, "LoraLoaderModelOnly")
    prompt[lora_node]["inputs"]["lora_name"] = lora
    positive, _negative = _nodes(prompt, "CLIPTextEncode")
    prompt[positive]["inputs"]["text"] = _positive(opts)
    for node_id in _nodes(prompt, "ModelSamplingFlux") + _nodes(prompt, "EmptySD3LatentImage"):
        prompt[node_id]["inputs"].update(width=gen.width, height=gen.height)
    for node_id in _nodes(prompt, "ModelSamplingSD3"):
        prompt[node_id]["inputs"]["shift"] = gen.shift
    for node_id in _nodes(prompt, "FluxGuidance"):
        prompt[node_id]["inputs"]["guidance"] = gen.guidance
    (latent,) = _nodes(prompt, "EmptySD3LatentImage")
    prompt[latent]["inputs"]["batch_size"] = opts.candidates
    (sampler,) = _nodes(prompt, "KSampler")
    prompt[sampler]["inputs"].update(
        steps=gen.steps, cfg=gen.cfg, sampler_name=gen.sampler, scheduler=gen.scheduler
    )
    (best,) = _nodes(prompt, "CharForgeBestOfN")
    prompt[best]["inputs"]["group_size"] = opts.candidates
    (clip_score,) = _nodes(prompt, "CharForgeClipScore")
    prompt[clip_score]["inputs"]["prompt"] = _positive(opts).replace(f"{opts.trigger} ", "")
    (clip,) = _nodes(prompt, "CharForgeLoadClip")
    prompt[clip]["inputs"]["model"] = models.clip
    saves = {prompt[n]["inputs"]["images"][0] == best: n for n in _nodes(prompt, "SaveImage")}
    prompt[saves[False]]["inputs"]["filename_prefix"] = _prefix(opts, models, "candidate")
    prompt[saves[True]]["inputs"]["filename_prefix"] = _prefix(opts, models, "best")
    (combine,) = _nodes(prompt, "CharForgeCombineScores")
    if models.faces:
        (identity,) = _nodes(prompt, "CharForgeLoadIdentity")
        prompt[identity]["inputs"]["name"] = opts.character
        return prompt, combine, best
    for class_type in ("CharForgeLoadFaceModels", "CharForgeLoadIdentity", "CharForgeScoreIdentity"):
        for node_id in _nodes(prompt, class_type):
            del prompt[node_id]
    del prompt[combine]
    prompt[best]["inputs"]["scores"] = [clip_score, 0]
    return prompt, clip_score, best


def stage_images(
    runner: Runner, opts: PipelineOptions, models: Models, state: dict[str, Any]
) -> dict[str, Any]:
    lora = state["lora"]["lora_name"]
    if group(models.arch) != "sd":
        if models.faces:
            _build_identity(runner, opts, state)
        prompt, score_node, report_node = flow_images_prompt(opts, models, lora)
        return {
            **_best_of_n(runner, opts, models, prompt, (score_node, report_node)),
            "by": "identity" if models.faces else "clip",
            "family": models.arch,
        }
    size = 128 if models.tiny else (1024 if models.arch == "sdxl" else 512)
    steps = 4 if models.tiny else 25
    if models.faces:
        _build_identity(runner, opts, state)
        prompt = load_stage_workflow("score_best_of_n")
        prompt["9"]["inputs"]["name"] = opts.character
        prompt["11"]["inputs"]["group_size"] = opts.candidates
        prompt["13"]["inputs"]["filename_prefix"] = _prefix(opts, models, "best")
        report_node, score_node = "11", "10"
    else:
        prompt = load_stage_workflow("generate_best_of_n_clip")
        prompt["9"]["inputs"]["model"] = models.clip
        prompt["10"]["inputs"]["prompt"] = _positive(opts).replace(f"{opts.trigger} ", "")
        prompt["11"]["inputs"]["group_size"] = opts.candidates
        prompt["8"]["inputs"]["filename_prefix"] = _prefix(opts, models, "candidate")
        prompt["12"]["inputs"]["filename_prefix"] = _prefix(opts, models, "best")
        report_node, score_node = "11", "10"
    prompt["1"]["inputs"]["ckpt_name"] = models.checkpoint
    prompt["2"]["inputs"]["lora_name"] = lora
    prompt["3"]["inputs"]["text"] = _positive(opts)
    prompt["5"]["inputs"].update(width=size, height=size, batch_size=opts.candidates)
    prompt["6"]["inputs"].update(steps=steps)
    return {
        **_best_of_n(runner, opts, models, prompt, (score_node, report_node)),
        "by": "identity" if models.faces else "clip",
    }


def stage_video(
    runner: Runner, opts: PipelineOptions, models: Models, state: dict[str, Any]
) -> dict[str, Any]:
    if group(models.arch) != "sd":
        return {"skipped": f"no AnimateDiff video for a {FAMILY_NAMES[models.arch]} base (SD1.5/SDXL only)"}
    if models.motion is None:
        return {"skipped": "no motion module"}
    prompt = load_stage_workflow("video_animatediff")
    prompt["1"]["inputs"].update(base_model=models.train_base, motion_module=models.motion)
    prompt["2"]["inputs"]["lora_name"] = state["lora"]["lora_name"]
    prompt["3"]["inputs"]["prompt"] = (
        f"0: {_positive(opts)}\n8: {opts.trigger} {opts.class_tokens} smiling, turning the head"
    )
    if models.tiny:
        prompt["3"]["inputs"].update(
            frames=8, width=64, height=64, steps=2, context_length=8, context_overlap=2
        )
    else:
        prompt["3"]["inputs"].update(frames=16, context_length=16)
    prompt["4"]["inputs"]["filename_prefix"] = _prefix(opts, models, "video")
    if models.faces:
        prompt["6"]["inputs"]["name"] = opts.character
    else:  # no identity to compare with: drop the drift check
        for node_id in ("5", "6", "7", "8"):
            prompt.pop(node_id, None)
    _, texts, files = runner.run(
        prompt, opts.out / "video", previews="identity_drift" if models.faces else None
    )
    videos = [str(f) for f in files if f.suffix in (".mp4", ".webm", ".gif", ".webp")]
    return {
        "files": [str(f) for f in files],
        "video": videos[0] if videos else None,
        "drift": texts.get("7", "") if models.faces else "no identity (drift check skipped)",
    }


STAGE_FUNCTIONS = {
    "dataset": stage_dataset,
    "captions": stage_captions,
    "lora": stage_lora,
    "images": stage_images,
    "video": stage_video,
}
STAGE_TITLES = {
    "dataset": "dataset (load, analyse, filter, dedup, crop, export, report)",
    "captions": "captions (WD14 tagger on the exported dataset)",
    "lora": "LoRA training",
    "images": "images with the LoRA, best of N by score",
    "video": "AnimateDiff video with the LoRA",
}
