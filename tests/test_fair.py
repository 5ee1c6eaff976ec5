"""The fair protocol (ablations.fair): the same learning-rate grid for every method, chosen on validation,
then fresh seeds scored once on test; grid extensions at the edge; failed seeds reported; verdict files;
--tune-lr on grid studies; bad input in one line; end to end on tiny-random with a killed worker."""

from __future__ import annotations

import math
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from ablations.storage import open_storage, resolve_storage_url
from ablations.studyfile import load_study_file, parse_study
from harness.errors import UserError

from test_ablations import SMOKE, env, one_line_error, signal_mid_trial

FAIR = {"name": "tiny_fair", "kind": "fair", "seeds": [0], "final_seeds": 2, "lr_grid": [1e-3, 3e-3, 1e-2],
        "extend": 1, "delta": 2, "space": [{"method": "lora"}, {"method": "moslora"}]}
VERDICT_COLUMNS = ["method", "reference", "family", "chosen_lr", "grid_low", "grid_high", "at_edge",
                   "valid_best_of_grid", "valid_smoothed", "test_mean", "test_std", "seeds", "failed_seeds",
                   "diverged_seeds", "divergence_rate", "gain", "gain_low", "gain_high", "gain_low90", "gain_high90",
                   "items_low", "items_high", "p_holm", "p_equivalence_holm", "delta", "mde_pooled",
                   "var_seed_share", "var_item_share", "verdict", "note"]
FOUR_VERDICTS = {"better", "worse", "equivalent", "inconclusive"}


class ProtocolRun:
    """Stands in for harness.run.run. Validation peaks at ``optimum[spec]`` (log10 lr); test peaks half a
    decade higher, so a choice made on test would pick another rate than one made on validation."""

    BASE = 0.1  # the base model's test score, what a diverged final run is scored as

    def __init__(self, optimum, nan=()):
        self.optimum, self.nan = optimum, set(nan)
        self.calls: list[tuple[str, int, float, str]] = []
        self.evaluated_every: list[int | None] = []

    def score(self, spec, lr, seed, split):
        peak = self.optimum[spec] + (0.5 if split == "test" else 0.0)
        return 0.6 - 0.05 * (math.log10(lr) - peak) ** 2 + 0.003 * seed

    def __call__(self, cfg, *, parent, tracker, write_results, evaluate_base, progress, log,
                 intermediate_every=None, on_intermediate=None):
        from harness.report import SystemResult
        from harness.run import RunOutcome

        (spec,), (seed,) = cfg.methods, cfg.seeds
        self.calls.append((spec, seed, cfg.lr, cfg.split))
        self.evaluated_every.append(intermediate_every)
        if on_intermediate is not None:  # what harness.run reports: the trial's split, every N steps
            for step in range(intermediate_every, cfg.max_steps + 1, intermediate_every):
                on_intermediate(spec, seed, step, self.score(spec, cfg.lr, seed, cfg.split))
        result = SystemResult(method=spec, seed=seed, trainable_params=10, train_seconds=0.1)
        if (spec, seed) in self.nan:
            result.error = "non-finite loss (nan) at step 2"
        else:
            result.scores = {"task": self.score(spec, cfg.lr, seed, cfg.split)}
        base = None
        if evaluate_base is True or (evaluate_base == "if_failed" and result.error):
            base = SystemResult(method="base", scores={"task": self.BASE})
        return RunOutcome(run_dir=Path("."), base=base, results=[result])


