"""The Findings text of a fair study, written from its shipped files alone, and a check that the README holds it.

    python -m ablations.findings results/findings/fair-paper                           # print the text
    python -m ablations.findings results/findings/fair-paper --readme results/README.md  # rewrite its block
    python -m ablations.findings results/findings/fair-paper --readme results/README.md --check
    python -m ablations.findings --brief results/findings/fair-paper results/findings/fair-controls \\
        results/findings/fair-rest --readme results/README.md     # the answer across studies, claim by claim

Every figure of the text is computed here, from the files a fair study's report ships:

- ``items.csv.gz`` (each final run's per-item correctness): each method's test score, every gain with its
  seed interval, item bootstrap, Holm p, TOST interval and verdict (:func:`ablations.recompute.recompute`,
  which also checks them against ``verdict.csv``), the pairwise ordering test, the pooled per-seed SD, the
  variance shares and the seeds the 2-point question would need;
- ``trials.csv``: each method's tuning curve, the rate chosen on it again (the study's own rule) and
  where it sits relative to LoRA's, and the training time per step of the final runs;
- ``journal.log`` (the Optuna journal, which stores each final run's diagnostics): the mechanism claims
  at the tuned rates (:func:`ablations.mechanisms.claim_rows`);
- ``study.yaml``: the design (steps, final seeds, delta, the grid).

The README keeps the text between two marker lines; ``--check`` exits 1 when the text there differs from what
the files give now (a test runs it on the shipped study), so no figure in it can go stale or be typed by hand.
Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import yaml

from ablations import fair, recompute
from ablations.fair import CONTROL_FAMILY, LORA_FAMILY, SMOOTHING_STEPS
from ablations.storage import open_storage, resolve_storage_url
from ablations.study import load_plan
from harness import stats
from harness.errors import UserError

BEGIN = "<!-- findings:{name} begin: written by `python -m ablations.findings results/findings/{name} --readme " \
        "results/README.md` from the study's files; edit ablations/findings.py, not this text -->"
END = "<!-- findings:{name} end -->"
ORDER = ("lora", "moslora", "linchain")  # the LinChain paper's claimed ordering, lowest first (its Tables 1-2)
NAMES = {"lora": "LoRA", "moslora": "MoSLoRA", "linchain": "LinChain-3"}
CLAIM_TITLES = {"rank": "\"expanded effective rank of updates\"", "paths": "\"more optimization paths\"",
                "convergence": "\"faster convergence\" (its Figure 2)"}


def pts(fraction: float, signed: bool = True) -> str:
    """A fraction as percentage points, one decimal."""
    if fraction is None or not math.isfinite(fraction):
        return "n/a"
    return f"{100 * fraction:+.1f}" if signed else f"{100 * fraction:.1f}"


def interval(low: float, high: float) -> str:
    return f"[{pts(low)}, {pts(high)}]"


def p_text(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def name(spec: str) -> str:
    return NAMES.get(spec, f"`{spec}`")


@dataclass
class Tuned:
    """One method's tuning as trials.csv records it."""

    spec: str
    curve: dict[float, float]  # lr -> validation accuracy (the tuning seed's, mean if several)
    chosen: float
    at_edge: bool


def read_design(folder: Path) -> dict:
    path = folder / "study.yaml"
    if not path.is_file():
        raise UserError(f"{path} not found: pass a fair study's findings folder (study.yaml, verdict.csv, "
                        "items.csv.gz, trials.csv, journal.log)")
    design = yaml.safe_load(path.read_text())
    if design.get("kind") != "fair":
        raise UserError(f"{path}: kind {design.get('kind')!r}, not a fair study")
    return design


def tuning(folder: Path, smoothing_steps: float) -> dict[str, Tuned]:
    """Each method's validation curve from trials.csv and the rate the study's rule picks on it."""
    path = folder / "trials.csv"
    if not path.is_file():
        raise UserError(f"{path} not found")
    trials = pd.read_csv(path)
    done = trials[(trials["stage"] == "tune") & (trials["state"] == "COMPLETE")]
    out = {}
    for spec, group in done.groupby("spec", sort=False):
        points = list(zip(group["lr"].astype(float), group["average_accuracy"].astype(float)))
        choice = stats.smoothed_lr_choice(points, bandwidth_steps=smoothing_steps)
        if choice is None:
            continue
        curve = {lr: stats.mean(g["average_accuracy"]) for lr, g in group.groupby("lr")}
        out[spec] = Tuned(spec, dict(sorted(curve.items())), choice.lr, choice.at_edge)
    return out


def seconds_per_step(folder: Path, steps: int) -> dict[str, list[float]]:
    """Training seconds per optimizer step of each method's completed final runs (trials.csv)."""
    trials = pd.read_csv(folder / "trials.csv")
    final = trials[(trials["stage"] == "final") & (trials["state"] == "COMPLETE")]
    return {spec: (g["train_seconds"].astype(float) / steps).tolist() for spec, g in final.groupby("spec", sort=False)}


def median_seconds_per_step(folder: Path, steps: int) -> dict[str, tuple[float, int]]:
    """Each method's median training seconds per step over its completed final runs, and how many runs."""
    return {m: (float(pd.Series(t).median()), len(t)) for m, t in seconds_per_step(folder, steps).items()}


def cosine_recorded(folder: Path) -> set[str]:
    """The methods whose final runs recorded the step-direction cosine (diagnostics.csv's mean_alignment)."""
    path = folder / "diagnostics.csv"
    if not path.is_file():
        return set()
    runs = pd.read_csv(path)
    if "mean_alignment" not in runs.columns:
        return set()
    return {str(m) for m, v in zip(runs["method"], runs["mean_alignment"]) if pd.notna(v)}


