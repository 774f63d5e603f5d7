"""LoRA training speed and memory: the real SD1.5 / SDXL architectures with random weights.

One command on a CUDA GPU (H100-class), one JSON line per configuration::

    python benchmarks/bench_train.py                 # everything (about 10 minutes on an H100)
    python benchmarks/bench_train.py --only sdxl_b1 sdxl_b1_gc
    python benchmarks/bench_train.py --smoke         # CPU, tiny models: checks the script itself

Configurations (issue 8's targets in brackets):

- ``sdxl_job``: the job users wait for. A random-weight SDXL single file is written first (not timed),
  then ``charforge.engine.train.job.train`` runs exactly as the node does: load, preflight, cache 20
  images' latents and the text outputs, 500 steps at 1024 x 1024, rank 32, bf16, save samples and the
  LoRA. Reports the seconds from the call to the LoRA on disk [<= 120 s].
- ``sdxl_b1`` / ``sdxl_b1_gc``: steady-state seconds per step at batch 1 without / with gradient
  checkpointing [<= 0.12 / 0.20 s]; ``sdxl_b1_gc`` also reports the peak memory [fits 24 GB].
- ``sdxl_b4``: batch 4, model FLOP utilisation [>= 35 %].
- ``sd15_b1``: SD1.5 at 512 x 512, batch 1 [<= 0.05 s].

Steady state: 10 warm-up steps, then ``--measure`` steps timed one by one (each step ends with the loss
read back, i.e. synchronised). MFU = FLOPs of one optimizer step (forward + backward with a frozen base,
no checkpointing recompute; traced on the meta device, docs/model-configs.md §9.5) / (median s/step x peak),
against the practical 795 TFLOP/s (docs/model-configs.md §9.4) and the 989.5 TFLOP/s spec. Peak memory is
``torch.cuda.max_memory_allocated`` over the measured steps (caching included for the job).

Record the results in docs/benchmarks.md with the device, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # cf_testing: tiny models and a small CLIP vocabulary

PRACTICAL_PEAK = 795e12
SPEC_PEAK = 989.5e12
CONFIGS = ("sdxl_job", "sdxl_b1", "sdxl_b1_gc", "sdxl_b4", "sd15_b1")


def _init_random(module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), biases 0, norms 1: random, but activations stay finite in bf16."""
    import torch

    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.copy_(
                    torch.randn(param.shape, generator=generator, device=param.device)
                    / param[0].numel() ** 0.5
                )
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()


def _vocab_dir(work: Path) -> Path:
    """ComfyUI's CLIP vocabulary when COMFYUI_DIR is set, else the test suite's small one (same format)."""
    from charforge.engine.train.models import MissingTokenizerError, find_tokenizer_dir

    try:
        return find_tokenizer_dir()
    except MissingTokenizerError:
        from cf_testing.models import write_tiny_clip_tokenizer

        return write_tiny_clip_tokenizer(work / "vocab")


