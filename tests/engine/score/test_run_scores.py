"""A CharForge training run's checkpoint scores kept in its run folder (engine/score/sets.py), as the panel reads
them (engine/train/run.py run_details)."""

import json
import os

from PIL import Image

from charforge.engine.score import SetSummary
from charforge.engine.score.sets import (
    checkpoint_groups,
    read_run_scores,
    record_run_scores,
    run_folder_of,
)
from charforge.engine.train.run import RunFolder, run_details

BASIS = {
    "identity": "alice",
    "clip_model": None,
    "threshold": None,
    "identity_weight": 1.0,
    "text_weight": 0.5,
}


def _run(tmp_path):
    folder = RunFolder.create(tmp_path / "runs", "alice")
    folder.samples_dir.mkdir()
    for step in (2, 4):
        for index in (0, 1):
            Image.new("RGB", (8, 8)).save(folder.sample_path(step, index))
    return folder


def _summary(name, combined, **extra):
    return SetSummary(
        name,
        2,
        faces=2,
        identity_mean=combined,
        identity_min=combined,
        identity_pass_rate=1.0,
        combined=combined,
        **extra,
    )


def test_charforge_sample_names_group_by_step(tmp_path):
    folder = _run(tmp_path)
    groups = checkpoint_groups(str(folder.samples_dir))
    assert sorted(groups) == ["000002", "000004"] and all(len(v) == 2 for v in groups.values())


def test_run_folder_only_for_a_charforge_runs_samples(tmp_path):
    folder = _run(tmp_path)
    assert run_folder_of(str(folder.samples_dir)) == os.path.realpath(folder.root)
    assert run_folder_of(str(folder.root)) is None
    other = tmp_path / "kohya" / "samples"
    other.mkdir(parents=True)
    assert run_folder_of(str(other)) is None  # no status.json next to it: not a CharForge run
    link = tmp_path / "linked_samples"
    os.symlink(folder.samples_dir, link)
    assert run_folder_of(str(link)) == os.path.realpath(folder.root)  # a link to a run's samples: that run


def test_scores_written_into_the_run_folder_and_read_back(tmp_path):
    folder = _run(tmp_path)
    before = set(os.listdir(tmp_path))
    data = record_run_scores(folder.root, [_summary("000002", 0.4), _summary("000004", 0.6)], BASIS)
    assert data["best"] == 4 and sorted(data["checkpoints"]) == ["2", "4"]
    assert json.loads((folder.root / "scores.json").read_text()) == data == read_run_scores(folder.root)
    entry = data["checkpoints"]["4"]
    assert entry["step"] == 4 and entry["identity_mean"] == 0.6 and entry["identity"] == "alice"
    # nothing else written: no temporary file left, nothing outside the run folder
    assert set(os.listdir(tmp_path)) == before
    assert not [n for n in os.listdir(folder.root) if n.endswith(".tmp")]

    details = run_details(folder)
    assert [s["step"] for s in details["scores"]] == [2, 4] and details["best_scored_step"] == 4
    assert details["scores"][1]["combined"] == 0.6


def test_scores_merge_with_earlier_results(tmp_path):
    folder = _run(tmp_path)
    record_run_scores(folder.root, [_summary("000002", 0.4), _summary("000004", 0.6)], BASIS)
    # step 4 scored again (worse now), step 6 added: step 2 stays, step 4 is replaced
    data = record_run_scores(folder.root, [_summary("000004", 0.3), _summary("step_6", 0.5)], BASIS)
    assert sorted(data["checkpoints"], key=int) == ["2", "4", "6"]
    assert data["checkpoints"]["2"]["combined"] == 0.4 and data["checkpoints"]["4"]["combined"] == 0.3
    assert data["best"] == 6
    # another identity: its numbers are not compared with the earlier ones
    data = record_run_scores(folder.root, [_summary("000002", 0.1)], {**BASIS, "identity": "bob"})
    assert data["best"] == 2 and data["checkpoints"]["2"]["identity"] == "bob"
    assert data["checkpoints"]["6"]["identity"] == "alice"


def test_a_run_without_scores_and_a_broken_file(tmp_path):
    folder = _run(tmp_path)
    details = run_details(folder)
    assert details["scores"] == [] and details["best_scored_step"] is None
    (folder.root / "scores.json").write_text("{not json")
    assert read_run_scores(folder.root) == {} and run_details(folder)["scores"] == []
    data = record_run_scores(folder.root, [_summary("000002", 0.4)], BASIS)  # a broken file is replaced
    assert data["best"] == 2
