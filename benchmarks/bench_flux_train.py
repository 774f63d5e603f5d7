"""Flux.1-dev LoRA training speed and memory on the real architecture with random weights.

One command on a CUDA GPU (H100-class), one JSON line per configuration::

    python benchmarks/bench_flux_train.py                  # everything (a few minutes on an H100)
    python benchmarks/bench_flux_train.py --only flux_b1 anchor_b1
    python benchmarks/bench_flux_train.py --smoke          # CPU, a tiny Flux: checks the script itself

Configurations (issue 18's targets in brackets), all rank 16 on every linear layer of the blocks, 1024 x 1024,
batch 1, bf16, the text outputs cached (as the trainer runs after caching: T5 and CLIP-L are not on the GPU):

- ``flux_b1``: CharForge's `FlowTrainer` step without gradient checkpointing [<= 0.4 s/step];
- ``flux_b1_gc``: with gradient checkpointing;
- ``flux_fp8_gc``: fp8 (e4m3) base + gradient checkpointing: s/step [<= 0.6] and peak memory [<= 24 GB];
- ``anchor_b1``: the anchor, measured in the same process on the same random-weight transformer: a step
  written the way diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` does it (``add_adapter``
  with its default target modules, gaussian init, bf16 LoRA weights, AdamW, uniform timestep density over the
  unshifted scheduler table, guidance 3.5, packed latents, weighting 1). Our numbers are reported beside
  it as a ratio.

The trainer runs on a stand-in `FluxModel` whose VAE and text encoders return fixed random tensors of the real
shapes (16 x 128 x 128 latents, 512 x 4096 T5 states, 768 pooled): the step itself is the trainer's own code.
Steady state: ``--warmup`` steps, then ``--measure`` steps timed one by one (each ends with the loss read back).
MFU = 1.636e14 FLOPs per step (docs/flux.md: 2 x linear + 3 x attention forward, frozen base, no recompute) /
(median s/step x peak), against the practical 795 TFLOP/s and the 989.5 TFLOP/s spec. Peak memory is
``torch.cuda.max_memory_allocated`` over the measured steps. Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # cf_testing: the tiny Flux config for --smoke

PRACTICAL_PEAK = 795e12
SPEC_PEAK = 989.5e12
CONFIGS = ("flux_b1", "flux_b1_gc", "flux_fp8_gc", "anchor_b1")
DREAMBOOTH_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


def _random_transformer(config: dict, device, seed: int = 0):
    """The transformer built without memory on the meta device, then random weights ~ N(0, 1/fan_in) in bf16."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                std = 1.0 / math.sqrt(param.shape[1])
                param.copy_(
                    torch.randn(param.shape, generator=generator, device=device, dtype=param.dtype) * std
                )
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return model.eval().requires_grad_(False)


