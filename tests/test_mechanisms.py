"""The mechanisms at the tuned rates (ablations.mechanisms): dW's movement per step, what a final trial
stores, and the claims answered against each method's own reference with their own Holm families."""

from __future__ import annotations

import math
from collections import Counter

import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats

from ablations import mechanisms
from ablations.fair import Tuning, TunedArm
from ablations.storage import pack_diagnostics, unpack_diagnostics
from harness.diagnostics.measures import Trace
from harness.diagnostics.spectra import update_movement


def test_movement_is_the_frobenius_norm_of_the_change_of_the_summed_layers():
    torch.manual_seed(0)
    before = {n: (torch.randn(7, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)) for n in "xy"}
    after = {n: (b + 0.1 * torch.randn_like(b), a - 0.2 * torch.randn_like(a)) for n, (b, a) in before.items()}
    dense = math.sqrt(sum(float(((after[n][0] @ after[n][1]) - (before[n][0] @ before[n][1])).pow(2).sum())
                          for n in "xy"))
    assert math.isclose(update_movement(before, after), dense, rel_tol=1e-10)
    assert update_movement(before, before) == pytest.approx(0.0, abs=1e-6)


def test_the_recorder_measures_movement_per_step_between_records():
    from harness.adapters import get_adapter_model
    from harness.diagnostics.spectra import DiagnosticsRecorder
    from harness.models import tiny_random_model

    model = get_adapter_model(tiny_random_model(), "linchain", r=4, alpha=8, targets=["q_proj", "v_proj"])
    recorder = DiagnosticsRecorder(model, every=5)

    def dense():  # every layer's dW as merging computes it (peft's get_delta_weight), as a dense matrix
        return {name: layer.get_delta_weight(recorder.adapter).double() for name, layer in recorder.layers.items()}

    with torch.no_grad():
        for layer in recorder.layers.values():
            layer.lora_B[recorder.adapter].weight.normal_(0, 0.1)
        recorder.on_step(1)
        first = dense()
        for layer in recorder.layers.values():
            layer.lora_B[recorder.adapter].weight.add_(0.01)
        recorder.on_step(5)
        moved = math.sqrt(sum(float((d - first[n]).pow(2).sum()) for n, d in dense().items()))
    assert [s for s, _ in recorder.movements] == [5]
    assert recorder.movements[0][1] == pytest.approx(moved / 4, rel=1e-6) and moved > 0


def test_diagnostics_round_trip_through_the_storage_json():
    row = {"method": "lora", "spec_method": "lora", "seed": 1, "layer": "all", "shape": "", "delta_norm": 1.234567891,
           "effective_rank": 3.0, "lambda_max": math.nan, "intruders": 2}
    trace = Trace("lora", "lora", 1, losses=[(1, 2.5), (2, 2.25)], delta_norms=[(1, 0.1)], movements=[(10, 0.01)])
    import json

    packed = json.loads(json.dumps(pack_diagnostics(row, trace)))
    measures, curves = unpack_diagnostics(packed)
    assert measures["delta_norm"] == pytest.approx(1.23457, rel=1e-6) and math.isnan(measures["lambda_max"])
    assert "shape" not in measures and measures["intruders"] == 2
    assert curves["losses"] == [(1, 2.5), (2, 2.25)] and curves["movements"] == [(10, 0.01)]
    assert curves["grad_norms"] == []


def _arm(spec, reference, movement, rank, seeds=range(1, 7), edge=False):
    tuning = Tuning(low=0, high=2, settled=True, best=2 if edge else 1)
    measured = {}
    for s in seeds:
        losses = [(t, 3.0 - 0.02 * t) for t in range(1, 101)]
        measured[s] = ({"effective_rank": rank(s), "steps_to_90": 90.0, "delta_norm": 1.0},
                       {"losses": losses, "grad_norms": [(t, 1.0 + 0.01 * s) for t in range(1, 101)],
                        "delta_norms": [(t, 0.01 * t) for t in (1, 10, 100)],
                        "effective_ranks": [(t, rank(s)) for t in (1, 10, 100)],
                        "movements": [(t, movement(s)) for t in (10, 100)]})
    return TunedArm(spec=spec, reference=reference, tuning=tuning, grid_low=1e-3, grid_high=1e-2, extended_low=0,
                    extended_high=0, chosen_lr=3e-3, valid_score=0.5, test={s: 0.5 for s in seeds}, failed={},
                    pending=[], measured=measured)


