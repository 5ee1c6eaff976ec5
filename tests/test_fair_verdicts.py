"""The fair study's verdict rules (issue 19) on hand-made arms, without a storage: four verdicts at a preset
delta, withheld verdicts (a rate at the grid's edge, fewer than 2 pairs), a diverged final run counted as an
outcome, zero spread with a tolerance, controls compared with their parents in their own Holm family, and the
design (--plan) figures."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as sps

from ablations import fair
from ablations.fair import TunedArm, Tuning, points_of_methods, references, verdict_rows
from ablations.storage import pack_correct, unpack_correct
from harness.errors import UserError

PLAN = SimpleNamespace(delta=0.02, lr_grid=[1e-3, 3e-3, 1e-2], seeds=[0], final_seeds=list(range(1, 9)), extend=1,
                       name="t", points=[{"method": "lora"}, {"method": "moslora"}], planned_sd=None)


def arm(spec, test, reference="lora", best=1, low=0, high=2, diverged=(), correct=None):
    tuning = Tuning(low=low, high=high, settled=True, best=best, scores={best: {0: 0.5}}, smoothed={best: 0.5})
    return TunedArm(spec=spec, reference=reference, tuning=tuning, grid_low=1e-3, grid_high=1e-2, extended_low=0,
                    extended_high=0, chosen_lr=3e-3, valid_score=0.5, test=dict(test), failed={}, pending=[],
                    diverged={s: "loss became nan" for s in diverged}, correct=correct or {})


LORA = {s: 0.50 + 0.01 * ((s * 7) % 5) for s in range(1, 9)}


def rows_of(*arms, plan=PLAN):
    return {r["method"]: r for r in verdict_rows(plan, list(arms))}


def with_gain(diffs):
    return {s: LORA[s] + d for s, d in zip(sorted(LORA), diffs)}


def test_a_clear_gain_is_better_and_the_interval_is_the_t_interval_over_seeds():
    diffs = [0.06, 0.05, 0.07, 0.06, 0.08, 0.05, 0.06, 0.07]
    rows = rows_of(arm("lora", LORA, reference=None), arm("moslora", with_gain(diffs)))
    r = rows["moslora"]
    assert rows["lora"]["verdict"] == "reference" and r["verdict"] == "better" and r["family"] == "vs LoRA"
    n, m, sd = len(diffs), np.mean(diffs), np.std(diffs, ddof=1)
    half95 = sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    half90 = sps.t.ppf(0.95, n - 1) * sd / math.sqrt(n)
    assert math.isclose(r["gain"], m, abs_tol=1e-12)
    assert math.isclose(r["gain_low"], m - half95, abs_tol=1e-9) and math.isclose(r["gain_high"], m + half95, abs_tol=1e-9)
    assert math.isclose(r["gain_low90"], m - half90, abs_tol=1e-9) and math.isclose(r["gain_high90"], m + half90, abs_tol=1e-9)
    assert math.isclose(r["p_holm"], sps.ttest_1samp(diffs, 0).pvalue, rel_tol=1e-6)  # a family of one


def test_a_small_spread_gain_inside_delta_is_equivalent_by_two_one_sided_tests():
    diffs = [0.002, -0.003, 0.001, 0.0, -0.002, 0.003, -0.001, 0.001]
    r = rows_of(arm("lora", LORA, reference=None), arm("moslora", with_gain(diffs)))["moslora"]
    assert r["verdict"] == "equivalent"
    assert -0.02 < r["gain_low90"] and r["gain_high90"] < 0.02
    n, m, sd = len(diffs), np.mean(diffs), np.std(diffs, ddof=1)
    se = sd / math.sqrt(n)
    p_tost = max(sps.t.sf((m + 0.02) / se, n - 1), sps.t.cdf((m - 0.02) / se, n - 1))
    assert math.isclose(r["p_equivalence_holm"], p_tost, rel_tol=1e-6)


def test_a_wide_interval_is_inconclusive_never_no_difference_or_equivalent():
    diffs = [0.05, -0.04, 0.03, -0.05, 0.04, -0.03, 0.02, -0.02]
    r = rows_of(arm("lora", LORA, reference=None), arm("moslora", with_gain(diffs)))["moslora"]
    assert r["verdict"] == "inconclusive" and "no equivalence" in r["note"]


def test_a_larger_delta_turns_the_same_data_equivalent():
    diffs = [0.01, -0.01, 0.015, -0.005, 0.0, 0.01, -0.01, 0.005]
    arms = (arm("lora", LORA, reference=None), arm("moslora", with_gain(diffs)))
    assert rows_of(*arms, plan=SimpleNamespace(**{**vars(PLAN), "delta": 0.005}))["moslora"]["verdict"] == "inconclusive"
    assert rows_of(*arms, plan=SimpleNamespace(**{**vars(PLAN), "delta": 0.05}))["moslora"]["verdict"] == "equivalent"


@pytest.mark.parametrize("who", ["lora", "moslora"])
def test_a_rate_at_the_edge_after_the_last_extension_withholds_the_verdict(who):
    diffs = [0.06, 0.05, 0.07, 0.06, 0.08, 0.05, 0.06, 0.07]  # would be "better"
    edge = {"best": 0, "low": 0}
    lora = arm("lora", LORA, reference=None, **(edge if who == "lora" else {}))
    moslora = arm("moslora", with_gain(diffs), **(edge if who == "moslora" else {}))
    r = rows_of(lora, moslora)["moslora"]
    assert r["verdict"] == "inconclusive" and f"`{who}` is still at the edge" in r["note"]
    assert math.isnan(r["p_holm"]) and math.isclose(r["gain"], np.mean(diffs))  # the numbers stay, the verdict goes


def test_a_withheld_comparison_stays_in_its_familys_holm_count():
    """Two planned comparisons with LoRA: one at the grid's edge (withheld), one tested. The tested one's
    Holm-adjusted p is its raw p times 2, as over the family the design planned, not times 1."""
    tie = [0.002, -0.003, 0.001, 0.0, -0.002, 0.003, -0.001, 0.001]
    tested = arm("moslora", with_gain(tie))
    edge = arm("linchain", with_gain([0.06, 0.05, 0.07, 0.06, 0.08, 0.05, 0.06, 0.07]), best=0, low=0)
    alone = rows_of(arm("lora", LORA, reference=None), tested)["moslora"]
    both = rows_of(arm("lora", LORA, reference=None), tested, edge)
    n, m, sd = len(tie), np.mean(tie), np.std(tie, ddof=1)
    se = sd / math.sqrt(n)
    p_tost = max(sps.t.sf((m + 0.02) / se, n - 1), sps.t.cdf((m - 0.02) / se, n - 1))
    p_diff = sps.ttest_1samp(tie, 0).pvalue
    assert math.isclose(alone["p_equivalence_holm"], p_tost, rel_tol=1e-6)
    assert math.isclose(both["moslora"]["p_equivalence_holm"], min(1.0, 2 * p_tost), rel_tol=1e-6)
    assert math.isclose(both["moslora"]["p_holm"], min(1.0, 2 * p_diff), rel_tol=1e-6)
    assert both["linchain"]["verdict"] == "inconclusive" and math.isnan(both["linchain"]["p_holm"])


def test_an_arm_not_run_yet_counts_in_its_familys_holm_count():
    """A partial study: LoRA, one finished arm and one planned arm with no final seed (and one with a single
    seed). Both unfinished arms count with p = 1, so the finished one's Holm p is its raw p times 3, the family
    the design planned, and a stage stopped halfway reads no milder than the whole."""
    diffs = [0.03, 0.01, 0.04, 0.0, 0.05, 0.02, 0.03, 0.01]
    finished = arm("moslora", with_gain(diffs))
    planned = arm("linchain", {}, best=None)
    single = arm("condlora", {1: 0.6})
    rows = rows_of(arm("lora", LORA, reference=None), finished, planned, single)
    n, m, sd = len(diffs), np.mean(diffs), np.std(diffs, ddof=1)
    se = sd / math.sqrt(n)
    p_tost = max(sps.t.sf((m + 0.02) / se, n - 1), sps.t.cdf((m - 0.02) / se, n - 1))
    assert math.isclose(rows["moslora"]["p_holm"], min(1.0, 3 * sps.ttest_1samp(diffs, 0).pvalue), rel_tol=1e-6)
    assert math.isclose(rows["moslora"]["p_equivalence_holm"], min(1.0, 3 * p_tost), rel_tol=1e-6)
    for spec in ("linchain", "condlora"):
        assert rows[spec]["verdict"] == "inconclusive" and math.isnan(rows[spec]["p_holm"])
    assert "Holm over the 3 planned comparisons vs LoRA, 2 of them without a test yet" in rows["moslora"]["note"]
    assert "planned comparisons" not in rows_of(arm("lora", LORA, reference=None), finished)["moslora"]["note"]


def test_a_withheld_control_counts_in_the_control_family_only():
    diffs = [0.002, -0.003, 0.001, 0.0, -0.002, 0.003, -0.001, 0.001]
    gain = [0.01, -0.02, 0.0, 0.015, -0.01, 0.02, 0.005, -0.005]
    moslora = with_gain(gain)
    arms = [arm("lora", LORA, reference=None), arm("moslora", moslora),
            arm("moslora:freeze_middle=true", {s: moslora[s] + d for s, d in zip(sorted(LORA), diffs)},
                reference="moslora"),
            arm("lora:match=moslora", moslora, reference="moslora", best=2, high=2)]
    rows = {r["method"]: r for r in verdict_rows(PLAN, arms)}
    n, m, sd = len(diffs), np.mean(diffs), np.std(diffs, ddof=1)
    se = sd / math.sqrt(n)
    p_tost = max(sps.t.sf((m + 0.02) / se, n - 1), sps.t.cdf((m - 0.02) / se, n - 1))
    assert math.isclose(rows["moslora:freeze_middle=true"]["p_equivalence_holm"], min(1.0, 2 * p_tost), rel_tol=1e-6)
    assert "at the edge" in rows["lora:match=moslora"]["note"]
    assert math.isclose(rows["moslora"]["p_holm"], sps.ttest_1samp(gain, 0).pvalue, rel_tol=1e-6)  # a family of one


def test_one_pair_is_inconclusive_with_its_reason():
    r = rows_of(arm("lora", {1: 0.5}, reference=None), arm("moslora", {1: 0.6}))["moslora"]
    assert r["verdict"] == "inconclusive" and "1 seed pair" in r["note"]


def test_differences_equal_up_to_rounding_are_zero_spread_not_p_5e_31():
    lora = {s: 0.5 + 0.01 * s for s in range(1, 6)}
    moslora = {s: v + 0.01 for s, v in lora.items()}  # 0.01 each, up to floating-point rounding
    r = rows_of(arm("lora", lora, reference=None), arm("moslora", moslora))["moslora"]
    assert r["verdict"] == "equivalent" and "every seed gave the same difference" in r["note"]
    big = {s: v + 0.05 for s, v in lora.items()}
    r = rows_of(arm("lora", lora, reference=None), arm("moslora", big))["moslora"]
    assert r["verdict"] == "inconclusive"  # constant 5 points: no test, never "better" at p = 5e-31


def test_a_diverged_final_seed_is_an_outcome_and_its_rate_a_column():
    test = with_gain([0.02] * 8)
    test[3] = 0.01  # seed 3 diverged: scored as the base model
    r = rows_of(arm("lora", LORA, reference=None), arm("moslora", test, diverged=[3]))["moslora"]
    assert r["seeds"] == ",".join(map(str, range(1, 9))) and r["diverged_seeds"] == "3"
    assert math.isclose(r["divergence_rate"], 1 / 8)
    assert math.isclose(r["gain"], np.mean([test[s] - LORA[s] for s in LORA]))
    assert "final seed 3 diverged (scored as the base model)" in r["note"]


def test_controls_form_their_own_holm_family():
    p = {"moslora": [0.06, 0.05, 0.07, 0.06, 0.08, 0.05, 0.06, 0.07],
         "linchain": [0.03, 0.01, 0.04, 0.0, 0.05, 0.02, 0.03, 0.01]}
    moslora, linchain = with_gain(p["moslora"]), with_gain(p["linchain"])
    control = {s: moslora[s] - d for s, d in zip(sorted(LORA), [0.02, 0.01, 0.03, 0.0, 0.04, 0.01, 0.02, 0.02])}
    rows = rows_of(arm("lora", LORA, reference=None), arm("moslora", moslora), arm("linchain", linchain),
                   arm("moslora:freeze_middle=true", control, reference="moslora"))
    raw = {k: sps.ttest_1samp(v, 0).pvalue for k, v in p.items()}
    small, large = sorted(raw, key=raw.get)
    assert math.isclose(rows[small]["p_holm"], 2 * raw[small], rel_tol=1e-6)  # Holm over the 2 LoRA comparisons only
    assert math.isclose(rows[large]["p_holm"], max(2 * raw[small], raw[large]), rel_tol=1e-6)
    c = rows["moslora:freeze_middle=true"]
    assert c["family"] == "vs control" and c["reference"] == "moslora"
    diffs = [control[s] - moslora[s] for s in sorted(LORA)]
    assert math.isclose(c["p_holm"], sps.ttest_1samp(diffs, 0).pvalue, rel_tol=1e-6)  # a family of one


def test_item_bootstrap_and_variance_components_come_from_stored_correctness():
    items = range(40)
    def correct(p, seed):
        r = np.random.default_rng(seed)
        return {"task": {i: float(r.random() < p) for i in items}}
    lora = {s: correct(0.5, s) for s in range(1, 9)}
    mine = {s: correct(0.6, 100 + s) for s in range(1, 9)}
    def score(c):
        return {s: np.mean(list(v["task"].values())) for s, v in c.items()}

    r = rows_of(arm("lora", score(lora), reference=None, correct=lora),
                arm("moslora", score(mine), correct=mine))["moslora"]
    assert r["items_low"] < r["gain"] < r["items_high"]
    assert 0 <= r["var_seed_share"] <= 1 and 0 <= r["var_item_share"] <= 1


def test_per_item_correctness_survives_the_storage_round_trip():
    correct = {"a": {0: 1.0, 5: 0.0, 2: 1.0}, "b": {"x": 0.5, "y": 1.0}}
    packed = pack_correct(correct)
    assert packed["a"] == {"docs": [0, 2, 5], "correct": "110"}  # docs sorted
    assert unpack_correct(packed) == correct


# ----------------------------------------------------------------------------------------------------------
# Controls as controls: the spec grammar, references, bad input


def test_methods_take_booleans_and_match_with_commas_and_controls_get_their_parent():
    points = points_of_methods(["lora", "moslora", "moslora:freeze_middle=true", "linchain:r=8,widths=8-16-8",
                                "lora:match=linchain:r=8,widths=8-16-8", "linchain:init=identity,r=8,widths=8-16-8"])
    refs = references(points, "--methods")
    assert points[2] == {"method": "moslora", "freeze_middle": True}
    assert points[4] == {"method": "lora", "match": "linchain:r=8,widths=8-16-8"}
    assert refs == {"lora": None, "moslora": "lora", "moslora:freeze_middle=true": "moslora",
                    "linchain:r=8,widths=8-16-8": "lora",
                    "lora:match=linchain:r=8,widths=8-16-8": "linchain:r=8,widths=8-16-8",
                    "linchain:init=identity,r=8,widths=8-16-8": "linchain:r=8,widths=8-16-8"}


def test_a_study_file_point_may_name_its_reference():
    from ablations.studyfile import parse_study

    data = {"name": "c", "kind": "fair", "seeds": [0], "final_seeds": 2, "lr_grid": [1e-3, 1e-2], "extend": 0,
            "delta": 2, "space": [{"method": "lora"}, {"method": "moslora"},
                                  {"method": "linchain", "reference": "moslora"}]}
    study = parse_study(data)
    assert references(study.points, "x")["linchain"] == "moslora"
    bad = {**data, "space": [{"method": "lora"}, {"method": "linchain", "reference": "dora"}]}
    with pytest.raises(UserError, match="reference 'dora', which is no point of the study"):
        parse_study(bad)


@pytest.mark.parametrize("methods, message", [
    ("lora,moslora:freeze_middle=true", "is a control of 'moslora', which is not in the study"),
    ("lora,moslora:bias=true", "is a control of 'moslora', which is not in the study"),
    ("lora,lora:match=linchain:r=8,widths=8-16-8", "compared with what it matches"),
    ("moslora,linchain", "every method is compared with lora"),
])
def test_a_control_without_its_parent_is_one_line_before_any_trial(methods, message):
    with pytest.raises(UserError, match=message):
        points_of_methods(methods.split(",") if "match" not in methods else ["lora", methods.split(",", 1)[1]])


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "100", "two"])
def test_delta_must_be_a_positive_number_of_points(value):
    with pytest.raises(UserError, match="--delta"):
        fair.points_from(value, "--delta")


def test_delta_and_plan_on_the_command_line(tmp_path):
    """--plan prints the design (trials, power at Holm's level) and creates nothing; a bad --delta is one line."""
    env = dict(os.environ)
    store = tmp_path / "optuna.db"
    base = [sys.executable, "-m", "ablations.study", "fair", "--methods", "lora,moslora,linchain",
            "--storage", f"sqlite:///{store}", "--output-dir", str(tmp_path / "results"), "--plan"]
    out = subprocess.run(base + ["--planned-sd", "2.5"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    figures = fair.stats.power_figures(0.025, 8, comparisons=2, delta=0.02)
    assert f"minimum detectable effect (80% power) is {100 * figures.mde:.1f} points" in out.stdout
    assert f"called equivalent (90% interval inside +-2.0) {100 * figures.p_equivalent:.0f}%" in out.stdout
    assert "21 tuning" in out.stdout and "24 final" in out.stdout and not store.exists()
    bad = subprocess.run(base + ["--delta", "-2"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--delta" in bad.stderr
