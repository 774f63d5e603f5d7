"""One training job from start to LoRA: load, check, cache, train, save — resumable at every step.

`train()` is what the ComfyUI node (and a plain-Python script) calls::

    from charforge.engine.train.job import TrainRequest, train
    from charforge.engine.train.config import preset_config

    result = train(TrainRequest(base_model="sdxl.safetensors", dataset="img/", runs_dir="runs",
                                name="alice", config=preset_config("sdxl", "sdxl"), lora_dir="loras"))

Resume (``resume="auto"``, the default): a run folder with the same name, the same base model, the same
dataset and requested settings that compute the same thing (`TrainConfig.result_hash`) continues from
its saved state — after a cancel, a crash, or to train more steps. It keeps the optimizer and batch its
first preflight chose; only gradient checkpointing may be switched (it recomputes the same numbers).
Anything else starts a new folder (``<name>-2``, ...). ``resume="never"`` always starts fresh.

Training needs gradients even where the caller disabled them (ComfyUI runs nodes under
``torch.inference_mode()``); `train` re-enables them, seeds the global torch RNG (LoRA dropout) and
restores the TF32 / cuDNN settings it changes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .data import TrainingData, cache_key, load_items, tag_frequency
from .export import export_lora, lora_metadata
from .loop import StepReport, Trainer, TrainingStopped, pick_device
from .models import BaseModel, fingerprint, load_base_model
from .run import MetricsRow, RunFolder, existing_runs, mark_active, safe_run_name
from .samples import plan_samples, render_samples, sample_prompts

log = logging.getLogger("charforge")

RESUME_MODES = ("auto", "never")


class TrainingCancelled(Exception):
    """Training was stopped on request; the run folder holds a state that resumes."""

    def __init__(self, run_dir: str, step: int):
        super().__init__(f"training cancelled at step {step}; queue it again to resume ({run_dir})")
        self.run_dir = run_dir
        self.step = step


@dataclass
class TrainRequest:
    """What to train and where to put it."""

    base_model: str  # single-file checkpoint or diffusers folder (full path)
    dataset: Any  # kohya folder, manifest (object or manifest.json), or (image, caption) pairs
    runs_dir: str
    name: str = "charforge_lora"
    config: TrainConfig = field(default_factory=TrainConfig)
    lora_dir: str | None = None  # the final LoRA is also copied here (ComfyUI's loras folder)
    resume: str = "auto"
    device: str = "auto"
    memory_profile: str = "auto"  # "auto": pick memory options by preflight; "check": refuse only; "off"
    config_dir: str | None = None  # configs for a non-standard single file (tests)
    tokenizer_dirs: tuple[str, ...] = ()  # where the CLIP vocabulary may be (single files)


@dataclass
class TrainResult:
    run_dir: str
    lora_path: str  # in the run folder
    exported_path: str | None  # in lora_dir
    step: int
    loss: float
    samples: list[str]
    loss_curve: str
    resumed_from: int
    estimate: dict[str, Any] | None = None


ProgressCallback = Callable[[dict[str, Any]], None]


def _dataset_hash(data: TrainingData) -> str:
    masks = data.mask_hashes() if data.settings.uses_masks else [""] * len(data.items)
    rows = [(h, item.caption, item.repeats, m) for h, item, m in zip(data.hashes, data.items, masks, strict=True)]
    return cache_key(rows, data.settings.__dict__)


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    from ... import __version__

    return {"charforge": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version()}


def _unet_config_file(request: TrainRequest) -> dict:
    """The U-Net config the base model will be built from (before loading it)."""
    from .models import detect_arch, shipped_config_dir

    source = Path(request.base_model)
    if source.is_dir():
        folder = source
    else:
        folder = Path(request.config_dir) if request.config_dir else shipped_config_dir(detect_arch(source))
    return json.loads((folder / "unet" / "config.json").read_text())


def _find_resumable(request: TrainRequest, requested: TrainConfig, identity: dict[str, str]) -> RunFolder | None:
    """The newest run folder of this name that trained the same thing and holds a state, if any."""
    if request.resume not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES}, got {request.resume!r}")
    if request.resume != "auto":
        return None
    for folder in existing_runs(request.runs_dir, safe_run_name(request.name)):
        saved = folder.read_config()
        if not folder.state_path.is_file() or saved.get("identity") != identity:
            continue
        if saved.get("request_hash") != requested.result_hash():
            continue
        if requested.optim.schedule != "constant" and saved.get("config", {}).get("steps") != requested.steps:
            continue  # the schedule depends on the total: not the same computation
        return folder
    return None


def _resumed_config(saved: dict[str, Any], requested: TrainConfig) -> TrainConfig:
    """The saved run's config (with the memory options its preflight chose) plus the fields a resume may
    change, from the new request."""
    config = TrainConfig.from_dict(saved["config"])
    return replace(config, steps=requested.steps, samples=requested.samples, checkpoint_every=requested.checkpoint_every,
                   state_every=requested.state_every, compile=requested.compile,
                   trigger_word=requested.trigger_word, save_dtype=requested.save_dtype)


def train(request: TrainRequest, on_progress: ProgressCallback | None = None,
          should_stop: Callable[[], bool] | None = None,
          is_cancellation: Callable[[BaseException], bool] | None = None) -> TrainResult:
    """Run (or resume) a training job; see the module docstring.

    ``on_progress(event)`` gets dicts with ``phase`` ("loading", "caching", "training", "sampling",
    "saving", "done") and, while training, ``step``, ``total_steps``, ``loss``, ``lr``,
    ``steps_per_second``, ``eta_seconds``. It may raise to stop the run (ComfyUI's interrupt does);
    ``is_cancellation(exc)`` tells such exceptions from errors. Raises `TrainingCancelled` when
    ``should_stop()`` returned True; the state to resume is saved in both cases.
    """
    # ComfyUI runs nodes under torch.inference_mode(): tensors made there cannot take part in autograd.
    # The trainer sets TF32 / cuDNN autotuning for itself; the host process gets its own settings back.
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return _train(request, on_progress, should_stop, is_cancellation)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the model is gone: give the memory back to ComfyUI


def _train(request: TrainRequest, on_progress: ProgressCallback | None, should_stop, is_cancellation) -> TrainResult:
    report = on_progress or (lambda event: None)
    started = time.time()
    device = pick_device(request.device)
    config = request.config
    load_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
    if device.type == "cpu" and load_dtype == torch.float16:
        load_dtype = torch.float32  # fp16 kernels are missing or slow on CPUs

    if device.type == "cpu" and config.mixed_precision != "no":
        config = replace(config, mixed_precision="no")  # autocast on CPU is slower than fp32 for these models

    # The preflight trace needs only the U-Net config: run it while the weights load.
    unet_config, profiling = None, None
    if request.memory_profile != "off":
        from .preflight import profile_for

        unet_config = _unet_config_file(request)
        profiling = ThreadPoolExecutor(1, thread_name_prefix="charforge-preflight")
        traced = profiling.submit(profile_for, unet_config, config)
    report({"phase": "loading", "message": f"loading {os.path.basename(request.base_model)}"})
    try:
        model = load_base_model(request.base_model, dtype=load_dtype, config_dir=request.config_dir,
                                tokenizer_candidates=request.tokenizer_dirs)
    finally:
        if profiling is not None:
            profiling.shutdown(wait=False)
    items = load_items(request.dataset)
    cache_dir = Path(request.runs_dir) / "_cache"
    data = TrainingData.prepare(items, config.data, cache_dir=cache_dir)

    identity = {"base_model": fingerprint(model.unet), "text": model.fingerprints.get("text_encoder", ""),
                "vae": model.fingerprints["vae"], "dataset": _dataset_hash(data), "arch": model.arch}
    requested = config
    folder = _find_resumable(request, requested, identity)
    resuming = folder is not None
    if resuming:
        config = _resumed_config(folder.read_config(), requested)

    estimate = None
    if request.memory_profile != "off":
        from .preflight import auto_profile, check, device_info

        traced.result()  # re-raise a tracing error here rather than in a thread
        info = device_info(device, load_dtype)
        if resuming or request.memory_profile == "check":
            # A resumed run keeps its optimizer and batch; only gradient checkpointing may change.
            chooser = auto_profile if request.memory_profile == "auto" else check
            estimate = chooser(model, config, info, num_images=len(items), unet_config=unet_config,
                               **({"only_checkpointing": True} if chooser is auto_profile else {}))
        else:
            estimate = auto_profile(model, config, info, num_images=len(items), unet_config=unet_config)
        config = estimate.config
        log.info("CharForge training preflight: %s", estimate.summary())
    if folder is None:
        folder = RunFolder.create(request.runs_dir, safe_run_name(request.name))
    mark_active(folder, True)
    try:
        return _train_in_folder(request, config, requested, model, data, device, folder, resuming, identity,
                                estimate, report, should_stop, is_cancellation, started)
    finally:
        mark_active(folder, False)


def _train_in_folder(request: TrainRequest, config: TrainConfig, requested: TrainConfig, model: BaseModel,
                     data: TrainingData, device: torch.device, folder: RunFolder, resuming: bool,
                     identity: dict[str, str], estimate, report: ProgressCallback, should_stop, is_cancellation,
                     started: float) -> TrainResult:
    folder.write_config({
        "config": config.to_dict(), "request_hash": requested.result_hash(), "identity": identity,
        "base_model": request.base_model, "arch": model.arch, "trigger_word": config.trigger_word,
        "dataset": {"images": len(data.items), "samples_per_epoch": data.num_samples,
                    "buckets": data.bucket_histogram(), "subsets": sorted({i.subset for i in data.items})},
        "device": str(device), "versions": _versions(),
        "preflight": estimate.as_dict() if estimate is not None else None,
    })
    folder.update_status(state="running", phase="caching", total_steps=config.steps, error=None,
                         started_at=folder.read_status().get("started_at") or started)

    def on_cache(what: str, done: int, total: int) -> None:
        report({"phase": "caching", "what": what, "done": done, "total": total})

    trainer = Trainer(model, data, config, device)
    resumed_from = 0
    pending: list[MetricsRow] = []
    try:
        trainer.setup(on_cache=on_cache)
        if resuming:
            trainer.load_state_dict(folder.load_state())
            resumed_from = trainer.step
            log.info("CharForge: resuming %s at step %d", folder.name, resumed_from)
        folder.truncate_metrics(resumed_from)
        captions = [item.caption for item in data.items]
        plan = plan_samples(model, config.samples, sample_prompts(config.samples, config.trigger_word, captions),
                            config.samples.size or config.data.resolution, device, config.clip_skip,
                            config.max_token_length)
        trainer.train(**_step_hooks(folder, trainer, model, data, config, request, plan, pending, report, started),
                      should_stop=should_stop)
        return _finish(folder, trainer, model, data, config, request, plan, report, started, resumed_from,
                       estimate)
    except BaseException as exc:
        if pending:
            folder.append_metrics(pending)
        cancelled = isinstance(exc, (TrainingStopped, KeyboardInterrupt)) or bool(is_cancellation and is_cancellation(exc))
        # Steps done since the last saved state are kept, unless the error hit the weights update itself.
        if trainer.optimizer is not None and not trainer.updating and \
                (trainer.step > resumed_from or not folder.state_path.is_file()):
            _save_state(folder, trainer)
        folder.write_loss_curve()
        folder.update_status(state="cancelled" if cancelled else "failed", step=trainer.step,
                             error=None if cancelled else f"{type(exc).__name__}: {exc}")
        if isinstance(exc, TrainingStopped):
            raise TrainingCancelled(str(folder.root), trainer.step) from None
        raise


def _save_samples(folder: RunFolder, model: BaseModel, plan, device, trainer: Trainer, report, step: int) -> list[str]:
    report({"phase": "sampling", "step": step})
    paths = []
    for index, image in enumerate(render_samples(model, plan, device, trainer.autocast_dtype)):
        path = folder.sample_path(step, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        image.save(tmp)
        os.replace(tmp, path)
        paths.append(str(path))
    return paths


def _step_hooks(folder: RunFolder, trainer: Trainer, model: BaseModel, data: TrainingData, config: TrainConfig,
                request: TrainRequest, plan, pending: list[MetricsRow], report: ProgressCallback,
                started: float) -> dict[str, Callable]:
    """``on_step`` (metrics, status, progress) and ``after_step`` (samples, checkpoints, state)."""
    last_status = [0.0]
    state_every = config.state_every or config.checkpoint_every

    def on_step(step_report: StepReport) -> None:
        pending.append(MetricsRow(step_report.step, step_report.loss, step_report.lr,
                                  round(step_report.steps_per_second, 4), step_report.epoch,
                                  round(step_report.elapsed_seconds, 3)))
        now = time.monotonic()
        if now - last_status[0] > 1.0 or step_report.step == step_report.total_steps:
            last_status[0] = now
            folder.update_status(state="running", phase="training", step=step_report.step, loss=step_report.loss,
                                 eta_seconds=round(step_report.eta_seconds, 1))
        report({"phase": "training", "step": step_report.step, "total_steps": step_report.total_steps,
                "loss": step_report.loss, "lr": step_report.lr, "steps_per_second": step_report.steps_per_second,
                "eta_seconds": step_report.eta_seconds})

    def after_step(step: int) -> None:
        if pending:
            folder.append_metrics(pending)
            pending.clear()
        if config.samples.every and step % config.samples.every == 0 and step < config.steps:
            _save_samples(folder, model, plan, trainer.device, trainer, report, step)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            export_lora(folder.checkpoint_path(step), trainer.network, model.arch, model.unet_config,
                        _lora_metadata(folder.name, config, model, data, step, started, request.base_model),
                        _save_dtype(config))
        if state_every and step % state_every == 0 and step < config.steps:
            _save_state(folder, trainer)

    return {"on_step": on_step, "after_step": after_step}


def _finish(folder: RunFolder, trainer: Trainer, model: BaseModel, data: TrainingData, config: TrainConfig,
            request: TrainRequest, plan, report: ProgressCallback, started: float, resumed_from: int,
            estimate) -> TrainResult:
    """Done: final samples, the LoRA (run folder + loras), the state (so "train more" can continue)."""
    report({"phase": "saving", "step": trainer.step})
    samples = [str(p) for p in folder.samples_at(trainer.step)] or \
        _save_samples(folder, model, plan, trainer.device, trainer, report, trainer.step)
    metadata = _lora_metadata(folder.name, config, model, data, trainer.step, started, request.base_model)
    lora_path = export_lora(folder.lora_path, trainer.network, model.arch, model.unet_config, metadata,
                            _save_dtype(config))
    exported = None
    if request.lora_dir:
        exported = Path(request.lora_dir) / lora_path.name
        exported.parent.mkdir(parents=True, exist_ok=True)
        tmp = exported.with_name(f".{exported.name}.tmp")
        shutil.copyfile(lora_path, tmp)
        os.replace(tmp, exported)
    _save_state(folder, trainer)
    curve = folder.write_loss_curve()
    folder.update_status(state="completed", phase="done", step=trainer.step, loss=trainer.last_loss, eta_seconds=0,
                         lora=str(exported or lora_path), finished_at=time.time())
    report({"phase": "done", "step": trainer.step, "lora": str(exported or lora_path)})
    return TrainResult(str(folder.root), str(lora_path), str(exported) if exported else None, trainer.step,
                       trainer.last_loss, samples, str(curve), resumed_from,
                       estimate.as_dict() if estimate is not None else None)


def _save_dtype(config: TrainConfig) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config.save_dtype]


def _save_state(folder: RunFolder, trainer: Trainer) -> None:
    folder.save_state(trainer.state_dict())
    folder.update_status(state_step=trainer.step)


def _lora_metadata(title: str, config: TrainConfig, model: BaseModel, data: TrainingData, step: int,
                   started: float, base_model: str) -> dict[str, str]:
    epoch_batches = max(1, len(data.epoch_batches(0, config.batch_size, config.seed)))
    training = {
        "learning_rate": config.optim.learning_rate,
        "unet_lr": config.optim.learning_rate,
        "text_encoder_lr": (config.optim.text_encoder_lr or config.optim.learning_rate / 10)
        if config.lora.train_text_encoder else 0.0,
        "optimizer": config.optim.optimizer,
        "lr_scheduler": config.optim.schedule,
        "lr_warmup_steps": config.optim.warmup_steps,
        "max_grad_norm": config.optim.max_grad_norm,
        "gradient_accumulation_steps": config.optim.grad_accumulation,
        "gradient_checkpointing": config.gradient_checkpointing,
        "mixed_precision": config.mixed_precision,
        "steps": step,
        "max_train_steps": config.steps,
        "epoch": step * config.optim.grad_accumulation // epoch_batches,
        "num_epochs": -(-config.steps * config.optim.grad_accumulation // epoch_batches),
        "num_batches_per_epoch": epoch_batches,
        "batch_size_per_device": config.batch_size,
        "total_batch_size": config.batch_size * config.optim.grad_accumulation,
        "num_train_images": len(data.items),
        "num_reg_images": 0,
        "enable_bucket": config.data.enable_buckets,
        "min_bucket_reso": config.data.min_bucket,
        "max_bucket_reso": config.data.max_bucket,
        "bucket_info": {"buckets": data.bucket_histogram()},
        "dataset_dirs": {s: {"n_repeats": next(i.repeats for i in data.items if i.subset == s),
                             "img_count": sum(1 for i in data.items if i.subset == s)}
                         for s in sorted({i.subset for i in data.items})},
        "cache_latents": config.data.cache_latents,
        "clip_skip": config.clip_skip,
        "max_token_length": config.max_token_length,
        "shuffle_caption": config.data.shuffle_caption,
        "keep_tokens": config.data.keep_tokens,
        "caption_dropout_rate": config.data.caption_dropout,
        "flip_aug": config.data.flip,
        "masked_loss": config.data.masked_loss,
        "face_mask": config.data.face_mask,
        "color_aug": False,
        "random_crop": False,
        "min_snr_gamma": config.min_snr_gamma,
        "noise_offset": config.noise_offset,
        "loss_type": "l2",
        "seed": config.seed,
        "sd_model_name": os.path.basename(base_model),
        "training_started_at": started,
        "training_finished_at": time.time(),
        "charforge_trigger_word": config.trigger_word,
    }
    return lora_metadata(arch=model.arch, settings=config.lora, title=title, trigger_phrase=config.trigger_word,
                         resolution=(config.data.resolution, config.data.resolution), training=training,
                         tag_frequency=tag_frequency(data.items),
                         prediction_type="v" if model.prediction_type == "v_prediction" else "epsilon")


__all__ = ["TrainRequest", "TrainResult", "TrainingCancelled", "train"]
