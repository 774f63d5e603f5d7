"""``charforge story --retries``: a frame below threshold is regenerated with new seeds, every attempt is
recorded in metadata.json, the best attempt is kept, and a frame that never passes is marked on the sheet.

Runs against the loopback fake ComfyUI of test_story.py, whose Storyboard Select is replaced here by one that
plants the text agreement by seed, so which attempts pass is known in advance."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cf_testing.cli import run_charforge as run_cli
from charforge.engine.story.sheet import NOT_PASSED
from charforge.recipes.story_retry import RetryPolicy, attempt_seed, failures

_spec = importlib.util.spec_from_file_location("_story_fakes", Path(__file__).with_name("test_story.py"))
assert _spec is not None and _spec.loader is not None
story_fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(story_fakes)
FakeImage = story_fakes.FakeImage

SEED = 100
# CLIP cosine by seed (the default threshold is CLIPScore 0.70 = 2.5 x cosine 0.28): frame 1 passes at once,
# frame 2 on its 2nd attempt, frame 3 never (its 2nd is best)
TEXT_BY_SEED = {
    SEED: 0.36,
    SEED + 1: 0.16,
    attempt_seed(SEED + 1, 1): 0.33,
    SEED + 2: 0.12,
    attempt_seed(SEED + 2, 1): 0.22,
    attempt_seed(SEED + 2, 2): 0.18,
    SEED + 3: 0.24,  # frame 4 never passes either, and its first attempt is the best
    attempt_seed(SEED + 3, 1): 0.08,
    attempt_seed(SEED + 3, 2): 0.04,
}
SCENES = [
    "the character at the door",
    "the character reads a letter",
    "the character boards a boat",
    "the character at sea",
    "the character sees the island",
    "the character lands",
]  # frames 5-6 pass at once


async def _planted_select(ctx, images, prompts, mode, seeds=None, first_frame=1, **_):
    frame = {
        "index": first_frame - 1,
        "prompt": prompts,
        "seed": seeds,
        "candidates": images.batch,
        "chosen": 0,
        "identity": 0.7,
        "text": TEXT_BY_SEED.get(seeds, 0.36),
        "combined": 0.5,
        "note": "",
    }
    # a colour per seed (never the sheet's red marker)
    return story_fakes.storyboard_output(images, mode, frame, (seeds * 2654435761) & 0x7F7F7F)


class RetryServer(story_fakes.StoryServer):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.nodes["CharForgeStoryboardSelect"].run = _planted_select


@pytest.fixture(autouse=True)
def no_user_config(monkeypatch, tmp_path):
    monkeypatch.setenv("CHARFORGE_CONFIG", str(tmp_path / "no-config.yaml"))
    for var in ("CHARFORGE_SERVER", "CHARFORGE_PROFILE", "CHARFORGE_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def _story(tmp_path: Path, out: Path, *extra: str) -> tuple[int, str, str, list[dict]]:
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32), (200, 30, 10)).save(refs / "ref0.png")
    scenes = tmp_path / "scenes.txt"
    scenes.write_text("\n".join(SCENES) + "\n")
    with RetryServer() as server:
        code, stdout, stderr = run_cli(
            "story",
            "--server",
            server.url,
            "--scenes",
            str(scenes),
            "--lora",
            "hero.safetensors:0.8",
            "--trigger",
            "ohwx",
            "--reference",
            str(refs),
            "--mode",
            "simple",
            "--no-base",
            "--candidates",
            "1",
            "--seed",
            str(SEED),
            "--width",
            "64",
            "--height",
            "48",
            "--out",
            str(out),
            *extra,
        )
        return code, stdout, stderr, server.prompts()


def _red_pixels(path: Path) -> int:
    with Image.open(path) as sheet:
        pixels = np.asarray(sheet.convert("RGB"))
    return int(np.all(pixels == np.array(NOT_PASSED, dtype=np.uint8), axis=-1).sum())


def test_low_scoring_frames_are_regenerated_recorded_and_marked(tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr, prompts = _story(tmp_path, out)  # the defaults: 2 retries, CLIPScore 0.70
    assert code == 0, stderr
    seeds = [p["6"]["inputs"]["seed"] for p in prompts]
    assert seeds == [
        SEED,
        SEED + 1,
        attempt_seed(SEED + 1, 1),
        SEED + 2,
        attempt_seed(SEED + 2, 1),
        attempt_seed(SEED + 2, 2),
        SEED + 3,
        attempt_seed(SEED + 3, 1),
        attempt_seed(SEED + 3, 2),
        SEED + 4,
        SEED + 5,
    ]
    data = json.loads((out / "simple" / "metadata.json").read_text())
    frames = data["frames"]
    assert [len(f["attempts"]) for f in frames] == [1, 2, 3, 3, 1, 1]
    assert [f["passed"] for f in frames] == [True, True, False, False, True, True]
    assert [a["passed"] for a in frames[1]["attempts"]] == [False, True]
    assert [a["text"] for a in frames[2]["attempts"]] == [0.12, 0.22, 0.18]
    assert [a["clipscore"] for a in frames[2]["attempts"]] == [0.3, 0.55, 0.45]
    assert "CLIPScore 0.30 < 0.70" in frames[2]["attempts"][0]["why"]
    # the best attempt is kept: frame 2 its passing 2nd, frame 3 its highest-scoring 2nd
    assert frames[1]["seed"] == attempt_seed(SEED + 1, 1) and frames[1]["text"] == 0.33
    assert frames[2]["seed"] == attempt_seed(SEED + 2, 1) and frames[2]["text"] == 0.22
    assert all(f["image"] == f"frame_{i + 1:02d}.png" for i, f in enumerate(frames))
    folder = out / "simple"
    with Image.open(folder / "frame_03.png") as kept, Image.open(folder / "frame_03_try2.png") as second:
        assert kept.convert("RGB").getpixel((5, 5)) == second.convert("RGB").getpixel((5, 5))
    with Image.open(folder / "frame_03_try1.png") as first, Image.open(folder / "frame_03.png") as kept:
        assert first.convert("RGB").getpixel((5, 5)) != kept.convert("RGB").getpixel((5, 5))
    assert frames[3]["seed"] == SEED + 3 and frames[3]["attempts"][0]["image"] == "frame_04_try1.png"
    with Image.open(folder / "frame_04.png") as kept, Image.open(folder / "frame_04_try1.png") as first:
        assert kept.convert("RGB").getpixel((5, 5)) == first.convert("RGB").getpixel((5, 5))
    assert not (folder / "frame_01_try1.png").exists()  # one attempt: just the frame
    retries = data["settings"]["retries"]  # no character threshold: ArcFace's "same person" 0.32
    assert (retries["retries"], retries["min_text"], retries["min_identity"]) == (2, 0.7, 0.32)
    assert any("frame(s) 3, 4 never passed" in n for n in data["notes"])
    assert "never passed" in stdout + stderr
    assert _red_pixels(folder / "sheet.png") > 2 * 4 * 320  # a 4 px border round the thumbnail, badge, legend


def test_a_rerun_does_not_redo_recorded_attempts(tmp_path):
    out = tmp_path / "out"
    code, _, stderr, prompts = _story(tmp_path, out, "--retries", "2")
    assert code == 0 and len(prompts) == 11, stderr
    first = json.loads((out / "simple" / "metadata.json").read_text())["frames"]
    code, stdout, stderr, prompts = _story(tmp_path, out, "--retries", "2")  # the same again: nothing queued
    assert code == 0 and prompts == [], stderr
    assert (stdout + stderr).count("recorded by an earlier run") == 11
    again = json.loads((out / "simple" / "metadata.json").read_text())["frames"]
    assert [f["attempts"] for f in again] == [f["attempts"] for f in first]
    with (
        Image.open(out / "simple" / "frame_03.png") as kept,
        Image.open(out / "simple" / "frame_03_try2.png") as b,
    ):
        assert kept.convert("RGB").getpixel((5, 5)) == b.convert("RGB").getpixel((5, 5))
    # one more retry allowed: only frame 3's 4th attempt is queued (and passes)
    code, _, stderr, prompts = _story(tmp_path, out, "--retries", "3")
    assert code == 0, stderr
    assert [p["6"]["inputs"]["seed"] for p in prompts] == [
        attempt_seed(SEED + 2, 3),
        attempt_seed(SEED + 3, 3),
    ]
    frame3 = json.loads((out / "simple" / "metadata.json").read_text())["frames"][2]
    assert frame3["passed"] is True and [a["passed"] for a in frame3["attempts"]] == [False] * 3 + [True]


def test_retries_zero_disables_and_thresholds_are_configurable(tmp_path):
    out = tmp_path / "off"
    code, _, stderr, prompts = _story(tmp_path, out, "--retries", "0")
    assert code == 0, stderr
    assert [p["6"]["inputs"]["seed"] for p in prompts] == list(range(SEED, SEED + 6))
    data = json.loads((out / "simple" / "metadata.json").read_text())
    assert all(f["attempts"] == [] and f["passed"] is None for f in data["frames"])
    assert "retries" not in data["settings"] and _red_pixels(out / "simple" / "sheet.png") == 0

    low = tmp_path / "low"  # a threshold every first attempt meets: no regeneration
    code, _, stderr, prompts = _story(tmp_path, low, "--retries", "2", "--min-text", "0.25")
    assert code == 0, stderr
    assert len(prompts) == 6
    data = json.loads((low / "simple" / "metadata.json").read_text())
    assert all(f["passed"] for f in data["frames"])
    assert _red_pixels(low / "simple" / "sheet.png") == 0

    code, _, err, _ = _story(tmp_path, tmp_path / "bad", "--retries", "-1")
    assert code == 2 and "--retries" in err
    code, _, err, _ = _story(tmp_path, tmp_path / "bad", "--min-text", "3")  # above CLIPScore's 2.5
    assert code == 2 and "CLIPScore" in err


def test_failures_and_attempt_seeds():
    class Frame:
        def __init__(self, identity, text):
            self.identity, self.text = identity, text

    policy = RetryPolicy(retries=2, min_text=0.7, min_identity=0.5)
    assert failures(Frame(0.6, 0.29), policy) == []  # CLIPScore 0.725
    assert failures(Frame(0.4, None), policy) == ["identity 0.40 < 0.50"]  # text not measured: not a failure
    assert failures(Frame(None, 0.2), policy) == ["CLIPScore 0.50 < 0.70 (cosine 0.200)", "no face"]
    assert failures(Frame(0.6, -0.3), policy) == ["CLIPScore 0.00 < 0.70 (cosine -0.300)"]
    assert failures(Frame(None, 0.1), RetryPolicy(min_text=None)) == []
    assert attempt_seed(7, 0) == 7 and attempt_seed(7, 2) == 7 + 2 * 1_000_003
    assert attempt_seed(2**64 - 1, 1) == 1_000_002
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError, match="CLIPScore"):
        RetryPolicy(min_text=2.6)
    assert RetryPolicy().retries == 2 and RetryPolicy().min_text == 0.70
