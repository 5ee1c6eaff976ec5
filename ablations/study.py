"""``python -m ablations.study NAME``: create (or resume) a study, run its trials here, write its report.

The story:

1. read the study file (a built-in name such as ``chain_length`` or a YAML path) and resolve the
   trials' harness.run configuration: defaults < the file's ``run:`` < ``--config`` < command line;
2. open the storage (``--storage``, default ``sqlite:///optuna.db``) and the MLflow store, creating
   their schemas here, once; create the Optuna study with its plan and the whole queue of trials
   (every grid point and seed, or the tuning budget) and the MLflow parent run. If the study exists,
   check it was created with the same settings and continue it: trials of dead workers are marked
   FAILED and queued again, finished trials are never run twice;
3. run queued trials in this process until none is left (``python -m ablations.worker NAME
   --storage URL`` adds workers on this or other machines), then wait for trials other workers
   still run (``--no-wait``: say how long instead, and exit 75 rather than report a hole as done);
4. write results/ablations/<study>/ (trials.csv, summary.md, plots) and log it to MLflow; the
   report marks the grid points that have no result yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ablations import fair
from ablations.kinds import KINDS
from ablations.report import finish_parent_run, report_dir, write_report
from ablations.storage import DEFAULT_STORAGE, load_existing_study, open_storage, redact, resolve_storage_url
from ablations.space import spec_of
from ablations.studyfile import StudyFile, builtin_studies, load_study_file
from ablations.trials import (DEFAULT_STALE_AFTER_S, StudyPlan, describe_running, fail_stale_trials,
                              pending_trials, seconds_until_stale, work)
from harness import quiet
from harness.adapters.spec import parse_spec
from harness.fsutil import check_writable_dir
from harness.tuned_rates import DEFAULT_LR
from harness.tracking import RunHandle, Tracker, check_separate_stores, check_tracking_uri, resolve_tracking_uri, run_params, sqlite_path
from harness.errors import EXIT_INTERRUPTED, UserError, cli_entry, interruption

PLAN_ATTR = "plan"
EXIT_TRY_LATER = 75  # EX_TEMPFAIL: --no-wait found trials still running elsewhere
# Settings that may differ when a study is resumed: where reports go, and the tuning budget (it may grow).
RESUMABLE_CHANGES = ("n_trials", "mlflow_parent_run_id", "description", "plot_x", "planned_sd")
# Where run folders and MLflow runs go is the machine's business: a journal copied to another machine resumes there.
RESUMABLE_CONFIG = ("output_dir", "tracking_uri")


def build_parser() -> argparse.ArgumentParser:
    """harness.run's own options (to fix any of them for every trial) plus the study's."""
    from harness.config import build_parser as run_parser  # deferred here and below: harness.config loads torch

    parser = run_parser()
    parser.prog = "python -m ablations.study"
    parser.description = ("Run an ablation or tuning study: every trial is one harness.run configuration "
                          "(train, lm-eval, MLflow). harness.run's options below override the study file's "
                          "'run:' settings for every trial.")
    parser.epilog = (f"Built-in studies: {', '.join(builtin_studies())}. Smoke test: python -m ablations.study "
                     "chain_length --model tiny-random --max-steps 3 --limit 5 --seeds 0. More workers: "
                     "python -m ablations.worker NAME --storage URL. Dashboard: optuna-dashboard sqlite:///optuna.db")
    parser.add_argument("study", metavar="NAME", help="a built-in study name or the path of a study YAML file")
    group = parser.add_argument_group("study options")
    group.add_argument("--storage", default=DEFAULT_STORAGE, metavar="URL",
                       help="Optuna storage: sqlite:///FILE, journal:FILE or postgresql+psycopg2://USER:PW@HOST/DB "
                            f"(default: {DEFAULT_STORAGE})")
    group.add_argument("--create-only", action="store_true", default=False,
                       help="create (or check) the study and its queue, then exit: start workers afterwards")
    group.add_argument("--report-only", action="store_true", default=False,
                       help="write results/ablations/NAME/ from the storage without running trials")
    group.add_argument("--report-dir", default=None, metavar="DIR",
                       help="write the report into DIR instead of OUTPUT_DIR/ablations/NAME (for instance a "
                            "findings folder beside the study file and its journal); not stored with the study")
    group.add_argument("--retry-failed", action="store_true", default=False,
                       help="queue again the grid points whose trials failed (NaN, crash); in a fair study the "
                            "final seeds that failed and the tuning trials that crashed (a diverged tuning "
                            "trial is that rate's outcome, kept); killed trials are always queued again")
    group.add_argument("--n-trials", type=int, default=None, metavar="N",
                       help="tuning studies: trials per method (overrides the file's n_trials; may grow on resume)")
    group.add_argument("--import-arms", default=None, metavar="URL",
                       help="fair studies, at creation: copy from the fair study in this other Optuna storage "
                            "the tuning and final trials of every method both studies have (a journal:FILE or "
                            "sqlite:///FILE), so a study that adds arms - controls beside their parents - "
                            "does not train the shared ones again; refused unless model, data, grid, seeds, "
                            "delta and every run option are the same; ignored once the study exists")
    group.add_argument("--import-tuning-only", action="store_true", default=False,
                       help="with --import-arms: copy only the shared arms' tuning trials, so their final seeds run "
                            "again at the imported choice of rate (to record a diagnostic the originals lack; same "
                            "seed, rate and hardware repeat each score, which python -m ablations.retune checks "
                            "item by item)")
    group.add_argument("--max-trials", type=int, default=None, metavar="N",
                       help="run at most N trials in this process, then report (default: until the queue is empty)")
    fair = parser.add_argument_group("fair protocol (the fair study, or any grid study with --tune-lr)")
    fair.add_argument("--tune-lr", action="store_true", default=False,
                      help="grid studies: give every grid point its own learning rate, chosen on validation "
                           "from the fair study's grid, then test it on fresh seeds (the fair protocol)")
    fair.add_argument("--lr-grid", default=None, metavar="RATES",
                      help="learning rates every method is tuned over, comma-separated, e.g. 1e-4,3e-4,1e-3 "
                           "(default: the fair study's, quarter-decade steps from 1e-4 to 10^-2.5)")
    fair.add_argument("--final-seeds", default=None, metavar="N|SEEDS",
                      help="final runs at each method's chosen rate: a count of fresh seeds (default 8, "
                           "from the power analysis --plan prints) or a list; never a tuning seed (--seeds are the "
                           "tuning seeds)")
    fair.add_argument("--delta", default=None, metavar="POINTS",
                      help="the smallest effect of interest in accuracy points (default: the study file's, 2 in "
                           "the built-in study): 'equivalent' means the 90%% interval of the gain lies inside "
                           "+-delta; fixed when the study is created, before any result")
    fair.add_argument("--planned-sd", default=None, metavar="POINTS",
                      help="the paired per-seed SD of a gain that --plan assumes, in points (default: pooled from "
                           "this study's final runs where they exist, else 2.5, stated as an assumption)")
    fair.add_argument("--plan", action="store_true", default=False,
                      help="print the design before any trial and exit: trials, estimated wall time on this "
                           "machine, the minimum detectable effect at Holm's level and the chance of an "
                           "'equivalent' verdict when the methods are equal")
    group.add_argument("--stale-after", type=float, default=DEFAULT_STALE_AFTER_S, metavar="SECONDS",
                       help="a RUNNING trial without a heartbeat for this long belongs to a dead worker: it is "
                            f"marked FAILED and queued again (default: {DEFAULT_STALE_AFTER_S:g})")
    group.add_argument("--no-wait", action="store_true", default=False,
                       help="when only trials running in other workers are left, do not wait for them: say how "
                            "long to wait, exit 75 and write the report with those points marked missing")
    return parser


def check_study_options(stale_after: float | None = None, max_trials: int | None = None,
                        n_trials: int | None = None) -> None:
    """The study options no study could use, as one-line UserErrors (before anything is opened)."""
    if stale_after is not None and not (math.isfinite(stale_after) and stale_after > 0):
        raise UserError(f"--stale-after: must be a positive number of seconds (got {stale_after!r}); at 0 "
                        "workers would take each other's live trials for dead")
    if max_trials is not None and max_trials < 1:
        raise UserError(f"--max-trials: must be at least 1 (got {max_trials}); leave it out to run until the "
                        "queue is empty")
    if n_trials is not None and n_trials < 1:
        raise UserError(f"--n-trials: must be at least 1 (got {n_trials})")


def resolve_plan(study: StudyFile, typed: dict[str, Any], config_file: str | None, n_trials: int | None, *,
                 tune_lr: bool = False, lr_grid: str | None = None, final_seeds: str | None = None,
                 delta: str | None = None, planned_sd: str | None = None) -> StudyPlan:
    """The study file's options, then --config, then the command line, resolved into a StudyPlan."""
    from harness.config import config_from_dict, load_config_yaml

    study = fair_study(study, typed, tune_lr, lr_grid, final_seeds, delta, planned_sd)
    values: dict[str, Any] = dict(study.run)
    if config_file:  # a run's config.yaml works too: its methods and run name are the study's to set
        values.update({k: v for k, v in load_config_yaml(config_file).items() if k not in ("methods", "run_name")})
    if "methods" in typed:
        raise UserError("--methods: a study sets the method per trial; edit the study's 'space:' instead")
    if "run_name" in typed:
        raise UserError("--run-name: a study names its runs itself (study-NAME, trial-N); drop --run-name, or "
                        "copy the study file under another name for a separate study")
    seeds = values.pop("seeds", None)
    values.update(typed)
    seeds = values.pop("seeds", seeds) or study.seeds
    values.setdefault("lr", DEFAULT_LR)  # a study's trials share one rate (or tune it): never the run's table
    if values["lr"] is None:
        values["lr"] = DEFAULT_LR
    cfg = config_from_dict({**values, "seeds": seeds}, source=f"study {study.name!r}")
    paths = {"tracking_uri": _absolute_tracking_uri(cfg.tracking_uri), "output_dir": str(Path(cfg.output_dir).resolve())}
    if cfg.data_dir:
        paths["data_dir"] = str(Path(cfg.data_dir).resolve())
    if Path(cfg.train_data).suffix in (".json", ".jsonl") and Path(cfg.train_data).is_file():
        paths["train_data"] = str(Path(cfg.train_data).resolve())
    config = dataclasses.replace(cfg, methods=[spec_of(p) for p in study.points], **paths)
    plan = StudyPlan(name=study.name, kind=study.kind, config=config, seeds=list(cfg.seeds), points=study.points,
                     description=study.description, n_trials=n_trials or study.n_trials, lr=study.lr,
                     pruner=study.pruner, intermediate_every=study.intermediate_every, plot_x=study.plot_x)
    plan.study_kind.complete_plan(plan, study, "--final-seeds" if final_seeds is not None
                                  else f"{study.source}: final_seeds")
    for spec in plan.specs():  # the study's common options (rank, targets ...) with each point's own
        parse_spec(spec, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets)
    return plan


