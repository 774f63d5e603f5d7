"""Sentence captioners from Hugging Face transformers: BLIP, BLIP-2 and Florence-2.

Each model is a Hugging Face folder as ``save_pretrained`` / a hub download writes it: ``config.json``,
the weights (``model.safetensors``, possibly sharded, or ``pytorch_model.bin``), the processor
(``preprocessor_config.json`` or ``processor_config.json``) and the tokenizer files (``tokenizer.json``
or ``vocab.txt`` / ``vocab.json`` + ``merges.txt``, with ``tokenizer_config.json``).

Where the folders live (a name is a sub-folder of one of these; an absolute path works too):

- ``blip`` and ``blip2``: the ``blip`` model folder (``models/blip/<name>/``), then ``LLM``;
- ``florence2``: the ``LLM`` model folder (``models/LLM/<name>/``, where the Florence-2 packs keep theirs).

Florence-2 needs the checkpoints in transformers' own format (the ``florence-community/Florence-2-*``
repositories); the original ``microsoft/Florence-2-*`` repositories ship their own modelling code, which
is only run when ``trust_remote_code`` is set explicitly.

Missing models can be downloaded from the hub into the first model folder when the caller allows it
(``allow_download``, or the environment variable ``CHARFORGE_ALLOW_DOWNLOAD=1``); otherwise the error
names the folders searched, the files expected and the repository to download.

Generation is deterministic (greedy or beam search, never sampling), batched, in bf16 (fp16 where bf16
is unsupported) on a GPU and fp32 on the CPU.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Captioner, CaptionerError

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("charforge")

DOWNLOAD_ENV = "CHARFORGE_ALLOW_DOWNLOAD"
PREPROCESS_CHUNK = 8  # images per preprocessing thread
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
EXPECTED_FILES = (
    "config.json, model.safetensors (or pytorch_model.bin), preprocessor_config.json or "
    "processor_config.json, and the tokenizer files (tokenizer.json or vocab.txt / vocab.json + "
    "merges.txt, tokenizer_config.json)"
)


@dataclass(frozen=True)
class ModelKind:
    """One transformers captioner family: where it lives, how to recognise and load it."""

    backend: str
    model_types: tuple[str, ...]  # config.json "model_type" values that belong to this family
    folders: tuple[str, ...]  # model folder kinds searched, in order
    model_class: str
    processor_class: str
    default_repo: str
    #: model_type -> why that family is not this one and what to use instead (added to the refusal)
    hints: tuple[tuple[str, str], ...] = ()


KINDS: dict[str, ModelKind] = {
    "blip": ModelKind(
        "blip",
        ("blip",),
        ("blip", "LLM"),
        "BlipForConditionalGeneration",
        "BlipProcessor",
        "Salesforce/blip-image-captioning-large",
    ),
    "blip2": ModelKind(
        "blip2",
        ("blip-2",),
        ("blip", "LLM"),
        "Blip2ForConditionalGeneration",
        "Blip2Processor",
        "Salesforce/blip2-opt-2.7b",
    ),
    "florence2": ModelKind(
        "florence2",
        ("florence2",),
        ("LLM",),
        "Florence2ForConditionalGeneration",
        "AutoProcessor",
        "florence-community/Florence-2-large",
    ),
}


@dataclass
class HFSettings:
    """How a transformers captioner loads and generates."""

    device: str = ""  # "" picks cuda, then mps, then cpu
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 or fp16 on a GPU, fp32 on the CPU)
    max_new_tokens: int = 40
    min_new_tokens: int = 0  # > 0 forces at least this many tokens (benchmarks use a fixed length)
    num_beams: int = 1  # 1: greedy decoding
    repetition_penalty: float = 1.0
    batch_size: int = 8
    prompt: str = ""  # blip: caption prefix (e.g. "a photo of"); blip2: a question ("Question: ... Answer:")
    task: str = "<CAPTION>"  # florence2: <CAPTION>, <DETAILED_CAPTION> or <MORE_DETAILED_CAPTION>
    allow_download: bool = False
    trust_remote_code: bool = False


# --------------------------------------------------------------------------------------------------
# Finding and downloading models


def _model_type(folder: Path) -> str | None:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def _folders(kind: ModelKind) -> list[str]:
    from .... import bridge

    seen, out = set(), []
    for key in kind.folders:
        for folder in bridge.model_folders(key):
            if folder not in seen:
                seen.add(folder)
                out.append(folder)
    return out


def list_models(backend: str | ModelKind) -> list[str]:
    """Names (relative folder paths) of the `backend` models found in its model folders."""
    kind = backend if isinstance(backend, ModelKind) else KINDS[backend]
    names = set()
    for folder in _folders(kind):
        base = Path(folder)
        if not base.is_dir():
            continue
        for config in base.glob("**/config.json"):
            if len(config.relative_to(base).parts) <= 3 and _model_type(config.parent) in kind.model_types:
                names.add(config.parent.relative_to(base).as_posix())
    return sorted(names)


def download_allowed(flag: bool) -> bool:
    return bool(flag) or os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _snapshot_download(repo_id: str, local_dir: str) -> str:
    """Download `repo_id` into `local_dir` (the weights as safetensors, plus configs and tokenizer files)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id=repo_id,
        local_dir=local_dir,
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py"],
    )


