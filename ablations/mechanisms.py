"""The mechanisms at the tuned rates: the LinChain paper's claims, answered from a fair study's final runs.

``harness.run`` measures the mechanisms (harness.diagnostics) at one shared learning rate and, for that
reason, gives no verdict. A fair study's final runs are the measurement the claims need: every method at its
own rate chosen on validation, the seeds paired across methods, and each method compared with its reference
(LoRA, or for a control its parent: ``moslora:freeze_middle=true`` against ``moslora``, the init-only control
peft's maintainers asked for). Each final trial stores its layer-``all`` measures and training curves in the
study's storage (:func:`ablations.storage.pack_diagnostics`), so this is computed from the Optuna journal
alone.

Per claim and method, the claim's first measure that has data is tested: a paired t-test over the final
seeds, Holm-adjusted over every (claim, method) test of the same family (comparisons with LoRA; contrasts
with a control's parent) - a family of its own, apart from the score verdicts. A claim measured but not
tested (withheld, too few pairs, no spread) stays in its family's count with p = 1: a reason found in the
data never makes the correction of the other tests milder than the design planned. Verdicts: ``supported``
(significant, in the direction the claim predicts), ``opposite`` (significant, the other way), ``no
detectable difference``, ``inconclusive`` (fewer than 2 pairs, no spread, or withheld: a chosen rate sits at the
edge of its grid, or the measure is a step length and the two rates differ), ``not measured``. The other measures of a claim are shown, not tested.
"""

from __future__ import annotations

import math
from typing import Any

from ablations.fair import CONTROL_FAMILY, LORA_FAMILY, TunedArm, withheld
from harness import stats
from harness.diagnostics.claims import CLAIMS, MOVEMENT_MEASURE, claim_comparisons, mean_sd_text, paths_caveat
from harness.diagnostics.measures import ALL_LAYERS, TABLE_COLUMNS, Trace, nan_mean

SUPPORTED, OPPOSITE, NO_DIFFERENCE, INCONCLUSIVE, NOT_MEASURED = (
    "supported", "opposite", "no detectable difference", "inconclusive", "not measured")
# diagnostics.csv: one row per method and final seed
CURVE_SUMMARIES = ("mean_movement", "mean_alignment", "mean_grad_norm")
# first_loss: the loss of the first training step, before any update. Every method here starts from a zero update,
# so it is the frozen base model's loss on the seed's first batch: equal across arms computed with the same kernels,
# it tells runs of another machine (findings.kernels reads it).
RUN_COLUMNS = ("method", "seed", "lr", *TABLE_COLUMNS, *CURVE_SUMMARIES, "first_loss")
# claims.csv: one row per (claim, method, measure)
CLAIM_COLUMNS = ("claim", "method", "reference", "family", "measure", "tested", "n_pairs", "method_mean",
                 "reference_mean", "difference", "low", "high", "p", "p_holm", "verdict", "note")


def rows_and_traces(arm: TunedArm) -> tuple[list[dict], list[Trace]]:
    """The arm's final runs as harness.diagnostics rows (layer ``all``) and traces, labelled by its spec."""
    rows, traces = [], []
    for seed, (measures, curves) in sorted(arm.measured.items()):
        rows.append({"method": arm.spec, "spec_method": arm.spec.split(":", 1)[0], "seed": seed, "layer": ALL_LAYERS,
                     **measures})
        traces.append(Trace(arm.spec, arm.spec.split(":", 1)[0], seed, curves["losses"], curves["grad_norms"], [],
                            curves["delta_norms"], curves["effective_ranks"], curves["movements"],
                            curves.get("alignments", [])))
    return rows, traces


def run_rows(results: list[TunedArm]) -> list[dict[str, Any]]:
    """diagnostics.csv: every final run's measures at its method's chosen rate."""
    out = []
    for arm in results:
        _, traces = rows_and_traces(arm)
        by_seed = {t.seed: t for t in traces}
        for seed, (measures, _) in sorted(arm.measured.items()):
            t = by_seed[seed]
            out.append({"method": arm.spec, "seed": seed, "lr": arm.chosen_lr,
                        **{c: measures.get(c, math.nan) for c in TABLE_COLUMNS},
                        "mean_movement": nan_mean(v for _, v in t.movements),
                        "mean_alignment": nan_mean(v for _, v in t.alignments),
                        "mean_grad_norm": nan_mean(v for _, v in t.grad_norms),
                        "first_loss": next((v for step, v in t.losses if step == 1), math.nan)})
    return out


