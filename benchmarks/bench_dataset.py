"""Dataset preparation throughput on CPU: analyse + deduplicate + crop of many ~1-4 MP photos.

    .venv/bin/python benchmarks/bench_dataset.py                  # 1,000 photos, workers 1 and 2
    .venv/bin/python benchmarks/bench_dataset.py --count 200 --workers 1 2 4 --detector mtcnn none

The photos are synthetic JPEGs (smooth colour fields, shapes, grain; 1.2 to 4 MP, landscape and portrait,
5 % near-duplicate copies) written once to --data (default: a temporary folder, removed afterwards).
Each configuration runs in a fresh Python process, so its peak RSS is its own; the parent prints a
Markdown table (images/s of the three stages together, of each stage, and peak RSS) and, with --json, the
raw numbers. The face detector is MTCNN when the mtcnn package is installed (what a user without
InsightFace models gets), else none; choose with --detector.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SIZES = [(1280, 960), (1600, 1200), (2048, 1536), (2304, 1728), (960, 1280), (1200, 1600), (1536, 2048)]


def make_photo(args: tuple[int, str]) -> int:
    """Write one synthetic photo (and, for every 20th, a resized re-encoded near duplicate)."""
    import cv2
    import numpy as np
    from PIL import Image

    index, folder = args
    rng = np.random.default_rng(index)
    width, height = SIZES[index % len(SIZES)]
    field = rng.uniform(60, 220, size=(6, 8, 3)).astype(np.float32)
    image = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(40):
        colour = tuple(float(c) for c in rng.uniform(30, 240, size=3))
        x, y = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        r = int(rng.uniform(0.02, 0.12) * width)
        if rng.uniform() < 0.5:
            cv2.circle(image, (x, y), r, colour, -1)
        else:
            cv2.rectangle(image, (x - r, y - r // 2), (x + r, y + r // 2), colour, -1)
    image = np.clip(image + rng.normal(0, 10, size=image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(Path(folder) / f"photo_{index:05d}.jpg", quality=90)
    if index % 20 == 0:
        copy = cv2.resize(image, (width * 3 // 4, height * 3 // 4), interpolation=cv2.INTER_AREA)
        Image.fromarray(copy).save(Path(folder) / f"photo_{index:05d}_copy.jpg", quality=80)
        return 2
    return 1


def generate(folder: Path, count: int) -> int:
    """Photos in `folder` (reused when already complete); returns how many files it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".complete-{count}"
    if not marker.exists():
        originals = count - count // 21  # count includes the near-duplicate copies
        with ProcessPoolExecutor() as pool:
            list(pool.map(make_photo, [(i, str(folder)) for i in range(originals)], chunksize=8))
        marker.touch()
    return len(list(folder.glob("*.jpg")))


def run_one(data: Path, out: Path, workers: int, detector: str) -> dict:
    """One configuration in this process: load (untimed), analyse, deduplicate, crop."""
    from charforge.engine.dataset import (
        CropSettings,
        analyse,
        choose_detector,
        crop_dataset,
        deduplicate,
        load_folder,
    )

    start = time.perf_counter()
    manifest = load_folder(data, out / f"bench-{workers}-{detector}", workers=workers)
    load_seconds = time.perf_counter() - start
    choice = choose_detector(detector if detector != "mtcnn" else "fallback")
    if detector == "mtcnn" and choice.name != "mtcnn":
        raise SystemExit(f"mtcnn requested but not available: {choice.note}")
    times, cpu = {}, {}
    stages = [
        ("analyse", lambda m: analyse(m, choice.detector, choice.name, workers=workers)),
        ("deduplicate", lambda m: deduplicate(m, workers=workers)),
        ("crop", lambda m: crop_dataset(m, CropSettings(bucket_set="sdxl", mode="face"), workers=workers)),
    ]
    for name, stage in stages:
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        manifest = stage(manifest)
        times[name] = time.perf_counter() - start
        cpu[name] = _cpu_seconds() - start_cpu
    count = len(manifest.entries)
    total = sum(times.values())
    megapixels = sum(e.width * e.height for e in manifest.entries)  # after crop: bucket sizes
    return {
        "workers": workers,
        "detector": choice.name,
        "images": count,
        "cropped": sum(1 for e in manifest.entries if e.bucket),
        "duplicate_groups": len(manifest.duplicate_groups),
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "total_seconds": round(total, 2),
        "load_images_per_s": round(count / load_seconds, 1),
        "cpu_ms_per_image": round(sum(cpu.values()) / count * 1000, 1),
        "stage_cpu_ms_per_image": {k: round(v / count * 1000, 1) for k, v in cpu.items()},
        "load_average_1min": round(os.getloadavg()[0], 2),
        "images_per_s": round(count / total, 1),
        "stage_images_per_s": {k: round(count / v, 1) for k, v in times.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cropped_megapixels": round(megapixels / 1e6, 1),
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def versions() -> dict:
    import cv2
    import numpy
    import PIL
    import torch

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "opencv": cv2.__version__,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000, help="photos (including near-duplicate copies)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--detector", nargs="+", default=None, help="mtcnn and/or none (default: mtcnn if installed)"
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="folder for the photos (kept; reused next time)"
    )
    parser.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    parser.add_argument("--one", nargs=3, metavar=("DATA", "WORKERS", "DETECTOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # child process: one configuration
        data, workers, detector = Path(args.one[0]), int(args.one[1]), args.one[2]
        with tempfile.TemporaryDirectory(prefix="cf-bench-out-") as out:
            print(json.dumps(run_one(data, Path(out), workers, detector)))
        return

    from charforge.engine.dataset import mtcnn

    detectors = args.detector or (["mtcnn"] if mtcnn.available() else ["none"])
    temporary = args.data is None
    data = args.data or Path(tempfile.mkdtemp(prefix="cf-bench-photos-"))
    try:
        start = time.perf_counter()
        files = generate(data, args.count)
        print(f"{files} photos in {data} ({time.perf_counter() - start:.0f} s to prepare)", file=sys.stderr)
        results = []
        for detector in detectors:
            for workers in args.workers:
                child = subprocess.run(
                    [sys.executable, __file__, "--one", str(data), str(workers), detector],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if child.returncode:
                    raise SystemExit(child.stderr)
                results.append(json.loads(child.stdout.strip().splitlines()[-1]))
                r = results[-1]
                print(
                    f"  {detector} x{workers}: {r['images_per_s']} images/s, peak RSS {r['peak_rss_mb']} MB",
                    file=sys.stderr,
                )
    finally:
        if temporary:
            shutil.rmtree(data, ignore_errors=True)

    print(f"\n{time.strftime('%Y-%m-%d')}, {json.dumps(versions())}\n")
    print(
        "| detector | workers | images | analyse+dedup+crop images/s | analyse | deduplicate | crop | "
        "load (not in the total) | CPU ms per image (analyse / dedup / crop) | peak RSS | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s, c = r["stage_images_per_s"], r["stage_cpu_ms_per_image"]
        print(
            f"| {r['detector']} | {r['workers']} | {r['images']} | **{r['images_per_s']}** | {s['analyse']} | "
            f"{s['deduplicate']} | {s['crop']} | {r['load_images_per_s']} | {r['cpu_ms_per_image']} "
            f"({c['analyse']} / {c['deduplicate']} / {c['crop']}) | {r['peak_rss_mb']:.0f} MB | "
            f"{r['load_average_1min']} |"
        )
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
