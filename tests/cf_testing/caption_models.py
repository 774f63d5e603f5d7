"""Tiny caption models in their real on-disk formats, built for the tests (no downloads).

`write_tiny_wd14` writes ``<name>.onnx`` + ``<name>.csv`` as the WD14 taggers ship them: input
``input_1`` NHWC float32 (batch dynamic), output ``predictions_sigmoid`` (batch, tags). Inside, the
model averages each BGR channel over the image, applies a linear layer and a sigmoid. With
``designed=True`` (the default) the weights make the tags readable from colours:

- ``blue_sky`` (general): mostly blue image; ``red_theme`` (general): mostly red image;
- ``white_background`` (general): bright image; ``hero_(character)`` (character): pure green image,
  probability ~0.9 (so it passes 0.85 but a lower-scoring green does not);
- ``^_^`` (general): always 0.5; ``general``/``explicit`` (rating): always 0.7/0.2.

With ``designed=False`` the weights are random (seeded), as a tagger's architecture with random weights.

`FakeEndpoint` is a loopback (127.0.0.1) OpenAI-compatible chat-completions server with scripted answers.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

TAGS = [  # tag_id, name, category, count
    (9999999, "general", 9, 800000),
    (9999998, "explicit", 9, 100000),
    (1, "blue_sky", 0, 5000),
    (2, "red_theme", 0, 4000),
    (3, "white_background", 0, 3000),
    (4, "^_^", 0, 2000),
    (5, "hero_(character)", 4, 100),
]


def _weights(designed: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(TAGS)
    if not designed:
        rng = np.random.default_rng(seed)
        return (rng.normal(0, 0.02, (3, n)).astype(np.float32), rng.normal(0, 1, (n,)).astype(np.float32))
    w = np.zeros((3, n), np.float32)  # rows: mean B, G, R (0..255)
    b = np.zeros((n,), np.float32)
    b[0], b[1] = 0.85, -1.39  # ratings: sigmoid -> 0.70, 0.20
    w[:, 2] = (0.05, -0.025, -0.025)  # blue_sky: B - (G+R)/2
    b[2] = -2.0
    w[:, 3] = (-0.025, -0.025, 0.05)  # red_theme: R - (B+G)/2
    b[3] = -2.0
    w[:, 4] = (0.02, 0.02, 0.02)  # white_background: brightness
    b[4] = -12.0
    b[5] = 0.0  # ^_^: 0.5
    w[:, 6] = (-0.01, 0.0148, -0.01)  # hero: green minus the other channels
    b[6] = -1.5  # (0, 255, 0): 0.0148 * 255 - 1.5 = 2.27 -> 0.906
    return w, b


def write_tiny_wd14(folder: str | Path, name: str = "tiny-tagger", size: int = 64, designed: bool = True,
                    seed: int = 0, fixed_batch: int | None = None) -> Path:
    """Write ``<folder>/<name>.onnx`` and ``<name>.csv``; return the .onnx path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w, b = _weights(designed, seed)
    batch = fixed_batch if fixed_batch else "batch"
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1"], ["pooled"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["logits_nobias"]),
            helper.make_node("Add", ["logits_nobias", "B"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(TAGS)])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="charforge-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx_path = folder / f"{name}.onnx"
    onnx.save(model, str(onnx_path))
    rows = ["tag_id,name,category,count"] + [f"{t},{n},{c},{k}" for t, n, c, k in TAGS]
    (folder / f"{name}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return onnx_path


class FakeEndpoint:
    """Scripted answers: each entry is (status, body dict, headers) or "caption"/"refuse"/"drop"."""

    def __init__(self):
        self.script = []
        self.requests = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    step = fake.script.pop(0) if fake.script else "caption"
                if step == "drop":
                    self.connection.close()  # connection reset with no answer
                    return
                if step == "caption":
                    url = body["messages"][-1]["content"][1]["image_url"]["url"]
                    from PIL import Image

                    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                    r, g, b = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
                    colour = "red" if r > 128 else "blue"
                    step = (200, {"choices": [{"message": {"role": "assistant",
                                                           "content": f"A {colour}\nsquare. "},
                                               "finish_reason": "stop"}]}, {})
                elif step == "refuse":
                    step = (200, {"choices": [{"message": {"role": "assistant", "content": None,
                                                           "refusal": "I can't help with that."},
                                               "finish_reason": "stop"}]}, {})
                status, payload, headers = step
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
