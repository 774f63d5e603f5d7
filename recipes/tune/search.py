"""``charforge tune`` as a Python API: an Optuna study over Train LoRA settings, trials spread over a server pool.

The study lives in ``<out>/study.db`` (SQLite), so the search survives anything: run the same command again and
finished trials (complete, pruned, failed) are kept and never run again, trials that were running are taken up
where their batch folders stopped (on the same server when it is in the pool), and the sampler continues from
every finished trial. One worker thread per server asks Optuna for a trial, runs it there (train, render, score;
:mod:`.trials`) and tells Optuna the result, until the budget (trials, hours, dollars) is spent.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charforge.driver.errors import UsageError

from .scores import SetScorer
from .spec import TuneSpec
from .trials import PoolServer, TrainGraph, TrialRunner, check_settings, trial_folder

STUDY_DB = "study.db"
LOCK = ".tune.lock"
MAX_FAILURES_IN_A_ROW = 3  # then the search stops: the cause is likely the setup, not the settings
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class TuneResult:
    out: Path
    study: Any
    trials: int  # finished trials (complete, pruned, failed)
    complete: int
    pruned: int
    failed: int
    ran: int  # trials this run worked on
    stopped: str  # why the search stopped
    report: Path | None = None
    best_yaml: Path | None = None
    best_lora: Path | None = None
    preset: str | None = None
    notes: list[str] = field(default_factory=list)


def storage_url(out: Path) -> str:
    return f"sqlite:///{(out / STUDY_DB).resolve()}"


def make_sampler(spec: TuneSpec, finished: int) -> Any:
    """TPE (one objective; several too), NSGA-II or random; seeded from the search's seed and the trials so far,
    so a resumed search does not draw its first trials' random points again."""
    import optuna

    seed = spec.seed * 1_000_003 + finished
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "nsga2":
        population = max(4, min(50, spec.budget.trials // 3))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    startup = max(2, min(10, spec.budget.trials // 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate TPE is marked experimental
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)


def make_pruner(spec: TuneSpec, enabled: bool) -> Any:
    import optuna

    if not enabled:
        return optuna.pruners.NopPruner()
    if spec.pruning.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=1, reduction_factor=2, min_early_stopping_rate=spec.pruning.warmup_segments
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=spec.pruning.startup_trials, n_warmup_steps=spec.pruning.warmup_segments
    )


def space_signature(spec: TuneSpec) -> dict[str, Any]:
    """What must not change between runs of one study (the space, fixed settings, objectives, evaluation)."""
    return {
        "space": {p.name: p.describe() for p in spec.space},
        "fixed": spec.fixed,
        "objectives": spec.objectives,
        "weights": spec.weights,
        "eval": {"scenes": spec.eval.scenes, "seeds": spec.eval.seeds, "strength": spec.eval.strength},
        "segments": spec.pruning.segments,
    }


