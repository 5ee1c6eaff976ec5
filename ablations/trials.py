"""A study's trials: the plan stored with the study, the objective, and the worker loop.

The story of a trial: a worker claims the next queued trial of the study (each grid point and
seed is queued exactly once when the study is created; a tuning study queues its trial
budget), builds the trial's :class:`harness.config.RunConfig`, runs it through
:func:`harness.run.run` in a nested MLflow run, and tells Optuna the score. While it runs, a
heartbeat thread stamps the trial every few seconds; a worker that finds a RUNNING trial whose
stamp is older than ``stale_after`` seconds (its worker was killed), or whose worker's process
is known to be gone (same host, pid no longer alive), marks it FAILED, closes its MLflow runs
FAILED, and queues it again. A trial that fails (a NaN loss, a crash) is FAILED with its reason
in the user attribute ``fail_reason``, and the study goes on. Fair studies (``ablations.fair``) run
through the same loop, claim, objective and heartbeat; their ``top_up`` hook queues each stage as the
one before settles.

A worker stops when nothing is left to claim. The study command (``wait=True``) also waits
for trials still RUNNING in other workers, so that it never reports a grid with a silent hole:
they either finish or, their worker dead, are reaped and run here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import socket
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ablations.kinds import KINDS, StudyKind
from ablations.space import spec_of
from ablations.storage import CORRECT_ATTR, DIAGNOSTICS_ATTR, MLFLOW_RUN_ATTR, pack_correct, pack_diagnostics
from ablations.studyfile import STUDY_OWNED
from harness.errors import UserError, interruption
from harness.reuse import shared_fixed_costs
from harness.stats import mean as _mean
from harness.tracking import (HOST_TAG, PID_START_TAG, PID_TAG, RunHandle, Tracker, library_versions, loaded_commit,
                              machine, owner_tags, process_alive)

if TYPE_CHECKING:
    from harness.config import RunConfig

HEARTBEAT_ATTR = "ablations:heartbeat"
WORKER_ATTR = "ablations:worker"  # {"harness.host": ..., "harness.pid": ..., "harness.pid_start": ...}
DEFAULT_STALE_AFTER_S = 120.0
WAIT_REPORT_EVERY_S = 30.0  # how often a waiting study says what it waits for
POLL_S = 2.0  # how often an idle worker looks again while other workers' trials may unlock trials of its own


class TrialFailed(Exception):
    """The trial's run failed (a NaN loss, a crash): the trial is FAILED with this reason, the study goes on.

    ``crashed`` tells a crash (an exception in the run: worth running again with ``--retry-failed``)
    from a divergence (a non-finite loss or score: the outcome of that rate, kept).
    """

    def __init__(self, message: str, crashed: bool = False) -> None:
        super().__init__(message)
        self.crashed = crashed


# How harness.run words a divergence: harness.train.NonFiniteLoss ("loss became nan at step 3: ...").
DIVERGENCE_MARKS = ("loss became", "non-finite")


def is_divergence(error: str | None) -> bool:
    """Whether a failed run's error is a divergence (non-finite loss) rather than a crash."""
    return any(mark in (error or "").lower() for mark in DIVERGENCE_MARKS)


