"""The LinChain paper's three mechanism claims, each answered from the run's diagnostics with its evidence.

Each method is compared with the reference (LoRA) trained with the same seed: paired differences and their
Student-t interval over seeds (see :meth:`Comparison.interval`).

A supported / not supported verdict is issued only when each method was trained at its own tuned learning
rate (``tuned=True``, which a caller that tuned the rates passes). ``harness.run`` trains every method at one
shared rate: a difference there may be the rate suiting one method better (the confound the fair study,
``ablations.study fair``, removes), so diagnostics.md states the rates, keeps the measurements and intervals,
and its verdict column says "not judged".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from harness import stats
from harness.adapters.spec import reference_name
from harness.diagnostics.convergence import smoothed, steps_to_loss
from harness.diagnostics.measures import ALL_LAYERS, Trace, nan_mean


def reference_label(rows: Sequence[dict]) -> str | None:
    """The method that stands for LoRA: the label ``lora`` if present, else the first method whose spec is a
    LoRA (by its ``spec_method``, so a matched LoRA counts): :func:`harness.adapters.spec.reference_name`."""
    return reference_name([r["method"] for r in rows], (r["spec_method"] for r in rows))


# ----------------------------------------------------------------------------------------------------------
# The paper's claims, answered


@dataclass(frozen=True)
class Comparison:
    """A method against LoRA on one measure, paired by seed: the differences and what they say."""

    measure: str
    method_values: list
    lora_values: list
    predicted: int  # +1: the claim predicts the method's value is larger than LoRA's; -1: smaller

    @property
    def differences(self) -> list[float]:
        """Per seed (position), method minus LoRA, skipping seeds where either value is NaN."""
        return [m - l for m, l in zip(self.method_values, self.lora_values)
                if not (math.isnan(m) or math.isnan(l))]

    def interval(self) -> tuple[float, float, float]:
        """Mean paired difference and its 95% Student-t interval over seeds (NaN bounds below 2 seeds).

        When every seed gives the same difference the interval is that one point (a zero-width interval, so
        that a verdict still knows which side of 0 it is on; :func:`harness.stats.seed_comparison` leaves it
        NaN instead, which is why this does not call it).
        """
        d = self.differences
        if not d:
            return math.nan, math.nan, math.nan
        mean = stats.mean(d)
        if len(d) < 2:
            return mean, math.nan, math.nan
        from scipy.stats import t as t_distribution  # (scipy only when a claim is answered)

        sd = stats.sample_sd(d)
        half = float(t_distribution.ppf(0.5 + stats.CONFIDENCE / 2, len(d) - 1)) * sd / math.sqrt(len(d))
        return mean, mean - half, mean + half

    def verdict(self) -> str:
        """supported / not supported when the interval excludes 0 (in the predicted / the other direction)."""
        n = len(self.differences)
        mean, low, high = self.interval()
        if n < 2 or math.isnan(low):
            return f"inconclusive at {n} seed{'s' if n != 1 else ''}"
        if (low > 0 and self.predicted > 0) or (high < 0 and self.predicted < 0):
            return "supported"
        if (low > 0 and self.predicted < 0) or (high < 0 and self.predicted > 0):
            return "not supported"
        if low == high == 0.0:  # every seed gave exactly LoRA's value
            return "not supported"
        return f"inconclusive at {n} seeds"


def mean_sd_text(values: Sequence[float]) -> str:
    """``mean ± sd`` (sample sd) of the values that are not NaN, the mean alone for one, ``n/a`` for none.

    Only NaN (a missing value) is dropped: an infinite value makes the mean infinite, as it should show.
    """
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    mean = stats.mean(finite)
    if len(finite) < 2:
        return f"{mean:.3g}"
    return f"{mean:.3g} ± {stats.sample_sd(finite):.2g}"


def _at_step(series: Sequence[tuple[int, float]], step: float) -> float:
    """The recorded value nearest to ``step`` (NaN without records or for a NaN step)."""
    if not series or math.isnan(step):
        return float("nan")
    return min(series, key=lambda item: abs(item[0] - step))[1]


def matched_loss_targets(traces: Sequence[Trace]) -> dict[int, float]:
    """Per seed, the highest final (smoothed) training loss among the methods: a loss every method reached."""
    targets: dict[int, float] = {}
    for trace in traces:
        if trace.losses:
            final = smoothed(trace.losses)[-1][1]
            targets[trace.seed] = max(targets.get(trace.seed, -math.inf), final)
    return targets


def _mean_grad_norm(trace: Trace) -> float:
    """Mean over steps of the adapter's total gradient norm before clipping (from the groups if need be)."""
    if trace.grad_norms:
        return nan_mean(v for _, v in trace.grad_norms)
    if trace.group_grad_norms:
        return nan_mean(math.sqrt(sum(v ** 2 for g, v in groups.items() if g != "other"))
                        for _, groups in trace.group_grad_norms)
    return float("nan")


