"""ablations.repeat: whether a study's rerun of another's final runs repeated them, run by run, and what it gives.

Folders are written here by hand (as in test_retune) and every figure is checked against a formula computed in the
test: the items that differ counted directly, each score as the mean over tasks of the task's mean correctness,
the mean paired difference with scipy's t interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ablations import repeat
from tests.test_retune import RATES, _folder, _items, _scores


def _with_finals(folder, runs: dict[str, list[int]], started: str, machine: str | None = None):
    """Add completed final trials (and a failed one, to be ignored) to a folder's trials.csv."""
    trials = pd.read_csv(folder / "trials.csv")
    extra = [{"spec": m, "seed": s, "lr": RATES[1], "stage": "final", "state": "COMPLETE", "average_accuracy": 0.5,
              "started": f"{started} 0{s}:00:00.000000", **({"machine": machine, "commit": "c" * 40} if machine else {})}
             for m, seeds in runs.items() for s in seeds]
    extra.append({"spec": "lora", "seed": 1, "lr": RATES[1], "stage": "final", "state": "FAIL",
                  "average_accuracy": math.nan, "started": "1999-01-01 00:00:00"})
    pd.concat([trials, pd.DataFrame(extra)]).to_csv(folder / "trials.csv", index=False)


def _pair(tmp_path, flips: dict[tuple[str, int], int]):
    """An original with lora and moslora over seeds 1-4, and a rerun of the same runs with some items flipped."""
    rng = np.random.default_rng(3)
    first = _items(rng, {"lora": [1, 2, 3, 4], "moslora": [1, 2, 3, 4]})
    again = first.copy()
    for (method, seed), n in flips.items():
        rows = again.index[(again["method"] == method) & (again["seed"] == seed)][:n]
        again.loc[rows, "correct"] = 1 - again.loc[rows, "correct"]
    chosen = {"lora": RATES[1], "moslora": RATES[2]}
    curves = {"lora": {RATES[1]: 0.6}, "moslora": {RATES[2]: 0.6}}
    original = _folder(tmp_path / "orig", chosen, curves, first, 0)
    rerun = _folder(tmp_path / "again", chosen, curves, again, 0)
    # the base model's first-step loss per seed: the rerun's LoRA computed it on other kernels, its MoSLoRA alike
    base = {1: 0.766461, 2: 1.38258, 3: 1.21432, 4: 0.703355}
    for folder, lora_losses in ((original, base), (rerun, {k: v * 1.01 for k, v in base.items()})):
        pd.DataFrame([{"method": m, "seed": k, "first_loss": v} for m, by in (("lora", lora_losses), ("moslora", base))
                      for k, v in by.items()]).to_csv(folder / "diagnostics.csv", index=False)
    _with_finals(original, {"lora": [1, 2, 3, 4], "moslora": [1, 2, 3, 4]}, "2026-12-04")
    _with_finals(rerun, {"lora": [1, 2, 3, 4], "moslora": [1, 2, 3, 4]}, "2026-12-06", machine="CPU X, AVX512 kernels")
    return original, rerun, first, again


def test_a_bit_for_bit_rerun_is_called_a_repeat(tmp_path, capsys):
    original, rerun, _, _ = _pair(tmp_path, {})
    assert repeat.main([str(original), str(rerun)]) == 0
    table = pd.read_csv(rerun / "repeat.csv")
    assert len(table) == 8 and (table["differing_items"] == 0).all() and (table["difference"] == 0).all()
    text = (rerun / "repeat.md").read_text()
    assert "**A repeat**: all 8 reruns" in text
    assert "lora: 4 of 4 run(s) repeated item for item" in capsys.readouterr().out


