"""Every GPU number of issue 26 in one command: training, video, captioning and CLIP scoring, each beside its anchor.

(Over 600 lines on purpose: the one command a GPU lease runs, read top to bottom; each section is short and
they share the budget, the timing rounds and the result rows.)

    bash benchmarks/gpu_wheels.sh                                      # here, once: the wheels into .whl/
    python benchmarks/gpu_suite.py --budget-s 500 --out results.json  # on the GPU machine (carry .whl)
    python benchmarks/gpu_suite.py --smoke --out /tmp/smoke.json      # CPU, tiny models: checks the script

One process runs the sections in order; ours and the anchor of a section are built side by side on the same
random weights (the real architectures, weights made in the run: nothing is downloaded) and timed in
alternating rounds, so clock and thermal drift hits both. Each side is first run alone for its warm-up and its
peak memory. ``--budget-s`` bounds the whole run: each section gets a share of what is left and stops adding
timed rounds at its share (at least ``MIN_ROUNDS``); a section whose minimum does not fit is skipped and says so.
The results file is rewritten after every section, so a run cut short keeps what it measured.

Sections (rows in the results; docs/benchmarks.md explains each field):

- ``sdxl_train``: SDXL LoRA rank 32, 1024², bf16, batch 1: our `Trainer.train` (loss read back every
  ``loss_every`` = 10 steps) against a step written as diffusers' ``train_text_to_image_lora_sdxl.py`` writes it
  (peft adapter on q/k/v/out, fp32 LoRA, AdamW, VAE and text encoders run every step, the loss read each step,
  no compile); then both with gradient checkpointing.
- ``video``: AnimateDiff SD1.5 + v3 module, 16 frames 512², 25 DDIM steps, CFG 7.5: our `generate_video`
  against diffusers' ``AnimateDiffPipeline``; then ours at 64 frames (16-frame context windows, overlap 4).
- ``caption``: BLIP-large from JPEG files on disk to caption files: our batched `caption_dataset` against a
  plain loop (open, process, ``generate``, decode, write) over the same model.
- ``sdxl_job``: the node's whole job, shortened to 100 steps (load, caching 20 images, training, samples,
  save), seconds per phase, and the 500-step job it implies.
- ``sdxl_b4`` (MFU), ``sd15_b1`` (512²), ``clip`` (ViT-L/14 scoring, images/s): ours alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # cf_testing: tiny configs, the CLIP vocabulary, model writers
sys.path.insert(0, str(REPO / "benchmarks"))

MIN_ROUNDS = 3
PRACTICAL_PEAK = 795e12  # bf16 matmul peak measured on the H100 / H200 machines (docs/model-configs.md §9.4)
# name, weight (share of the budget), minimum seconds on an H100 for a number at all (models built, warm-up)
SECTIONS = (
    ("sdxl_train", 3.0, 110),
    ("video", 2.0, 70),
    ("caption", 1.5, 50),
    ("sdxl_job", 2.0, 100),
    ("sdxl_b4", 1.0, 40),
    ("sd15_b1", 0.7, 25),
    ("clip", 0.5, 15),
    (
        "sdxl_compile",
        1.0,
        150,
    ),  # last: the compile alone takes minutes; --only sdxl_compile runs it by itself
)


# --------------------------------------------------------------------------------------------------
# Setup: the wheels, the pack, the device


def install_wheels(folder: Path) -> Path:
    """Install the carried wheels (gpu_wheels.sh) into a private folder placed ahead of the installed ones."""
    target = Path(tempfile.gettempdir()) / "charforge-gpu-site"
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {folder}: run benchmarks/gpu_wheels.sh here and carry {folder.name}")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        + ["--no-cache-dir", "--upgrade", "--target", str(target), *wheels],
        check=True,
    )
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    return target


def importable_pack() -> None:
    """`charforge` importable without installing the project (the GPU machine has only the working tree)."""
    try:
        import charforge  # noqa: F401
    except ImportError:
        links = Path(tempfile.gettempdir()) / "charforge-gpu-import"
        links.mkdir(exist_ok=True)
        with contextlib.suppress(FileExistsError):
            (links / "charforge").symlink_to(REPO / "custom_nodes" / "charforge")
        sys.path.insert(0, str(links))


class Context:
    """What every section gets: device, dtype, sizes (real or --smoke), scratch folder and the budget."""

    def __init__(self, args, work: Path):
        import torch

        self.smoke = args.smoke
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.precision = "no" if args.smoke else "bf16"
        self.work = work
        self.config_dirs: dict[str, Path] = {}
        self.rank = 4 if args.smoke else 32
        self.res = {"sdxl": 64, "sd15": 64} if args.smoke else {"sdxl": 1024, "sd15": 512}
        self.steps_per_round = 1 if args.smoke else 10
        self.warmup = 1 if args.smoke else 10
        self.min_rounds = 1 if args.smoke else MIN_ROUNDS
        if args.smoke:
            from cf_testing.models import build_tiny_sd15, build_tiny_sdxl

            self.config_dirs = {
                "sd15": build_tiny_sd15(work / "tiny_sd15").diffusers_dir,
                "sdxl": build_tiny_sdxl(work / "tiny_sdxl").diffusers_dir,
            }

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> int:
        """Empty the caches, reset the peak; returns the bytes allocated now (what the peak sits on)."""
        import torch

        gc.collect()
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_of(self, run: Callable[[], object], baseline: int = 0) -> float | None:
        """GiB at the peak of one more `run()` above `baseline` bytes (None, and no run, on the CPU)."""
        if self.device.type != "cuda":
            return None
        self.reset_peak()
        run()
        return self.peak_gib(baseline)

    def peak_gib(self, baseline: int = 0) -> float | None:
        import torch

        if self.device.type != "cuda":
            return None
        return round((torch.cuda.max_memory_allocated() - baseline) / 2**30, 2)


def environment(ctx: Context) -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    cuda = ctx.device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------------
# Timing


def interleave(ctx: Context, sides: dict[str, Callable[[], None]], per_round: int, deadline: float) -> dict:
    """Seconds per call of each side: rounds of `per_round` calls per side, the side going first alternating,
    until `deadline` (at least ``ctx.min_rounds`` rounds)."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    rounds = 0
    while rounds < ctx.min_rounds or (time.perf_counter() < deadline and rounds < 50):
        for name in list(sides) if rounds % 2 == 0 else list(reversed(sides)):
            ctx.sync()
            start = time.perf_counter()
            for _ in range(per_round):
                sides[name]()
            ctx.sync()
            times[name].append((time.perf_counter() - start) / per_round)
        rounds += 1
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median": round(statistics.median(ordered), 4),
        "min": round(ordered[0], 4),
        "max": round(ordered[-1], 4),
        "rounds": len(ordered),
    }