def _mean_alignment(trace: Trace) -> float:
    """The mean over the recorded steps of cos(the step's change of dW, the negative full-weight gradient)."""
    return nan_mean(v for _, v in trace.alignments) if trace.alignments else float("nan")


def _mean_movement(trace: Trace) -> float:
    """Mean over records of how far dW moved per optimizer step (||dW_t - dW_t'||_F / (t - t'))."""
    return nan_mean(v for _, v in trace.movements) if trace.movements else float("nan")


def claim_comparisons(rows: Sequence[dict], traces: Sequence[Trace],
                      reference: str | None = None) -> dict[str, dict[str, list[Comparison]]]:
    """For each of the three claims and each method other than the reference, its comparisons with the
    reference (LoRA unless ``reference`` names another method of ``rows``), paired by seed.

    Claim 1 (effective rank of updates): the mean effective rank of dW at the end, and at matched training
    loss (the step where the smoothed loss first reaches the run's matched-loss target, nearest record).
    Claim 2 (more optimisation paths): how far dW moves per optimizer step (the step the optimizer actually
    takes, in the space of updates), then the mean gradient norm reaching the adapter before clipping (a
    proxy: under Adam it does not set the step). Claim 3 (faster convergence): steps to the matched loss and
    steps to 90% of the method's own final loss reduction. The verdict of a claim rests on its first
    comparison that has data (the matched-loss rank and the movement need the recorder's curves).
    """
    reference = reference or reference_label(rows)
    totals = {(r["method"], r["seed"]): r for r in rows if r["layer"] == ALL_LAYERS}
    by_key = {(t.method, t.seed): t for t in traces}
    targets = matched_loss_targets(traces)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != reference]
    claims: dict[str, dict[str, list[Comparison]]] = {"rank": {}, "paths": {}, "convergence": {}}
    if reference is None:
        return claims
    for method in methods:
        seeds = sorted(s for (m, s) in totals if m == method and (reference, s) in totals)

        def values(fn, who):
            return [fn(who, s) for s in seeds]

        def total(col):
            return lambda who, s: float(totals[(who, s)].get(col, float("nan")))  # (a row stored without it)

        def trace_value(fn):
            return lambda who, s: fn(by_key[(who, s)], s) if (who, s) in by_key else float("nan")

        rank_at_match = trace_value(lambda t, s: _at_step(t.effective_ranks, steps_to_loss(t.losses, targets[s])))
        steps_at_match = trace_value(lambda t, s: steps_to_loss(t.losses, targets[s]))
        grad = trace_value(lambda t, s: _mean_grad_norm(t))
        movement = trace_value(lambda t, s: _mean_movement(t))
        alignment = trace_value(lambda t, s: _mean_alignment(t))

        def compare(name, fn, predicted):
            return Comparison(name, values(fn, method), values(fn, reference), predicted)

        claims["rank"][method] = [compare("effective rank of dW at matched training loss", rank_at_match, +1),
                                  compare("effective rank of dW at the end of training", total("effective_rank"), +1)]
        claims["paths"][method] = [compare(ALIGNMENT_MEASURE, alignment, +1), compare(MOVEMENT_MEASURE, movement, +1),
                                   compare(PATHS_MEASURE, grad, +1)]
        claims["convergence"][method] = [compare("steps to the matched training loss", steps_at_match, -1),
                                         compare("steps to 90% of its own final loss reduction",
                                                 total("steps_to_90"), -1)]
    return claims


ALIGNMENT_MEASURE = "cosine of each recorded step's change of dW with the negative full-weight gradient (mean)"
MOVEMENT_MEASURE = "how far dW moves per step (mean ||dW_t - dW_t-10||_F / 10)"
PATHS_MEASURE = "mean gradient norm reaching the adapter (before clipping)"
_COSINE = ("the cosine between one optimizer step's change of dW and the negative gradient of the loss with respect "
           "to the full frozen weight (the step full fine-tuning would take), every 10 steps")
_GRADIENT_NORM = ("The gradient norm below it is taken before clipping. Under Adam the step is the gradient divided by "
                  "its running RMS, so a larger gradient norm does not by itself mean larger or more varied steps: it "
                  "is a proxy, shown for comparison.")


def paths_caveat(cosine_recorded: bool) -> str:
    """What the "more optimization paths" verdict rests on, for runs that recorded the step-direction cosine or not."""
    if cosine_recorded:
        return (f"The verdict rests on the direction of the update's steps: {_COSINE}. The cosine does not depend "
                "on the length of the step it measures; the learning rate still shapes where training is and what "
                "the optimizer's moments hold when it is measured, so, like every verdict here, it compares each "
                "method at its own rate. The claim predicts that the adapter follows the full-weight descent "
                "direction more closely. How far dW moves per step is shown next: by construction it scales with "
                "the learning rate, so between methods at different rates it measures step size as much as "
                "anything (the verdict rests on it only for pairs without the cosine). " + _GRADIENT_NORM)
    return (f"The direction of the update's steps ({_COSINE}), which this verdict rests on where it is recorded, "
            "was not recorded for these runs. The verdict then rests on how far dW moves per step, which by "
            "construction scales with the learning rate: between arms trained at different rates it is withheld "
            "(inconclusive). " + _GRADIENT_NORM)