# Methods whose adapted model computes exactly the base model's forward before the first step: their update starts at
# zero (B = 0) and is added to the base layer's output. Not DoRA (it recomputes the weight through its magnitude),
# PiSSA or OLoRA (they move W0), nor an arm with a trainable bias (moslora/linchain bias=true).
# Claim verdicts that decide something (a test ran on enough pairs): a withheld or too-small one does not
DECIDED = ("supported", "opposite", "no detectable difference")
BASE_AT_START = ("lora", "rslora", "moslora", "linchain", "mtlora", "condlora")


def starts_at_base(spec: str) -> bool:
    """Whether ``spec``'s first training-step loss is the frozen base model's loss on the batch (BASE_AT_START)."""
    method, _, options = str(spec).partition(":")
    return method in BASE_AT_START and "bias=true" not in options.replace(" ", "").lower()


class KernelCheck(NamedTuple):
    """A study's arms grouped by how their runs computed the frozen base model (kernel_groups)."""

    groups: list[dict[str, dict[int, float]]]  # {method: {seed: first_loss}} per group, arms agreeing at shared seeds
    unchecked: list[str]  # arms sharing no seed with the others, or whose first loss is not the base model's


def kernel_groups(folder: Path) -> KernelCheck:
    """The study's arms grouped by their first training step's loss (diagnostics.csv's first_loss). For a method that
    starts from a zero update (starts_at_base) that loss is the frozen base model's loss on the seed's first batch:
    the same whatever the method, unless it was computed differently (another CPU, other kernel settings, other
    libraries or inputs). An arm joins a group when its loss agrees with the group's at every seed they share (and
    they share one); an arm that shares no seed with an arm, or that does not start at the base model, is unchecked.
    No groups when the runs predate the column."""
    path = folder / "diagnostics.csv"
    if not path.is_file():
        return KernelCheck([], [])
    runs = pd.read_csv(path)
    if "first_loss" not in runs.columns:
        return KernelCheck([], [])
    runs = runs.dropna(subset=["first_loss"])
    groups: list[dict[str, dict[int, float]]] = []
    unchecked: list[str] = []
    for method, mine in runs.groupby("method", sort=False):
        if not starts_at_base(str(method)):
            unchecked.append(str(method))
            continue
        losses = {int(seed): float(v) for seed, v in zip(mine["seed"], mine["first_loss"])}
        for group in groups:
            known = {k: v for member in group.values() for k, v in member.items()}
            shared = set(losses) & set(known)
            if shared and all(math.isclose(losses[k], known[k], rel_tol=KERNEL_TOLERANCE) for k in shared):
                group[str(method)] = losses
                break
        else:
            groups.append({str(method): losses})
    seeds_of = [{k for member in g.values() for k in member} for g in groups]
    alone = [i for i, seeds in enumerate(seeds_of) if len(groups) > 1
             and not any(seeds & other for j, other in enumerate(seeds_of) if j != i)]
    if alone and len(alone) == len(groups):  # nothing overlaps: the largest group stands, the others are unchecked
        alone.remove(max(alone, key=lambda i: (len(groups[i]), len(seeds_of[i]))))
    unchecked += [m for i in alone for m in groups[i]]
    return KernelCheck([g for i, g in enumerate(groups) if i not in alone], unchecked)


# Stored measurements keep 6 significant digits (ablations.storage.SIGNIFICANT): runs computed alike agree in all of
# them. Other kernels moved the base model's loss by 3.5e-5 relative (oneDNN without AVX512_BF16, seed 1) to 1.3e-2
# here (docs/benchmarks.md, bench_kernels).
KERNEL_TOLERANCE = 1e-5


def _example(groups: list[dict[str, dict[int, float]]]) -> str:
    """" (seed 1: 0.766461 against 0.776233)": the lowest seed every group measured, or ""."""
    shared = set.intersection(*({k for m in g.values() for k in m} for g in groups))
    if not shared:
        return ""
    seed = min(shared)
    values = [next(m[seed] for m in g.values() if seed in m) for g in groups]
    return f" (seed {seed}: " + " against ".join(f"{v:.6g}" for v in values) + ")"


def kernels_text(check: KernelCheck) -> str:
    """A study block's paragraph on whether its pairs computed the base model alike ("" without the measurement)."""
    what = ("The first training step's loss (before any update; these methods start from a zero update, so it is "
            "the frozen base model's loss on the seed's first batch)")
    groups, unchecked = check
    if not groups:
        return ""
    left = (" Not checked: " + ", ".join(name(m) for m in unchecked) + " (no seed shared with another arm, or a "
            "method whose first loss is not the base model's)." if unchecked else "")
    if len(groups) == 1:
        return (f"**Kernels.** {what} is the same in every arm checked at each seed: those final runs computed the "
                f"base model alike.{left}")
    listed = " and ".join("{" + ", ".join(name(m) for m in g) + "}" for g in groups)
    return (f"**Kernels.** {what} differs between the arms {listed}{_example(groups)}: the base model's forward was "
            "computed differently (another CPU, other kernel settings, other libraries or inputs), so every pair "
            "across the groups differs by that as well as by its method. The noise it adds is inside the intervals "
            "over seeds; a shift it might cause is not. Rerunning one group's final runs as the other's were computed "
            f"measures it (`python -m ablations.repeat`).{left}")