def rate_confound(measure: str, arm: TunedArm, ref: TunedArm) -> str | None:
    """Why a measure that scales with the learning rate cannot judge two arms trained at different rates, or None.

    How far dW moves per step is, under Adam, roughly the rate times a bounded factor: between arms at rates
    a factor apart it measures the rates as much as any mechanism, so the claim resting on it is withheld
    there (the step-direction cosine, which the rate cannot set, is what judges it where it was recorded)."""
    if measure != MOVEMENT_MEASURE or arm.chosen_lr is None or ref.chosen_lr is None:
        return None
    if math.isclose(arm.chosen_lr, ref.chosen_lr, rel_tol=1e-9):
        return None
    return (f"withheld: the step's length scales with the learning rate, and the rates differ "
            f"({arm.chosen_lr:.3g} against {ref.chosen_lr:.3g}, x{arm.chosen_lr / ref.chosen_lr:.2f}); the "
            "step-direction cosine, which the rate cannot set, was not recorded for these runs")


def claim_rows(results: list[TunedArm], alpha: float = 0.05) -> list[dict[str, Any]]:
    """claims.csv: each claim's measures per method against its reference, the tested one with its verdict."""
    by_spec = {r.spec: r for r in results}
    rows: list[dict[str, Any]] = []
    tested: dict[int, stats.SeedComparison] = {}  # row index -> the comparison its verdict rests on
    held: list[int] = []  # planned tests without a verdict (withheld, too few pairs, no spread, not measured yet):
    #                       in the Holm count with p = 1
    for arm in results:
        if arm.reference is None:
            continue
        ref = by_spec[arm.reference]
        pair_rows, pair_traces = [], []
        for a in (ref, arm):
            r, t = rows_and_traces(a)
            pair_rows += r
            pair_traces += t
        hold = withheld(arm, ref)
        comparisons = claim_comparisons(pair_rows, pair_traces, reference=ref.spec) if pair_rows else {}
        for claim in CLAIMS:
            comps = comparisons.get(claim, {}).get(arm.spec, [])
            rests_on = next((i for i, c in enumerate(comps) if len(c.differences) > 0), None)
            for i, comp in enumerate(comps):
                if len(comp.differences) == 0 and rests_on is not None:
                    continue  # a measure no pair recorded (runs that predate it), where another one has data
                c = stats.seed_comparison(dict(enumerate(comp.method_values)), dict(enumerate(comp.lora_values)))
                row = {"claim": claim, "method": arm.spec, "reference": ref.spec, "family": arm.family or "",
                       "measure": comp.measure, "tested": i == rests_on, "n_pairs": c.n_seeds,
                       "method_mean": stats.mean(stats.finite_values(comp.method_values)),
                       "reference_mean": stats.mean(stats.finite_values(comp.lora_values)),
                       "difference": c.estimate, "low": c.low, "high": c.high, "p": c.p_value, "p_holm": math.nan,
                       "verdict": "", "note": "", "_predicted": comp.predicted}
                if i == rests_on:
                    confound = rate_confound(comp.measure, arm, ref)
                    if hold or confound:
                        row.update(verdict=INCONCLUSIVE, note=hold or confound)
                    elif c.n_seeds < stats.MIN_PAIRS:
                        row.update(verdict=INCONCLUSIVE, note=f"{c.n_seeds} pair(s) of final seeds measured")
                    elif stats.no_spread(c):
                        row.update(verdict=INCONCLUSIVE, note="the paired differences have no spread to test against")
                    else:
                        tested[len(rows)] = c
                    if len(rows) not in tested:
                        held.append(len(rows))
                rows.append(row)
            if rests_on is None:  # planned but not measured (yet): one more test in the family, p = 1
                held.append(len(rows))
                unfinished = [a.spec for a in (ref, arm) if not a.test]
                why = ("no final run of " + " and ".join(f"`{u}`" for u in unfinished) + " has finished yet"
                       if unfinished else "no final seed of this pair stored its diagnostics (diagnostics: none, "
                                          "or runs that diverged or predate the measurement)")
                rows.append({"claim": claim, "method": arm.spec, "reference": ref.spec, "family": arm.family or "",
                             "measure": "", "tested": True, "n_pairs": 0, "verdict": NOT_MEASURED, "note": why,
                             "_predicted": 0})
    for family in (LORA_FAMILY, CONTROL_FAMILY):
        members = {i: c.p_value for i, c in tested.items() if rows[i]["family"] == family}
        untested = sum(1 for i in held if rows[i]["family"] == family)
        for i, p_holm in stats.holm(members, untested=untested).items():
            row = rows[i]
            row["p_holm"] = p_holm
            if math.isfinite(p_holm) and p_holm < alpha:
                agrees = (row["difference"] > 0) == (row["_predicted"] > 0)
                row["verdict"] = SUPPORTED if agrees else OPPOSITE
            else:
                row["verdict"] = NO_DIFFERENCE
            row["note"] = (f"Holm over the {len(members) + untested} claim test(s) {family}" + (
                f" ({untested} untested, counted with p = 1)" if untested else ""))
    for row in rows:
        row.pop("_predicted", None)
        for column in CLAIM_COLUMNS:
            row.setdefault(column, math.nan)
    return rows


