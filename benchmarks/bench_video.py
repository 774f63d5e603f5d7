"""AnimateDiff clip speed and memory: CharForge's video engine against diffusers' AnimateDiffPipeline.

The models are the real SD1.5 U-Net + AnimateDiff v3 motion-module architecture (1,276.7 M parameters,
the pack's shipped SD1.5 configs, ``MotionAdapter`` v3: no mid block, 32-frame positional table), the
SD VAE and CLIP-L text encoder, all with random weights built on the device, so nothing is downloaded.
The workload is the issue's: 16 frames, 512 x 512, 25 DDIM steps, classifier-free guidance 7.5, bf16,
end to end (prompt encoding, denoising, VAE decode of every frame, frames back on the CPU).

    python benchmarks/bench_video.py                       # GPU: every config, one JSON line each
    python benchmarks/bench_video.py --configs charforge    # only some configs
    python benchmarks/bench_video.py --smoke               # CPU smoke test: tiny models, 2 steps

Configs:

- ``diffusers``: ``AnimateDiffPipeline`` as published (bf16, SDPA, ``output_type="np"``), 16 frames;
- ``charforge``: ``charforge.engine.video.generate_video`` (bf16, SDPA, VAE slicing), 16 and 64 frames
  (64 = five overlapping 16-frame context windows, overlap 4);
- ``charforge-compile``: the same with the U-Net under ``torch.compile`` (compile time reported apart).

Each line has the median seconds per clip over ``--repeats`` clips after one warm-up clip, the FLOPs per
clip (counted here on the meta device with ``torch.utils.flop_counter``; for the real 16-frame config
they equal docs/model-configs.md §9.3: 25 x 2 x 17.675 + 16 x 2.515 = 924.0 TFLOP), MFU against the practical
795 TFLOP/s of §9.4 (and against the 989.5 TFLOP/s H100 spec), and the peak of
``torch.cuda.max_memory_allocated`` during the timed clips. Results go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

PRACTICAL_PEAK = (
    795e12  # docs/model-configs.md §9.4: measured bf16 matmul peak on the H100 / H200 test machines
)
SPEC_PEAK = 989.5e12  # H100 SXM dense bf16, spec
PROMPT = "a photo of sks woman walking on a beach, smiling, golden hour"
NEGATIVE = "blurry, low quality"
CONFIGS = ("diffusers", "charforge", "charforge-compile")


def _json_config(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def model_configs(smoke: bool) -> dict:
    """U-Net, VAE, text-encoder and motion-adapter configs: the real SD1.5 + v3 ones, or tiny for --smoke."""
    if smoke:
        from cf_testing.models import TINY_CLIP_L, TINY_SD15_UNET, TINY_VAE
        from cf_testing.video_models import tiny_motion_config

        return {
            "unet": dict(TINY_SD15_UNET),
            "vae": {**TINY_VAE, "scaling_factor": 0.18215},
            "text_encoder": dict(TINY_CLIP_L),
            "motion": tiny_motion_config("v3"),
        }
    shipped = REPO / "custom_nodes" / "charforge" / "engine" / "train" / "configs" / "sd15"
    return {
        "unet": _json_config(shipped / "unet" / "config.json"),
        "vae": _json_config(shipped / "vae" / "config.json"),
        "text_encoder": _json_config(shipped / "text_encoder" / "config.json"),
        "motion": {
            "block_out_channels": (320, 640, 1280, 1280),
            "motion_layers_per_block": 2,
            "motion_num_attention_heads": 8,
            "motion_norm_num_groups": 32,
            "motion_max_seq_length": 32,
            "use_motion_mid_block": False,
        },
    }


def count_flops(configs: dict, window: int, latent: int, text_dim: int) -> tuple[float, float]:
    """FLOPs of one motion-U-Net pass over `window` frames (batch 1) and of one VAE frame decode (meta device)."""
    import torch
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNetMotionModel.from_unet2d(
            UNet2DConditionModel(**configs["unet"]), MotionAdapter(**configs["motion"]), load_weights=False
        )
        vae = AutoencoderKL(**configs["vae"])
    sample = torch.empty(1, 4, window, latent, latent, device="meta")
    text = torch.empty(window, 77, text_dim, device="meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor([500], device="meta"), encoder_hidden_states=text)
    unet_flops = counter.get_total_flops()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        vae.decode(torch.empty(1, 4, latent, latent, device="meta"))
    return float(unet_flops), float(counter.get_total_flops())


def build_parts(configs: dict, device, dtype, tokenizer_dir: Path):
    """Random-weight U-Net, motion adapter, VAE, text encoder (created on `device`) and a CLIP tokenizer."""
    import torch
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**configs["unet"]).to(dtype).eval()
        adapter = MotionAdapter(**configs["motion"]).eval()
        vae = AutoencoderKL(**configs["vae"]).to(dtype).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).to(dtype).eval()
    # The pack ships no CLIP vocabulary; the tests' small BPE vocabulary in the CLIP format stands in for it
    # (text encoding is well under 1 % of a clip).
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    for module in (unet, adapter, vae, text_encoder):
        module.requires_grad_(False)
    return unet, adapter, vae, text_encoder, tokenizer


# SD1.5's noise schedule; the diffusers anchor gets it as beta_schedule "linear" (see diffusers_pipeline).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


def charforge_model(configs: dict, device, dtype, tokenizer_dir: Path, options):
    """CharForge's video model assembled from fresh random-weight parts (`options`: its RuntimeOptions)."""
    import torch

    from charforge.engine.video.models import assemble_video_model
    from charforge.engine.video.motion import inspect_state_dict

    unet, adapter, vae, text_encoder, tokenizer = build_parts(configs, device, dtype, tokenizer_dir)
    with torch.device(device):
        return assemble_video_model(
            "sd15",
            unet,
            adapter,
            inspect_state_dict(adapter.state_dict(), "diffusers"),
            vae=vae,
            text_encoders=[text_encoder],
            tokenizers=[tokenizer],
            scheduler_config=SCHEDULER_CONFIG,
            options=options,
        )