def test_runs_that_differ_are_counted_item_by_item_and_the_difference_has_its_t_interval(tmp_path):
    flips = {("lora", 1): 3, ("lora", 3): 1, ("moslora", 2): 5, ("moslora", 4): 2}
    original, rerun, first, again = _pair(tmp_path, flips)
    assert repeat.main([str(original), str(rerun)]) == 0
    table = pd.read_csv(rerun / "repeat.csv", keep_default_na=False)
    for (method, seed), n in flips.items():
        row = table[(table["method"] == method) & (table["seed"] == seed)].iloc[0]
        assert row["differing_items"] == n and row["compared_items"] == 40
    assert table["differing_items"].sum() == sum(flips.values())
    # when each ran, from trials.csv's completed final trials (the failed one is not the run)
    row = table[(table["method"] == "lora") & (table["seed"] == 1)].iloc[0]
    assert row["original_started"].startswith("2026-12-04 01:00") and row["rerun_started"].startswith("2026-12-06")
    assert row["rerun_machine"] == "CPU X, AVX512 kernels" and row["rerun_commit"] == "c" * 40
    methods = {m["method"]: m for m in repeat.per_method(repeat.compare_runs(
        repeat.read_folder(original), repeat.read_folder(rerun)))}
    for method in ("lora", "moslora"):
        before, after = _scores(first, method), _scores(again, method)
        diffs = np.array([after[s] - before[s] for s in (1, 2, 3, 4)])
        half = sps.t.ppf(0.975, 3) * diffs.std(ddof=1) / 2
        m = methods[method]
        assert m["difference"] == pytest.approx(diffs.mean(), abs=1e-12)
        assert (m["low"], m["high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
        assert m["difference_sd"] == pytest.approx(diffs.std(ddof=1))
        assert m["original_mean"] == pytest.approx(np.mean(list(before.values())))
        assert m["repeated"] == 2 and m["runs"] == 4
    text = (rerun / "repeat.md").read_text()
    assert "**A partial repeat**: 4 of 8 reruns" in text
    assert "differs in 4 of 8 pairs" in text and "| 0.766461 -> 0.774126 |" in text
    assert row["original_first_loss"] == 0.766461 and row["rerun_first_loss"] == pytest.approx(0.766461 * 1.01)
    assert "| `moslora` | `lora` |" in text  # the comparisons, each with both studies' verdicts


def test_a_rerun_at_another_rate_is_refused_as_not_a_rerun(tmp_path, capsys):
    original, rerun, first, _ = _pair(tmp_path, {})
    verdict = pd.read_csv(rerun / "verdict.csv")
    verdict.loc[verdict["method"] == "moslora", "chosen_lr"] = RATES[3]
    verdict.to_csv(rerun / "verdict.csv", index=False)
    assert repeat.main([str(original), str(rerun)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other rates for moslora" in err and "ablations.retune" in err
    assert not (rerun / "repeat.md").exists()


def test_no_shared_seed_is_one_line(tmp_path, capsys):
    original, rerun, first, _ = _pair(tmp_path, {})
    moved = first.copy()
    moved["seed"] += 10
    moved.to_csv(rerun / "items.csv.gz", index=False, compression="gzip")
    assert repeat.main([str(original), str(rerun)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no final run at a seed" in err


def test_a_study_that_imported_the_runs_is_recomputed_with_the_reruns_in_place(tmp_path, capsys):
    """--also: a later study paired its new arm with the original's imported LoRA runs, computed on other kernels;
    with the reruns (computed as the new arm was) in place, its gain is the arm minus the reruns, seed by seed."""
    rng = np.random.default_rng(5)
    original_items = _items(rng, {"lora": [1, 2, 3, 4]})
    rerun_items = _items(rng, {"lora": [1, 2, 3, 4]})
    arm_items = _items(rng, {"mtlora:structure=shim": [1, 2, 3, 4]})
    old_kernels, new_kernels = {1: 0.766461, 2: 1.38258, 3: 1.21432, 4: 0.703355}, {1: 0.776233, 2: 1.38908,
                                                                                      3: 1.21508, 4: 0.703664}
    chosen, curves = {"lora": RATES[1]}, {"lora": {RATES[1]: 0.6}}
    original = _folder(tmp_path / "orig", chosen, curves, original_items, 0)
    rerun = _folder(tmp_path / "again", chosen, curves, rerun_items, 0)
    later = _folder(tmp_path / "later", {**chosen, "mtlora:structure=shim": RATES[2]},
                    {**curves, "mtlora:structure=shim": {RATES[2]: 0.6}}, pd.concat([original_items, arm_items]), 0)
    for folder, losses in ((original, {"lora": old_kernels}), (rerun, {"lora": new_kernels}),
                           (later, {"lora": old_kernels, "mtlora:structure=shim": new_kernels})):
        pd.DataFrame([{"method": m, "seed": k, "first_loss": v} for m, by in losses.items() for k, v in by.items()]
                     ).to_csv(folder / "diagnostics.csv", index=False)
    assert repeat.main([str(original), str(rerun), "--also", str(later)]) == 0
    (row,) = pd.read_csv(rerun / "repeat_others.csv").to_dict(orient="records")
    assert (row["study"], row["method"], row["reference"], row["replaced"]) == ("later", "mtlora:structure=shim",
                                                                                  "lora", "lora (4 of 4 seeds)")
    assert row["shipped_alike"] is False or row["shipped_alike"] == 0
    assert row["rerun_alike"] is True or row["rerun_alike"] == 1
    arm, before, after = (_scores(arm_items, "mtlora:structure=shim"), _scores(original_items, "lora"),
                          _scores(rerun_items, "lora"))
    for prefix, ref in (("shipped", before), ("rerun", after)):
        diffs = np.array([arm[k] - ref[k] for k in (1, 2, 3, 4)])
        half = sps.t.ppf(0.975, 3) * diffs.std(ddof=1) / 2
        assert row[f"{prefix}_gain"] == pytest.approx(diffs.mean())
        assert (row[f"{prefix}_low"], row[f"{prefix}_high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    text = (rerun / "repeat.md").read_text()
    assert "| `later` | `mtlora:structure=shim` | `lora` | lora (4 of 4 seeds) | 4 |" in text and "**differently**" in text
    # a partial rerun: half the pairs still span two CPUs, and the check says so
    half = rerun_items[rerun_items["seed"] <= 2]
    half.to_csv(rerun / "items.csv.gz", index=False, compression="gzip")
    pd.DataFrame([{"method": "lora", "seed": k, "first_loss": v} for k, v in new_kernels.items() if k <= 2]
                 ).to_csv(rerun / "diagnostics.csv", index=False)
    assert repeat.main([str(original), str(rerun), "--also", str(later)]) == 0
    (row,) = pd.read_csv(rerun / "repeat_others.csv").to_dict(orient="records")
    assert row["replaced"] == "lora (2 of 4 seeds)" and not row["rerun_alike"]
    # the importer trained its own LoRA (not the original's runs): nothing is replaced, no row
    pd.concat([rerun_items, arm_items]).to_csv(later / "items.csv.gz", index=False, compression="gzip")
    assert repeat.main([str(original), str(rerun), "--also", str(later)]) == 0
    assert not (rerun / "repeat_others.csv").exists()
