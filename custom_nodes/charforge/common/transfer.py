"""What the pack's transfer routes and the driver's sync agree on: file types, size limits, path rules,
checksums and the model manifest.

Standard library and PyYAML only (this module is shared by the node pack and the driver).

A *relative name* is how a file is named on the wire: ``/``-separated, no empty, ``.`` or ``..`` parts, no
backslash or NUL, no leading ``/`` and no part starting with ``.`` (hidden files and the server's own
bookkeeping are never reachable).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: what a photo folder may send up: images and caption sidecars (lower-case suffixes)
IMAGE_TYPES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
CAPTION_TYPES = frozenset({".txt", ".caption"})
UPLOAD_TYPES = IMAGE_TYPES | CAPTION_TYPES
#: the largest file the upload route accepts (a photo or a caption)
MAX_UPLOAD_FILE = 64 * 1024 * 1024
#: the largest body of one upload request; the driver sends smaller chunks (a RunPod pod's proxy answers 524
#: after 100 s, so one request must finish well within that even on a slow uplink)
MAX_CHUNK = 16 * 1024 * 1024
DEFAULT_CHUNK = 4 * 1024 * 1024
#: model folder kinds the download route may write into
MODEL_KINDS = frozenset(
    {
        "checkpoints",
        "diffusion_models",  # Flux.1 as published: the diffusion model alone
        "text_encoders",
        "loras",
        "vae",
        "diffusers",
        "clip_vision",
        "animatediff_models",
        "wd14_tagger",
        "insightface",
        "upscale_models",
        "controlnet",
        "embeddings",
        "dwpose",  # DWPose's ONNX files (Pose Map); listed so a client can tell whether pose maps can run
    }
)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def is_sha256(value: str) -> bool:
    return bool(_SHA256.match(value or ""))


def dataset_name_ok(name: str) -> bool:
    """A dataset folder name: letters, digits, ``._-``, not starting with ``.``, at most 100 characters."""
    return bool(_DATASET.match(name or "")) and ".." not in name


def relative_parts(name: str) -> tuple[str, ...] | None:
    """The parts of a relative name (see the module docstring), or None when it breaks a rule."""
    if not name or len(name) > 1000 or "\\" in name or "\x00" in name or name.startswith("/"):
        return None
    parts = tuple(name.split("/"))
    if any(not p or p in (".", "..") or p.startswith(".") for p in parts):
        return None
    return parts


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(folder: str | os.PathLike, types: frozenset[str] = UPLOAD_TYPES) -> dict[str, Path]:
    """The files of `folder` (recursively, links not followed out of it) whose suffix is in `types`, by
    relative name; hidden files and folders are left out."""
    root = Path(folder)
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and path.suffix.lower() in types and relative_parts(rel) is not None:
            if not path.resolve().is_relative_to(root.resolve()):
                continue
            found[rel] = path
    return found


# --------------------------------------------------------------------------------------------------
# The model manifest


#: the node that sends a training run to S3-compatible storage from the server (nodes/storage.py), and the
#: name of the receipt text in the PNG it shows (what a RunPod serverless worker returns of it)
STORE_NODE_CLASS = "CharForgeSendTrainingToStorage"
#: the node that fetches a folder (a dataset) from S3-compatible storage into the server's input folder
FETCH_NODE_CLASS = "CharForgeFetchFromStorage"
RECEIPT_KEY = "charforge_results"
RECEIPT_PREFIX = RECEIPT_KEY + "_"
#: the node that sends what a job's CharForge nodes wrote (videos, storyboard folders, datasets and their
#: reports, score sheets) to S3-compatible storage from the server (nodes/storage.py)
OUTPUTS_NODE_CLASS = "CharForgeSendOutputsToStorage"
#: the outputs of CharForge's nodes that name what the node wrote, by class and output index, with how the
#: Send Outputs to Storage node reads the value: ``file`` (a path), ``folder`` (a folder, sent whole),
#: ``folder_of`` (a file whose folder is sent whole), ``dataset`` (a dataset manifest: its folder) and
#: ``sheet`` (JSON text kept as a file). The driver wires these into that node; the node reads them so.
OUTPUT_VALUES: dict[str, dict[int, str]] = {
    "CharForgeSaveVideo": {0: "file"},
    "CharForgeStoryboardSheet": {1: "folder"},
    "CharForgeExportDataset": {0: "dataset"},
    "CharForgeDatasetReport": {1: "folder_of"},
    "CharForgeScoreIdentity": {4: "sheet"},
    "CharForgeClipScore": {3: "sheet"},
    "CharForgeCombineScores": {3: "sheet"},
    "CharForgePickCheckpoint": {2: "sheet"},
    "CharForgeCompareSets": {1: "sheet", 2: "file"},
}
#: the input name the driver gives the value of output `index` of node `node_id` on Send Outputs to Storage
OUTPUT_INPUT_PREFIX = "from_"


def output_input_name(node_id: str, index: int) -> str:
    return f"{OUTPUT_INPUT_PREFIX}{node_id}__{index}"


def parse_output_input(name: str) -> tuple[str, int] | None:
    """``(node id, output index)`` of an input named by :func:`output_input_name`, None for any other name."""
    if not name.startswith(OUTPUT_INPUT_PREFIX):
        return None
    node_id, sep, index = name[len(OUTPUT_INPUT_PREFIX) :].rpartition("__")
    return (node_id, int(index)) if sep and node_id and index.isdigit() else None


#: environment variables holding a Hugging Face access token (the first one set wins), as huggingface_hub reads
HF_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_HF_HOSTS = frozenset({"huggingface.co", "hf.co"})


def hf_endpoint() -> str:
    """The Hugging Face hub's address: ``$HF_ENDPOINT`` (a mirror, as huggingface_hub allows) or
    ``https://huggingface.co``."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hf_token(env: Any = None) -> str:
    """The Hugging Face token of `env` (default: this process's environment), "" when none is set."""
    env = os.environ if env is None else env
    return next((str(env[name]) for name in HF_TOKEN_VARS if env.get(name)), "")


