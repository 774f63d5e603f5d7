"""One trial of ``charforge tune`` on one server: train (in segments when pruning), render the evaluation set,
score it.

Everything that runs on a server goes through the batch runner (:class:`~charforge.driver.batch.Batch`), one
batch folder per step of the trial, so a killed search resumes each step where it stopped: a training segment
that finished is not run again, one still running on its server is followed, the evaluation renders that exist
are kept. A trial stays on the server it started on: its LoRA is written into that server's ``loras`` folder.

Training is the workflow's Train LoRA node with the trial's settings: ``steps``, ``learning_rate``, ``rank``,
``resolution``, ``batch_size`` and ``seed`` as its inputs (``use_preset_values`` off), every other setting
merged into its ``overrides`` JSON, ``output_name`` ``<study>_t<number>``, ``resume`` ``auto``. With pruning
the steps are trained in segments (the node resumes a run whose step count grew, for a constant learning-rate
schedule); after each segment the node's samples (the evaluation prompts, the first seed) are scored and
reported to Optuna, which may stop the trial there.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charforge.common.characters import join_prompt
from charforge.driver.errors import UsageError
from charforge.driver.sync import parse_train_summary
from charforge.driver.workflow.load import load_workflow
from charforge.driver.workflow.overrides import Override, apply_overrides, resolve_node

from ..lora_eval import POSITIVE, SAMPLER, EvalImage, draw_grid, eval_graph, first_image, plan_grid, summarise
from ..names import ascii_name
from .scores import SetScorer, SetScores, sample_images
from .spec import NODE_INPUTS, TRAIN_CLASS, EvalSet, TuneSpec

TRIALS = "trials"
TRIAL_FILE = "trial.json"


class TrialFailed(Exception):
    """A trial that cannot give scores (training or every render failed); the message says why."""


@dataclass
class PoolServer:
    """One server of the search's pool."""

    name: str  # as shown and recorded (no credentials)
    make_target: Callable[[], Any]  # a fresh batch Target for each batch
    config: Any = None  # the ServerConfig of a ComfyUI server (to download the best LoRA); None for others


def trial_name(spec: TuneSpec, number: int) -> str:
    """The Train LoRA ``output_name`` (and LoRA file stem) of trial `number`."""
    return f"{spec.name}_t{number:04d}"


def trial_folder(out: Path, number: int) -> Path:
    return out / TRIALS / f"{number:04d}"


class TrainGraph:
    """The training workflow with the search's fixed node inputs, and the graph of each training segment."""

    def __init__(self, spec: TuneSpec) -> None:
        try:
            workflow = load_workflow(spec.workflow)
        except Exception as exc:  # noqa: BLE001 - WorkflowError and OSError name the file
            raise UsageError(f"workflow {spec.workflow}: {exc}") from None
        if workflow.prompt is None:
            raise UsageError(
                f"workflow {spec.workflow} is in the editor format; export it with 'Export (API)' "
                f"(or 'charforge convert {spec.workflow.name} -o api.json')"
            )
        graph = workflow.prompt
        if spec.train_node:
            try:
                node = resolve_node(graph, spec.train_node)
            except Exception as exc:  # noqa: BLE001 - OverrideError lists the candidates
                raise UsageError(f"train_node: {exc}") from None
        else:
            found = [nid for nid, n in graph.items() if n.get("class_type") == TRAIN_CLASS]
            if len(found) != 1:
                raise UsageError(
                    f"workflow {spec.workflow} has {len(found)} Train LoRA ({TRAIN_CLASS}) nodes; "
                    f"{'add one' if not found else 'name the one to tune with train_node'}"
                )
            node = found[0]
        if graph[node].get("class_type") != TRAIN_CLASS:
            raise UsageError(
                f"train_node {spec.train_node!r} is a {graph[node].get('class_type')}, not {TRAIN_CLASS}"
            )
        overrides = [
            Override(
                *_address(address),
                value,
                json.dumps(value) if not isinstance(value, str) else value,
                f"{address}={value}",
            )
            for address, value in spec.set.items()
        ]
        try:
            graph, _ = apply_overrides(graph, overrides)
        except Exception as exc:  # noqa: BLE001 - OverrideError names the address
            raise UsageError(f"set: {exc}") from None
        self.node = node
        self.graph = graph
        inputs = graph[node]["inputs"]
        text = inputs.get("overrides") or ""
        try:
            self.node_overrides = json.loads(text) if str(text).strip() else {}
        except json.JSONDecodeError:
            raise UsageError(
                f"workflow {spec.workflow}: the Train LoRA node's overrides are not JSON: {text!r}"
            ) from None
        self.inputs = dict(inputs)

    def settings_value(self, settings: dict[str, Any], name: str) -> Any:
        """What a setting will be: the trial's, else the node's overrides, else the node's input."""
        if name in settings:
            return settings[name]
        if name in self.node_overrides:
            return self.node_overrides[name]
        return self.inputs.get(name)

    def segment_graph(
        self, output_name: str, settings: dict[str, Any], steps: int, samples: dict[str, Any]
    ) -> dict[str, Any]:
        """The API graph that trains `output_name` with `settings` up to `steps` (resuming its earlier segments)."""
        graph = json.loads(json.dumps(self.graph))
        inputs = graph[self.node]["inputs"]
        extra = dict(self.node_overrides)
        for name, value in settings.items():
            if name in NODE_INPUTS:
                inputs[name] = value
                extra.pop(name, None)  # the node's overrides JSON would win over its input
            else:
                extra[name] = value
        extra.pop("steps", None)  # segments set the steps through the input
        extra.update(samples)
        inputs.update(
            output_name=output_name,
            steps=int(steps),
            use_preset_values=False,
            resume="auto",
            overrides=json.dumps(extra, sort_keys=True),
        )
        inputs.pop("save_character", None)
        return graph