#: Replaced in tests by a fake (no network in the test suite).
downloader: Callable[[str, str], str] = _snapshot_download


def _default_name(kind: ModelKind) -> str:
    return kind.default_repo.split("/")[-1]


def resolve_model(backend: str | ModelKind, name: str, allow_download: bool = False) -> Path:
    """The folder of `backend` model `name`: a folder name in its model folders, an absolute path, or (with
    `allow_download`) a hub repository ``owner/name`` downloaded into ``<first model folder>/<name>``."""
    kind = backend if isinstance(backend, ModelKind) else KINDS[backend]
    backend = kind.backend
    name = (name or "").strip().strip('"')
    folders = _folders(kind)
    if not name:
        found = list_models(kind)
        name = found[0] if found else kind.default_repo
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path(f) / name for f in folders]
    repo = (
        name
        if (not path.is_absolute() and name.count("/") == 1 and not any(c.is_dir() for c in candidates))
        else None
    )
    if repo:  # "owner/model": look for "<folder>/model" as a download would have named it
        candidates += [Path(f) / name.split("/")[-1] for f in folders]
    for candidate in candidates:
        if candidate.is_file() and candidate.name == "config.json":
            candidate = candidate.parent
        if (candidate / "config.json").is_file():
            model_type = _model_type(candidate)
            if model_type not in kind.model_types:
                hint = dict(kind.hints).get(str(model_type), "")
                raise CaptionerError(
                    f"{candidate} holds a {model_type!r} model, not a {backend} captioner "
                    f"(config.json model_type should be {' or '.join(kind.model_types)})"
                    + (f": {hint}" if hint else "")
                )
            return candidate
    repo = repo or (kind.default_repo if name == _default_name(kind) else None)
    if repo and download_allowed(allow_download) and not path.is_absolute():
        if not folders:
            raise CaptionerError(
                f"cannot download {repo}: no {kind.folders[0]} model folder is configured "
                "(set CHARFORGE_MODELS_DIR or COMFYUI_DIR)"
            )
        if os.environ.get("HF_HUB_OFFLINE", "").strip() in ("1", "true", "True"):
            raise CaptionerError(f"cannot download {repo}: HF_HUB_OFFLINE is set")
        target = Path(folders[0]) / repo.split("/")[-1]
        log.info("CharForge: downloading %s into %s", repo, target)
        try:
            downloader(repo, str(target))
        except Exception as exc:  # noqa: BLE001 - network and hub errors vary; say what failed
            raise CaptionerError(f"downloading {repo} into {target} failed: {exc}") from exc
        if not (target / "config.json").is_file():
            raise CaptionerError(f"downloaded {repo} into {target}, but it has no config.json")
        return target
    where = ", ".join(str(c) for c in candidates) or f"(no {'/'.join(kind.folders)} model folder configured)"
    found = list_models(kind)
    hint = f" {backend} models found: {', '.join(found)}." if found else ""
    download = repo or kind.default_repo
    raise CaptionerError(
        f"{backend} model {name!r} not found; looked in: {where}. Put a Hugging Face folder ({EXPECTED_FILES}) "
        f"into models/{kind.folders[0]}/<name>/, e.g. a download of {download} "
        f"(`huggingface-cli download {download} --local-dir models/{kind.folders[0]}/{download.split('/')[-1]}`), "
        f"or allow the download (allow_download, or {DOWNLOAD_ENV}=1) and name the repository {download!r}.{hint}"
    )