def ordering(scores: dict[str, dict[int, float]], alpha: float = 0.05) -> list[tuple[str, str, stats.SeedComparison, float]]:
    """Every pair of the claimed ordering, higher claimed minus lower, paired over seeds, Holm over the pairs."""
    pairs = [(hi, lo) for i, lo in enumerate(ORDER) for hi in ORDER[i + 1:] if hi in scores and lo in scores]
    comparisons = {(hi, lo): stats.seed_comparison(scores[hi], scores[lo]) for hi, lo in pairs}
    adjusted = stats.holm({k: c.p_value for k, c in comparisons.items()})
    return [(hi, lo, comparisons[(hi, lo)], adjusted[(hi, lo)]) for hi, lo in pairs]


def ordering_verdict(rows, missing: list[str], alpha: float = 0.05) -> str:
    if missing:
        return "inconclusive: " + ", ".join(name(m) for m in missing) + " not measured yet"
    if not rows or any(c.n_seeds < stats.MIN_PAIRS for _, _, c, _ in rows):
        return "inconclusive (fewer than 2 paired seeds in a pair)"
    significant = [(hi, lo, c) for hi, lo, c, p in rows if math.isfinite(p) and p < alpha]
    if len(significant) == len(rows) and all(c.estimate > 0 for _, _, c in significant):
        return "supported: every pair differs in the claimed direction (Holm over the pairs)"
    against = [f"{name(lo)} above {name(hi)}" for hi, lo, c in significant if c.estimate < 0]
    if against:
        return "not supported at this scale: " + ", ".join(against) + " (Holm over the pairs)"
    if significant:
        found = ", ".join(f"{name(hi)} above {name(lo)}" for hi, lo, _ in significant)
        return f"not supported at this scale: only {found} is detected; the other pairs show no detectable difference"
    return "not supported at this scale: no pair shows a detectable difference (which is not equivalence)"


def claims(folder: Path, shipped: set[tuple[str, int]]) -> list[dict]:
    """The mechanism claims at the tuned rates, recomputed from the journal's stored diagnostics.

    ``shipped``: the (method, seed) final runs items.csv.gz holds; the journal must hold the same ones."""
    from ablations import mechanisms  # deferred: harness.diagnostics loads torch

    journal = folder / "journal.log"
    if not journal.is_file():
        raise UserError(f"{journal} not found")
    url = resolve_storage_url(f"journal:{journal}")
    storage = open_storage(url, create=False)
    plan = load_plan(read_design(folder)["name"], storage, url)
    arms = fair.method_results(plan, storage)
    in_journal = {(arm.spec, int(seed)) for arm in arms for seed in arm.test}
    if in_journal != shipped:
        extra = sorted(in_journal - shipped) or sorted(shipped - in_journal)
        where = "journal.log has final runs items.csv.gz lacks" if in_journal - shipped else \
            "items.csv.gz has final runs journal.log lacks"
        raise UserError(f"{folder}: {where} ({', '.join(f'{m} seed {s}' for m, s in extra)}); rewrite the report "
                        "from the journal (--report-only) first")
    return mechanisms.claim_rows(arms)


@dataclass
class Study:
    """What a fair study's shipped files give, checked against each other (verdict.csv against items.csv.gz,
    trials.csv's choices against verdict.csv)."""

    folder: Path
    design: dict
    verdict: pd.DataFrame  # recomputed from items.csv.gz
    items: dict
    scores: dict[str, dict[int, float]]  # method -> seed -> test average
    tuned: dict[str, Tuned]
    reference: dict[str, str | None]
    finished: dict[str, int]  # method -> final seeds finished
    complete: bool

    @property
    def name(self) -> str:
        return self.design["name"]

    @property
    def steps(self) -> int:
        return int(self.design["run"]["max_steps"])

    @property
    def planned(self) -> int:
        return int(self.design["final_seeds"])

    @property
    def methods(self) -> list[str]:
        return list(self.verdict["method"])


def read_study(folder: Path) -> Study:
    design = read_design(folder)
    planned = int(design["final_seeds"])
    verdict = recompute.recompute(folder)
    shipped = pd.read_csv(folder / "verdict.csv", keep_default_na=False, na_values=[""])
    disagree = recompute.differences(verdict, shipped)
    if disagree:
        raise UserError(f"{folder / 'verdict.csv'} differs from items.csv.gz ({disagree[0]}); rewrite the report "
                        "(--report-only) first")
    items = recompute.read_items(folder / "items.csv.gz")
    scores = {m: recompute.seed_scores(c) for m, c in items.items()}
    tuned = tuning(folder, SMOOTHING_STEPS)
    for row in shipped.itertuples():
        if row.method in tuned and not math.isfinite(float(row.chosen_lr)):  # tuning still running: no choice yet
            del tuned[row.method]
        elif row.method in tuned and not math.isclose(tuned[row.method].chosen, float(row.chosen_lr), rel_tol=1e-9):
            raise UserError(f"trials.csv picks {tuned[row.method].chosen:g} for {row.method}, verdict.csv "
                            f"{float(row.chosen_lr):g}; rewrite the report first")
    methods = list(verdict["method"])
    reference = {r.method: (r.reference if isinstance(r.reference, str) and r.reference else None)
                 for r in verdict.itertuples()}
    finished = {m: len(scores.get(m, {})) for m in methods}
    complete = all(finished.get(m, 0) >= planned and m in tuned for m in methods)
    return Study(folder, design, verdict, items, scores, tuned, reference, finished, complete)


