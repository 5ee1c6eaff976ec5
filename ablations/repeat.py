"""Did a fair study's final runs repeat, and do its verdicts hold on the rerun?

    python -m ablations.repeat results/findings/fair-paper results/findings/fair-paths

A second fair study that reruns the first one's final runs - the same methods at the same chosen rates and
final seeds, its tuning trials imported with ``--import-tuning-only`` so that nothing is chosen again - is
either a repeat (the same code, libraries and kernels: training is deterministic, so every item is scored the
same) or a replication (new runs of the same design, which differ within the seed-to-seed noise). This says
which, run by run: each (method, seed)'s test score in both, how many test items were scored differently, when
each ran, and where the trials recorded it, on which machine and commit. Per method: how many runs repeated,
both means, and the mean paired difference (rerun minus original, a 95% Student-t interval over the seeds; a
replication's should cover 0). Per comparison: the gain and the verdict in each study, each from its own
verdict.csv.

Reads only the shipped files of each folder (study.yaml, verdict.csv, trials.csv, items.csv.gz and, where the
report wrote it, diagnostics.csv's first-step losses). With ``--also STUDY ...`` (studies that imported the
original's runs), their comparisons are recomputed with the reruns in place (repeat_others.csv). Writes
repeat.md and repeat.csv into the rerun's folder (or --out). Exit 0, or 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ablations.findings import KERNEL_TOLERANCE, starts_at_base
from ablations.recompute import seed_scores
from ablations.retune import Folder, compare, identical, read_folder
from harness import stats
from harness.errors import UserError

RUN_COLUMNS = ("original", "method", "seed", "lr", "original_score", "rerun_score", "difference", "differing_items",
               "compared_items", "original_first_loss", "rerun_first_loss", "original_started", "rerun_started",
               "rerun_machine", "rerun_commit")


def final_trials(folder: Folder) -> dict[tuple[str, int], dict]:
    """(method, seed) -> the completed final trial's row of trials.csv (when it started; machine and commit where
    the trial recorded them)."""
    trials = pd.read_csv(folder.path / "trials.csv", dtype={"commit": str, "machine": str, "protocol": str})
    if "stage" not in trials.columns:
        return {}
    done = trials[(trials["stage"] == "final") & (trials["state"] == "COMPLETE") & trials["seed"].notna()]
    return {(str(r["spec"]), int(float(r["seed"]))): r.to_dict() for _, r in done.iterrows()}


def first_losses(folder: Folder) -> dict[tuple[str, int], float]:
    """(method, seed) -> the final run's first-step loss (diagnostics.csv's first_loss: the frozen base model's loss on
    the seed's first batch, which only the kernels change), where the report recorded it."""
    path = folder.path / "diagnostics.csv"
    try:
        runs = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise UserError(f"{path}: cannot read it ({type(err).__name__})") from None
    if not {"method", "seed", "first_loss"} <= set(runs.columns):
        return {}
    runs = runs.dropna(subset=["seed"])
    return {(str(m), int(s)): float(v) for m, s, v in zip(runs["method"], runs["seed"], runs["first_loss"])
            if pd.notna(v)}


def _cell(row: dict | None, column: str) -> str:
    value = (row or {}).get(column)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def compare_runs(original: Folder, rerun: Folder) -> list[dict]:
    """One row per final run both studies hold at the same method, rate and seed."""
    common = [m for m in rerun.chosen if m in original.chosen]
    if not common:
        raise UserError(f"{rerun.path} holds none of the methods of {original.path}")
    moved = [m for m in common if not math.isclose(original.chosen[m], rerun.chosen[m], rel_tol=1e-9)]
    if moved:
        raise UserError(f"{rerun.path} chose other rates for {', '.join(moved)}: its runs are not reruns of "
                        f"{original.path}'s (python -m ablations.retune compares a re-tune)")
    before, after = final_trials(original), final_trials(rerun)
    loss_before, loss_after = first_losses(original), first_losses(rerun)
    rows = []
    for method in common:
        scores, rescored = seed_scores(original.items.get(method, {})), seed_scores(rerun.items.get(method, {}))
        for seed in sorted(set(scores) & set(rescored)):
            same, total = identical({seed: original.items[method][seed]}, {seed: rerun.items[method][seed]})
            trial = after.get((method, seed))
            rows.append({"original": original.path.name, "method": method, "seed": seed, "lr": rerun.chosen[method], "original_score": scores[seed],
                         "rerun_score": rescored[seed], "difference": rescored[seed] - scores[seed],
                         "differing_items": total - same, "compared_items": total,
                         "original_first_loss": loss_before.get((method, seed), math.nan),
                         "rerun_first_loss": loss_after.get((method, seed), math.nan),
                         "original_started": _cell(before.get((method, seed)), "started"),
                         "rerun_started": _cell(trial, "started"), "rerun_machine": _cell(trial, "machine"),
                         "rerun_commit": _cell(trial, "commit")})
    if not rows:
        raise UserError(f"{rerun.path} has no final run at a seed {original.path} also ran")
    return rows


