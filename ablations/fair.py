"""The fair protocol: every method gets the same learning-rate search, on validation, before one test.

At one shared learning rate a comparison of adapters mostly measures effective step size (under
Adam the middle matrices of MoSLoRA, LinChain or CondLoRA change how far dW moves per step), and
picking the best of many trials by test score overstates it. The protocol, per method spec:

1. **tuning** (Optuna study ``<study>/<spec>``): one trial per learning rate of the grid and tuning
   seed, every method the same grid, steps and seeds, scored (and pruned) on the validation split.
   The chosen rate has the best *smoothed* validation score: a kernel smoother in log lr over every
   tuning score (harness.stats.smoothed_lr_choice), not one noisy argmax (a tie goes to the smaller
   rate); a rate where any tuning seed failed or was pruned is not a candidate. When the chosen
   rate is the grid's lowest or highest, the grid grows one step on that side and the choice is
   made again, at most ``extend`` times per side. A rate still at the edge after that withholds
   the verdict of every comparison it is part of (``inconclusive``).
2. **final** (Optuna study ``<study>/<spec>/final``): once the tuning of that spec is settled, one
   trial per final seed (fresh: disjoint from the tuning seeds) at the chosen rate, scored on the
   test split once. No test score exists for any other rate.

Every decision is a pure function of the finished trials in the storage, so any worker takes the
same one: whichever worker sees a spec settled queues its final trials. Two workers may queue the
same slot at the same moment; the lower-numbered trial then runs and the other is marked a
duplicate when claimed, never run. A killed worker loses only its trial (the study's heartbeat
machinery queues it again); a failed final seed is reported, never dropped; a diverged final run
is an outcome, scored as the base model it falls back to, and counted in the divergence rate.

3. **verdict** (:func:`verdict_rows`): every method against its reference (LoRA; a control's parent;
   what a ``lora:match=`` point matches), paired by final seed: the gain's 95% interval over seeds,
   the item bootstrap beside it, and one of four verdicts: ``better`` / ``worse`` (Holm over the
   family), ``equivalent`` (the 90% interval inside +-delta, two one-sided tests, Holm), or
   ``inconclusive`` (otherwise, or withheld: a rate at the edge, fewer than 2 pairs). Comparisons
   with LoRA and method-minus-control contrasts are separate Holm families.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from ablations.space import REFERENCE, enumerate_points, options_of, spec_of
from ablations.storage import CORRECT_ATTR, DIAGNOSTICS_ATTR, MLFLOW_RUN_ATTR, unpack_correct, unpack_diagnostics
from harness import stats
from harness.adapters.spec import parse_spec, spec_options
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


# The paired per-seed SD --plan assumes when nothing has been measured: "Learning Rate Matters" (arXiv 2602.04998)
# and this harness's make-run seeds put the paired SD of a gain at 2-3 points; 2.5 is the middle, stated as assumed.
ASSUMED_SD = 0.025


def points_from(value: Any, where: str) -> float:
    """A size in points of accuracy (``2`` = 2 points) as a fraction: a finite number in (0, 100), else one line."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{where}: must be a number of accuracy points, e.g. 2 (got {value!r})")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{where}: must be a number of accuracy points, e.g. 2 (got {value!r})") from None
    if not math.isfinite(number) or not 0 < number < 100:
        raise UserError(f"{where}: must be positive and below 100 accuracy points (got {value!r})")
    return number / 100


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


CONTROL_OPTIONS = ("freeze_middle", "bias", "init")  # a point with one of these set is a control of its parent
LORA_FAMILY, CONTROL_FAMILY = "vs LoRA", "vs control"  # the two Holm families of a fair study


def _canonical(spec: str) -> str:
    """A spec's canonical text (option order and spelling do not matter), or the text itself if it does not parse."""
    try:
        return parse_spec(spec).canonical()
    except UserError:
        return spec.strip()


def parent_of(point: dict[str, Any]) -> dict[str, Any] | None:
    """A control's parent: the same point without the control options (``moslora:freeze_middle=true`` -> ``moslora``).

    None when the point is no control: no control option set, or each set to its default
    (``init=kaiming`` is plain MoSLoRA).
    """
    if point["method"] == "lora":
        return None
    defaults = parse_spec(str(point["method"]))
    changed = [k for k in CONTROL_OPTIONS if k in point
               and _canonical(spec_of({"method": point["method"], k: point[k]})) != defaults.canonical()]
    if not changed:
        return None
    return {k: v for k, v in point.items() if k not in CONTROL_OPTIONS and k != REFERENCE}


