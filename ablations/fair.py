"""The fair protocol: every method gets the same learning-rate search, on validation, before one test.

At one shared learning rate a comparison of adapters mostly measures effective step size (under
Adam the middle matrices of MoSLoRA, LinChain or CondLoRA change how far dW moves per step), and
picking the best of many trials by test score overstates it. The protocol, per method spec:

1. **tuning** (Optuna study ``<study>/<spec>``): one trial per learning rate of the grid and tuning
   seed, every method the same grid, steps and seeds, scored (and pruned) on the validation split.
   The chosen rate has the best mean validation score over the tuning seeds (a tie goes to the
   smaller rate); a rate where any tuning seed failed or was pruned is not a candidate. When the
   chosen rate is the grid's lowest or highest, the grid grows one step on that side and the
   choice is made again, at most ``extend`` times per side.
2. **final** (Optuna study ``<study>/<spec>/final``): once the tuning of that spec is settled, one
   trial per final seed (fresh: disjoint from the tuning seeds) at the chosen rate, scored on the
   test split once. No test score exists for any other rate.

Every decision is a pure function of the finished trials in the storage, so any worker takes the
same one: whichever worker sees a spec settled queues its final trials. Two workers may queue the
same slot at the same moment; the lower-numbered trial then runs and the other is marked a
duplicate when claimed, never run. A killed worker loses only its trial (the study's heartbeat
machinery queues it again); a failed final seed is reported, never dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from ablations.space import enumerate_points, spec_of
from ablations.storage import MLFLOW_RUN_ATTR
from harness import stats
from harness.errors import UserError
from harness.stats import mean as mean_of, sample_sd as std_of  # the one home of both (ablations.report uses them)
from harness.tracking import Tracker

# Quarter-decade steps from 10^-4 to 10^-2.5: 7 rates over 1.5 decades (the minimum).
DEFAULT_GRID = {"log10_low": -4.0, "log10_high": -2.5, "per_decade": 4}
GRID_KEYS = ("log10_low", "log10_high", "per_decade")
# The comparison with LoRA is over training runs (harness.stats.seed_comparison): one run per method has no spread.
MIN_FINAL_SEEDS = 2
# Bounds on what a study file may ask for, checked before anything is queued: past them a study is a typo
# (``extend: 100000``, a grid of 600,001 rates), not an experiment, and would take hours just to enqueue.
MAX_GRID_RATES = 50
MAX_EXTEND = 10
MAX_FINAL_SEEDS = 50


# ----------------------------------------------------------------------------------------------------------
# The protocol's settings: the grid and the seeds


def lr_grid_from(value: Any, where: str) -> list[float]:
    """A sorted grid of learning rates from a list (``[1e-4, 3e-4]``, ``"1e-4,3e-4"``) or a log-spaced mapping.

    The mapping ``{log10_low, log10_high, per_decade}`` gives ``per_decade`` rates per factor 10,
    both ends included. Fewer than 2 rates, a non-positive or repeated rate is a one-line error.
    """
    if isinstance(value, dict):
        unknown = set(value) - set(GRID_KEYS)
        if unknown or set(GRID_KEYS) - set(value):
            raise UserError(f"{where}: a log-spaced grid needs exactly the keys {', '.join(GRID_KEYS)} "
                            f"(got {sorted(value)})")
        low, high, per = value["log10_low"], value["log10_high"], value["per_decade"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high, per)) \
                or not isinstance(per, int) or per < 1 or not low < high:
            raise UserError(f"{where}: needs numbers log10_low < log10_high and an integer per_decade >= 1 "
                            f"(got {value})")
        steps = round((high - low) * per)
        if not math.isclose(steps, (high - low) * per, abs_tol=1e-9):
            raise UserError(f"{where}: log10_high - log10_low must be a whole number of 1/per_decade steps")
        if steps + 1 > MAX_GRID_RATES:
            raise UserError(f"{where}: {steps + 1} rates is more than the {MAX_GRID_RATES} a grid may have; "
                            "lower per_decade or narrow the range")
        rates = [10 ** (low + k / per) for k in range(steps + 1)]
    else:
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        try:
            rates = [float(v) for v in items if not (isinstance(v, str) and not v.strip())]
        except (TypeError, ValueError):
            raise UserError(f"{where}: learning rates must be numbers, e.g. 1e-4,3e-4,1e-3 (got {value!r})") from None
    if len(rates) < 2:
        raise UserError(f"{where}: a learning-rate grid needs at least 2 rates (got {len(rates)})")
    if len(rates) > MAX_GRID_RATES:
        raise UserError(f"{where}: {len(rates)} rates is more than the {MAX_GRID_RATES} a grid may have")
    if not all(r > 0 and math.isfinite(r) for r in rates):
        raise UserError(f"{where}: learning rates must be positive (got {', '.join(f'{r:g}' for r in rates)})")
    if len(set(rates)) < len(rates):
        raise UserError(f"{where}: a learning rate is listed twice")
    return sorted(rates)


def final_seeds_from(value: Any, tuning_seeds: list[int], where: str) -> list[int]:
    """Final seeds from a count (the smallest non-negative integers that are not tuning seeds) or a list.

    They must be disjoint from the tuning seeds: a final run on a tuning seed would repeat a run
    its learning rate was chosen on, and its test score would inherit the selection.
    """
    if isinstance(value, str):
        value = value.strip()
        value = int(value) if value.isdigit() and "," not in value else [v for v in value.split(",") if v.strip()]
    if isinstance(value, int) and not isinstance(value, bool):
        if value < MIN_FINAL_SEEDS:
            raise UserError(f"{where}: give at least {MIN_FINAL_SEEDS} final seeds, a count or a list (got {value}): "
                            "the interval over training runs needs them")
        if value > MAX_FINAL_SEEDS:
            raise UserError(f"{where}: {value} final seeds is more than the {MAX_FINAL_SEEDS} allowed")
        fresh = [s for s in range(value + len(tuning_seeds)) if s not in tuning_seeds]
        return fresh[:value]
    try:
        seeds = [int(s) for s in (value if isinstance(value, list) else [value])]
    except (TypeError, ValueError):
        raise UserError(f"{where}: give a count (3) or a list of integers (3,4,5) (got {value!r})") from None
    if len(seeds) < MIN_FINAL_SEEDS or len(set(seeds)) < len(seeds):
        raise UserError(f"{where}: give at least {MIN_FINAL_SEEDS} distinct seeds (got {value!r})")
    if len(seeds) > MAX_FINAL_SEEDS:
        raise UserError(f"{where}: {len(seeds)} final seeds is more than the {MAX_FINAL_SEEDS} allowed")
    shared = sorted(set(seeds) & set(tuning_seeds))
    if shared:
        raise UserError(f"{where}: seed(s) {', '.join(map(str, shared))} are also tuning seeds "
                        f"({', '.join(map(str, tuning_seeds))}); final runs need fresh seeds")
    return seeds


def lr_at(grid: list[float], position: int) -> float:
    """The rate at a grid position; positions below 0 and past the end continue the grid's outer step."""
    if 0 <= position < len(grid):
        return grid[position]
    if position < 0:
        return grid[0] * (grid[0] / grid[1]) ** (-position)
    return grid[-1] * (grid[-1] / grid[-2]) ** (position - len(grid) + 1)