def video_request(frames: int, size: int, steps: int, cfg: float, window: int, overlap: int):
    """The benchmark's clip for CharForge: PROMPT / NEGATIVE, DDIM, seed 1, square frames."""
    from charforge.engine.video import ContextOptions, VideoRequest

    return VideoRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        frames=frames,
        width=size,
        height=size,
        steps=steps,
        cfg=cfg,
        scheduler="ddim",
        seed=1,
        context=ContextOptions(length=window, overlap=overlap),
    )


def diffusers_pipeline(configs: dict, device, dtype, tokenizer_dir: Path):
    """diffusers' AnimateDiffPipeline as published, on fresh random-weight parts, with the same DDIM schedule."""
    import diffusers
    import torch

    unet, adapter, vae, text_encoder, tokenizer = build_parts(configs, device, dtype, tokenizer_dir)
    scheduler = diffusers.DDIMScheduler(
        **{**SCHEDULER_CONFIG, "beta_schedule": "linear"},
        clip_sample=False,
        timestep_spacing="linspace",
        set_alpha_to_one=False,
    )
    with torch.device(device):
        pipe = diffusers.AnimateDiffPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            motion_adapter=adapter,
            scheduler=scheduler,
        )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_clip(pipe, frames: int, size: int, steps: int, cfg: float):
    """The same clip as video_request through the diffusers pipeline (frames as numpy)."""
    import torch

    return pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_frames=frames,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="np",
    ).frames


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def time_clips(run, repeats: int, device) -> tuple[float, list[float], float | None]:
    """Warm-up clip (returned as seconds) then `repeats` timed clips; peak memory over the timed clips."""
    start = time.perf_counter()
    run()
    _sync(device)
    warmup = time.perf_counter() - start
    _reset_peak(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return warmup, times, _peak_gib(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny models, 64 px, 2 steps")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=CONFIGS,
        default=None,
        help="default: all on GPU; diffusers and charforge with --smoke (compiling on CPU takes minutes)",
    )
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="clip lengths (default 16 64)")
    parser.add_argument("--size", type=int, default=None, help="frame side in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 25)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=None, help="timed clips per config (default 5)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    args = parser.parse_args()

    import diffusers
    import torch

    from cf_testing.models import write_tiny_clip_tokenizer
    from charforge.engine.video import RuntimeOptions, generate_video

    smoke = args.smoke
    chosen = args.configs or (["charforge", "diffusers"] if smoke else list(CONFIGS))
    device = torch.device("cpu" if smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --smoke for the CPU smoke test")
    frames_list = args.frames or ([8, 24] if smoke else [16, 64])
    size = args.size or (64 if smoke else 512)
    steps = args.steps or (2 if smoke else 25)
    repeats = args.repeats or (1 if smoke else 5)
    dtype_name = args.dtype or ("fp32" if smoke else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    window = 8 if smoke else 16
    overlap = 2 if smoke else 4
    configs = model_configs(smoke)
    latent = size // 8
    text_dim = configs["text_encoder"]["hidden_size"]
    unet_flops, vae_flops = count_flops(configs, window, latent, text_dim)
    # A clip shorter than the window runs as one shorter window: count it at its own length.
    short_flops = {f: count_flops(configs, f, latent, text_dim)[0] for f in frames_list if f < window}
    passes = 2 if args.cfg > 1 else 1

    from charforge.engine.video.context import context_windows

    def clip_flops(frames: int) -> tuple[float, int]:
        windows = context_windows(frames, window, overlap)
        per_window = short_flops.get(frames, unet_flops)
        return steps * passes * per_window * len(windows) + frames * vae_flops, len(windows)

    common = {
        "bench": "video",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "smoke": smoke,
        "size": size,
        "steps": steps,
        "cfg": args.cfg,
        "dtype": dtype_name,
        "scheduler": "ddim",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": datetime.date.today().isoformat(),
        "unet_tflop_per_window_pass": round(unet_flops / 1e12, 6),
        "vae_decode_tflop_per_frame": round(vae_flops / 1e12, 6),
        "window": window,
        "overlap": overlap,
    }

    def report(
        config: str, frames: int, warmup: float, times: list[float], peak: float | None, **extra
    ) -> None:
        flops, windows = clip_flops(frames)
        median = statistics.median(times)
        line = {
            **common,
            "config": config,
            "frames": frames,
            "windows": windows,
            "s_per_clip": round(median, 3),
            "s_per_clip_all": [round(t, 3) for t in times],
            "warmup_s": round(warmup, 2),
            "tflop_per_clip": round(flops / 1e12, 4),
            "mfu_vs_795": round(flops / (median * PRACTICAL_PEAK), 4) if not smoke else None,
            "mfu_vs_989_spec": round(flops / (median * SPEC_PEAK), 4) if not smoke else None,
            "peak_mem_gib": peak,
            **extra,
        }
        print(json.dumps(line), flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = write_tiny_clip_tokenizer(Path(scratch) / "tokenizer")

        for config in [c for c in chosen if c.startswith("charforge")]:
            options = RuntimeOptions(
                device=device.type, dtype=dtype_name, compile=config == "charforge-compile"
            )
            model = charforge_model(configs, device, dtype, tokenizer_dir, options)
            for frames in frames_list:
                request = video_request(frames, size, steps, args.cfg, window, overlap)
                warmup, times, peak = time_clips(
                    lambda m=model, r=request: generate_video(m, r), repeats, device
                )
                report(config, frames, warmup, times, peak)
            del model
            _reset_peak(device)

        if "diffusers" in chosen:
            pipe = diffusers_pipeline(configs, device, dtype, tokenizer_dir)
            for frames in [f for f in frames_list if f <= window]:  # the published pipeline has no windows

                def run(frames=frames):
                    return diffusers_clip(pipe, frames, size, steps, args.cfg)

                warmup, times, peak = time_clips(run, repeats, device)
                report("diffusers", frames, warmup, times, peak)


if __name__ == "__main__":
    main()