def per_method(runs: list[dict]) -> list[dict]:
    """Per method: runs, exact repeats, both means, the mean paired difference with its interval, the SD of the
    differences (the repeat's own noise, to set against the seed-to-seed SD of a score)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        c = stats.seed_comparison({r["seed"]: r["rerun_score"] for r in mine},
                                  {r["seed"]: r["original_score"] for r in mine})
        originals = [r["original_score"] for r in mine]
        out.append({"method": method, "runs": len(mine), "repeated": sum(_repeated(r) for r in mine),
                    "original_mean": float(np.mean(originals)), "original_sd": _sd(originals),
                    "rerun_mean": float(np.mean([r["rerun_score"] for r in mine])),
                    "difference": c.estimate, "low": c.low, "high": c.high,
                    "difference_sd": _sd([r["difference"] for r in mine]),
                    "differing_items": sum(r["differing_items"] for r in mine),
                    "compared_items": sum(r["compared_items"] for r in mine)})
    return out


def _repeated(run: dict) -> bool:
    """Every item compared was scored the same (and there was one to compare)."""
    return run["compared_items"] > 0 and run["differing_items"] == 0


def _sd(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def gains(original: Folder, rerun: Folder) -> list[dict]:
    """Each comparison of the rerun with its gain and verdict there and in the original (their verdict.csv)."""
    def rows_of(folder: Folder) -> dict[tuple[str, str], dict]:
        found = {}
        for r in folder.verdict.to_dict(orient="records"):
            if isinstance(r.get("reference"), str) and r["reference"]:
                found[(r["method"], r["reference"])] = r
        return found

    before, after = rows_of(original), rows_of(rerun)
    out = []
    for key, r in after.items():
        o = before.get(key, {})
        out.append({"method": key[0], "reference": key[1],
                    **{f"original_{k}": o.get(k, math.nan) for k in ("gain", "gain_low", "gain_high", "verdict")},
                    **{f"rerun_{k}": r.get(k, math.nan) for k in ("gain", "gain_low", "gain_high", "verdict")}})
    return out


def substituted(importer: Folder, rerun: Folder, original: Folder) -> list[dict]:
    """Each comparison of a study that imported the original's runs (``--import-arms``) that involves a method the
    rerun reran, as shipped and with the rerun's runs in place of the imported ones (the same method, rate and seeds;
    ablations.retune's substitution at an unmoved rate), and whether each pair computed the base model alike before
    and after (first-step losses at the shared seeds). A method is replaced only where the importer's runs of it are
    the original's (item for item) and the rerun has runs of it; the others keep the importer's own runs."""
    losses = {"importer": first_losses(importer), "rerun": first_losses(rerun)}
    ran = {m: set(c) for m, c in rerun.items.items()}
    imported = set()
    for m in set(importer.items) & set(original.items) & set(ran):
        same, total = identical(importer.items[m], original.items[m])
        if total and same == total:
            imported.add(m)
    out = []
    for row in compare(importer, rerun):
        method, reference = row["method"], row["reference"]
        if any(step != "+0" for step in row["grid_steps_moved"].split("; ")):
            continue  # another rate: not the same runs (never for a rerun, which imports the tuning)
        replaced = [m for m in row["retuned"].split(", ") if m in imported]
        if not replaced:
            continue
        after = {m: {**{k: v for (x, k), v in losses["importer"].items() if x == m},
                     **({k: v for (x, k), v in losses["rerun"].items() if x == m} if m in replaced else {})}
                 for m in (method, reference)}
        before = {m: {k: v for (x, k), v in losses["importer"].items() if x == m} for m in (method, reference)}

        def alike(side: dict[str, dict[int, float]]) -> bool | None:
            seeds = set(side[method]) & set(side[reference])
            if not seeds or not (starts_at_base(method) and starts_at_base(reference)):
                return None
            return all(math.isclose(side[method][k], side[reference][k], rel_tol=KERNEL_TOLERANCE) for k in seeds)

        kept = set(importer.items.get(method, {})) & set(importer.items.get(reference, {}))
        out.append({"study": importer.path.name, "method": method, "reference": reference,
                    "replaced": ", ".join(f"{m} ({len(ran[m] & kept)} of {len(kept)} seeds)" for m in replaced),
                    "n_seeds": row["n_seeds"], "shipped_gain": row["original_gain"],
                    "shipped_low": row["original_low"], "shipped_high": row["original_high"],
                    "shipped_alike": alike(before), "rerun_gain": row["retuned_gain"], "rerun_low": row["retuned_low"],
                    "rerun_high": row["retuned_high"], "rerun_alike": alike(after)})
    return out


def _alike(value: bool | None) -> str:
    return {True: "alike", False: "**differently**", None: "not checked"}[value]


def _pts(value, signed: bool = True) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _word(value) -> str:
    return value if isinstance(value, str) and value else "n/a"


def _interval(low, high) -> str:
    return f"[{_pts(low)}, {_pts(high)}]"


def _loss(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else "n/a"


def kernels_sentence(runs: list[dict]) -> str:
    """Whether the reruns computed the base model as the originals did, from the first-step losses."""
    pairs = [(r["original_first_loss"], r["rerun_first_loss"]) for r in runs if starts_at_base(r["method"])
             if math.isfinite(r["original_first_loss"]) and math.isfinite(r["rerun_first_loss"])]
    if not pairs:
        return ""
    other = sum(not math.isclose(a, b, rel_tol=KERNEL_TOLERANCE) for a, b in pairs)
    if other == 0:
        return (f"The first-step loss (the frozen base model's loss on the seed's first batch) is the same in all "
                f"{len(pairs)} pairs: the reruns computed the base model's forward as the originals did.")
    return (f"The first-step loss (the frozen base model's loss on the seed's first batch) differs in {other} of "
            f"{len(pairs)} pairs: those reruns computed the base model differently (another CPU, other kernel "
            "settings, other libraries or inputs), so they differ from their first step.")


def summary(runs: list[dict]) -> str:
    """The answer in one sentence: a repeat, a replication, or a mix."""
    repeated = sum(_repeated(r) for r in runs)
    if repeated == len(runs):
        return (f"**A repeat**: all {len(runs)} reruns scored every test item as the original runs did.")
    if repeated == 0:
        return (f"**A replication, not a repeat**: none of the {len(runs)} reruns scored every test item as its "
                "original did; each is a new run of the same design (seed, rate, data, code path).")
    return (f"**A partial repeat**: {repeated} of {len(runs)} reruns scored every test item as the original "
            f"did; the other {len(runs) - repeated} differ (when each ran is in the table of runs).")


def markdown(original: Folder, rerun: Folder, runs: list[dict], methods: list[dict], compared: list[dict],
             others: list[dict] | None = None) -> str:
    a, b = original.path.name, rerun.path.name
    lines = [f"# Repeated: {b} against {a}", "",
             f"`{b}` reran `{a}`'s final runs: the same methods, at the rates `{a}` chose on validation, with the "
             "same final seeds. Written by `python -m ablations.repeat` from both folders' files.", "",
             " ".join(x for x in (summary(runs), kernels_sentence(runs)) if x), "", "## Per method", "",
             "Means are of the test average over the seeds both ran; the difference is rerun minus original, "
             "paired by seed, with a 95% Student-t interval over those seeds (points). A replication's difference "
             "should cover 0; its SD is the rerun's own noise, to set against the seed-to-seed SD of the original's "
             "scores.", "",
             "| method | rate | runs | repeated item for item | items that differ | original, mean ± SD | rerun, mean "
             "| difference, 95% | SD of the differences |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        lines.append(f"| `{m['method']}` | {rerun.chosen[m['method']]:.3g} | {m['runs']} | {m['repeated']} | "
                     f"{m['differing_items']} of {m['compared_items']} | {_pts(m['original_mean'], False)} ± "
                     f"{_pts(m['original_sd'], False)} | {_pts(m['rerun_mean'], False)} | {_pts(m['difference'])} "
                     f"{_interval(m['low'], m['high'])} | {_pts(m['difference_sd'], False)} |")
    if compared:
        lines += ["", "## The comparisons", "",
                  "Each study's gain over the reference (points, 95% Student-t interval over its paired final seeds) "
                  "and verdict, as its verdict.csv has them: the rerun's are what the same design gave on new runs.",
                  "", f"| method | vs | gain in `{a}` | verdict in `{a}` | gain in `{b}` | verdict in `{b}` |",
                  "|---|---|---:|---|---:|---|"]
        for c in compared:
            lines.append(f"| `{c['method']}` | `{c['reference']}` | {_pts(c['original_gain'])} "
                         f"{_interval(c['original_gain_low'], c['original_gain_high'])} | {_word(c['original_verdict'])} | "
                         f"{_pts(c['rerun_gain'])} {_interval(c['rerun_gain_low'], c['rerun_gain_high'])} | "
                         f"{_word(c['rerun_verdict'])} |")
    if others:
        lines += ["", "## The studies that imported these runs, with the reruns in place", "",
                  "Each comparison of a study that imported the original's runs and involves a method rerun here: its "
                  "gain as shipped, and with the reruns in place of the imported runs (points, 95% Student-t interval "
                  "over the paired seeds; no multiplicity correction, so read the intervals, not verdicts). Base model "
                  "says whether the two arms of each pair computed the base model alike (their first-step losses at "
                  "every shared seed): a pair computed differently carries that difference as well as its method's.",
                  "", "| study | method | vs | rerun arm(s) | seeds | gain as shipped | base model | gain with the "
                  "reruns | base model |", "|---|---|---|---|---:|---:|---|---:|---|"]
        for o in others:
            lines.append(f"| `{o['study']}` | `{o['method']}` | `{o['reference']}` | {o['replaced']} | {o['n_seeds']} | "
                         f"{_pts(o['shipped_gain'])} {_interval(o['shipped_low'], o['shipped_high'])} | "
                         f"{_alike(o['shipped_alike'])} | {_pts(o['rerun_gain'])} "
                         f"{_interval(o['rerun_low'], o['rerun_high'])} | {_alike(o['rerun_alike'])} |")
    lines += ["", "## Every run", "",
              "Scores in percent. The first-step loss is the loss before any update: every method here starts from a "
              "zero update, so it is the frozen base model's loss on the seed's first batch, which only the kernels "
              "that compute it change; where the two differ, the rerun ran on other kernels (another machine or CPU). "
              "The machine and commit are the rerun trial's record (trials before that record existed have none).", "",
              "| method | seed | original | rerun | difference | items that differ | first-step loss, original -> "
              "rerun | original started | rerun started | rerun's machine | rerun's commit |",
              "|---|---:|---:|---:|---:|---:|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| `{r['method']}` | {r['seed']} | {_pts(r['original_score'], False)} | "
                     f"{_pts(r['rerun_score'], False)} | {_pts(r['difference'])} | {r['differing_items']} of "
                     f"{r['compared_items']} | {_loss(r['original_first_loss'])} -> {_loss(r['rerun_first_loss'])} | "
                     f"{r['original_started'][:16]} | {r['rerun_started'][:16]} | "
                     f"{r['rerun_machine'] or 'not recorded'} | {r['rerun_commit'][:12] or 'not recorded'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablations.repeat", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 when written, 2 on bad input.")
    parser.add_argument("original", type=Path, help="the fair study's findings folder")
    parser.add_argument("rerun", type=Path, help="the findings folder of a study that reran its final runs")
    parser.add_argument("--also", type=Path, nargs="+", default=[], metavar="STUDY",
                        help="findings folders of studies that imported the original's runs (--import-arms): their "
                             "comparisons again, with the reruns in place of the imported runs")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where repeat.md and repeat.csv go (default: the rerun's folder)")
    args = parser.parse_args(argv)
    try:
        original, rerun = read_folder(args.original), read_folder(args.rerun)
        runs = compare_runs(original, rerun)
        others = [row for folder in args.also for row in substituted(read_folder(folder), rerun, original)]
        out = args.out or args.rerun
        if not out.is_dir():
            raise UserError(f"--out: {out} is not a folder")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    methods = per_method(runs)
    pd.DataFrame(runs, columns=list(RUN_COLUMNS)).to_csv(out / "repeat.csv", index=False)
    (out / "repeat.md").write_text(markdown(original, rerun, runs, methods, gains(original, rerun), others))
    if others:
        pd.DataFrame(others).to_csv(out / "repeat_others.csv", index=False)
    else:
        (out / "repeat_others.csv").unlink(missing_ok=True)  # a stale one from an earlier --also
    for m in methods:
        print(f"{m['method']}: {m['repeated']} of {m['runs']} run(s) repeated item for item; mean "
              f"{_pts(m['original_mean'], False)} -> {_pts(m['rerun_mean'], False)}, difference "
              f"{_pts(m['difference'])} {_interval(m['low'], m['high'])}")
    print(f"written {out / 'repeat.md'} and {out / 'repeat.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
