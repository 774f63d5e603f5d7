"""SD3.5 LoRA training speed: the real SD3.5 Large / Medium MMDiT with random weights, against an anchor.

One command on a CUDA GPU (H100-class), one JSON line per configuration::

    python benchmarks/bench_sd3.py                       # everything (a few minutes on an H100)
    python benchmarks/bench_sd3.py --only sd35_large_b1 anchor_sd35_large_b1
    python benchmarks/bench_sd3.py --smoke               # CPU, tiny models: checks the script itself

Configurations (issue 18's target in brackets: >= 45 % MFU against the practical peak):

- ``sd35_large_b1`` / ``sd35_large_b1_gc``: CharForge's flow trainer (`FlowTrainer` on an `SD3Model`) at
  1024 x 1024, batch 1, LoRA rank 16 on the attention layers, bf16, without / with gradient checkpointing:
  steady-state seconds per step, MFU, peak memory.
- ``sd35_medium_b1``: SD3.5 Medium likewise.
- ``anchor_sd35_large_b1``: the anchor, measured in the same run on the same random-weight MMDiT: a minimal
  diffusers + peft step as diffusers' SD3 DreamBooth LoRA example takes it (peft LoRA on the same layers,
  fp32 LoRA weights, bf16 autocast, AdamW, one backward), on random latents and conditioning. The trainer's
  line reports ``vs_anchor`` = anchor s/step / trainer s/step when both ran.

The text encoders are the real widths with one layer each (their outputs are cached before the first step
and they are dropped, so they never enter a step); the VAE is SD3's at full size (it caches the latents).
Conditioning is 77 CLIP + 256 T5 tokens (the pipeline's default). FLOPs per step: the flow preflight's count
(`flow.preflight.step_flops`; frozen base: 2 x linear + 3 x attention, checkpointing recompute left out as
MFU asks), MFU = FLOPs / (median s/step x peak), against
the practical 795 TFLOP/s and the 989.5 TFLOP/s spec (docs/model-configs.md §9.4). Steady state: warm-up
steps, then ``--measure`` steps each read back (synchronised).

Record the results in docs/benchmarks.md with the device, versions and date.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # cf_testing: tiny models, small tokenizers
sys.path.insert(0, str(HERE))

from bench_train import (  # noqa: E402
    PRACTICAL_PEAK,
    SPEC_PEAK,
    _environment,
    _init_random,
    _vocab_dir,
    print_result,
    record_peak_memory,
    step_parser,
    timed_steps,
    write_dataset,
)

CONFIGS = ("anchor_sd35_large_b1", "sd35_large_b1", "sd35_large_b1_gc", "sd35_medium_b1")
TEXT_TOKENS = 77 + 256


def _transformer(config: dict, device, dtype):
    import torch
    from diffusers import SD3Transformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the training dtype: no cast (and no diffusers warning) after
    try:
        with torch.device("meta"):
            model = SD3Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    _init_random(model, 0)
    with torch.no_grad():
        for buffer in model.buffers():  # the position table: zeros are as fast as sines
            buffer.zero_()
    return model.requires_grad_(False)


def _configs(arch: str, smoke_dir: Path | None) -> dict[str, dict]:
    """Component configs: the shipped ones (real sizes, encoders cut to one layer), or the tiny model's."""
    from charforge.engine.train.flow import sd3

    def read(path: Path) -> dict:
        return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}

    if smoke_dir is not None:
        return {
            "transformer": read(smoke_dir / "transformer" / "config.json"),
            "vae": read(smoke_dir / "vae" / "config.json"),
            "clip_l": read(smoke_dir / "text_encoder" / "config.json"),
            "clip_g": read(smoke_dir / "text_encoder_2" / "config.json"),
            "t5": read(smoke_dir / "text_encoder_3" / "config.json"),
        }
    return {
        "transformer": read(sd3.CONFIG_DIR / "transformer" / f"{arch}.json"),
        "vae": read(sd3.CONFIG_DIR / "vae" / "config.json"),
        "clip_l": {**read(sd3.CONFIG_DIR / "text_encoder" / "config.json"), "num_hidden_layers": 1},
        "clip_g": {**read(sd3.CONFIG_DIR / "text_encoder_2" / "config.json"), "num_hidden_layers": 1},
        "t5": {**read(sd3.CONFIG_DIR / "text_encoder_3" / "config.json"), "num_layers": 1},
    }