def fair_study(study: StudyFile, typed: dict[str, Any], tune_lr: bool, lr_grid: str | None,
               final_seeds: str | None, delta: str | None = None, planned_sd: str | None = None) -> StudyFile:
    """The study with the fair protocol's options applied: --tune-lr, --lr-grid, --final-seeds, --delta,
    --planned-sd, fair's --methods.

    ``--tune-lr`` turns a grid study into a fair one over the same points, named ``<study>_tuned_lr``
    (its own storage entry and results folder), with the built-in fair study's grid and seeds.
    """
    kind = KINDS[study.kind]
    if tune_lr:
        if not kind.takes_tune_lr:
            raise UserError(f"--tune-lr: only grid studies take it ({study.name!r} is kind {study.kind}"
                            + ("; it tunes the rate already)" if kind.fair_protocol else ")"))
        if any("lr" in p for p in study.points):
            raise UserError(f"--tune-lr: {study.name!r} fixes lr in its space; remove it there")
        fair.check_references(study.points, f"--tune-lr: {study.source or study.name}")
        protocol = load_study_file("fair")
        study = dataclasses.replace(study, name=f"{study.name}_tuned_lr", kind="fair", seeds=protocol.seeds,
                                    lr_grid=protocol.lr_grid, final_seeds=protocol.final_seeds,
                                    extend=protocol.extend, intermediate_every=protocol.intermediate_every,
                                    pruner=protocol.pruner, delta=protocol.delta, planned_sd=protocol.planned_sd)
    if not KINDS[study.kind].fair_protocol:
        for flag, value in (("--lr-grid", lr_grid), ("--final-seeds", final_seeds), ("--delta", delta),
                            ("--planned-sd", planned_sd)):
            if value is not None:
                raise UserError(f"{flag}: only the fair protocol takes it (a kind fair study, or --tune-lr)")
        return study
    if "methods" in typed:
        study = dataclasses.replace(study, points=fair.points_of_methods(typed.pop("methods")))
    if lr_grid is not None:
        study = dataclasses.replace(study, lr_grid=fair.lr_grid_from(lr_grid, "--lr-grid"))
    if final_seeds is not None:
        study = dataclasses.replace(study, final_seeds=final_seeds)
    if delta is not None:
        study = dataclasses.replace(study, delta=fair.points_from(delta, "--delta"))
    if planned_sd is not None:
        study = dataclasses.replace(study, planned_sd=fair.points_from(planned_sd, "--planned-sd"))
    return study


