"""Weighted merge and SVD rank resize, checked against dense deltas and a direct SVD."""

from __future__ import annotations

import pytest
import torch

from cf_testing.lora_files import dense_deltas, random_state, write
from charforge.engine.library import formats, merge
from charforge.engine.library.formats import LoraFormatError


def _drop_some(state, every: int):
    state.modules = {k: m for i, (k, m) in enumerate(state.modules.items()) if i % every}
    return state


def test_merge_is_the_weighted_sum_of_deltas(tmp_path):
    a = random_state("sdxl", seed=1, rank=3, alpha=1.5)
    b = _drop_some(random_state("sdxl", seed=2, rank=2, alpha=None), 3)  # fewer modules, no alpha
    pa = write(a, tmp_path / "a.safetensors", "kohya")
    pb = write(b, tmp_path / "b.safetensors", "comfyui")  # layouts may differ
    path, report = merge.merge_files([(pa, 0.7), (pb, -0.3)], tmp_path / "m.safetensors")
    assert report is None
    merged = formats.read_state(path)
    da, db, dm = dense_deltas(a), dense_deltas(b), dense_deltas(merged)
    assert dm.keys() == da.keys() | db.keys()
    for key, delta in dm.items():
        expected = 0.7 * da[key] + (-0.3 * db[key] if key in db else 0)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
        module = merged.modules[key]
        assert module.rank == 3 + (2 if key in db else 0)  # ranks concatenated
        assert float(module.alpha) == module.rank
    meta = formats.read_header(path)[0]
    assert "a.safetensors:0.7" in meta["modelspec.merged_from"]


def test_merge_to_a_rank_is_the_truncated_svd_of_the_sum():
    a = random_state("sd15", seed=3, rank=4)
    b = random_state("sd15", seed=4, rank=4)
    merged, report = merge.merge_states([a, b], [1.0, 0.5], rank=2)
    by_name = {(m.component, m.name): m for m in report.modules}
    total = kept = 0.0
    for key, delta in dense_deltas(merged).items():
        exact = dense_deltas(a)[key] + 0.5 * dense_deltas(b)[key]
        s = torch.linalg.svdvals(exact.flatten(1))
        energy = s.square()
        assert by_name[key].retained == pytest.approx(float(energy[:2].sum() / energy.sum()), rel=1e-9)
        # Eckart-Young: the truncated delta's error is exactly the dropped singular values
        error = (delta - exact).flatten(1).square().sum()
        assert float(error) == pytest.approx(float(energy[2:].sum()), rel=1e-4, abs=1e-8)
        assert merged.modules[key].rank == 2
        total += float(energy.sum())
        kept += float(energy[:2].sum())
    assert report.retained == pytest.approx(kept / total, rel=1e-9)
    assert 0 < report.retained < 1


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_resize_to_full_rank_reproduces_the_delta(tmp_path, fmt):
    state = random_state("sdxl", seed=5, rank=3)
    source = write(state, tmp_path / "s.safetensors", fmt)
    path, report = merge.resize_file(source, tmp_path / "r.safetensors", rank=3)
    resized = formats.read_state(path)
    assert resized.source_format == fmt
    assert report.retained == pytest.approx(1.0, abs=1e-9)
    for key, delta in dense_deltas(state).items():
        torch.testing.assert_close(dense_deltas(resized)[key], delta, rtol=1e-4, atol=1e-5)
    # asking for more than the LoRA has keeps its rank
    bigger, report = merge.resize_state(state, rank=16)
    assert {m.rank for m in bigger.modules.values()} == {3}


def test_resize_reports_the_energy_kept_per_module_and_overall(tmp_path):
    state = random_state("sd15", seed=6, rank=6)
    path, report = merge.resize_file(
        write(state, tmp_path / "s.safetensors"), tmp_path / "r.safetensors", rank=2
    )
    totals = kept = 0.0
    for entry in report.modules:
        s2 = torch.linalg.svdvals(state.modules[(entry.component, entry.name)].delta().flatten(1)).square()
        assert entry.retained == pytest.approx(float(s2[:2].sum() / s2.sum()), rel=1e-9)
        assert (entry.rank_before, entry.rank_after) == (6, 2)
        totals += float(s2.sum())
        kept += float(s2[:2].sum())
    assert report.retained == pytest.approx(kept / totals, rel=1e-9)
    meta = formats.read_header(path)[0]
    assert float(meta["charforge.energy_retained"]) == pytest.approx(report.retained, abs=1e-6)
    assert meta["ss_network_dim"] == "2"
    assert "energy kept" in report.summary()


def test_merge_refuses_mismatches():
    with pytest.raises(LoraFormatError, match="different base models"):
        merge.merge_states([random_state("sd15"), random_state("sdxl")], [1, 1])
    a, b = random_state("sd15", width=6), random_state("sd15", width=8)
    with pytest.raises(LoraFormatError, match="disagree"):
        merge.merge_states([a, b], [1, 1])
    with pytest.raises(ValueError, match="weight"):
        merge.merge_states([a], [1, 2])