def _ci(row: dict) -> str:
    d, low, high = row.get("difference", math.nan), row.get("low", math.nan), row.get("high", math.nan)
    if not isinstance(d, float) or math.isnan(d):
        return "n/a"
    return f"{d:+.3g}" + ("" if math.isnan(low) else f" [{low:+.3g}, {high:+.3g}]")


def _p(value) -> str:
    return "" if not isinstance(value, float) or math.isnan(value) else f"{value:.2g}"


def markdown(plan, results: list[TunedArm], claims: list[dict], runs: list[dict]) -> str:
    """diagnostics.md of a fair study: the claims at the tuned rates, then the per-method means."""
    rates = ", ".join(f"`{r.spec}` {r.chosen_lr:.3g}" for r in results if r.chosen_lr is not None) or "none chosen yet"
    lines = [f"# Mechanisms at the tuned rates: {plan.name}", "",
             "Every method trained at its own learning rate, chosen on validation (" + rates + "), on the final "
             "seeds of the verdict, each compared with its reference trained with the same seed (method minus "
             "reference; 95% Student-t interval over the seeds both measured). Per claim and method the first "
             "measure with data is tested (paired t-test, Holm-adjusted over the claim tests of its family: "
             "comparisons with LoRA, and contrasts of a control with its parent, apart from the score verdicts); "
             "the other measures are shown, not tested. *supported*: significant in the direction the claim "
             "predicts; *opposite*: significant the other way; *no detectable difference*: not significant "
             "(not a proof of no effect); *inconclusive*: fewer than 2 pairs, no spread, or withheld.", ""]
    if not claims:
        lines += ["No comparison has final runs with stored diagnostics yet.", ""]
    for claim, title in CLAIMS.items():
        mine = [r for r in claims if r["claim"] == claim]
        if not mine:
            continue
        lines += [f"## {title}", ""]
        if claim == "paths":
            lines += [paths_caveat(any(str(r.get("measure") or "").startswith("cosine") for r in mine)), ""]
        lines += ["| method | vs | measure | n | method | reference | difference (95% CI) | p (Holm) | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            verdict = r["verdict"] + (f" ({r['note']})" if r["verdict"] in (INCONCLUSIVE, NOT_MEASURED) else "")
            lines.append(f"| {r['method']} | {r['reference']} | {r['measure'] or 'n/a'} | {r['n_pairs']} | "
                         f"{_num(r.get('method_mean'))} | {_num(r.get('reference_mean'))} | {_ci(r)} | "
                         f"{_p(r.get('p_holm'))} | {verdict if r['tested'] else ''} |")
        lines.append("")
    if runs:
        lines += ["## Means over the final seeds", "",
                  "Mean ± sd over the final seeds with stored measurements (diagnostics.csv has every run). "
                  "mean_movement: ||dW_t - dW_t-10||_F / 10, the mean over training; mean_grad_norm: the adapter's "
                  "gradient norm before clipping; forgetting: the loss on general text after minus before.", ""]
        columns = [c for c in (*TABLE_COLUMNS, *CURVE_SUMMARIES)
                   if any(isinstance(r.get(c), float) and math.isfinite(r[c]) for r in runs)]
        lines += ["| method | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        for arm in results:
            mine = [r for r in runs if r["method"] == arm.spec]
            if mine:
                lines.append(f"| {arm.spec} | {len(mine)} | "
                             + " | ".join(mean_sd_text([r[c] for r in mine]) for c in columns) + " |")
        lines.append("")
    missing = [f"`{a.spec}` seed {s}" for a in results for s in sorted(a.test) if s not in a.measured]
    if missing:
        lines += ["Final runs without stored measurements (diverged, or run before the study stored them): "
                  + ", ".join(missing) + ".", ""]
    lines += ["Every method here reaches the same set of updates (each exports to a plain rank-r LoRA), so a "
              "difference can only come from training dynamics. docs/diagnostics.md defines every measure.", ""]
    return "\n".join(lines)


def _num(value) -> str:
    return "n/a" if not isinstance(value, float) or math.isnan(value) else f"{value:.3g}"