def reference_of(point: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The point a point is compared with, by the first rule that applies:

    1. ``reference: SPEC`` in the study file: the point with that spec;
    2. ``lora:match=X``: the point X (a parameter-matched LoRA is compared with what it matches);
    3. a control (``freeze_middle``, ``bias`` or ``init`` set, :func:`parent_of`): its parent method;
    4. a LoRA point is a reference (compared with nothing);
    5. otherwise the ``lora`` point sharing the most of its options: plain ``lora`` in ``fair``, LoRA
       at the same rank in ``rank --tune-lr``; a space with one LoRA point compares everything with it.

    Rule 5 is not :func:`harness.adapters.spec.reference_name`, the one reference of a run's report and
    diagnostics (``lora`` itself, else the first LoRA spec): a study may hold one LoRA per rank, so the
    reference is chosen by shared options, and a ``lora:match=`` or ``reference:`` point is never one.

    None for the reference itself, and where no point fits (:func:`references` says why, in one line).
    """
    by_spec = {_canonical(spec_of(p)): p for p in points}
    if point.get(REFERENCE):
        return by_spec.get(_canonical(point[REFERENCE]))
    if point["method"] == "lora" and "match" in point:
        return by_spec.get(_canonical(str(point["match"])))
    parent = parent_of(point)
    if parent is not None:
        return by_spec.get(_canonical(spec_of(parent)))
    if point["method"] == "lora":
        return None  # every LoRA point without match= or reference: is a reference (one per rank in ``rank``)
    loras = [p for p in points if p["method"] == "lora" and "match" not in p and not p.get(REFERENCE)]
    own = options_of(point)
    candidates = [p for p in loras if all(own.get(k) == v for k, v in options_of(p).items())]
    if candidates:
        return max(candidates, key=len)
    return loras[0] if len(loras) == 1 else None


def references(points: list[dict[str, Any]], where: str) -> dict[str, str | None]:
    """Every point's reference spec (None for a reference point), checked: one line for a point without one.

    A ``reference`` naming no point of the study, a control whose parent is not in the study, a
    ``lora:match=X`` without X, a method with no LoRA to compare with, a point that is its own
    reference: each a UserError naming the point.
    """
    found: dict[str, str | None] = {}
    for point in points:
        spec, ref = spec_of(point), reference_of(point, points)
        if ref is point or (ref is not None and spec_of(ref) == spec):
            raise UserError(f"{where}: {spec!r} names itself as its reference; name another point of the study")
        if ref is None:
            if point.get(REFERENCE):
                raise UserError(f"{where}: {spec!r} has reference {point[REFERENCE]!r}, which is no point of the "
                                f"study ({', '.join(spec_of(p) for p in points)}); add it or fix the name")
            if point["method"] == "lora" and "match" in point:
                raise UserError(f"{where}: {spec!r} is compared with what it matches, {point['match']!r}, which is "
                                "not in the study; add it")
            parent = parent_of(point)
            if parent is not None:
                raise UserError(f"{where}: {spec!r} is a control of {spec_of(parent)!r}, which is not in the study; "
                                f"add {spec_of(parent)!r} (a control is compared with its parent), or name another "
                                "point with reference:")
            if point["method"] != "lora":
                raise UserError(f"{where}: every method is compared with lora, the reference: add lora"
                                + (f" with the options of {spec!r}" if len(options_of(point)) else ""))
        found[spec] = None if ref is None else spec_of(ref)
    _check_acyclic(found, where)
    return found


def _check_acyclic(found: dict[str, str | None], where: str) -> None:
    for start in found:
        seen, current = [start], found[start]
        while current is not None:
            if current in seen:
                raise UserError(f"{where}: the references go round in a circle ({' -> '.join(seen + [current])}); "
                                "one point must be the reference of the others")
            seen.append(current)
            current = found.get(current)


def family_of(spec: str, reference: str | None) -> str | None:
    """Which Holm family a comparison is in: a method against a LoRA reference, or a contrast with anything else
    (a control against its parent, ``lora:match=X`` against X, a point's own ``reference:``).

    Keeping the parameter-matched LoRA out of the LoRA family means that adding controls to a study leaves the
    family of its method-versus-LoRA verdicts, and so their Holm adjustment, as it was.
    """
    if reference is None:
        return None
    return LORA_FAMILY if reference.partition(":")[0] == "lora" else CONTROL_FAMILY


def check_references(points: list[dict[str, Any]], where: str) -> None:
    references(points, where)


def points_of_methods(specs: list[str]) -> list[dict[str, Any]]:
    """``--methods lora,linchain:n=3,moslora:freeze_middle=true`` as a fair study's space.

    Each spec is read with harness.run's own option rule (``match=`` takes the rest of the spec,
    commas included); values become numbers or true/false where they read as such.
    """
    templates = []
    for spec in specs:
        try:
            parse_spec(spec)
            method, options = spec_options(spec)
        except UserError as err:
            raise UserError(f"--methods: {err}") from None
        template: dict[str, Any] = {"method": method}
        for key, value in options.items():
            template[key] = value if key == "match" else _scalar(value)
        if "lr" in template:
            raise UserError(f"--methods: {spec!r} fixes lr, which the fair study tunes itself; remove lr=")
        templates.append(template)
    points = enumerate_points(templates, lambda key, what: UserError(f"--methods: {what}"))
    check_references(points, "--methods")
    return points


def _scalar(text: str) -> Any:
    value = yaml.safe_load(text)
    return value if isinstance(value, (bool, int, float)) else text


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
    """Where a spec's tuning stands: the grid positions it needs, and (once settled) the chosen one.

    ``smoothed`` is the validation curve the choice was made on (position -> smoothed score,
    :func:`harness.stats.smoothed_lr_choice`), over the candidate rates: those every tuning seed
    completed.
    """

    low: int
    high: int
    settled: bool = False
    best: int | None = None
    missing: list[tuple] = field(default_factory=list)  # slots to queue
    scores: dict[int, dict[int, float]] = field(default_factory=dict)  # position -> seed -> validation score
    smoothed: dict[int, float] = field(default_factory=dict)


# The smoother's bandwidth in grid steps. Half a step: a neighbour weighs e^-2 = 0.14 of a rate's own score. At a
# full step the mirror image at the grid's end counts the neighbouring peak twice, and an end rate next to the
# peak ties with it on a three-rate grid (then the tie rule picks the end and extends the grid for nothing).
SMOOTHING_STEPS = 0.5


def choose_position(plan, complete: dict[int, dict[int, float]]) -> tuple[int, dict[int, float]]:
    """The chosen grid position on the smoothed validation curve over the candidate positions, and that curve.

    One tuning seed's argmax is noisy (about 1.2-1.5 points of SD added to each gain); the smoothed
    curve in log lr borrows strength from the neighbouring rates (harness.stats.smoothed_lr_choice).
    """
    positions = sorted(complete)
    points = [(lr_at(plan.lr_grid, p), v) for p in positions for v in complete[p].values()]
    choice = stats.smoothed_lr_choice(points, bandwidth_steps=SMOOTHING_STEPS)
    by_lr = {lr_at(plan.lr_grid, p): p for p in positions}
    curve = {by_lr[lr]: value for lr, value in zip(choice.lrs, choice.smoothed)}
    return by_lr[choice.lr], curve


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
        state.best, state.smoothed = choose_position(plan, complete)
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
    method and seed of a run). ``test`` holds every final seed with an outcome: a diverged seed is
    there too, scored as the base model (``diverged`` says which and why); ``failed`` are crashes
    with no outcome (reported, and run again with ``--retry-failed``).
    """

    spec: str
    reference: str | None
    tuning: Tuning
    grid_low: float
    grid_high: float
    extended_low: int
    extended_high: int
    chosen_lr: float | None
    valid_score: float  # the best raw validation score of the grid: selection-biased upwards
    test: dict[int, float]  # final seed -> test score
    failed: dict[int, str]  # final seed -> why it failed (a crash: no outcome)
    pending: list[int]
    diverged: dict[int, str] = field(default_factory=dict)  # final seed -> the divergence (scored as the base model)
    correct: dict[int, dict] = field(default_factory=dict)  # final seed -> task -> doc -> 0/1
    valid_smoothed: float = math.nan  # the smoothed validation curve at the chosen rate (what the choice used)
    measured: dict[int, tuple] = field(default_factory=dict)  # final seed -> (measures, curves): unpack_diagnostics
    tuning_measured: dict[float, dict[int, dict]] = field(default_factory=dict)  # lr -> tuning seed -> measures

    @property
    def at_edge(self) -> bool:
        """The chosen rate is still the lowest or highest tried after every extension allowed: the best rate
        may lie beyond the grid, so the method may be under-tuned and its comparisons are withheld."""
        return self.tuning.best is not None and self.tuning.best in (self.tuning.low, self.tuning.high)

    @property
    def family(self) -> str | None:
        return family_of(self.spec, self.reference)

    @property
    def divergence_rate(self) -> float:
        """The share of final seeds with an outcome that diverged (NaN before any)."""
        return len(self.diverged) / len(self.test) if self.test else math.nan


def method_results(plan, storage) -> list[TunedArm]:
    import optuna

    refs = references(plan.points, plan.name)
    results = []
    for point in plan.points:
        spec = spec_of(point)
        tune = optuna.load_study(study_name=tune_name(plan, spec), storage=storage).get_trials(deepcopy=False)
        finals = optuna.load_study(study_name=final_name(plan, spec), storage=storage).get_trials(deepcopy=False)
        tuning = tuning_state(plan, tune)
        found = outcomes(finals)
        reasons = {t.user_attrs.get("seed"): t.user_attrs.get("fail_reason", "failed") for t in finals
                   if t.state.name == "FAIL" and not t.user_attrs.get("killed")}
        done = {t.user_attrs.get("seed"): t for t in finals
                if t.state.name == "COMPLETE" and t.user_attrs.get("duplicate_of") is None}
        final_lrs = {t.user_attrs["lr"] for t in finals if t.user_attrs.get("duplicate_of") is None}
        if len(final_lrs) > 1:  # cannot happen through top_up; a hand-edited storage would show here
            raise RuntimeError(f"{spec}: final trials ran at several rates {sorted(final_lrs)}")
        best = tuning.best
        results.append(TunedArm(
            spec=spec, reference=refs[spec], tuning=tuning,
            grid_low=lr_at(plan.lr_grid, tuning.low), grid_high=lr_at(plan.lr_grid, tuning.high),
            extended_low=-tuning.low, extended_high=tuning.high - (len(plan.lr_grid) - 1),
            chosen_lr=lr_at(plan.lr_grid, best) if best is not None else None,
            valid_score=max((mean_of(v.values()) for v in tuning.scores.values() if len(v) == len(plan.seeds)),
                            default=math.nan) if best is not None else math.nan,
            valid_smoothed=tuning.smoothed.get(best, math.nan) if best is not None else math.nan,
            test={s: v for (_, s), v in found.items() if isinstance(v, float)},
            failed={s: reasons.get(s, "failed") for (_, s), v in found.items() if v == "failed"},
            pending=[s for (_, s), v in found.items() if v == "pending"],
            diverged={s: t.user_attrs["diverged"] for s, t in done.items() if t.user_attrs.get("diverged")},
            correct={s: unpack_correct(t.user_attrs.get(CORRECT_ATTR)) for s, t in done.items()
                     if t.user_attrs.get(CORRECT_ATTR)},
            measured={s: unpack_diagnostics(t.user_attrs[DIAGNOSTICS_ATTR]) for s, t in done.items()
                      if t.user_attrs.get(DIAGNOSTICS_ATTR)},
            tuning_measured=_tuning_measures(tune)))
    return results


def _tuning_measures(trials) -> dict[float, dict[int, dict]]:
    """lr -> tuning seed -> the measures a completed tuning trial stored (forgetting across the rates)."""
    out: dict[float, dict[int, dict]] = {}
    for t in trials:
        if t.state.name == "COMPLETE" and t.user_attrs.get(DIAGNOSTICS_ATTR):
            measures, _ = unpack_diagnostics(t.user_attrs[DIAGNOSTICS_ATTR])
            out.setdefault(t.user_attrs["lr"], {})[t.user_attrs["seed"]] = measures
    return out


LAMBDA_MAX_METRIC = "diag/lambda_max"  # logged by harness.run for every method and seed at --diagnostics full


def curvatures(plan, storage) -> dict[str, dict[int, float]]:
    """Per spec and seed, the lambda_max its trials stored (else logged to MLflow); empty unless ``diagnostics: full``.

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
                if seed in mine or t.state.name not in ("COMPLETE", "PRUNED"):
                    continue
                stored = (t.user_attrs.get("lambda_max") or {}).get(str(seed))  # ablations.trials.CURVATURE_ATTR
                if stored is not None and math.isfinite(stored.get("value", math.nan)):
                    mine[seed] = stored["value"]
                    continue
                if run_id is None:
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


VERDICT_COLUMNS = ("method", "reference", "family", "chosen_lr", "grid_low", "grid_high", "at_edge",
                   "valid_best_of_grid", "valid_smoothed", "test_mean", "test_std", "seeds", "failed_seeds",
                   "diverged_seeds", "divergence_rate", "gain", "gain_low", "gain_high", "gain_low90", "gain_high90",
                   "items_low", "items_high", "p_holm", "p_equivalence_holm", "delta", "mde_pooled",
                   "var_seed_share", "var_item_share", "verdict", "note")
REFERENCE_VERDICT = "reference"


def paired_differences(arm: TunedArm, reference: TunedArm) -> list[float]:
    """The per-seed test differences arm - reference over the final seeds both have an outcome for."""
    return [arm.test[s] - reference.test[s] for s in sorted(set(arm.test) & set(reference.test))]


def pooled_spread(results: list[TunedArm]) -> stats.PooledSD:
    """The study's pooled per-seed SD of the paired differences over every comparison (more df than one's)."""
    by_spec = {r.spec: r for r in results}
    return stats.pooled_sd([paired_differences(r, by_spec[r.reference]) for r in results if r.reference is not None])


def withheld(arm: TunedArm, reference: TunedArm) -> str | None:
    """Why no verdict may be given yet though the numbers exist, or None."""
    edge = [a.spec for a in (reference, arm) if a.at_edge]
    if edge:
        return ("withheld: the chosen rate of " + " and ".join(f"`{e}`" for e in edge) + " is still at the edge of "
                "the grid after the last extension (the best rate may lie beyond, so the method may be under-tuned); "
                "widen lr_grid or raise extend")
    return None


def verdict_rows(plan, results: list[TunedArm], alpha: float = 0.05) -> list[dict[str, Any]]:
    """One row per method: the columns of verdict.csv (gains are arm - reference, per final seed, fractions).

    ``verdict`` is ``reference`` for a reference point, else one of the four of
    :func:`harness.stats.fair_verdicts`: ``better``, ``worse``, ``equivalent`` or ``inconclusive``.
    Each family (comparisons with LoRA; method-minus-control contrasts) is Holm-adjusted on its own,
    difference tests and equivalence tests separately. A comparison is withheld (``inconclusive``) when either
    side's chosen rate is at the edge (:func:`withheld`); it stays in its family's count with p = 1, so a hold
    never makes the others' correction milder than the design planned. The note
    says why in every case.
    """
    delta = getattr(plan, "delta", None) or stats.DELTA
    by_spec = {r.spec: r for r in results}
    comparisons, holds = {}, {}
    for r in results:
        if r.reference is None:
            continue
        ref = by_spec[r.reference]
        comparisons[r.spec] = stats.seed_comparison(r.test, ref.test)
        holds[r.spec] = withheld(r, ref)
    verdicts: dict[str, stats.FairVerdict] = {}
    for family in (LORA_FAMILY, CONTROL_FAMILY):
        members = {k: c for k, c in comparisons.items() if by_spec[k].family == family and holds[k] is None}
        held = sum(1 for k in comparisons if by_spec[k].family == family and holds[k] is not None)
        verdicts.update(stats.fair_verdicts(members, delta=delta, alpha=alpha, withheld=held))
    pooled = pooled_spread(results)
    family_sizes = {f: sum(1 for k in comparisons if by_spec[k].family == f) for f in (LORA_FAMILY, CONTROL_FAMILY)}
    rows = []
    for r in results:
        row = {"method": r.spec, "reference": r.reference or "", "family": r.family or "", "chosen_lr": r.chosen_lr,
               "grid_low": r.grid_low, "grid_high": r.grid_high, "at_edge": r.at_edge,
               "valid_best_of_grid": r.valid_score, "valid_smoothed": r.valid_smoothed,
               "test_mean": mean_of(r.test.values()), "test_std": std_of(r.test.values()),
               "seeds": ",".join(map(str, sorted(r.test))), "failed_seeds": ",".join(map(str, sorted(r.failed))),
               "diverged_seeds": ",".join(map(str, sorted(r.diverged))), "divergence_rate": r.divergence_rate,
               **{k: math.nan for k in ("gain", "gain_low", "gain_high", "gain_low90", "gain_high90", "items_low",
                                        "items_high", "p_holm", "p_equivalence_holm", "mde_pooled",
                                        "var_seed_share", "var_item_share")},
               "delta": delta, "verdict": REFERENCE_VERDICT if r.reference is None else stats.INCONCLUSIVE,
               "note": ""}
        notes = []
        if r.reference is not None:
            ref, c = by_spec[r.reference], comparisons[r.spec]
            if c.n_seeds > 0:
                row.update(gain=c.estimate, gain_low=c.low, gain_high=c.high)
            tost = stats.equivalence_test(c, delta, alpha)
            if tost is not None:
                row.update(gain_low90=tost.low, gain_high90=tost.high)
            items = stats.item_interval(r.correct, ref.correct) if r.correct and ref.correct else None
            if items is not None:
                row.update(items_low=items.low, items_high=items.high)
            components = stats.variance_components(r.correct, ref.correct) if r.correct and ref.correct else None
            if components is not None:
                row.update(var_seed_share=components.seed_share, var_item_share=components.item_share)
            if c.n_seeds >= stats.MIN_PAIRS and math.isfinite(pooled.sd) and pooled.sd > 0:
                row["mde_pooled"] = stats.minimum_detectable_effect(pooled.sd, c.n_seeds, alpha,
                                                                    comparisons=family_sizes[r.family])
            if holds[r.spec] is not None:
                notes.append(holds[r.spec])
            else:
                v = verdicts[r.spec]
                row.update(verdict=v.verdict, p_holm=v.p_holm, p_equivalence_holm=v.p_equivalence_holm)
                notes.append(v.reason)
                if v.untested and math.isfinite(v.p_holm):
                    notes.append(f"Holm over the {family_sizes[r.family]} planned comparisons {r.family}, "
                                 f"{v.untested} of them without a test yet or withheld (counted with p = 1)")
            if c.missing and c.seeds:
                notes.append("compared on the seeds both have: " + ",".join(map(str, c.seeds)))
        row["note"] = "; ".join(filter(None, [*notes, _note(r)]))
        rows.append(row)
    return rows


def _note(r: TunedArm) -> str:
    notes = []
    if r.extended_low or r.extended_high:
        notes.append("grid extended " + ", ".join(f"{n} step(s) {side}" for n, side in
                                                  ((r.extended_low, "down"), (r.extended_high, "up")) if n))
    if r.at_edge:
        notes.append("chosen rate at the edge after the maximum extensions: the best rate may lie beyond")
    if r.tuning.settled and r.tuning.best is None:
        notes.append("no rate completed every tuning seed: no final runs")
    if not r.tuning.settled:
        notes.append("tuning not finished")
    notes += [f"final seed {s} diverged (scored as the base model): {why.removeprefix(f'seed {s}: ')}"
              for s, why in sorted(r.diverged.items())]
    notes += [f"final seed {s} failed: {why.removeprefix(f'seed {s}: ')}" for s, why in sorted(r.failed.items())]
    if r.pending:
        notes.append("final seed(s) " + ",".join(map(str, sorted(r.pending))) + " still running")
    return "; ".join(notes)


# ----------------------------------------------------------------------------------------------------------
# The design before compute (--plan) and after (verdict.md): trials, time, power


@dataclass(frozen=True)
class Design:
    """What a fair study costs and can show: its trial counts, a time estimate and the power figures per family."""

    tuning_trials: int  # the base grid times the tuning seeds, per spec, summed
    tuning_trials_max: int  # with every extension allowed
    final_trials: int
    seconds_per_trial: float  # NaN when nothing has been measured
    time_source: str
    sd: float
    sd_source: str
    figures: dict[str, stats.PowerFigures]  # per Holm family with at least one comparison
    methods_run: int | None = None  # the arms this study trains, where it imports the others (default: every point)


def family_sizes(plan) -> dict[str, int]:
    refs = references(plan.points, plan.name)
    sizes: dict[str, int] = {}
    for spec, ref in refs.items():
        family = family_of(spec, ref)
        if family is not None:
            sizes[family] = sizes.get(family, 0) + 1
    return sizes


def design(plan, results: list[TunedArm] | None = None, timing: tuple[float, str] | None = None,
           alpha: float = 0.05) -> Design:
    """The design of ``plan``: from the study's pooled per-seed SD where its finals exist (``results``), else the
    planned SD (``--planned-sd``, or :data:`ASSUMED_SD`, said to be assumed); ``timing`` is (seconds per trial,
    where the figure comes from)."""
    delta = plan.delta or stats.DELTA
    n_specs = len(plan.points)
    tuning = n_specs * len(plan.lr_grid) * len(plan.seeds)
    tuning_max = n_specs * (len(plan.lr_grid) + 2 * plan.extend) * len(plan.seeds)
    finals = n_specs * len(plan.final_seeds)
    pooled = pooled_spread(results) if results else None
    if pooled is not None and pooled.df >= 2 and math.isfinite(pooled.sd) and pooled.sd > 0:
        sd, sd_df = pooled.sd, float(pooled.df)
        source = (f"pooled over this study's final runs ({pooled.df} df from {pooled.n_comparisons} comparison(s); "
                  f"95% interval {100 * pooled.low:.1f}-{100 * pooled.high:.1f} points)")
    elif plan.planned_sd:
        sd, sd_df, source = plan.planned_sd, math.inf, "planned (--planned-sd / the study file's planned_sd)"
    else:
        sd, sd_df = ASSUMED_SD, math.inf
        source = ("ASSUMED, not measured: 2.5 points, the middle of the 2-3 points measured for a gain's paired "
                  "seed SD on this harness's arithmetic runs; pass --planned-sd from a pilot")
    figures = {family: stats.power_figures(sd, len(plan.final_seeds), comparisons=m, delta=delta, alpha=alpha,
                                           sd_df=sd_df)
               for family, m in family_sizes(plan).items()}
    per_trial, time_source = timing if timing is not None else (math.nan, "no trial measured yet")
    return Design(tuning, tuning_max, finals, per_trial, time_source, sd, source, figures)


def design_lines(d: Design, plan) -> list[str]:
    """The design in words, as --plan prints it and verdict.md repeats it (with the pooled SD)."""
    n = len(plan.final_seeds)
    trials = d.tuning_trials + d.final_trials
    lines = [f"trials: {d.tuning_trials} tuning ({len(plan.points) if d.methods_run is None else d.methods_run} method(s) x {len(plan.lr_grid)} rates x "
             f"{len(plan.seeds)} tuning seed(s); up to {d.tuning_trials_max} if every extension is needed) + "
             f"{d.final_trials} final ({n} fresh seeds per method) = {trials} to {d.tuning_trials_max + d.final_trials}"]
    if math.isfinite(d.seconds_per_trial):
        low, high = trials * d.seconds_per_trial, (d.tuning_trials_max + d.final_trials) * d.seconds_per_trial
        lines.append(f"estimated wall time on this machine, one worker: {_duration(low)} to {_duration(high)} "
                     f"({d.seconds_per_trial:.0f} s per trial, {d.time_source})")
    else:
        lines.append(f"estimated wall time: unknown ({d.time_source}); run one trial (--max-trials 1) and --plan again")
    lines.append(f"paired per-seed SD of a gain: {100 * d.sd:.1f} points, {d.sd_source}")
    for family, f in d.figures.items():
        level = f.alpha / f.comparisons
        lines.append(
            f"{family} ({f.comparisons} comparison(s), Holm's first step at alpha {level:.3g}): with {n} final seeds "
            f"the minimum detectable effect (80% power) is {100 * f.mde:.1f} points; a true gain of "
            f"{100 * f.delta:.1f} points (delta) is found {100 * f.power_at_delta:.0f}% of the time; equal methods "
            f"are called equivalent (90% interval inside +-{100 * f.delta:.1f}) {100 * f.p_equivalent:.0f}% of the time"
            + (f"; 80% for both needs {f.seeds_needed} final seeds" if f.seeds_needed else
               "; no number of seeds up to 1000 gives 80% for both"))
    return lines


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.0f} min"


def measured_trial_seconds(trials) -> float | None:
    """The median wall time of the finished trials given (tuning and final alike), or None without any."""
    times = sorted(t.user_attrs["trial_seconds"] for t in trials
                   if t.state.name == "COMPLETE" and isinstance(t.user_attrs.get("trial_seconds"), (int, float)))
    return times[len(times) // 2] if times else None