def is_hf_url(url: str) -> bool:
    """Whether `url` is on the Hugging Face hub (or ``$HF_ENDPOINT``): the only host a token is sent to."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return bool(host) and (
        host in _HF_HOSTS or parts.netloc.lower() == urlsplit(hf_endpoint()).netloc.lower()
    )


@dataclass(frozen=True)
class ModelEntry:
    """One model a job needs: its file `name` in the ComfyUI model folder `kind`, where to get it (a URL, or a
    Hugging Face `repo` + `file` at `revision`), and what it must be (`size` in bytes, `sha256`)."""

    name: str
    kind: str
    url: str = ""
    repo: str = ""
    file: str = ""
    revision: str = "main"
    size: int | None = None
    sha256: str = ""

    def source_url(self) -> str:
        """Where the file can be downloaded from ("" when the manifest says nowhere); a Hugging Face file
        resolves against :func:`hf_endpoint`."""
        if self.url:
            return self.url
        if self.repo and self.file:
            return f"{hf_endpoint()}/{self.repo}/resolve/{self.revision}/{self.file}"
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in asdict(self).items()
            if v not in ("", None) and not (k == "revision" and v == "main")
        }


def parse_model_entry(data: Any) -> ModelEntry:
    """A manifest entry from a mapping, checked: ``ValueError`` names what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"a model entry must be a mapping, not {type(data).__name__}")
    unknown = set(data) - {"name", "kind", "url", "repo", "file", "revision", "size", "sha256"}
    if unknown:
        raise ValueError(
            f"unknown field(s) in model entry {data.get('name')!r}: {', '.join(sorted(unknown))}"
        )
    name, kind = str(data.get("name") or ""), str(data.get("kind") or "")
    if relative_parts(name) is None:
        raise ValueError(f"model name {name!r} is not a plain relative file name")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model {name!r}: kind {kind!r} is not one of {', '.join(sorted(MODEL_KINDS))}")
    sha = str(data.get("sha256") or "").lower()
    if sha and not is_sha256(sha):
        raise ValueError(f"model {name!r}: sha256 must be 64 hex digits")
    size = data.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ValueError(f"model {name!r}: size must be a whole number of bytes")
    url = str(data.get("url") or "")
    if url and not url.startswith(("http://", "https://")):
        raise ValueError(f"model {name!r}: url must be http(s)://, not {url.split(':', 1)[0]}:")
    return ModelEntry(
        name,
        kind,
        url,
        str(data.get("repo") or ""),
        str(data.get("file") or ""),
        str(data.get("revision") or "main"),
        size,
        sha,
    )


def parse_model_manifest(document: Any) -> list[ModelEntry]:
    """``{"models": [entry, ...]}`` (or a bare list) -> entries, each checked."""
    items = document.get("models") if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise ValueError("a model manifest is a list of entries or a mapping with a 'models' list")
    return [parse_model_entry(item) for item in items]


def load_model_manifest(path: str | os.PathLike) -> list[ModelEntry]:
    """Read a model manifest (YAML or JSON) from a file."""
    from .safe_yaml import load_yaml

    return parse_model_manifest(load_yaml(Path(path).read_text(encoding="utf-8"), str(path)))