def fair_plan(tmp_path, data=FAIR, storage=None, **options):
    """Create (or resume) a fair study the way ``python -m ablations.study`` does; ``options`` are its flags."""
    from ablations.study import create_or_resume, resolve_plan

    typed = {"model": "tiny-random", "max_steps": 2, "output_dir": str(tmp_path / "results"),
             "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **options.pop("typed", {})}
    plan = resolve_plan(parse_study(data, source="test", default_name=data["name"]), typed, None, None, **options)
    url = resolve_storage_url(storage or f"sqlite:///{tmp_path / 'optuna.db'}")
    store = open_storage(url, create=True)
    return create_or_resume(plan, store, url, log=lambda *a: None), store, url


def run_all(plan, storage, fake, **kwargs):
    from ablations.trials import work

    return work(plan, storage, run_fn=fake, log=lambda *a: None, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# The protocol's settings


def test_default_grid_is_quarter_decades_over_at_least_a_decade_and_a_half():
    study = load_study_file("fair")
    grid = study.lr_grid
    assert len(grid) >= 7 and math.log10(grid[-1] / grid[0]) >= 1.5 - 1e-12
    for low, high in zip(grid, grid[1:]):
        assert math.isclose(high / low, 10 ** 0.25)
    assert math.isclose(grid[0], 1e-4) and study.final_seeds == 8 and study.seeds == [0]
    assert math.isclose(study.delta, 0.02)  # 2 points, stated in the file
    assert [p["method"] for p in study.points][0] == "lora"


def test_grid_extensions_continue_the_outer_steps_and_final_seeds_are_fresh():
    from ablations.fair import final_seeds_from, lr_at, lr_grid_from

    grid = lr_grid_from("1e-3, 3e-3,1e-2", "--lr-grid")
    assert grid == [1e-3, 3e-3, 1e-2]
    assert math.isclose(lr_at(grid, -1), 1e-3 / 3) and math.isclose(lr_at(grid, -2), 1e-3 / 9)
    assert math.isclose(lr_at(grid, 3), 1e-2 * 10 / 3)
    assert final_seeds_from(3, [0], "x") == [1, 2, 3]
    assert final_seeds_from("3", [1, 2], "x") == [0, 3, 4]
    assert final_seeds_from("5,7", [0], "x") == [5, 7]


@pytest.mark.parametrize("change, key", [
    ({"lr_grid": [1e-3]}, "lr_grid"),                      # fewer than 2 points
    ({"lr_grid": [0, 1e-3]}, "lr_grid"),                   # not positive
    ({"lr_grid": [-1e-3, 1e-3]}, "lr_grid"),
    ({"lr_grid": {"log10_low": -3, "log10_high": -3, "per_decade": 4}}, "lr_grid"),
    ({"final_seeds": [0, 1]}, "final_seeds"),              # overlaps the tuning seed 0
    ({"final_seeds": 1}, "final_seeds"),                   # one run has no spread over runs
    ({"space": [{"method": "moslora"}, {"method": "linchain"}]}, "space"),   # no lora, the reference
    ({"space": [{"method": "lora", "lr": 1e-3}]}, "space"),
    ({"extend": -1}, "extend"),
    ({"n_trials": 20}, "n_trials"),                        # a tpe key: the grid and final_seeds set the count
    ({"lr": {"low": 1e-4, "high": 1e-2}}, "lr"),           # a tpe key: the rates come from lr_grid
])
def test_bad_fair_study_file_is_one_line_naming_the_key(change, key):
    with pytest.raises(UserError) as err:
        parse_study({**FAIR, **change}, source="study file 'x.yaml'")
    assert f"x.yaml': {key}:" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key, instead", [("lr", "its rates are lr_grid's"),
                                          ("n_trials", "its trials are lr_grid's rates and final_seeds")])
def test_a_tpe_key_in_a_fair_study_file_says_what_the_fair_study_reads_instead(key, instead):
    with pytest.raises(UserError) as err:
        parse_study({**FAIR, key: {"low": 1e-4, "high": 1e-2} if key == "lr" else 20}, source="study file 'x.yaml'")
    assert str(err.value) == f"study file 'x.yaml': {key}: only tpe studies take {key} (this study is kind fair; {instead})"


@pytest.mark.parametrize("key", ["space", "seeds", "lr_grid", "final_seeds", "extend"])
def test_fair_study_file_missing_a_key_names_it(key):
    with pytest.raises(UserError, match=f"{key}: missing"):
        parse_study({k: v for k, v in FAIR.items() if k != key}, source="study file 'x.yaml'")


