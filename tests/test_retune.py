"""ablations.retune: how far the chosen rate and the gains move when a method is re-tuned with another tuning seed.

Folders are written here by hand (study.yaml, verdict.csv, trials.csv, items.csv.gz) and every figure is checked
against a formula computed in the test: the grid steps from the rates, the gain as a mean paired difference with
scipy's t interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps

from ablations import retune

GRID = {"log10_low": -2.75, "log10_high": -2.0, "per_decade": 4}
RATES = [10 ** (GRID["log10_low"] + k / 4) for k in range(-1, 4)]  # 1e-3 .. 1e-2


def _items(rng, methods_seeds, n=20, tasks=("a", "b")):
    rows = []
    for method, seeds in methods_seeds.items():
        for seed in seeds:
            for task in tasks:
                p = rng.uniform(0.4, 0.8)
                rows += [{"method": method, "seed": seed, "task": task, "doc_id": d, "correct": float(rng.random() < p)}
                         for d in range(n)]
    return pd.DataFrame(rows)


def _folder(path, chosen, curves, items, tuning_seed):
    path.mkdir()
    (path / "study.yaml").write_text(yaml.safe_dump({"name": path.name, "kind": "fair", "lr_grid": GRID}))
    pd.DataFrame([{"method": m, "reference": "" if m == "lora" else "lora", "chosen_lr": lr,
                   "at_edge": lr == RATES[0]} for m, lr in chosen.items()]).to_csv(path / "verdict.csv", index=False)
    pd.DataFrame([{"spec": m, "seed": tuning_seed, "lr": lr, "stage": "tune", "state": "COMPLETE",
                   "average_accuracy": v} for m, curve in curves.items() for lr, v in curve.items()]
                 + [{"spec": "lora", "seed": tuning_seed, "lr": RATES[2], "stage": "tune", "state": "FAIL",
                     "average_accuracy": float("nan")}]).to_csv(path / "trials.csv", index=False)
    items.to_csv(path / "items.csv.gz", index=False, compression="gzip")
    return path


def _scores(frame, method):
    per_task = frame[frame["method"] == method].groupby(["seed", "task"])["correct"].mean()
    return per_task.groupby("seed").mean().to_dict()


def test_a_moved_reference_rate_recomputes_every_gain_against_the_retuned_runs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    first = _items(rng, {"lora": [1, 2, 3, 4], "linchain": [1, 2, 3, 4]})
    again = _items(rng, {"lora": [1, 2, 3]})  # the new rate's finals; seed 4 not run yet
    original = _folder(tmp_path / "orig", {"lora": RATES[1], "linchain": RATES[2]},
                       {"lora": {RATES[1]: 0.6, RATES[2]: 0.55}, "linchain": {RATES[2]: 0.62}}, first, 0)
    retuned = _folder(tmp_path / "again", {"lora": RATES[0]}, {"lora": {RATES[0]: 0.61, RATES[1]: 0.59}}, again, 9)
    assert retune.main([str(original), str(retuned)]) == 0
    row = pd.read_csv(retuned / "retune.csv", dtype=str, keep_default_na=False).iloc[0]
    assert (row["method"], row["reference"], row["retuned"]) == ("linchain", "lora", "lora")
    assert row["grid_steps_moved"] == "-1" and row["original_tuning_seeds"] == "0" and row["retuned_tuning_seeds"] == "9"
    chain, old_lora, new_lora = _scores(first, "linchain"), _scores(first, "lora"), _scores(again, "lora")
    seeds = [1, 2, 3]
    for prefix, ref in (("retuned", new_lora), ("original", old_lora)):  # both on the seeds the re-tune ran
        diffs = np.array([chain[s] - ref[s] for s in seeds])
        half = sps.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
        assert float(row[f"{prefix}_gain"]) == pytest.approx(diffs.mean(), abs=1e-12)
        assert (float(row[f"{prefix}_low"]), float(row[f"{prefix}_high"])) == pytest.approx(
            (diffs.mean() - half, diffs.mean() + half))
    assert float(row["shift"]) == pytest.approx(float(row["retuned_gain"]) - float(row["original_gain"]))
    assert row["n_seeds"] == "3"
    text = (retuned / "retune.md").read_text()
    assert "-1 grid step(s)" in text and "(chosen)" in text and "61.0%" in text
    assert "In `again` the choice is still at the edge of its grid" in text and "still at the edge" in row["note"]
    assert "linchain - lora: re-tuned lora" in capsys.readouterr().out


def test_the_same_rate_means_the_same_runs_and_rerun_seeds_are_checked_item_by_item(tmp_path):
    rng = np.random.default_rng(1)
    first = _items(rng, {"lora": [1, 2, 3], "moslora": [1, 2, 3]})
    rerun = first[(first["method"] == "lora") & (first["seed"] == 2)].copy()
    original = _folder(tmp_path / "orig", {"lora": RATES[1], "moslora": RATES[0]},
                       {"lora": {RATES[1]: 0.6}, "moslora": {RATES[0]: 0.6}}, first, 0)
    retuned = _folder(tmp_path / "again", {"lora": RATES[1]}, {"lora": {RATES[1]: 0.58}}, rerun, 9)
    row = retune.compare(retune.read_folder(original), retune.read_folder(retuned))[0]
    assert row["grid_steps_moved"] == "+0" and row["shift"] == 0.0 and row["n_seeds"] == 3
    assert row["identical_items"] == row["compared_items"] == 40 and "all 40 items identical" in row["note"]
    # a rerun that is not the same run shows: the note says so and the shift is measured from the rerun, not assumed
    flipped = rerun.index[0]
    rerun.loc[flipped, "correct"] = 1 - rerun.loc[flipped, "correct"]
    rerun.to_csv(retuned / "items.csv.gz", index=False, compression="gzip")
    row = retune.compare(retune.read_folder(original), retune.read_folder(retuned))[0]
    assert row["identical_items"] == 39 and "NOT the same runs: 1 of 40 items differ" in row["note"]
    moslora, lora = _scores(first, "moslora"), _scores(first, "lora")
    lora_rerun = {**lora, **_scores(rerun, "lora")}
    task_items = 20
    assert abs(lora_rerun[2] - lora[2]) == pytest.approx(1 / task_items / 2)  # one item of one of two tasks
    expected = np.mean([moslora[s] - lora_rerun[s] for s in (1, 2, 3)]) - np.mean([moslora[s] - lora[s] for s in (1, 2, 3)])
    assert row["shift"] == pytest.approx(expected) and row["shift"] != 0


def test_grid_steps_count_quarter_decades():
    assert retune.grid_steps(RATES[1], RATES[3], 4) == 2 and retune.grid_steps(RATES[1], RATES[0], 4) == -1


@pytest.mark.parametrize("broken, message", [
    ("items.csv.gz", "items.csv.gz not found"),
    ("no_shared", "re-tuned none of the methods"),
    ("yaml", "cannot read its study files"),
    ("per_decade", "not a fair study with lr_grid"),
])
def test_bad_folders_are_one_line_and_exit_2(tmp_path, capsys, broken, message):
    rng = np.random.default_rng(2)
    original = _folder(tmp_path / "orig", {"lora": RATES[1]}, {"lora": {RATES[1]: 0.6}}, _items(rng, {"lora": [1, 2]}), 0)
    chosen = {"dora": RATES[1]} if broken == "no_shared" else {"lora": RATES[1]}
    retuned = _folder(tmp_path / "again", chosen, {"lora": {RATES[1]: 0.6}}, _items(rng, {"lora": [1, 2]}), 9)
    if broken == "items.csv.gz":
        (retuned / "items.csv.gz").unlink()
    if broken == "yaml":
        (retuned / "study.yaml").write_text("kind: [fair\n")
    if broken == "per_decade":
        (retuned / "study.yaml").write_text(yaml.safe_dump({"kind": "fair", "lr_grid": {"per_decade": "four"}}))
    assert retune.main([str(original), str(retuned)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (retuned / "retune.md").exists()