# --------------------------------------------------------------------------------------------------
# Device and precision


def pick_device(device: str = "") -> str:
    import torch

    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, dtype: str = "auto"):
    import torch

    dtype = (dtype or "auto").lower()
    if dtype in ("fp32", "float32") or (dtype == "auto" and device == "cpu"):
        return torch.float32
    if dtype in ("fp16", "float16"):
        return torch.float16
    if dtype in ("bf16", "bfloat16"):
        return torch.bfloat16
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# --------------------------------------------------------------------------------------------------
# The captioner


def on_device(batch: Any, device: Any, dtype: Any) -> dict[str, Any]:
    """A processor's output as a dict with its tensors on `device`, the floating-point ones (pixels) in `dtype`;
    ids, masks and other values as they are."""
    out = {}
    for key, value in batch.items():
        if hasattr(value, "to"):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


class TransformersCaptioner(Captioner):
    """BLIP, BLIP-2 or Florence-2 from a Hugging Face folder; the model stays loaded until `close()`."""

    def __init__(self, backend: str, model: str = "", settings: HFSettings | None = None):
        if backend not in KINDS:
            raise CaptionerError(f"unknown transformers captioner {backend!r}: one of {', '.join(KINDS)}")
        from ....deps import require

        torch = require("torch")
        transformers = require("transformers")
        self.kind = KINDS[backend]
        self.name = backend
        self.settings = s = settings or HFSettings()
        if backend == "florence2" and s.task not in FLORENCE_TASKS:
            raise CaptionerError(
                f"Florence-2 task {s.task!r} is not a caption task: one of {', '.join(FLORENCE_TASKS)}"
            )
        self.folder = resolve_model(backend, model, s.allow_download)
        self.device = pick_device(s.device)
        self.dtype = pick_dtype(self.device, s.dtype)
        self.batch_size = max(1, int(s.batch_size))
        model_class = getattr(transformers, self.kind.model_class, None)
        if model_class is None:
            raise CaptionerError(
                f"transformers {transformers.__version__} has no {self.kind.model_class}; "
                "upgrade transformers"
            )
        remote = {"trust_remote_code": True} if s.trust_remote_code else {}
        try:
            self.processor = getattr(transformers, self.kind.processor_class).from_pretrained(
                str(self.folder), **remote
            )
            dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            self.model = model_class.from_pretrained(str(self.folder), **{dtype_key: self.dtype}, **remote)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types; name the folder and the fix
            hint = ""
            if backend == "florence2" and _has_remote_code(self.folder) and not s.trust_remote_code:
                hint = (
                    " This looks like the original microsoft/Florence-2 format (its own modelling code): use the "
                    "transformers-format florence-community/Florence-2-base or -large instead"
                )
            raise CaptionerError(
                f"could not load the {backend} model in {self.folder}: {exc}.{hint}"
            ) from exc
        self.model.eval().to(self.device)
        # Photos are decoded shrunk (JPEG draft mode) to twice the model's input size: the processor resizes
        # them to that size anyway, and decoding a 24-megapixel photo in full would dominate the time.
        vision = getattr(self.model.config, "vision_config", None)
        self.max_side = max(768, 2 * int(getattr(vision, "image_size", 0) or 384))
        self._torch = torch
        self._pool: ThreadPoolExecutor | None = None
        self._decoder_only = backend == "blip2" and not getattr(
            self.model.config.text_config, "is_encoder_decoder", False
        )
        log.info("CharForge: loaded %s %s on %s (%s)", backend, self.folder, self.device, self.dtype)

    def _process(self, images: list[Any]) -> dict:
        """The model's own processor on some images (resize, normalise, prompt tokens)."""
        s = self.settings
        rgb = [image.convert("RGB") for image in images]
        if self.name == "florence2":
            return dict(self.processor(text=[s.task] * len(rgb), images=rgb, return_tensors="pt"))
        if s.prompt.strip():
            return dict(self.processor(images=rgb, text=[s.prompt.strip()] * len(rgb), return_tensors="pt"))
        return dict(self.processor(images=rgb, return_tensors="pt"))

    def _inputs(self, images: list[Any]):
        # A large batch is preprocessed in chunks on several threads (PIL resizing releases the GIL), then
        # joined: every image gets the same prompt, so the chunks' token tensors have the same length.
        chunks = [images[i : i + PREPROCESS_CHUNK] for i in range(0, len(images), PREPROCESS_CHUNK)]
        if len(chunks) > 1:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(
                    max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="charforge-caption-preprocess"
                )
            parts = list(self._pool.map(self._process, chunks))
            inputs = {
                key: self._torch.cat([part[key] for part in parts])
                if hasattr(parts[0][key], "shape")
                else parts[0][key]
                for key in parts[0]
            }
        else:
            inputs = self._process(images)
        return on_device(inputs, self.device, self.dtype)

    def generate(self, images: list[Any]):
        """Token ids of the generated captions (the prompt removed for decoder-only models)."""
        s = self.settings
        if self.model is None:
            raise CaptionerError(f"this {self.name} captioner was closed")
        inputs = self._inputs(images)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(1, int(s.max_new_tokens)),
            "do_sample": False,
            "num_beams": max(1, int(s.num_beams)),
        }
        if s.min_new_tokens > 0:
            kwargs["min_new_tokens"] = min(int(s.min_new_tokens), kwargs["max_new_tokens"])
        if s.repetition_penalty and s.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = float(s.repetition_penalty)
        with self._torch.inference_mode():
            tokens = self.model.generate(**inputs, **kwargs)
        if self._decoder_only:
            tokens = tokens[:, self._prompt_length(inputs, tokens) :]
        return tokens

    def _prompt_length(self, inputs: dict, tokens) -> int:
        """How many leading ids of a decoder-only output are the prompt (image tokens, start token, question).

        Depending on the transformers version, BLIP-2 returns the prompt with the answer or the answer alone;
        without a text prompt the processor gives no input_ids and the model builds them itself."""
        first = tokens[0].tolist()
        given = inputs.get("input_ids")
        if given is not None:
            prompt = given[0].tolist()
            return len(prompt) if first[: len(prompt)] == prompt else 0
        image_token = getattr(self.model.config, "image_token_index", None)
        n = 0
        while n < len(first) and image_token is not None and first[n] == image_token:
            n += 1
        bos = getattr(self.model.config.text_config, "bos_token_id", None)
        if n and n < len(first) and first[n] == bos:
            n += 1
        return n

    def decode(self, tokens) -> list[str]:
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        return [" ".join(text.replace("<s>", " ").replace("</s>", " ").split()) for text in texts]

    def caption(self, images: list[Any]) -> list[str]:
        if not images:
            return []
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            out += self.decode(self.generate(images[start : start + self.batch_size]))
        return out

    def notes(self) -> list[str]:
        extra = f", task {self.settings.task}" if self.name == "florence2" else ""
        return [
            f"{self.name} {self.folder.name} on {self.device} ({str(self.dtype).replace('torch.', '')}{extra})"
        ]

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        self.model = None
        self.processor = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def _has_remote_code(folder: Path) -> bool:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(data.get("auto_map")) or any(folder.glob("modeling_*.py"))