def test_fair_flags_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from ablations import study

    monkeypatch.chdir(tmp_path)
    base = ["fair", *SMOKE, "--storage", f"sqlite:///{tmp_path / 'o.db'}"]
    assert "at least 2 rates" in one_line_error(capsys, study.main, [*base, "--lr-grid", "1e-3"])
    assert "positive" in one_line_error(capsys, study.main, [*base, "--lr-grid", "0,1e-3"])
    assert "--final-seeds" in one_line_error(capsys, study.main, [*base, "--final-seeds", "0,1", "--seeds", "0"])
    assert "add lora" in one_line_error(capsys, study.main, [*base, "--methods", "moslora,linchain"])
    assert "fixes lr" in one_line_error(capsys, study.main, [*base, "--methods", "lora:lr=1e-3"])
    assert "--tune-lr" in one_line_error(capsys, study.main, ["chain_length", *SMOKE, "--lr-grid", "1e-3,1e-2"])
    assert "only grid studies" in one_line_error(capsys, study.main, ["lr", *SMOKE, "--tune-lr"])
    no_lora = tmp_path / "no_lora.yaml"
    no_lora.write_text("kind: grid\nspace:\n  - {method: linchain, n: [1, 2]}\n")
    assert "add lora" in one_line_error(capsys, study.main, [str(no_lora), *SMOKE, "--tune-lr",
                                                              "--storage", f"sqlite:///{tmp_path / 'o.db'}"])
    assert not (tmp_path / "o.db").exists()  # every one failed before a storage was created


# ----------------------------------------------------------------------------------------------------------
# The protocol with a stand-in for harness.run


@pytest.mark.integration
def test_rates_are_chosen_on_validation_and_only_the_chosen_one_is_tested(tmp_path):
    fake = ProtocolRun({"lora": math.log10(3e-3), "moslora": math.log10(3e-3)})
    plan, storage, _ = fair_plan(tmp_path)
    run_all(plan, storage, fake)
    tune = [c for c in fake.calls if c[3] == "validation"]
    final = [c for c in fake.calls if c[3] == "test"]
    assert len(tune) + len(final) == len(fake.calls)  # no other split was ever scored
    # the same grid, seeds and steps for every method
    by_method = {spec: sorted((seed, lr) for s, seed, lr, _ in tune if s == spec) for spec in ("lora", "moslora")}
    assert by_method["lora"] == by_method["moslora"] == sorted((0, lr) for lr in (1e-3, 3e-3, 1e-2))
    # finals: the fresh seeds, once each, at the best validation rate, and no test score at any other rate
    for spec in ("lora", "moslora"):
        valid = {lr: fake.score(spec, lr, 0, "validation") for lr in (1e-3, 3e-3, 1e-2)}
        best = max(valid, key=valid.get)
        assert sorted((seed, lr) for s, seed, lr, _ in final if s == spec) == [(1, best), (2, best)]
    assert Counter(c[:3] for c in fake.calls).most_common(1)[0][1] == 1  # no slot ran twice


@pytest.mark.integration
def test_the_grid_grows_at_the_edge_at_most_extend_times_and_the_report_says_so(tmp_path):
    from ablations.fair import method_results

    # lora's validation optimum lies a decade below the grid; moslora's inside it
    fake = ProtocolRun({"lora": -4.0, "moslora": math.log10(3e-3)})
    plan, storage, _ = fair_plan(tmp_path)
    run_all(plan, storage, fake)
    lora_rates = sorted(lr for s, _, lr, split in fake.calls if s == "lora" and split == "validation")
    assert len(lora_rates) == 3 + 1  # one step down: extend is 1
    assert math.isclose(lora_rates[0], 1e-3 / 3)
    results = {r.spec: r for r in method_results(plan, storage)}
    assert results["lora"].extended_low == 1 and results["lora"].at_edge
    assert math.isclose(results["lora"].chosen_lr, 1e-3 / 3)
    assert results["moslora"].extended_low == results["moslora"].extended_high == 0
    assert not results["moslora"].at_edge
    from ablations.report import write_report

    verdict = pd.read_csv(write_report(plan, storage) / "verdict.csv").set_index("method")
    assert "grid extended 1 step(s) down" in verdict.loc["lora", "note"]
    assert "edge" in verdict.loc["lora", "note"] and bool(verdict.loc["lora", "at_edge"])
    # an under-tuned reference withholds every comparison with it: no verdict, the note says why
    assert verdict.loc["moslora", "verdict"] == "inconclusive"
    assert "withheld: the chosen rate of `lora` is still at the edge" in verdict.loc["moslora", "note"]
    assert pd.isna(verdict.loc["moslora", "p_holm"])
    assert math.isclose(verdict.loc["lora", "grid_low"], 1e-3 / 3)


