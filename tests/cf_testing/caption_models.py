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

`write_tiny_blip`, `write_tiny_blip2` and `write_tiny_florence2` save randomly initialised models of the
real transformers architectures (BlipForConditionalGeneration; Blip2ForConditionalGeneration with an OPT
language model; Florence2ForConditionalGeneration with its DaViT vision tower and BART) with their real
processors and small tokenizers (WordPiece for BLIP, byte-level BPE for OPT and BART), as
``save_pretrained`` writes them: config.json, generation_config.json, model.safetensors, processor and
tokenizer files. Seeded; a few hundred kilobytes each; built in well under a second.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from charforge.engine.tiny import write_wd14_onnx

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


def write_tiny_wd14(
    folder: str | Path,
    name: str = "tiny-tagger",
    size: int = 64,
    designed: bool = True,
    seed: int = 0,
    fixed_batch: int | None = None,
) -> Path:
    """Write ``<folder>/<name>.onnx`` and ``<name>.csv``; return the .onnx path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w, b = _weights(designed, seed)
    return write_wd14_onnx(
        folder,
        name,
        w,
        b,
        TAGS,
        size=size,
        batch=fixed_batch if fixed_batch else "batch",
        graph_name="tiny_wd14",
        producer="charforge-tests",
    )


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
                    fake.requests.append(
                        {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                    )
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
                    step = (
                        200,
                        {
                            "choices": [
                                {
                                    "message": {"role": "assistant", "content": f"A {colour}\nsquare. "},
                                    "finish_reason": "stop",
                                }
                            ]
                        },
                        {},
                    )
                elif step == "refuse":
                    step = (
                        200,
                        {
                            "choices": [
                                {
                                    "message": {
                                        "role": "assistant",
                                        "content": None,
                                        "refusal": "I can't help with that.",
                                    },
                                    "finish_reason": "stop",
                                }
                            ]
                        },
                        {},
                    )
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


# --------------------------------------------------------------------------------------------------
# Tiny transformers captioners (real architectures, random weights)

BLIP_WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "woman",
    "man",
    "red",
    "blue",
    "green",
    "square",
    "in",
    "with",
    "hair",
    "sky",
    "and",
    "on",
    "dog",
    "cat",
    "smiling",
    "standing",
    "portrait",
    "wearing",
    "shirt",
    "dress",
    "outdoors",
    "indoors",
    "light",
    "dark",
    "close",
    "up",
    "##s",
    "##ing",
)


def _bpe_files(folder: Path, specials: list[str], extra: list[str]) -> dict[str, int]:
    """vocab.json + merges.txt of a byte-level BPE (GPT-2 / BART style): specials, the 256 byte symbols,
    a few merges, then `extra` tokens."""
    from .models import _byte_symbols

    merges = [
        ("\u0120", "a"),
        ("p", "h"),
        ("ph", "o"),
        ("t", "o"),
        ("pho", "to"),
        ("\u0120", "pho"),
        ("\u0120pho", "to"),
    ]
    vocab: dict[str, int] = {}
    for token in [*specials, *_byte_symbols(), *(a + b for a, b in merges), *extra]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return vocab


TINY_BLIP = {
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    },
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
    },
    "vocab_size": None,  # None: just the test words
    "projection_dim": 16,
}
# Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px, BERT-base text decoder, 30524 tokens.
BLIP_LARGE = {
    "vision": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 16,
    },
    "text": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 512,
    },
    "vocab_size": 30524,
    "projection_dim": 512,
}


def write_tiny_blip(
    folder: str | Path, seed: int = 0, image_size: int | None = None, spec: dict = TINY_BLIP
) -> Path:
    """A `BlipForConditionalGeneration` + `BlipProcessor` (BERT WordPiece tokenizer) in `folder`: tiny by
    default, `BLIP_LARGE` for the real BLIP-large sizes (benchmarks); random weights either way."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BLIP_WORDS]
    if spec["vocab_size"]:
        words += [f"word{i}" for i in range(spec["vocab_size"] - len(words) - 1)]
    words.append("[DEC]")
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    vision = {**spec["vision"], **({"image_size": image_size} if image_size else {})}
    config = BlipConfig(
        text_config={
            **spec["text"],
            "vocab_size": len(words),
            "encoder_hidden_size": vision["hidden_size"],
            "bos_token_id": words.index("[DEC]"),
            "sep_token_id": words.index("[SEP]"),
            "pad_token_id": 0,
        },
        vision_config=vision,
        projection_dim=spec["projection_dim"],
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).eval().save_pretrained(str(folder))
    size = vision["image_size"]
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": size, "width": size}), tokenizer=tokenizer
    )
    processor.save_pretrained(str(folder))
    return folder


