"""Recompute a fair study's verdict from its shipped files alone, and check it against verdict.csv.

    python -m ablations.recompute results/findings/fair-paper/ablations/fair-paper

reads ``items.csv.gz`` (every final run's per-item correctness) and, from ``verdict.csv``, only the design:
who is compared with whom (``method``, ``reference``, ``family``), the margin ``delta`` and which comparisons
were withheld (``at_edge``). Every seed's test score (the mean over tasks of each task's accuracy), every
gain, interval, p-value, the item bootstrap, the variance shares and the verdicts are computed again from
the items and compared with verdict.csv. Prints the recomputed table; exits 1 when a figure differs, 2 on
bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from harness import stats
from harness.errors import UserError

TOLERANCE = 1e-9
COMPARED = ("test_mean", "test_std", "gain", "gain_low", "gain_high", "gain_low90", "gain_high90", "items_low",
            "items_high", "p_holm", "p_equivalence_holm", "var_seed_share", "var_item_share")


def read_items(path: Path) -> dict[str, dict[int, dict[str, dict]]]:
    """method -> seed -> task -> doc_id -> correctness, from items.csv.gz."""
    frame = pd.read_csv(path)
    missing = {"method", "seed", "task", "doc_id", "correct"} - set(frame.columns)
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    out: dict[str, dict[int, dict[str, dict]]] = {}
    for (method, seed, task), group in frame.groupby(["method", "seed", "task"], sort=False):
        out.setdefault(method, {}).setdefault(int(seed), {})[task] = dict(zip(group["doc_id"].tolist(),
                                                                           group["correct"].astype(float).tolist()))
    return out


def seed_scores(correct: dict[int, dict[str, dict]]) -> dict[int, float]:
    """Each seed's average accuracy: the mean over tasks of the task's mean correctness."""
    return {seed: sum(sum(items.values()) / len(items) for items in tasks.values()) / len(tasks)
            for seed, tasks in correct.items()}


def recompute(folder: Path, alpha: float = 0.05) -> pd.DataFrame:
    """verdict.csv's figures recomputed from items.csv.gz (the design columns copied from verdict.csv)."""
    verdict_path, items_path = folder / "verdict.csv", folder / "items.csv.gz"
    for path in (verdict_path, items_path):
        if not path.is_file():
            raise UserError(f"{path} not found: pass the folder a fair study's report wrote (verdict.csv, items.csv.gz)")
    design = pd.read_csv(verdict_path, keep_default_na=False, na_values=[""])
    items = read_items(items_path)
    scores = {m: seed_scores(c) for m, c in items.items()}
    delta = float(design["delta"].iloc[0]) if len(design) else stats.DELTA
    edge = {r.method for r in design.itertuples() if str(r.at_edge) == "True"}
    rows, comparisons = {}, {}
    for r in design.itertuples():
        mine = scores.get(r.method, {})
        row = {"method": r.method, "reference": r.reference if isinstance(r.reference, str) else "",
               "family": r.family if isinstance(r.family, str) else "",
               "test_mean": stats.mean(mine.values()), "test_std": stats.sample_sd(mine.values()),
               **{k: math.nan for k in COMPARED[2:]}, "verdict": "reference"}
        if row["reference"]:
            ref = scores.get(row["reference"], {})
            c = stats.seed_comparison(mine, ref)
            if c.n_seeds:
                row.update(gain=c.estimate, gain_low=c.low, gain_high=c.high)
            tost = stats.equivalence_test(c, delta, alpha)
            if tost is not None:
                row.update(gain_low90=tost.low, gain_high90=tost.high)
            a, b = items.get(r.method, {}), items.get(row["reference"], {})
            interval = stats.item_interval(a, b) if a and b else None
            if interval is not None:
                row.update(items_low=interval.low, items_high=interval.high)
            parts = stats.variance_components(a, b) if a and b else None
            if parts is not None:
                row.update(var_seed_share=parts.seed_share, var_item_share=parts.item_share)
            row["verdict"] = stats.INCONCLUSIVE
            if r.method not in edge and row["reference"] not in edge:
                comparisons[r.method] = c
        rows[r.method] = row
    for family in sorted({row["family"] for row in rows.values() if row["family"]}):
        members = {k: c for k, c in comparisons.items() if rows[k]["family"] == family}
        held = sum(1 for k, row in rows.items() if row["family"] == family and row["reference"] and k not in comparisons)
        for k, v in stats.fair_verdicts(members, delta=delta, alpha=alpha, withheld=held).items():
            rows[k].update(verdict=v.verdict, p_holm=v.p_holm, p_equivalence_holm=v.p_equivalence_holm)
    return pd.DataFrame(list(rows.values()))


def differences(recomputed: pd.DataFrame, shipped: pd.DataFrame) -> list[str]:
    """Each figure that differs between the recomputation and verdict.csv, as 'method column: a vs b'."""
    shipped = shipped.set_index("method")
    found = []
    for row in recomputed.itertuples():
        if row.method not in shipped.index:
            found.append(f"{row.method}: not in verdict.csv")
            continue
        theirs = shipped.loc[row.method]
        for column in (*COMPARED, "verdict"):
            a, b = getattr(row, column), theirs[column]
            if column == "verdict":
                if a != b:
                    found.append(f"{row.method} verdict: {a} recomputed, {b} in verdict.csv")
                continue
            a, b = float(a), float(b)
            if math.isnan(a) and math.isnan(b):
                continue
            if math.isnan(a) != math.isnan(b) or abs(a - b) > TOLERANCE * max(1.0, abs(b)):
                found.append(f"{row.method} {column}: {a!r} recomputed, {b!r} in verdict.csv")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablations.recompute", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 when every figure agrees, 1 when one differs, 2 on "
                                            "bad input.")
    parser.add_argument("folder", type=Path, help="a fair study's report folder (verdict.csv and items.csv.gz)")
    args = parser.parse_args(argv)
    try:
        recomputed = recompute(args.folder)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shown = recomputed.copy()
    for column in ("test_mean", "gain", "gain_low", "gain_high", "items_low", "items_high"):
        shown[column] = (100 * shown[column]).round(2)
    print(shown[["method", "reference", "test_mean", "gain", "gain_low", "gain_high", "items_low", "items_high",
                 "p_holm", "verdict"]].to_string(index=False))
    found = differences(recomputed, pd.read_csv(args.folder / "verdict.csv", keep_default_na=False, na_values=[""]))
    if found:
        print("differs from verdict.csv:\n  " + "\n  ".join(found), file=sys.stderr)
        return 1
    print(f"every figure of {args.folder / 'verdict.csv'} agrees with the recomputation from items.csv.gz "
          f"(tolerance {TOLERANCE:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