def text(folder: Path) -> str:
    """The Findings block for one fair study folder (Markdown, no trailing newline)."""
    s = read_study(folder)
    design, study, steps, planned = s.design, s.name, s.steps, s.planned
    delta = float(design["delta"]) / 100
    per_decade = float(design["lr_grid"]["per_decade"])
    verdict, items, scores, tuned = s.verdict, s.items, s.scores, s.tuned
    methods, reference, finished, complete = s.methods, s.reference, s.finished, s.complete
    controls = [m for m, f in zip(verdict["method"], verdict["family"]) if f == CONTROL_FAMILY]
    out = [f"### `{study}`: {', '.join(name(m) for m in methods)}, each at its own tuned rate", ""]
    if complete:
        out.append(f"**Status: complete.** Every method tuned and {planned} final seeds each.")
    else:
        have = "; ".join(f"{name(m)}: {'tuned' if m in tuned else 'not tuned yet'}, "
                         f"{finished.get(m, 0)} of {planned} final seeds" for m in methods)
        out.append(f"**Status: partial** ({have}). A verdict below covers only the seeds that exist; none is final.")
    out += ["", "| method | vs | rate chosen on validation | from the reference's | validation at it | test, mean ± SD "
                "over seeds | gain over the reference, 95% over seeds | items 95% | p (Holm) | 90% (TOST) | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in verdict.itertuples():
        t, ref = tuned.get(row.method), reference.get(row.method)
        rate = f"{t.chosen:.3g}" + (" (at the grid's edge)" if t.at_edge else "") if t else "not tuned yet"
        offset = (f"{round(math.log10(t.chosen / tuned[ref].chosen) * per_decade):+d} grid step(s)"
                  if t and ref in tuned else "")
        valid = pts(t.curve.get(t.chosen, math.nan), signed=False) + "%" if t else ""
        n = finished.get(row.method, 0)
        test = f"{pts(row.test_mean, False)} ± {pts(row.test_std, False)}% ({n} seeds)" if n else "no final seed yet"
        if ref is None:
            out.append(f"| {name(row.method)} | | {rate} | | {valid} | {test} | reference | | | | |")
            continue
        if not math.isfinite(row.gain):
            out.append(f"| {name(row.method)} | {name(ref)} | {rate} | {offset} | {valid} | {test} | not measured "
                       f"| | | | {row.verdict} |")
            continue
        out.append(f"| {name(row.method)} | {name(ref)} | {rate} | {offset} | {valid} | {test} | {pts(row.gain)} "
                   f"{interval(row.gain_low, row.gain_high)} | {interval(row.items_low, row.items_high)} | "
                   f"{p_text(row.p_holm)} | {interval(row.gain_low90, row.gain_high90)} | {row.verdict} |")
    out += ["", f"Gains are in percentage points of the `arithmetic` test average, the row minus its reference (vs); "
                f"`equivalent` would need the 90% interval inside ±{pts(delta, False)} points (delta, fixed before the "
                "study). The seed interval covers run-to-run variance on this test set; the item interval covers "
                "test-item noise." + (" Comparisons with LoRA and the controls' contrasts are separate Holm "
                                      "families." if controls else ""), ""]

    if controls:
        parts = []
        for row in verdict.itertuples():
            if row.method not in controls:
                continue
            if not math.isfinite(row.gain):
                parts.append(f"{name(row.method)} - {name(reference[row.method])}: not measured yet")
                continue
            parts.append(f"{name(row.method)} - {name(reference[row.method])} {pts(row.gain)} "
                         f"{interval(row.gain_low, row.gain_high)} (Holm p {p_text(row.p_holm)}, "
                         f"{finished.get(row.method, 0)} seeds): {row.verdict}")
        out += ["**What the controls show** (each control minus the method it controls, at their own tuned rates; "
                "a control that scores like its parent says the part it removes or changes is not what the score "
                "rests on, at this scale): " + "; ".join(parts) + ".", ""]
    elif any(m in methods for m in ORDER[1:]):  # a study of the paper's methods (not one of the others against LoRA)
        pairs = ordering(scores)
        out += ["**The ordering LinChain > MoSLoRA > LoRA** (the paper's Tables 1-2), every pair at its tuned rates, "
                "Holm over the three pairs of the ordering (a family of its own, so its p-values differ from the "
                "table's): "
                + "; ".join(f"{name(hi)} - {name(lo)} {pts(c.estimate)} {interval(c.low, c.high)} "
                            f"(Holm p {p_text(p)}, {c.n_seeds} seeds)" for hi, lo, c, p in pairs)
                + f". Verdict: {ordering_verdict(pairs, [m for m in ORDER if not scores.get(m)])}.", ""]

    rows = [r for r in claims(folder, shipped_runs(s)) if r.get("tested") is True or r.get("tested") == "True"]
    out.append("**Mechanisms at the tuned rates** (diagnostics.md; each method against its reference over the "
               "paired final seeds, Holm over the claim tests of each family):")
    out.append("")
    for key, title in CLAIM_TITLES.items():
        found = [r for r in rows if r["claim"] == key]
        measure = next((r["measure"] for r in found if r.get("measure")), "")
        parts = []
        for r in found:
            if r["verdict"] == "not measured":
                parts.append(f"{name(r['method'])}: not measured ({r['note']})")
                continue
            other = f" (measured as {r['measure']})" if r.get("measure") and r["measure"] != measure else ""
            parts.append(f"{name(r['method'])}{other} {r['method_mean']:.3g} against {r['reference_mean']:.3g}, "
                         f"difference {r['difference']:+.3g} [{r['low']:+.3g}, {r['high']:+.3g}], "
                         f"Holm p {p_text(r['p_holm'])}, {r['n_pairs']} pairs: **{r['verdict']}**"
                         + (f" ({r['note']})" if r["verdict"] == "inconclusive" and r.get("note") else ""))
        out.append(f"- {title}" + (f", measured as {measure}" if measure else "") + ": "
                   + ("; ".join(parts) if parts else "no test") + ".")
    out.append("")

    times = median_seconds_per_step(folder, steps)
    if "lora" in times:
        base = times["lora"][0]
        captured = cosine_recorded(folder)
        mixed = bool(captured) and any(m in times and m not in captured for m in methods)
        listed = []
        for m in methods:
            if m in times:
                med, runs = times[m]
                listed.append(f"{name(m)}{'*' if mixed and m in captured else ''} {med:.2f} s/step "
                              f"({runs} runs)" + ("" if m == "lora" else f", {med / base:.2f}x LoRA"))
        out += ["**Training-time overhead** (the paper's Table 4), the median over the final runs of training "
                "seconds per step on this 2-core CPU in bf16: " + "; ".join(listed) + ". The runs were not "
                "timed under controlled load, so read these as rough ratios."
                + (" The arms marked * recorded the step-direction cosine (one fp32 matmul per adapted layer on "
                   "every tenth step), the others did not: that adds to their time for a reason that is not the "
                   "method." if mixed else ""), ""]

    pooled, figures = noise(s)
    family = figures.comparisons if figures else 0
    if figures:
        needed = figures.seeds_needed
        shares = ", ".join(f"{name(r.method)} - {name(reference[r.method])}: seeds {100 * r.var_seed_share:.0f}%, items "
                           f"{100 * r.var_item_share:.0f}%" for r in verdict.itertuples()
                           if reference.get(r.method) and math.isfinite(r.var_seed_share))
        out += [f"**Noise and what it allows.** The paired per-seed SD of a gain, pooled over the comparisons "
                f"with LoRA, is {pooled.sd:.1f} points ({pooled.df} df, 95% {pooled.low:.1f}-{pooled.high:.1f}). "
                f"With {planned} final seeds that gives a minimum detectable effect of {figures.mde:.1f} points "
                f"(80% power, Holm's first step over {family}); a true gain of {100 * delta:.0f} points is found "
                f"{100 * figures.power_at_delta:.0f}% of the time and equal methods are called equivalent "
                f"{100 * figures.p_equivalent:.0f}% of the time; the {100 * delta:.0f}-point question needs "
                + (f"{needed} final seeds per method" if needed else "more than 1000 seeds")
                + f". Share of each gain's variance (the rest is their interaction): {shares}.", ""]
    kernels = kernels_text(kernel_groups(folder))
    if kernels:
        out += [kernels, ""]
    out += [limits(folder, items, steps, verdict), ""]
    return "\n".join(out).rstrip()


def noise(s: Study) -> tuple[stats.PooledSD, stats.PowerFigures | None]:
    """The paired per-seed SD of a gain pooled over the study's comparisons with LoRA (in points), and the design's
    power figures from it: its planned final seeds, Holm over its planned LoRA family (finished or not)."""
    with_lora = [r.method for r in s.verdict.itertuples() if r.family == LORA_FAMILY]
    ref = s.reference
    differences = [[100 * (s.scores[m][seed] - s.scores[ref[m]][seed])
                    for seed in sorted(set(s.scores[m]) & set(s.scores[ref[m]]))]
                   for m in with_lora if m in s.scores and ref[m] in s.scores]
    pooled = stats.pooled_sd(differences)
    if not math.isfinite(pooled.sd):
        return pooled, None
    family = max(1, len(with_lora))
    delta = float(s.design["delta"])
    return pooled, stats.power_figures(pooled.sd, s.planned, comparisons=family, delta=delta, sd_df=pooled.df)


def scale(folder: Path, items, steps: int) -> str:
    """The study's scale in words: model, steps, batch, rank, test items."""
    import json

    result = folder / "result.json"
    config = json.loads(result.read_text()).get("config", {}) if result.is_file() else {}
    tasks = {task: len(docs) for seeds in items.values() for tasks in seeds.values() for task, docs in tasks.items()}
    return (f"one model (`{config.get('model', '?')}`), {steps} optimizer steps of batch {config.get('batch_size', '?')}, "
            f"rank {config.get('rank', '?')}, one synthetic task family ({sum(tasks.values())} test items over "
            f"{len(tasks)} tasks), one tuning seed")


def limits(folder: Path, items, steps: int, verdict: pd.DataFrame) -> str:
    """What the study cannot show: its scale, and the arms it did not run."""
    controls = [m for m, f in zip(verdict["method"], verdict["family"]) if f == CONTROL_FAMILY]
    arms = ("controls: " + ", ".join(f"`{c}`" for c in controls) if controls else
            "no control arm in this study (the init-only, depth and parameter-count controls are a study of their "
            "own), so no mechanism claim here is tested against a control")
    return (f"**Limits.** This is {scale(folder, items, steps)}; {arms}. A result here says what holds at this "
            "scale, not what holds for larger models, longer training or other tasks.")


def shipped_runs(s: Study) -> set[tuple[str, int]]:
    return {(m, int(seed)) for m, by in s.scores.items() for seed in by}


def verdict_label(row: dict) -> str:
    """A mechanism claim's verdict, with why when it was withheld."""
    note = str(row.get("note") or "")
    if row["verdict"] == "inconclusive" and "withheld:" in note:  # fair.withheld's and the step length's reasons
        if "rates differ" in note:
            return "withheld (the rates differ; no step-direction cosine)"
        if "edge" in note:
            return "withheld (a rate at the grid's edge)"
        return "withheld"
    return row["verdict"]


def tally(verdicts: list[tuple[str, str]]) -> str:
    """``[(method, verdict), ...]`` as "**v** for all N" or "**v**: a, b; **w**: c"."""
    groups: dict[str, list[str]] = {}
    for method, verdict in verdicts:
        groups.setdefault(verdict, []).append(method)
    if not groups:
        return "not measured yet"
    if len(groups) == 1:
        (verdict, methods), = groups.items()
        return f"**{verdict}** for " + (f"all {len(methods)}" if len(methods) > 1 else name(methods[0]))
    return "; ".join(f"**{v}**: {', '.join(name(m) for m in ms)}" for v, ms in groups.items())


def _count(value) -> int:
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0


def measured_as(found: list[dict]) -> str:
    """The "measured as" cell of a claim: its one measure, or each measure with the methods it judged."""
    by: dict[str, list[str]] = {}
    for r in found:
        if r.get("measure"):
            by.setdefault(r["measure"], []).append(r["method"])
    if not by:
        return ""
    if len(by) == 1:
        return next(iter(by)) + " (method - LoRA)"
    return "; ".join(f"{m} for {', '.join(name(x) for x in methods)}" for m, methods in by.items()) + " (method - LoRA)"


REPEAT_FILE = "repeat.csv"  # written by python -m ablations.repeat into a study that reran another's final runs


def replication_rows(studies: list[Study]) -> list[tuple[str, str, str, str]]:
    """One row per study that reran another study's final runs (it holds repeat.csv, which names the original): how
    many runs repeated item for item, and each of its gains over LoRA with its verdict beside the original's."""
    out = []
    by_name = {s.name: s for s in studies}
    for s in studies:
        path = s.folder / REPEAT_FILE
        if not path.is_file():
            continue
        runs = pd.read_csv(path, dtype={"original": str})
        named = sorted(set(runs["original"].dropna())) if "original" in runs.columns else []
        original = by_name.get(named[0]) if len(named) == 1 else None
        if original is None:
            raise UserError(f"{path}: names {', '.join(named) or 'no'} original study; pass its folder to --brief "
                            "too (write repeat.csv again with python -m ablations.repeat)")
        same = int(((runs["differing_items"] == 0) & (runs["compared_items"] > 0)).sum())
        verdicts, figures = [], []
        for r in s.verdict.itertuples():
            ref = s.reference.get(r.method)
            mine = original.verdict[(original.verdict["method"] == r.method) & (original.verdict["family"] == r.family)]
            if not ref or r.family != LORA_FAMILY or mine.empty:
                continue
            o = next(mine.itertuples())
            now, then = score_verdict_of(s, r), score_verdict_of(original, o)
            verdicts.append((r.method, now if now == then else f"{then} -> {now}"))
            figures.append(f"{name(r.method)} {pts(r.gain)} {interval(r.gain_low, r.gain_high)} (was {pts(o.gain)} "
                           f"{interval(o.gain_low, o.gain_high)})")
        changed = any("->" in v for _, v in verdicts)
        out.append((f"the verdicts hold on new runs (`{s.name}` reran `{original.name}`)",
                    f"`{original.name}`'s final runs trained again at the same seeds and rates; items scored "
                    "differently; each gain over LoRA on the new runs",
                    ("**verdicts changed**" if changed else "**the same verdicts**") + ": "
                    + "; ".join(f"{name(m)} {v}" for m, v in verdicts),
                    f"{same} of {len(runs)} runs repeated item for item ({int(runs['differing_items'].sum())} of "
                    f"{int(runs['compared_items'].sum())} items differ); " + "; ".join(figures)))
    return out


def kernel_rows(studies: list[Study]) -> list[tuple[str, str, str, str]]:
    """One row: for each study that measured it, whether its arms computed the base model alike (kernel_groups)."""
    found = [(s, kernel_groups(s.folder)) for s in studies]
    found = [(s, c) for s, c in found if c.groups]
    if not found:
        return []
    verdicts, figures = [], []
    for s, check in found:
        if len(check.groups) == 1:
            verdicts.append(f"`{s.name}` alike")
        else:
            verdicts.append(f"`{s.name}` **{len(check.groups)} groups**: "
                            + " and ".join("{" + ", ".join(name(m) for m in g) + "}" for g in check.groups))
            if _example(check.groups):
                figures.append(f"`{s.name}`{_example(check.groups)}")
        if check.unchecked:
            verdicts[-1] += " (not checked: " + ", ".join(name(m) for m in check.unchecked) + ")"
    return [("each pair's base model computed alike (a check of the design, not a claim)",
             "the first training step's loss per seed, across arms: the frozen base model's loss on the seed's first "
             "batch (these methods start from a zero update), which another CPU, other kernel settings, libraries or "
             "inputs change", "; ".join(verdicts),
             "; ".join(figures) if figures else "every arm checked agrees at every seed")]


def score_verdict_of(s: Study, r) -> str:
    """A score verdict, or why it was withheld (fair.withheld: a chosen rate at the grid's edge)."""
    if not math.isfinite(r.gain):
        return "not measured yet"
    edge = [m for m in (r.method, s.reference[r.method]) if m in s.tuned and s.tuned[m].at_edge]
    return "withheld (a rate at the grid's edge)" if edge and r.verdict == "inconclusive" else r.verdict


def brief(folders: list[Path]) -> str:
    """The answer across several fair studies, claim by claim (Markdown, no trailing newline).

    A (method, reference) pair that several studies hold (an imported arm) is read from the first folder that
    holds it; every figure comes from the same functions as each study's own block."""
    studies = [read_study(f) for f in folders]
    pairs, controls, seen = [], [], set()
    for s in studies:
        for r in s.verdict.itertuples():
            ref = s.reference.get(r.method)
            if ref and (r.method, ref) not in seen:
                seen.add((r.method, ref))
                (controls if r.family == CONTROL_FAMILY else pairs).append((s, r))

    def gain(s: Study, r) -> str:
        if not math.isfinite(r.gain):
            return f"{name(r.method)} not measured yet"
        return f"{name(r.method)} {pts(r.gain)} {interval(r.gain_low, r.gain_high)}"

    score_verdict = score_verdict_of

    rows = []
    paper = next((s for s in studies if all(m in s.methods for m in ORDER)), None)
    if paper is not None:
        ordered = ordering(paper.scores)
        rows.append(("LinChain > MoSLoRA > LoRA (the LinChain paper's Tables 1-2)",
                     "test accuracy at each method's tuned rate, every pair; Holm over the 3 pairs",
                     ordering_verdict(ordered, [m for m in ORDER if not paper.scores.get(m)]).replace(
                         "not supported at this scale", "**not supported at this scale**", 1),
                     "; ".join(f"{name(hi)} - {name(lo)} {pts(c.estimate)} {interval(c.low, c.high)}"
                               for hi, lo, c, _ in ordered)))

    rows.append(("a method beats LoRA", "gain in test accuracy over LoRA, each at its tuned rate; Holm within "
                 "each study's family", tally([(r.method, score_verdict(s, r)) for s, r in pairs]),
                 "; ".join(gain(s, r) for s, r in pairs)))

    # Each (claim, method) from the first study whose test of it decided something (a rerun that recorded the
    # step-direction cosine decides the paths claim its original withheld), else from the first that tested it.
    candidates: dict[tuple[str, str], list[tuple[Study, dict]]] = {}
    for s in studies:
        for row in claims(s.folder, shipped_runs(s)):
            if row["family"] == LORA_FAMILY and (row.get("tested") is True or row.get("tested") == "True") \
                    and row["claim"] in CLAIM_TITLES:
                candidates.setdefault((row["claim"], row["method"]), []).append((s, row))
    claimed: dict[str, list[tuple[Study, dict]]] = {key: [] for key in CLAIM_TITLES}
    for (claim, _), found in candidates.items():
        decided = [(s, r) for s, r in found if r["verdict"] in DECIDED and _count(r.get("n_pairs")) >= stats.MIN_PAIRS]
        claimed[claim].append((decided or found)[0])
    for key, title in CLAIM_TITLES.items():
        found = claimed[key]
        figures = "; ".join(f"{name(r['method'])} {r['difference']:+.3g} [{r['low']:+.3g}, {r['high']:+.3g}]"
                            + (f" (`{s.name}`)" if s is not studies[0] and r["method"] in studies[0].methods else "")
                            for s, r in found if r["verdict"] != "not measured")
        rows.append((title, measured_as([r for _, r in found]), tally(
            [(r["method"], verdict_label(r)) for _, r in found]), figures))

    rows += replication_rows(studies)

    rows += kernel_rows(studies)

    ratios: dict[str, tuple[float, bool]] = {}
    for s in studies:
        times = median_seconds_per_step(s.folder, s.steps)
        if "lora" not in times:
            continue
        captured = cosine_recorded(s.folder)
        for m in s.methods:
            if m != "lora" and m in times and m not in ratios:
                ratios[m] = (times[m][0] / times["lora"][0], m in captured)
    if ratios:
        low, high = min(v for v, _ in ratios.values()), max(v for v, _ in ratios.values())
        marked = any(c for _, c in ratios.values())
        rows.append(("training-time overhead (the LinChain paper's Table 4)",
                     "median s/step of the final runs over LoRA's, this 2-core CPU, bf16, load not controlled",
                     f"{low:.2f}x to {high:.2f}x LoRA",
                     "; ".join(f"{name(m)}{'*' if c else ''} {v:.2f}x" for m, (v, c) in ratios.items())
                     + (" (* also recorded the step-direction cosine, which adds time)" if marked else "")))
    if controls:
        rows.append(("what the controls show", "each control minus the method it controls, both at tuned rates",
                     tally([(r.method, score_verdict(s, r)) for s, r in controls]), "; ".join(
                         f"{gain(s, r)} vs {name(s.reference[r.method])}" for s, r in controls)))

    offsets = []
    for s, r in pairs + controls:
        t, lora = s.tuned.get(r.method), s.tuned.get("lora")
        if t and lora:
            steps = round(math.log10(t.chosen / lora.chosen) * float(s.design["lr_grid"]["per_decade"]))
            offsets.append((r.method, steps, t.at_edge))
    if offsets:
        lora_rate = next(s.tuned["lora"].chosen for s in studies if "lora" in s.tuned)
        rows.append(("where each method's best rate sits", f"grid steps (quarter decades) from LoRA's chosen "
                     f"{lora_rate:.3g}, chosen on validation", f"{min(o for _, o, _ in offsets):+d} to "
                     f"{max(o for _, o, _ in offsets):+d} steps",
                     "; ".join(f"{name(m)} {o:+d}" + (" (at the grid's edge)" if edge else "")
                               for m, o, edge in offsets)))

    spreads, designs, pooled_pairs = [], [], set()
    for s in studies:
        mine = {(r.method, s.reference[r.method]) for r in s.verdict.itertuples() if r.family == LORA_FAMILY}
        pooled, figures = noise(s)
        if figures and not mine <= pooled_pairs:  # a study whose LoRA comparisons are all imported adds nothing new
            pooled_pairs |= mine
            designs.append(figures)
            spreads.append(f"`{s.name}` {pooled.sd:.1f} points ({pooled.df} df): MDE {figures.mde:.1f} with "
                           f"{s.planned} seeds over {figures.comparisons} comparison(s), "
                           + (f"{figures.seeds_needed} seeds" if figures.seeds_needed else "more than 1000 seeds")
                           + f" for the {figures.delta:.0f}-point question")
    if spreads:
        mdes = [f.mde for f in designs]
        needed = [f.seeds_needed for f in designs]
        rows.append(("how many seeds the question needs", "paired per-seed SD of a gain over LoRA, pooled per "
                     "study; 80% power at Holm's first step",
                     f"MDE {min(mdes):.1f}" + (f"-{max(mdes):.1f}" if max(mdes) > min(mdes) + 0.05 else "")
                     + f" points with the seeds run; a {designs[0].delta:.0f}-point gain needs "
                     + (f"{min(needed)}" + (f"-{max(needed)}" if max(needed) > min(needed) else "") + " seeds per method"
                        if all(needed) else "more than 1000 seeds"), "; ".join(spreads)))

    names = ", ".join(f"`{s.name}`" for s in studies)
    reruns = [s for s in studies if (s.folder / REPEAT_FILE).is_file()]
    partial = [s for s in studies if not s.complete]
    out = ["### In brief: the answer at this scale, claim by claim", ""]
    out.append(f"From {names}; each study's block below has every figure with its p-values, and its folder the "
               "files they come from. Gains and differences are the method minus LoRA, 95% intervals over the "
               "paired final seeds (the runs' variance on this test set), not adjusted for multiplicity; the "
               "verdicts are corrected for them (Holm, within each study's family). A pair that several studies hold "
               "(imported arms) is counted once" + ("; " + ", ".join(f"`{s.name}`" for s in reruns) + " reran "
               "another study's final runs: it adds what those runs did not measure (the step-direction cosine), its own "
               "kernel check and a row on whether the verdicts hold (its figures are in its folder's verdict.md, "
               "diagnostics.md and repeat.md, not in a block below)." if reruns else "."))
    if partial:
        out.append("")
        out.append("**Provisional:** " + ", ".join(f"`{s.name}`" for s in partial) + " still running; rows that "
                   "name its methods will change.")
    out += ["", "| claim | measured as | verdict at this scale | figures |", "|---|---|---|---|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    out += ["", f"**At this scale** means {scale(studies[0].folder, studies[0].items, studies[0].steps)} per "
            "method. Verdict words: `inconclusive`: the interval neither excludes 0 nor "
            "sits inside ±delta; **no detectable difference** is not equivalence; **opposite**: a significant "
            "difference in the direction the claim does not predict."]
    return "\n".join(out)


BRIEF_BEGIN = "<!-- findings:brief begin: written by `python -m ablations.findings --brief {folders} --readme " \
              "results/README.md` from the studies' files; edit ablations/findings.py, not this text -->"
BRIEF_END = "<!-- findings:brief end -->"


def brief_block(folders: list[Path]) -> str:
    named = " ".join(f"results/findings/{f.name}" for f in folders)  # as the study blocks' markers name them
    return "\n".join([BRIEF_BEGIN.format(folders=named), brief(folders), BRIEF_END])


def block(folder: Path) -> str:
    study = read_design(folder)["name"]
    return "\n".join([BEGIN.format(name=study), text(folder), END.format(name=study)])


def replace_block(readme: str, new_block: str, study: str) -> str:
    """The README with its block for ``study`` (a study's name, or ``brief``) replaced: from the line that opens with
    its begin marker to its end marker (a UserError when they are missing)."""
    opening, end = f"<!-- findings:{study} begin", END.format(name=study)
    head, sep, rest = readme.partition(opening)
    if not sep or end not in rest:
        begin = new_block.splitlines()[0]
        raise UserError(f"the README has no block for {study!r}: add the two lines\n{begin}\n{end}\nwhere it belongs")
    _, _, tail = rest.partition(end)
    return head + new_block + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablations.findings", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 when written (or, with --check, unchanged), 1 when "
                                            "--check finds the README stale, 2 on bad input.")
    parser.add_argument("folder", type=Path, nargs="+", help="a fair study's findings folder (study.yaml, "
                        "verdict.csv, items.csv.gz, trials.csv, journal.log); several with --brief")
    parser.add_argument("--brief", action="store_true", help="write the summary across the folders given, claim by "
                                                             "claim (its own block, `findings:brief`)")
    parser.add_argument("--readme", type=Path, help="rewrite this file's block for the study (between its markers)")
    parser.add_argument("--check", action="store_true", help="with --readme: change nothing, exit 1 if the block "
                                                             "differs from what the files give")
    args = parser.parse_args(argv)
    try:
        if args.check and args.readme is None:
            raise UserError("--check needs --readme FILE")
        if len(args.folder) > 1 and not args.brief:
            raise UserError(f"{len(args.folder)} folders given: one study's block takes one folder (several need "
                            "--brief)")
        new = brief_block(args.folder) if args.brief else block(args.folder[0])
        if args.readme is None:
            print(new)
            return 0
        if not args.readme.is_file():
            raise UserError(f"{args.readme} not found")
        old = args.readme.read_text()
        study = "brief" if args.brief else read_design(args.folder[0])["name"]
        updated = replace_block(old, new, study)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = " ".join(str(f) for f in args.folder)
    if args.check:
        if updated != old:
            print(f"{args.readme}: the findings block differs from what {what} gives; run without --check "
                  "to rewrite it", file=sys.stderr)
            return 1
        print(f"{args.readme}: every figure of the findings block agrees with {what}")
        return 0
    args.readme.write_text(updated)
    print(f"{args.readme}: findings block written from {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