def side_by_side(row: str, unit: str, times: dict[str, list[float]], target: float | None, **extra) -> list:
    """Rows for each side of `times` and a ratio row, ``speedup`` > 1 when ours is faster: the anchor's median
    over ours for times (seconds per something), ours over the anchor's for rates (per second, per minute)."""
    rows = [{"row": row, "side": side, unit: summary(t), **extra.get(side, {})} for side, t in times.items()]
    if "ours" in times and "anchor" in times:
        ours, anchor = (statistics.median(times[s]) for s in ("ours", "anchor"))
        speedup = anchor / ours if unit.startswith("s_per_") else ours / anchor
        rows.append({"row": row, "side": "ratio", "speedup": round(speedup, 3), "target": target})
    elif target is not None:
        rows[0]["target"] = target
    return rows


# --------------------------------------------------------------------------------------------------
# Training


def _trainer(ctx: Context, arch: str, batch: int, images: int, compile: bool = False):
    import bench_train
    import torch

    from charforge.engine.train.data import TrainingData, read_kohya_folder
    from charforge.engine.train.loop import Trainer

    res = ctx.res[arch]
    config = bench_train._config(arch, res, ctx.rank, 1_000_000, batch, False, ctx.precision)
    config = replace(config, compile=compile)
    dataset = bench_train.write_dataset(ctx.work / f"data_{arch}_{batch}", images, res)
    torch.manual_seed(0)
    model = bench_train.random_model(arch, ctx.device, ctx.dtype, ctx.work, ctx.config_dirs.get(arch))
    base_unet = {k: v.to("cpu", copy=True) for k, v in model.unet.state_dict().items()}  # before the LoRA
    trainer = Trainer(
        model, TrainingData.prepare(read_kohya_folder(dataset), config.data), config, ctx.device
    )
    trainer.setup()
    return trainer, base_unet, dataset


