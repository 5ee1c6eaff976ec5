"""How far a fair study's choice of learning rate, and the gains built on it, move with another tuning seed.

    python -m ablations.retune results/findings/fair-paper results/findings/fair-retune

The fair verdict's interval covers run-to-run variation of the final runs; it does not cover the choice of
rate, which was made once, from one tuning seed's validation scores. This measures that choice's noise
directly: a second fair study (the re-tune) repeats the first one's protocol for one or more of its methods -
the same grid, extension, smoothing, run options and final seeds - with another tuning seed. For every
method both studies tuned it reports both validation curves, both chosen rates and how many grid steps
apart they are. For every comparison of the first study that involves a re-tuned method it reports the gain
as first measured and the gain with the re-tuned arm's final runs in place of the original's (each a paired
Student-t interval over the shared final seeds, as in verdict.csv), and the shift between them.

Where the re-tune chose the same rate, its final runs should repeat the original's exactly (same seed, same
rate, same hardware: training is deterministic), so the gain should not move: the seeds the re-tune did rerun
replace the original's in the re-tuned gain, the others are the original's runs, and the reruns are checked item
by item (a note says so where they differ).

Reads only the shipped files of each folder: study.yaml (the grid), verdict.csv (chosen rates, references),
trials.csv (every tuning score) and items.csv.gz (every final run's per-item correctness). Writes
retune.md and retune.csv into the re-tune's folder (or --out). Exit 0, or 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ablations.recompute import read_items, seed_scores
from harness import stats
from harness.errors import UserError

COLUMNS = ("method", "reference", "retuned", "original_lr", "retuned_lr", "grid_steps_moved", "original_tuning_seeds",
           "retuned_tuning_seeds", "n_seeds", "original_gain", "original_low", "original_high", "retuned_gain",
           "retuned_low", "retuned_high", "shift", "identical_items", "compared_items", "note")


@dataclass
class Folder:
    """One fair study's shipped files."""

    path: Path
    per_decade: float
    verdict: pd.DataFrame
    tuning: pd.DataFrame  # the completed tuning trials: spec, seed, lr, average_accuracy
    items: dict

    @property
    def chosen(self) -> dict[str, float]:
        return {r.method: float(r.chosen_lr) for r in self.verdict.itertuples() if not pd.isna(r.chosen_lr)}

    def at_edge(self, method: str) -> bool:
        """Whether the method's choice is still at the edge of its grid after the last extension."""
        if "at_edge" not in self.verdict.columns:
            return False
        return any(str(v) == "True" for v in self.verdict.loc[self.verdict["method"] == method, "at_edge"])

    def tuning_seeds(self, method: str) -> list[int]:
        return sorted({int(s) for s in self.tuning.loc[self.tuning["spec"] == method, "seed"]})


