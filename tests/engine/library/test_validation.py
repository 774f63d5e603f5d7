"""A LoRA is checked once when opened and before it is written: tiny hand-built safetensors files."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from charforge.engine.library import formats, merge
from charforge.engine.library import inspect as lora_inspect
from charforge.engine.library.formats import InvalidLoraFile

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # an SD1.5 layer (kohya name)
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"


def f32(values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def build(
    path: Path, tensors: dict, metadata: dict | None = None, header_extra: dict | None = None, cut: int = 0
) -> Path:
    """A safetensors file from {key: (dtype, shape, raw bytes)}; `cut` drops that many trailing bytes."""
    header, data = {}, b""
    for key, (dtype, shape, raw) in tensors.items():
        header[key] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    header.update(header_extra or {})
    text = json.dumps(header).encode()
    blob = struct.pack("<Q", len(text)) + text + data
    path.write_bytes(blob[: len(blob) - cut] if cut else blob)
    return path


def module(
    base: str,
    rank: int = 2,
    width: int = 6,
    up_rank: int | None = None,
    alpha: float | None = 2.0,
    poison: float | None = None,
) -> dict:
    down = [0.01 * (i + 1) for i in range(rank * width)]
    if poison is not None:
        down[3] = poison
    up_rank = rank if up_rank is None else up_rank
    out = {
        f"{base}.lora_down.weight": ("F32", (rank, width), f32(down)),
        f"{base}.lora_up.weight": ("F32", (width + 1, up_rank), f32([0.02] * ((width + 1) * up_rank))),
    }
    if alpha is not None:
        out[f"{base}.alpha"] = ("F32", (), f32([alpha]))
    return out


def good(tmp_path: Path, name: str = "good.safetensors") -> Path:
    return build(tmp_path / name, {**module(Q), **module(K)}, {"ss_base_model_version": "sd_v1"})


def test_a_good_hand_built_file_opens_everywhere(tmp_path):
    path = good(tmp_path)
    info = lora_inspect.inspect_lora(path)
    assert info.ranks == {"2": 2} and info.alphas == [2.0]
    assert len(formats.read_state(path).modules) == 2


def test_mismatched_ranks_are_refused_by_info_merge_resize_and_convert(tmp_path):
    path = build(tmp_path / "ranks.safetensors", {**module(Q, rank=4, up_rank=8), **module(K)})
    for action in (
        lambda: lora_inspect.inspect_lora(path),
        lambda: merge.merge_files([(path, 1.0), (good(tmp_path), 1.0)], tmp_path / "m.safetensors"),
        lambda: merge.resize_file(path, tmp_path / "r.safetensors", 2),
        lambda: formats.convert_file(path, tmp_path / "c.safetensors", "peft"),
    ):
        with pytest.raises(
            InvalidLoraFile, match="rank mismatch: down \\[4, 6\\] has rank 4 but up \\[7, 8\\]"
        ) as info:
            action()
        assert info.value.key == f"{Q}.lora_up.weight" and str(path) in str(info.value)
    assert not any((tmp_path / n).exists() for n in ("m.safetensors", "r.safetensors", "c.safetensors"))


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weights_are_refused_before_merging_or_svd(tmp_path, poison):
    path = build(tmp_path / "nan.safetensors", {**module(Q), **module(K, poison=poison)})
    with pytest.raises(InvalidLoraFile, match="NaN or infinite") as info:
        lora_inspect.inspect_lora(path)
    assert info.value.key == f"{K}.lora_down.weight"
    with pytest.raises(InvalidLoraFile, match="NaN or infinite"):
        merge.merge_files([(path, 0.5), (good(tmp_path), 0.5)], tmp_path / "m.safetensors")
    with pytest.raises(InvalidLoraFile, match="NaN or infinite"):
        merge.resize_file(path, tmp_path / "r.safetensors", 1)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "r.safetensors").exists()


def test_truncated_file_and_offsets_past_the_end_are_refused(tmp_path):
    truncated = build(tmp_path / "cut.safetensors", {**module(Q), **module(K)}, cut=10)
    with pytest.raises(InvalidLoraFile, match="outside the file's") as info:
        lora_inspect.inspect_lora(truncated)
    assert info.value.key is not None
    # A header claiming rank 100000 with data that is not there (it used to be shown as valid).
    liar = tmp_path / "liar.safetensors"
    header = {
        f"{Q}.lora_down.weight": {"dtype": "F32", "shape": [100000, 6], "data_offsets": [0, 2400000]},
        f"{Q}.lora_up.weight": {"dtype": "F32", "shape": [7, 100000], "data_offsets": [2400000, 5200000]},
    }
    text = json.dumps(header).encode()
    liar.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 64)
    with pytest.raises(
        InvalidLoraFile, match=r"data_offsets \[0, 2400000\] outside the file's 64 data bytes"
    ):
        lora_inspect.inspect_lora(liar)
    with pytest.raises(InvalidLoraFile, match="outside the file"):
        formats.read_state(liar)
    header_cut = tmp_path / "header_cut.safetensors"
    header_cut.write_bytes(struct.pack("<Q", 5000) + b'{"a": 1}')
    with pytest.raises(InvalidLoraFile, match="header claims 5000 bytes but the file has 8"):
        lora_inspect.inspect_lora(header_cut)


def test_offsets_must_match_dtype_times_shape_and_not_overlap(tmp_path):
    wrong = build(
        tmp_path / "size.safetensors",
        {
            f"{Q}.lora_down.weight": ("F32", (2, 6), f32([0.0] * 11)),
            f"{Q}.lora_up.weight": ("F32", (7, 2), f32([0.0] * 14)),
        },
    )
    with pytest.raises(InvalidLoraFile, match=r"holds 44 bytes but F32 x \[2, 6\] needs 48"):
        lora_inspect.inspect_lora(wrong)
    overlap = tmp_path / "overlap.safetensors"
    header = {
        f"{Q}.lora_down.weight": {"dtype": "F32", "shape": [2, 6], "data_offsets": [0, 48]},
        f"{Q}.lora_up.weight": {"dtype": "F32", "shape": [7, 2], "data_offsets": [8, 64]},
    }
    text = json.dumps(header).encode()
    overlap.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 64)
    with pytest.raises(InvalidLoraFile, match="overlaps"):
        lora_inspect.inspect_lora(overlap)


def test_unknown_dtype_and_non_text_metadata_are_refused(tmp_path):
    odd = build(
        tmp_path / "dtype.safetensors",
        {**module(Q)},
        header_extra={f"{K}.lora_down.weight": {"dtype": "F128", "shape": [1], "data_offsets": [0, 0]}},
    )
    with pytest.raises(InvalidLoraFile, match="unknown dtype 'F128'") as info:
        lora_inspect.inspect_lora(odd)
    assert info.value.key == f"{K}.lora_down.weight"
    meta = build(tmp_path / "meta.safetensors", module(Q), {"ss_network_dim": 4})
    with pytest.raises(InvalidLoraFile, match="metadata values must be text") as info:
        lora_inspect.inspect_lora(meta)
    assert info.value.key == "__metadata__.ss_network_dim"


def test_deeply_nested_json_never_overflows_the_stack(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    path = build(
        tmp_path / "deep_meta.safetensors",
        {**module(Q), **module(K)},
        {"ss_tag_frequency": deep, "modelspec.trigger_phrase": "ohwx"},
    )
    info = lora_inspect.inspect_lora(path)  # metadata JSON too deep to parse is simply not read
    assert info.tag_frequency == [] and info.trigger_words == ["ohwx"]
    header = tmp_path / "deep_header.safetensors"
    text = ('{"x": ' + deep + "}").encode()
    header.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(InvalidLoraFile, match="nested 200001 levels deep"):
        lora_inspect.inspect_lora(header)


def test_nothing_is_written_that_would_not_load(tmp_path):
    import torch

    state = formats.read_state(good(tmp_path))
    first = next(iter(state.modules.values()))
    first.down = first.down.clone()
    first.down[0, 0] = float("nan")
    target = tmp_path / "out.safetensors"
    with pytest.raises(InvalidLoraFile, match="NaN or infinite"):
        formats.write_state(state, target)
    first.down = torch.zeros(3, 6)  # rank 3 against an up of rank 2
    with pytest.raises(InvalidLoraFile, match="rank mismatch"):
        formats.write_state(state, target)
    first.down = torch.ones(2, 6)
    with pytest.raises(InvalidLoraFile, match="metadata values must be text"):
        formats.write_state(state, target, metadata={"ss_network_dim": 2})
    assert not target.exists()
    formats.write_state(state, target)
    assert formats.read_state(target).modules.keys() == state.modules.keys()


def test_info_works_without_numpy_and_says_what_it_did_not_check(tmp_path):
    path = good(tmp_path)
    script = f"""
import sys
class NoNumpy:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("numpy", "torch"):
            raise ImportError(f"{{name}} is blocked for this test")
sys.meta_path.insert(0, NoNumpy())
import io
from charforge.recipes.cli import main
out, err = io.StringIO(), io.StringIO()
code = main(["lora", "info", {str(path)!r}], stdout=out, stderr=err)
print(code)
print(out.getvalue())
print(err.getvalue(), file=sys.stderr)
assert "numpy" not in sys.modules and "torch" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "0", done.stdout + done.stderr
    assert "rank: 2 (2)" in done.stdout and "alpha: 2" in done.stdout
    assert "numpy is not installed: weights were not checked for NaN/Inf" in done.stdout
    assert math.isclose(formats.read_small_tensor(path, f"{Q}.alpha")[0], 2.0)
