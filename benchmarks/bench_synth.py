"""Dataset synthesis speed and memory: faces swapped + restored per second, tiled upscaling memory on a 4K input.

Swap + restore, per face (detection is measured by bench_faces.py and left out here): one 1024 x 1024 photo
with a 300 px face (landmarks on ArcFace's template), swapped through `FaceSwapper.swap_face` (insightface's
INSwapper path: alignment, the network, CharForge's feathered paste-back) and restored through `restore_faces`
(alignment to the 512 px template, the network, paste-back). The restorers are spandrel's own GFPGAN v1 clean,
CodeFormer (9 transformer layers, the released size) and RestoreFormer classes at their published sizes, with
random weights: speed does not depend on the weight values. The swapper is the inswapper_128-signature stand-in
from tests/cf_testing/synth_models.py (one 3x3 convolution): the real inswapper_128 network is not public as
code, so its own cost is not in these numbers; what is measured is everything CharForge does around it.

Tiled upscaling memory: a 3840 x 2160 RGB input through `upscale_tiled` with a x4 ESRGAN (RRDB) in a fresh
process; the peak resident memory above the loaded baseline (sampled every 10 ms from /proc/self/statm) is compared with the output's own size
(15360 x 8640 x 3 bytes) and with what one untiled float32 pass would need for its input and output tensors.
The default upscaler is narrow (``--filters 8 --blocks 1``) so 2 CPU cores finish the 4K image in minutes;
the memory bound is about the tile, not the width (``--filters 64 --blocks 23`` is Real-ESRGAN x4plus's size).

    python benchmarks/bench_synth.py --threads 2 [--repeats 3] [--skip-upscale] [--skip-restore]

Prints one JSON line; record it in docs/benchmarks.md with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-call allocations and thread pools
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _face(np):
    from charforge.engine.faces import Face
    from charforge.engine.synth.paste import ARCFACE_112

    size = 300.0  # face box side in pixels
    origin = np.array([362.0, 300.0], np.float32)
    landmarks = origin + np.asarray(ARCFACE_112, np.float32) * (size / 112.0)
    return Face((origin[0], origin[1], origin[0] + size, origin[1] + size), 0.99, landmarks, None)


def bench_swap_restore(args, folder: Path) -> dict:
    import numpy as np
    import torch

    from cf_testing.synth_models import build_restorer, build_swapper_onnx
    from charforge.engine.synth import FaceSwapper, RestoreSettings, load_image_model, restore_faces

    torch.set_num_threads(args.threads)
    rgb = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    face = _face(np)
    embedding = np.random.default_rng(1).normal(size=512).astype(np.float32)
    embedding /= np.linalg.norm(embedding)
    swapper = FaceSwapper.load(
        str(build_swapper_onnx(folder / "inswapper_128.onnx")), providers=["CPUExecutionProvider"]
    )
    swap_s = _median_seconds(lambda: swapper.swap_face(rgb, face, embedding), args.repeats)
    results = {"swap_s_per_face": round(swap_s, 4)}
    kinds = ["GFPGAN", "RestoreFormer"]
    try:
        import spandrel_extra_arches  # noqa: F401

        kinds.append("CodeFormer")
    except ImportError:
        pass
    settings = RestoreSettings(blend=1.0, fidelity=0.5)
    for kind in kinds:
        path = build_restorer(folder / f"{kind}.pth", kind, full_size=True)
        model = load_image_model(str(path), device="cpu")
        params = sum(p.numel() for p in model.descriptor.model.parameters())
        restore_s = _median_seconds(lambda m=model: restore_faces(m, rgb, [face], settings), args.repeats)
        results[kind] = {
            "parameters": params,
            "restore_s_per_face": round(restore_s, 3),
            "swap_plus_restore_faces_per_s": round(1.0 / (swap_s + restore_s), 3),
        }
        del model
    return results


UPSCALE_CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from charforge.engine.synth import load_image_model, upscale_tiled
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():  # resident bytes now (ru_maxrss is useless here: Linux carries the parent's peak across exec)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
model = load_image_model(sys.argv[2], device="cpu")
rgb = np.random.default_rng(0).integers(0, 256, (2160, 3840, 3), dtype=np.uint8)
baseline = rss()
peak = [baseline]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.01)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
start = time.perf_counter()
out = upscale_tiled(model, rgb, tile=int(sys.argv[4]), pad=int(sys.argv[5]))
seconds = time.perf_counter() - start
done.set(); sampler.join()
peak[0] = max(peak[0], rss())
print(json.dumps({"shape": list(out.shape), "seconds": round(seconds, 1), "baseline_rss": baseline,
                  "peak_rss": peak[0], "peak_above_baseline": peak[0] - baseline, "output_bytes": int(out.nbytes)}))
"""


def bench_upscale(args, folder: Path) -> dict:
    from cf_testing.synth_models import build_upscaler

    path = build_upscaler(
        folder / "esrgan.safetensors", scale=4, num_filters=args.filters, num_blocks=args.blocks
    )
    runs = {}
    for tile in args.tiles:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                UPSCALE_CHILD,
                str(REPO / "tests"),
                str(path),
                str(args.threads),
                str(tile),
                str(args.pad),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        runs[str(tile)] = json.loads(result.stdout.strip().splitlines()[-1])
    out_pixels = 3840 * 4 * 2160 * 4
    return {
        "model": f"ESRGAN x4, {args.filters} filters, {args.blocks} RRDB block(s)",
        "pad": args.pad,
        "runs_by_tile": runs,
        "untiled_float32_input_and_output_bytes": 3840 * 2160 * 3 * 4 + out_pixels * 3 * 4,
        "untiled_first_conv_activation_bytes": 3840 * 2160 * args.filters * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and onnxruntime")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiles", type=int, nargs="+", default=[512, 256], help="tile sides to measure")
    parser.add_argument("--pad", type=int, default=32)
    parser.add_argument("--filters", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--skip-upscale", action="store_true")
    parser.add_argument("--skip-restore", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import insightface
    import onnxruntime
    import spandrel
    import torch

    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_average": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "insightface": insightface.__version__,
            "spandrel": spandrel.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.skip_restore:
            report["swap_restore"] = bench_swap_restore(args, folder)
        if not args.skip_upscale:
            report["upscale_4k"] = bench_upscale(args, folder)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
