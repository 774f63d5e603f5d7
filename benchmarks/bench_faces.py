"""Face throughput on CPU: ArcFace IResNet-50 embeddings (batched) and detection + embedding per image.

The recogniser is the real ArcFace R50 architecture (IResNet-50, the network of buffalo_l's w600k_r50:
43.6 M parameters, 112 x 112 input, 512-d output) with random weights, written as ONNX by
tests/cf_testing/face_models.py; speed does not depend on the weight values. The detector is, by default
(``--detector scrfd10g``), the SCRFD-10GF architecture of buffalo_l's det_10g rebuilt with random weights
(benchmarks/scrfd_10g.py: 3.87 M parameters, 10.0 GMAC at 640 x 480, published 3.86 M / 9.98 G) whose
outputs come from the planted stand-in so each image holds exactly one face; ``--detector planted`` uses
the near-free stand-in alone, which measures only the pipeline around the detector (resize, decode,
alignment, embedding).

    python benchmarks/bench_faces.py --threads 2 [--batch 32] [--images 64] [--detector scrfd10g|planted]

Runs in insightface's own code path (FaceAnalyzer.load -> insightface.app.FaceAnalysis). Prints a JSON
line with the results; record them in docs/benchmarks.md with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _median_rate(run, items: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return items / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, default=2, help="onnxruntime intra-op threads (CPU cores used)"
    )
    parser.add_argument("--batch", type=int, default=32, help="aligned crops per embedding batch")
    parser.add_argument("--images", type=int, default=32, help="images for the detect + embed measurement")
    parser.add_argument("--det-size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--detector", choices=["scrfd10g", "planted"], default="scrfd10g")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import onnxruntime

    from cf_testing.face_models import (
        DETECTOR_FILE,
        IRESNET50,
        build_iresnet_onnx,
        build_planted_face_detector,
        face_image,
    )

    with tempfile.TemporaryDirectory() as tmp:
        pack = Path(tmp) / "models" / "insightface" / "models" / "r50bench"
        start = time.perf_counter()
        _, params = build_iresnet_onnx(pack / "w600k_r50.onnx", IRESNET50)
        detector_info: dict = {"detector": args.detector}
        if args.detector == "planted":
            build_planted_face_detector(pack / DETECTOR_FILE)
        else:
            sys.path.insert(0, str(REPO / "benchmarks"))
            from scrfd_10g import write_scrfd_10g

            planted = build_planted_face_detector(Path(tmp) / "planted.onnx")
            detector_info.update(write_scrfd_10g(pack / "det_10g.onnx", planted))
        build_s = time.perf_counter() - start

        # Sessions with a fixed thread count: pass SessionOptions through insightface's kwargs.
        import insightface.model_zoo.model_zoo as zoo

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        original = zoo.PickableInferenceSession.__init__

        def with_threads(self, model_path, **kwargs):
            kwargs.setdefault("sess_options", options)
            original(self, model_path, **kwargs)

        zoo.PickableInferenceSession.__init__ = with_threads
        os.environ["CHARFORGE_MODELS_DIR"] = str(Path(tmp) / "models")
        from charforge.engine.faces import FaceAnalyzer

        analyzer = FaceAnalyzer.load("r50bench", det_size=args.det_size, providers=["CPUExecutionProvider"])

        crops = [
            np.ascontiguousarray(np.random.default_rng(i).integers(0, 256, (112, 112, 3), dtype=np.uint8))
            for i in range(args.batch)
        ]
        analyzer.embed_aligned(crops[:2])  # warm-up (first ONNX Runtime run allocates)
        embed_batched = _median_rate(lambda: analyzer.embed_aligned(crops), len(crops), args.repeats)
        embed_single = _median_rate(lambda: [analyzer.embed_aligned([c]) for c in crops[:8]], 8, args.repeats)

        images = [face_image((640, 640), ((304, 304, 128),), person=i) for i in range(args.images)]
        assert len(analyzer.detect(images[0])) == 1
        detect_embed = _median_rate(lambda: [analyzer.detect(im) for im in images], len(images), args.repeats)
        detector = FaceAnalyzer.load(
            "r50bench", det_size=args.det_size, providers=["CPUExecutionProvider"], with_embeddings=False
        )
        detector.detect(images[0])
        detect_only = _median_rate(lambda: [detector.detect(im) for im in images], len(images), args.repeats)

        import insightface

        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "insightface": insightface.__version__,
            "numpy": np.__version__,
            "iresnet50_params": params,
            "model_build_s": round(build_s, 1),
            "embed_batched_images_per_s": round(embed_batched, 1),
            "embed_batch_size": args.batch,
            "embed_single_images_per_s": round(embed_single, 1),
            "detect_embed_images_per_s": round(detect_embed, 1),
            "detect_only_images_per_s": round(detect_only, 1),
            "det_size": args.det_size,
            **detector_info,
            "image_size": "640x640, one face",
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
