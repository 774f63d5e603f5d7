"""Tiny random models of the real architectures, so the pipeline runs anywhere in minutes (``charforge pipeline``).

Not for pictures: every weight is random, so generated images are noise and captions are arbitrary tags. They
exist to show the whole chain working where no real base model is installed. :func:`write_tiny_models`
fills a ComfyUI-style ``models`` folder:

- ``checkpoints/charforge_tiny_sd15.safetensors``: an SD1.5 single file ComfyUI's own ``CheckpointLoaderSimple``
  detects as SD1.5 (U-Net 320 channels wide, four levels of one block each, the full-size VAE and CLIP-L that
  ComfyUI builds at fixed sizes; fp16, about 0.5 GB);
- ``diffusers/charforge_tiny_sd15``: the same weights as a diffusers folder, for the trainer and the video model
  (the single file's shape is not a standard SD1.5, which diffusers' single-file loader expects);
- ``animatediff_models/charforge_tiny_mm.safetensors``: an AnimateDiff v3-style motion module (original layout)
  sized for that U-Net;
- ``wd14_tagger/charforge-tiny-tagger.onnx`` + ``.csv``: a WD14-style tagger (pooled colour -> 8 tags);
- ``clip_vision/charforge_tiny_clip``: a full CLIP folder (vision + text, tiny widths) for CLIP scores.

The test suite's factories (tests/cf_testing) build the same architectures; tests/recipes/test_pipeline.py
checks that these files load where the product loads models. Run ``python -m charforge.engine.tiny MODELS_DIR``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

TINY_PREFIX = "charforge_tiny"
CHECKPOINT = f"{TINY_PREFIX}_sd15.safetensors"
DIFFUSERS = f"{TINY_PREFIX}_sd15"
MOTION_MODULE = f"{TINY_PREFIX}_mm.safetensors"
TAGGER = "charforge-tiny-tagger"
CLIP_FOLDER = f"{TINY_PREFIX}_clip"
MARKER = "CHARFORGE_TINY_MODELS.txt"

# ComfyUI detects SD1.5 by model_channels 320 and context_dim 768; the widths of deeper levels and the depth are
# free. Four levels (as SD1.5), because AnimateDiff motion modules have one per level; one block each.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 320, 320, 320],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "use_linear_projection": False,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
TINY_CLIP: dict[str, Any] = {
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": 8,
        "image_size": 32,
    },
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "projection_dim": 16,
}
TAGS = [  # tag_id, name, category (0 general, 4 character, 9 rating), count
    (0, "general", 9, 1000),
    (1, "sensitive", 9, 100),
    (2, "portrait", 0, 900),
    (3, "solo", 0, 800),
    (4, "smile", 0, 700),
    (5, "short_hair", 0, 600),
    (6, "outdoors", 0, 500),
    (7, "looking_at_viewer", 0, 400),
]
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
MERGES = (
    ("t", "h"),
    ("th", "e</w>"),
    ("i", "n"),
    ("a", "n"),
    ("o", "f</w>"),
    ("p", "h"),
    ("ph", "o"),
    ("t", "o</w>"),
    ("pho", "to</w>"),
)

Say = Callable[[str], None]


def seeded(seed: int, build):
    """`build()` with torch's random generator seeded by `seed`, the caller's generator state left as it was
    (each component gets its own seed, so one component's weights never depend on another's build)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# -- tokenizers ------------------------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def tiny_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary: byte symbols, the same with end-of-word marks, a few merges, BOS/EOS last."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in MERGES] + [START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def write_tokenizer(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(tiny_vocab(), ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8"
    )
    special = {
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": END_TOKEN,
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **special,
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "do_lower_case": True,
                "add_prefix_space": False,
                "errors": "replace",
            }
        )
    )
    return directory


# -- models ----------------------------------------------------------------------------------------------------