def _address(address: str) -> tuple[str, str]:
    node, dot, name = str(address).rpartition(".")
    if not dot or not node or not name:
        raise UsageError(f"set: {address!r} is not NODE.INPUT")
    return node, name


def check_settings(settings: dict[str, Any]) -> None:
    """Refuse unknown training setting names before anything is queued (the engine's list of names)."""
    try:
        from charforge.engine.train.config import preset_config, with_overrides
    except ImportError:  # a driver-only install: the server will say it
        return
    try:
        with_overrides(preset_config("sd15", "sd15"), {k: v for k, v in settings.items() if k != "seed"})
    except (ValueError, TypeError) as exc:
        raise UsageError(f"training settings: {exc}") from None


def lora_from_outputs(folder: Path, output_name: str) -> tuple[str, str | None]:
    """(LoRA file name, run folder name) from the Train LoRA node's summary text in a job's manifest."""
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        for node in (manifest.get("values") or {}).values():
            for text in node.get("text") or []:
                trained = parse_train_summary(text)
                if trained is not None:
                    return trained.lora, trained.run_name
    return f"{output_name}.safetensors", output_name


def batch_cost(folder: Path) -> float:
    """The estimated cost of one batch folder (its summary's total; 0 without priced servers)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        return float((summary.get("cost") or {}).get("total_usd") or 0.0)
    return 0.0


@dataclass
class TrialResult:
    scores: SetScores
    lora: str
    run: str | None
    images: list[EvalImage]
    cost: float
    grid: Path | None


def run_batch(
    jobs: Any, server: PoolServer, folder: Path, stop: Callable[[], bool], timeout: float | None = None
) -> list[Any]:
    """Run `jobs` (a plan or a list of jobs) on `server` with the batch runner into `folder`; the outcomes.

    The same jobs in the same folder resume: done jobs are not sent again, submitted ones are looked up."""
    from charforge.driver.batch import Batch

    outcomes = []
    iterator = Batch(jobs, source=str(folder.name), base=folder).run(
        servers=[server.make_target()],
        out=folder,
        capacity=1,
        timeout=timeout,
        retry_failed=True,
        contact_sheet=None,
        on_message=lambda text: None,
    )
    try:
        for outcome in iterator:
            outcomes.append(outcome)
            if stop():
                break
    finally:
        close = getattr(iterator, "close", None)  # a generator: closing it stops the batch cleanly
        if close is not None:
            close()
    return outcomes


class EvalRenderer:
    """The fixed evaluation set (scenes x seeds, one LoRA strength) rendered and drawn; for trials and benches."""

    def __init__(
        self,
        character: Any,
        evaluation: EvalSet,
        checkpoint: str,
        *,
        weights: dict[str, float],
        timeout: float | None = None,
    ) -> None:
        self.character, self.eval, self.checkpoint = character, evaluation, checkpoint
        self.weights, self.timeout = weights, timeout
        self.texts = [
            (character.prompt_text(scene), join_prompt(character.prompt, scene))
            for scene in evaluation.scenes
        ]

    def evaluate(
        self, lora: str | None, server: PoolServer, folder: Path, stop: Callable[[], bool], title: str = ""
    ) -> tuple[list[EvalImage], Path, float]:
        """Render the evaluation set with `lora` (None: the base model alone) on `server` into `folder`."""
        strength = self.eval.strength
        seeds = self.eval.seeds
        fulls = [full for full, _ in self.texts]
        prefix = f"charforge_tune/{ascii_name(Path(lora).stem if lora else 'base', 'lora')}"
        graph = eval_graph(
            self.character,
            lora=lora or "",
            checkpoint=self.checkpoint,
            strength=strength,
            prompt=fulls[0],
            seed=seeds[0],
            save_prefix=prefix,
        )
        if not lora:
            from charforge.driver.batch import parse_sweep

            jobs = parse_sweep(
                {
                    "prompt": base_model_graph(graph),
                    "name": "base model",
                    "axes": {
                        "prompt": {"set": f"{POSITIVE}.text", "values": fulls},
                        "seed": {"set": f"{SAMPLER}.seed", "values": list(seeds)},
                    },
                },
                "base model",
            ).jobs
        else:
            jobs = plan_grid(graph, [strength], fulls, seeds, name=title or lora).jobs
        index = {full: i for i, full in enumerate(fulls)}
        images = {
            job.id: EvalImage(
                strength,
                index[job.axes["prompt"]],
                int(job.axes["seed"]),
                job.axes["prompt"],
                self.texts[index[job.axes["prompt"]]][1],
                job.id,
            )
            for job in jobs
        }
        renders = folder / "renders"
        for outcome in run_batch(jobs, server, renders, stop, self.timeout):
            image = images.get(outcome.job.id)
            if image is None:
                continue
            image.state = outcome.state
            if outcome.ok:
                image.file = first_image(list(outcome.files))
                if image.file is None:
                    image.state, image.error = "failed", "the job wrote no image"
            else:
                image.error = outcome.reason or outcome.state
        return [images[job.id] for job in jobs], folder / "grid.png", batch_cost(renders)

    def draw(
        self, images: list[EvalImage], scores: SetScores, path: Path, title: str, threshold: float | None
    ) -> None:
        """The evaluation grid (one row, scene x seed columns) with the set's scores under it; and images.json."""
        strength = self.eval.strength
        summaries, _ = summarise(images, [strength], 1.0, self.weights.get("text", 0.5), threshold)
        for summary in summaries:  # the row shows this search's combined score (diversity weighted in)
            summary.combined = scores.combined
        gen = self.character.generation
        note = (
            f"identity {_fmt(scores.identity)}  text {_fmt(scores.text)}  diversity {_fmt(scores.diversity)}  "
            f"cmmd {_fmt(scores.cmmd)}  combined {_fmt(scores.combined)}"
        )
        grid = draw_grid(
            images,
            [strength],
            self.eval.scenes,
            self.eval.seeds,
            summaries,
            None,
            title,
            (gen.width, gen.height),
            160,
            note,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        write_images_list(images, path.parent)


class TrialRunner:
    """Runs trials: shared by the search's worker threads (one per server)."""

    def __init__(
        self,
        spec: TuneSpec,
        character: Any,
        train: TrainGraph,
        scorer: SetScorer,
        out: Path,
        *,
        checkpoint: str,
        timeout: float | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.spec, self.character, self.train, self.scorer = spec, character, train, scorer
        self.out, self.timeout = out, timeout
        self.note = note or (lambda text: None)
        self.renderer = EvalRenderer(character, spec.eval, checkpoint, weights=spec.weights, timeout=timeout)
        self.texts = self.renderer.texts

    # ---- one trial -------------------------------------------------------------------------------------------

    def segments(self, settings: dict[str, Any], pruning: bool) -> list[int]:
        total = int(self.train.settings_value(settings, "steps") or 0)
        if total <= 0:
            raise UsageError(
                "steps: the Train LoRA node's steps is 0 (the preset's); search or fix 'steps' so "
                "segments and budgets are known"
            )
        count = self.spec.pruning.segments if pruning else 1
        count = max(1, min(count, total))
        return sorted({max(1, round(total * k / count)) for k in range(1, count + 1)})

    def sample_settings(self) -> dict[str, Any]:
        """The Train LoRA sample settings of a trial: the evaluation prompts with the first seed, at the end of
        each segment (sample_every 0), unless the search file fixes them."""
        samples: dict[str, Any] = {
            "sample_prompts": [full for full, _ in self.texts],
            "sample_seeds": [self.spec.eval.seeds[0]],
            "sample_every": 0,
        }
        return {k: v for k, v in samples.items() if k not in self.spec.fixed}

    def run(
        self,
        trial: Any,
        server: PoolServer,
        settings: dict[str, Any],
        *,
        pruning: bool,
        stop: Callable[[], bool],
    ) -> TrialResult:
        """Train, render and score trial `trial` on `server`; raises optuna.TrialPruned or TrialFailed."""
        import optuna

        number = trial.number
        folder = trial_folder(self.out, number)
        folder.mkdir(parents=True, exist_ok=True)
        name = trial_name(self.spec, number)
        cost = 0.0
        outcome = None
        steps_list = self.segments(settings, pruning)
        for index, steps in enumerate(steps_list):
            segment = folder / f"train-{steps:06d}"
            graph = self.train.segment_graph(name, settings, steps, self.sample_settings())
            outcomes = run_batch(
                _single_job(graph, f"{name} to step {steps}"), server, segment, stop, self.timeout
            )
            cost += batch_cost(segment)
            if not outcomes:
                raise KeyboardInterrupt  # stopped by the caller
            outcome = outcomes[-1]
            if not outcome.ok:
                raise TrialFailed(
                    f"training to step {steps} {outcome.state} on {server.name}: "
                    f"{(outcome.reason or '').strip()[:500]}"
                )
            self.note(
                f"trial {number}: trained to step {steps} on {server.name}"
                + (" (earlier run)" if outcome.skipped else "")
            )
            if index < len(steps_list) - 1:
                samples = sample_images(outcome.files, self.texts, 1)
                if not samples:
                    self.note(
                        f"trial {number}: the training job returned no samples at step {steps}; not pruned"
                    )
                    continue
                value = self.scorer.score_images(samples).combined
                if value is None:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a resumed trial reports a step it reported before
                    trial.report(value, index + 1)  # segment number: trials with other step counts compare
                self.note(f"trial {number}: samples at step {steps} score {value:.4f}")
                if trial.should_prune():
                    trial.set_user_attr("pruned_at", steps)
                    trial.set_user_attr("cost", round(cost, 6))
                    raise optuna.TrialPruned(f"samples at step {steps} scored {value:.4f}")
        assert outcome is not None
        lora, run = lora_from_outputs(outcome.folder, name)
        trial.set_user_attr("lora", lora)
        trial.set_user_attr("run", run)
        images, grid, render_cost = self.renderer.evaluate(
            lora, server, folder / "eval", stop, title=f"trial {number}: {lora}"
        )
        cost += render_cost
        scores = self.scorer.score_images(images)
        if scores.images == 0:
            raise TrialFailed(
                f"no evaluation image of {lora} was rendered on {server.name}: "
                + "; ".join(sorted({(i.error or i.state)[:200] for i in images}))
            )
        self.renderer.draw(images, scores, grid, f"trial {number}: {lora}", self.scorer.scoring.threshold)
        return TrialResult(scores, lora, run, images, cost, grid)


def write_images_list(images: list[EvalImage], folder: Path) -> None:
    """``images.json``: the rendered evaluation images in grid order, relative to `folder` (for the report)."""
    files = []
    for image in images:
        if image.file is not None:
            with contextlib.suppress(ValueError):
                files.append(image.file.relative_to(folder).as_posix())
    (folder / "images.json").write_text(json.dumps(files) + "\n", encoding="utf-8")


def base_model_graph(graph: dict[str, Any]) -> dict[str, Any]:
    """`graph` without its LoraLoader: the checkpoint's model and CLIP go straight to the sampler and encoders."""
    from ..lora_eval import CHECKPOINT, LORA

    graph = json.loads(json.dumps(graph))
    del graph[LORA]
    for node in graph.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == LORA:
                node["inputs"][key] = [CHECKPOINT, value[1]]
    return graph


def _single_job(graph: dict[str, Any], name: str) -> list[Any]:
    from charforge.driver.batch import Job
    from charforge.driver.batch.plan import job_id

    return [Job(job_id(None, graph, []), name, "job", prompt=graph)]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