def random_model(arch: str, device, dtype, work: Path, config_dir: Path | None = None):
    """A `BaseModel` of the real architecture with random weights, built on `device` (no file)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from charforge.engine.train.models import (
        BaseModel,
        _training_scheduler,
        fingerprint,
        load_tokenizers,
        shipped_config_dir,
    )

    folder = config_dir or shipped_config_dir(arch)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    unet = unet.to(dtype).to_empty(device=device)
    _init_random(unet, 0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")).to(device)
    encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
    if arch == "sdxl":
        encoders.append(
            CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        )
    encoders = [te.to(device, dtype).eval() for te in encoders]
    vae = vae.to(dtype if arch == "sd15" or dtype == torch.bfloat16 else torch.float32)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    model = BaseModel(
        arch=arch,
        source="random",
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=load_tokenizers(arch, _vocab_dir(work)),
        noise_scheduler=_training_scheduler(scheduler_config),
        sample_scheduler_config=scheduler_config,
        dtype=dtype,
    )
    model.fingerprints = {"vae": fingerprint(vae), "text_encoder": "random", "text_encoder_2": "random"}
    return model


def timed_steps(step, device, measure: int) -> list[float]:
    """Seconds of each of `measure` calls of `step` (one that returns when the step has finished on the device,
    e.g. by reading its loss back), after the warm-up: the device synchronised and its peak-memory count reset."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(measure):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def record_peak_memory(result: dict, device) -> None:
    """Add the device's peak allocated memory since the last reset (GiB) to `result`, on CUDA only."""
    import torch

    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def step_parser(
    doc: str, warmup: int, measure: int, rank: int, configs: tuple[str, ...]
) -> argparse.ArgumentParser:
    """The options every training-step benchmark takes (its own defaults for warm-up, measured steps, rank);
    `doc`: the script's docstring, whose first paragraph is the description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=configs, help="run only these configurations")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, few steps: check the script")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--measure", type=int, default=measure)
    parser.add_argument("--rank", type=int, default=rank)
    return parser


def print_result(result: dict, environment: dict, smoke: bool, device) -> None:
    """One JSON line per configuration; the CUDA cache emptied before the next one."""
    import torch

    print(json.dumps({**result, **environment, "smoke": smoke}), flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_dataset(folder: Path, count: int, size: int) -> Path:
    """`count` distinct synthetic photos (smooth patterns + noise) in a kohya folder, captioned."""
    import numpy as np
    from PIL import Image

    subset = folder / "img" / "10_ohwx person"
    subset.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for index in range(count):
        phase = rng.random(3) * 6.28
        rgb = np.stack(
            [np.sin(6 * xx + phase[0]), np.cos(5 * yy + phase[1]), np.sin(4 * (xx + yy) + phase[2])], -1
        )
        rgb = (rgb * 0.4 + 0.5 + rng.normal(0, 0.05, rgb.shape)).clip(0, 1)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(subset / f"{index:03d}.jpg", quality=92)
        (subset / f"{index:03d}.txt").write_text(f"ohwx person, photo {index % 5}")
    return folder / "img"


def _config(
    arch: str, resolution: int, rank: int, steps: int, batch: int, checkpointing: bool, precision: str
):
    from charforge.engine.train.config import preset_config, with_overrides

    config = with_overrides(
        preset_config("sdxl" if arch == "sdxl" else "sd15", arch),
        {
            "steps": steps,
            "batch_size": batch,
            "rank": rank,
            "alpha": rank / 2,
            "resolution": resolution,
            "min_bucket": resolution // 4,
            "max_bucket": resolution * 2,
            "mixed_precision": precision,
            "sample_every": 0,
            "checkpoint_every": 0,
            "trigger_word": "ohwx",
        },
    )
    return replace(config, gradient_checkpointing=checkpointing)


def _environment(device) -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    return {
        "device": name,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
    }


def steady_state(name: str, arch: str, args, device, work: Path, batch: int, checkpointing: bool) -> dict:
    import torch

    from charforge.engine.train.data import TrainingData, read_kohya_folder
    from charforge.engine.train.loop import Trainer
    from charforge.engine.train.preflight import profile_for

    resolution = args.resolution_sdxl if arch == "sdxl" else args.resolution_sd15
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    precision = "bf16" if device.type == "cuda" else "no"
    config = _config(arch, resolution, args.rank, args.warmup + args.measure, batch, checkpointing, precision)
    dataset = write_dataset(work / f"data_{resolution}", max(4, batch), resolution)
    model = random_model(arch, device, dtype, work, args.config_dir.get(arch))
    data = TrainingData.prepare(read_kohya_folder(dataset), config.data)
    trainer = Trainer(model, data, config, device)
    trainer.setup()
    trainer.train(until=args.warmup)
    times = timed_steps(trainer.train_step, device, args.measure)
    flops = profile_for(dict(model.unet.config), config).flops
    median = statistics.median(times)
    result = {
        "config": name,
        "arch": arch,
        "resolution": resolution,
        "batch": batch,
        "rank": args.rank,
        "gradient_checkpointing": checkpointing,
        "precision": precision,
        "steps_timed": len(times),
        "s_per_step_median": round(median, 4),
        "s_per_step_p10": round(statistics.quantiles(times, n=10)[0], 4)
        if len(times) >= 2
        else round(median, 4),
        "s_per_step_p90": round(statistics.quantiles(times, n=10)[-1], 4)
        if len(times) >= 2
        else round(median, 4),
        "samples_per_s": round(batch / median, 3),
        "tflop_per_step": float(f"{flops / 1e12:.4g}"),
        "mfu_practical": float(f"{flops / median / PRACTICAL_PEAK:.4g}"),
        "mfu_spec": float(f"{flops / median / SPEC_PEAK:.4g}"),
        "final_loss": trainer.last_loss,
    }
    record_peak_memory(result, device)
    del trainer, model
    return result


def whole_job(args, device, work: Path) -> dict:
    """Random SDXL single file on disk (untimed), then the node's whole job, timed."""
    import torch
    from safetensors.torch import save_file

    from charforge.engine.control import Control
    from charforge.engine.models.single_file import pipeline_to_single_file_state_dict
    from charforge.engine.train.job import TrainRequest, train

    arch = "sdxl"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(arch, device, dtype, work, args.config_dir.get(arch))
    state = pipeline_to_single_file_state_dict(
        {k: v.cpu() for k, v in model.unet.state_dict().items()},
        {k: v.cpu() for k, v in model.vae.state_dict().items()},
        {k: v.cpu() for k, v in model.text_encoders[0].state_dict().items()},
        {k: v.cpu() for k, v in model.text_encoders[1].state_dict().items()},
        unet_config=dict(model.unet.config),
    )
    checkpoint = work / "sdxl_random.safetensors"
    save_file(
        {
            k: v.to(torch.float16 if device.type == "cuda" else torch.float32).contiguous()
            for k, v in state.items()
        },
        str(checkpoint),
    )
    del model, state
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resolution = args.resolution_sdxl
    dataset = write_dataset(work / "job_data", args.images, resolution)
    config = _config(
        arch, resolution, args.rank, args.job_steps, 1, False, "bf16" if device.type == "cuda" else "no"
    )
    config = replace(config, samples=replace(config.samples, steps=args.sample_steps))
    phases: dict[str, float] = {}
    start = time.perf_counter()

    def on_event(name, event):
        phases.setdefault(event["phase"], round(time.perf_counter() - start, 2))

    result = train(
        TrainRequest(
            base_model=str(checkpoint),
            dataset=str(dataset),
            runs_dir=str(work / "runs"),
            name="bench",
            config=config,
            lora_dir=str(work / "loras"),
            config_dir=str(args.config_dir[arch]) if arch in args.config_dir else None,
            tokenizer_dirs=(str(_vocab_dir(work)),),
        ),
        Control(on_event=on_event),
    )
    seconds = time.perf_counter() - start
    out = {
        "config": "sdxl_job",
        "arch": arch,
        "resolution": resolution,
        "images": args.images,
        "steps": args.job_steps,
        "rank": args.rank,
        "job_seconds": round(seconds, 2),
        "phase_started_at_s": phases,
        "lora": Path(result.lora_path).name,
        "memory_profile": (result.estimate or {}).get("notes", []),
        "final_loss": result.loss,
        "preflight_seconds_per_step": (result.estimate or {}).get("seconds_per_step"),
    }
    record_peak_memory(out, device)
    return out


