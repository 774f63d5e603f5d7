"""``charforge lora bench`` on the planted fake ComfyUI: known-good, half-way and broken LoRAs and the base model."""

from __future__ import annotations

import json

import pytest
from fakes.tune_server import OPTIMUM, TuneServer, env_fixture, models_fixture, run_cli  # noqa: F401 - fixtures
from PIL import Image

pytest.importorskip("insightface")


@pytest.mark.slow
def test_bench_ranks_planted_loras_and_the_base_model(env):
    out = env / "bench"
    with TuneServer() as server:
        server.trained["mine.safetensors"] = dict(OPTIMUM)  # draws the character
        server.trained["overcooked.safetensors"] = {"learning_rate": 1e-2, "rank": 16}  # no face at all

        def bench():
            loras = ("mine.safetensors", "downloaded_style.safetensors", "overcooked.safetensors")
            scenes = ("--prompt", "portrait", "--prompt", "in a park", "--seeds", "1,2")
            return run_cli(
                *("lora", "bench", *loras, "--character", "hero", "--server", server.url, "--out", str(out)),
                *(*scenes, "--checkpoint", "v1-5-pruned-emaonly.safetensors", "--det-size", "160"),
            )

        code, stdout, stderr = bench()
        assert code == 0, stderr
        loras = [lora for lora, _, _ in server.renders]
        assert loras.count(None) == 4 and loras.count("mine.safetensors") == 4  # base model: no LoraLoader

        data = json.loads((out / "bench.json").read_text())
        rows = {r["lora"]: r for r in data["rows"]}
        assert list(rows) == [
            "mine.safetensors",
            "downloaded_style.safetensors",
            "overcooked.safetensors",
            "base model",
        ]
        assert rows["mine.safetensors"]["identity"] > 0.95 and rows["mine.safetensors"]["faces"] == 4
        assert (
            rows["mine.safetensors"]["identity"]
            > rows["downloaded_style.safetensors"]["identity"]
            > rows["base model"]["identity"]
        )
        assert (
            rows["overcooked.safetensors"]["identity"] == 0 and rows["overcooked.safetensors"]["faces"] == 0
        )
        assert all(
            r["images"] == 4 and r["cmmd"] is not None and r["diversity"] is not None for r in rows.values()
        )
        table = (out / "table.md").read_text()
        best_line = next(line for line in table.splitlines() if line.rstrip().endswith("best |"))
        assert best_line.startswith("| mine.safetensors") and "| base model" in stdout
        with Image.open(out / "sheet.png") as sheet:
            assert sheet.height > 4 * 160
        assert (out / "mine" / "grid.png").is_file()

        # rerun: resumed, nothing rendered again
        before = len(server.renders)
        code, _, stderr = bench()
        assert code == 0, stderr
        assert len(server.renders) == before


def test_bench_names_a_lora_the_server_does_not_have(env):
    with TuneServer() as server:
        code, _, stderr = run_cli(
            "lora",
            "bench",
            "missing.safetensors",
            "--character",
            "hero",
            "--server",
            server.url,
            "--out",
            str(env / "bench"),
        )
    assert code == 2 and "missing.safetensors" in stderr and "downloaded_style.safetensors" in stderr
