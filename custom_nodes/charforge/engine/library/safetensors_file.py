"""Reading a ``.safetensors`` file's header defensively, in pure Python (no numpy, no torch).

The format: 8 bytes little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets},
"__metadata__": {str: str}}``, then the data; offsets are relative to the data's start. A header is
trusted only after checking that N fits in the file, the JSON is an object nested at most a few levels,
every dtype is known, every shape is a list of non-negative integers, every ``[start, end]`` lies inside
the data, ``end - start`` is exactly ``dtype size x prod(shape)``, no two tensors overlap, and metadata
maps text to text. Anything else is a `SafetensorsError` naming the file, the key and the reason.

`read_values` reads a small tensor (an ``.alpha``) with `struct`; `nonfinite_keys` checks every float
tensor for NaN/Inf and needs numpy (it reads the file in chunks through a memory map).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
MAX_HEADER_BYTES = 100_000_000
MAX_JSON_DEPTH = 32  # a header is 2 levels deep; metadata JSON (ss_tag_frequency) 3
_STRUCT = {
    "F64": "d",
    "F32": "f",
    "F16": "e",
    "I64": "q",
    "I32": "i",
    "I16": "h",
    "I8": "b",
    "U64": "Q",
    "U32": "I",
    "U16": "H",
    "U8": "B",
    "BOOL": "?",
}
# Exponent bits of each float dtype (as the same-width unsigned integer): all ones means NaN or Inf.
_EXPONENT = {
    "F64": ("<u8", 0x7FF0000000000000),
    "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
}


def name_from_metadata(
    metadata: Mapping[str, str],
    names: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]],
    lower: bool = False,
) -> str | None:
    """The first of `names` (name -> (prefixes of kohya's ``ss_base_model_version``, prefixes of
    ``modelspec.architecture``)) that one of the two entries of a file's `metadata` starts with (compared in
    lower case with `lower`); None when neither names one."""
    version = metadata.get("ss_base_model_version", "")
    spec = metadata.get("modelspec.architecture", "")
    if lower:
        version, spec = version.lower(), spec.lower()
    for name, (versions, specs) in names.items():
        if version.startswith(versions) or spec.startswith(specs):
            return name
    return None


class FileProblem(Exception):
    """What is wrong with one file: `path`, `key` (None: the file as a whole) and `reason`, shown as
    ``path: 'key' reason``. Mixed into the errors of the readers that name a file's tensor."""

    def __init__(self, path: str | os.PathLike, reason: str, key: str | None = None):
        self.path = str(path)
        self.key = key
        self.reason = reason
        where = f" {key[:120]!r}" if key is not None else ""
        super().__init__(f"{self.path}:{where} {reason}")


class SafetensorsError(FileProblem, ValueError):
    """A ``.safetensors`` file that cannot be trusted; `path`, `key` (None: the file as a whole), `reason`."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # [start, end) relative to the data's start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Header:
    """A checked header: metadata, tensors and where the data starts in the file."""

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON `text` (counted without parsing, so never recursing)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def loads_bounded(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses (ValueError) JSON nested deeper than `max_depth` instead of recursing."""
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep (at most {max_depth} are read)")
    return json.loads(text)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_info(path: Path, key: str, value: Any, data_size: int) -> TensorInfo:
    if not isinstance(value, dict):
        raise SafetensorsError(path, f"is {type(value).__name__}, not a tensor entry", key)
    dtype = value.get("dtype")
    if dtype not in DTYPE_BYTES:
        raise SafetensorsError(
            path, f"has unknown dtype {str(dtype)[:20]!r} (known: {', '.join(DTYPE_BYTES)})", key
        )
    shape = value.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(n) and n >= 0 for n in shape):
        raise SafetensorsError(
            path, f"has shape {str(shape)[:60]}; a shape is a list of at most 8 non-negative integers", key
        )
    offsets = value.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) for n in offsets)):
        raise SafetensorsError(path, f"has data_offsets {str(offsets)[:60]}; expected [start, end]", key)
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise SafetensorsError(
            path,
            f"has data_offsets [{start}, {end}] outside the file's {data_size} data bytes "
            "(truncated or damaged file: download or export it again)",
            key,
        )
    need = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - start != need:
        raise SafetensorsError(path, f"holds {end - start} bytes but {dtype} x {shape} needs {need}", key)
    return TensorInfo(dtype, tuple(shape), (start, end))