def _arms():
    wobble = {1: 0.3, 2: -0.1, 3: 0.2, 4: -0.3, 5: 0.1, 6: 0.0}
    lora = _arm("lora", None, lambda s: 1.0 + 0.01 * wobble[s], lambda s: 4.0 + wobble[s])
    linchain = _arm("linchain", "lora", lambda s: 2.0 + 0.02 * wobble[s] * s, lambda s: 4.0 + wobble[(s % 6) + 1])
    control = _arm("linchain:freeze_middle=true", "linchain", lambda s: 2.0 + 0.05 * wobble[s],
                   lambda s: 4.0 + 0.5 * wobble[s])
    return [lora, linchain, control]


def test_claims_are_tested_against_each_methods_own_reference_with_one_holm_family_each():
    claims = pd.DataFrame(mechanisms.claim_rows(_arms()))
    tested = claims[claims["tested"]]
    assert set(zip(tested["method"], tested["reference"])) == {("linchain", "lora"),
                                                                ("linchain:freeze_middle=true", "linchain")}
    assert set(tested["family"]) == {"vs LoRA", "vs control"}
    # the paths claim rests on dW's movement per step, the gradient norm is shown but not tested
    paths = claims[(claims["claim"] == "paths") & (claims["method"] == "linchain")]
    assert list(paths["tested"]) == [True, False] and "moves per step" in paths.iloc[0]["measure"]
    # p and Holm recomputed here: scipy's paired t-test, m = the tests of the family (3 claims, one method)
    arms = {a.spec: a for a in _arms()}
    mine = [arms["linchain"].measured[s][1]["movements"][0][1] for s in range(1, 7)]
    ref = [arms["lora"].measured[s][1]["movements"][0][1] for s in range(1, 7)]
    p = scipy_stats.ttest_rel(mine, ref).pvalue
    row = paths.iloc[0]
    assert row["p"] == pytest.approx(p, rel=1e-9)
    family = tested[tested["family"] == "vs LoRA"]  # every planned test counts, untested ones (no spread) too
    ordered = sorted(family["p"].dropna())
    expected = min(1.0, len(family) * ordered[0])
    assert row["p_holm"] == pytest.approx(expected, rel=1e-9) and row["verdict"] == "supported"
    assert row["difference"] == pytest.approx(sum(m - r for m, r in zip(mine, ref)) / 6)
    # the control moves dW as far as its parent: no detectable difference, and it says so plainly
    control = claims[(claims["claim"] == "paths") & (claims["method"] == "linchain:freeze_middle=true")].iloc[0]
    assert control["verdict"] == "no detectable difference" and "vs control" in control["note"]


def test_where_the_step_direction_was_recorded_the_paths_claim_rests_on_it_not_on_step_size():
    # LinChain moves dW twice as far per step (its rate) but follows -G no more closely than LoRA: the claim is
    # judged on the cosine, which the rate cannot set, and the movement is shown beside it, untested
    lora, linchain, _ = _arms()
    linchain.chosen_lr = 2 * lora.chosen_lr  # a cosine is judged at any pair of rates
    cosines = {"lora": {1: 0.30, 2: 0.32, 3: 0.29, 4: 0.31, 5: 0.30, 6: 0.33},
               "linchain": {1: 0.31, 2: 0.30, 3: 0.30, 4: 0.32, 5: 0.29, 6: 0.32}}
    for arm in (lora, linchain):
        for seed, (_, curves) in arm.measured.items():
            curves["alignments"] = [(10, cosines[arm.spec][seed]), (100, cosines[arm.spec][seed])]
    paths = pd.DataFrame(mechanisms.claim_rows([lora, linchain]))
    paths = paths[paths["claim"] == "paths"]
    assert list(paths["tested"]) == [True, False, False]
    assert "cosine" in paths.iloc[0]["measure"] and "moves per step" in paths.iloc[1]["measure"]
    diffs = [cosines["linchain"][s] - cosines["lora"][s] for s in range(1, 7)]
    assert paths.iloc[0]["difference"] == pytest.approx(sum(diffs) / 6)
    assert paths.iloc[0]["p"] == pytest.approx(scipy_stats.ttest_rel(
        [cosines["linchain"][s] for s in range(1, 7)], [cosines["lora"][s] for s in range(1, 7)]).pvalue, rel=1e-9)
    assert paths.iloc[0]["verdict"] == "no detectable difference"
    assert paths.iloc[1]["difference"] > 0.9  # the step size differs a lot, and decides nothing here


