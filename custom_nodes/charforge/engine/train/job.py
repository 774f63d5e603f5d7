"""One training job from start to LoRA: load, check, cache, train, save — resumable at every step.

(Over 600 lines on purpose: one job from load to save, resumable at every step; the request, the resume checks
and :class:`TrainingSession` share the run folder's state and read best in order.)

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..control import Cancelled, Control, or_default
from .config import TrainConfig
from .data import TrainingData, cache_key, load_items, tag_frequency
from .export import export_lora, lora_metadata
from .loop import StepReport, Trainer, pick_device
from .models import detect_arch, fingerprint, is_flow_arch, load_base_model
from .run import MetricsRow, RunFolder, existing_runs, mark_active, safe_run_name
from .samples import plan_samples, render_samples, sample_prompts

log = logging.getLogger("charforge")

RESUME_MODES = ("auto", "never")
EVENT_INTERVAL = 0.5  # seconds between ``train.progress`` events while steps run


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
    t5_tokenizer_dirs: tuple[str, ...] = ()  # where T5's tokenizer.json may be (Flux.1 / SD3 single files)
    # Flux.1 / SD3 parts a diffusion-model file lacks, by name: clip_l, clip_g (SD3), t5, vae (file paths).
    parts: dict[str, str] | None = None
    lora_layout: str = "kohya"  # Flux.1 / SD3: "kohya" (fused, what ComfyUI loads) or "peft" (diffusers)
    origin: dict[str, Any] | None = (
        None  # where it was queued from (a ComfyUI prompt and its id): origin.json
    )


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


def _dataset_hash(data: TrainingData) -> str:
    masks = data.mask_hashes() if data.settings.uses_masks else [""] * len(data.items)
    rows = [
        (h, item.caption, item.repeats, m) for h, item, m in zip(data.hashes, data.items, masks, strict=True)
    ]
    return cache_key(rows, data.settings.__dict__)


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    from ... import __version__

    return {
        "charforge": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def _unet_config_file(request: TrainRequest) -> dict:
    """The U-Net config the base model will be built from (before loading it)."""
    from .models import detect_arch, shipped_config_dir

    source = Path(request.base_model)
    if source.is_dir():
        folder = source
    else:
        folder = Path(request.config_dir) if request.config_dir else shipped_config_dir(detect_arch(source))
    return json.loads((folder / "unet" / "config.json").read_text())


def _find_resumable(
    request: TrainRequest, requested: TrainConfig, identity: dict[str, str]
) -> RunFolder | None:
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
    return replace(
        config,
        steps=requested.steps,
        samples=requested.samples,
        checkpoint_every=requested.checkpoint_every,
        state_every=requested.state_every,
        compile=requested.compile,
        trigger_word=requested.trigger_word,
        save_dtype=requested.save_dtype,
    )


def train(request: TrainRequest, control: Control | None = None) -> TrainResult:
    """Run (or resume) a training job; see the module docstring.

    `control` gets the steps as progress (``control.progress(step, total_steps, text)``) and
    ``train.progress`` events: dicts with ``run``, ``phase`` ("loading", "caching", "training", "sampling",
    "saving", "done") and, while training, ``step``, ``total_steps``, ``loss``, ``lr``,
    ``steps_per_second``, ``eta_seconds`` (at most every `EVENT_INTERVAL` seconds while steps run). When
    it stops the work (`Cancelled`, or ComfyUI's Cancel) the state of the last completed step is saved,
    the run is marked cancelled and the exception goes on: queue the same job again to resume.
    """
    # ComfyUI runs nodes under torch.inference_mode(): tensors made there cannot take part in autograd.
    # The trainer sets TF32 / cuDNN autotuning for itself; the host process gets its own settings back.
    flags = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return _train(request, _Reporter(or_default(control), safe_run_name(request.name)))
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = flags
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the model is gone: give the memory back to ComfyUI


class _Reporter:
    """The job's updates -> `Control`: steps as progress, every phase as a (throttled) ``train.progress``
    event; the phases between steps check for a stop."""

    def __init__(self, control: Control, run: str):
        self.control = control
        self.run = run
        self._last_event = 0.0

    def step_done(self, step: int, total: int) -> None:
        """A training step finished (its loss is read back later): the progress bar moves and a stop lands."""
        self.control.progress(step, total)

    def __call__(self, event: dict[str, Any]) -> None:
        training = event.get("phase") == "training"
        self.control.check()  # the step's progress went out when it finished (`step_done`); this has its loss
        now = time.monotonic()
        if not training or now - self._last_event >= EVENT_INTERVAL or event["step"] == event["total_steps"]:
            self._last_event = now
            self.control.event(
                "train.progress",
                {
                    "run": self.run,
                    **{key: value for key, value in event.items() if isinstance(value, (int, float, str))},
                },
            )


def _train(request: TrainRequest, report: _Reporter) -> TrainResult:
    started = time.time()
    device = pick_device(request.device)
    config = request.config
    load_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
    if device.type == "cpu" and load_dtype == torch.float16:
        load_dtype = torch.float32  # fp16 kernels are missing or slow on CPUs

    if device.type == "cpu" and config.mixed_precision != "no":
        config = replace(config, mixed_precision="no")  # autocast on CPU is slower than fp32 for these models
    arch = detect_arch(request.base_model)
    if is_flow_arch(arch):
        return _train_flow(request, report, config, arch, device, load_dtype, started)

    # The preflight trace needs only the U-Net config: run it while the weights load.
    unet_config, profiling = None, None
    if request.memory_profile != "off":
        from .preflight import profile_for

        unet_config = _unet_config_file(request)
        profiling = ThreadPoolExecutor(1, thread_name_prefix="charforge-preflight")
        traced = profiling.submit(profile_for, unet_config, config)
    report({"phase": "loading", "message": f"loading {os.path.basename(request.base_model)}"})
    try:
        model = load_base_model(
            request.base_model,
            dtype=load_dtype,
            config_dir=request.config_dir,
            tokenizer_candidates=request.tokenizer_dirs,
        )
    finally:
        if profiling is not None:
            profiling.shutdown(wait=False)
    items = load_items(request.dataset)
    data = TrainingData.prepare(items, config.data, cache_dir=Path(request.runs_dir) / "_cache")

    identity = {
        "base_model": fingerprint(model.unet),
        "text": model.fingerprints.get("text_encoder", ""),
        "vae": model.fingerprints["vae"],
        "dataset": _dataset_hash(data),
        "arch": model.arch,
    }
    requested = config
    folder = _find_resumable(request, requested, identity)
    resuming = folder is not None
    if folder is not None:
        config = _resumed_config(folder.read_config(), requested)

    estimate = None
    if request.memory_profile != "off":
        from .preflight import auto_profile, check, device_info

        traced.result()  # re-raise a tracing error here rather than in a thread
        info = device_info(device, load_dtype)
        if resuming or request.memory_profile == "check":
            # A resumed run keeps its optimizer and batch; only gradient checkpointing may change.
            chooser = auto_profile if request.memory_profile == "auto" else check
            estimate = chooser(
                model,
                config,
                info,
                num_images=len(items),
                unet_config=unet_config,
                **({"only_checkpointing": True} if chooser is auto_profile else {}),
            )
        else:
            estimate = auto_profile(model, config, info, num_images=len(items), unet_config=unet_config)
        config = estimate.config
        log.info("CharForge training preflight: %s", estimate.summary())
    return _start_session(
        request, report, config, requested, model, data, device, folder, identity, estimate, started
    )


def _train_flow(
    request: TrainRequest,
    report: _Reporter,
    config: TrainConfig,
    arch: str,
    device: torch.device,
    load_dtype: torch.dtype,
    started: float,
) -> TrainResult:
    """The same job for a flow-matching base (Flux.1, SD3.x): its loader, preflight and trainer."""
    from .flow.load import load_flow_model
    from .flow.preflight import flow_profile

    report({"phase": "loading", "message": f"loading {os.path.basename(request.base_model)}"})
    if device.type == "cuda" and load_dtype == torch.float32:
        load_dtype = torch.bfloat16  # full-precision Flux / SD3 weights do not fit a consumer card
    model = load_flow_model(
        request.base_model,
        parts=request.parts,
        dtype=load_dtype,
        config_dir=request.config_dir,
        tokenizer_candidates=request.tokenizer_dirs,
        t5_tokenizer_candidates=request.t5_tokenizer_dirs,
        arch=arch,
    )
    items = load_items(request.dataset)
    data = TrainingData.prepare(items, config.data, cache_dir=Path(request.runs_dir) / "_cache")
    identity = {
        "base_model": fingerprint(model.transformer),
        "text": ":".join(model.fingerprints.get(n, "") for n in sorted(model.text_encoders)),
        "vae": model.fingerprints["vae"],
        "dataset": _dataset_hash(data),
        "arch": model.arch,
    }
    requested = config
    folder = _find_resumable(request, requested, identity)
    if folder is not None:
        config = _resumed_config(folder.read_config(), requested)
    estimate = None
    if request.memory_profile != "off":
        estimate = flow_profile(
            model,
            config,
            device,
            num_images=len(items),
            only_checkpointing=folder is not None,
            check_only=request.memory_profile == "check",
        )
        config = estimate.config
        log.info("CharForge training preflight: %s", estimate.summary())
    return _start_session(
        request, report, config, requested, model, data, device, folder, identity, estimate, started
    )


def _start_session(
    request, report, config, requested, model, data, device, folder, identity, estimate, started
) -> TrainResult:
    resuming = folder is not None
    if folder is None:
        folder = RunFolder.create(request.runs_dir, safe_run_name(request.name))
    mark_active(folder, True)
    try:
        session = TrainingSession(
            request=request,
            config=config,
            requested=requested,
            model=model,
            data=data,
            device=device,
            folder=folder,
            resuming=resuming,
            identity=identity,
            estimate=estimate,
            report=report,
            started=started,
        )
        return session.run()
    finally:
        mark_active(folder, False)


@dataclass
class TrainingSession:
    """One job in its run folder, once the model, data and settings are settled: trains, writes samples,
    checkpoints, metrics and state, and the final LoRA."""

    request: TrainRequest
    config: TrainConfig  # what runs (the saved config when resuming, with the preflight's memory options)
    requested: TrainConfig  # what was asked for (its hash decides what a later request may resume)
    model: Any  # BaseModel, or a flow.family.FlowModel
    data: TrainingData
    device: torch.device
    folder: RunFolder
    resuming: bool
    identity: dict[str, str]
    estimate: Any  # preflight.Estimate or None
    report: _Reporter
    started: float
    trainer: Trainer = field(init=False)  # made in run(), after the run folder is written
    plan: Any = None  # samples.SamplePlan
    resumed_from: int = 0
    pending: list[MetricsRow] = field(default_factory=list)  # metrics rows not yet appended to metrics.csv
    last_status: float = 0.0  # when status.json was last updated during steps (monotonic seconds)

    def run(self) -> TrainResult:
        folder, config, data, model = self.folder, self.config, self.data, self.model
        folder.write_config(
            {
                "config": config.to_dict(),
                "request_hash": self.requested.result_hash(),
                "identity": self.identity,
                "base_model": self.request.base_model,
                "arch": model.arch,
                "trigger_word": config.trigger_word,
                "dataset": {
                    "images": len(data.items),
                    "samples_per_epoch": data.num_samples,
                    "buckets": data.bucket_histogram(),
                    "subsets": sorted({i.subset for i in data.items}),
                },
                "device": str(self.device),
                "versions": _versions(),
                "preflight": self.estimate.as_dict() if self.estimate is not None else None,
            }
        )
        if self.request.origin:
            folder.write_origin(self.request.origin)
        folder.update_status(
            state="running",
            phase="caching",
            total_steps=config.steps,
            error=None,
            started_at=folder.read_status().get("started_at") or self.started,
        )

        def on_cache(what: str, done: int, total: int) -> None:
            self.report({"phase": "caching", "what": what, "done": done, "total": total})

        self.trainer = trainer = self._trainer()
        captions = [item.caption for item in data.items]
        try:
            if self.flow:  # prompts encoded before the trainer drops the text encoders
                self.plan = self._plan_samples(model, config, captions)
            trainer.setup(on_cache=on_cache)
            if self.resuming:
                state = folder.load_state()
                if state is None:  # the run was picked for its state file, which has gone since
                    raise FileNotFoundError(f"the saved training state {folder.state_path} is gone")
                trainer.load_state_dict(state)
                self.resumed_from = trainer.step
                log.info("CharForge: resuming %s at step %d", folder.name, self.resumed_from)
            folder.truncate_metrics(self.resumed_from)
            if not self.flow:
                self.plan = self._plan_samples(model, config, captions)
            trainer.train(
                on_step=self._on_step,
                after_step=self._after_step,
                control=self.report.control,
                on_progress=self.report.step_done,
            )
            return self._finish()
        except BaseException as exc:
            self._stopped(exc)
            raise

    def _stopped(self, exc: BaseException) -> None:
        """Keep what a stop or an error leaves: metrics, the state of the last completed step, the status."""
        folder, trainer = self.folder, self.trainer
        if self.pending:
            folder.append_metrics(self.pending)
        cancelled = isinstance(exc, (Cancelled, KeyboardInterrupt))
        # Steps done since the last saved state are kept, unless the error hit the weights update itself.
        if (
            trainer.optimizer is not None
            and not trainer.updating
            and (trainer.step > self.resumed_from or not folder.state_path.is_file())
        ):
            self._save_state()
        folder.write_loss_curve()
        folder.update_status(
            state="cancelled" if cancelled else "failed",
            step=trainer.step,
            error=None if cancelled else f"{type(exc).__name__}: {exc}",
        )
        if isinstance(exc, Cancelled):  # say where the run can be resumed (the same exception goes on)
            exc.args = (
                f"training cancelled at step {trainer.step}; queue it again to resume ({folder.root})",
            )

    def _on_step(self, step_report: StepReport) -> None:
        """Metrics, status and progress after each step."""
        self.pending.append(
            MetricsRow(
                step_report.step,
                step_report.loss,
                step_report.lr,
                round(step_report.steps_per_second, 4),
                step_report.epoch,
                round(step_report.elapsed_seconds, 3),
            )
        )
        now = time.monotonic()
        if now - self.last_status > 1.0 or step_report.step == step_report.total_steps:
            self.last_status = now
            self.folder.update_status(
                state="running",
                phase="training",
                step=step_report.step,
                loss=step_report.loss,
                eta_seconds=round(step_report.eta_seconds, 1),
            )
        self.report(
            {
                "phase": "training",
                "step": step_report.step,
                "total_steps": step_report.total_steps,
                "loss": step_report.loss,
                "lr": step_report.lr,
                "steps_per_second": step_report.steps_per_second,
                "eta_seconds": step_report.eta_seconds,
            }
        )

    def _after_step(self, step: int) -> None:
        """Samples, checkpoints and the resumable state at their intervals."""
        config = self.config
        if self.pending:
            self.folder.append_metrics(self.pending)
            self.pending.clear()
        if config.samples.every and step % config.samples.every == 0 and step < config.steps:
            self._save_samples(step)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            self._export(self.folder.checkpoint_path(step), step)
        state_every = config.state_every or config.checkpoint_every
        if state_every and step % state_every == 0 and step < config.steps:
            self._save_state()

    @property
    def flow(self) -> bool:
        return is_flow_arch(self.model.arch)

    def _plan_samples(self, model, config: TrainConfig, captions: list[str]):
        """The sample prompts' plan (prompts encoded now, while the text encoders are loaded)."""
        prompts = sample_prompts(config.samples, config.trigger_word, captions)
        size = config.samples.size or config.data.resolution
        if self.flow:
            from .flow.samples import plan_flow_samples

            return plan_flow_samples(model, config.samples, prompts, size, self.device, config.flow)
        return plan_samples(
            model, config.samples, prompts, size, self.device, config.clip_skip, config.max_token_length
        )

    def _trainer(self) -> Trainer:
        if self.flow:
            from .flow.trainer import FlowTrainer

            return FlowTrainer(self.model, self.data, self.config, self.device)
        return Trainer(self.model, self.data, self.config, self.device)

    def _export(self, path: Path, step: int) -> Path:
        if self.flow:
            from .flow.export import export_flow_lora

            return export_flow_lora(
                path,
                self.trainer.lora_network(),
                self.model.family,
                self._lora_metadata(step),
                _save_dtype(self.config),
                self.request.lora_layout,
            )
        return export_lora(
            path,
            self.trainer.lora_network(),
            self.model.arch,
            self.model.unet_config,
            self._lora_metadata(step),
            _save_dtype(self.config),
        )

    def _save_samples(self, step: int) -> list[str]:
        if self.plan is None:  # a flow family without a sampler
            return []
        self.report({"phase": "sampling", "step": step})
        paths = []
        if self.flow:
            from .flow.samples import render_flow_samples

            images = render_flow_samples(
                self.model, self.plan, self.trainer.device, self.trainer.autocast_dtype
            )
        else:
            images = render_samples(self.model, self.plan, self.trainer.device, self.trainer.autocast_dtype)
        for index, image in enumerate(images):
            path = self.folder.sample_path(step, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp.png")
            image.save(tmp)
            os.replace(tmp, path)
            paths.append(str(path))
        return paths

    def _save_state(self) -> None:
        self.folder.save_state(self.trainer.state_dict())
        self.folder.update_status(state_step=self.trainer.step)

    def _finish(self) -> TrainResult:
        """Done: final samples, the LoRA (run folder + loras), the state (so "train more" can continue)."""
        folder, trainer, request = self.folder, self.trainer, self.request
        self.report({"phase": "saving", "step": trainer.step})
        samples = [str(p) for p in folder.samples_at(trainer.step)] or self._save_samples(trainer.step)
        lora_path = self._export(folder.lora_path, trainer.step)
        exported = None
        if request.lora_dir:
            exported = Path(request.lora_dir) / lora_path.name
            exported.parent.mkdir(parents=True, exist_ok=True)
            tmp = exported.with_name(f".{exported.name}.tmp")
            shutil.copyfile(lora_path, tmp)
            os.replace(tmp, exported)
        self._save_state()
        curve = folder.write_loss_curve()
        folder.update_status(
            state="completed",
            phase="done",
            step=trainer.step,
            loss=trainer.last_loss,
            eta_seconds=0,
            lora=str(exported or lora_path),
            finished_at=time.time(),
        )
        self.report({"phase": "done", "step": trainer.step, "lora": str(exported or lora_path)})
        return TrainResult(
            str(folder.root),
            str(lora_path),
            str(exported) if exported else None,
            trainer.step,
            trainer.last_loss,
            samples,
            str(curve),
            self.resumed_from,
            self.estimate.as_dict() if self.estimate is not None else None,
        )

    def _lora_metadata(self, step: int) -> dict[str, str]:
        return _lora_metadata(
            self.folder.name, self.config, self.model, self.data, step, self.started, self.request.base_model
        )


def _save_dtype(config: TrainConfig) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config.save_dtype]


def _lora_metadata(
    title: str,
    config: TrainConfig,
    model: Any,  # BaseModel, or a flow.family.FlowModel
    data: TrainingData,
    step: int,
    started: float,
    base_model: str,
) -> dict[str, str]:
    epoch_batches = max(1, len(data.epoch_batches(0, config.batch_size, config.seed)))
    training = {
        "learning_rate": config.optim.learning_rate,
        "unet_lr": config.optim.learning_rate,
        "text_encoder_lr": (config.optim.text_encoder_lr or config.optim.learning_rate / 10)
        if config.lora.train_text_encoder
        else 0.0,
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
        "dataset_dirs": {
            s: {
                "n_repeats": next(i.repeats for i in data.items if i.subset == s),
                "img_count": sum(1 for i in data.items if i.subset == s),
            }
            for s in sorted({i.subset for i in data.items})
        },
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
    if is_flow_arch(model.arch):  # the flow objective's settings, under kohya's names where it has them
        flow = config.flow
        training.update(
            timestep_sampling=model.default_sampling
            if flow.timestep_sampling == "auto"
            else flow.timestep_sampling,
            logit_mean=flow.logit_mean,
            logit_std=flow.logit_std,
            discrete_flow_shift=flow.discrete_flow_shift or getattr(model, "default_shift", 0.0),
            guidance_scale=flow.guidance_scale,
            t5xxl_max_token_length=model.t5_length(flow),
            model_prediction_type="raw",
            fp8_base=flow.fp8_base,
        )
        for unused in ("min_snr_gamma", "noise_offset", "clip_skip", "max_token_length"):
            training.pop(unused)
    return lora_metadata(
        arch=model.arch,
        settings=config.lora,
        title=title,
        trigger_phrase=config.trigger_word,
        resolution=(config.data.resolution, config.data.resolution),
        training=training,
        tag_frequency=tag_frequency(data.items),
        prediction_type="flow"
        if is_flow_arch(model.arch)
        else "v"
        if model.prediction_type == "v_prediction"
        else "epsilon",
    )


__all__ = ["TrainRequest", "TrainResult", "TrainingSession", "train"]
