"""The search file of ``charforge tune``: what to train, what to vary, how to judge, how much to spend.

A YAML file (all keys but ``character``, ``workflow`` and ``space`` optional)::

    name: alice_tune                      # the study; LoRAs are <name>_t0001.safetensors, ...
    character: alice                      # preset: prompt, trigger word, negative, size, reference photos
    workflow: train_lora_sd15.json        # a workflow with one Train LoRA node (relative to this file)
    set: {"Train LoRA (CharForge).dataset_folder": "alice/img"}   # fixed node inputs (charforge run --set)
    fixed: {schedule: constant, sample_steps: 20}                 # fixed training settings
    space:                                # training settings to search (Train LoRA inputs or override names)
      learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}
      rank: [8, 16, 32]                   # a list is a choice
      steps: {low: 500, high: 2000, step: 250}
      train_text_encoder: [false, true]
    objectives: [combined]                # or several of identity, text, diversity, cmmd, kid, copying, fid
    weights: {identity: 1.0, text: 0.5, diversity: 0.5}   # of the combined score
    sampler: tpe                          # tpe (one objective), nsga2 (several), random
    seed: 0
    budget: {trials: 20, hours: 24, dollars: 40}
    pruning: {segments: 3, pruner: median, startup_trials: 3}
    start: [{learning_rate: 1.0e-4, rank: 16}]   # settings tried first (e.g. what you use today)
    eval: {scenes: [...], seeds: [1, 2], strength: 1.0, checkpoint: v1-5-pruned-emaonly.safetensors}
    scoring: {face_pack: buffalo_l, clip: null, det_size: 640, reference: null}

Parsing is pure (no server, no torch); errors are :class:`~charforge.driver.errors.UsageError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from charforge.common.safe_yaml import UnsafeYaml, load_yaml
from charforge.driver.errors import UsageError

Direction = Literal["minimize", "maximize"]

# What a trial can be judged by, and which way is better.
METRICS: dict[str, Direction] = {
    "combined": "maximize",  # weighted identity + text (CLIPScore scale) + diversity (see docs/tune.md)
    "identity": "maximize",  # mean ArcFace similarity, images without a face counting 0
    "text": "maximize",  # mean CLIP image-prompt cosine
    "diversity": "maximize",  # mean pairwise CLIP cosine distance of the evaluation images
    "cmmd": "minimize",  # CLIP-feature MMD x 1000 to the reference photos
    "kid": "minimize",  # KID's estimator on CLIP features, to the reference photos
    "copying": "minimize",  # mean similarity of each image to its closest reference photo
    "fid": "minimize",  # only where pytorch_fid and its weights are present
}
DEFAULT_WEIGHTS = {"identity": 1.0, "text": 0.5, "diversity": 0.5}
SAMPLERS = ("tpe", "nsga2", "random")
PRUNERS = ("median", "halving", "none")
# Train LoRA inputs a trial sets directly; every other setting goes into its ``overrides`` JSON.
NODE_INPUTS = ("steps", "learning_rate", "rank", "resolution", "batch_size", "seed")
TRAIN_CLASS = "CharForgeTrainLoRA"

_KEYS = {
    "name",
    "character",
    "workflow",
    "train_node",
    "set",
    "fixed",
    "space",
    "objectives",
    "weights",
    "sampler",
    "seed",
    "budget",
    "pruning",
    "eval",
    "scoring",
    "start",
}


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range (``log`` for log-uniform, ``step`` for a grid) or choices."""

    name: str
    kind: str  # "float" | "int" | "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value for `trial` (an Optuna trial; a resumed trial gets the value it had)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None  # a range always has both
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {list(self.choices)}"
        scale = "log-uniform" if self.log else "uniform"
        return f"{self.kind} {self.low:g} .. {self.high:g} ({scale}{f', step {self.step:g}' if self.step else ''})"


@dataclass
class Budget:
    trials: int = 20
    hours: float | None = None  # wall-clock time of the search, over every run of it
    dollars: float | None = None  # estimated cost reported by priced servers (RunPod, Replicate)


@dataclass
class Pruning:
    segments: int = 1  # training in this many parts, scored in between (1: no pruning)
    pruner: str = "median"
    startup_trials: int = 2  # trials that always finish before any is pruned
    warmup_segments: int = 0  # segments that are never pruned

    @property
    def enabled(self) -> bool:
        return self.segments > 1 and self.pruner != "none"


