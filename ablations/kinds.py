"""Study kinds: what makes a grid, a tpe, a pareto and a fair study differ, one class each.

A study file's ``kind:`` names an entry of :data:`KINDS`; the plan stores that name (the Optuna journals keep
it as a string) and :attr:`ablations.trials.StudyPlan.study_kind` returns the object. Everything that depends
on the kind is a hook of :class:`StudyKind`, reached from one place each:

- the study file (:mod:`ablations.studyfile`): the keys a kind requires, takes or refuses, their checks, and
  how many trials it queues at most;
- the plan and its Optuna studies (:mod:`ablations.trials`, :mod:`ablations.study`): the fields a kind adds
  to the plan, its Optuna study names, directions, sampler, pruner, initial queue and ``top_up``;
- a trial (:mod:`ablations.trials`): its configuration (``suggest``), whether it is a tuning trial (pruned on
  intermediate scores), the values it tells Optuna, how a killed one is queued again, and the worker loop's
  hooks (``top_up`` each pass where the queue grows as trials settle; ``duplicate_of``);
- the report (:mod:`ablations.report`): which writer, plots and lines the kind's report has.

Adding a kind is one new subclass of :class:`StudyKind` and one entry in :data:`KINDS` (and its docs). The fair
kind delegates to :mod:`ablations.fair`, where its protocol lives.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from ablations import fair
from ablations.space import spec_of
from harness.errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

LR_KEYS = ("low", "high", "log")
PRUNER_KEYS = ("n_startup_trials", "n_warmup_steps")
# A fair study states its whole protocol: no key falls back on a default a reader cannot see.
FAIR_REQUIRED = ("space", "seeds", "lr_grid", "final_seeds", "extend", "delta")
FAIR_ONLY = ("lr_grid", "final_seeds", "extend", "delta", "planned_sd")
TPE_ONLY = ("n_trials", "lr", "pruner", "intermediate_every")
# A fair study prunes its tuning trials as a tpe study does; its rates come from lr_grid and its trial count from
# the grid and final_seeds, so a tpe study's n_trials and lr are refused in it (they would be read by nothing).
FAIR_TOLERATED = ("pruner", "intermediate_every")


class StudyKind:
    """The hooks of one kind of study; the defaults are a grid's (every point and seed queued once)."""

    name: str = ""
    directions: tuple[str, ...] = ("maximize",)
    # study file: keys a study of this kind must state; keys only this kind takes (other kinds refuse them, the
    # message ending with ``refusal_hint``); keys of other kinds this one does not refuse
    required_keys: tuple[str, ...] = ()
    only_keys: tuple[str, ...] = ()
    refusal_hint: str = ""
    tolerated_keys: tuple[str, ...] = ()
    reads_instead: dict[str, str] = {}  # a refused key -> what this kind reads in its place, for the message
    queue_grows: bool = False  # the worker loop calls top_up every pass and waits for other workers' trials
    tunes_lr: bool = False  # the study chooses each trial's learning rate (none shares the run's)
    fair_protocol: bool = False  # the fair protocol's options apply (--lr-grid, --final-seeds, --delta, --plan ...)
    takes_tune_lr: bool = False  # --tune-lr turns a study of this kind into a fair one over the same points
    trial_attr_columns: tuple[str, ...] = ()  # trial user attributes trials.csv adds as columns
    axis_title_note: str = ""  # what the score plot's title adds

    # ---- the study file

    def check_file(self, study, data: dict[str, Any], fail) -> None:
        """Check and store the kind's own keys of a study file (``study`` is the StudyFile being built)."""

    def planned_trials(self, study) -> int:
        """How many trials the study queues at most."""
        return len(study.points) * len(study.seeds)

    # ---- the plan and its Optuna studies

    def complete_plan(self, plan, study, final_seeds_where: str) -> None:
        """Set the StudyPlan fields the kind takes from the (resolved) study file beyond the common ones."""

    def optuna_names(self, plan) -> list[str]:
        return [plan.name]

    def initial_queue(self, plan, optuna_name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The trials to queue at creation, as (fixed params, user attrs)."""
        return [({**point, "seed": seed}, {"grid_index": k, "spec": spec_of(point), "seed": seed})
                for k, (point, seed) in enumerate(plan.grid())]

    def sampler(self, plan):
        import optuna

        return optuna.samplers.RandomSampler()  # grid trials only take queued values

    def pruner(self, plan):
        import optuna

        return optuna.pruners.NopPruner()

    def top_up(self, study, storage, plan, retry_failed: bool = False, log=None) -> int:
        """Queue what a resumed study still lacks: grid points with no live or finished trial."""
        from optuna.trial import TrialState

        alive = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        by_index = defaultdict(list)
        for t in study.get_trials(deepcopy=False):
            by_index[t.user_attrs.get("grid_index")].append(t)
        queue = dict(enumerate(plan.queue(study.study_name)))
        missing = 0
        for k, (params, attrs) in queue.items():
            runs = by_index.get(k, [])
            if any(t.state in alive for t in runs):
                continue
            if not runs or retry_failed or all(t.user_attrs.get("killed") for t in runs):
                study.enqueue_trial(params, user_attrs={**attrs, **({"retry_of": runs[-1].number} if runs else {})})
                missing += 1
        return missing

    def duplicate_of(self, study, trial) -> int | None:
        """The trial queued first for the same slot, when this one was queued twice at once (only where the queue grows)."""
        return None

    def parent_run_params(self, plan) -> dict[str, Any]:
        """Parameters the study's MLflow parent run logs beyond the common ones."""
        return {}

    # ---- a trial

    def suggest(self, trial, plan) -> tuple[str, list[int], float | None]:
        """The trial's method spec, seeds and learning rate (None: the study's shared rate)."""
        point, seed = plan.grid()[trial.user_attrs["grid_index"]]
        choices = plan.choices()
        for key in point:  # records the options as parameters (dashboard, importances); the values are the queued ones
            trial.suggest_categorical(key, choices[key])
        trial.suggest_categorical("seed", choices["seed"])
        return trial.user_attrs["spec"], [seed], None

    def is_tuning(self, trial) -> bool:
        """Whether the trial evaluates (and is pruned) every ``intermediate_every`` steps."""
        return False

    def values(self, average: float, params: int):
        """What the trial tells Optuna, in the order of ``directions``."""
        return average

    def requeue_params(self, plan, frozen, attrs: dict[str, Any]) -> dict[str, Any]:
        """The fixed params of a failed trial queued again (same grid point and seed)."""
        point, seed = plan.grid()[frozen.user_attrs["grid_index"]]
        return {**point, "seed": seed}

    # ---- the report

    def write_report(self, plan, storage) -> Path:
        from ablations import report  # deferred: ablations.report loads pandas

        return report.write_summary_report(plan, storage)

    def summary_plots(self) -> tuple:
        """The summary report's plots: functions (plan, storage, trials, points, folder) -> path or None."""
        from ablations import report  # deferred: ablations.report loads pandas

        return (report._plot_axis, report._plot_importances)

    def point_table(self, plan, trials):
        """Per configuration, the score over seeds (None: the kind's summary has no such table)."""
        from ablations import report  # deferred: ablations.report loads pandas

        return report.point_table(plan, trials)

    def kind_note(self, plan) -> str:
        """What the summary's ``kind`` line adds after the kind's name."""
        return ""

    def point_lines(self, points) -> list[str]:
        """Lines the summary adds after the table of configurations."""
        return []

    def scored_seeds(self, plan) -> list[int]:
        """The seeds each configuration's score is a mean over (the score plot's title)."""
        return plan.seeds

    def importance_target(self):
        """Optuna's importance target (None: the single objective)."""
        return None


class Grid(StudyKind):
    """Every point and seed once, at the study's shared learning rate; one Optuna study."""

    name = "grid"
    takes_tune_lr = True


class Pareto(StudyKind):
    """A grid with two objectives: average accuracy (maximised) and trainable parameters (minimised)."""

    name = "pareto"
    directions = ("maximize", "minimize")

    def values(self, average: float, params: int):
        return (average, params)

    def summary_plots(self) -> tuple:
        from ablations import report  # deferred: ablations.report loads pandas

        return (report._plot_pareto, report._plot_importances)

    def point_lines(self, points) -> list[str]:
        from ablations import report  # deferred: ablations.report loads pandas

        front = report.pareto_front(points)
        return ["", "Pareto front (no other configuration is both more accurate and smaller): "
                + (", ".join(f"`{s}`" for s in front["spec"]) if len(front) else "none yet")]

    def importance_target(self):
        # with a target, the evaluator assumes lower is better: the accuracy is negated
        return lambda t: -t.values[0]


class Tpe(StudyKind):
    """A learning rate per method: one Optuna study per point of ``n_trials`` trials, TPE in ``lr``, pruned."""

    name = "tpe"
    only_keys = TPE_ONLY
    tunes_lr = True

    def check_file(self, study, data: dict[str, Any], fail) -> None:
        study.n_trials = _positive_int(data.get("n_trials", 20), "n_trials", fail)
        study.lr = _lr_range(data.get("lr"), fail)
        study.intermediate_every = (None if data.get("intermediate_every") is None
                                    else _positive_int(data["intermediate_every"], "intermediate_every", fail))
        study.pruner = _pruner(data.get("pruner"), fail)
        if any("lr" in p for p in study.points):
            raise fail("space", "a tpe study tunes lr itself: remove lr from the space")

    def planned_trials(self, study) -> int:
        return len(study.points) * (study.n_trials or 0)

    def optuna_names(self, plan) -> list[str]:
        return [f"{plan.name}/{spec}" for spec in plan.specs()]

    def initial_queue(self, plan, optuna_name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        spec = optuna_name.split("/", 1)[1]
        return [({}, {"spec": spec, "split": "validation"}) for _ in range(plan.n_trials or 0)]

    def sampler(self, plan):
        import optuna

        return optuna.samplers.TPESampler(n_startup_trials=min(10, max(2, (plan.n_trials or 0) // 3)))

    def pruner(self, plan):
        return _median_pruner(plan)

    def top_up(self, study, storage, plan, retry_failed: bool = False, log=None) -> int:
        """Queue the rest of the budget: trials neither alive nor failed count against it (killed ones do not)."""
        from optuna.trial import TrialState

        alive = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        used = sum(t.state in alive or (t.state == TrialState.FAIL and not t.user_attrs.get("killed")
                                        and not retry_failed) for t in study.get_trials(deepcopy=False))
        missing = max(0, (plan.n_trials or 0) - used)
        for _ in range(missing):
            study.enqueue_trial({}, user_attrs={"spec": study.study_name.split("/", 1)[1], "split": "validation"})
        return missing

    def suggest(self, trial, plan) -> tuple[str, list[int], float | None]:
        lr = trial.suggest_float("lr", plan.lr["low"], plan.lr["high"], log=plan.lr["log"])
        return trial.user_attrs["spec"], list(plan.seeds), lr

    def is_tuning(self, trial) -> bool:
        return True

    def requeue_params(self, plan, frozen, attrs: dict[str, Any]) -> dict[str, Any]:
        return dict(frozen.params)  # the same sampled lr

    def summary_plots(self) -> tuple:
        from ablations import report  # deferred: ablations.report loads pandas

        return (report._plot_lr, report._plot_importances)

    def point_table(self, plan, trials):
        return None

    def kind_note(self, plan) -> str:
        return f" ({plan.n_trials} trials per method, lr in [{plan.lr['low']:g}, {plan.lr['high']:g}])"


class Fair(StudyKind):
    """Every method against LoRA under the fair protocol (ablations.fair): a rate tuned on validation per
    method from one grid, then fresh seeds scored once on test; its stages are queued as the one before settles."""

    name = "fair"
    required_keys = FAIR_REQUIRED
    only_keys = FAIR_ONLY
    refusal_hint = "; or pass --tune-lr"
    tolerated_keys = FAIR_TOLERATED
    reads_instead = {"lr": "; its rates are lr_grid's", "n_trials": "; its trials are lr_grid's rates and final_seeds"}
    queue_grows = True
    tunes_lr = True
    fair_protocol = True
    trial_attr_columns = ("stage", "lr_position", "duplicate_of")
    axis_title_note = ", each point at its own tuned lr"

    def check_file(self, study, data: dict[str, Any], fail) -> None:
        _fair_protocol(study, data, fail)

    def planned_trials(self, study) -> int:
        finals = len(fair.final_seeds_from(study.final_seeds, study.seeds, "final_seeds"))
        return len(study.points) * ((len(study.lr_grid) + 2 * study.extend) * len(study.seeds) + finals)

    def complete_plan(self, plan, study, final_seeds_where: str) -> None:
        plan.lr_grid, plan.extend = study.lr_grid, study.extend
        plan.delta, plan.planned_sd = study.delta, study.planned_sd
        plan.final_seeds = fair.final_seeds_from(study.final_seeds, plan.seeds, final_seeds_where)

    def optuna_names(self, plan) -> list[str]:
        return fair.optuna_names(plan)

    def initial_queue(self, plan, optuna_name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return fair.initial_queue(plan, optuna_name)

    def pruner(self, plan):
        return _median_pruner(plan)

    def top_up(self, study, storage, plan, retry_failed: bool = False, log=None) -> int:
        return fair.top_up(study, storage, plan, retry_failed, log=log)

    def duplicate_of(self, study, trial) -> int | None:
        return fair.duplicate_of(study, trial)

    def parent_run_params(self, plan) -> dict[str, Any]:
        return {"lr_grid": plan.lr_grid, "final_seeds": plan.final_seeds, "extend": plan.extend}

    def suggest(self, trial, plan) -> tuple[str, list[int], float | None]:
        return fair.suggest(trial, plan)

    def is_tuning(self, trial) -> bool:
        return trial.user_attrs.get("stage") == "tune"  # never a final (test) run

    def requeue_params(self, plan, frozen, attrs: dict[str, Any]) -> dict[str, Any]:
        return {"lr": attrs["lr"], "seed": attrs["seed"]}  # from the slot, not frozen.params: a trial killed before it suggested has none

    def write_report(self, plan, storage) -> Path:
        from ablations import report  # deferred: ablations.report loads pandas

        return report.write_fair_report(plan, storage)

    def scored_seeds(self, plan) -> list[int]:
        return plan.final_seeds


KINDS: dict[str, StudyKind] = {kind.name: kind for kind in (Grid(), Tpe(), Pareto(), Fair())}


def _median_pruner(plan):
    import optuna

    if not plan.intermediate_every:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=plan.pruner.get("n_startup_trials", 3),
                                       n_warmup_steps=plan.pruner.get("n_warmup_steps", 0))


# ----------------------------------------------------------------------------------------------------------
# The checks of the kinds' own study-file keys (moved from ablations.studyfile, which imports this module)


def _fair_protocol(study, data: dict[str, Any], fail) -> None:
    """A fair study's grid, final seeds, extensions and pruning, checked; every method is compared with lora."""
    def check(key, parse):
        try:
            return parse()
        except UserError as err:
            raise fail(key, str(err).split(": ", 1)[-1]) from None

    study.lr_grid = check("lr_grid", lambda: fair.lr_grid_from(data["lr_grid"], "lr_grid"))
    study.final_seeds = data["final_seeds"]
    check("final_seeds", lambda: fair.final_seeds_from(data["final_seeds"], study.seeds, "final_seeds"))
    extend = data["extend"]
    if not isinstance(extend, int) or isinstance(extend, bool) or extend < 0:
        raise fail("extend", f"must be a non-negative integer: grid steps added per side at most (got {extend!r})")
    if extend > fair.MAX_EXTEND:
        raise fail("extend", f"at most {fair.MAX_EXTEND} grid steps per side (got {extend}); "
                             "widen lr_grid instead")
    study.extend = extend
    study.delta = check("delta", lambda: fair.points_from(data["delta"], "delta"))
    if data.get("planned_sd") is not None:
        study.planned_sd = check("planned_sd", lambda: fair.points_from(data["planned_sd"], "planned_sd"))
    if any("lr" in p for p in study.points):
        raise fail("space", "a fair study tunes lr itself: remove lr from the space")
    check("space", lambda: fair.check_references(study.points, "space"))
    study.intermediate_every = (None if data.get("intermediate_every") is None
                                else _positive_int(data["intermediate_every"], "intermediate_every", fail))
    study.pruner = _pruner(data.get("pruner"), fail)


def _positive_int(value: Any, key: str, fail) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise fail(key, f"must be a positive integer (got {value!r})")
    return value


def _pruner(value: Any, fail) -> dict[str, int]:
    pruner = value or {}
    if not isinstance(pruner, dict):
        raise fail("pruner", f"must be a mapping with keys {', '.join(PRUNER_KEYS)}")
    for key, item in pruner.items():
        if key not in PRUNER_KEYS:
            raise fail(f"pruner.{key}", f"unknown key; valid keys: {', '.join(PRUNER_KEYS)}")
        if not isinstance(item, int) or item < 0:
            raise fail(f"pruner.{key}", f"must be a non-negative integer (got {item!r})")
    return dict(pruner)


def _lr_range(value: Any, fail) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail("lr", "a tpe study needs lr: {low: 1e-4, high: 1e-2, log: true}")
    for key in value:
        if key not in LR_KEYS:
            raise fail(f"lr.{key}", f"unknown key; valid keys: {', '.join(LR_KEYS)}")
    try:
        low, high = float(value["low"]), float(value["high"])
    except (KeyError, TypeError, ValueError):
        raise fail("lr", f"needs numbers low and high (got {value!r})") from None
    if not 0 < low < high:
        raise fail("lr", f"needs 0 < low < high (got low={low:g}, high={high:g})")
    return {"low": low, "high": high, "log": bool(value.get("log", True))}