def _ours(ctx: Context, trainer) -> Callable[[], None]:
    """Our steps exactly as a run makes them: `Trainer.train` (loss read back every ``loss_every`` steps)."""
    return lambda: trainer.train(until=trainer.step + ctx.steps_per_round)


def _alone(ctx: Context, step: Callable[[], None]) -> float | None:
    """Warm-up (`ctx.warmup` steps), then one round alone; the peak memory of that round in GiB."""
    for _ in range(max(1, ctx.warmup // ctx.steps_per_round)):
        step()
    return ctx.peak_of(step)  # everything held: the model, LoRA, optimizer, caches and activations


def section_sdxl_train(ctx: Context, deadline: float) -> list:
    from anchor_sdxl_lora import ExampleSdxlLoraStep

    trainer, base_unet, dataset = _trainer(ctx, "sdxl", 1, 4)
    ours = _ours(ctx, trainer)
    unet = trainer.model.unet
    peak = {"plain": _alone(ctx, ours)}
    unet.enable_gradient_checkpointing()
    peak["checkpointing"] = _alone(ctx, ours)
    unet.disable_gradient_checkpointing()
    held = ctx.reset_peak()  # ours stays resident while the anchor is measured
    anchor_step = ExampleSdxlLoraStep(
        trainer.model, base_unet, dataset, ctx.res["sdxl"], ctx.rank, ctx.device
    )
    del base_unet
    anchor = lambda: [anchor_step.step() for _ in range(ctx.steps_per_round)]  # noqa: E731
    for _ in range(max(1, ctx.warmup // ctx.steps_per_round)):
        anchor()
    anchor_peak = ctx.peak_of(anchor, held)
    middle = time.perf_counter() + (deadline - time.perf_counter()) / 2
    plain = interleave(ctx, {"ours": ours, "anchor": anchor}, 1, middle)
    unet.enable_gradient_checkpointing()
    anchor_step.unet.enable_gradient_checkpointing()
    checkpointed = interleave(ctx, {"ours": ours, "anchor": anchor}, 1, deadline)
    per_step = {side: [t / ctx.steps_per_round for t in ts] for side, ts in plain.items()}
    per_step_gc = {side: [t / ctx.steps_per_round for t in ts] for side, ts in checkpointed.items()}
    common = {"resolution": ctx.res["sdxl"], "batch": 1, "rank": ctx.rank, "precision": ctx.precision}
    return side_by_side(
        "sdxl_b1",
        "s_per_step",
        per_step,
        0.12,
        ours={**common, "peak_gib": peak["plain"]},
        anchor={**common, "peak_gib_beside_ours": anchor_peak},
    ) + side_by_side(
        "sdxl_b1_gc",
        "s_per_step",
        per_step_gc,
        0.20,
        ours={**common, "peak_gib": peak["checkpointing"], "peak_target_gib": 24},
        anchor=common,
    )


def _ours_alone(
    ctx: Context,
    deadline: float,
    row: str,
    arch: str,
    batch: int,
    target: float | None,
    compile: bool = False,
) -> list:
    from charforge.engine.train.preflight import profile_for

    trainer, _, _ = _trainer(ctx, arch, batch, max(4, batch), compile)
    ours = _ours(ctx, trainer)
    start = time.perf_counter()
    peak = _alone(ctx, ours)
    warmup_s = time.perf_counter() - start
    times = interleave(ctx, {"ours": ours}, 1, deadline)["ours"]
    per_step = [t / ctx.steps_per_round for t in times]
    flops = profile_for(dict(trainer.model.unet.config), trainer.config).flops
    median = statistics.median(per_step)
    extra = {"resolution": ctx.res[arch], "batch": batch, "rank": ctx.rank, "peak_gib": peak}
    extra |= {"compile": compile, "warmup_s": round(warmup_s, 1)}
    extra |= {
        "tflop_per_step": round(flops / 1e12, 3),
        "mfu_vs_795": round(flops / median / PRACTICAL_PEAK, 4),
    }
    return side_by_side(row, "s_per_step", {"ours": per_step}, target, ours=extra)


def section_sdxl_b4(ctx: Context, deadline: float) -> list:
    rows = _ours_alone(ctx, deadline, "sdxl_b4", "sdxl", 4, None)
    rows[0]["target_mfu"] = 0.35
    return rows


def section_sd15_b1(ctx: Context, deadline: float) -> list:
    return _ours_alone(ctx, deadline, "sd15_b1", "sd15", 1, 0.05)


def section_sdxl_compile(ctx: Context, deadline: float) -> list:
    """``compile=True`` (inductor, CUDA only: on the CPU the trainer runs eager and the row says so)."""
    return _ours_alone(ctx, deadline, "sdxl_b1_compile", "sdxl", 1, 0.12, compile=ctx.device.type == "cuda")


def section_sdxl_job(ctx: Context, deadline: float) -> list:
    import bench_train

    args = argparse.Namespace(
        config_dir=ctx.config_dirs,
        resolution_sdxl=ctx.res["sdxl"],
        rank=ctx.rank,
        job_steps=4 if ctx.smoke else 100,
        images=4 if ctx.smoke else 20,
        sample_steps=2 if ctx.smoke else 20,
    )
    from charforge.engine.train import job, loop

    # The training phase exactly: from the job's call, and Trainer.train's start and end.
    marks: dict[str, float] = {}

    def timed(name: str, function: Callable) -> Callable:
        def wrapper(*a, **k):
            marks.setdefault(f"{name}_start", time.perf_counter())
            try:
                return function(*a, **k)
            finally:
                marks[f"{name}_end"] = time.perf_counter()

        return wrapper

    with contextlib.ExitStack() as undo:
        for owner, name in ((job, "job"), (loop.Trainer, "trainer")):
            original = owner.train
            owner.train = timed(name, original)
            undo.callback(setattr, owner, "train", original)
        result = bench_train.whole_job(args, ctx.device, ctx.work / "job")
    result.pop("phase_started_at_s")
    training = marks["trainer_end"] - marks["trainer_start"]
    per_step = training / args.job_steps
    row = {"row": "sdxl_job", "side": "ours", **result, "target_500_step_s": 120}
    row["seconds_before_training"] = round(marks["trainer_start"] - marks["job_start"], 2)
    row["training_s"] = round(training, 2)
    row["seconds_after_training"] = round(marks["job_end"] - marks["trainer_end"], 2)
    row["training_s_per_step"] = round(per_step, 4)
    row["implied_500_step_job_s"] = round(result["job_seconds"] + (500 - args.job_steps) * per_step, 1)
    return [row]


# --------------------------------------------------------------------------------------------------
# Video, captions, CLIP


def section_video(ctx: Context, deadline: float) -> list:
    import bench_video

    from cf_testing.models import write_tiny_clip_tokenizer
    from charforge.engine.video import RuntimeOptions, generate_video

    configs = bench_video.model_configs(ctx.smoke)
    tokenizer_dir = write_tiny_clip_tokenizer(ctx.work / "video_tokenizer")
    frames, long_frames, window, overlap = (8, 14, 8, 2) if ctx.smoke else (16, 64, 16, 4)
    size, steps = (64, 2) if ctx.smoke else (512, 25)
    dtype_name = "fp32" if ctx.smoke else "bf16"
    model = bench_video.charforge_model(
        configs,
        ctx.device,
        ctx.dtype,
        tokenizer_dir,
        RuntimeOptions(device=ctx.device.type, dtype=dtype_name),
    )
    short_request = bench_video.video_request(frames, size, steps, 7.5, window, overlap)
    long_request = bench_video.video_request(long_frames, size, steps, 7.5, window, overlap)
    ours = lambda: generate_video(model, short_request)  # noqa: E731
    ours_long = lambda: generate_video(model, long_request)  # noqa: E731
    peak = {}
    for name, run in (("short", ours), ("long", ours_long)):
        run()
        peak[name] = ctx.peak_of(run)
    held = ctx.reset_peak()
    pipe = bench_video.diffusers_pipeline(configs, ctx.device, ctx.dtype, tokenizer_dir)

    def anchor() -> None:
        bench_video.diffusers_clip(pipe, frames, size, steps, 7.5)

    anchor()
    anchor_peak = ctx.peak_of(anchor, held)
    share = deadline - time.perf_counter()
    times = interleave(ctx, {"ours": ours, "anchor": anchor}, 1, time.perf_counter() + share * 0.7)
    long_times = interleave(ctx, {"ours": ours_long}, 1, deadline)
    common = {"size": size, "steps": steps, "cfg": 7.5, "scheduler": "ddim", "dtype": dtype_name}
    return side_by_side(
        f"video_{frames}f",
        "s_per_clip",
        times,
        2.0,
        ours={**common, "frames": frames, "peak_gib": peak["short"]},
        anchor={**common, "frames": frames, "peak_gib_beside_ours": anchor_peak},
    ) + side_by_side(
        f"video_{long_frames}f",
        "s_per_clip",
        long_times,
        None,
        ours={
            **common,
            "frames": long_frames,
            "window": window,
            "overlap": overlap,
            "peak_gib": peak["long"],
        },
    )


def section_caption(ctx: Context, deadline: float) -> list:
    import bench_caption
    import torch
    from PIL import Image

    from cf_testing import caption_models
    from charforge.engine.caption.backends.hf import HFSettings, TransformersCaptioner
    from charforge.engine.caption.dataset import caption_dataset
    from charforge.engine.caption.postprocess import CaptionRules
    from charforge.engine.dataset.load import load_folder

    spec = caption_models.TINY_BLIP if ctx.smoke else caption_models.BLIP_LARGE
    folder = caption_models.write_tiny_blip(ctx.work / "blip", spec=spec)
    batch, tokens = (4, 8) if ctx.smoke else (32, 30)
    per_round = {"ours": 8 if ctx.smoke else 256, "anchor": 2 if ctx.smoke else 24}
    size = (96, 64) if ctx.smoke else (1024, 768)
    photos = bench_caption.write_photos(ctx.work / "photos", sum(per_round.values()), *size)
    settings = HFSettings(
        device=ctx.device.type, dtype="auto", max_new_tokens=tokens, min_new_tokens=tokens, batch_size=batch
    )
    captioner = TransformersCaptioner("blip", str(folder), settings)
    rules = CaptionRules(
        trigger="ohwx", class_tokens="person", template="{trigger} {class}, {caption}", max_tokens=0
    )
    ours_dir = ctx.work / "photos_ours"
    ours_dir.mkdir()
    for path in photos[: per_round["ours"]]:
        (ours_dir / path.name).symlink_to(path)
    manifest = load_folder(ours_dir, ctx.work / "dataset_ours", read_captions=False)
    plain_photos = photos[per_round["ours"] :]
    model, processor = captioner.model, captioner.processor

    def ours() -> None:
        caption_dataset(manifest, captioner, rules, mode="overwrite", batch_size=batch)

    def anchor() -> None:
        # What a plain script does: one photo at a time, the model's processor, generate, decode, write.
        for path in plain_photos:
            inputs = processor(images=Image.open(path).convert("RGB"), return_tensors="pt").to(ctx.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens)
            path.with_suffix(".txt").write_text(processor.decode(out[0], skip_special_tokens=True))

    ours()
    anchor()
    times = interleave(ctx, {"ours": ours, "anchor": anchor}, 1, deadline)
    per_min = {side: [60 * per_round[side] / t for t in ts] for side, ts in times.items()}
    written = len(list((ctx.work / "dataset_ours").rglob("*.txt")))
    rows = side_by_side(
        "caption",
        "images_per_min",
        per_min,
        3000,
        ours={"batch": batch, "images_per_round": per_round["ours"], "sidecars": written},
        anchor={"batch": 1, "images_per_round": per_round["anchor"]},
    )
    for row in rows[:2]:
        row |= {
            "model": "BLIP-large" if not ctx.smoke else "tiny BLIP",
            "new_tokens": tokens,
            "photo_size": size,
        }
    captioner.close()
    return rows


def section_clip(ctx: Context, deadline: float) -> list:
    import torch

    from cf_testing.face_models import CLIP_VIT_L14, TINY_CLIP, write_clip_folder
    from charforge.engine.score.clip import ClipScorer

    folder = write_clip_folder(ctx.work / "clip", TINY_CLIP if ctx.smoke else CLIP_VIT_L14)
    scorer = ClipScorer.load(str(folder), device=ctx.device.type)
    batch, size = (4, 64) if ctx.smoke else (64, 1024)
    images = torch.rand(batch, size, size, 3)
    prompt = ["a photo of sks person standing in a forest, cinematic light"]
    run = lambda: scorer.score(images, prompt, batch_size=batch)  # noqa: E731
    run()
    times = interleave(ctx, {"ours": run}, 1, deadline)["ours"]
    per_s = [batch / t for t in times]
    extra = {"batch": batch, "input": f"{size}x{size} float32 IMAGE on the CPU", "dtype": str(scorer.dtype)}
    return side_by_side("clip_score", "images_per_s", {"ours": per_s}, None, ours=extra)


# --------------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=500, help="seconds for the whole run (default 500)")
    parser.add_argument("--out", type=Path, default=Path("results.json"))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models: check the script in seconds")
    parser.add_argument("--only", nargs="+", choices=[s[0] for s in SECTIONS], help="run only these sections")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="carried wheels (gpu_wheels.sh)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if not args.smoke and args.wheels.is_dir():
        install_wheels(args.wheels)
    importable_pack()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_suite.py measures on a CUDA GPU; --smoke checks it on the CPU")
    if args.smoke:
        torch.set_num_threads(1)
    sections = [s for s in SECTIONS if not args.only or s[0] in args.only]
    results: dict = {"budget_s": args.budget_s, "smoke": args.smoke, "rows": [], "sections": {}}
    with tempfile.TemporaryDirectory(prefix="charforge-gpu-suite-") as scratch:
        ctx = Context(args, Path(scratch))
        results["environment"] = environment(ctx)
        for index, (name, weight, minimum) in enumerate(sections):
            left = args.budget_s - (time.perf_counter() - started)
            if not args.smoke and left < minimum:
                results["sections"][name] = {"skipped": f"{left:.0f} s of the budget left, needs {minimum} s"}
                continue
            weights = sum(w for _, w, _ in sections[index:])
            deadline = time.perf_counter() + (0 if args.smoke else left * weight / weights)
            section_start = time.perf_counter()
            try:
                rows = globals()[f"section_{name}"](ctx, deadline)
                results["sections"][name] = {"seconds": round(time.perf_counter() - section_start, 1)}
            except Exception as exc:  # one broken section must not cost the others' numbers
                rows = []
                results["sections"][name] = {
                    "seconds": round(time.perf_counter() - section_start, 1),
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-3000:],
                }
                print(results["sections"][name]["traceback"], file=sys.stderr, flush=True)
            for row in rows:
                print(json.dumps(row), flush=True)
            results["rows"].extend(rows)
            results["elapsed_s"] = round(time.perf_counter() - started, 1)
            args.out.write_text(json.dumps(results, indent=1))
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps({"sections": results["sections"], "elapsed_s": results.get("elapsed_s")}), flush=True)
    return 1 if any("error" in s for s in results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