@pytest.mark.integration
def test_verdict_files_have_their_columns_and_a_diverged_seed_counts_as_the_base_model(tmp_path):
    from ablations.report import write_report

    fake = ProtocolRun({"lora": math.log10(3e-3), "moslora": math.log10(3e-3)}, nan={("moslora", 2)})
    plan, storage, _ = fair_plan(tmp_path, {**FAIR, "final_seeds": [1, 2, 3]})
    run_all(plan, storage, fake)
    folder = write_report(plan, storage)
    assert folder == tmp_path / "results" / "ablations" / "tiny_fair"
    for name in ("verdict.csv", "verdict.md", "trials.csv", "lr_sensitivity.png", "tuning_curve.png"):
        assert (folder / name).is_file(), name
    verdict = pd.read_csv(folder / "verdict.csv", dtype={"seeds": str, "failed_seeds": str, "diverged_seeds": str})
    assert list(verdict.columns) == VERDICT_COLUMNS
    rows = verdict.set_index("method")
    assert rows.loc["lora", "verdict"] == "reference" and rows.loc["lora", "seeds"] == "1,2,3"
    moslora = rows.loc["moslora"]
    # the diverged seed is an outcome (scored as the base model), never dropped from the pairs
    assert moslora["seeds"] == "1,2,3" and pd.isna(moslora["failed_seeds"]) and moslora["diverged_seeds"] == "2"
    assert math.isclose(moslora["divergence_rate"], 1 / 3)
    assert "final seed 2 diverged (scored as the base model): non-finite loss" in moslora["note"]
    # the gain is the mean per-seed test difference over all three seeds, seed 2 at the base model's score
    mine = {1: fake.score("moslora", 3e-3, 1, "test"), 2: fake.BASE, 3: fake.score("moslora", 3e-3, 3, "test")}
    gain = sum(mine[s] - fake.score("lora", 3e-3, s, "test") for s in (1, 2, 3)) / 3
    assert math.isclose(moslora["gain"], gain, abs_tol=1e-12)
    assert moslora["verdict"] in FOUR_VERDICTS and moslora["family"] == "vs LoRA"
    text = (folder / "verdict.md").read_text()
    assert "Nothing was chosen on the test split" in text and "interval over the final seeds" in text.replace(
        "Student-t interval over", "interval over")
    trials = pd.read_csv(folder / "trials.csv")
    assert set(trials.loc[trials["stage"] == "tune", "split"]) == {"validation"}
    assert set(trials.loc[trials["stage"] == "final", "split"]) == {"test"}
    assert len(trials[trials["stage"] == "tune"]) == 2 * 3