def _t5_tokenizer(work: Path):
    from charforge.engine.train.flow.flux import MissingPartError, load_t5_tokenizer

    try:
        return load_t5_tokenizer()
    except MissingPartError:
        from cf_testing.sd3_models import write_tiny_t5_tokenizer

        return load_t5_tokenizer([write_tiny_t5_tokenizer(work / "t5_tokenizer")])


def random_sd3(arch: str, device, dtype, work: Path, smoke_dir: Path | None = None):
    """An `SD3Model` of the real architecture with random weights, built on `device` (no file)."""
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    from charforge.engine.train.flow.sd3 import SD3Model
    from charforge.engine.train.models import fingerprint

    configs = _configs(arch, smoke_dir)
    vae = AutoencoderKL(**configs["vae"]).to(device).eval().requires_grad_(False)
    encoders = {
        "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(**configs["clip_l"])),
        "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**configs["clip_g"])),
        "t5": T5EncoderModel(T5Config(**configs["t5"])),
    }
    encoders = {k: v.to(device, dtype).eval().requires_grad_(False) for k, v in encoders.items()}
    vocab = _vocab_dir(work)
    tokenizers = {
        "clip_l": CLIPTokenizer.from_pretrained(str(vocab)),
        "clip_g": CLIPTokenizer.from_pretrained(str(vocab), pad_token="!"),
        "t5": _t5_tokenizer(work),
    }
    model = SD3Model(
        arch=arch,
        source="random",
        transformer=_transformer(configs["transformer"], device, dtype),
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        dtype=dtype,
    )
    model.fingerprints = {"vae": fingerprint(vae), **dict.fromkeys(encoders, "random")}
    return model


def _train_config(args, resolution: int, checkpointing: bool, precision: str):
    from charforge.engine.train.config import TrainConfig, with_overrides

    return with_overrides(
        TrainConfig(),
        {
            "steps": args.warmup + args.measure + 1,
            "resolution": resolution,
            "rank": args.rank,
            "alpha": float(args.rank),
            "targets": "attention",
            "gradient_checkpointing": checkpointing,
            "mixed_precision": precision,
            "learning_rate": 1e-4,
            "warmup_steps": 0,
            "sample_every": 0,
            "checkpoint_every": 0,
            "min_snr_gamma": 0.0,
        },
    )


def _timings(times: list[float], flops: float) -> dict:
    median = statistics.median(times)
    return {
        "steps_timed": len(times),
        "s_per_step_median": round(median, 4),
        "s_per_step_p90": round(statistics.quantiles(times, n=10)[-1], 4)
        if len(times) >= 2
        else round(median, 4),
        "tflop_per_step": float(f"{flops / 1e12:.4g}"),
        "mfu_practical": float(f"{flops / median / PRACTICAL_PEAK:.4g}"),
        "mfu_spec": float(f"{flops / median / SPEC_PEAK:.4g}"),
    }