@dataclass
class StudyPlan:
    """Everything a worker needs, stored as a user attribute of the Optuna study when it is created.

    ``config`` is the resolved harness.run configuration shared by every trial (the study file's
    ``run:`` options and the command line's, applied once at creation), so every worker runs the
    same thing whatever its own command line. Its methods are the study's specs and its seeds the
    study's seeds; :meth:`trial_config` narrows them (and names the run) per trial. The storage
    keeps it without those three (:meth:`shared_options`).
    """

    name: str
    kind: str
    config: RunConfig
    seeds: list[int]
    points: list[dict[str, Any]]
    description: str = ""
    n_trials: int | None = None
    lr: dict[str, Any] | None = None
    pruner: dict[str, int] = field(default_factory=dict)
    intermediate_every: int | None = None
    plot_x: str | None = None
    mlflow_parent_run_id: str | None = None
    # fair studies (ablations.fair): the learning-rate grid, the final seeds, the grid extensions allowed per side
    lr_grid: list[float] | None = None
    final_seeds: list[int] | None = None
    extend: int = 0
    delta: float | None = None  # the smallest effect of interest (fraction), fixed at creation
    planned_sd: float | None = None  # the paired per-seed SD --plan assumes (fraction); None: fair.ASSUMED_SD

    @property
    def study_kind(self) -> StudyKind:
        """The kind's hooks (ablations.kinds); ``kind`` stays the name the storage keeps."""
        return KINDS[self.kind]

    # ---- the Optuna studies that hold the trials

    def optuna_names(self) -> list[str]:
        """One Optuna study for a grid; one per method for a tuning study (each method gets its own lr)."""
        return self.study_kind.optuna_names(self)

    def directions(self) -> list[str]:
        return list(self.study_kind.directions)

    def specs(self) -> list[str]:
        return [spec_of(p) for p in self.points]

    def grid(self) -> list[tuple[dict[str, Any], int]]:
        """The exact grid: every (point, seed), point-major; trial ``grid_index`` k is ``grid()[k]``."""
        return [(p, s) for p in self.points for s in self.seeds]

    def choices(self) -> dict[str, list[Any]]:
        """Each grid axis's values (Optuna records a grid trial's options as categorical parameters)."""
        found: dict[str, list[Any]] = {}
        for point in self.points:
            for key, value in point.items():
                found.setdefault(key, [])
                if value not in found[key]:
                    found[key].append(value)
        found["seed"] = list(self.seeds)
        return found

    def queue(self, optuna_name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The trials to queue at creation, as (fixed params, user attrs): the whole grid, or the tuning budget."""
        return self.study_kind.initial_queue(self, optuna_name)

    def sampler(self):
        return self.study_kind.sampler(self)

    def pruner_(self):
        return self.study_kind.pruner(self)

    # ---- the trial's run configuration

    def intermediate_every_of(self, trial) -> int | None:
        """Evaluate (and prune) every N steps: tuning trials only, never a fair study's final (test) runs."""
        return self.intermediate_every if self.study_kind.is_tuning(trial) else None

    def trial_config(self, spec: str, seeds: list[int], number: int, lr: float | None = None,
                     split: str | None = None):
        """The harness.run configuration of one trial: the study's options, one method, the trial's seeds and split."""
        values: dict[str, Any] = {"methods": [spec], "seeds": seeds, "run_name": f"trial-{number}"}
        if lr is not None:
            values["lr"] = lr
        if split is not None:
            values["split"] = split
        return dataclasses.replace(self.config, **values)

    def shared_options(self) -> dict[str, Any]:
        """The configuration as stored and logged: every option but those each trial sets (methods, seeds, run name)."""
        from harness.config import config_to_dict  # deferred here and below: harness.config loads torch

        options = config_to_dict(self.config)
        for key in STUDY_OWNED:
            options.pop(key)
        return options

    def to_attr(self) -> dict[str, Any]:
        return {**asdict(self), "config": self.shared_options()}

    @classmethod
    def from_attr(cls, value: dict[str, Any]) -> "StudyPlan":
        from harness.config import config_from_dict

        value = dict(value)
        options = {**value.pop("config"), "methods": [spec_of(p) for p in value["points"]], "seeds": value["seeds"]}
        return cls(config=config_from_dict(options, source=f"study {value['name']!r} in the storage"), **value)


# ----------------------------------------------------------------------------------------------------------
# The objective: sample (or read) the trial's configuration, run the pipeline, return the score.


def objective(trial, plan: StudyPlan, tracker, parent, run_fn: Callable | None = None, log=print):
    """One trial: one call of harness.run.run in a nested MLflow run; returns the score (and params for pareto)."""
    from harness.run import Pruned  # deferred here and below: harness.run loads torch
    from harness.run import run as harness_run

    run_fn = run_fn or harness_run
    spec, seeds, lr = _suggest(trial, plan)
    cfg = plan.trial_config(spec, seeds, trial.number, lr, split=trial.user_attrs.get("split"))
    tags = {"kind": "trial", "study": trial.study.study_name, "trial_number": trial.number, "spec": spec,
            "seeds": ",".join(map(str, seeds)), "split": cfg.split}
    pruned = False
    known = known_curvatures(trial, plan, spec, seeds) if cfg.diagnostics == "full" else {}
    reuse = {"known_curvature": known} if known else {}  # (only then: a stand-in run_fn need not know the keyword)
    with tracker.run(f"trial-{trial.number}", parent=parent, tags=tags) as handle:
        trial.set_user_attr(MLFLOW_RUN_ATTR, handle.run_id)  # so a worker reaping this trial can close it
        handle.log_params({**trial.params, "spec": spec, "trial_number": trial.number, "lr": cfg.lr,
                           "seeds": seeds, "optuna_study": trial.study.study_name})
        started = time.perf_counter()
        final = trial.user_attrs.get("stage") == "final"
        try:
            outcome = run_fn(cfg, parent=handle, tracker=tracker, write_results=False,
                             evaluate_base="if_failed" if final else False,
                             progress=False, log=log, intermediate_every=plan.intermediate_every_of(trial),
                             on_intermediate=_pruning_callback(trial, plan, cfg), **reuse)
        except Pruned:
            handle.set_tags({"optuna_state": "PRUNED"})
            pruned = True
        else:
            run_seconds = time.perf_counter() - started
            results = outcome.results
            failed = [r for r in results if not r.ok]
            if failed and final and all(is_divergence(r.error) for r in failed) and outcome.base is not None:
                # A diverged final run is an outcome of its method at its rate, never dropped: it is scored as
                # the base model it falls back to (no usable adapter), and marked so the verdict counts it.
                trial.set_user_attr("diverged", "; ".join(f"seed {r.seed}: {r.error}" for r in failed))
                results = [outcome.base if not r.ok else r for r in results]
            elif failed:
                raise TrialFailed("; ".join(f"seed {r.seed}: {r.error}" for r in failed),
                                  crashed=not all(is_divergence(r.error) for r in failed))
            average = _mean(_mean(r.scores.values()) for r in results)
            if math.isnan(average):
                raise TrialFailed("the score is NaN")
            measured = getattr(outcome.diagnostics, "curvatures", None) or {}
            if measured:  # lambda_max at initialisation, per seed: later trials of this spec and seed reuse it
                trial.set_user_attr(CURVATURE_ATTR, {str(seed): dataclasses.asdict(value)
                                                     for (_, seed), value in measured.items()})
            params = outcome.results[0].trainable_params
            trial.set_user_attr("trainable_params", params)
            trial.set_user_attr("run_seconds", run_seconds)
            # what trained it: a repeat of this trial that differs can be traced to the code, libraries, machine,
            # base weights or data
            trial.set_user_attr("provenance", provenance(getattr(outcome, "fingerprint", None)))
            trial.set_user_attr("train_seconds", _sum_finite(r.train_seconds for r in outcome.results))
            trial.set_user_attr("scores", {t: _mean(r.scores[t] for r in results) for t in results[0].scores})
            if final:  # per-item correctness: the verdict's item bootstrap and variance components read it
                trial.set_user_attr(CORRECT_ATTR, pack_correct(results[0].correct))
            measured = _measured(outcome)
            if measured is not None:  # the mechanisms (at the tuned rate in a final trial: the study's
                # diagnostics.md reads them; across the rates in tuning trials: the forgetting frontier)
                trial.set_user_attr(DIAGNOSTICS_ATTR, pack_diagnostics(*measured))
            handle.log_metrics({"average_accuracy": average, "trainable_params": params, "run_seconds": run_seconds})
    if pruned:
        raise Pruned(f"trial {trial.number} pruned")
    return plan.study_kind.values(average, params)


CURVATURE_ATTR = "lambda_max"  # seed -> harness.diagnostics.Eigenvalue as a dict, at diagnostics: full


def known_curvatures(trial, plan: StudyPlan, spec: str, seeds: list[int]) -> dict:
    """seed -> the lambda_max an earlier trial of this study measured for the same spec and seed.

    lambda_max is the Hessian's largest eigenvalue at initialisation (harness.diagnostics): it depends on the
    method, its options, the seed and the fixed batch, never on the learning rate, so a fair study's grid
    (every rate of a spec, then its final seeds) measures it once per (spec, seed) instead of once per trial.
    """
    import optuna

    from harness.diagnostics import Eigenvalue  # deferred: harness.diagnostics loads torch

    wanted, found = {str(s) for s in seeds}, {}
    for name in plan.optuna_names():
        try:
            others = optuna.load_study(study_name=name, storage=trial.storage).get_trials(deepcopy=False)
        except KeyError:
            continue
        for other in others:
            if other.number == trial.number and name == trial.study.study_name:
                continue
            stored = other.user_attrs.get(CURVATURE_ATTR) or {}
            if other.user_attrs.get("spec") != spec:
                continue
            for seed, value in stored.items():
                if seed in wanted and seed not in found and math.isfinite(value.get("value", math.nan)):
                    found[seed] = Eigenvalue(**value)
    return {int(s): v for s, v in found.items()}


@functools.cache
def worker_provenance() -> dict[str, Any]:
    """What this process trains with: the commit of the code it loaded, the library versions and the machine.
    Read once (a worker reads it when it starts, after importing the training code): a commit made while a
    long-lived worker runs does not relabel the code the worker had loaded, and the machine does not change under a
    process. A module first imported later (a method's own code, on its first trial) is read from the tree as it is
    then; a commit in between is not seen."""
    import harness.run  # noqa: F401 (the pipeline and the adapters it imports load now, with the commit read below)

    return {"commit": loaded_commit() or "unknown", "versions": library_versions(), "machine": machine()}


# The parts of a run's protocol fingerprint that name its inputs: the base weights and the data it read
_INPUT_PARTS = ("base_weights", "train_data_sha256", "eval_data_sha256")


def provenance(fingerprint: dict | None) -> dict[str, Any]:
    """A trial's ``provenance`` attribute: :func:`worker_provenance`, and from the run's protocol fingerprint its
    hash and the checksums of the base weights and the data (the rest of the fingerprint is the configuration,
    which the study stores once)."""
    found = dict(worker_provenance())
    if fingerprint:
        parts = fingerprint.get("parts", {})
        found["protocol"] = {"hash": fingerprint.get("hash"), **{k: parts[k] for k in _INPUT_PARTS if k in parts}}
    return found


def _measured(outcome) -> tuple[dict, Any] | None:
    """The layer ``all`` row and the trace of a one-method, one-seed run's diagnostics (None when none were
    measured: diagnostics ``none``, a diverged run, a measurement that failed)."""
    diagnostics = getattr(outcome, "diagnostics", None)
    if diagnostics is None or not diagnostics.enabled or not outcome.results or not outcome.results[0].ok:
        return None
    result = outcome.results[0]
    row = next((r for r in diagnostics.rows if r["layer"] == "all" and r["method"] == result.method
                and r["seed"] == result.seed), None)
    trace = next((t for t in diagnostics.traces if t.method == result.method and t.seed == result.seed), None)
    return (row, trace) if row is not None and trace is not None else None


def _sum_finite(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(sum(finite)) if finite else math.nan


def _suggest(trial, plan: StudyPlan) -> tuple[str, list[int], float | None]:
    """The trial's method spec, seeds and learning rate: queued values for a grid, TPE's choice of lr for tuning."""
    return plan.study_kind.suggest(trial, plan)


def _pruning_callback(trial, plan: StudyPlan, cfg):
    """Report intermediate scores to Optuna and stop the run when the pruner says so (single objective only)."""
    if not plan.intermediate_every_of(trial):
        return None
    from harness.run import Pruned

    steps_per_seed = cfg.max_steps or 10**6

    def on_intermediate(label, seed, step, average):
        step = cfg.seeds.index(seed) * steps_per_seed + step  # one increasing step across the trial's seeds
        trial.report(average, step)
        if trial.should_prune():
            raise Pruned(f"{label} seed {seed} pruned at step {step}")

    return on_intermediate



# ----------------------------------------------------------------------------------------------------------
# The worker loop


def work(plan: StudyPlan, storage, *, max_trials: int | None = None, stale_after: float = DEFAULT_STALE_AFTER_S,
         run_fn: Callable | None = None, log=print, wait: bool | None = None, poll_s: float | None = None) -> int:
    """Run queued trials of the study until none is left (or ``max_trials``); returns how many this worker ran.

    Each pass reaps the trials of dead workers, lets the study's ``top_up`` hook queue what finished trials
    make necessary (a fair study's final seeds, a grid extension; grids and tuning studies have none: their
    queue is complete at creation), then claims the next queued trial. A study that tops up can queue one
    slot twice (two workers topping up at once): the later trial is marked a duplicate when claimed, never run.
    The worker's trials share the base model, the task suite and the base measures (:mod:`harness.reuse`).

    ``wait``: while nothing is queued but trials run in other workers, wait until they finish or are found
    dead (reaped, queued again and run here); a line every ``WAIT_REPORT_EVERY_S`` seconds says what it waits
    for. ``None`` is the kind's default: a study that tops up waits (another worker's result may unlock
    trials), the others do not.
    """
    worker_provenance()  # now, before a trial gives time to commit code this process has not loaded
    with shared_fixed_costs():
        return _work(plan, storage, max_trials=max_trials, stale_after=stale_after, run_fn=run_fn, log=log,
                     wait=wait, poll_s=poll_s)


def _work(plan: StudyPlan, storage, *, max_trials, stale_after, run_fn, log, wait, poll_s) -> int:
    import optuna
    from optuna.trial import TrialState

    kind = plan.study_kind
    top_up = kind.top_up if kind.queue_grows else None
    said_no_wait = wait is False
    wait = top_up is not None if wait is None else wait
    if poll_s is None:  # a study waiting for trials that may unlock its own looks again sooner
        poll_s = POLL_S if top_up is not None else max(0.2, min(5.0, stale_after / 4))
    tracker = Tracker(plan.config.tracking_uri, plan.config.experiment)
    parent = RunHandle(tracker.client, plan.mlflow_parent_run_id, plan.name)
    studies = [optuna.load_study(study_name=name, storage=storage, sampler=plan.sampler(), pruner=plan.pruner_())
               for name in plan.optuna_names()]
    done, last_report = 0, -math.inf
    while max_trials is None or done < max_trials:
        # Counted before the top-up: a trial that another worker finishes after this pass's top-up
        # may unlock more, so this worker stops only after a pass that began with nothing running.
        running_before = running_elsewhere(studies) if top_up is not None else []
        for study in studies:
            fail_stale_trials(study, storage, plan, stale_after, log)
            if top_up is not None:
                top_up(study, storage, plan)
        claimed = next(((s, t) for s in studies if (t := claim(s, storage)) is not None), None)
        if claimed is None:
            running = running_elsewhere(studies)
            if not running and not running_before:
                break
            if not running:
                continue  # it finished during this pass: top up once more before deciding
            if not wait:
                if said_no_wait:
                    log(f"[{plan.name}] nothing queued here; not waiting (--no-wait) for "
                        f"{describe_running(running, stale_after)}")
                break
            if time.monotonic() - last_report >= WAIT_REPORT_EVERY_S:
                log(f"[{plan.name}] waiting for {describe_running(running, stale_after)}")
                last_report = time.monotonic()
            time.sleep(poll_s)
            continue
        study, trial = claimed
        first = kind.duplicate_of(study, trial)
        if first is not None:
            trial.set_user_attr("duplicate_of", first)
            trial.set_user_attr("fail_reason", f"duplicate of trial {first} (queued twice at once); not run")
            study.tell(trial, state=TrialState.FAIL)
            continue
        run_trial(study, storage, trial, plan, tracker, parent, stale_after, run_fn, log)
        done += 1
    return done


def pending_trials(plan: StudyPlan, storage) -> tuple[int, list[tuple[str, Any]]]:
    """How many trials are still queued, and the RUNNING ones (study name, frozen trial)."""
    import optuna
    from optuna.trial import TrialState

    studies = [optuna.load_study(study_name=name, storage=storage) for name in plan.optuna_names()]
    waiting = sum(len(s.get_trials(deepcopy=False, states=(TrialState.WAITING,))) for s in studies)
    return waiting, running_elsewhere(studies)


def running_elsewhere(studies) -> list[tuple[str, Any]]:
    """(study name, frozen trial) of every RUNNING trial: after this process's own trial ended, all are others'."""
    from optuna.trial import TrialState

    return [(s.study_name, t) for s in studies for t in s.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]


def describe_running(running, stale_after: float) -> str:
    """``1 trial running in another worker (trial 5, heartbeat 3 s ago; lost if none for 120 s)``."""
    now = time.time()
    shown = []
    for _, t in running[:3]:
        last = _last_beat(t)
        shown.append(f"trial {t.number}, heartbeat {now - last:.0f} s ago" if last is not None else f"trial {t.number}")
    more = f", +{len(running) - 3} more" if len(running) > 3 else ""
    return (f"{len(running)} trial(s) running in another worker ({'; '.join(shown)}{more}; a worker silent for "
            f"{stale_after:g} s counts as dead)")


def seconds_until_stale(running, stale_after: float) -> float:
    """The longest any of ``running`` can still take to count as dead, if its worker died this moment."""
    now = time.time()
    return max((stale_after - (now - (_last_beat(t) or now)) for _, t in running), default=0.0)


def _last_beat(frozen) -> float | None:
    last = frozen.system_attrs.get(HEARTBEAT_ATTR)
    if last is None and frozen.datetime_start is not None:
        last = frozen.datetime_start.timestamp()
    return last


def claim(study, storage):
    """Take the next queued trial (WAITING -> RUNNING, atomically in the storage) or None if the queue is empty."""
    import optuna
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                continue  # another worker took it first
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        storage.set_trial_system_attr(trial_id, WORKER_ATTR, owner_tags())
        return optuna.trial.Trial(study, trial_id)
    return None


def run_trial(study, storage, trial, plan: StudyPlan, tracker, parent, stale_after: float,
              run_fn: Callable | None = None, log=print) -> None:
    """Run one claimed trial under a heartbeat and tell Optuna how it ended."""
    from optuna.trial import TrialState

    from harness.run import Pruned

    spec = trial.user_attrs.get("spec", "?")
    seeds = trial.user_attrs.get("seed", ",".join(map(str, plan.seeds)))
    log(f"[{study.study_name}] trial {trial.number}: {spec} seed(s) {seeds}")
    started = time.perf_counter()
    with Heartbeat(storage, trial._trial_id, interval=max(0.5, min(10.0, stale_after / 4))):
        try:
            values = objective(trial, plan, tracker, parent, run_fn, log=lambda *a, **k: None)
        except Pruned:
            study.tell(trial, state=TrialState.PRUNED)
            log(f"[{study.study_name}] trial {trial.number}: pruned")
            return
        except KeyboardInterrupt as err:
            _fail(study, trial, f"{interruption(err)}; queued again", killed=True)
            requeue(study, storage.get_trial(trial._trial_id), plan)
            raise
        except (TrialFailed, UserError) as err:
            _fail(study, trial, str(err), crashed=getattr(err, "crashed", False))
            log(f"[{study.study_name}] trial {trial.number}: FAILED: {err}")
            return
        except Exception as err:  # noqa: BLE001 (a crash in one trial must not stop the study)
            traceback.print_exc()
            _fail(study, trial, f"{type(err).__name__}: {err}", crashed=True)
            log(f"[{study.study_name}] trial {trial.number}: FAILED: {type(err).__name__}: {err}")
            return
    trial.set_user_attr("trial_seconds", time.perf_counter() - started)
    study.tell(trial, values)
    log(f"[{study.study_name}] trial {trial.number}: {describe_values(values)}")


def describe_values(values) -> str:
    """A trial's objective values with their names and units: ``average accuracy 57.5%[, 24,576 trainable params]``."""
    average, *rest = values if isinstance(values, tuple) else (values,)
    return ", ".join([f"average accuracy {100 * average:.1f}%", *(f"{int(p):,} trainable params" for p in rest)])


def _fail(study, trial, reason: str, killed: bool = False, crashed: bool = False) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("fail_reason", reason.splitlines()[0][:500] if reason else "failed")
    if killed:
        trial.set_user_attr("killed", True)
    if crashed:
        trial.set_user_attr("crashed", True)
    study.tell(trial, state=TrialState.FAIL)


class Heartbeat:
    """Stamp a running trial every ``interval`` seconds from a background thread, so others can tell it is alive."""

    def __init__(self, storage, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except Exception:  # noqa: BLE001 (the trial finished meanwhile, or the storage blinked)
                pass
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fail_stale_trials(study, storage, plan: StudyPlan, stale_after: float, log=print) -> list[int]:
    """Mark FAILED, close in MLflow and queue again the RUNNING trials whose worker is gone.

    A worker is gone when its heartbeat is older than ``stale_after`` seconds, or at once when it ran
    on this host and its process no longer exists. Only the process whose FAIL write succeeds
    re-queues a trial (the storage makes that write atomic), so two workers finding the same dead
    trial queue it once.
    """
    import optuna
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    now = time.time()
    failed = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _lost_worker(frozen, now, stale_after)
        if reason is None:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", f"worker lost: {reason}; queued again")
            storage.set_trial_user_attr(trial_id, "killed", True)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        close_trial_runs(plan, frozen.user_attrs.get(MLFLOW_RUN_ATTR), f"worker lost: {reason}")
        requeue(study, frozen, plan)
        failed.append(frozen.number)
        log(f"[{study.study_name}] trial {frozen.number}: its worker stopped ({reason}); marked FAILED and queued again")
    return failed


def _lost_worker(frozen, now: float, stale_after: float) -> str | None:
    """Why a RUNNING trial's worker counts as gone, or None while it may be alive."""
    owner = frozen.system_attrs.get(WORKER_ATTR) or {}
    if owner.get(HOST_TAG) == socket.gethostname() and not process_alive(owner.get(PID_TAG), owner.get(PID_START_TAG)):
        return f"its process (pid {owner.get(PID_TAG)}) has ended"
    last = _last_beat(frozen)
    if last is not None and now - last > stale_after:
        return f"no heartbeat for {now - last:.0f} s"
    return None


def close_trial_runs(plan: StudyPlan, run_id: str | None, reason: str) -> None:
    """End a reaped trial's MLflow run and its nested runs still RUNNING as FAILED, with the reason."""
    if not run_id:
        return
    from mlflow.entities import RunTag

    tracker = Tracker(plan.config.tracking_uri, plan.config.experiment)
    client = tracker.client
    ids, frontier = [], [run_id]
    while frontier:  # the trial's run, harness.run's run under it, the method runs under that
        current = frontier.pop()
        ids.append(current)
        frontier += [r.info.run_id for r in client.search_runs(
            [tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{current}'", max_results=10_000)]
    for i in ids:
        if client.get_run(i).info.status == "RUNNING":
            client.log_batch(i, tags=[RunTag("error", reason)])
            client.set_terminated(i, status="FAILED")


def requeue(study, frozen, plan: StudyPlan) -> None:
    """Queue a failed trial's configuration again (same grid point and seed, or the same sampled lr)."""
    attrs = {k: v for k, v in frozen.user_attrs.items()
             if k in ("grid_index", "spec", "seed", "split", "stage", "lr", "lr_position")}
    attrs["retry_of"] = frozen.number
    study.enqueue_trial(plan.study_kind.requeue_params(plan, frozen, attrs), user_attrs=attrs)