def _absolute_tracking_uri(uri: str | None) -> str:
    """MLflow's SQLite file as an absolute path, so every worker writes to the same store."""
    uri = resolve_tracking_uri(uri)
    db = sqlite_path(uri)
    return "sqlite:///" + str(db.resolve()) if db is not None else uri


def create_or_resume(plan: StudyPlan, storage, url: str, *, retry_failed: bool = False,
                     stale_after: float = DEFAULT_STALE_AFTER_S, imported: bool = False, log=print) -> StudyPlan:
    """Create the study (schema, Optuna studies, queue, MLflow parent run) or check and continue an existing one.

    ``imported``: :func:`import_arms` has just copied some of its arms in; the study is being created around them.
    """
    import optuna

    check_tracking_uri(plan.config.tracking_uri)
    existing = set(optuna.get_all_study_names(storage))
    names = plan.optuna_names()
    stored = next((_stored_plan(optuna.load_study(study_name=n, storage=storage)) for n in names if n in existing), None)
    creating = False  # this process won the creation: it alone creates the studies and the MLflow run
    if stored is None:
        creating = names[0] not in existing and _claim_creation(plan, storage, names[0])
        if not creating:  # another study command is creating it this moment: continue it once it is ready
            stored = _wait_for_plan(names[0], storage, url)
            existing = set(optuna.get_all_study_names(storage))
    tracker = Tracker(plan.config.tracking_uri, plan.config.experiment)
    if stored is not None:
        _check_same(stored, plan, url)
        for name in names:  # dead workers' trials first (their runs end FAILED), then other killed processes' runs
            if name in existing:
                fail_stale_trials(optuna.load_study(study_name=name, storage=storage), storage, plan, stale_after, log)
    tracker.reconcile(log)
    if stored is not None:
        if tracker.has_run(stored.mlflow_parent_run_id):
            plan.mlflow_parent_run_id = stored.mlflow_parent_run_id
            tracker.client.update_run(plan.mlflow_parent_run_id, status="RUNNING")
        else:  # the journal travelled to another machine (or MLflow store): the trials go on under a new parent run
            _create_parent_run(tracker, plan, url)
            if not imported:
                log(f"study {plan.name!r}: its MLflow parent run is not in {redact(plan.config.tracking_uri)} "
                    "(another machine or a new MLflow store); the remaining trials are logged under a new parent "
                    "run there, the finished ones stay where they were logged")
        log(f"study {plan.name!r}: " + (f"created in {redact(url)} around the imported arms" if imported
                                        else f"continuing in {redact(url)}"))
    else:
        _create_parent_run(tracker, plan, url)
        log(f"study {plan.name!r}: created in {redact(url)}")
    for name in names:
        if name in existing:
            study = optuna.load_study(study_name=name, storage=storage)
            study.set_user_attr(PLAN_ATTR, plan.to_attr())  # a grown tuning budget, the same everything else
            queued = top_up(study, storage, plan, retry_failed, log=log)
        else:  # the first study exists already where this process claimed the creation
            study = optuna.create_study(study_name=name, storage=storage, directions=plan.directions(),
                                        load_if_exists=True)
            for params, attrs in plan.queue(name):
                study.enqueue_trial(params, user_attrs=attrs)
            queued = len(plan.queue(name))
            if name != names[0] or not creating:  # a created study's first one gets its plan last, below
                study.set_user_attr(PLAN_ATTR, plan.to_attr())
        log(f"[{name}] {queued} trial(s) queued, {_count(study)}")
    if creating:  # last: the plan on the first study tells the other study commands that the study is ready
        optuna.load_study(study_name=names[0], storage=storage).set_user_attr(PLAN_ATTR, plan.to_attr())
    return plan


