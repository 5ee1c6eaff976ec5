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


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values, by name: the smallest p times m, the next times m - 1, ..., kept monotone.

    Rejecting where the adjusted value is below ``alpha`` keeps the family-wise error rate (any
    false rejection among the m comparisons) at ``alpha``. NaN p-values (comparisons that could
    not be made) stay NaN and do not count in m.
    """
    valid = sorted(((p, k) for k, p in p_values.items() if p is not None and math.isfinite(p)))
    adjusted = {k: math.nan for k in p_values}
    running = 0.0
    for rank, (p, key) in enumerate(valid):
        running = max(running, min(1.0, (len(valid) - rank) * p))
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