@dataclass
class EvalSet:
    """The fixed evaluation renders of every trial: scenes x seeds with the trained LoRA at one strength."""

    scenes: list[str] = field(
        default_factory=lambda: [
            "portrait photo, looking at the camera",
            "upper body, standing outdoors in daylight",
            "sitting at a table in a cafe, side view",
        ]
    )
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    strength: float = 1.0
    checkpoint: str | None = None  # None: the Train LoRA node's base_model when it is a checkpoint file


@dataclass
class ScoringSpec:
    face_pack: str = "buffalo_l"
    face_models_dir: str | None = None
    det_size: int = 640
    clip: str | None = None  # None: the first CLIP folder; "none": identity only
    reference: str | None = None  # photo folder or identity; None: the preset's
    device: str | None = None


@dataclass
class TuneSpec:
    path: Path
    name: str
    character: str
    workflow: Path
    space: list[Param]
    train_node: str | None = None
    set: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    objectives: list[str] = field(default_factory=lambda: ["combined"])
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    sampler: str = "tpe"
    seed: int = 0
    budget: Budget = field(default_factory=Budget)
    pruning: Pruning = field(default_factory=Pruning)
    eval: EvalSet = field(default_factory=EvalSet)
    scoring: ScoringSpec = field(default_factory=ScoringSpec)
    start: list[dict[str, Any]] = field(default_factory=list)  # searched settings tried first

    @property
    def directions(self) -> list[Direction]:
        return [METRICS[m] for m in self.objectives]

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    def settings(self, trial: Any) -> dict[str, Any]:
        """The training settings of `trial`: the fixed ones, then the searched ones."""
        values = dict(self.fixed)
        for param in self.space:
            values[param.name] = param.suggest(trial)
        return values


def _where(source: str, key: str) -> str:
    return f"{source}: {key}"


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise UsageError(f"{what}: expected a number, got {value!r}")
    return float(value)


def parse_param(name: str, spec: Any, where: str) -> Param:
    """One entry of ``space``: a list (choices) or ``{low, high, log?, step?}`` / ``{choices: [...]}``."""
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise UsageError(f"{where}: give a list of choices or {{low: .., high: .., log: true}}, got {spec!r}")
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices", "type"})
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: low, high, log, step, choices, type)"
        )
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UsageError(f"{where}: choices must be a non-empty list")
        if any(not isinstance(c, (str, int, float, bool)) and c is not None for c in choices):
            raise UsageError(f"{where}: choices must be numbers, strings, true/false or null")
        return Param(name, "choice", choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise UsageError(f"{where}: a range needs low and high (or give choices)")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    if not low < high:
        raise UsageError(f"{where}: low ({low:g}) must be below high ({high:g})")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise UsageError(f"{where}: a log-uniform range needs low > 0, got {low:g}")
    step = _number(spec["step"], f"{where}.step") if spec.get("step") is not None else None
    if step is not None and (step <= 0 or log):
        raise UsageError(f"{where}: step must be > 0 and cannot be combined with log")
    kind = spec.get("type") or (
        "int"
        if all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("low", "high"))
        and not log
        and (step is None or float(step).is_integer())
        else "float"
    )
    if kind not in ("int", "float"):
        raise UsageError(f"{where}.type: int or float, got {kind!r}")
    return Param(name, kind, low, high, log, step)


def _section(data: dict[str, Any], key: str, cls: type, source: str) -> Any:
    raw = data.get(key) or {}
    if not isinstance(raw, dict):
        raise UsageError(f"{_where(source, key)}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UsageError(
            f"{_where(source, key)}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
        )
    try:
        return cls(**raw)
    except TypeError as exc:
        raise UsageError(f"{_where(source, key)}: {exc}") from None


