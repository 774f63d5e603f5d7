"""CLIP-score throughput on a GPU: images/s of CharForge's batched CLIP scoring with ViT-L/14.

The model is the real CLIP ViT-L/14 architecture (openai/clip-vit-large-patch14 sizes: vision 24 x 1024,
patch 14, 224 px; text 12 x 768; projection 768) with random weights, saved as a Hugging Face folder and
loaded through CharForge's own loader (`ClipScorer.load`), so the measurement covers what the CLIP Score
node does: ComfyUI IMAGE batches (float32, B x H x W x 3, on the CPU as ComfyUI hands them over) moved to
the GPU, resized and cropped there, embedded in fp16, compared with the prompt embedding.

    python benchmarks/bench_clip_score.py [--device cuda] [--size 1024] [--batches 16 32 64 128]

Needs a CUDA GPU for the figures in docs/benchmarks.md (it runs on CPU too, slowly, with --device cpu
--spec tiny for a smoke test). Prints one JSON line; steady state only (one warm-up batch first).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--spec", choices=["vit-l-14", "tiny"], default="vit-l-14")
    parser.add_argument(
        "--size", type=int, default=1024, help="side of the square input images (ComfyUI IMAGE)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fp32", action="store_true", help="run the model in float32 instead of float16")
    args = parser.parse_args()

    import torch
    import transformers

    from cf_testing.face_models import CLIP_VIT_L14, TINY_CLIP, write_clip_folder

    spec = CLIP_VIT_L14 if args.spec == "vit-l-14" else TINY_CLIP
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = write_clip_folder(Path(tmp) / "clip-vit-l-14-random", spec)
        build_s = time.perf_counter() - start

        from charforge.engine.score.clip import ClipScorer

        scorer = ClipScorer.load(
            str(folder), device=args.device, half=False if args.fp32 else None
        )  # fp16 on GPU
        params = sum(p.numel() for p in scorer.model.parameters())
        prompt = ["a photo of sks person standing in a forest, cinematic light"]
        results = {}
        for batch in args.batches:
            images = torch.rand(batch, args.size, args.size, 3)
            scorer.score(images, prompt, batch_size=batch)  # warm-up: kernels, allocator
            times = []
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                scorer.score(images, prompt, batch_size=batch)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            results[str(batch)] = round(batch / statistics.median(times), 1)
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        print(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "device": torch.cuda.get_device_name()
                    if args.device.startswith("cuda")
                    else platform.processor(),
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda,
                    "transformers": transformers.__version__,
                    "model": f"CLIP {args.spec} random weights, {params / 1e6:.1f} M parameters",
                    "dtype": str(scorer.dtype),
                    "input": f"{args.size}x{args.size} float32 IMAGE batches from CPU memory",
                    "images_per_s_by_batch": results,
                    "peak_gpu_memory_gib": round(peak, 2) if peak is not None else None,
                    "model_build_s": round(build_s, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