def _stand_in_model(transformer, text_tokens: int, pooled_dim: int, joint_dim: int):
    """A `FluxModel` whose VAE and text encoders give fixed random tensors of the real shapes."""
    import torch

    from charforge.engine.train.flow.flux import FluxModel

    class StandIn(FluxModel):
        def encode_images(self, pixels):
            b, _, h, w = pixels.shape
            g = torch.Generator(device=pixels.device).manual_seed(1)
            return torch.randn(b, 16, h // 8, w // 8, generator=g, device=pixels.device)

        def encode_text(self, captions, device, settings, encoders=None):
            g = torch.Generator(device=device).manual_seed(2)
            n = len(captions)
            return {
                "pooled": torch.randn(n, pooled_dim, generator=g, device=device),
                "t5": torch.randn(n, text_tokens, joint_dim, generator=g, device=device),
            }

    vae = torch.nn.Module()
    return StandIn(
        arch="flux-dev",
        source="random",
        transformer=transformer,
        vae=vae,
        text_encoders={"clip_l": torch.nn.Identity(), "t5": torch.nn.Identity()},
        tokenizers={},
        dtype=torch.bfloat16,
        fingerprints={"vae": "random", "clip_l": "random", "t5": "random"},
    )


def _image(folder: Path, size: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path = folder / "photo.png"
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


def _timed(step, warmup: int, measure: int, sync) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(measure):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def run_trainer(name: str, args, transformer_config: dict, device, folder: Path) -> dict:
    import torch

    from charforge.engine.train.config import TrainConfig, with_overrides
    from charforge.engine.train.data import TrainingData, items_from_pairs
    from charforge.engine.train.flow.trainer import FlowTrainer

    overrides = {
        "steps": 100000,
        "resolution": args.resolution,
        "rank": 16,
        "alpha": 16.0,
        "targets": "all_linear",
        "mixed_precision": "bf16" if device.type == "cuda" else "no",
        "gradient_checkpointing": name != "flux_b1",
        "fp8_base": name == "flux_fp8_gc",
        "schedule": "constant",
        "warmup_steps": 0,
        "min_snr_gamma": 0.0,
        "sample_every": 0,
        "loss_every": 1,
        "bucket_step": 64 if args.resolution >= 256 else 16,
        "min_bucket": 32,
    }
    config = with_overrides(TrainConfig(), overrides)
    transformer = _random_transformer(transformer_config, device)
    model = _stand_in_model(
        transformer,
        args.text_tokens,
        transformer_config["pooled_projection_dim"],
        transformer_config["joint_attention_dim"],
    )
    data = TrainingData.prepare(
        items_from_pairs([(_image(folder, args.resolution), "sks person")]), config.data
    )
    trainer = FlowTrainer(model, data, config, device)
    trainer.setup()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _timed(trainer.train_step, args.warmup, args.measure, sync)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    del trainer, model, transformer
    return {"seconds": times, "peak_bytes": peak}


def run_anchor(args, transformer_config: dict, device) -> dict:
    """A step as diffusers' DreamBooth-LoRA Flux example computes it (see the module docstring)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from peft import LoraConfig

    transformer = _random_transformer(transformer_config, device)
    transformer.add_adapter(
        LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=DREAMBOOTH_TARGETS)
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sigmas_table = scheduler.sigmas.to(device)
    latent = args.resolution // 8
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(1, 16, latent, latent, generator=g, device=device, dtype=torch.bfloat16)
    prompt = torch.randn(
        1, args.text_tokens, transformer_config["joint_attention_dim"], generator=g, device=device
    )
    prompt = prompt.to(torch.bfloat16)
    pooled = torch.randn(1, transformer_config["pooled_projection_dim"], generator=g, device=device)
    pooled = pooled.to(torch.bfloat16)
    text_ids = torch.zeros(args.text_tokens, 3, device=device, dtype=torch.bfloat16)
    ids = torch.zeros(latent // 2, latent // 2, 3, device=device)
    ids[..., 1] += torch.arange(latent // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(latent // 2, device=device)[None, :]
    img_ids = ids.reshape(-1, 3).to(torch.bfloat16)
    guidance = torch.full((1,), 3.5, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        noise = torch.randn_like(x0)
        u = torch.rand(1, device=device)
        index = (u * 1000).to(torch.int64)
        sigma = sigmas_table[index].to(x0.dtype).reshape(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        packed = noisy.view(1, 16, latent // 2, 2, latent // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(1, (latent // 2) ** 2, 64)
        with autocast:
            out = transformer(
                hidden_states=packed,
                timestep=sigma.flatten(),
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=prompt,
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
        pred = out.view(1, latent // 2, latent // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(x0.shape)
        loss = torch.mean(((pred.float() - (noise - x0).float()) ** 2).reshape(1, -1), 1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _timed(step, args.warmup, args.measure, sync)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return {"seconds": times, "peak_bytes": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny Flux, few steps: checks the script")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--measure", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=512)
    args = parser.parse_args(argv)

    import torch

    from charforge.engine.train.models import CONFIG_ROOT

    if args.smoke:
        from cf_testing.flow_models import TINY_FLUX

        transformer_config = dict(TINY_FLUX, guidance_embeds=True)
        device = torch.device("cpu")
        args.resolution, args.text_tokens, args.warmup, args.measure = 64, 16, 1, 2
    else:
        transformer_config = json.loads(
            (CONFIG_ROOT / "flux-dev" / "transformer" / "config.json").read_text()
        )
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    flops = 1.636e14 if not args.smoke else 0.0
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.only:
            if name == "anchor_b1":
                result = run_anchor(args, transformer_config, device)
            else:
                result = run_trainer(name, args, transformer_config, device, Path(scratch))
            median = statistics.median(result["seconds"])
            row = {
                "config": name,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "seconds_per_step": round(median, 4),
                "peak_gb": round(result["peak_bytes"] / 2**30, 2),
                "mfu_practical": round(flops / median / PRACTICAL_PEAK, 3) if flops else None,
                "mfu_spec": round(flops / median / SPEC_PEAK, 3) if flops else None,
                "torch": torch.__version__,
            }
            results[name] = row
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
    if "anchor_b1" in results:
        anchor = results["anchor_b1"]["seconds_per_step"]
        for name, row in results.items():
            if name != "anchor_b1":
                print(
                    json.dumps(
                        {"config": name, "ratio_to_anchor": round(row["seconds_per_step"] / anchor, 3)}
                    )
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
