"""Batch files: plan many runs of a workflow (``charforge batch plan FILE``).

Two kinds of file expand to a list of :class:`Job` records:

* **JSON Lines** (``.jsonl``/``.ndjson``): one job per line, ``{"workflow": PATH}`` or ``{"prompt": {...}}``
  (an inline API graph), with optional ``set`` (a dict ``{"NODE.INPUT": value}`` or a list of
  ``"NODE.INPUT=VALUE"``), ``inputs``, ``tags`` and ``name``.
* **Sweep spec** (YAML or JSON): one ``workflow`` template, ``axes`` (lists or ``{start, stop, step}`` ranges,
  stop inclusive), the cartesian product of the axes except those tied together in ``zip`` groups, and an
  optional ``seed`` policy (``fixed``, ``increment`` from a base, ``random`` drawn from a recorded master seed).

Overrides are addressed exactly as ``charforge run --set`` and checked with the same code
(:func:`~charforge.driver.workflow.apply_overrides`). Job ids hash the workflow and the overrides, so
planning the same file twice gives the same ids. Nothing here contacts a server.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import random
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charforge.common.safe_yaml import UnsafeYaml, load_yaml

from ..errors import OverrideError, UsageError, WorkflowError
from ..workflow.load import load_workflow, workflow_from_data
from ..workflow.overrides import Override, apply_overrides, parse_set

SEED_POLICIES = ("fixed", "increment", "random")


class BatchError(UsageError):
    """A batch file cannot be read or expanded."""


@dataclass
class Job:
    """One planned run."""

    id: str
    name: str
    folder: str
    workflow: str | None = None
    prompt: dict[str, Any] | None = None
    overrides: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    axes: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "folder": self.folder}
        if self.workflow is not None:
            out["workflow"] = self.workflow
        else:
            out["prompt"] = self.prompt
        out.update(set=self.overrides, inputs=self.inputs, tags=self.tags, axes=self.axes, seed=self.seed)
        if self.line is not None:
            out["line"] = self.line
        return out


@dataclass
class BatchPlan:
    """The expanded jobs of a batch file, plus what makes it reproducible (the master seed)."""

    source: str
    kind: str
    jobs: list[Job]
    master_seed: int | None = None


# ------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------


def safe_name(value: Any, limit: int = 48) -> str:
    """A file-system-safe folder name for a value (``a cat, smiling`` -> ``a-cat-smiling``)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")
    return text[:limit].rstrip("-.") or "_"


def value_text(value: Any) -> str:
    """An axis value as text: a string as it is, anything else as JSON (``0.5``, ``[1, 2]``)."""
    return value if isinstance(value, str) else json.dumps(value)


def _override(address: str, value: Any, where: str) -> Override:
    """An :class:`Override` for ``address`` (``NODE.INPUT``) with an already typed value."""
    try:
        ov = parse_set(f"{address}=x")
    except OverrideError as exc:
        raise BatchError(f"{where}: {exc}") from None
    ov.value, ov.raw = value, value_text(value)
    ov.text = f"{address}={ov.raw}"
    return ov


def _overrides(spec: Any, where: str) -> list[Override]:
    if spec is None:
        return []
    if isinstance(spec, dict):
        return [_override(str(k), v, where) for k, v in spec.items()]
    if isinstance(spec, list) and all(isinstance(s, str) for s in spec):
        try:
            return [parse_set(s) for s in spec]
        except OverrideError as exc:
            raise BatchError(f"{where}: {exc}") from None
    raise BatchError(
        f'{where}: \'set\' must be an object {{"NODE.INPUT": value}} or a list of "NODE.INPUT=VALUE" strings'
    )


def _check(prompt: dict[str, Any] | None, overrides: list[Override], where: str) -> None:
    """Validate the addresses against the workflow's nodes (editor workflows are checked when run)."""
    if prompt is None or not overrides:
        return
    try:
        apply_overrides(prompt, overrides)
    except OverrideError as exc:
        raise BatchError(f"{where}: {exc}") from None


def job_id(
    workflow: str | None,
    prompt: dict[str, Any] | None,
    overrides: list[Override],
    inputs: dict[str, Any] | None = None,
) -> str:
    """Stable id: a hash of the workflow (path or graph), the overrides and the inputs."""
    key = {
        "workflow": workflow if workflow is not None else prompt,
        "set": [[o.node, o.input, o.value] for o in overrides],
        "inputs": inputs or {},
    }
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _load(path: Path, where: str) -> dict[str, Any] | None:
    try:
        return load_workflow(path).prompt
    except WorkflowError as exc:
        raise BatchError(f"{where}: {exc}") from None


