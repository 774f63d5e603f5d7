"""``charforge pipeline``: the images stage generates its best-of-N candidates again with new seeds while the
pick is below threshold (CLIPScore 0.70, the identity's threshold), records every round in the state and
summary, keeps the best round, and says when no round passed.

The stage runs against a stand-in for the Runner (as in test_pipeline.py) that answers each workflow with the
score nodes' ``scores`` UI output planted by sampler seed, so which rounds pass is known in advance. The real
run is tests/integration/test_real_comfyui_pipeline.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from charforge.driver.errors import ConfigError
from charforge.recipes import pipeline
from charforge.recipes.cli import build_parser
from charforge.recipes.pipeline import stages
from charforge.recipes.pipeline.summary import summary_lines
from charforge.recipes.story_retry import attempt_seed

SEED = 42  # the shipped workflows' sampler seed: round k uses attempt_seed(42, k - 1)


def _sheet(metric: str, values: list[float | None], threshold: float | None = None) -> str:
    rows = [{"index": i, "value": v, "passed": v is not None, "reason": ""} for i, v in enumerate(values)]
    return json.dumps({"metric": metric, "threshold": threshold, "images": rows})


class PlantedRunner:
    """Answers each stage workflow like the server: files per SaveImage prefix, score nodes' ``scores`` sheets
    and Best of N's report (its pick: the best value of the metric it ranks by) from planted values per seed."""

    def __init__(self, clip: dict[int, list[float]], identity: dict[int, list[float | None]] | None = None):
        self.clip, self.identity = clip, identity or {}
        self.prompts: list[dict[str, Any]] = []
        self.previews: list[str | None] = []
        self.said: list[str] = []

    def say(self, text: str) -> None:
        self.said.append(text)

    def run(self, prompt, out_dir, previews=None):
        self.prompts.append(copy.deepcopy(prompt))
        self.previews.append(previews)
        by_class: dict[str, list[str]] = {}
        for node_id, node in prompt.items():
            by_class.setdefault(node["class_type"], []).append(node_id)
        outputs: dict[str, Any] = {}
        texts: dict[str, str] = {}
        ranked: list[float | None] = []
        if "KSampler" in by_class:
            seed = prompt[by_class["KSampler"][0]]["inputs"]["seed"]
            for node_id in by_class.get("CharForgeClipScore", []):
                outputs[node_id] = {"scores": [_sheet("clip", self.clip[seed])]}
                texts[node_id] = f"clip scores of seed {seed}"
                ranked = list(self.clip[seed])
            for node_id in by_class.get("CharForgeScoreIdentity", []):
                outputs[node_id] = {"scores": [_sheet("identity", self.identity[seed], threshold=0.45)]}
                texts[node_id] = f"identity scores of seed {seed}"
                ranked = list(self.identity[seed])  # the SD identity workflow picks by identity
            for node_id in by_class.get("CharForgeBestOfN", []):
                pick = max(range(len(ranked)), key=lambda i: -1.0 if ranked[i] is None else ranked[i])
                outputs[node_id] = {"picks": [str(pick)]}
                texts[node_id] = f"1 group(s)\ngroup 1: image {pick} of {len(ranked)} candidates"
        files = []
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for node_id in by_class.get("SaveImage", []):
                name = Path(prompt[node_id]["inputs"]["filename_prefix"]).name
                files.append(out_dir / f"{name}_00001_.png")
                files[-1].write_bytes(b"png")
        return SimpleNamespace(outputs=outputs), texts, files


def _opts(tmp_path: Path, **kw) -> pipeline.PipelineOptions:
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    return pipeline.PipelineOptions(photos=photos, out=tmp_path / "out", character="pip", trigger="zqx", **kw)


def _models(faces: bool = False) -> pipeline.Models:
    return pipeline.Models(
        tiny=False,
        checkpoint="sd15.safetensors",
        train_base="sd15.safetensors",
        arch="sd15",
        tagger="",
        clip="clip-vit-large-patch14",
        motion=None,
        faces=faces,
    )


STATE = {"lora": {"lora_name": "pip.safetensors"}, "captions": {"train_data_dir": "/srv/pip"}}


def _seeds(runner: PlantedRunner) -> list[int]:
    return [p["6"]["inputs"]["seed"] for p in runner.prompts if "6" in p and "seed" in p["6"]["inputs"]]