def parse_spec(data: Any, source: str = "tune.yaml", base: Path | None = None) -> TuneSpec:
    """A :class:`TuneSpec` from the parsed YAML (relative paths are read from `base`)."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of settings (character, workflow, space, ...)")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise UsageError(
            f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}"
        )
    for key in ("character", "workflow", "space"):
        if not data.get(key):
            raise UsageError(f"{source}: '{key}' is required")
    base = base or Path(".")
    workflow = Path(str(data["workflow"])).expanduser()
    workflow = workflow if workflow.is_absolute() else base / workflow
    space_raw = data["space"]
    if not isinstance(space_raw, dict):
        raise UsageError(f"{_where(source, 'space')}: expected a mapping of setting -> range or choices")
    space = [parse_param(str(k), v, _where(source, f"space.{k}")) for k, v in space_raw.items()]
    fixed = data.get("fixed") or {}
    sets = data.get("set") or {}
    for key, value in (("fixed", fixed), ("set", sets)):
        if not isinstance(value, dict):
            raise UsageError(f"{_where(source, key)}: expected a mapping")
    both = sorted(set(fixed) & {p.name for p in space})
    if both:
        raise UsageError(f"{source}: {', '.join(both)} is both fixed and searched; keep it in one place")
    objectives = data.get("objectives") or ["combined"]
    if isinstance(objectives, str):
        objectives = [objectives]
    bad = [o for o in objectives if o not in METRICS]
    if bad or len(set(objectives)) != len(objectives):
        raise UsageError(
            f"{_where(source, 'objectives')}: {bad or objectives} - choose distinct names among "
            f"{', '.join(METRICS)}"
        )
    weights = dict(DEFAULT_WEIGHTS)
    raw_weights = data.get("weights") or {}
    if not isinstance(raw_weights, dict) or sorted(set(raw_weights) - set(DEFAULT_WEIGHTS)):
        raise UsageError(f"{_where(source, 'weights')}: a mapping of identity, text and diversity to numbers")
    for key, value in raw_weights.items():
        weights[key] = _number(value, _where(source, f"weights.{key}"))
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise UsageError(f"{_where(source, 'weights')}: weights must be >= 0 and not all 0")
    sampler = str(data.get("sampler") or ("nsga2" if len(objectives) > 1 else "tpe")).lower()
    if sampler not in SAMPLERS:
        raise UsageError(f"{_where(source, 'sampler')}: {sampler!r}; choose {', '.join(SAMPLERS)}")
    budget = _section(data, "budget", Budget, source)
    if budget.trials is None or int(budget.trials) < 1:
        raise UsageError(f"{_where(source, 'budget.trials')}: at least 1")
    budget.trials = int(budget.trials)
    pruning = _section(data, "pruning", Pruning, source)
    if pruning.pruner not in PRUNERS:
        raise UsageError(
            f"{_where(source, 'pruning.pruner')}: {pruning.pruner!r}; choose {', '.join(PRUNERS)}"
        )
    pruning.segments = max(1, int(pruning.segments))
    evaluation = _section(data, "eval", EvalSet, source)
    evaluation.scenes = [str(s).strip() for s in evaluation.scenes if str(s).strip()]
    evaluation.seeds = [int(s) for s in evaluation.seeds]
    if not evaluation.scenes or not evaluation.seeds:
        raise UsageError(f"{_where(source, 'eval')}: at least one scene and one seed")
    if len(evaluation.scenes) * len(evaluation.seeds) < 2:
        raise UsageError(
            f"{_where(source, 'eval')}: at least 2 images (scenes x seeds) so diversity can be measured"
        )
    start = data.get("start") or []
    names = {p.name for p in space}
    if not isinstance(start, list) or not all(isinstance(s, dict) for s in start):
        raise UsageError(f"{_where(source, 'start')}: a list of mappings of searched setting -> value")
    for i, point in enumerate(start):
        extra = sorted(set(point) - names)
        if extra:
            raise UsageError(
                f"{_where(source, f'start[{i}]')}: {', '.join(extra)} is not searched (space has "
                f"{', '.join(sorted(names))})"
            )
    name = str(data.get("name") or f"{data['character']}_tune")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UsageError(
            f"{_where(source, 'name')}: letters, digits, _ . - only (it names the LoRA files), got {name!r}"
        )
    return TuneSpec(
        path=base / Path(source).name,
        name=name,
        character=str(data["character"]),
        workflow=workflow,
        space=space,
        train_node=data.get("train_node"),
        set=dict(sets),
        fixed=dict(fixed),
        objectives=list(objectives),
        weights=weights,
        sampler=sampler,
        seed=int(data.get("seed") or 0),
        budget=budget,
        pruning=pruning,
        eval=evaluation,
        scoring=_section(data, "scoring", ScoringSpec, source),
        start=[dict(p) for p in start],
    )


def load_spec(path: str | Path) -> TuneSpec:
    """Read and check a search file."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{p}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = load_yaml(text)
    except UnsafeYaml as exc:
        raise UsageError(f"{p}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - yaml's errors carry the line
        raise UsageError(f"{p}: not valid YAML: {exc}") from None
    spec = parse_spec(data, p.name, p.parent)
    spec.path = p
    return spec