# ------------------------------------------------------------------------------------------------------------
# JSON Lines
# ------------------------------------------------------------------------------------------------------------

_JOB_KEYS = {"workflow", "prompt", "set", "inputs", "tags", "name"}


def parse_jsonl(text: str, source: str = "batch.jsonl", base: Path | None = None) -> BatchPlan:
    """Expand a JSON Lines batch: one job per non-blank line (``#`` lines are comments)."""
    base = base or Path(".")
    jobs: list[Job] = []
    cache: dict[str, dict[str, Any] | None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{source}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BatchError(f"{where}: not valid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(data, dict):
            raise BatchError(f"{where}: expected a JSON object per line, found {type(data).__name__}")
        unknown = sorted(set(data) - _JOB_KEYS)
        if unknown:
            raise BatchError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_JOB_KEYS))}"
            )
        if ("workflow" in data) == ("prompt" in data):
            raise BatchError(
                f"{where}: give exactly one of 'workflow' (a path) or 'prompt' (an inline graph)"
            )
        workflow, prompt = None, None
        if "workflow" in data:
            if not isinstance(data["workflow"], str):
                raise BatchError(f"{where}: 'workflow' must be a path string")
            workflow = data["workflow"]
            if workflow not in cache:
                path = Path(workflow).expanduser()
                cache[workflow] = _load(path if path.is_absolute() else base / path, where)
            graph = cache[workflow]
        else:
            try:
                graph = prompt = workflow_from_data(data["prompt"], where).prompt
            except WorkflowError as exc:
                raise BatchError(str(exc)) from None
        overrides = _overrides(data.get("set"), where)
        _check(graph, overrides, where)
        inputs = data.get("inputs") or {}
        tags = data.get("tags") or []
        if not isinstance(inputs, dict):
            raise BatchError(f"{where}: 'inputs' must be an object {{\"NODE[.INPUT]\": path}}")
        if not isinstance(tags, list):
            raise BatchError(f"{where}: 'tags' must be a list")
        jid = job_id(workflow, prompt, overrides, inputs)
        name = str(data.get("name") or jid)
        jobs.append(
            Job(
                jid,
                name,
                safe_name(name),
                workflow,
                prompt,
                [o.text for o in overrides],
                inputs,
                [str(t) for t in tags],
                line=number,
            )
        )
    _dedupe_folders(jobs)
    _distinct_training_names(jobs, lambda job: job.prompt or cache.get(job.workflow or ""))
    return BatchPlan(source, "jsonl", jobs)


def _distinct_training_names(jobs: list[Job], graph_of: Any) -> None:
    """Jobs that would train the same LoRA name get their own (:func:`~..sync.training.distinct_training_names`)."""
    from ..sync.training import distinct_training_names

    extra = distinct_training_names([(job.id, graph_of(job), job.overrides) for job in jobs])
    for job in jobs:
        job.overrides += extra.get(job.id, [])


def _dedupe_folders(jobs: list[Job]) -> None:
    seen: dict[str, int] = {}
    for job in jobs:
        if job.folder in seen:
            seen[job.folder] += 1
            job.folder = f"{job.folder}-{seen[job.folder]}"
        else:
            seen[job.folder] = 1


# ------------------------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------------------------


def expand_range(spec: dict[str, Any], where: str) -> list[Any]:
    """``{start, stop, step}`` with ``stop`` included when the steps land on it; ints stay ints."""
    try:
        start, stop = spec["start"], spec["stop"]
    except KeyError as exc:
        raise BatchError(f"{where}: a range needs 'start' and 'stop' (and optionally 'step')") from exc
    step = spec.get("step", 1)
    nums = (start, stop, step)
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in nums):
        raise BatchError(f"{where}: range start/stop/step must be numbers")
    if step == 0 or (stop - start) * step < 0:
        raise BatchError(f"{where}: step {step} never gets from {start} to {stop}")
    count = int((stop - start) / step + 1e-9) + 1
    if all(isinstance(n, int) for n in nums):
        return [start + i * step for i in range(count)]
    return [round(start + i * step, 10) for i in range(count)]


@dataclass
class Axis:
    name: str
    address: str
    values: list[Any]
    named: bool