def test_a_step_length_cannot_judge_arms_at_different_rates_but_the_other_claims_still_can():
    lora, linchain, _ = _arms()
    linchain.chosen_lr = 1.78 * lora.chosen_lr
    claims = pd.DataFrame(mechanisms.claim_rows([lora, linchain]))
    paths = claims[(claims["claim"] == "paths") & claims["tested"]].iloc[0]
    assert "moves per step" in paths["measure"] and paths["verdict"] == "inconclusive"
    assert "rates differ" in paths["note"] and "x1.78" in paths["note"]
    rank = claims[(claims["claim"] == "rank") & claims["tested"]].iloc[0]
    assert rank["verdict"] != "inconclusive" and "Holm over" in rank["note"]
    assert math.isnan(paths["p_holm"])  # a withheld test takes no part in the Holm family


def test_claims_are_withheld_at_the_edge_and_inconclusive_without_pairs():
    lora, linchain, _ = _arms()
    edge = _arm("linchain", "lora", lambda s: 2.0 + 0.01 * s, lambda s: 4.0 + 0.1 * s, edge=True)
    claims = pd.DataFrame(mechanisms.claim_rows([lora, edge]))
    assert set(claims.loc[claims["tested"], "verdict"]) == {"inconclusive"}
    assert claims.loc[claims["tested"], "note"].str.contains("at the edge").all()
    one = _arm("linchain", "lora", lambda s: 2.0, lambda s: 4.0, seeds=[1])
    claims = pd.DataFrame(mechanisms.claim_rows([lora, one]))
    assert claims.loc[claims["tested"], "note"].str.contains("1 pair").all()
    none = _arm("linchain", "lora", lambda s: 2.0, lambda s: 4.0)
    none.measured = {}
    claims = pd.DataFrame(mechanisms.claim_rows([lora, none]))
    assert set(claims["verdict"]) == {"not measured"} and len(claims) == 3


def test_diagnostics_markdown_and_runs_table():
    arms = _arms()
    runs = mechanisms.run_rows(arms)
    assert len(runs) == 18 and set(runs[0]) == set(mechanisms.RUN_COLUMNS)
    lora1 = next(r for r in runs if r["method"] == "lora" and r["seed"] == 1)
    assert lora1["mean_movement"] == pytest.approx(1.003) and lora1["mean_grad_norm"] == pytest.approx(1.01)

    class Plan:
        name = "study"

    text = mechanisms.markdown(Plan, arms, mechanisms.claim_rows(arms), runs)
    assert "`linchain` 0.003" in text and "supported" in text and "| linchain:freeze_middle=true | linchain |" in text
    assert "not a proof of no effect" in text


# ----------------------------------------------------------------------------------------------------------
# What a fair study ships: items.csv.gz, and every verdict figure recomputed from it alone


