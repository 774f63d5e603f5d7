"""benchmarks/gpu_suite.py stays runnable: its CPU smoke run fills every section, and its rounds obey the budget.

The numbers come from a GPU lease that may happen rarely; a suite that broke since the last one would waste it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite  # noqa: E402


@pytest.mark.slow
def test_the_smoke_run_measures_every_section(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["sections"]) == {name for name, _, _ in gpu_suite.SECTIONS}
    assert all(set(s) == {"seconds"} for s in results["sections"].values()), results["sections"]
    rows = {(r["row"], r["side"]): r for r in results["rows"]}
    # Every anchored measurement has both sides and the ratio; ours alone elsewhere.
    for row in ("sdxl_b1", "sdxl_b1_gc", "video_8f", "caption"):
        assert {(row, "ours"), (row, "anchor"), (row, "ratio")} <= set(rows)
        assert rows[(row, "ratio")]["speedup"] > 0
    for row in ("video_14f", "sdxl_b4", "sd15_b1", "clip_score", "sdxl_job", "sdxl_b1_compile"):
        assert (row, "ours") in rows
    assert rows[("sdxl_b1", "ours")]["s_per_step"]["median"] > 0
    assert rows[("caption", "ours")]["sidecars"] == rows[("caption", "ours")]["images_per_round"]
    job = rows[("sdxl_job", "ours")]
    assert 0 < job["training_s"] < job["job_seconds"] and job["lora"].endswith(".safetensors")
    assert results["environment"]["diffusers"] and results["smoke"] is True


def _context(min_rounds: int) -> SimpleNamespace:
    return SimpleNamespace(min_rounds=min_rounds, sync=lambda: None)


def test_rounds_stop_at_the_deadline_after_the_minimum():
    calls: list[str] = []
    sides = {"ours": lambda: calls.append("ours"), "anchor": lambda: calls.append("anchor")}
    times = gpu_suite.interleave(_context(3), sides, 2, deadline=time.perf_counter() - 1)
    assert {side: len(t) for side, t in times.items()} == {"ours": 3, "anchor": 3}  # spent: the minimum only
    # Two calls per side per round, and the side going first alternates (drift hits both alike).
    assert calls == ["ours"] * 2 + ["anchor"] * 4 + ["ours"] * 4 + ["anchor"] * 2


def test_rounds_fill_the_time_left_and_no_more():
    def step():
        time.sleep(0.01)

    start = time.perf_counter()
    times = gpu_suite.interleave(_context(1), {"ours": step}, 1, deadline=start + 0.3)
    spent = time.perf_counter() - start
    assert len(times["ours"]) > 3
    assert spent < 0.3 + 0.2  # at most the round under way when the deadline passed


def test_ratios_say_how_much_faster_ours_is():
    rows = gpu_suite.side_by_side("x", "s_per_step", {"ours": [1.0], "anchor": [3.0]}, 0.5)
    assert rows[-1] == {"row": "x", "side": "ratio", "speedup": 3.0, "target": 0.5}
    rows = gpu_suite.side_by_side("y", "images_per_min", {"ours": [600.0], "anchor": [200.0]}, None)
    assert rows[-1]["speedup"] == 3.0