def read_header(path: str | os.PathLike) -> Header:
    """The checked header of a ``.safetensors`` file (see the module docstring for what is checked)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SafetensorsError(path, f"is not a safetensors file ({size} bytes, too short)")
        length = int.from_bytes(head, "little")
        if length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(
                path,
                f"is not a safetensors file, or truncated: its header claims {length} "
                f"bytes but the file has {size - 8} after the length",
            )
        raw = fh.read(length)
    try:
        header = loads_bounded(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsError(path, f"is not a safetensors file (header: {str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(
            path, f"is not a safetensors file (header is {type(header).__name__}, not an object)"
        )
    raw_meta = header.pop("__metadata__", None)
    if raw_meta is None:
        raw_meta = {}
    if not isinstance(raw_meta, dict):
        raise SafetensorsError(
            path, f"is {type(raw_meta).__name__}; metadata maps text to text", "__metadata__"
        )
    for key, value in raw_meta.items():
        if not isinstance(value, str):
            raise SafetensorsError(
                path,
                f"is {type(value).__name__}; metadata values must be text (JSON inside a string is fine)",
                f"__metadata__.{key}",
            )
    data_start = 8 + length
    data_size = size - data_start
    tensors = {key: _tensor_info(path, key, value, data_size) for key, value in header.items()}
    previous_end, previous_key = 0, None
    for key, info in sorted(tensors.items(), key=lambda item: item[1].offsets):
        if info.offsets[0] < previous_end and info.offsets[0] != info.offsets[1]:
            raise SafetensorsError(path, f"overlaps tensor {str(previous_key)[:120]!r}", key)
        previous_end, previous_key = max(previous_end, info.offsets[1]), key
    return Header(dict(raw_meta), tensors, data_start)


def read_values(path: str | os.PathLike, header: Header, key: str, limit: int = 4096) -> list[float]:
    """The values of one small tensor (at most `limit` elements) as floats, with the standard library only."""
    info = header.tensors[key]
    if info.numel > limit:
        raise SafetensorsError(
            path, f"has {info.numel} values; only small tensors (at most {limit}) are read this way", key
        )
    with Path(path).open("rb") as fh:
        fh.seek(header.data_start + info.offsets[0])
        raw = fh.read(info.offsets[1] - info.offsets[0])
    if info.dtype == "BF16":  # the high half of a float32
        return [struct.unpack("<f", b"\x00\x00" + raw[i : i + 2])[0] for i in range(0, len(raw), 2)]
    code = _STRUCT.get(info.dtype)
    if code is None:
        raise SafetensorsError(path, f"has dtype {info.dtype}, which is read only with torch", key)
    return [float(v) for v in struct.unpack(f"<{info.numel}{code}", raw)]


def nonfinite_keys(
    path: str | os.PathLike, header: Header, keys: Iterable[str] | None = None, chunk: int = 1 << 22
) -> list[str]:
    """The float tensors (of `keys`, default all) holding a NaN or an infinity. Needs numpy."""
    import numpy as np

    bad = []
    data = (
        np.memmap(path, dtype=np.uint8, mode="r", offset=header.data_start)
        if Path(path).stat().st_size > header.data_start
        else None
    )
    try:
        for key in keys if keys is not None else header.tensors:
            info = header.tensors[key]
            if info.dtype not in _EXPONENT or info.numel == 0 or data is None:
                continue
            view, mask = _EXPONENT[info.dtype]
            width = DTYPE_BYTES[info.dtype]
            start, end = info.offsets
            step = chunk - chunk % width
            for at in range(start, end, step):
                words = data[at : min(end, at + step)].view(view)
                if np.any((words & mask) == mask):
                    bad.append(key)
                    break
    finally:
        del data
    return bad