def _axes(spec: Any, where: str) -> list[Axis]:
    if not isinstance(spec, dict) or not spec:
        raise BatchError(f"{where}: 'axes' must be a non-empty mapping of axis name to values")
    axes = []
    for name, body in spec.items():
        at = f"{where}: axis {name!r}"
        if isinstance(body, list):
            address, values, named = name, body, True
        elif isinstance(body, dict):
            address = body.get("set", name)
            named = True
            if "values" in body and "range" in body:
                raise BatchError(f"{at}: give 'values' or 'range', not both")
            if "values" in body:
                values = body["values"]
            elif "range" in body:
                values = expand_range(body["range"], at)
            elif {"start", "stop"} <= set(body):
                values = expand_range(body, at)
            else:
                raise BatchError(f"{at}: needs 'values' (a list) or 'range' ({{start, stop, step}})")
            if body.get("folder") is False:
                named = False
        else:
            raise BatchError(f"{at}: expected a list of values or a mapping with 'set' and 'values'/'range'")
        if not isinstance(values, list) or not values:
            raise BatchError(f"{at}: 'values' must be a non-empty list")
        axes.append(Axis(str(name), str(address), values, named))
    return axes


def _groups(axes: list[Axis], zips: Any, where: str) -> list[list[Axis]]:
    by_name = {a.name: a for a in axes}
    zips = zips or []
    if not isinstance(zips, list) or not all(isinstance(z, list) for z in zips):
        raise BatchError(f"{where}: 'zip' must be a list of lists of axis names")
    used: set[str] = set()
    groups: list[list[Axis]] = []
    for group in zips:
        for name in group:
            if name not in by_name:
                raise BatchError(f"{where}: zip names unknown axis {name!r}; axes: {', '.join(by_name)}")
            if name in used:
                raise BatchError(f"{where}: axis {name!r} is in more than one zip group")
            used.add(name)
        members = [by_name[n] for n in group]
        lengths = {len(a.values) for a in members}
        if len(lengths) > 1:
            sizes = ", ".join(f"{a.name}={len(a.values)}" for a in members)
            raise BatchError(f"{where}: zipped axes must have equal lengths ({sizes})")
        groups.append(members)
    order = {a.name: i for i, a in enumerate(axes)}
    groups += [[a] for a in axes if a.name not in used]
    groups.sort(key=lambda g: order[g[0].name])
    return groups


def _seed_fn(spec: Any, where: str, master_seed: int | None = None) -> tuple[str | None, Any, int | None]:
    """(address, function index -> seed, master seed); ``master_seed`` stands in for a missing ``master``."""
    if spec is None:
        return None, None, None
    if not isinstance(spec, dict) or "set" not in spec:
        raise BatchError(
            f"{where}: 'seed' needs 'set' (e.g. KSampler.seed) and 'policy' ({', '.join(SEED_POLICIES)})"
        )
    policy = spec.get("policy", "fixed")
    if policy not in SEED_POLICIES:
        raise BatchError(f"{where}: seed policy {policy!r} is not one of {', '.join(SEED_POLICIES)}")
    if policy == "random":
        master = spec.get("master", master_seed)
        if master is None:
            master = secrets.randbelow(2**32)
        if not isinstance(master, int):
            raise BatchError(f"{where}: seed 'master' must be an integer")
        rng = random.Random(master)
        drawn: list[int] = []

        def draw(i: int) -> int:
            while len(drawn) <= i:
                drawn.append(rng.randrange(2**32))
            return drawn[i]

        return str(spec["set"]), draw, master
    start = spec.get("value", spec.get("base", 0))
    if not isinstance(start, int) or isinstance(start, bool):
        raise BatchError(f"{where}: seed 'value'/'base' must be an integer")
    step = spec.get("step", 1)
    if policy == "fixed":
        return str(spec["set"]), lambda i: start, None
    return str(spec["set"]), lambda i: start + i * step, None


