"""``charforge tune`` on the planted fake ComfyUI (tests/fakes/tune_server.py) with a tiny face pack and CLIP.

The fake's Train LoRA makes LoRAs whose faces drift from the character's as the settings move away from a hidden
optimum, and learning rates above a limit lose the face entirely; so which trials are good is known in advance
while the search, the batch runner, the scoring and the report are the real ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fakes.tune_server import (  # noqa: F401
    BROKEN_LR,
    TuneServer,
    distance,
    env_fixture,
    models_fixture,
    run_cli,
    write_search,
)
from PIL import Image

from cf_testing.comfyui import REPO_ROOT

pytest.importorskip("optuna")
pytest.importorskip("insightface")

REPO = REPO_ROOT


def trials_of(out: Path) -> list[dict]:
    return json.loads((out / "trials.json").read_text())["trials"]


# ---- the search finds the planted optimum; the report -------------------------------------------------------


@pytest.mark.slow
def test_search_finds_the_planted_optimum_and_writes_the_report(env):
    search = write_search(env / "search.yaml", budget={"trials": 10})
    out = env / "tune"
    with TuneServer() as server:
        code, stdout, stderr = run_cli(
            "tune", str(search), "--out", str(out), "--server", server.url, "--loras-dir", str(env / "loras")
        )
        assert code == 0, stderr
        graphs = [
            g for _, g in server.executed if any(n["class_type"] == "CharForgeTrainLoRA" for n in g.values())
        ]

    trials = trials_of(out)
    assert len(trials) == 10 and all(t["state"] == "complete" for t in trials)
    # the planted objective: trials nearer the optimum score higher
    near = [t["scores"]["combined"] for t in trials if distance(t["settings"]) < 0.6]
    far = [t["scores"]["combined"] for t in trials if distance(t["settings"]) > 1.2]
    assert near and far and min(near) > max(far)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert distance(best["settings"]) < 0.6, best
    assert best["scores"]["combined"] == max(t["scores"]["combined"] for t in trials)

    # what was trained: the trial's settings as the Train LoRA inputs, the rest in its overrides JSON
    assert len(graphs) == 10
    for graph in graphs:
        inputs = graph["1"]["inputs"]
        extra = json.loads(inputs["overrides"])
        assert inputs["use_preset_values"] is False and inputs["resume"] == "auto" and inputs["steps"] == 300
        assert inputs["output_name"].startswith("hero_tune_t") and inputs["dataset_folder"] == "hero/img"
        assert extra["schedule"] == "constant" and extra["sample_prompts"][0].startswith(
            "hero_cf, photo of a woman"
        )
    assert {t["settings"]["rank"] for t in trials} <= {4, 8, 16, 32, 64}

    # the report
    for name in (
        "report.html",
        "trials.json",
        "best.yaml",
        "report/pareto.png",
        "report/importances.png",
        "report/history.png",
        "report/best_grid.png",
    ):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "Pareto front" in html and f"trial {best['trial']}" in html and "learning_rate" in html
    with Image.open(out / "report" / "best_grid.png") as grid:
        assert grid.width > 4 * 100 and grid.height > 160
    assert (out / "trials" / f"{best['trial']:04d}" / "eval" / "grid.png").is_file()
    # the best LoRA copied (downloaded from its server) and a preset pointing at it
    copied = env / "loras" / best["lora"]
    assert copied.read_bytes().startswith(b"fake lora ") and best["copied_to"] == str(copied)
    preset = yaml.safe_load((env / "charforge" / "characters" / "hero_tuned.yaml").read_text())
    assert preset["loras"][0]["name"] == best["lora"] and preset["prompt"] == "photo of a woman"
    assert "best: trial" in stdout and "report:" in stdout

    # running it again: nothing new is trained, rendered or copied
    with TuneServer() as again:
        code, stdout, stderr = run_cli(
            "tune", str(search), "--out", str(out), "--server", again.url, "--loras-dir", str(env / "loras")
        )
        assert code == 0, stderr
        assert again.trainings == [] and again.renders == []
    assert len(trials_of(out)) == 10 and yaml.safe_load((out / "best.yaml").read_text()) == best
    assert sorted(p.name for p in (env / "loras").iterdir()) == [best["lora"]]
    assert not (env / "charforge" / "characters" / "hero_tuned_2.yaml").exists()


def test_several_objectives_give_a_pareto_front(env):
    """NSGA-II over identity, text agreement and CLIP-feature MMD to the references (pruning is off then)."""
    search = write_search(
        env / "search.yaml",
        objectives=["identity", "text", "cmmd"],
        budget={"trials": 5},
        pruning={"segments": 2},
    )
    out = env / "tune"
    with TuneServer() as server:
        code, stdout, stderr = run_cli(
            "tune", str(search), "--out", str(out), "--server", server.url, "--json"
        )
        assert code == 0, stderr
        assert sorted(name for name, _, _ in server.trainings) == [f"hero_tune_t{n:04d}" for n in range(5)]
    data = json.loads((out / "trials.json").read_text())
    assert data["directions"] == ["maximize", "maximize", "minimize"]
    front = data["pareto_front"]
    assert front and all(t["values"] is not None and len(t["values"]) == 3 for t in data["trials"])
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["trial"] in front
    record = json.loads(stdout.strip().splitlines()[-1])
    assert record["event"] == "result" and len(record["best_values"]) == 3
    assert "pruning is off" in stdout  # JSON mode: notes are message records


# ---- pruning ---------------------------------------------------------------------------------------------


def test_pruning_stops_planted_bad_trials_after_their_first_segment(env):
    good, bad = 3e-4, 8e-3
    assert bad > BROKEN_LR
    # A good trial first (the search file's start point), then the random sampler; the median of the finished
    # trials' first-segment scores is a good one's, so every bad trial after it is stopped there.
    search = write_search(
        env / "search.yaml",
        sampler="random",
        seed=5,
        budget={"trials": 7},
        space={"learning_rate": [good, bad]},
        fixed={"schedule": "constant", "rank": 16},
        start=[{"learning_rate": good}],
        pruning={"segments": 3, "pruner": "median", "startup_trials": 1},
    )
    out = env / "tune"
    with TuneServer() as server:
        code, _, stderr = run_cli(
            "tune", str(search), "--out", str(out), "--server", server.url, "--no-report"
        )
        assert code == 0, stderr
        trainings = server.trainings
    study = _study(out)
    by_number = sorted(study.get_trials(), key=lambda t: t.number)
    steps = {
        t.number: [s for name, s, _ in trainings if name == f"hero_tune_t{t.number:04d}"] for t in by_number
    }
    seen_good = False
    pruned_bad = 0
    for t in by_number:
        lr = t.params["learning_rate"]
        if lr == good:
            assert t.state.name == "COMPLETE" and steps[t.number] == [100, 200, 300], (
                t.number,
                steps[t.number],
            )
            seen_good = True
        elif seen_good:  # a bad trial once a good one finished: stopped after segment 1 (100 of 300 steps)
            assert t.state.name == "PRUNED" and steps[t.number] == [100], (t.number, t.state, steps[t.number])
            assert t.intermediate_values == {1: pytest.approx(0.0)}
            pruned_bad += 1
    assert by_number[0].params["learning_rate"] == good  # the start point came first
    assert pruned_bad >= 2, [(t.number, t.params, t.state.name) for t in by_number]
    assert "pruned" in stderr


def _study(out: Path):
    import optuna

    return optuna.load_study(study_name="hero_tune", storage=f"sqlite:///{out / 'study.db'}")


# ---- two servers ------------------------------------------------------------------------------------------


def test_trials_spread_over_two_servers_and_stay_on_theirs(env):
    search = write_search(env / "search.yaml", budget={"trials": 4})
    out = env / "tune"
    with TuneServer(train_seconds=0.4) as a, TuneServer(train_seconds=0.4) as b:
        code, _, stderr = run_cli(
            "tune", str(search), "--out", str(out), "--server", a.url, "--server", b.url, "--no-report"
        )
        assert code == 0, stderr
        trained = {a.url: {name for name, _, _ in a.trainings}, b.url: {name for name, _, _ in b.trainings}}
        rendered = {a.url: {lora for lora, _, _ in a.renders}, b.url: {lora for lora, _, _ in b.renders}}
    study = _study(out)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert trained[a.url] and trained[b.url] and not trained[a.url] & trained[b.url]
    for t in trials:
        home = t.user_attrs["server"].rstrip("/")
        url = next(u for u in trained if u.rstrip("/") == home)
        assert f"hero_tune_t{t.number:04d}" in trained[url]
        assert t.user_attrs["lora"] in rendered[url]  # its evaluation ran where its LoRA is


# ---- killed mid-search, resumed ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_search_killed_mid_way_resumes_without_running_finished_trials_again(env):
    from optuna.trial import TrialState

    search = write_search(env / "search.yaml", budget={"trials": 5})
    out = env / "tune"
    child_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    with TuneServer(train_seconds=0.6) as server:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "charforge.recipes.cli",
                "tune",
                str(search),
                "--out",
                str(out),
                "--server",
                server.url,
                "--no-report",
            ],
            env=child_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.3)
            if (out / "study.db").exists():
                try:
                    states = [t.state for t in _study(out).get_trials()]
                except Exception:  # noqa: BLE001 - the child may be creating the study
                    continue
                if states.count(TrialState.COMPLETE) >= 2 and TrialState.RUNNING in states:
                    break  # two trials finished, one under way
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stderr.close()
        finished = {t.number for t in _study(out).get_trials() if t.state.is_finished()}
        running = {t.number for t in _study(out).get_trials(states=(TrialState.RUNNING,))}
        assert len(finished) >= 2 and len(finished) < 5
        before_train = list(server.trainings)
        before_render = list(server.renders)
        time.sleep(1.0)  # a job the killed driver left on the server finishes there

        code, _, stderr = run_cli(
            "tune", str(search), "--out", str(out), "--server", server.url, "--no-report"
        )
        assert code == 0, stderr
        after_train = server.trainings[len(before_train) :]
        after_render = server.renders[len(before_render) :]

    trials = _study(out).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4] and all(
        t.state.name == "COMPLETE" for t in trials
    )
    # finished trials were neither trained nor rendered again
    names = {name for name, _, _ in after_train} | {
        lora.removesuffix(".safetensors") for lora, _, _ in after_render
    }
    assert not names & {f"hero_tune_t{n:04d}" for n in finished}, (names, finished)
    # the trial left running was taken up, not started again (its training job ran once, on the server)
    assert running and f"resuming 1 trial(s) an earlier run left running: {min(running)}" in stderr
    for name, _, _ in after_train:
        assert sum(1 for n, _, _ in before_train + after_train if n == name) == 1, name


def test_the_time_budget_stops_the_search(env):
    search = write_search(env / "search.yaml", budget={"trials": 10, "hours": 0.0001})  # 0.36 s
    out = env / "tune"
    with TuneServer() as server:
        code, stdout, stderr = run_cli(
            "tune", str(search), "--out", str(out), "--server", server.url, "--no-report"
        )
    assert code == 0, stderr
    study = _study(out)
    trials = study.get_trials()
    # The budget is checked before each trial starts: how many fit into 0.36 s depends on the machine, but the
    # search stops well short of its 10 trials and no trial starts once the budget is spent.
    assert 1 <= len(trials) < 10 and "time budget spent (0.0001 h)" in stdout
    first = min(t.datetime_start for t in trials)
    assert all((t.datetime_start - first).total_seconds() < 0.36 for t in trials)
    assert study.user_attrs["elapsed_s"] > 0.36