def test_a_low_scoring_round_is_generated_again_and_both_rounds_are_recorded(tmp_path):
    opts = _opts(tmp_path)  # the defaults: 2 retries, CLIPScore 0.70 (cosine 0.28)
    runner = PlantedRunner(
        {
            SEED: [0.10, 0.20, 0.15, 0.05],  # best 0.20 -> CLIPScore 0.50: below threshold
            attempt_seed(SEED, 1): [0.12, 0.31, 0.30, 0.02],  # best 0.31 -> 0.775: passes
        }
    )
    state = dict(STATE)
    state["images"] = stages.stage_images(runner, opts, _models(), state)
    assert _seeds(runner) == [SEED, attempt_seed(SEED, 1)]  # passed in round 2: no third round
    first, second = runner.prompts
    assert first["8"]["inputs"]["filename_prefix"] == "charforge/pip/candidate"
    assert second["8"]["inputs"]["filename_prefix"] == "charforge/pip/candidate_round2"
    assert second["12"]["inputs"]["filename_prefix"] == "charforge/pip/best_round2"
    assert runner.previews == ["score_table", "score_table_round2"]
    assert "round 1 below threshold (CLIPScore 0.50 < 0.70" in runner.said[0]

    images = state["images"]
    record = images["retries"]
    assert (record["retries"], record["min_text"], record["kept_round"], record["passed"]) == (
        2,
        0.7,
        2,
        True,
    )
    rounds = record["rounds"]
    assert [r["seed"] for r in rounds] == [SEED, attempt_seed(SEED, 1)]
    assert [r["pick"] for r in rounds] == [1, 1] and [r["passed"] for r in rounds] == [False, True]
    assert [c["text"] for c in rounds[0]["candidates"]] == [0.10, 0.20, 0.15, 0.05]
    assert [c["clipscore"] for c in rounds[1]["candidates"]] == [0.3, 0.775, 0.75, 0.05]
    assert [c["passed"] for c in rounds[1]["candidates"]] == [False, True, True, False]
    out = opts.out / "images"
    assert images["best"] == [str(out / "best_round2_00001_.png")]
    assert sorted(Path(f).name for f in images["files"]) == [
        "best_00001_.png",
        "best_round2_00001_.png",
        "candidate_00001_.png",
        "candidate_round2_00001_.png",
    ]
    scores = Path(images["scores"]).read_text()
    assert "clip scores of seed 42" in scores and f"clip scores of seed {attempt_seed(SEED, 1)}" in scores
    assert "round 1 (seed 42): pick 1 below threshold" in scores and "kept round 2 of 2" in scores
    json.dumps(state)  # the state file holds every round
    lines = "\n".join(summary_lines({"stages": state}, opts.out))
    assert "best image" in lines and "round 2 of 2 kept" in lines and "no pick passed" not in lines


def test_a_passing_first_round_generates_nothing_more(tmp_path):
    runner = PlantedRunner({SEED: [0.33, 0.20, 0.10, 0.29]})
    images = stages.stage_images(runner, _opts(tmp_path), _models(), dict(STATE))
    assert _seeds(runner) == [SEED] and runner.said == []
    rounds = images["retries"]["rounds"]
    assert len(rounds) == 1 and rounds[0]["passed"] and rounds[0]["pick"] == 0
    assert images["best"] == [str(tmp_path / "out" / "images" / "best_00001_.png")]
    scores = Path(images["scores"]).read_text()
    assert (
        scores
        == "scored by CLIP score\n\nclip scores of seed 42\n\n1 group(s)\ngroup 1: image 0 of 4 candidates\n"
    )
    assert "best image" not in "\n".join(summary_lines({"stages": {"images": images}}, tmp_path / "out"))


def test_retries_zero_keeps_one_round_and_says_it_did_not_pass(tmp_path):
    runner = PlantedRunner({SEED: [0.10, 0.20, 0.15, 0.05]})
    images = stages.stage_images(runner, _opts(tmp_path, retries=0), _models(), dict(STATE))
    assert _seeds(runner) == [SEED] and runner.said == []
    assert runner.prompts[0]["12"]["inputs"]["filename_prefix"] == "charforge/pip/best"
    assert images["retries"]["passed"] is False and len(images["retries"]["rounds"]) == 1
    lines = "\n".join(summary_lines({"stages": {"images": images}}, tmp_path / "out"))
    assert "no pick passed the thresholds in 1 round(s)" in lines