def _exists(plan: StudyPlan, storage) -> bool:
    import optuna

    return bool(set(plan.optuna_names()) & set(optuna.get_all_study_names(storage)))


# What may differ between a fair study and one it imports arms from: what it compares and what it is called.
IMPORT_MAY_DIFFER = ("name", "description", "points", *RESUMABLE_CHANGES)


def importable(plan: StudyPlan, source_storage, source_url: str) -> tuple[StudyPlan, list[str]]:
    """(the fair study in ``source_storage``, the specs ``plan`` shares with it), or a one-line UserError: the
    storage must hold exactly one fair study, run with every setting that decides a trial as ``plan`` has it."""
    import optuna

    found = {}
    for name in optuna.get_all_study_names(source_storage):
        other = _stored_plan(optuna.load_study(study_name=name, storage=source_storage))
        if other is not None and other.study_kind.fair_protocol:
            found.setdefault(other.name, other)
    if len(found) != 1:
        raise UserError(f"--import-arms: {redact(source_url)} holds {len(found)} fair studies "
                        f"({', '.join(sorted(found)) or 'none'}); it must hold exactly one")
    source = next(iter(found.values()))
    diffs = _differences(source, plan, IMPORT_MAY_DIFFER, "{old!r} there, {new!r} here")
    if diffs:
        raise UserError(f"--import-arms: study {source.name!r} in {redact(source_url)} was run with other settings "
                        f"({', '.join(diffs)}); its trials would not be this study's")
    shared = [spec for spec in plan.specs() if spec in source.specs()]
    if not shared:
        raise UserError(f"--import-arms: study {source.name!r} shares no method with {plan.name!r} "
                        f"(it has {', '.join(source.specs())})")
    return source, shared