class ItemRun:
    """Stands in for harness.run.run with per-item correctness: validation peaks at lr 3e-3 for every method,
    each item is right with a probability set by the method, the rate and the seed; scores are the items' means."""

    TASKS = {"task_a": 40, "task_b": 30}
    SKILL = {"lora": 0.55, "moslora": 0.6, "moslora:freeze_middle=true": 0.58}

    def __call__(self, cfg, *, evaluate_base, **kwargs):
        import numpy as np

        from harness.report import SystemResult
        from harness.run import RunOutcome

        (spec,), (seed,) = cfg.methods, cfg.seeds
        p = self.SKILL[spec] - 0.05 * (math.log10(cfg.lr) - math.log10(3e-3)) ** 2 + 0.01 * seed
        rng = np.random.default_rng([seed, len(spec), int(cfg.lr * 1e6), cfg.split == "test"])
        correct = {t: {d: float(rng.random() < p) for d in range(n)} for t, n in self.TASKS.items()}
        result = SystemResult(method=spec, seed=seed, trainable_params=10, train_seconds=0.1, correct=correct,
                              scores={t: sum(c.values()) / len(c) for t, c in correct.items()})
        return RunOutcome(run_dir=None, base=None, results=[result])


def test_a_fair_report_ships_items_and_recompute_agrees_with_every_figure(tmp_path, capsys):
    from ablations import recompute
    from ablations.report import write_report
    from test_fair import FAIR, fair_plan, run_all

    study = {**FAIR, "final_seeds": [1, 2, 3, 4],
             "space": [{"method": "lora"}, {"method": "moslora"}, {"method": "moslora", "freeze_middle": True}]}
    plan, storage, url = fair_plan(tmp_path, study)
    run_all(plan, storage, ItemRun())
    folder = write_report(plan, storage)
    # --report-dir puts the same report where the findings live (the default stays OUTPUT_DIR/ablations/NAME)
    from ablations import study as study_cli

    assert folder == tmp_path / "results" / "ablations" / "tiny_fair"
    import yaml

    study_file = tmp_path / "study.yaml"  # a study file whose name (tiny_fair) is not its file's stem
    study_file.write_text(yaml.safe_dump(study))
    assert study_cli.main([str(study_file), "--storage", url, "--report-only", "--report-dir",
                           str(tmp_path / "findings")]) == 0
    assert recompute.main([str(tmp_path / "findings")]) == 0
    assert (tmp_path / "findings" / "verdict.csv").read_text() == (folder / "verdict.csv").read_text()
    items = pd.read_csv(folder / "items.csv.gz")
    assert list(items.columns) == ["method", "seed", "task", "doc_id", "correct"]
    assert len(items) == 3 * 4 * (40 + 30)
    assert set(items["method"]) == set(pd.read_csv(folder / "verdict.csv")["method"])
    # a seed's test score is the mean over tasks of the items' mean, as verdict.csv has it
    verdict = pd.read_csv(folder / "verdict.csv").set_index("method")
    by_seed = items.groupby(["method", "seed", "task"])["correct"].mean().groupby(["method", "seed"]).mean()
    assert verdict.loc["moslora", "test_mean"] == pytest.approx(by_seed["moslora"].mean(), abs=1e-12)
    gain = (by_seed["moslora"] - by_seed["lora"]).mean()
    assert verdict.loc["moslora", "gain"] == pytest.approx(gain, abs=1e-12)
    assert verdict.loc["moslora:freeze_middle=true", "reference"] == "moslora"
    assert recompute.main([str(folder)]) == 0
    assert "agrees" in capsys.readouterr().out
    import json

    shipped = json.loads((folder / "result.json").read_text())
    assert [m["method"] for m in shipped["methods"]] == ["lora", "moslora", "moslora:freeze_middle=true"]
    moslora = shipped["methods"][1]
    assert moslora["reference"] == "lora" and moslora["chosen_lr"] == verdict.loc["moslora", "chosen_lr"]
    assert moslora["test"] == {str(s): pytest.approx(by_seed["moslora"][s], abs=1e-12) for s in (1, 2, 3, 4)}
    assert moslora["verdict"]["gain"] == pytest.approx(gain, abs=1e-12) and shipped["design"]["delta_points"] == 2
    # one figure changed in verdict.csv: the recomputation says which
    tampered = pd.read_csv(folder / "verdict.csv")
    tampered.loc[tampered["method"] == "moslora", "gain"] += 0.001
    tampered.to_csv(folder / "verdict.csv", index=False)
    assert recompute.main([str(folder)]) == 1
    assert "moslora gain:" in capsys.readouterr().err
    # the mechanisms files exist even when no final run stored diagnostics (the stand-in measures none)
    claims = pd.read_csv(folder / "claims.csv")
    assert set(claims["verdict"]) == {"not measured"}
    assert (folder / "diagnostics.md").is_file() and (folder / "diagnostics.csv").is_file()