def read_folder(path: Path) -> Folder:
    """A fair study's report folder, checked: one UserError naming the first missing file or column."""
    import yaml

    files = {name: path / name for name in ("study.yaml", "verdict.csv", "trials.csv", "items.csv.gz")}
    for name, file in files.items():
        if not file.is_file():
            raise UserError(f"{file} not found: pass a fair study's findings folder (study.yaml, verdict.csv, "
                            "trials.csv, items.csv.gz)")
    try:
        design = yaml.safe_load(files["study.yaml"].read_text()) or {}
        verdict = pd.read_csv(files["verdict.csv"], keep_default_na=False, na_values=[""])
        trials = pd.read_csv(files["trials.csv"])
    except (yaml.YAMLError, ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise UserError(f"{path}: cannot read its study files ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]})") from None
    grid = design.get("lr_grid") if isinstance(design, dict) else None
    try:
        per_decade = float(grid["per_decade"])
    except (TypeError, KeyError, ValueError):
        per_decade = math.nan
    if not isinstance(design, dict) or design.get("kind") != "fair" or not (per_decade > 0):
        raise UserError(f"{files['study.yaml']}: not a fair study with lr_grid {{log10_low, log10_high, per_decade}}")
    for frame, name, needed in ((verdict, "verdict.csv", {"method", "reference", "chosen_lr"}),
                                (trials, "trials.csv", {"spec", "seed", "lr", "stage", "state", "average_accuracy"})):
        missing = needed - set(frame.columns)
        if missing:
            raise UserError(f"{path / name}: missing column(s) {', '.join(sorted(missing))}")
    tuning = trials[(trials["stage"] == "tune") & (trials["state"] == "COMPLETE")]
    try:
        items = read_items(files["items.csv.gz"])
    except (ValueError, OSError, EOFError, pd.errors.ParserError) as err:
        raise UserError(f"{files['items.csv.gz']}: cannot read it ({type(err).__name__})") from None
    return Folder(path, per_decade, verdict, tuning[["spec", "seed", "lr", "average_accuracy"]], items)


def grid_steps(old: float, new: float, per_decade: float) -> int:
    """How many grid steps ``new`` lies above ``old`` (negative: below) on a grid of ``per_decade`` rates a decade."""
    return round(per_decade * math.log10(new / old))


def identical(a: dict[int, dict[str, dict]], b: dict[int, dict[str, dict]]) -> tuple[int, int]:
    """(items with the same correctness, items compared) over the seeds and tasks both runs scored."""
    same = total = 0
    for seed in set(a) & set(b):
        for task in set(a[seed]) & set(b[seed]):
            for doc in set(a[seed][task]) & set(b[seed][task]):
                total += 1
                same += a[seed][task][doc] == b[seed][task][doc]
    return same, total


def compare(original: Folder, retuned: Folder) -> list[dict]:
    """One row per comparison of the original study that involves a method the re-tune tuned again."""
    again = [m for m in retuned.chosen if m in original.chosen]
    if not again:
        raise UserError(f"{retuned.path} re-tuned none of the methods of {original.path} "
                        f"({', '.join(original.chosen) or 'none chosen yet'})")
    scores = {m: seed_scores(c) for m, c in original.items.items()}
    rescored = {m: seed_scores(c) for m, c in retuned.items.items()}
    rows = []
    for r in original.verdict.itertuples():
        reference = r.reference if isinstance(r.reference, str) else ""
        touched = [m for m in (r.method, reference) if m in again]
        if not reference or not touched:
            continue
        moved = {m: grid_steps(original.chosen[m], retuned.chosen[m], original.per_decade) for m in touched}

        def arm(m: str) -> dict[int, float]:
            """The arm's final scores in the re-tuned design: the re-tune's runs; at an unmoved rate the original's
            runs for the seeds the re-tune did not rerun (the same seed and rate: the same run)."""
            if m not in again:
                return scores.get(m, {})
            return {**scores.get(m, {}), **rescored.get(m, {})} if moved[m] == 0 else rescored.get(m, {})

        before = stats.seed_comparison(scores.get(r.method, {}), scores.get(reference, {}))
        after = stats.seed_comparison(arm(r.method), arm(reference))
        same = total = 0
        notes = []
        for m in touched:
            s, t = identical(original.items.get(m, {}), retuned.items.get(m, {}))
            if moved[m] == 0:
                same, total = same + s, total + t
                rerun = len(retuned.items.get(m, {}))
                if not t:
                    notes.append(f"`{m}`: same rate; no final seed rerun")
                elif s == t:
                    notes.append(f"`{m}`: same rate; {rerun} of its final seeds rerun, all {t} items identical")
                else:
                    notes.append(f"`{m}`: same rate, but NOT the same runs: {t - s} of {t} items differ in the "
                                 f"{rerun} rerun seed(s) (another code version, library, machine or process state trained them); "
                                 "the re-tuned gain "
                                 "uses the reruns")
            else:
                runs = len(rescored.get(m, {}))
                notes.append(f"`{m}`: {moved[m]:+d} grid step(s); {runs} final seed(s) at the new rate"
                             + (", a choice still at the edge of its grid" if retuned.at_edge(m) else ""))
        if any(v != 0 for v in moved.values()):  # the gain as first measured, on the seeds the re-tuned arm ran
            kept = set(after.seeds)
            before = stats.seed_comparison({s: v for s, v in scores.get(r.method, {}).items() if s in kept},
                                           {s: v for s, v in scores.get(reference, {}).items() if s in kept})
            if after.n_seeds == 0:
                notes.append("no final run at the new rate yet: the gain there is not measured")
        rows.append({"method": r.method, "reference": reference, "retuned": ", ".join(touched),
                     "original_lr": "; ".join(f"{original.chosen[m]:.3g}" for m in touched),
                     "retuned_lr": "; ".join(f"{retuned.chosen[m]:.3g}" for m in touched),
                     "grid_steps_moved": "; ".join(f"{moved[m]:+d}" for m in touched),
                     "original_tuning_seeds": "; ".join(",".join(map(str, original.tuning_seeds(m))) for m in touched),
                     "retuned_tuning_seeds": "; ".join(",".join(map(str, retuned.tuning_seeds(m))) for m in touched),
                     "n_seeds": after.n_seeds, "original_gain": before.estimate, "original_low": before.low,
                     "original_high": before.high, "retuned_gain": after.estimate, "retuned_low": after.low,
                     "retuned_high": after.high, "shift": after.estimate - before.estimate,
                     "identical_items": same, "compared_items": total, "note": "; ".join(notes)})
    return rows


def _pts(value: float, signed: bool = True) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def curves(original: Folder, retuned: Folder) -> list[str]:
    """Each re-tuned method's validation scores per rate under both tuning seeds, and both choices."""
    out = []
    for method in (m for m in retuned.chosen if m in original.chosen):
        a = original.tuning[original.tuning["spec"] == method]
        b = retuned.tuning[retuned.tuning["spec"] == method]
        rates = sorted(set(a["lr"]) | set(b["lr"]))
        seeds_a, seeds_b = original.tuning_seeds(method), retuned.tuning_seeds(method)
        head = (f"| rate | tuning seed(s) {', '.join(map(str, seeds_a))} ({original.path.name}) | tuning seed(s) "
                f"{', '.join(map(str, seeds_b))} ({retuned.path.name}) |")
        out += [f"### `{method}`", "", head, "|---:|---:|---:|"]
        for lr in rates:
            cells = []
            for frame, folder in ((a, original), (b, retuned)):
                values = frame.loc[frame["lr"] == lr, "average_accuracy"]
                mark = " (chosen)" if math.isclose(lr, folder.chosen[method], rel_tol=1e-9) else ""
                cells.append(f"{100 * values.mean():.1f}%{mark}" if len(values) else "-")
            out.append(f"| {lr:.3g} | {cells[0]} | {cells[1]} |")
        steps = grid_steps(original.chosen[method], retuned.chosen[method], original.per_decade)
        edges = [f"In `{folder.path.name}` the choice is still at the edge of its grid after the last extension "
                 "(that study withholds the verdicts it is part of)" for folder in (original, retuned)
                 if folder.at_edge(method)]
        out += ["", f"Chosen (smoothed validation curve): {original.chosen[method]:.3g}, then "
                    f"{retuned.chosen[method]:.3g}: " + ("the same rate." if steps == 0 else
                                                          f"{steps:+d} grid step(s).")
                + "".join(f" {e}." for e in edges), ""]
    return out


def markdown(original: Folder, retuned: Folder, rows: list[dict]) -> str:
    lines = [f"# Re-tuned with another tuning seed: {retuned.path.name} against {original.path.name}", "",
             "The fair verdict's interval covers the final runs' run-to-run variation, not the choice of rate. "
             f"Here the methods of `{retuned.path.name}` were tuned again under `{original.path.name}`'s protocol "
             "(the same grid, extension, smoothing, run options and final seeds) with another tuning seed; nothing "
             "was chosen on test. Written by `python -m ablations.retune` from both folders' files.", "",
             "## The choice of rate", "", *curves(original, retuned), "## The gains", "",
             "Each gain of the first study that involves a re-tuned method, as first measured and with the "
             "re-tuned arm's final runs in its place (points; 95% Student-t interval over the paired final "
             "seeds). Where the rate did not move, the seeds the re-tune reran replace the original's and are "
             "checked item by item; the others are the original runs.", "",
             "| method | vs | re-tuned | rate | steps moved | gain as measured | gain re-tuned | shift | note |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| `{r['method']}` | `{r['reference']}` | `{r['retuned']}` | {r['original_lr']} -> "
                     f"{r['retuned_lr']} | {r['grid_steps_moved']} | {_pts(r['original_gain'])} "
                     f"[{_pts(r['original_low'])}, {_pts(r['original_high'])}] | {_pts(r['retuned_gain'])} "
                     f"[{_pts(r['retuned_low'])}, {_pts(r['retuned_high'])}] | {_pts(r['shift'])} | {r['note']} |")
    lines += ["", "One re-tune is one draw of the tuning noise: it shows whether the choice is stable at this "
                  "grid's resolution, not the distribution of the shift."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablations.retune", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 when written, 2 on bad input.")
    parser.add_argument("original", type=Path, help="the fair study's findings folder")
    parser.add_argument("retuned", type=Path, help="the findings folder of the same protocol with another tuning seed")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where retune.md and retune.csv go (default: the re-tune's folder)")
    args = parser.parse_args(argv)
    try:
        original, retuned = read_folder(args.original), read_folder(args.retuned)
        rows = compare(original, retuned)
        out = args.out or args.retuned
        if not out.is_dir():
            raise UserError(f"--out: {out} is not a folder")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(out / "retune.csv", index=False)
    (out / "retune.md").write_text(markdown(original, retuned, rows))
    for r in rows:
        print(f"{r['method']} - {r['reference']}: re-tuned {r['retuned']} {r['original_lr']} -> {r['retuned_lr']} "
              f"({r['grid_steps_moved']} step(s)); gain {_pts(r['original_gain'])} -> {_pts(r['retuned_gain'])}")
    print(f"written {out / 'retune.md'} and {out / 'retune.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