def trainer_steps(name: str, arch: str, args, device, work: Path, checkpointing: bool) -> dict:
    import torch

    from charforge.engine.train.data import TrainingData, read_kohya_folder
    from charforge.engine.train.flow.preflight import step_flops
    from charforge.engine.train.flow.trainer import FlowTrainer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    precision = "bf16" if device.type == "cuda" else "no"
    config = _train_config(args, args.resolution, checkpointing, precision)
    dataset = write_dataset(work / f"data_{args.resolution}", 4, args.resolution)
    model = random_sd3(arch, device, dtype, work, args.smoke_dir)
    trainer = FlowTrainer(
        model, TrainingData.prepare(read_kohya_folder(dataset), config.data), config, device
    )
    trainer.setup()
    trainer.train(until=args.warmup)
    # train_step returns the loss as a float: the step has finished on the device
    times = timed_steps(trainer.train_step, device, args.measure)
    _, flops = step_flops(model, replace(config, gradient_checkpointing=False))  # MFU: no recompute
    result = {
        "config": name,
        "arch": arch,
        "resolution": args.resolution,
        "rank": args.rank,
        "gradient_checkpointing": checkpointing,
        "precision": precision,
        **_timings(times, flops),
        "final_loss": trainer.last_loss,
    }
    record_peak_memory(result, device)
    return result


def anchor_steps(name: str, arch: str, args, device, work: Path) -> dict:
    """diffusers + peft as diffusers' SD3 LoRA example steps: the same MMDiT, the same layers, no CharForge."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from charforge.engine.train.flow.preflight import step_flops
    from charforge.engine.train.flow.sd3 import SD3Model, sd3_lora_targets

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = _configs(arch, args.smoke_dir)["transformer"]
    transformer = _transformer(config, device, dtype)
    targets = sd3_lora_targets(transformer, "attention")
    lora = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=targets)
    inject_adapter_in_model(lora, transformer)
    params = []
    for param_name, param in transformer.named_parameters():
        if "lora_" in param_name:
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latent = args.resolution // 8
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(1, config["in_channels"], latent, latent, generator=generator, device=device)
    context = torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"], generator=generator, device=device)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=generator, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        noise = torch.randn(x0.shape, generator=generator, device=device)
        sigma = torch.sigmoid(torch.randn((1,), generator=generator, device=device))
        noisy = (1 - sigma) * x0 + sigma * noise
        with autocast:
            prediction = transformer(
                hidden_states=noisy.to(dtype),
                encoder_hidden_states=context.to(dtype),
                pooled_projections=pooled.to(dtype),
                timestep=sigma * 1000,
            ).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise - x0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    times = timed_steps(step, device, args.measure)
    stand_in = SD3Model(arch, "random", transformer, None, {}, {}, dtype)  # only its shape is read
    _, flops = step_flops(stand_in, _train_config(args, args.resolution, False, "bf16"))
    result = {
        "config": name,
        "arch": arch,
        "resolution": args.resolution,
        "rank": args.rank,
        **_timings(times, flops),
    }
    record_peak_memory(result, device)
    return result


def main() -> None:
    args = step_parser(__doc__, warmup=5, measure=20, rank=16, configs=CONFIGS).parse_args()

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.resolution, args.smoke_dir = 1024, None
    with tempfile.TemporaryDirectory(prefix="charforge-bench-sd3-") as scratch:
        work = Path(scratch)
        if args.smoke:
            from cf_testing.sd3_models import build_tiny_sd3

            device = torch.device("cpu")
            torch.set_num_threads(1)
            args.smoke_dir = build_tiny_sd3(work / "tiny", "sd35-medium").diffusers_dir
            args.resolution, args.warmup, args.measure, args.rank = 64, 1, 2, 4
        else:
            if not torch.cuda.is_available():
                sys.exit("bench_sd3.py measures on a CUDA GPU; use --smoke to check it on the CPU")
            device = torch.device("cuda")
        environment = _environment(device)
        anchors: dict[str, float] = {}
        for name in args.only or CONFIGS:
            arch = "sd35-medium" if "medium" in name else "sd35-large"
            if name.startswith("anchor_"):
                result = anchor_steps(name, arch, args, device, work)
                anchors[name.removeprefix("anchor_")] = result["s_per_step_median"]
            else:
                result = trainer_steps(name, arch, args, device, work, name.endswith("_gc"))
                if name in anchors:
                    result["vs_anchor"] = round(anchors[name] / result["s_per_step_median"], 3)
            print_result(result, environment, args.smoke, device)


if __name__ == "__main__":
    main()
