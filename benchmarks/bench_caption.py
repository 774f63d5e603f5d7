"""Captioning throughput: image files on disk -> captions written, with BLIP-large (or Florence-2-large).

The model is the real architecture with random weights (BLIP-large: ViT-L/16 at 384 px + BERT-base
decoder, 30524 tokens; Florence-2-large: DaViT at 768 px + BART-large), saved as a Hugging Face folder
and loaded by CharForge's own `TransformersCaptioner`. Every caption is exactly `--tokens` new tokens
(30 by default; min = max new tokens, greedy). The timed part is what Caption Dataset does: decode the
JPEG photos from disk (threads, next batch while the GPU works), preprocess with the model's processor,
generate, decode, apply the caption rules (trigger word) and write the ``.txt`` sidecars. The model is
loaded and warmed up (one batch) before timing.

    python benchmarks/bench_caption.py --device cuda                      # BLIP-large, batch 1 and 32
    python benchmarks/bench_caption.py --device cuda --model florence2-large
    python benchmarks/bench_caption.py --device cpu --model tiny-blip --images 16 --single-images 4   # smoke test

Prints one JSON line: images per minute for each batch size and the ratio batch-32 / batch-1.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

MODELS = {
    # name: (backend, writer name, spec name)
    "blip-large": ("blip", "write_tiny_blip", "BLIP_LARGE"),
    "florence2-large": ("florence2", "write_tiny_florence2", "FLORENCE2_LARGE"),
    "tiny-blip": ("blip", "write_tiny_blip", "TINY_BLIP"),
    "tiny-florence2": ("florence2", "write_tiny_florence2", "TINY_FLORENCE2"),
}


def write_photos(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """`count` JPEG photos (smooth colour fields with noise, so they compress like photos)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        base = rng.uniform(0, 255, 3)
        field = np.stack(
            [
                base[c] * 0.5 + 60 * np.sin(x / (40 + 7 * c + i % 13)) + 60 * np.cos(y / (50 + 5 * c))
                for c in range(3)
            ],
            axis=-1,
        )
        field += rng.normal(0, 8, field.shape)
        path = folder / f"photo_{i:05d}.jpg"
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", choices=sorted(MODELS), default="blip-large")
    parser.add_argument("--images", type=int, default=1024, help="photos captioned by the batched path")
    parser.add_argument("--single-images", type=int, default=64, help="photos captioned one at a time")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=30, help="new tokens per caption (fixed)")
    parser.add_argument("--photo-size", default="1024x768", help="WIDTHxHEIGHT of the JPEG photos on disk")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--workers", type=int, default=0, help="decode threads (0: up to 8)")
    args = parser.parse_args()

    import torch
    import transformers

    from cf_testing import caption_models
    from charforge.engine.caption.backends.hf import HFSettings, TransformersCaptioner
    from charforge.engine.caption.dataset import caption_dataset
    from charforge.engine.caption.postprocess import CaptionRules
    from charforge.engine.dataset.load import load_folder

    backend, writer, spec = MODELS[args.model]
    width, height = (int(v) for v in args.photo_size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        folder = getattr(caption_models, writer)(tmp / args.model, spec=getattr(caption_models, spec))
        build_s = time.perf_counter() - start
        count = max(args.images, args.single_images, args.batch)
        write_photos(tmp / "photos", count, width, height)

        settings = HFSettings(
            device=args.device,
            dtype=args.precision,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            batch_size=args.batch,
        )
        captioner = TransformersCaptioner(backend, str(folder), settings)
        params = sum(p.numel() for p in captioner.model.parameters())
        rules = CaptionRules(
            trigger="ohwx", class_tokens="person", template="{trigger} {class}, {caption}", max_tokens=0
        )

        from PIL import Image

        warm = [Image.open(p).convert("RGB") for p in sorted((tmp / "photos").glob("*.jpg"))[: args.batch]]
        tokens = captioner.generate(warm)  # warm-up (kernels, allocator) and a check of the fixed length
        generated = int(tokens.shape[1]) - (0 if backend == "blip2" else 1)

        def sync():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        results = {}
        for label, batch, n in (
            ("batch_1", 1, args.single_images),
            (f"batch_{args.batch}", args.batch, args.images),
        ):
            photos = sorted((tmp / "photos").glob("*.jpg"))[:n]
            sub = tmp / f"photos_{label}"
            sub.mkdir()
            for p in photos:
                (sub / p.name).symlink_to(p)
            manifest = load_folder(sub, tmp / f"dataset_{label}", read_captions=False)
            captioner.batch_size = batch
            sync()
            start = time.perf_counter()
            run = caption_dataset(
                manifest, captioner, rules, mode="overwrite", batch_size=batch, workers=args.workers
            )
            sync()
            seconds = time.perf_counter() - start
            written = len(list((tmp / f"dataset_{label}").rglob("*.txt")))
            results[label] = {
                "images": n,
                "captioned": len(run.captioned),
                "sidecars_written": written,
                "seconds": round(seconds, 3),
                "images_per_min": round(60 * n / seconds, 1),
            }
        single = results["batch_1"]["images_per_min"]
        batched = results[f"batch_{args.batch}"]["images_per_min"]
        device_name = (
            torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
        )
        print(
            json.dumps(
                {
                    "benchmark": "caption",
                    "model": args.model,
                    "backend": backend,
                    "params_m": round(params / 1e6, 1),
                    "device": args.device,
                    "device_name": device_name,
                    "dtype": str(captioner.dtype).replace("torch.", ""),
                    "tokens_per_caption": generated,
                    "photo_size": args.photo_size,
                    "build_model_s": round(build_s, 1),
                    "results": results,
                    "batched_over_single": round(batched / single, 2) if single else None,
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                }
            )
        )
        captioner.close()


if __name__ == "__main__":
    main()
