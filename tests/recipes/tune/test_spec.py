"""The search file of ``charforge tune`` (recipes/tune/spec.py) and the samplers it configures; no server."""

from __future__ import annotations

import pytest

from charforge.driver.errors import UsageError
from charforge.recipes.tune.spec import METRICS, load_spec, parse_spec

optuna = pytest.importorskip("optuna")

BASE = {
    "character": "hero",
    "workflow": "train.json",
    "space": {
        "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
        "rank": [8, 16, 32],
        "steps": {"low": 500, "high": 2000, "step": 250},
        "caption_dropout": {"low": 0.0, "high": 0.2},
        "train_text_encoder": [False, True],
    },
}


def test_a_full_search_file_parses(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("""
name: alice_tune
character: alice
workflow: flows/train.json
fixed: {schedule: constant}
space:
  learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}
  rank: [8, 16, 32]
  steps: {low: 500, high: 2000, step: 250}
objectives: [identity, text, diversity]
budget: {trials: 30, hours: 6, dollars: 20}
pruning: {segments: 3}
eval: {scenes: [portrait, at the beach], seeds: [1, 2, 3], strength: 0.9}
start: [{learning_rate: 1.0e-4, rank: 16}]
""")
    spec = load_spec(path)
    assert spec.workflow == tmp_path / "flows" / "train.json" and spec.name == "alice_tune"
    assert [p.kind for p in spec.space] == ["float", "choice", "int"]
    assert spec.space[0].log and spec.space[2].step == 250
    assert spec.multi and spec.sampler == "nsga2" and spec.directions == ["maximize"] * 3
    assert spec.budget.trials == 30 and spec.budget.hours == 6 and spec.pruning.enabled
    assert spec.eval.strength == 0.9 and spec.start == [{"learning_rate": 1e-4, "rank": 16}]


def test_defaults_and_settings_of_a_trial():
    spec = parse_spec(dict(BASE, fixed={"schedule": "constant"}))
    assert spec.objectives == ["combined"] and spec.sampler == "tpe" and not spec.pruning.enabled
    assert spec.name == "hero_tune" and spec.budget.trials == 20
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    settings = spec.settings(trial)
    assert settings["schedule"] == "constant" and 1e-5 <= settings["learning_rate"] <= 1e-3
    assert (
        settings["rank"] in (8, 16, 32)
        and settings["steps"] % 250 == 0
        and isinstance(settings["steps"], int)
    )
    assert isinstance(settings["train_text_encoder"], bool)
    # a trial taken up again gets the values it had
    again = optuna.trial.Trial(study, trial._trial_id)
    assert spec.settings(again) == settings


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"space": {"learning_rate": {"low": 0, "high": 1e-3, "log": True}}},
            "log-uniform range needs low > 0",
        ),
        ({"space": {"rank": {"low": 32, "high": 8}}}, "must be below high"),
        ({"space": {"rank": []}}, "non-empty list"),
        ({"objectives": ["beauty"]}, "choose distinct names"),
        ({"sampler": "cmaes"}, "choose tpe, nsga2, random"),
        ({"budget": {"trials": 0}}, "at least 1"),
        ({"budget": {"minutes": 3}}, "unknown key(s) minutes"),
        ({"pruning": {"pruner": "hyperband"}}, "choose median, halving, none"),
        ({"eval": {"scenes": ["one"], "seeds": [1]}}, "at least 2 images"),
        ({"fixed": {"rank": 16}}, "both fixed and searched"),
        ({"start": [{"alpha": 4}]}, "alpha is not searched"),
        ({"name": "a b"}, "letters, digits"),
        ({"colour": "red"}, "unknown key(s) colour"),
        ({"weights": {"identity": -1}}, ">= 0"),
    ],
)
def test_mistakes_are_named(change, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(dict(BASE, **change))


def test_required_keys():
    for key in ("character", "workflow", "space"):
        with pytest.raises(UsageError, match=f"'{key}' is required"):
            parse_spec({k: v for k, v in BASE.items() if k != key})


def test_every_metric_has_a_direction():
    assert set(METRICS.values()) == {"maximize", "minimize"}
    assert METRICS["cmmd"] == "minimize" and METRICS["identity"] == "maximize"


def test_the_configured_tpe_finds_a_planted_optimum_more_often_than_random():
    """The sampler `charforge tune` makes, on the fake server's planted objective without a server: over 12
    seeds of a 12-trial search, TPE ends nearer the optimum more often than random search."""
    from fakes.tune_server import BROKEN_LR, distance

    from charforge.recipes.tune.search import make_sampler

    def objective(lr: float, rank: int) -> float:
        return (
            0.0
            if lr > BROKEN_LR
            else 1.0 - 0.6 * min(1.0, 0.5 * distance({"learning_rate": lr, "rank": rank}))
        )

    def found(sampler_name: str, seed: int) -> bool:
        spec = parse_spec(
            dict(
                BASE,
                space={"learning_rate": {"low": 1e-5, "high": 1e-2, "log": True}, "rank": [4, 8, 16, 32, 64]},
                sampler=sampler_name,
                seed=seed,
                budget={"trials": 12},
            )
        )
        study = optuna.create_study(direction="maximize", sampler=make_sampler(spec, 0))
        for _ in range(12):
            trial = study.ask()
            values = spec.settings(trial)
            study.tell(trial, objective(values["learning_rate"], values["rank"]))
        return distance(study.best_params) < 0.6

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tpe = sum(found("tpe", seed) for seed in range(12))
    rand = sum(found("random", seed) for seed in range(12))
    assert tpe > rand and tpe >= 8, (tpe, rand)


def test_a_training_segment_graph(tmp_path):
    """The trial's settings land in the Train LoRA node: basic ones as inputs (winning over the workflow's
    overrides JSON), the rest merged into that JSON; the segment's steps; resume and use_preset_values set."""
    import json

    from fakes.tune_server import write_train_workflow

    from charforge.recipes.tune.trials import TrainGraph

    workflow = write_train_workflow(tmp_path / "train.json")
    graph = json.loads(workflow.read_text())
    graph["1"]["inputs"]["overrides"] = json.dumps({"learning_rate": 1.0, "steps": 900, "flip": True})
    workflow.write_text(json.dumps(graph))
    spec = parse_spec(
        dict(BASE, workflow=str(workflow), set={"Train LoRA (CharForge).dataset_folder": "x/img"})
    )
    train = TrainGraph(spec)
    assert train.settings_value({}, "steps") == 900  # the JSON's, as the node would use it
    made = train.segment_graph(
        "t_0001", {"learning_rate": 2e-4, "rank": 8, "optimizer": "adamw"}, 300, {"sample_every": 0}
    )
    inputs = made["1"]["inputs"]
    extra = json.loads(inputs["overrides"])
    assert (inputs["learning_rate"], inputs["rank"], inputs["steps"]) == (2e-4, 8, 300)
    assert extra == {"flip": True, "optimizer": "adamw", "sample_every": 0}
    assert inputs["dataset_folder"] == "x/img" and inputs["output_name"] == "t_0001"
    assert inputs["resume"] == "auto" and inputs["use_preset_values"] is False
    assert train.graph["1"]["inputs"]["output_name"] == "hero"  # the loaded workflow is untouched