def test_recompute_on_a_folder_without_the_files_is_one_line(tmp_path, capsys):
    from ablations import recompute

    assert recompute.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "verdict.csv not found" in err


FAIR_ITEMS = {"name": "tiny_fair", "kind": "fair", "seeds": [0], "final_seeds": 2, "lr_grid": [1e-3, 3e-3, 1e-2],
              "extend": 1, "delta": 2, "space": [{"method": "lora"}, {"method": "moslora"}]}


class CurvatureRun(ItemRun):
    """ItemRun that measures lambda_max as harness.run does at diagnostics: full, unless it is handed one."""

    def __init__(self):
        self.measured: list[tuple[str, int, float]] = []
        self.reused: list[tuple[str, int, float]] = []

    def __call__(self, cfg, *, known_curvature=None, **kwargs):
        from harness.diagnostics import Eigenvalue, RunDiagnostics

        outcome = super().__call__(cfg, **kwargs)
        (spec,), (seed,) = cfg.methods, cfg.seeds
        diagnostics = RunDiagnostics(cfg.diagnostics, known_curvature=known_curvature)
        if known_curvature and seed in known_curvature:
            self.reused.append((spec, seed, cfg.lr))
            value = known_curvature[seed]
        else:
            self.measured.append((spec, seed, cfg.lr))
            value = Eigenvalue(10.0 * len(spec) + seed, 0.01, 7, True)
        diagnostics.curvatures[(spec, seed)] = value
        outcome.diagnostics = diagnostics
        return outcome


def test_full_diagnostics_measure_lambda_max_once_per_spec_and_seed_not_once_per_rate(tmp_path):
    from ablations import fair

    study = {**FAIR_ITEMS, "final_seeds": [1, 2]}
    plan, storage, _ = __import__("test_fair").fair_plan(tmp_path, study, typed={"diagnostics": "full"})
    fake = CurvatureRun()
    __import__("test_fair").run_all(plan, storage, fake)
    measured = Counter((spec, seed) for spec, seed, _ in fake.measured)
    # every (spec, seed) measured exactly once, whatever the number of rates its tuning tried
    assert set(measured.values()) == {1}
    assert set(measured) == {(spec, seed) for spec in ("lora", "moslora") for seed in (0, 1, 2)}
    tuning_trials = sum(1 for call in fake.measured + fake.reused if call[1] == 0)
    assert tuning_trials >= 3 and len(fake.reused) == tuning_trials - 2  # the other rates reused seed 0's
    # the study's curvature table reads the stored values (no MLflow needed)
    assert fair.curvatures(plan, storage) == {spec: {s: 10.0 * len(spec) + s for s in (0, 1, 2)}
                                              for spec in ("lora", "moslora")}


class MeasuredRun(ItemRun):
    """ItemRun whose runs also measure (as harness.run's diagnostics do): forgetting grows with the rate."""

    def __call__(self, cfg, **kwargs):
        from harness.diagnostics import RunDiagnostics

        outcome = super().__call__(cfg, **kwargs)
        (spec,), (seed,) = cfg.methods, cfg.seeds
        diagnostics = RunDiagnostics("basic")
        diagnostics.rows.append({"method": spec, "spec_method": spec, "seed": seed, "layer": "all",
                                 "forgetting": 100 * cfg.lr + 0.01 * seed, "effective_rank": 3.0})
        diagnostics.traces.append(Trace(spec, spec, seed, losses=[(1, 2.0), (2, 1.5)], movements=[(2, 0.1)]))
        outcome.diagnostics = diagnostics
        return outcome