CLAIMS = {
    "rank": "LinChain \"expands the effective rank of updates\"",
    "paths": "LinChain gives \"more optimization paths\"",
    "convergence": "LinChain gives \"faster convergence\"",
}


def withheld_verdict(learning_rates: Mapping[str, float] | None, tuned: bool) -> str | None:
    """The verdict cell when no verdict may be issued (rates shared, untuned or unknown), else None."""
    if tuned:
        return None
    rates = sorted(set((learning_rates or {}).values()))
    if len(rates) == 1:
        return f"not judged: one shared learning rate ({rates[0]:g}); judge in the fair study"
    if rates:
        return "not judged: learning rates set, not tuned per method; judge in the fair study"
    return "not judged: learning rates not recorded, not tuned per method; judge in the fair study"


def rates_text(learning_rates: Mapping[str, float] | None, tuned: bool) -> str:
    """One sentence: each method's learning rate and whether it was shared or tuned."""
    if not learning_rates:
        return "Learning rates: not recorded."
    listed = ", ".join(f"`{m}` {lr:g}" for m, lr in learning_rates.items())
    if tuned:
        return f"Learning rates, each tuned per method: {listed}."
    shared = len(set(learning_rates.values())) == 1
    how = "one rate shared by every method, not tuned per method" if shared else "set by hand, not tuned per method"
    return (f"Learning rates: {listed} ({how}). A difference at an untuned rate may be the rate suiting one method "
            "better rather than the mechanism, so no claim is judged here: the measurements and intervals stand, "
            "and the verdicts belong to the fair study (`python -m ablations.study fair`), which tunes each "
            "method's rate.")


def claims_markdown(rows: Sequence[dict], traces: Sequence[Trace],
                    learning_rates: Mapping[str, float] | None = None, tuned: bool = False) -> str:
    """The section that opens diagnostics.md: each claim, the evidence per method, a verdict where one may be given.

    ``learning_rates`` (method -> rate) is stated; verdicts are issued only when ``tuned`` (see the module text).
    """
    comparisons = claim_comparisons(rows, traces)
    reference = reference_label(rows)
    withheld = withheld_verdict(learning_rates, tuned)
    lines = ["## The paper's claims, answered", ""]
    if reference is None:
        return "\n".join(lines + ["LoRA is not in this run, so none of the claims (each is relative to LoRA) "
                                  "can be checked. Add `lora` to `--methods`.", ""])
    targets = matched_loss_targets(traces)
    lines += [rates_text(learning_rates, tuned), ""]
    lines += [f"Each method is compared with `{reference}` trained with the same seed (paired differences, "
              f"method minus {reference}; 95% Student-t interval over seeds). At tuned rates a verdict is "
              "*supported* when the interval excludes 0 in the direction the claim predicts, *not supported* "
              "when it excludes 0 in the other direction, and *inconclusive* otherwise or below 2 seeds; it rests "
              "on the first measure of each claim that was measured (its row). Matched training loss: per seed, "
              "the highest final smoothed training loss among the methods (" + ", ".join(f"seed {s}: {v:.3f}"
                                                                     for s, v in sorted(targets.items()))
              + "), a loss every method reached.", ""]
    no_grads = all(not t.grad_norms and not t.group_grad_norms and not t.movements and not t.alignments
                   for t in traces)
    for key, title in CLAIMS.items():
        lines += [f"### {title}", ""]
        if key == "paths":
            lines += [paths_caveat(any(t.alignments for t in traces)), ""]
        lines += [f"| method | measure | method | {reference} | difference (95% CI) | verdict |", "|---|---|---|---|---|---|"]
        for method, comps in comparisons[key].items():
            rests_on = next((i for i, comp in enumerate(comps) if comp.differences), 0)
            for i, comp in enumerate(comps):
                mean, low, high = comp.interval()
                ci = "n/a" if math.isnan(mean) else (f"{mean:+.3g}" + ("" if math.isnan(low)
                                                                          else f" [{low:+.3g}, {high:+.3g}]"))
                verdict = "" if i != rests_on else (withheld or comp.verdict())
                if key == "paths" and no_grads:
                    verdict = "not measured: neither dW's movement nor gradient norms were recorded"
                lines.append(f"| {method} | {comp.measure} | {mean_sd_text(comp.method_values)} | "
                             f"{mean_sd_text(comp.lora_values)} | {ci} | {verdict} |")
        lines.append("")
    lines += ["Every method here reaches the same set of updates (rank(B T A) <= r, each exports to a plain "
              "rank-r LoRA), so a difference can only come from training dynamics: the scale the middle "
              "matrices give the update, the curvature at initialisation (lambda_max, level `full`), the "
              "learning rate each method was given.", ""]
    return "\n".join(lines)