def test_the_identity_route_retries_below_the_identitys_threshold_and_keeps_the_best_round(tmp_path):
    identity = {  # the planted identity's suggested threshold is 0.45; no round reaches it
        SEED: [0.20, None, 0.30, 0.10],
        attempt_seed(SEED, 1): [0.41, 0.35, None, 0.05],  # the best pick: kept
        attempt_seed(SEED, 2): [None, None, None, None],  # no face at all: the first image is picked
    }
    runner = PlantedRunner({}, identity)
    images = stages.stage_images(runner, _opts(tmp_path), _models(faces=True), dict(STATE))
    assert runner.prompts[0]["2"]["class_type"] == "CharForgeBuildIdentity"  # the identity, built once
    assert _seeds(runner) == [SEED, attempt_seed(SEED, 1), attempt_seed(SEED, 2)]
    record = images["retries"]
    assert record["passed"] is False and record["kept_round"] == 2
    rounds = record["rounds"]
    assert [r["min_identity"] for r in rounds] == [0.45] * 3
    assert rounds[1]["candidates"][0]["why"] == "identity 0.41 < 0.45"
    assert rounds[2]["candidates"][0]["why"] == "no face"
    assert all(c["text"] is None for r in rounds for c in r["candidates"])  # this workflow has no CLIP score
    assert images["best"] == [str(tmp_path / "out" / "images" / "best_round2_00001_.png")]
    lines = "\n".join(summary_lines({"stages": {"images": images}}, tmp_path / "out"))
    assert "round 2 of 3 kept" in lines and "no pick passed the thresholds in 3 round(s)" in lines
    assert "identity >= 0.45" in lines

    runner = PlantedRunner({}, identity)  # a lower identity threshold of your own: round 2 passes
    images = stages.stage_images(runner, _opts(tmp_path, min_identity=0.4), _models(faces=True), dict(STATE))
    assert images["retries"]["passed"] and images["retries"]["kept_round"] == 2 and len(_seeds(runner)) == 2


def test_the_cli_options_reach_the_pipeline_and_bad_thresholds_are_refused(tmp_path):
    args = build_parser().parse_args(["pipeline", str(tmp_path)])
    assert (args.retries, args.min_text, args.min_identity) == (2, 0.70, None)
    args = build_parser().parse_args(
        ["pipeline", str(tmp_path), "--retries", "0", "--min-text", "0.6", "--min-identity", "0.4"]
    )
    assert (args.retries, args.min_text, args.min_identity) == (0, 0.6, 0.4)
    with pytest.raises(ConfigError, match="CLIPScore"):
        _opts(tmp_path, min_text=3.0)
    with pytest.raises(ConfigError, match="retries"):
        _opts(tmp_path, retries=-1)


def test_a_flux_round_is_checked_on_both_identity_and_clip(tmp_path):
    """FLUX.1 scores faces and CLIP: the pick must pass both; its KSampler seed is the workflow's own."""
    flux = pipeline.Models(
        False,
        "flux1-dev.safetensors",
        "flux1-dev.safetensors",
        "flux-dev",
        "",
        "clip-vit-large-patch14",
        None,
        True,
        base_folder="diffusion_models",
        text_encoders={"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8_e4m3fn.safetensors"},
        vae="ae.safetensors",
    )
    prompt, _, _ = stages.flow_images_prompt(_opts(tmp_path), flux, "pip.safetensors")
    (sampler,) = [n for n, node in prompt.items() if node["class_type"] == "KSampler"]
    seed = prompt[sampler]["inputs"]["seed"]
    runner = PlantedRunner(
        {seed: [0.20, 0.35], attempt_seed(seed, 1): [0.10, 0.30]},
        {seed: [0.60, 0.50], attempt_seed(seed, 1): [0.40, 0.70]},  # the fake picks by identity
    )
    images = stages.stage_images(runner, _opts(tmp_path, candidates=2), flux, dict(STATE))
    seeds = [
        p[sampler]["inputs"]["seed"]
        for p in runner.prompts
        if sampler in p and "seed" in p[sampler]["inputs"]
    ]
    assert seeds == [seed, attempt_seed(seed, 1)]
    first, second = images["retries"]["rounds"]
    assert first["candidates"][0]["why"].startswith("CLIPScore 0.50 < 0.70")  # identity 0.60 passed
    assert first["candidates"][1] == {
        "index": 1,
        "identity": 0.5,
        "text": 0.35,
        "clipscore": 0.875,
        "passed": True,
        "why": "",
    }  # a candidate that passes but is not the pick does not end the retries
    assert not first["passed"] and second["passed"] and second["pick"] == 1
    assert images["retries"]["kept_round"] == 2 and images["family"] == "flux-dev"