def main() -> None:
    parser = step_parser(__doc__, warmup=10, measure=50, rank=32, configs=CONFIGS)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--job-steps", type=int, default=500)
    parser.add_argument("--sample-steps", type=int, default=20)
    args = parser.parse_args()

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.config_dir = {}
    args.resolution_sdxl, args.resolution_sd15 = 1024, 512
    with tempfile.TemporaryDirectory(prefix="charforge-bench-") as scratch:
        work = Path(scratch)
        if args.smoke:
            from cf_testing.models import build_tiny_sd15, build_tiny_sdxl

            device = torch.device("cpu")
            torch.set_num_threads(1)
            args.config_dir = {
                "sd15": build_tiny_sd15(work / "tiny_sd15").diffusers_dir,
                "sdxl": build_tiny_sdxl(work / "tiny_sdxl").diffusers_dir,
            }
            args.resolution_sdxl = args.resolution_sd15 = 64
            args.warmup, args.measure, args.images, args.job_steps, args.sample_steps = 1, 3, 4, 4, 2
            args.rank = 4
        else:
            if not torch.cuda.is_available():
                sys.exit("bench_train.py measures on a CUDA GPU; use --smoke to check it on the CPU")
            device = torch.device("cuda")
        environment = _environment(device)
        for name in args.only or CONFIGS:
            if name == "sdxl_job":
                result = whole_job(args, device, work)
            else:
                arch = "sd15" if name.startswith("sd15") else "sdxl"
                batch = 4 if name == "sdxl_b4" else 1
                result = steady_state(name, arch, args, device, work, batch, name.endswith("_gc"))
            print_result(result, environment, args.smoke, device)


if __name__ == "__main__":
    main()