@pytest.mark.integration
def test_tuning_trials_are_pruned_on_validation_and_final_runs_never(tmp_path):
    import optuna

    from ablations.fair import method_results

    fake = ProtocolRun({"lora": -4.0, "moslora": -4.0})  # validation falls with the rate: higher rates get pruned
    data = {**FAIR, "intermediate_every": 1, "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0}}
    plan, storage, _ = fair_plan(tmp_path, data)
    run_all(plan, storage, fake)
    tune = optuna.load_study(study_name="tiny_fair/lora", storage=storage).get_trials()
    pruned = sorted(t.user_attrs["lr"] for t in tune if t.state.name == "PRUNED")
    assert pruned == [3e-3, 1e-2]
    finals = [every for (_, _, _, split), every in zip(fake.calls, fake.evaluated_every) if split == "test"]
    assert len(finals) == 4 and set(finals) == {None}  # no intermediate evaluation on test, so no pruning there
    assert all(every == 1 for (*_, split), every in zip(fake.calls, fake.evaluated_every) if split == "validation")
    lora = next(r for r in method_results(plan, storage) if r.spec == "lora")
    assert math.isclose(lora.chosen_lr, 1e-3 / 3)  # a pruned rate is never chosen; the edge was extended


@pytest.mark.integration
def test_without_a_lora_score_nothing_is_called_better_or_worse(tmp_path):
    from ablations.fair import method_results, verdict_rows

    class LoraCrashes(ProtocolRun):  # every final LoRA run crashes (an exception, not a divergence): no outcome
        def __call__(self, cfg, **kwargs):
            outcome = super().__call__(cfg, **kwargs)
            if cfg.methods == ["lora"] and cfg.split == "test":
                outcome.results[0].error, outcome.results[0].scores = "RuntimeError: out of memory", {}
            return outcome

    fake = LoraCrashes({"lora": math.log10(3e-3), "moslora": math.log10(3e-3)})
    plan, storage, _ = fair_plan(tmp_path)
    run_all(plan, storage, fake)
    rows = {r["method"]: r for r in verdict_rows(plan, method_results(plan, storage))}
    assert rows["lora"]["failed_seeds"] == "1,2" and rows["lora"]["seeds"] == ""
    assert rows["moslora"]["verdict"] == "inconclusive" and math.isnan(rows["moslora"]["gain"])
    assert "no final seed both completed" in rows["moslora"]["note"]


@pytest.mark.integration
def test_a_slot_queued_twice_runs_once(tmp_path):
    """Two workers that settle a spec at the same moment both queue its finals: the lower trial runs."""
    import optuna

    from ablations import fair

    fake = ProtocolRun({"lora": math.log10(3e-3), "moslora": math.log10(3e-3)})
    plan, storage, _ = fair_plan(tmp_path)
    run_all(plan, storage, fake, max_trials=3)  # lora's tuning is done
    finals = optuna.load_study(study_name="tiny_fair/lora/final", storage=storage)
    assert fair.top_up(finals, storage, plan) == 2 and len(finals.trials) == 2  # one worker queues the finals
    params, attrs = fair.final_trial(plan, "lora", 1, 1)  # and another worker, at the same moment, one of them
    finals.enqueue_trial(params, user_attrs=attrs)
    run_all(plan, storage, fake)
    trials = finals.get_trials()
    assert sorted(t.user_attrs["seed"] for t in trials if t.state.name == "COMPLETE") == [1, 2]
    (dup,) = [t for t in trials if t.state.name == "FAIL"]
    assert dup.user_attrs["duplicate_of"] < dup.number and "not run" in dup.user_attrs["fail_reason"]
    assert Counter((s, seed) for s, seed, _, split in fake.calls if split == "test")[("lora", 1)] == 1


@pytest.mark.integration
def test_an_idle_worker_waits_for_another_workers_trial_then_runs_the_finals_it_unlocks(tmp_path):
    import threading
    import time

    import optuna

    from ablations.trials import claim, work

    fake = ProtocolRun({"lora": math.log10(3e-3), "moslora": math.log10(3e-3)})
    plan, storage, _ = fair_plan(tmp_path)
    run_all(plan, storage, fake, max_trials=2)
    lora = optuna.load_study(study_name="tiny_fair/lora", storage=storage)
    held = claim(lora, storage)  # another worker is running lora's last tuning trial
    worker = threading.Thread(target=work, args=(plan, storage),
                              kwargs={"stale_after": 600, "run_fn": fake, "log": lambda *a: None, "poll_s": 0.2})
    worker.start()
    deadline = time.time() + 300
    while len(fake.calls) < 2 + 3 + 2 and time.time() < deadline:  # moslora's tuning and finals
        time.sleep(0.2)
    time.sleep(1.0)
    assert worker.is_alive() and not any(c[0] == "lora" and c[3] == "test" for c in fake.calls)
    lora.tell(held, fake.score("lora", held.user_attrs["lr"], 0, "validation"))  # the other worker finishes
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert sorted(c[1] for c in fake.calls if c[0] == "lora" and c[3] == "test") == [1, 2]


@pytest.mark.integration
def test_a_trial_finished_by_another_worker_between_top_up_and_claim_still_unlocks_its_finals(tmp_path, monkeypatch):
    """The race CI once hit: the other worker's trial ends after this pass topped up and before it
    counted the running trials; nothing is queued and nothing runs, yet the finals are still due."""
    import optuna

    from ablations import fair, trials

    fake = ProtocolRun({"lora": math.log10(3e-3), "moslora": math.log10(3e-3)})
    plan, storage, _ = fair_plan(tmp_path)
    run_all(plan, storage, fake, max_trials=2)
    lora = optuna.load_study(study_name="tiny_fair/lora", storage=storage)
    held = trials.claim(lora, storage)
    real_claim, told = trials.claim, []

    def claim_then_finish_the_held_trial(study, store):
        trial = real_claim(study, store)
        if trial is None and not told and study.study_name == fair.optuna_names(plan)[-1]:
            lora.tell(held, fake.score("lora", held.user_attrs["lr"], 0, "validation"))
            told.append(True)
        return trial

    monkeypatch.setattr(trials, "claim", claim_then_finish_the_held_trial)
    trials.work(plan, storage, stale_after=600, run_fn=fake, log=lambda *a: None, poll_s=0.01)
    assert told
    assert sorted(c[1] for c in fake.calls if c[0] == "lora" and c[3] == "test") == [1, 2]


@pytest.mark.integration
def test_resume_after_a_dead_worker_reruns_only_its_trial(tmp_path):
    import optuna
    import time

    from ablations.trials import claim

    fake = ProtocolRun({"lora": math.log10(3e-3), "moslora": math.log10(3e-3)})
    plan, storage, url = fair_plan(tmp_path)
    run_all(plan, storage, fake, max_trials=2)
    study = optuna.load_study(study_name="tiny_fair/lora", storage=storage)
    dead = claim(study, storage)  # a worker that dies holding lora's last tuning trial
    time.sleep(1.1)
    from ablations.study import create_or_resume

    plan2, storage2, _ = fair_plan(tmp_path)
    create_or_resume(plan2, storage2, url, stale_after=1.0, log=lambda *a: None)
    run_all(plan2, storage2, fake, stale_after=1.0)
    assert len(fake.calls) == len(set(fake.calls)) == 2 * 3 + 2 * 2  # every slot ran once across both sessions
    lost = optuna.load_study(study_name="tiny_fair/lora", storage=storage2).trials[dead.number]
    assert lost.state.name == "FAIL" and lost.user_attrs["killed"]
    with pytest.raises(UserError, match="final"):  # the protocol is part of what a resumed study must repeat
        fair_plan(tmp_path, final_seeds="5,6")


@pytest.mark.integration
def test_tune_lr_gives_every_grid_point_its_own_rate(tmp_path):
    from ablations.report import write_report

    data = {"name": "chains", "kind": "grid", "seeds": [0, 1, 2], "plot": {"x": "n"},
            "space": [{"method": "lora"}, {"method": "linchain", "n": [1, 2]}]}
    optimum = {"lora": math.log10(1e-3), "linchain:n=1": math.log10(3e-3), "linchain:n=2": math.log10(1e-2)}
    fake = ProtocolRun(optimum)
    plan, storage, _ = fair_plan(tmp_path, data, tune_lr=True, lr_grid="1e-3,3e-3,1e-2", final_seeds="2")
    assert plan.name == "chains_tuned_lr" and plan.kind == "fair" and plan.final_seeds == [1, 2]
    run_all(plan, storage, fake)
    tested = {s: {lr for spec, _, lr, split in fake.calls if spec == s and split == "test"} for s in optimum}
    assert tested == {"lora": {1e-3}, "linchain:n=1": {3e-3}, "linchain:n=2": {1e-2}}
    folder = write_report(plan, storage)
    assert (folder / "score_vs_n.png").is_file() and (folder / "verdict.csv").is_file()


def test_each_point_is_compared_with_the_lora_point_of_its_options():
    from ablations.fair import reference_of

    points = load_study_file("rank").points  # rank --tune-lr: LoRA at the same rank
    for point in points:  # a LoRA point is itself a reference
        expected = None if point["method"] == "lora" else {"method": "lora", "r": point["r"]}
        assert reference_of(point, points) == expected
    lone = [{"method": "lora", "r": 8}, {"method": "moslora"}]  # one LoRA point: the reference of every method
    assert reference_of(lone[1], lone) == lone[0]
    two = [{"method": "lora", "r": 8}, {"method": "lora", "r": 4}, {"method": "moslora", "r": 16}]
    assert reference_of(two[2], two) is None  # ambiguous: check_references asks for lora with its options


@pytest.mark.integration
def test_the_lr_tuning_study_scores_validation_only(tmp_path):
    data = {"name": "tune", "kind": "tpe", "seeds": [0], "space": [{"method": "lora"}], "n_trials": 3,
            "lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    fake = ProtocolRun({"lora": -3.0})
    from ablations.study import create_or_resume, resolve_plan

    typed = {"model": "tiny-random", "output_dir": str(tmp_path / "r"), "tracking_uri": f"sqlite:///{tmp_path}/m.db"}
    plan = resolve_plan(parse_study(data, source="t", default_name="tune"), typed, None, None)
    url = resolve_storage_url(f"sqlite:///{tmp_path / 'o.db'}")
    storage = open_storage(url, create=True)
    run_all(create_or_resume(plan, storage, url, log=lambda *a: None), storage, fake)
    assert len(fake.calls) == 3 and {c[3] for c in fake.calls} == {"validation"}


# ----------------------------------------------------------------------------------------------------------
# End to end on tiny-random: real trials, a worker killed mid-trial, the same command resumes


@pytest.mark.integration
def test_fair_study_end_to_end_with_a_killed_worker(tmp_path):
    import signal

    import optuna

    extra = ["--methods", "lora,moslora", "--lr-grid", "1e-3,3e-3,1e-2", "--final-seeds", "2", "--seeds", "0",
             "--limit", "5"]
    command, victim, _ = signal_mid_trial(tmp_path, signal.SIGKILL, data=FAIR, extra=extra, watch="tiny_fair/lora")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    again = subprocess.run([*command, "--stale-after", "1"], cwd=tmp_path, env=env(), capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = {name: optuna.load_study(study_name=name, storage=url).get_trials()
              for name in ("tiny_fair/lora", "tiny_fair/lora/final", "tiny_fair/moslora", "tiny_fair/moslora/final")}
    lost = trials["tiny_fair/lora"][victim.number]
    assert lost.state.name == "FAIL" and lost.user_attrs.get("killed")
    failed = [t for ts in trials.values() for t in ts if t.state.name == "FAIL"]
    assert failed == [lost]  # only the killed worker's trial was lost
    for name, ts in trials.items():
        done = Counter((t.user_attrs["lr_position"], t.user_attrs["seed"]) for t in ts if t.state.name == "COMPLETE")
        assert set(done.values()) == {1}, name  # every slot finished exactly once
        if name.endswith("final"):
            assert sorted(seed for _, seed in done) == [1, 2] and len({p for p, _ in done}) == 1
    folder = tmp_path / "results" / "ablations" / "tiny_fair"
    verdict = pd.read_csv(folder / "verdict.csv")
    assert list(verdict.columns) == VERDICT_COLUMNS and list(verdict["method"]) == ["lora", "moslora"]
    table = pd.read_csv(folder / "trials.csv")
    assert set(zip(table["stage"], table["split"])) == {("tune", "validation"), ("final", "test")}
    for name in ("verdict.md", "lr_sensitivity.png", "tuning_curve.png"):
        assert (folder / name).is_file(), name
    # every final run stored its mechanism measurements: the claims are answered at the tuned rates, from the storage
    runs = pd.read_csv(folder / "diagnostics.csv")
    assert sorted(zip(runs["method"], runs["seed"])) == [("lora", 1), ("lora", 2), ("moslora", 1), ("moslora", 2)]
    assert runs["mean_movement"].gt(0).all() and runs["effective_rank"].notna().all()
    claims = pd.read_csv(folder / "claims.csv")
    tested = claims[claims["tested"]]
    assert set(tested["claim"]) == {"rank", "paths", "convergence"} and set(tested["reference"]) == {"lora"}
    assert tested["n_pairs"].eq(2).all() and "at the tuned rates" in (folder / "diagnostics.md").read_text()
    assert (folder / "forgetting_frontier.png").stat().st_size > 0 and (folder / "result.json").is_file()
    assert len(pd.read_csv(folder / "items.csv.gz")) == 2 * 2 * 5 * len(set(pd.read_csv(folder / "items.csv.gz")["task"]))


class CrashingRun(ProtocolRun):
    """A ProtocolRun whose first call at ``crash`` (spec, seed, lr) fails with an exception's error, as
    harness.run records a crash (``TypeError: ...``), not a non-finite loss."""

    def __init__(self, optimum, crash, nan=()):
        super().__init__(optimum, nan)
        self.crash, self.crashed = crash, False

    def __call__(self, cfg, **kwargs):
        outcome = super().__call__(cfg, **kwargs)
        (spec,), (seed,) = cfg.methods, cfg.seeds
        if not self.crashed and (spec, seed) == self.crash[:2] and math.isclose(cfg.lr, self.crash[2]):
            self.crashed = True
            outcome.results[0].error, outcome.results[0].scores = "RuntimeError: CUDA error: device-side assert", {}
        return outcome


def test_retry_failed_queues_crashed_tuning_trials_again_and_keeps_diverged_ones(tmp_path):
    import optuna

    from ablations.fair import tune_name
    from ablations.study import create_or_resume

    fake = CrashingRun({"lora": math.log10(3e-3), "moslora": math.log10(3e-3)}, crash=("lora", 0, 3e-3),
                       nan={("moslora", 0)})
    plan, storage, url = fair_plan(tmp_path)
    run_all(plan, storage, fake)
    tune = {s: optuna.load_study(study_name=tune_name(plan, s), storage=storage) for s in ("lora", "moslora")}
    crashed = [t for t in tune["lora"].get_trials() if t.state.name == "FAIL"]
    assert len(crashed) == 1 and crashed[0].user_attrs["crashed"] is True
    assert all(not t.user_attrs.get("crashed") for t in tune["moslora"].get_trials() if t.state.name == "FAIL")
    lines = []
    create_or_resume(plan, storage, url, retry_failed=True, log=lines.append)
    assert f"[{tune_name(plan, 'lora')}] --retry-failed: 1 crashed tuning trial(s) queued again" in lines
    assert f"[{tune_name(plan, 'moslora')}] --retry-failed: 0 crashed tuning trial(s) queued again" in lines
    waiting = [t for t in tune["lora"].get_trials() if t.state.name == "WAITING"]
    assert [(t.user_attrs["lr_position"], t.user_attrs["seed"]) for t in waiting] == [(1, 0)]
    assert not [t for t in tune["moslora"].get_trials() if t.state.name == "WAITING"]
    run_all(plan, storage, fake)
    rerun = [t for t in tune["lora"].get_trials() if t.user_attrs.get("lr_position") == 1]
    assert sorted(t.state.name for t in rerun) == ["COMPLETE", "FAIL"]


def test_no_wait_with_only_another_workers_trial_left_returns_and_says_what_runs(tmp_path):
    import threading

    import optuna

    from ablations.trials import claim, work

    fake = ProtocolRun({"lora": math.log10(3e-3), "moslora": math.log10(3e-3)})
    plan, storage, _ = fair_plan(tmp_path)
    run_all(plan, storage, fake, max_trials=2)
    lora = optuna.load_study(study_name="tiny_fair/lora", storage=storage)
    held = claim(lora, storage)  # another worker is running lora's last tuning trial
    lines, returned = [], []
    worker = threading.Thread(target=lambda: returned.append(
        work(plan, storage, stale_after=600, run_fn=fake, log=lines.append, wait=False, poll_s=0.05)))
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "--no-wait waited for another worker's trial"
    assert not any("waiting for" in line for line in lines)
    said = [line for line in lines if "not waiting (--no-wait)" in line]
    assert len(said) == 1 and "1 trial(s) running in another worker" in said[0] and f"trial {held.number}" in said[0]
    assert not any(c[0] == "lora" and c[3] == "test" for c in fake.calls)


@pytest.mark.parametrize("change, key, bound", [
    ({"extend": 100000}, "extend", "at most 10 grid steps"),
    ({"lr_grid": {"log10_low": -4, "log10_high": 2, "per_decade": 100000}}, "lr_grid", "600001 rates is more than the 50"),
    ({"lr_grid": [10 ** (-4 + k / 100) for k in range(51)]}, "lr_grid", "51 rates is more than the 50"),
    ({"final_seeds": 100000}, "final_seeds", "100000 final seeds is more than the 50"),
    ({"seeds": list(range(30)), "lr_grid": [10 ** (-4 + k / 10) for k in range(20)]}, "space",
     f"{2 * ((20 + 2 * 1) * 30 + 2):,} trials is more than the 1000"),  # 2 specs, 22 rates x 30 seeds, 2 finals
])
def test_an_unbounded_fair_study_file_is_one_line_naming_its_bound_at_once(change, key, bound):
    import time

    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        parse_study({**FAIR, **change}, source="study file 'x.yaml'")
    assert time.perf_counter() - started < 5.0
    message = str(err.value)
    assert f"x.yaml': {key}:" in message and bound in message and "\n" not in message


def test_extend_past_its_bound_stops_the_study_command_before_any_trial(tmp_path, capsys):
    import yaml

    from ablations.study import main

    study = tmp_path / "huge.yaml"
    study.write_text(yaml.safe_dump({**FAIR, "name": "huge", "extend": 100000}))
    db = tmp_path / "optuna.db"
    err = one_line_error(capsys, main, [str(study), *SMOKE, "--storage", f"sqlite:///{db}",
                                        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert "extend: at most 10 grid steps per side (got 100000)" in err
    assert not db.exists()