def write_tiny_blip2(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny `Blip2ForConditionalGeneration` (OPT language model) + `Blip2Processor` (GPT-2 BPE) in `folder`."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2Tokenizer,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _bpe_files(folder, ["<pad>", "</s>", "<unk>"], ["<image>"])
    tokenizer = GPT2Tokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    queries = 4
    size = len(vocab)
    config = Blip2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
        qformer_config={
            "vocab_size": size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": size,
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "word_embed_proj_dim": 32,
            "bos_token_id": vocab["</s>"],
            "eos_token_id": vocab["</s>"],
            "pad_token_id": vocab["<pad>"],
        },
        num_query_tokens=queries,
        image_token_index=vocab["<image>"],
    )
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(config).eval().save_pretrained(str(folder))
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        num_query_tokens=queries,
    )
    processor.save_pretrained(str(folder))
    return folder


TINY_FLORENCE2 = {
    "vision": {
        "depths": [1, 1, 1, 1],
        "embed_dim": [16, 16, 32, 32],
        "num_heads": [2, 2, 4, 4],
        "num_groups": [2, 2, 4, 4],
        "window_size": 2,
        "projection_dim": 32,
        "max_position_embeddings": 8,
        "max_temporal_embeddings": 4,
    },
    "text": {
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_position_embeddings": 128,
    },
    "vocab_size": None,
    "image_size": 64,
}
# Florence-2-large: DaViT (1, 1, 9, 1) x (256, 512, 1024, 2048) at 768 px, BART-large, 51289 tokens.
FLORENCE2_LARGE = {
    "vision": {
        "depths": [1, 1, 9, 1],
        "embed_dim": [256, 512, 1024, 2048],
        "num_heads": [8, 16, 32, 64],
        "num_groups": [8, 16, 32, 64],
        "window_size": 12,
        "projection_dim": 1024,
        "max_position_embeddings": 50,
        "max_temporal_embeddings": 100,
    },
    "text": {
        "d_model": 1024,
        "encoder_layers": 12,
        "decoder_layers": 12,
        "encoder_attention_heads": 16,
        "decoder_attention_heads": 16,
        "encoder_ffn_dim": 4096,
        "decoder_ffn_dim": 4096,
        "max_position_embeddings": 1024,
    },
    "vocab_size": 51289,
    "image_size": 768,
}


def write_tiny_florence2(
    folder: str | Path, seed: int = 0, image_size: int | None = None, spec: dict = TINY_FLORENCE2
) -> Path:
    """A `Florence2ForConditionalGeneration` (DaViT + BART) + `Florence2Processor` in `folder`: tiny by
    default, `FLORENCE2_LARGE` for the real Florence-2-large sizes (benchmarks); random weights.

    The vision tower downsamples 32x, so the model sees ``(image_size / 32)**2`` patches plus one pooled
    token; the processor's ``image_seq_length`` says the same, as in the published checkpoints (577 for 768).
    """
    import torch
    from transformers import (
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_size = image_size or spec["image_size"]
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    extra = ["<mask>"]
    if spec["vocab_size"]:
        base = len(specials) + 256 + 7 + 2  # specials, bytes, merges, <mask>, <image>
        extra += [f"<filler_{i}>" for i in range(spec["vocab_size"] - base)]
    vocab = _bpe_files(folder, specials, [*extra, "<image>"])
    tokenizer = BartTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        extra_special_tokens={"image_token": "<image>"},
    )
    config = Florence2Config(
        vision_config={**spec["vision"], "drop_path_rate": 0.0},
        text_config={
            "model_type": "bart",
            **spec["text"],
            "vocab_size": len(vocab),
            "bos_token_id": vocab["<s>"],
            "pad_token_id": vocab["<pad>"],
            "eos_token_id": vocab["</s>"],
            "decoder_start_token_id": vocab["</s>"],
            "forced_bos_token_id": vocab["<s>"],
        },
        image_token_id=vocab["<image>"],
    )
    torch.manual_seed(seed)
    Florence2ForConditionalGeneration(config).eval().save_pretrained(str(folder))
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_seq_length=1 + (image_size // 32) ** 2,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor = Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config={"pure_text": {}}
    )
    processor.save_pretrained(str(folder))
    return folder


#: the caption-rule widgets of the caption nodes as the node tests set them: trigger ohwx, class woman, CLIP's
#: 75 tokens, estimated counts
RULE_WIDGETS = {
    "trigger": "ohwx",
    "class_tokens": "woman",
    "template": "{trigger} {class}, {caption}",
    "keep_tokens": "",
    "banned_words": "",
    "style_tags": "",
    "max_tokens": 75,
    "tokenizer": "",
}
