"""Statistics for "does method A beat method B": over training runs (seeds) and over test items.

A difference between two fine-tuning methods has two sources of noise:

- **run-to-run variance**: another seed (data order, initial A) trains another adapter, which
  scores differently on the same test set. With two or more seeds the training run is the unit
  of replication: :func:`seed_comparison` takes each seed's score of both methods (the average
  accuracy on the full test set), forms the paired difference per seed and gives a Student-t
  interval and p-value over seeds. Pairing by seed removes what the seed shares between the
  methods (data order and initial A are the same for every method given one seed).
- **test-item noise**: a finite test set is a sample of the problems the task stands for.
  :func:`item_interval` is a paired bootstrap over items: each resample draws items with
  replacement within every task, the same items for both methods and for every seed, and the
  statistic is the difference in average accuracy averaged over seeds. Items are resampled once
  per resample, never again inside each seed (resampling items inside seeds and then seeds
  again, as this harness once did, counts item noise twice: intervals about 1.3x too wide).

With one seed there is no run-to-run information: the interval comes from the items only and
says so (``method == "items only (1 seed)"``). It covers its nominal level only if a second
training run would give the same scores, which fine-tuning rarely does; more seeds fix that.

When several methods are compared with one reference (LoRA), :func:`holm` adjusts their
p-values (Holm 1979, "A simple sequentially rejective multiple test procedure", Scand. J.
Statist. 6:65-70) so that the chance of any false "better" or "worse" stays at ``alpha``;
:func:`verdict` turns a comparison and its adjusted p-value into that word, and
:func:`minimum_detectable_effect` says how large a gain this many seeds would have found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000
T_OVER_SEEDS = "t over seeds"
ITEMS_ONLY = "items only (1 seed)"
NOT_COMPARED = "no seed both completed"
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"

Seed = Hashable
# Per seed, per task, each test item's correctness (doc id -> 0 or 1), as lm-eval scored it.
Correctness = Mapping[Seed, Mapping[str, Mapping[Hashable, float]]]


@dataclass(frozen=True)
class ItemInterval:
    """Test-item noise of a difference in average accuracy (A - B, fractions): a paired bootstrap over items.

    ``estimate`` is the difference on the items both methods were scored on, averaged over
    ``seeds``; ``low``/``high`` the percentile interval; ``se`` the bootstrap standard deviation;
    ``p_value`` the two-sided bootstrap p-value of "no difference" (the smallest ``1 - confidence``
    whose percentile interval would exclude 0).
    """

    estimate: float
    low: float
    high: float
    se: float
    p_value: float
    n_items: int
    seeds: tuple
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@dataclass(frozen=True)
class SeedComparison:
    """A paired difference A - B in average accuracy (fractions) over the seeds both methods completed.

    ``method`` says what the interval covers: ``"t over seeds"`` (run-to-run variance, from the
    spread of the per-seed differences; ``df = n_seeds - 1``), ``"items only (1 seed)"`` (test-item
    noise only, from :func:`item_interval`) or ``"no seed both completed"`` (no interval). ``seeds``
    are the paired seeds, ``missing`` those only one side completed (a failed run), ``sd`` the
    standard deviation of the per-seed differences (NaN with one seed), ``se`` the standard error
    of ``estimate``.
    """

    estimate: float
    low: float
    high: float
    n_seeds: int
    seeds: tuple
    missing: tuple
    p_value: float
    sd: float
    method: str
    se: float = math.nan
    df: float = math.nan
    confidence: float = CONFIDENCE

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def finite_values(values) -> list[float]:
    """The values that are numbers (not None, not NaN or infinite), as floats: what a mean over runs averages."""
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean(values) -> float:
    """The arithmetic mean; NaN for no values. A NaN among the values makes it NaN (filter with :func:`finite_values`)."""
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


def sample_sd(values) -> float:
    """The sample standard deviation (n - 1 in the denominator); NaN below two values."""
    values = list(values)
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN where there are too few)."""
    finite = finite_values(values)
    return mean(finite), sample_sd(finite)


def _seed_order(seed: Seed) -> tuple:
    """Seeds in numeric order (2 before 10), anything else after them by its text."""
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def _finite(scores: Mapping[Seed, float]) -> dict[Seed, float]:
    """The seeds that produced a score (a failed run has none, or NaN)."""
    return {s: float(v) for s, v in scores.items() if v is not None and math.isfinite(v)}