def write_sd15(models_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """The SD1.5 single file (for ComfyUI's loaders) and the same weights as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models.single_file import pipeline_to_single_file_state_dict

    unet = seeded(seed, lambda: UNet2DConditionModel(**SD15_UNET).eval())
    vae = seeded(seed + 1, lambda: AutoencoderKL(**SD15_VAE, scaling_factor=0.18215).eval())
    text_encoder = seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval())
    for module in (unet, vae, text_encoder):
        module.to(torch.float16)
    single = models_dir / "checkpoints" / CHECKPOINT
    single.parent.mkdir(parents=True, exist_ok=True)
    state = pipeline_to_single_file_state_dict(
        unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), unet_config=dict(unet.config)
    )
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(single),
        metadata={"charforge.tiny_model": "sd15", "charforge.note": "random weights"},
    )
    folder = models_dir / "diffusers" / DIFFUSERS
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    text_encoder.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    PNDMScheduler(**SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1).save_pretrained(
        str(folder / "scheduler")
    )
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    # No tokenizer folder: CharForge's loaders take the CLIP vocabulary from ComfyUI (comfy/sd1_tokenizer) and
    # configure it as SD1.5's shipped config says (a copy of ComfyUI's folder would bring its 8192-token limit).
    index["tokenizer"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return single, folder


def write_motion_module(models_dir: Path, seed: int = 0) -> Path:
    """An AnimateDiff motion module (v3 layout: no mid block, 32 positions) for :data:`SD15_UNET`."""
    from diffusers import MotionAdapter

    from .video.motion import save_motion_module

    def build():
        adapter = MotionAdapter(
            block_out_channels=tuple(SD15_UNET["block_out_channels"]),
            motion_layers_per_block=SD15_UNET["layers_per_block"],
            motion_num_attention_heads=8,
            motion_norm_num_groups=32,
            use_motion_mid_block=False,
            motion_max_seq_length=32,
        ).eval()
        import torch

        with torch.no_grad():  # fresh output projections are zero (a no-op module); make them do something
            for name, param in adapter.named_parameters():
                if name.endswith("proj_out.weight"):
                    param.normal_(0.0, 0.02)
        return adapter

    adapter = seeded(seed, build)
    return save_motion_module(
        adapter.state_dict(),
        models_dir / "animatediff_models" / MOTION_MODULE,
        "original",
        metadata={"charforge.tiny_model": "motion_module"},
    )


def write_tagger(models_dir: Path, size: int = 64, seed: int = 0) -> Path:
    """A WD14-style ONNX tagger (NHWC BGR 0-255 input, sigmoid per tag) with a matching tag CSV."""
    import numpy as np

    folder = models_dir / "wd14_tagger"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = (rng.normal(0, 0.0005, (3, len(TAGS)))).astype(np.float32)  # pixels are 0-255: a gentle colour tilt
    b = rng.normal(0, 1.0, (len(TAGS),)).astype(np.float32)
    b[2:] = np.abs(b[2:]) + 0.5  # general tags above the usual 0.35 threshold, whatever the picture
    return write_wd14_onnx(folder, TAGGER, w, b, TAGS, size=size, graph_name="charforge_tiny_tagger")


def write_wd14_onnx(
    folder: Path,
    name: str,
    w: Any,
    b: Any,
    tags: Sequence[tuple[int, str, int, int]],
    *,
    size: int,
    batch: int | str = "batch",
    graph_name: str,
    producer: str = "charforge-tiny",
) -> Path:
    """``<folder>/<name>.onnx`` (WD14's interface: NHWC BGR 0-255 ``input_1``, ``predictions_sigmoid`` per tag;
    inside, the mean pixel times `w` (3 x tags) plus `b`) and ``<name>.csv`` listing `tags`
    (tag_id, name, category, count); returns the .onnx path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1"], ["pooled"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["logits_nobias"]),
            helper.make_node("Add", ["logits_nobias", "B"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        graph_name,
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(tags)])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name=producer)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    rows = ["tag_id,name,category,count"] + [f"{t},{n},{c},{k}" for t, n, c, k in tags]
    (folder / f"{name}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_clip(models_dir: Path, seed: int = 0) -> Path:
    """A full CLIP folder (``CLIPModel`` + tokenizer + preprocessor config) as a hub download looks."""
    from transformers import CLIPConfig, CLIPModel

    vocab = tiny_vocab()
    text = {
        **TINY_CLIP["text"],
        "vocab_size": len(vocab),
        "max_position_embeddings": 77,
        "bos_token_id": vocab[START_TOKEN],
        "eos_token_id": vocab[END_TOKEN],
        "pad_token_id": vocab[END_TOKEN],
    }
    config = CLIPConfig(
        text_config=text, vision_config=dict(TINY_CLIP["vision"]), projection_dim=TINY_CLIP["projection_dim"]
    )
    folder = models_dir / "clip_vision" / CLIP_FOLDER
    model = seeded(seed, lambda: CLIPModel(config).eval())
    model.save_pretrained(str(folder))
    write_tokenizer(folder)
    size = TINY_CLIP["vision"]["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps(clip_preprocessor_config(size)))
    return folder


def clip_preprocessor_config(size: int) -> dict[str, Any]:
    """The ``preprocessor_config.json`` of a CLIP folder whose images are `size` pixels square (CLIP's own
    resize, centre crop and normalisation)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }


PARTS = ("sd15", "motion", "tagger", "clip")


def written_parts(models_dir: str | Path) -> set[str]:
    """The parts :func:`write_tiny_models` finished in `models_dir` earlier."""
    marker = Path(models_dir) / MARKER
    return set(marker.read_text().split()) if marker.is_file() else set()


def write_tiny_models(
    models_dir: str | Path, *, parts: Iterable[str] = PARTS, say: Say | None = None
) -> Path:
    """Write the tiny models into `models_dir` (a ComfyUI-style models folder). Parts already written are kept."""
    say = say or (lambda text: None)
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    marker = models_dir / MARKER
    done = written_parts(models_dir)
    writers = {
        "sd15": lambda: write_sd15(models_dir),
        "motion": lambda: write_motion_module(models_dir),
        "tagger": lambda: write_tagger(models_dir),
        "clip": lambda: write_clip(models_dir),
    }
    for part in parts:
        if part in done:
            continue
        start = time.perf_counter()
        writers[part]()
        done.add(part)
        marker.write_text("\n".join(sorted(done)) + "\n")
        say(f"  tiny {part} model written ({time.perf_counter() - start:.1f} s)")
    return models_dir


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m charforge.engine.tiny MODELS_DIR", file=sys.stderr)
        return 2
    write_tiny_models(args[0], say=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