def lr_choices(plan) -> list[float]:
    """Every rate a tuning trial may take (the grid and its possible extensions), as Optuna's choices."""
    return [lr_at(plan.lr_grid, p) for p in positions_range(plan)]


def positions_range(plan) -> range:
    return range(-plan.extend, len(plan.lr_grid) + plan.extend)


def reference_of(point: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The LoRA point a point is compared with: the ``lora`` point sharing the most of its options.

    In ``fair`` that is plain ``lora``; in ``rank --tune-lr`` it is LoRA at the same rank. A space with
    one LoRA point (``--methods lora:r=8,moslora``) compares everything with it, as harness.run does.
    """
    loras = [p for p in points if p["method"] == "lora"]
    candidates = [p for p in loras if all(point.get(k) == v for k, v in p.items() if k != "method")]
    if candidates:
        return max(candidates, key=len)
    return loras[0] if len(loras) == 1 else None


def check_references(points: list[dict[str, Any]], where: str) -> None:
    for point in points:
        if reference_of(point, points) is None:
            raise UserError(f"{where}: every method is compared with lora, the reference: add lora"
                            + (f" with the options of {spec_of(point)!r}" if len(point) > 1 else ""))


def points_of_methods(specs: list[str]) -> list[dict[str, Any]]:
    """``--methods lora,linchain:n=3`` as a fair study's space; every method is compared with lora."""
    templates = []
    for spec in specs:
        method, _, rest = spec.partition(":")
        template: dict[str, Any] = {"method": method.strip().lower()}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, _, value = item.partition("=")
            template[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else value
        if "lr" in template:
            raise UserError(f"--methods: {spec!r} fixes lr, which the fair study tunes itself; remove lr=")
        templates.append(template)
    points = enumerate_points(templates, lambda key, what: UserError(f"--methods: {what}"))
    check_references(points, "--methods")
    return points



# ----------------------------------------------------------------------------------------------------------
# Reading the storage: the outcome of each slot, and the tuning state of a spec


def tune_name(plan, spec: str) -> str:
    return f"{plan.name}/{spec}"


def final_name(plan, spec: str) -> str:
    return f"{plan.name}/{spec}/final"


def optuna_names(plan) -> list[str]:
    """Per spec its tuning study, then its final study: a worker finishes a method's finals before the next's tuning."""
    return [name for spec in plan.specs() for name in (tune_name(plan, spec), final_name(plan, spec))]


def slot_of(attrs: dict[str, Any]) -> tuple:
    """What a trial is an instance of: (tune, position, seed) or (final, seed); re-queued trials share it."""
    if attrs.get("stage") == "final":
        return ("final", attrs.get("seed"))
    return ("tune", attrs.get("lr_position"), attrs.get("seed"))


LIVE = ("WAITING", "RUNNING")


def outcomes(trials) -> dict[tuple, Any]:
    """Per slot: its score (a COMPLETE trial), 'pending', 'pruned', 'failed', or absent (never queued / killed only)."""
    by_slot: dict[tuple, list] = {}
    for t in trials:
        if t.user_attrs.get("duplicate_of") is None:
            by_slot.setdefault(slot_of(t.user_attrs), []).append(t)
    found: dict[tuple, Any] = {}
    for key, mine in by_slot.items():
        states = {t.state.name for t in mine}
        if "COMPLETE" in states:
            found[key] = next(t.values[0] for t in mine if t.state.name == "COMPLETE")
        elif states & set(LIVE):
            found[key] = "pending"
        elif "PRUNED" in states:
            found[key] = "pruned"
        elif any(t.state.name == "FAIL" and not t.user_attrs.get("killed") for t in mine):
            found[key] = "failed"
    return found


@dataclass
class Tuning:
    """Where a spec's tuning stands: the grid positions it needs, and (once settled) the chosen one."""

    low: int
    high: int
    settled: bool = False
    best: int | None = None
    missing: list[tuple] = field(default_factory=list)  # slots to queue
    scores: dict[int, dict[int, float]] = field(default_factory=dict)  # position -> seed -> validation score


def tuning_state(plan, trials) -> Tuning:
    """Decide the spec's grid and chosen rate from its finished tuning trials (see the module docstring)."""
    found = outcomes(trials)
    low, high = 0, len(plan.lr_grid) - 1
    while True:
        state = Tuning(low, high)
        for p in range(low, high + 1):
            for seed in plan.seeds:
                value = found.get(("tune", p, seed))
                if value is None:
                    state.missing.append(("tune", p, seed))
                elif isinstance(value, float):
                    state.scores.setdefault(p, {})[seed] = value
        if state.missing or any(found.get(("tune", p, s)) == "pending" for p in range(low, high + 1)
                                for s in plan.seeds):
            return state
        state.settled = True
        complete = {p: v for p, v in state.scores.items() if len(v) == len(plan.seeds)}
        if not complete:
            return state
        state.best = max(complete, key=lambda p: (mean_of(complete[p].values()), -p))
        if state.best == low and low > -plan.extend:
            low -= 1
        elif state.best == high and high < len(plan.lr_grid) - 1 + plan.extend:
            high += 1
        else:
            return state



# ----------------------------------------------------------------------------------------------------------
# Queueing: the base grid at creation, then whatever the finished trials make necessary


def tune_trial(plan, spec: str, position: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    lr = lr_at(plan.lr_grid, position)
    return {"lr": lr, "seed": seed}, {"stage": "tune", "spec": spec, "seed": seed, "split": "validation",
                                      "lr": lr, "lr_position": position}


def final_trial(plan, spec: str, position: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    lr = lr_at(plan.lr_grid, position)
    return {"lr": lr, "seed": seed}, {"stage": "final", "spec": spec, "seed": seed, "split": "test",
                                      "lr": lr, "lr_position": position}


def initial_queue(plan, optuna_name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """At creation: every rate of the base grid times every tuning seed; final studies start empty."""
    for spec in plan.specs():
        if optuna_name == tune_name(plan, spec):
            return [tune_trial(plan, spec, p, s) for p in range(len(plan.lr_grid)) for s in plan.seeds]
    return []


def crashed_slots(trials) -> list[tuple]:
    """The slots whose only outcome is a crash (an exception in the trial, not a divergence): no live,
    finished or pruned trial, and every failed one (killed ones aside) marked ``crashed``."""
    by_slot: dict[tuple, list] = {}
    for t in trials:
        if t.user_attrs.get("duplicate_of") is None:
            by_slot.setdefault(slot_of(t.user_attrs), []).append(t)
    slots = []
    for key, mine in by_slot.items():
        failed = [t for t in mine if t.state.name == "FAIL" and not t.user_attrs.get("killed")]
        if failed and all(t.state.name == "FAIL" for t in mine) and all(t.user_attrs.get("crashed") for t in failed):
            slots.append(key)
    return slots


def top_up(study, storage, plan, retry_failed: bool = False, log=None) -> int:
    """Queue what one of the plan's studies lacks now: tuning slots the grid needs, or the final seeds once settled.

    ``retry_failed`` queues failed final seeds again, and tuning trials that crashed (an exception,
    not a divergence). Diverged tuning trials are kept: a non-finite loss at a rate is that rate's
    answer, and re-running it after the finals started could change the choice they were run for.
    """
    import optuna

    spec = _spec_of_study(plan, study.study_name)
    tuning = tuning_state(plan, optuna.load_study(study_name=tune_name(plan, spec),
                                                  storage=storage).get_trials(deepcopy=False))
    if study.study_name == tune_name(plan, spec):
        queue = [tune_trial(plan, spec, p, s) for _, p, s in tuning.missing]
        if retry_failed:
            crashed = [key for key in crashed_slots(study.get_trials(deepcopy=False)) if key[0] == "tune"]
            queue += [tune_trial(plan, spec, p, s) for _, p, s in crashed]
            if log is not None:
                log(f"[{study.study_name}] --retry-failed: {len(crashed)} crashed tuning trial(s) queued again")
    elif tuning.best is not None and tuning.settled:
        found = outcomes(study.get_trials(deepcopy=False))
        wanted = [s for s in plan.final_seeds if ("final", s) not in found
                  or (retry_failed and found[("final", s)] == "failed")]
        queue = [final_trial(plan, spec, tuning.best, s) for s in wanted]
    else:
        queue = []
    for params, attrs in queue:
        study.enqueue_trial(params, user_attrs=attrs)
    return len(queue)


def _spec_of_study(plan, optuna_name: str) -> str:
    for spec in plan.specs():
        if optuna_name in (tune_name(plan, spec), final_name(plan, spec)):
            return spec
    raise KeyError(optuna_name)


def suggest(trial, plan) -> tuple[str, list[int], float]:
    """The trial's spec, seed and rate, from its queued attributes; recorded as Optuna parameters too."""
    attrs = trial.user_attrs
    seeds = plan.seeds if attrs["stage"] == "tune" else plan.final_seeds
    lr = trial.suggest_categorical("lr", lr_choices(plan))
    seed = trial.suggest_categorical("seed", list(seeds))
    if lr != attrs["lr"] or seed != attrs["seed"]:
        raise RuntimeError(f"trial {trial.number}: parameters {lr}, {seed} differ from its slot {attrs}")
    return attrs["spec"], [seed], lr


def duplicate_of(study, trial) -> int | None:
    """The lower-numbered live or finished trial of the same slot, if two workers queued it at once."""
    key = slot_of(trial.user_attrs)
    for t in study.get_trials(deepcopy=False):
        if (t.number < trial.number and slot_of(t.user_attrs) == key and t.user_attrs.get("duplicate_of") is None
                and t.state.name in (*LIVE, "COMPLETE", "PRUNED")):
            return t.number
    return None


# ----------------------------------------------------------------------------------------------------------
# The verdict: per method, the chosen rate, the test scores over final seeds, and the comparison with LoRA


@dataclass
class TunedArm:
    """One spec's protocol outcome, read back from the storage: the tuning, the chosen rate, the final test scores.

    One arm of the fair comparison over all its seeds; harness.run.MethodResult is something else (one
    method and seed of a run).
    """

    spec: str
    reference: str | None
    tuning: Tuning
    grid_low: float
    grid_high: float
    extended_low: int
    extended_high: int
    chosen_lr: float | None
    valid_score: float
    test: dict[int, float]  # final seed -> test score (completed seeds only)
    failed: dict[int, str]  # final seed -> why it failed
    pending: list[int]

    @property
    def at_edge(self) -> bool:
        """The chosen rate is still the lowest or highest tried: the best rate may lie beyond the grid."""
        return self.tuning.best in (self.tuning.low, self.tuning.high)


def method_results(plan, storage) -> list[TunedArm]:
    import optuna

    results = []
    for point in plan.points:
        spec = spec_of(point)
        tune = optuna.load_study(study_name=tune_name(plan, spec), storage=storage).get_trials(deepcopy=False)
        finals = optuna.load_study(study_name=final_name(plan, spec), storage=storage).get_trials(deepcopy=False)
        tuning = tuning_state(plan, tune)
        found = outcomes(finals)
        reasons = {t.user_attrs.get("seed"): t.user_attrs.get("fail_reason", "failed") for t in finals
                   if t.state.name == "FAIL" and not t.user_attrs.get("killed")}
        final_lrs = {t.user_attrs["lr"] for t in finals if t.user_attrs.get("duplicate_of") is None}
        if len(final_lrs) > 1:  # cannot happen through top_up; a hand-edited storage would show here
            raise RuntimeError(f"{spec}: final trials ran at several rates {sorted(final_lrs)}")
        reference = reference_of(point, plan.points)
        results.append(TunedArm(
            spec=spec, reference=None if reference == point else spec_of(reference), tuning=tuning,
            grid_low=lr_at(plan.lr_grid, tuning.low), grid_high=lr_at(plan.lr_grid, tuning.high),
            extended_low=-tuning.low, extended_high=tuning.high - (len(plan.lr_grid) - 1),
            chosen_lr=lr_at(plan.lr_grid, tuning.best) if tuning.best is not None else None,
            valid_score=mean_of(tuning.scores[tuning.best].values()) if tuning.best is not None else math.nan,
            test={s: v for (_, s), v in found.items() if isinstance(v, float)},
            failed={s: reasons.get(s, "failed") for (_, s), v in found.items() if v == "failed"},
            pending=[s for (_, s), v in found.items() if v == "pending"]))
    return results


LAMBDA_MAX_METRIC = "diag/lambda_max"  # logged by harness.run for every method and seed at --diagnostics full


def curvatures(plan, storage) -> dict[str, dict[int, float]]:
    """Per spec and seed, the lambda_max its trials logged to MLflow; empty unless the runs use ``diagnostics: full``.

    lambda_max is the Hessian's largest eigenvalue at initialisation (harness.diagnostics), before the learning
    rate plays any part, so every trial of a spec with a given seed measures the same value: one trial per seed
    is read (final trials first, then tuning trials; completed or pruned, both measured it before training).
    """
    import optuna

    if plan.config.diagnostics != "full":
        return {}
    tracker = Tracker(plan.config.tracking_uri, plan.config.experiment)
    found: dict[str, dict[int, float]] = {}
    for spec in plan.specs():
        mine = found.setdefault(spec, {})
        for name in (final_name(plan, spec), tune_name(plan, spec)):
            for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
                seed, run_id = t.user_attrs.get("seed"), t.user_attrs.get(MLFLOW_RUN_ATTR)
                if seed in mine or run_id is None or t.state.name not in ("COMPLETE", "PRUNED"):
                    continue
                value = _logged_below(tracker, run_id, LAMBDA_MAX_METRIC)
                if value is not None:
                    mine[seed] = value
    return {spec: values for spec, values in found.items() if values}


def _logged_below(tracker, run_id: str, key: str) -> float | None:
    """The first finite value of metric ``key`` in the runs nested under ``run_id`` (harness.run's, its methods')."""
    frontier = [run_id]
    while frontier:
        current = frontier.pop()
        for child in tracker.client.search_runs([tracker.experiment_id], max_results=10_000,
                                                filter_string=f"tags.mlflow.parentRunId = '{current}'"):
            value = child.data.metrics.get(key)
            if value is not None and math.isfinite(value):
                return float(value)
            frontier.append(child.info.run_id)
    return None


NOT_COMPARED = "not compared"  # no final seed that both the method and its reference completed (yet)
VERDICT_COLUMNS = ("method", "reference", "chosen_lr", "grid_low", "grid_high", "valid_score", "test_mean",
                   "test_std", "seeds", "failed_seeds", "gain_vs_lora", "gain_low", "gain_high", "p_holm", "mde",
                   "verdict", "note")


def verdict_rows(plan, results: list[TunedArm], alpha: float = 0.05) -> list[dict[str, Any]]:
    """One row per method: the columns of verdict.csv; gains compare final test scores with the reference's, per seed.

    The verdict is better / worse / no detectable difference (``harness.stats.verdict`` on the
    Holm-adjusted p-value), ``reference`` for LoRA, or ``not compared`` while no final seed has a
    score on both sides (the note says why).
    """
    by_spec = {r.spec: r for r in results}
    comparisons = {r.spec: stats.seed_comparison(r.test, by_spec[r.reference].test)
                   for r in results if r.reference is not None and r.test and by_spec[r.reference].test}
    adjusted = stats.holm({k: c.p_value for k, c in comparisons.items()})
    rows = []
    for r in results:
        row = {"method": r.spec, "reference": r.reference or "", "chosen_lr": r.chosen_lr, "grid_low": r.grid_low,
               "grid_high": r.grid_high, "valid_score": r.valid_score, "test_mean": mean_of(r.test.values()),
               "test_std": std_of(r.test.values()), "seeds": ",".join(map(str, sorted(r.test))),
               "failed_seeds": ",".join(map(str, sorted(r.failed))), "gain_vs_lora": math.nan,
               "gain_low": math.nan, "gain_high": math.nan, "p_holm": math.nan, "mde": math.nan,
               "verdict": "reference" if r.reference is None else NOT_COMPARED, "note": _note(r)}
        c = comparisons.get(r.spec)
        if c is not None and c.n_seeds > 0:
            p = adjusted.get(r.spec, math.nan)
            row.update(gain_vs_lora=c.estimate, gain_low=c.low, gain_high=c.high, p_holm=p,
                       mde=stats.detectable_effect(c, alpha=alpha),
                       verdict=stats.verdict(c, p, alpha=alpha))
            if c.missing:
                row["note"] = "; ".join(filter(None, [row["note"], "compared on the seeds both completed: "
                                                     + ",".join(map(str, c.seeds))]))
        rows.append(row)
    return rows


def _note(r: TunedArm) -> str:
    notes = []
    if r.extended_low or r.extended_high:
        notes.append("grid extended " + ", ".join(f"{n} step(s) {side}" for n, side in
                                                  ((r.extended_low, "down"), (r.extended_high, "up")) if n))
    if r.tuning.best is not None and r.at_edge:
        notes.append("chosen rate at the edge after the maximum extensions: the best rate may lie beyond")
    if r.tuning.settled and r.tuning.best is None:
        notes.append("no rate completed every tuning seed: no final runs")
    if not r.tuning.settled:
        notes.append("tuning not finished")
    notes += [f"final seed {s} failed: {why.removeprefix(f'seed {s}: ')}" for s, why in sorted(r.failed.items())]
    if r.pending:
        notes.append("final seed(s) " + ",".join(map(str, sorted(r.pending))) + " still running")
    return "; ".join(notes)