def import_arms(plan: StudyPlan, storage, url: str, source_storage, source_url: str, log=print,
                tuning_only: bool = False) -> list[str]:
    """Copy into ``storage`` the trials of every method ``plan`` shares with the fair study in ``source_storage``.

    ``tuning_only``: copy only their tuning trials; their final seeds are queued as for any tuned arm and
    run again at the copied choice (what ``--import-tuning-only`` does).

    A study that adds arms to a finished one (the controls beside their parents) then trains only the new
    arms, and its verdicts pair each control with its parent's own final seeds. Only where every setting
    that decides a trial is the same (model, data, grid, extension, tuning and final seeds, delta, every run
    option): a method's trials depend on nothing else, so the copies are what this study would have run.
    Each copied Optuna study (``optuna.copy_study``) takes this study's name and plan; its trials keep their
    scores, per-item verdicts, diagnostics and MLflow run ids. Nothing is done once the study exists (a
    resumed command); the specs copied are returned.
    """
    import optuna

    if _exists(plan, storage):
        log(f"study {plan.name!r} exists in {redact(url)}: --import-arms ignored (arms are imported at creation)")
        return []
    source, shared = importable(plan, source_storage, source_url)
    stages = (fair.tune_name,) if tuning_only else (fair.tune_name, fair.final_name)
    running = [spec for spec in shared for stage in stages
               if optuna.load_study(study_name=stage(source, spec), storage=source_storage).get_trials(
                   deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    if running:
        raise UserError(f"--import-arms: study {source.name!r} has trials of {', '.join(sorted(set(running)))} "
                        "still running; import once they have finished")
    if tuning_only:  # the finals rerun at the copied choice: every shared arm must have made it
        unsettled = [spec for spec in shared if fair.tuning_state(source, optuna.load_study(
            study_name=fair.tune_name(source, spec), storage=source_storage).get_trials(deepcopy=False)).best is None]
        if unsettled:
            raise UserError(f"--import-tuning-only: study {source.name!r} has not chosen a rate for "
                            f"{', '.join(unsettled)} (its tuning is unfinished); finish it there first, or this study "
                            "would tune again and could choose another rate")
    for spec in shared:
        for src, dst in ((stage(source, spec), stage(plan, spec)) for stage in stages):
            try:
                optuna.copy_study(from_study_name=src, from_storage=source_storage, to_storage=storage,
                                  to_study_name=dst)
            except optuna.exceptions.DuplicatedStudyError:
                raise UserError(f"--import-arms: study {plan.name!r} was created in {redact(url)} by another "
                                "command while this one imported; run the command again without --import-arms "
                                "to continue it") from None
            optuna.load_study(study_name=dst, storage=storage).set_user_attr(PLAN_ATTR, plan.to_attr())
    log(f"study {plan.name!r}: imported the {'tuning ' if tuning_only else ''}trials of {', '.join(shared)} from "
        f"study {source.name!r} in {redact(source_url)}" + ("; their final seeds run again" if tuning_only else ""))
    return shared


CREATION_WAIT_S = 60.0  # how long a study command waits for another one that is creating the same study


def _claim_creation(plan: StudyPlan, storage, name: str) -> bool:
    """Create the plan's first Optuna study (without its plan yet); False if another process created it first."""
    import optuna

    try:
        optuna.create_study(study_name=name, storage=storage, directions=plan.directions())
    except optuna.exceptions.DuplicatedStudyError:
        return False
    return True


def _wait_for_plan(name: str, storage, url: str, timeout_s: float | None = None, poll_s: float = 0.2) -> StudyPlan:
    """The plan of a study another process is creating, once it has written it (the last step of creation)."""
    import optuna

    deadline = time.monotonic() + (CREATION_WAIT_S if timeout_s is None else timeout_s)
    while True:
        plan = _stored_plan(optuna.load_study(study_name=name, storage=storage))
        if plan is not None:
            return plan
        if time.monotonic() > deadline:
            raise UserError(f"study {name.split('/')[0]!r} in {redact(url)} was begun by another process that has not "
                            "finished creating it; if that process died, delete the study (optuna delete-study) "
                            "and run the command again")
        time.sleep(poll_s)


def top_up(study, storage, plan: StudyPlan, retry_failed: bool = False, log=None) -> int:
    """Queue what a resumed study still lacks (the kind's ``top_up``: grid points with no live or finished
    trial, the rest of a tuning budget, a fair study's next stage)."""
    return plan.study_kind.top_up(study, storage, plan, retry_failed, log=log)


def _count(study) -> str:
    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"


def _stored_plan(study) -> StudyPlan | None:
    value = study.user_attrs.get(PLAN_ATTR)
    return StudyPlan.from_attr(value) if value else None



def _create_parent_run(tracker: Tracker, plan: StudyPlan, url: str) -> None:
    """The study's MLflow parent run, with the settings every trial shares as its parameters."""
    with_tags = {"kind": "study", "study": plan.name, "study_kind": plan.kind, "storage": redact(url)}
    created = tracker.client.create_run(tracker.experiment_id, run_name=f"study-{plan.name}",
                                        tags={"mlflow.runName": f"study-{plan.name}", **with_tags})
    plan.mlflow_parent_run_id = created.info.run_id
    RunHandle(tracker.client, plan.mlflow_parent_run_id, plan.name).log_params(
        {**run_params(plan.shared_options()), "points": len(plan.points), "seeds": plan.seeds,
         "n_trials": plan.n_trials, "description": plan.description,
         **plan.study_kind.parent_run_params(plan)})


def _differences(old_plan: StudyPlan, plan: StudyPlan, may_differ, change: str) -> list[str]:
    """The settings in which ``plan`` differs from ``old_plan``, apart from ``may_differ`` and where runs go:
    plan keys by name, run options as ``--option (change)`` with ``change`` formatted from old and new."""
    old, new = old_plan.to_attr(), plan.to_attr()
    for key in may_differ:
        old.pop(key, None), new.pop(key, None)
    for key in RESUMABLE_CONFIG:
        old["config"].pop(key, None), new["config"].pop(key, None)
    diffs = [k for k in new if old.get(k) != new[k] and k != "config"]
    return diffs + [f"--{k.replace('_', '-')} ({change.format(old=old['config'].get(k), new=v)})"
                    for k, v in new["config"].items() if old["config"].get(k) != v]


def _check_same(stored: StudyPlan, plan: StudyPlan, url: str) -> None:
    """A resumed study must run what it was created with; otherwise its trials would not be comparable."""
    diffs = _differences(stored, plan, RESUMABLE_CHANGES, "{old!r} -> {new!r}")
    if diffs:
        raise UserError(f"study {plan.name!r} already exists in {redact(url)} with other settings: {', '.join(diffs)}; "
                        "give the same options to continue it, or pass another --storage")


def load_plan(name: str, storage, url: str) -> StudyPlan:
    """The plan of an existing study (for workers and --report-only), or a one-line UserError."""
    import optuna

    try:
        names = optuna.get_all_study_names(storage)
    except Exception as err:
        raise UserError(f"cannot read storage {redact(url)!r}: {str(err).splitlines()[0][:200]}") from err
    match = next((n for n in names if n == name or n.startswith(name + "/")), None)
    study = load_existing_study(match or name, storage, url)
    plan = _stored_plan(study)
    if plan is None:
        raise UserError(f"study {name!r} in {redact(url)} was not created by python -m ablations.study")
    return plan


@cli_entry
def main(argv: list[str] | None = None) -> int:
    quiet.offline_environment()
    args = vars(build_parser().parse_args(argv))
    quiet.configure(verbose=args.pop("verbose", False))
    name = args.pop("study")
    options = {k: args.pop(k) for k in ("storage", "create_only", "report_only", "report_dir", "retry_failed", "n_trials",
                                        "max_trials", "stale_after", "tune_lr", "lr_grid", "final_seeds",
                                        "no_wait", "delta", "planned_sd", "plan", "import_arms",
                                        "import_tuning_only")}
    check_study_options(options["stale_after"], options["max_trials"], options["n_trials"])
    if options["import_tuning_only"] and options["import_arms"] is None:
        raise UserError("--import-tuning-only: it says what --import-arms copies; give --import-arms URL too")
    config_file = args.pop("config", None)
    url = resolve_storage_url(options["storage"])
    if options["report_only"]:
        storage = open_storage(url, create=False)
        if name.endswith((".yaml", ".yml")):  # the study's name is the file's `name:` (its stem when it has none)
            name = load_study_file(name).name
        plan = load_plan(name + ("_tuned_lr" if options["tune_lr"] else ""), storage, url)
        plan.report_to = options["report_dir"]
        print(f"report written to {write_report(plan, storage)}")
        return 0
    study_file = load_study_file(name)
    plan = resolve_plan(study_file, args, config_file, options["n_trials"], tune_lr=options["tune_lr"],
                        lr_grid=options["lr_grid"], final_seeds=options["final_seeds"], delta=options["delta"],
                        planned_sd=options["planned_sd"])
    if options["plan"]:
        source = None
        if options["import_arms"] is not None:
            source_url = resolve_storage_url(options["import_arms"])
            source = (open_storage(source_url, create=False), source_url)
        print(design_text(plan, url, source, tuning_only=options["import_tuning_only"]))
        return 0
    plan.report_to = options["report_dir"]
    check_inputs(plan)
    check_separate_stores(url, plan.config.tracking_uri)
    if options["import_arms"] is not None and not plan.study_kind.fair_protocol:
        raise UserError(f"--import-arms: only a fair study imports arms ({plan.name!r} is a {plan.kind} study)")
    storage = open_storage(url, create=True)
    imported = False
    if options["import_arms"] is not None:
        source_url = resolve_storage_url(options["import_arms"])
        if source_url == url:
            raise UserError("--import-arms: names the study's own --storage; give the other study's storage")
        if _exists(plan, storage):  # a resumed command: the arms came in at creation; the source may be gone
            print(f"study {plan.name!r} exists in {redact(url)}: --import-arms ignored (arms are imported at "
                  "creation)")
        else:
            imported = bool(import_arms(plan, storage, url, open_storage(source_url, create=False), source_url,
                                        tuning_only=options["import_tuning_only"]))
    plan = create_or_resume(plan, storage, url, retry_failed=options["retry_failed"], imported=imported,
                            stale_after=options["stale_after"])
    plan.report_to = options["report_dir"]
    if options["create_only"]:
        print(f"study {plan.name!r} ready; start workers with: python -m ablations.worker {plan.name} "
              f"--storage {redact(url)}")
        return 0
    try:
        done = work(plan, storage, max_trials=options["max_trials"], stale_after=options["stale_after"],
                    wait=not options["no_wait"])
    except KeyboardInterrupt as err:
        finish_parent_run(plan, storage, interrupted=True)
        print(f"\n{interruption(err)}: the running trial is FAILED and queued again; run the same command to "
              "continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    waiting, running = pending_trials(plan, storage)
    folder = write_report(plan, storage)
    print(f"report written to {folder}; dashboard: optuna-dashboard {redact(url).removeprefix('journal:')}")
    if running and options["no_wait"]:
        print(f"error: study {plan.name!r} is not finished: {describe_running(running, options['stale_after'])}; "
              f"run the same command again once it has finished, or in {seconds_until_stale(running, options['stale_after']):.0f} s "
              "at the latest if its worker has died (the report marks its points missing)", file=sys.stderr)
        return EXIT_TRY_LATER
    if waiting or running:  # only --max-trials stops with trials left
        print(f"stopped after --max-trials {options['max_trials']} trial(s) ({done} run here): {waiting} still queued, "
              f"{len(running)} running elsewhere; run the same command to continue")
    return 0


def check_inputs(plan: StudyPlan) -> None:
    """What every trial would read or write, checked once before the study starts (one line each, exit 2)."""
    from harness import data as hdata  # deferred, as below: both load torch
    from harness.evaluate import task_data_checksums

    cfg = plan.trial_config(plan.specs()[0], plan.seeds, 0)
    check_writable_dir(report_dir(plan), "--report-dir" if getattr(plan, "report_to", None) else "--output-dir")
    data_dir = hdata.resolve_data_dir(cfg.data_dir)
    task_data_checksums(cfg.tasks, data_dir, cfg.prompt_format)
    hdata.load_records(cfg.train_data, data_dir, seed=cfg.seeds[0])



def design_text(plan: StudyPlan, url: str, source: tuple[Any, str] | None = None, tuning_only: bool = False) -> str:
    """What ``--plan`` prints: the design of a fair study before any trial (nothing is created or run).

    ``source`` (storage, url): the study ``--import-arms`` names. Before this study exists, the arms it would
    import are not counted as trials to run (``tuning_only``: their tuning trials only), and the SD and the
    time per trial come from that study's runs.
    """
    import optuna

    if not plan.study_kind.fair_protocol:
        return (f"study {plan.name!r} ({plan.kind}): {len(plan.points)} point(s) x {len(plan.seeds)} seed(s); "
                "--plan's power figures are for fair studies (kind fair, or --tune-lr)")
    results, timing = None, None
    try:
        storage = open_storage(url, create=False)
        names = set(optuna.get_all_study_names(storage))
    except UserError:
        storage, names = None, set()
    if storage is not None and set(plan.optuna_names()) <= names:
        trials = [t for n in plan.optuna_names()
                  for t in optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False)]
        seconds = fair.measured_trial_seconds(trials)
        if seconds is not None:
            timing = (seconds, "the median of this study's finished trials")
        results = fair.method_results(plan, storage)
    imported: list[str] = []
    if source is not None and results is None:
        other, imported = importable(plan, *source)
        results = fair.method_results(other, source[0])
        trials = [t for n in other.optuna_names()
                  for t in optuna.load_study(study_name=n, storage=source[0]).get_trials(deepcopy=False)]
        seconds = fair.measured_trial_seconds(trials)
        if seconds is not None:
            timing = (seconds, f"the median of {other.name}'s finished trials")
    if timing is None:
        timing = _timing_from_runs(plan)
    d = fair.design(plan, results, timing)
    head = [f"fair study {plan.name!r}: {', '.join(plan.specs())}; delta {100 * (plan.delta or 0.02):.1f} points; "
            f"{plan.config.max_steps or str(plan.config.epochs) + ' epoch(s) of'} steps per trial on {plan.config.model}"]
    if imported:  # their trials are copied, not run: count only the arms this study trains
        share = (len(plan.points) - len(imported)) / len(plan.points)
        d = dataclasses.replace(d, tuning_trials=round(d.tuning_trials * share),
                                tuning_trials_max=round(d.tuning_trials_max * share),
                                final_trials=d.final_trials if tuning_only else round(d.final_trials * share),
                                methods_run=len(plan.points) - len(imported),  # the arms it tunes
                                sd_source=d.sd_source.replace("this study's", f"{other.name}'s"))
        head.append(f"imported from study {other.name!r}: the tuning trials of {', '.join(imported)}, whose final "
                    "seeds run again; the trial counts and the time below are for what runs"
                    if tuning_only else f"imported from study {other.name!r} (not run again): {', '.join(imported)}; "
                    "the trial counts and the time below are for the other arms")
    return "\n".join(head + fair.design_lines(d, plan) + ["nothing was created or run (--plan)"])


def _timing_from_runs(plan: StudyPlan) -> tuple[float, str] | None:
    """Seconds per trial from earlier harness.run runs of the same model under the output folder (training only)."""
    import json

    per_step = []
    for path in sorted(Path(plan.config.output_dir).glob("*/result.json"))[-20:]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("config", {}).get("model") != plan.config.model:
            continue
        per_step += [s["seconds_per_step"] for s in data.get("systems", [])
                     if isinstance(s.get("seconds_per_step"), (int, float)) and math.isfinite(s["seconds_per_step"])]
    if not per_step or not plan.config.max_steps:
        return None
    per_step.sort()
    median = per_step[len(per_step) // 2]
    return (median * plan.config.max_steps,
            f"training only, from {len(per_step)} method run(s) of {plan.config.model} in {plan.config.output_dir} "
            f"at {median:.2f} s per step; evaluation comes on top")


if __name__ == "__main__":
    sys.exit(main())