def parse_sweep(
    data: Any, source: str = "sweep", base: Path | None = None, *, master_seed: int | None = None
) -> BatchPlan:
    """Expand a sweep spec (already parsed from YAML/JSON); ``master_seed`` is used by a ``random`` seed policy
    without its own ``master`` (a resumed batch passes the one it recorded)."""
    base = base or Path(".")
    if not isinstance(data, dict):
        raise BatchError(f"{source}: a sweep spec must be a mapping")
    known = {"workflow", "prompt", "set", "axes", "zip", "seed", "inputs", "tags", "name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BatchError(
            f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
        )
    workflow, prompt = data.get("workflow"), None
    if (workflow is None) == ("prompt" not in data):
        raise BatchError(f"{source}: give exactly one of 'workflow' (a path) or 'prompt' (an inline graph)")
    if workflow is not None:
        path = Path(str(workflow)).expanduser()
        graph = _load(path if path.is_absolute() else base / path, source)
        workflow = str(workflow)
    else:
        try:
            graph = prompt = workflow_from_data(data["prompt"], source).prompt
        except WorkflowError as exc:
            raise BatchError(str(exc)) from None
    fixed = _overrides(data.get("set"), f"{source}: set")
    axes = _axes(data.get("axes"), source)
    for axis in axes:  # check each address once, with its first value, before expanding
        _check(
            graph,
            [_override(axis.address, axis.values[0], f"{source}: axis {axis.name!r}")],
            f"{source}: axis {axis.name!r}",
        )
    groups = _groups(axes, data.get("zip"), source)
    seed_address, seed_of, master = _seed_fn(data.get("seed"), source, master_seed)
    if seed_address:
        _check(graph, [_override(seed_address, 0, f"{source}: seed")], f"{source}: seed")
    inputs = data.get("inputs") or {}
    tags = [str(t) for t in data.get("tags") or []]
    prefix = str(data.get("name") or "")
    jobs: list[Job] = []
    for index, combo in enumerate(itertools.product(*[range(len(g[0].values)) for g in groups])):
        chosen: dict[str, Any] = {}
        overrides = list(fixed)
        for group, pick in zip(groups, combo, strict=True):
            for axis in group:
                value = axis.values[pick]
                chosen[axis.name] = value
                overrides.append(_override(axis.address, value, f"{source}: axis {axis.name!r}"))
        seed = None
        if seed_of is not None and seed_address is not None:  # _seed_fn gives both or neither
            seed = seed_of(index)
            overrides.append(_override(seed_address, seed, f"{source}: seed"))
        jid = job_id(workflow, prompt, overrides, inputs)
        parts = [f"{safe_name(a.name, 24)}-{safe_name(chosen[a.name])}" for a in axes if a.named]
        folder = "/".join(parts) if parts else f"{index:05d}"
        name = (prefix + "/" if prefix else "") + ("/".join(parts) if parts else jid)
        jobs.append(
            Job(
                jid,
                name,
                folder,
                workflow,
                prompt,
                [o.text for o in overrides],
                dict(inputs),
                list(tags),
                chosen,
                seed,
            )
        )
    _dedupe_folders(jobs)
    _distinct_training_names(jobs, lambda job: graph)
    return BatchPlan(source, "sweep", jobs, master)


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------


def load_batch(path: str | Path, *, master_seed: int | None = None) -> BatchPlan:
    """Read and expand a batch file: ``.jsonl``/``.ndjson`` as JSON Lines, anything else as a sweep spec
    (``master_seed``: see :func:`parse_sweep`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BatchError(f"batch file not found: {p}") from None
    except OSError as exc:
        raise BatchError(f"cannot read batch file {p}: {exc.strerror or exc}") from None
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return parse_jsonl(text, str(p), p.parent)
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BatchError(
                f"{p}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            ) from None
    else:
        import yaml

        try:
            data = load_yaml(text, str(p))
        except UnsafeYaml as exc:  # an alias bomb or an oversized file: the message names the file
            raise BatchError(str(exc)) from None
        except yaml.YAMLError as exc:
            raise BatchError(f"{p}: not valid YAML: {exc}") from None
    return parse_sweep(data, str(p), p.parent, master_seed=master_seed)


def plan_entry(job: Job, graphs: dict[int, str]) -> dict[str, Any]:
    """A job as ``plan.json`` stores it: an inline graph is replaced by its hash (the graph stays in the plan)."""
    data = job.to_dict()
    data.pop("line", None)
    if job.prompt is not None:
        key = id(job.prompt)
        if key not in graphs:
            blob = json.dumps(job.prompt, sort_keys=True, default=str, separators=(",", ":")).encode()
            graphs[key] = hashlib.sha256(blob).hexdigest()[:16]
        data["prompt"] = f"sha256:{graphs[key]}"
    return data


def plan_hash(plan: BatchPlan, base: Path) -> str:
    """A hash of the expanded jobs and of the workflow files they use (a changed file changes the plan)."""
    h = hashlib.sha256()
    files: set[str] = set()
    graphs: dict[int, str] = {}  # a sweep shares one inline graph between all its jobs: hash it once
    for job in plan.jobs:
        h.update(
            json.dumps(plan_entry(job, graphs), sort_keys=True, default=str, separators=(",", ":")).encode()
        )
        if job.workflow:
            files.add(job.workflow)
    for name in sorted(files):
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base / path
        with contextlib.suppress(OSError):
            h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]