class Tuner:
    """One ``charforge tune`` run (see the module docstring); :meth:`run` returns when the budget is spent, every
    trial has ended, or :meth:`stop` was called (trials then stay running in the study and resume next time)."""

    def __init__(
        self,
        spec: TuneSpec,
        servers: list[PoolServer],
        out: str | Path,
        *,
        timeout: float | None = None,
        note: Callable[[str], None] | None = None,
        loras_dir: str | Path | None = None,
        characters_dir: str | Path | None = None,
        report: bool = True,
    ) -> None:
        if not servers:
            raise UsageError("charforge tune needs at least one server (--server URL, repeatable)")
        names = [s.name for s in servers]
        if len(set(names)) != len(names):
            raise UsageError(f"the same server is given twice: {', '.join(names)}")
        self.spec, self.servers, self.out = spec, servers, Path(out)
        self.timeout = timeout
        self.note = note or (lambda text: None)
        self.loras_dir, self.characters_dir, self.write_report = loras_dir, characters_dir, report
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._adopted: list[Any] = []
        self._ran = 0
        self._errors: list[str] = []
        self._failures_in_a_row = 0
        self._elapsed_before = 0.0
        self.stopped = ""

    def stop(self) -> None:
        self._stop.set()

    # ---- setup -------------------------------------------------------------------------------------------

    def _lock_folder(self) -> Any:
        self.out.mkdir(parents=True, exist_ok=True)
        handle = open(self.out / LOCK, "a+")  # noqa: SIM115 - held for the run
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows
            pass
        except OSError:
            handle.close()
            raise UsageError(
                f"another 'charforge tune' is using {self.out}; wait for it or stop it"
            ) from None
        return handle

    def _checkpoint(self, train: TrainGraph) -> str:
        if self.spec.eval.checkpoint:
            return self.spec.eval.checkpoint
        base = str(train.inputs.get("base_model") or "")
        if base.lower().endswith(CHECKPOINT_SUFFIXES):
            return base
        raise UsageError(
            f"eval.checkpoint: the Train LoRA node trains on {base!r}, which ComfyUI's "
            "CheckpointLoaderSimple cannot render with; name a checkpoint file of the same base model"
        )

    def _check_space(self, train: TrainGraph, pruning: bool) -> None:
        probe = dict(self.spec.fixed)
        for param in self.spec.space:
            low = param.low or 0.0
            probe[param.name] = (
                param.choices[0] if param.kind == "choice" else (int(low) if param.kind == "int" else low)
            )
        check_settings(probe)
        if not pruning:
            return
        schedules = {train.settings_value(self.spec.fixed, "schedule")}
        for param in self.spec.space:
            if param.name == "schedule":
                schedules = set(param.choices)
        schedules.discard(None)
        if schedules - {"constant"}:
            raise UsageError(
                f"pruning trains in {self.spec.pruning.segments} segments, and a run resumes with more "
                f"steps only with a constant learning-rate schedule (the schedule here: "
                f"{', '.join(sorted(map(str, schedules)))}); set fixed.schedule: constant, or "
                f"pruning.segments: 1 to train each trial in one go"
            )

    def _study(self, pruning: bool) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = storage_url(self.out)
        signature = space_signature(self.spec)
        existing = None
        with contextlib.suppress(KeyError):
            existing = optuna.load_study(study_name=self.spec.name, storage=storage)
        finished = len(existing.get_trials(deepcopy=False)) if existing is not None else 0
        study = optuna.create_study(
            study_name=self.spec.name,
            storage=storage,
            load_if_exists=True,
            directions=self.spec.directions,
            sampler=make_sampler(self.spec, finished),
            pruner=make_pruner(self.spec, pruning),
        )
        recorded = study.user_attrs.get("signature")
        if recorded is None:
            study.set_user_attr("signature", signature)
            study.set_user_attr("spec", str(self.spec.path))
            for point in self.spec.start:  # tried first, before the sampler's own picks
                study.enqueue_trial(point, skip_if_exists=True)
        elif json.loads(json.dumps(signature)) != recorded:
            raise UsageError(
                f"{self.out} holds a search with another space, objectives or evaluation set; use "
                f"another --out (or delete {self.out / STUDY_DB} to start over there)"
            )
        return study

    # ---- scheduling ----------------------------------------------------------------------------------------

    def _budget_left(self, study: Any, started: float) -> str | None:
        """None while the budget allows another trial, else what is spent."""
        trials = study.get_trials(deepcopy=False)
        budget = self.spec.budget
        if len(trials) >= budget.trials:
            return f"trial budget spent ({budget.trials})"
        if budget.hours is not None:
            elapsed = self._elapsed_before + time.time() - started
            if elapsed >= budget.hours * 3600:
                return f"time budget spent ({budget.hours:g} h)"
        if budget.dollars is not None:
            spent = sum(float(t.user_attrs.get("cost") or 0.0) for t in trials)
            if spent >= budget.dollars:
                return f"cost budget spent (${spent:.2f} of ${budget.dollars:g})"
        return None

    def _next(self, study: Any, server: PoolServer, started: float) -> Any:
        """A trial for `server`: a running trial of an earlier run that belongs here, else a new one."""
        import optuna

        pool = {s.name for s in self.servers}
        with self._lock:
            if self._stop.is_set():
                return None
            for trial in list(self._adopted):
                home = trial.user_attrs.get("server")
                if home == server.name or home not in pool:
                    self._adopted.remove(trial)
                    return optuna.trial.Trial(study, trial._trial_id)
            why = self._budget_left(study, started)
            if why is not None:
                self.stopped = self.stopped or why
                return None
            return study.ask()

    def _worker(
        self, study: Any, runner: TrialRunner, server: PoolServer, pruning: bool, started: float
    ) -> None:
        import optuna
        from optuna.trial import TrialState

        while not self._stop.is_set():
            trial = self._next(study, server, started)
            if trial is None:
                return
            with self._lock:
                settings = self.spec.settings(trial)
                trial.set_user_attr("server", server.name)
                trial.set_user_attr("settings", settings)
                trial.set_user_attr("folder", str(trial_folder(self.out, trial.number).relative_to(self.out)))
                self._ran += 1
            begun = time.time()
            self.note(
                f"trial {trial.number} on {server.name}: "
                + ", ".join(f"{k}={_short(v)}" for k, v in settings.items())
            )
            try:
                result = runner.run(trial, server, settings, pruning=pruning, stop=self._stop.is_set)
            except optuna.TrialPruned as exc:
                with self._lock:
                    trial.set_user_attr("seconds", round(time.time() - begun, 2))
                    study.tell(trial, state=TrialState.PRUNED)
                self.note(f"trial {trial.number} pruned: {exc}")
                continue
            except KeyboardInterrupt:
                return  # stopped: the trial stays running in the study and resumes next time
            except Exception as exc:  # noqa: BLE001 - TrialFailed, or anything else: the trial fails, the search goes on
                if self._stop.is_set():
                    return
                with self._lock:
                    trial.set_user_attr("error", str(exc)[:2000])
                    trial.set_user_attr("seconds", round(time.time() - begun, 2))
                    study.tell(trial, state=TrialState.FAIL)
                    self._errors.append(f"trial {trial.number}: {exc}")
                    self._failures_in_a_row += 1
                    if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                        self.stopped = f"{MAX_FAILURES_IN_A_ROW} trials in a row failed (last: {exc})"
                        self._stop.set()
                self.note(f"trial {trial.number} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}")
                continue
            values = [result.scores.value(m) for m in self.spec.objectives]
            with self._lock:
                trial.set_user_attr("scores", result.scores.to_dict())
                trial.set_user_attr("cost", round(result.cost, 6))
                trial.set_user_attr("seconds", round(time.time() - begun, 2))
                trial.set_user_attr("grid", str(result.grid.relative_to(self.out)) if result.grid else None)
                if any(v is None for v in values):
                    missing = [m for m, v in zip(self.spec.objectives, values, strict=True) if v is None]
                    trial.set_user_attr(
                        "error",
                        f"no value for {', '.join(missing)} "
                        f"({'; '.join(result.scores.notes) or 'see the scoring notes'})",
                    )
                    study.tell(trial, state=TrialState.FAIL)
                    self.note(f"trial {trial.number} failed: no value for {', '.join(missing)}")
                    continue
                study.tell(trial, values)
                self._failures_in_a_row = 0
                study.set_user_attr("elapsed_s", self._elapsed_before + time.time() - started)
            self.note(
                f"trial {trial.number} done on {server.name}: "
                + ", ".join(f"{m} {v:.4f}" for m, v in zip(self.spec.objectives, values, strict=True))
            )

    # ---- the run --------------------------------------------------------------------------------------------

    def run(self) -> TuneResult:
        from optuna.trial import TrialState

        from ..lora_eval import load_character

        handle = self._lock_folder()
        try:
            spec = self.spec
            character = load_character(spec.character)
            train = TrainGraph(spec)
            pruning = spec.pruning.enabled
            if pruning and spec.multi:
                self.note("pruning is off: Optuna prunes single-objective searches only")
                pruning = False
            self._check_space(train, pruning)
            checkpoint = self._checkpoint(train)
            scorer = SetScorer(
                character,
                face_pack=spec.scoring.face_pack,
                face_models_dir=spec.scoring.face_models_dir,
                det_size=spec.scoring.det_size,
                clip=spec.scoring.clip,
                reference=spec.scoring.reference,
                device=spec.scoring.device,
                weights=spec.weights,
                fid="fid" in spec.objectives,
                note=self.note,
            )
            scorer.load()
            study = self._study(pruning)
            self._adopted = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
            if self._adopted:
                self.note(
                    f"resuming {len(self._adopted)} trial(s) an earlier run left running: "
                    + ", ".join(str(t.number) for t in self._adopted)
                )
            done = len(
                study.get_trials(
                    deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
                )
            )
            if done:
                self.note(f"{done} trial(s) finished in earlier runs are kept")
            runner = TrialRunner(
                spec,
                character,
                train,
                scorer,
                self.out,
                checkpoint=checkpoint,
                timeout=self.timeout,
                note=self.note,
            )
            started = time.time()
            self._elapsed_before = float(
                study.user_attrs.get("elapsed_s", 0.0)
            )  # earlier runs of this search
            threads = [
                threading.Thread(
                    target=self._worker,
                    args=(study, runner, server, pruning, started),
                    name=f"tune-{i}",
                    daemon=True,
                )
                for i, server in enumerate(self.servers)
            ]
            for thread in threads:
                thread.start()
            try:
                for thread in threads:
                    while thread.is_alive():
                        thread.join(0.2)
            except KeyboardInterrupt:
                self._stop.set()
                self.stopped = "interrupted"
                for thread in threads:  # a job under way goes on on its server; the next run follows it
                    thread.join(5)
                raise
            finally:
                with self._lock:
                    study.set_user_attr("elapsed_s", self._elapsed_before + time.time() - started)
            if self._stop.is_set() and not self.stopped:
                self.stopped = "stopped"
            result = self._result(study)
            if self.write_report:
                from .report import write_outputs

                write_outputs(self, study, result, character, runner)
            return result
        finally:
            handle.close()

    def _result(self, study: Any) -> TuneResult:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        count = {
            state: sum(1 for t in trials if t.state == state)
            for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        }
        return TuneResult(
            self.out,
            study,
            sum(count.values()),
            count[TrialState.COMPLETE],
            count[TrialState.PRUNED],
            count[TrialState.FAIL],
            self._ran,
            self.stopped or "every trial ended",
            notes=list(self._errors),
        )


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