def test_every_trial_stores_its_measures_and_the_frontier_spans_the_tuning_rates(tmp_path):
    from ablations import fair
    from ablations.report import write_report
    from test_fair import fair_plan, run_all

    plan, storage, _ = fair_plan(tmp_path, {**FAIR_ITEMS, "final_seeds": [1, 2]})
    run_all(plan, storage, MeasuredRun())
    arms = {a.spec: a for a in fair.method_results(plan, storage)}
    lora = arms["lora"]
    tried = {fair.lr_at(plan.lr_grid, p) for p in lora.tuning.scores}
    assert set(lora.tuning_measured) == tried and len(tried) >= 3
    assert all(m[0]["forgetting"] == pytest.approx(100 * lr, rel=1e-5)  # (6 significant digits are stored)
               for lr, m in lora.tuning_measured.items())
    assert sorted(lora.measured) == [1, 2] and lora.measured[1][0]["forgetting"] == pytest.approx(
        100 * lora.chosen_lr + 0.01)
    folder = write_report(plan, storage)
    assert (folder / "forgetting_frontier.png").stat().st_size > 0


def test_a_withheld_claim_keeps_its_place_in_the_holm_count():
    """The step length is withheld (the rates differ) and convergence has no spread, yet the family is still the
    three planned claim tests: the tested claim's Holm p is computed here by hand over its raw p and a 1 for
    each untested one."""
    lora, linchain, _ = _arms()
    linchain.chosen_lr = 1.78 * lora.chosen_lr
    claims = pd.DataFrame(mechanisms.claim_rows([lora, linchain]))
    tested = claims[claims["tested"]]
    untested = int((tested["verdict"] == "inconclusive").sum())
    raw = sorted([*tested.loc[tested["verdict"] != "inconclusive", "p"].tolist(), *[1.0] * untested])
    m = len(raw)
    assert m == 3 and untested == 2
    adjusted, running = [], 0.0
    for i, p in enumerate(raw):
        running = max(running, min(1.0, (m - i) * p))
        adjusted.append(running)
    by_raw = dict(zip(raw, adjusted))
    for row in tested[tested["verdict"] != "inconclusive"].itertuples():
        assert row.p_holm == pytest.approx(by_raw[row.p])
        assert "3 claim test(s)" in row.note and "2 untested" in row.note


def test_an_arm_not_measured_yet_keeps_its_claims_in_the_holm_count():
    """A partial study: LinChain measured, MoSLoRA planned with no final run yet. MoSLoRA's three claim tests
    count in the LoRA family with p = 1, so LinChain's Holm p-values are over 3 + 3 tests, not 3."""
    lora, linchain, _ = _arms()
    planned = _arm("moslora", "lora", lambda s: 1.0, lambda s: 4.0, seeds=[])
    alone = pd.DataFrame(mechanisms.claim_rows([lora, linchain]))
    claims = pd.DataFrame(mechanisms.claim_rows([lora, linchain, planned]))
    assert set(claims.loc[claims["method"] == "moslora", "verdict"]) == {"not measured"}
    mine = claims[claims["tested"] & (claims["method"] == "linchain")].set_index("claim")
    before = alone[alone["tested"] & (alone["method"] == "linchain")].set_index("claim")
    measured = before["p"].dropna()
    assert len(measured) >= 1
    untested = before["verdict"] == "inconclusive"  # (no spread) counts with p = 1 as well
    raw = sorted([*before["p"].where(~untested, 1.0).tolist(), *[1.0] * 3])
    adjusted, running = {}, 0.0
    for i, p in enumerate(raw):
        running = max(running, min(1.0, (len(raw) - i) * p))
        adjusted.setdefault(p, running)
    for claim, p in measured.items():
        if before.loc[claim, "verdict"] == "inconclusive":
            continue
        assert mine.loc[claim, "p_holm"] == pytest.approx(adjusted[p])
        assert f"{len(raw)} claim test(s)" in mine.loc[claim, "note"]