def seed_comparison(a: Mapping[Seed, float], b: Mapping[Seed, float], confidence: float = CONFIDENCE,
                    items: ItemInterval | None = None) -> SeedComparison:
    """Compare method A with method B from each seed's score (average accuracy on the full test set).

    Seeds are paired by value; only seeds both completed count, and the others are listed in
    ``missing``. With two or more paired seeds: the mean paired difference, a Student-t interval
    and the paired t-test's two-sided p-value (when every seed gives exactly the same difference
    there is no spread to test against, and interval and p-value are NaN). With one paired seed:
    the interval and p-value of ``items`` (the test-item noise, see :func:`item_interval`), centred
    on this seed's difference; without ``items`` they are NaN.
    """
    a, b = _finite(a), _finite(b)
    seeds = tuple(sorted(set(a) & set(b), key=_seed_order))
    missing = tuple(sorted(set(a) ^ set(b), key=_seed_order))
    diffs = np.array([a[s] - b[s] for s in seeds])
    n = len(seeds)
    nan = math.nan
    if n == 0:
        return SeedComparison(nan, nan, nan, 0, seeds, missing, nan, nan, NOT_COMPARED, confidence=confidence)
    estimate = float(diffs.mean())
    if n == 1:
        if items is None:
            return SeedComparison(estimate, nan, nan, 1, seeds, missing, nan, nan, ITEMS_ONLY, confidence=confidence)
        low = estimate - (items.estimate - items.low)
        high = estimate + (items.high - items.estimate)
        return SeedComparison(estimate, low, high, 1, seeds, missing, items.p_value, nan, ITEMS_ONLY,
                              se=items.se, df=math.inf, confidence=confidence)
    sd = float(diffs.std(ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    if se == 0:
        return SeedComparison(estimate, nan, nan, n, seeds, missing, nan, 0.0, T_OVER_SEEDS, se=0.0, df=df,
                              confidence=confidence)
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * se
    p_value = float(2 * stats.t.sf(abs(estimate) / se, df))
    return SeedComparison(estimate, estimate - half, estimate + half, n, seeds, missing, p_value, sd,
                          T_OVER_SEEDS, se=se, df=df, confidence=confidence)


def item_interval(a: Correctness, b: Correctness, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                  seed: int = 0) -> ItemInterval | None:
    """Test-item noise of A - B in average accuracy: a paired bootstrap over items, averaged over seeds.

    ``a`` and ``b`` map each seed to its per-task, per-item correctness; pass the base model's one
    evaluation under every seed of the method it is compared with. Seeds are those in both, tasks
    those every run scored, items (by doc id) those every run scored. Average accuracy weighs
    tasks equally (the mean over tasks of each task's accuracy). Each resample draws, per task,
    items with replacement, the same items for both methods and every seed: the bootstrap of
    the per-item difference averaged over seeds. Returns None when no seed, task or item is shared.
    """
    seeds = sorted(set(a) & set(b), key=_seed_order)
    runs = [a[s] for s in seeds] + [b[s] for s in seeds]
    if not seeds:
        return None
    tasks = sorted(set.intersection(*(set(run) for run in runs)))
    per_task = []  # per task: each item's difference A - B, averaged over seeds
    for task in tasks:
        docs = sorted(set.intersection(*(set(run[task]) for run in runs)), key=str)
        if docs:
            diff = [[a[s][task][d] - b[s][task][d] for d in docs] for s in seeds]
            per_task.append(np.asarray(diff, dtype=float).mean(axis=0))
    if not per_task:
        return None
    rng = np.random.default_rng(seed)
    total = np.zeros(n_resamples)
    for diff in per_task:
        n = diff.size
        chunk = max(1, 2_000_000 // n)  # keeps the (resamples x items) index array small
        for start in range(0, n_resamples, chunk):
            stop = min(start + chunk, n_resamples)
            total[start:stop] += diff[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    total /= len(per_task)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(total, [tail, 100 - tail])
    return ItemInterval(estimate=float(np.mean([d.mean() for d in per_task])), low=float(low), high=float(high),
                        se=float(total.std(ddof=1)), p_value=_bootstrap_p_value(total),
                        n_items=sum(d.size for d in per_task), seeds=tuple(seeds), confidence=confidence)


def _bootstrap_p_value(resampled: np.ndarray) -> float:
    """Two-sided p-value of 0 from a bootstrap distribution: twice the smaller tail beyond 0 (ties count half).

    This inverts the percentile interval (it excludes 0 at level 1 - p), so p-value and interval
    never disagree; the +1 keeps a finite number of resamples from claiming p = 0.
    """
    ties = np.count_nonzero(resampled == 0) / 2
    tail = min(np.count_nonzero(resampled < 0) + ties, np.count_nonzero(resampled > 0) + ties)
    return float(min(1.0, 2 * (tail + 1) / (resampled.size + 1)))


def holm(p_values: Mapping[Hashable, float], untested: int = 0) -> dict[Hashable, float]:
    """Holm-adjusted p-values, by name: the smallest p times m, the next times m - 1, ..., kept monotone.

    Rejecting where the adjusted value is below ``alpha`` keeps the family-wise error rate (any
    false rejection among the m comparisons) at ``alpha``. NaN p-values (comparisons that could
    not be made) stay NaN and do not count in m.

    ``untested``: how many further comparisons the design planned in this family but the data did not let
    us test (withheld, too few pairs). Each counts in m with p = 1, so it is never rejected and a hold
    decided after seeing the data cannot make the others' correction milder. They have no key and are
    not in the result.
    """
    if untested < 0:
        raise ValueError(f"untested must be 0 or more, not {untested}")
    valid = sorted(((p, k) for k, p in p_values.items() if p is not None and math.isfinite(p)), key=lambda pk: pk[0])
    m = len(valid) + untested  # the untested sit last in the order (p = 1 is the largest a p-value can be)
    adjusted = {k: math.nan for k in p_values}
    running = 0.0
    for rank, (p, key) in enumerate(valid):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[key] = running
    return adjusted


def minimum_detectable_effect(sd: float, n_seeds: int, alpha: float = 0.05, power: float = 0.8,
                              comparisons: int = 1) -> float:
    """The smallest true mean difference a two-sided paired t-test over ``n_seeds`` seeds detects with ``power``.

    Solved exactly from the noncentral t distribution of the test statistic (df = n - 1, both
    tails), for per-seed differences that are normal with standard deviation ``sd``. The
    approximation is using the observed ``sd`` as if it were the true one: with few seeds it is
    itself uncertain. (The common shortcut (t_{1-alpha/2} + t_{power}) sd / sqrt(n) would claim
    80% power where the test has 73% at 2 seeds and 77% at 3.) NaN with fewer than 2 seeds, and
    when the observed spread is 0 (seeds that all gave the same difference say nothing about it).
    ``alpha`` is per comparison; ``comparisons = m`` tests at ``alpha / m``, the level of Holm's first
    step (the smallest p-value of a family of m), so the figure is what the family can promise.
    """
    if n_seeds < 2 or sd is None or not math.isfinite(sd) or sd == 0:
        return math.nan
    df = n_seeds - 1
    alpha = alpha / comparisons
    critical = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(nc: float) -> float:
        return _t_test_power(nc, df, critical) - power

    high = critical + stats.t.ppf(power, df)
    while shortfall(high) < 0:
        high *= 2
    noncentrality = optimize.brentq(shortfall, 0.0, high, xtol=1e-10)
    return float(noncentrality * sd / math.sqrt(n_seeds))


def _t_test_power(noncentrality: float, df: float, critical: float) -> float:
    """P(|T| > critical) for T noncentral t(df, noncentrality): the two-sided t-test's rejection rate."""
    lower = stats.nct.cdf(-critical, df, noncentrality)  # the wrong-sign tail; scipy gives NaN below about 1e-15
    return float(stats.nct.sf(critical, df, noncentrality) + (0.0 if math.isnan(lower) else lower))


def detectable_effect(comparison: SeedComparison, alpha: float = 0.05, power: float = 0.8) -> float:
    """The minimum detectable effect for this comparison's design: over seeds, or over items with one seed.

    Over seeds: :func:`minimum_detectable_effect` with the observed spread. One seed: the normal
    approximation (z_{1-alpha/2} + z_{power}) x the items' bootstrap standard error, which says
    what the test set can resolve, not what another training run would show.
    """
    if comparison.method == T_OVER_SEEDS:
        return minimum_detectable_effect(comparison.sd, comparison.n_seeds, alpha, power)
    if comparison.method == ITEMS_ONLY and math.isfinite(comparison.se):
        return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * comparison.se)
    return math.nan


def verdict(comparison: SeedComparison, p_adjusted: float, alpha: float = 0.05) -> str:
    """``"better"`` or ``"worse"`` when the (Holm-adjusted) p-value is below ``alpha``, by the sign of the estimate;
    else ``"no detectable difference"`` (also when no p-value could be computed)."""
    if p_adjusted is None or not math.isfinite(p_adjusted) or p_adjusted >= alpha or comparison.estimate == 0:
        return NO_DIFFERENCE
    return BETTER if comparison.estimate > 0 else WORSE


# ----------------------------------------------------------------------------------------------------------
# The fair study's four verdicts: better / worse (a difference), equivalent (TOST), inconclusive

EQUIVALENT, INCONCLUSIVE = "equivalent", "inconclusive"
DELTA = 0.02  # the smallest effect of interest: 2 points of average accuracy (scores are fractions)
POINTS = 100.0  # fractions -> points, for the reasons' wording
ZERO_SPREAD = 1e-9  # a paired sd below ZERO_SPREAD * max(1, |mean|) is rounding, not spread
MIN_PAIRS = 2


def no_spread(comparison: SeedComparison) -> bool:
    """Whether the per-seed differences are all equal up to rounding: sd < ZERO_SPREAD * max(1, |estimate|).

    Differences that agree to the last bits (0.51 - 0.50 and 0.52 - 0.51) have an sd of about
    1e-17 and a t statistic of 1e15; that is floating-point noise, not evidence, and is treated
    as exactly zero spread.
    """
    sd = comparison.sd
    return comparison.n_seeds >= MIN_PAIRS and math.isfinite(comparison.estimate) and (
        not math.isfinite(sd) or sd < ZERO_SPREAD * max(1.0, abs(comparison.estimate)))


@dataclass(frozen=True)
class EquivalenceTest:
    """Two one-sided tests (TOST) that the true mean paired difference lies inside (-delta, +delta).

    ``p_lower`` tests H0: difference <= -delta, ``p_upper`` H0: difference >= +delta, each a
    one-sided paired t-test at ``alpha`` over the seeds; ``p_value`` is the larger (both must
    reject). ``low``/``high`` is the 1 - 2 alpha (90%) t interval: ``equivalent`` (p < alpha)
    exactly when it lies inside (-delta, +delta). With zero spread (:func:`no_spread`) the
    interval is the point ``estimate`` and the p-value is 0 inside the margin, 1 outside.
    """

    estimate: float
    low: float
    high: float
    delta: float
    p_lower: float
    p_upper: float
    p_value: float
    n_seeds: int
    df: float
    alpha: float
    zero_spread: bool = False

    @property
    def equivalent(self) -> bool:
        return self.p_value < self.alpha


def equivalence_test(comparison: SeedComparison, delta: float = DELTA, alpha: float = 0.05) -> EquivalenceTest | None:
    """TOST over seeds on the paired differences (Schuirmann 1987, J. Pharmacokin. Biopharm. 15:657-680; Lakens 2017,
    Soc. Psychol. Personal. Sci. 8:355-362): both one-sided t-tests at ``alpha`` against -delta and +delta.

    t_lower = (estimate + delta) / se and t_upper = (estimate - delta) / se with df = n - 1;
    p_lower = P(T > t_lower), p_upper = P(T < t_upper). None below two paired seeds (nothing to test).
    """
    if comparison.method != T_OVER_SEEDS or comparison.n_seeds < MIN_PAIRS:
        return None
    est, n = comparison.estimate, comparison.n_seeds
    df = n - 1
    if no_spread(comparison):
        inside = abs(est) < delta
        p = 0.0 if inside else 1.0
        return EquivalenceTest(est, est, est, delta, 0.0 if est > -delta else 1.0, 0.0 if est < delta else 1.0,
                               p, n, df, alpha, zero_spread=True)
    se = comparison.sd / math.sqrt(n)
    p_lower = float(stats.t.sf((est + delta) / se, df))
    p_upper = float(stats.t.cdf((est - delta) / se, df))
    half = float(stats.t.ppf(1 - alpha, df)) * se
    return EquivalenceTest(est, est - half, est + half, delta, p_lower, p_upper, max(p_lower, p_upper), n, df, alpha)


def difference_p_value(comparison: SeedComparison) -> float:
    """The paired t-test's p-value as the four-way verdict uses it: NaN below two pairs and with zero spread
    (:func:`no_spread`), so that neither a rounding-level spread (p = 5e-31) nor an items-only p enters Holm's family."""
    if comparison.method != T_OVER_SEEDS or comparison.n_seeds < MIN_PAIRS or no_spread(comparison):
        return math.nan
    return comparison.p_value


def _pts(value: float) -> str:
    return f"{POINTS * value:+.1f}"


def fair_verdict(comparison: SeedComparison, p_adjusted: float | None = None, p_equivalence_adjusted: float | None = None,
                 delta: float = DELTA, alpha: float = 0.05) -> tuple[str, str]:
    """Exactly one of ``better``, ``worse``, ``equivalent``, ``inconclusive``, and the reason, in words.

    - fewer than 2 seed pairs: ``inconclusive`` (no spread over seeds to test against);
    - zero spread (:func:`no_spread`): ``equivalent`` when |estimate| < delta, else ``inconclusive``
      (a constant difference gives no t-test, and a p-value from rounding is not one);
    - ``better`` / ``worse`` when the (Holm-adjusted) difference p-value is below ``alpha``; when the
      90% interval also lies inside the margin the reason says the gain is real but below ``delta``;
    - ``equivalent`` when the (Holm-adjusted) TOST p-value is below ``alpha``;
    - otherwise ``inconclusive``, with both p-values and the 90% interval.

    The p-values default to this comparison's own (a family of one); :func:`fair_verdicts` passes
    Holm's adjustment over the family, one for the differences and one for the equivalence tests.
    """
    n = comparison.n_seeds
    if n == 0:
        return INCONCLUSIVE, "no final seed both completed"
    if n < MIN_PAIRS or comparison.method != T_OVER_SEEDS:
        return INCONCLUSIVE, f"{n} seed pair: no spread over seeds to test against (at least {MIN_PAIRS} needed)"
    tost = equivalence_test(comparison, delta, alpha)
    margin = f"±{POINTS * delta:.1f} points"
    if tost.zero_spread:
        same = f"every seed gave the same difference ({_pts(comparison.estimate)} points): no spread to test against"
        if abs(comparison.estimate) < delta:
            return EQUIVALENT, f"{same}; the difference lies inside {margin}"
        return INCONCLUSIVE, f"{same}; outside {margin}, but a constant difference gives no test (did the seeds take effect?)"
    p = difference_p_value(comparison) if p_adjusted is None else p_adjusted
    p_eq = tost.p_value if p_equivalence_adjusted is None else p_equivalence_adjusted
    interval = f"the {1 - 2 * alpha:.0%} interval [{_pts(tost.low)}, {_pts(tost.high)}] points"
    if math.isfinite(p) and p < alpha and comparison.estimate != 0:
        word = BETTER if comparison.estimate > 0 else WORSE
        reason = f"Holm-adjusted p = {p:.2g} < {alpha:g}"
        if math.isfinite(p_eq) and p_eq < alpha:
            reason += f"; {interval} also lies inside {margin}: real but smaller than the effect of interest"
        return word, reason
    if math.isfinite(p_eq) and p_eq < alpha:
        return EQUIVALENT, f"{interval} lies inside {margin} (TOST, Holm-adjusted p = {p_eq:.2g})"
    inside = -delta < tost.low and tost.high < delta
    why = (f"{interval} lies inside {margin}, but not after Holm's adjustment over the family's equivalence "
           f"tests (TOST p = {tost.p_value:.2g} alone, {p_eq:.2g} adjusted)" if inside else
           f"{interval} is not inside {margin} (TOST, Holm-adjusted p = {p_eq:.2g})")
    return INCONCLUSIVE, f"no detectable difference (Holm-adjusted p = {p:.2g}) and no equivalence: {why}"


@dataclass(frozen=True)
class FairVerdict:
    """One comparison's four-way verdict within its family (see :func:`fair_verdicts`)."""

    verdict: str
    reason: str
    p_holm: float  # the difference test's Holm-adjusted p-value (NaN where there is no test)
    p_equivalence_holm: float  # the TOST p-value, Holm-adjusted over the same family
    equivalence: EquivalenceTest | None
    untested: int = 0  # the planned comparisons of its difference family counted with p = 1 (no test, or withheld)


def fair_verdicts(comparisons: Mapping[Hashable, SeedComparison], delta: float = DELTA,
                  alpha: float = 0.05, withheld: int = 0) -> dict[Hashable, FairVerdict]:
    """The four-way verdict of every comparison with the reference, Holm (1979) over the family twice.

    The difference p-values (:func:`difference_p_value`) are adjusted as one family, so the chance
    of any false ``better`` or ``worse`` stays at ``alpha``; the TOST p-values as a second family, so
    the chance of any false ``equivalent`` (a true difference of delta or more called equivalent)
    stays at ``alpha`` as well. Every comparison passed in was planned, so one without a test still
    counts in m with p = 1 and is never rejected: fewer than 2 pairs (an arm not run yet, or seeds that
    failed) in both families, zero spread in the difference family (it is in the equivalence family with
    p = 0 or 1). A partial study's verdicts are therefore corrected for the family the design planned.

    ``withheld``: how many further comparisons of the family were planned but may not be tested (a fair
    study's arm whose rate is at the grid's edge). Each stays in both families with p = 1, never rejected:
    the family is the one the design fixed, and a hold decided after the data cannot shrink the correction.
    """
    tests = {k: equivalence_test(c, delta, alpha) for k, c in comparisons.items()}
    raw_diff = {k: difference_p_value(c) for k, c in comparisons.items()}
    raw_eq = {k: (t.p_value if t is not None else math.nan) for k, t in tests.items()}
    untested = withheld + sum(1 for p in raw_diff.values() if not math.isfinite(p))
    p_diff = holm(raw_diff, untested=untested)
    p_eq = holm(raw_eq, untested=withheld + sum(1 for p in raw_eq.values() if not math.isfinite(p)))
    out = {}
    for k, c in comparisons.items():
        word, reason = fair_verdict(c, p_diff[k], p_eq[k], delta, alpha)
        out[k] = FairVerdict(word, reason, p_diff[k], p_eq[k], tests[k], untested)
    return out


# ----------------------------------------------------------------------------------------------------------
# Power before compute


def power_of(effect: float, sd: float, n_seeds: int, alpha: float = 0.05) -> float:
    """The two-sided paired t-test's power at level ``alpha`` over ``n_seeds`` seeds for a true mean difference
    ``effect`` when the per-seed differences are normal with standard deviation ``sd``.

    The statistic is noncentral t with df = n - 1 and noncentrality effect sqrt(n) / sd; the power
    is P(|T| > t_{1 - alpha/2, df}), both tails. NaN below two seeds or without a positive sd.
    """
    if n_seeds < 2 or sd is None or not math.isfinite(sd) or sd <= 0:
        return math.nan
    df = n_seeds - 1
    return _t_test_power(effect * math.sqrt(n_seeds) / sd, df, float(stats.t.ppf(1 - alpha / 2, df)))


def equivalence_power(sd: float, n_seeds: int, delta: float = DELTA, alpha: float = 0.05, effect: float = 0.0) -> float:
    """The probability that TOST (:func:`equivalence_test`) declares equivalence within ±delta when the true
    difference is ``effect`` (0: the methods are equal), per-seed differences normal with standard deviation ``sd``.

    Exact, by one-dimensional integration over the sample variance (the route of Owen 1965,
    Biometrika 52:437-446, for TOST power; Phillips 1990, J. Pharmacokin. Biopharm. 18:137-144):
    with q = df s^2 / sd^2 ~ chi^2(df), TOST rejects iff |mean| < c(q) = delta - t_{1-alpha,df} s / sqrt(n),
    and given s the mean is N(effect, sd^2 / n) independently of s, so
    P = integral over q < q_max of [Phi((c - effect) sqrt(n) / sd) - Phi((-c - effect) sqrt(n) / sd)] chi2_df(q) dq,
    q_max = df (delta sqrt(n) / (t sd))^2 (beyond it c <= 0 and TOST cannot reject).
    """
    if n_seeds < 2 or sd is None or not math.isfinite(sd) or sd <= 0 or delta <= 0:
        return math.nan
    from scipy import integrate

    df = n_seeds - 1
    t_crit = float(stats.t.ppf(1 - alpha, df))
    root_n = math.sqrt(n_seeds)
    q_max = df * (delta * root_n / (t_crit * sd)) ** 2

    def integrand(q: float) -> float:
        c = delta - t_crit * sd * math.sqrt(q / df) / root_n
        inside = stats.norm.cdf((c - effect) * root_n / sd) - stats.norm.cdf((-c - effect) * root_n / sd)
        return float(inside * stats.chi2.pdf(q, df))

    value, _ = integrate.quad(integrand, 0.0, q_max, limit=200, epsabs=1e-10)
    return float(min(1.0, max(0.0, value)))


def seeds_needed(sd: float, delta: float = DELTA, alpha: float = 0.05, power: float = 0.8, comparisons: int = 1,
                 effect: float | None = None, max_seeds: int = 1000) -> int | None:
    """The smallest number of seeds (>= 2) at which both a true gain of ``effect`` (default ``delta``) is found
    ``better`` and equal methods are found ``equivalent`` with probability ``power``, at Holm's first-step level
    alpha / comparisons. None when even ``max_seeds`` is not enough.

    Both criteria rise with n, so the first n that meets both is the answer (:func:`power_of`,
    :func:`equivalence_power`).
    """
    if sd is None or not math.isfinite(sd) or sd <= 0:
        return None
    level = alpha / comparisons
    effect = delta if effect is None else effect
    for n in range(MIN_PAIRS, max_seeds + 1):
        if power_of(effect, sd, n, level) >= power and equivalence_power(sd, n, delta, level) >= power:
            return n
    return None


@dataclass(frozen=True)
class PowerFigures:
    """What a design of ``n_seeds`` final seeds can show, from a paired per-seed ``sd`` (planned or pooled).

    ``mde``: the minimum detectable effect at Holm's first-step level with ``power``;
    ``power_at_delta``: the chance a true gain of ``delta`` is found; ``p_equivalent``: the chance
    TOST finds equal methods equivalent (both at alpha / comparisons); ``seeds_needed`` for both at
    ``power``; ``sd_df`` the degrees of freedom behind ``sd`` (inf for a planned value).
    """

    sd: float
    sd_df: float
    n_seeds: int
    comparisons: int
    delta: float
    alpha: float
    power: float
    mde: float
    power_at_delta: float
    p_equivalent: float
    seeds_needed: int | None


def power_figures(sd: float, n_seeds: int, comparisons: int = 1, delta: float = DELTA, alpha: float = 0.05,
                  power: float = 0.8, sd_df: float = math.inf) -> PowerFigures:
    """The design's figures (see :class:`PowerFigures`) from one paired sd: print them before compute (planned sd)
    and again after, from :func:`pooled_sd`, in place of an MDE plugged from one comparison's 2 df."""
    level = alpha / comparisons
    return PowerFigures(sd, sd_df, n_seeds, comparisons, delta, alpha, power,
                        minimum_detectable_effect(sd, n_seeds, alpha, power, comparisons=comparisons),
                        power_of(delta, sd, n_seeds, level), equivalence_power(sd, n_seeds, delta, level),
                        seeds_needed(sd, delta, alpha, power, comparisons))


@dataclass(frozen=True)
class PooledSD:
    """The pooled standard deviation of per-seed paired differences over several comparisons.

    ``df`` = sum of (n_k - 1); ``low``/``high`` its chi-square interval at ``confidence``.
    """

    sd: float
    df: int
    n_comparisons: int
    low: float
    high: float
    confidence: float = CONFIDENCE


def pooled_sd(differences, confidence: float = CONFIDENCE) -> PooledSD:
    """Pool the spread of several comparisons' per-seed differences: sqrt(sum_k sum_s (d_ks - mean_k)^2 / sum_k (n_k - 1)).

    Each comparison is centred on its own mean (the methods may differ), so only the run-to-run
    spread is pooled; non-finite values are dropped and comparisons with fewer than 2 values add
    nothing. Assumes one common variance. The interval is sd sqrt(df / chi^2_{df, 1 - a/2}) to
    sd sqrt(df / chi^2_{df, a/2}). Caveat: comparisons with the same reference share its
    per-seed scores, so their differences are correlated and the df overstate the information
    somewhat (the estimate itself stays unbiased for the common variance).
    """
    ss, df, k = 0.0, 0, 0
    for diffs in differences:
        values = np.asarray(finite_values(diffs), dtype=float)
        if values.size >= 2:
            ss += float(((values - values.mean()) ** 2).sum())
            df += values.size - 1
            k += 1
    if df == 0:
        return PooledSD(math.nan, 0, 0, math.nan, math.nan, confidence)
    sd = math.sqrt(ss / df)
    tail = (1 - confidence) / 2
    return PooledSD(sd, df, k, sd * math.sqrt(df / stats.chi2.ppf(1 - tail, df)),
                    sd * math.sqrt(df / stats.chi2.ppf(tail, df)), confidence)


# ----------------------------------------------------------------------------------------------------------
# Variance components: is the gain's uncertainty from seeds or from test items?


@dataclass(frozen=True)
class VarianceComponents:
    """The variance of the mean gain (A - B, averaged over seeds and, task-weighted, over items), split by source.

    ``seeds`` = sigma_seed^2 / S (training runs), ``items`` = sigma_item^2 / I (which items the test
    set happened to draw: a method-by-item interaction), ``interaction`` = sigma_resid^2 / (S I)
    (seed-by-item interaction and the 0/1 noise of each answer: shrinks with either), ``total`` their
    sum, for the design's ``n_seeds`` and ``n_items``. ``seed_interval_var`` is what the t interval over
    seeds measures (seeds + interaction), ``item_bootstrap_var`` what the item bootstrap measures
    (items + interaction).
    """

    seeds: float
    items: float
    interaction: float
    n_seeds: int
    n_items: int
    seed_interval_var: float
    item_bootstrap_var: float

    @property
    def total(self) -> float:
        return self.seeds + self.items + self.interaction

    @property
    def seed_share(self) -> float:
        return self.seeds / self.total if self.total > 0 else math.nan

    @property
    def item_share(self) -> float:
        return self.items / self.total if self.total > 0 else math.nan

    @property
    def interaction_share(self) -> float:
        return self.interaction / self.total if self.total > 0 else math.nan

    def projected(self, n_seeds: int, item_factor: float = 1.0) -> float:
        """The total variance with ``n_seeds`` seeds and ``item_factor`` times as many items per task."""
        s = self.n_seeds / n_seeds
        return self.seeds * s + self.items / item_factor + self.interaction * s / item_factor


def variance_components(a: Correctness, b: Correctness) -> VarianceComponents | None:
    """Split the mean gain's variance into seeds, items and their interaction (method-of-moments ANOVA).

    Model, per task: d_si = a_si - b_si = mu + u_s + v_i + w_si with independent zero-mean effects of
    the seed (u, variance sigma_seed^2), the item (v: items on which A and B differ beyond their mean
    gap, sigma_item^2) and a residual (w: seed-by-item interaction plus the 0/1 noise). For the
    two-way crossed layout without replication (S seeds x I items) the mean squares estimate
    MS_seed = sigma_w^2 + I sigma_u^2, MS_item = sigma_w^2 + S sigma_v^2, MS_resid = sigma_w^2
    (the ANOVA estimator: Searle, Casella & McCulloch 1992, "Variance Components", ch. 4), so the
    mean gain's variance is sigma_u^2/S + sigma_v^2/I + sigma_w^2/(S I). With several tasks, each
    weighted 1/T as in :func:`item_interval`: the item and residual parts add per task (x 1/T^2),
    and the seed part comes from the between-seed variance of the task-weighted per-seed gain minus
    the residual's share of it (so seed effects may be correlated across tasks). Negative estimates
    (sampling noise) are set to 0. Seeds are those in both, tasks and items those every run scored,
    as in :func:`item_interval`. None below 2 seeds or 2 shared items per task.
    """
    seeds = sorted(set(a) & set(b), key=_seed_order)
    if len(seeds) < 2:
        return None
    runs = [a[s] for s in seeds] + [b[s] for s in seeds]
    tasks = sorted(set.intersection(*(set(run) for run in runs)))
    matrices = []
    for task in tasks:
        docs = sorted(set.intersection(*(set(run[task]) for run in runs)), key=str)
        if len(docs) >= 2:
            matrices.append(np.asarray([[a[s][task][d] - b[s][task][d] for d in docs] for s in seeds], dtype=float))
    if not matrices:
        return None
    n_tasks, n_seeds = len(matrices), len(seeds)
    item_var = resid_var = 0.0  # variance of the mean gain from items (incl. residual) and from the residual alone
    for d in matrices:
        n_items = d.shape[1]
        item_means = d.mean(axis=0)
        resid = d - item_means[None, :] - d.mean(axis=1)[:, None] + d.mean()
        ms_resid = float((resid ** 2).sum()) / ((n_seeds - 1) * (n_items - 1))
        item_var += float(item_means.var(ddof=1)) / n_items / n_tasks ** 2  # = MS_item / (S I)
        resid_var += ms_resid / (n_seeds * n_items) / n_tasks ** 2
    per_seed = np.mean([d.mean(axis=1) for d in matrices], axis=0)  # task-weighted gain of each seed
    seed_var = float(per_seed.var(ddof=1)) / n_seeds  # what the t interval over seeds estimates
    return VarianceComponents(seeds=max(0.0, seed_var - resid_var), items=max(0.0, item_var - resid_var),
                              interaction=resid_var, n_seeds=n_seeds, n_items=sum(d.shape[1] for d in matrices),
                              seed_interval_var=seed_var, item_bootstrap_var=item_var)


# ----------------------------------------------------------------------------------------------------------
# Choosing the learning rate on a smoothed validation curve


@dataclass(frozen=True)
class LrChoice:
    """The learning rate with the best smoothed validation score, and whether it is at the edge of the grid.

    ``lrs`` the grid's rates (ascending), ``raw`` their mean validation score, ``smoothed`` the
    kernel-smoothed curve at each, ``bandwidth`` in log10(lr).
    """

    lr: float
    index: int
    at_edge: bool
    lrs: tuple
    raw: tuple
    smoothed: tuple
    bandwidth: float


def smoothed_lr_choice(points, bandwidth_steps: float = 1.0) -> LrChoice | None:
    """Choose the rate on a smoothed curve in log10(lr), not on one noisy argmax.

    ``points``: (lr, validation score) pairs, several per rate for several seeds; non-finite
    scores are dropped. The curve is a Nadaraya-Watson estimate with a Gaussian kernel in
    log10(lr) over every score (a rate with more seeds weighs more), bandwidth ``bandwidth_steps``
    times the grid's median step. At the grid's ends the data are reflected about the end rate
    (the reflection method of Schuster 1985, Commun. Statist. Theory Methods 14:1123-1136, used here
    for regression): an end rate then gets the same self-weight as an interior one instead of
    more, so one lucky score at an end cannot carry the choice; the price is a flat (zero-slope)
    assumption at the ends, which damps but never reverses a monotone trend (the reflected sequence
    is unimodal at the end and Gaussian smoothing keeps the mode). Why a local smoother and not a
    quadratic: validation accuracy against lr has a plateau and a cliff where training diverges,
    which one parabola fits badly. The choice is the smoothed argmax among grid rates (ties: the
    smaller rate); ``at_edge`` when that is the lowest or highest rate. None without a finite score.
    """
    by_lr: dict[float, list[float]] = {}
    for lr, score in points:
        if score is not None and math.isfinite(score):
            by_lr.setdefault(float(lr), []).append(float(score))
    if not by_lr:
        return None
    lrs = sorted(by_lr)
    x = np.log10(lrs)
    counts = np.array([len(by_lr[lr]) for lr in lrs], dtype=float)
    raw = np.array([mean(by_lr[lr]) for lr in lrs])
    if len(lrs) == 1:
        return LrChoice(lrs[0], 0, True, tuple(lrs), tuple(raw), tuple(raw), math.nan)
    h = bandwidth_steps * float(np.median(np.diff(x)))
    xs = np.concatenate([x, 2 * x[0] - x[1:], 2 * x[-1] - x[:-1]])  # the data and its two mirror images
    ws = np.concatenate([counts, counts[1:], counts[:-1]])
    ys = np.concatenate([raw, raw[1:], raw[:-1]])
    kernel = np.exp(-0.5 * ((x[:, None] - xs[None, :]) / h) ** 2) * ws[None, :]
    smoothed = (kernel * ys[None, :]).sum(axis=1) / kernel.sum(axis=1)
    best = int(np.flatnonzero(smoothed >= smoothed.max() - 1e-12 * max(1.0, abs(smoothed.max())))[0])
    return LrChoice(lrs[best], best, best in (0, len(lrs) - 1), tuple(lrs), tuple(raw.tolist()),
                    tuple(smoothed.tolist()), h)
