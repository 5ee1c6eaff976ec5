"""Tests for harness.report: gains and what their intervals cover, what ran, the files, never-overwritten folders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from harness.report import (
    BASE,
    SystemResult,
    atomic_path,
    fair_study_methods,
    grad_norm_summary,
    header_from_config,
    method_settings,
    summarize,
    unique_run_dir,
    write_report,
)
from harness.stats import ITEMS_ONLY, T_OVER_SEEDS


def _system(method: str, seed: int | None, correct: dict[str, np.ndarray], **extra) -> SystemResult:
    return SystemResult(
        method=method, seed=seed,
        scores={t: float(v.mean()) for t, v in correct.items()},
        correct={t: {f"doc{i}": float(x) for i, x in enumerate(v)} for t, v in correct.items()},
        **extra,
    )


def _run_results(failed: bool = True, seeds=(0, 1)):
    rng = np.random.default_rng(7)
    tasks = {"add": 120, "mul": 80}
    base = _system(BASE, None, {t: (rng.random(n) < 0.1).astype(float) for t, n in tasks.items()})
    results = []
    for method, p in (("lora", 0.4), ("linchain:r=8,widths=8-16-8", 0.45)):
        for seed in seeds:
            curve = [(s, float(3 * np.exp(-s / 20) + 0.3)) for s in range(1, 41)]
            results.append(_system(method, seed, {t: (rng.random(n) < p).astype(float) for t, n in tasks.items()},
                                   trainable_params=1000, train_seconds=10.0, seconds_per_step=0.25,
                                   tokens_per_second=500.0, peak_memory_mb=100.0, loss_curve=curve,
                                   grad_norm_median=0.5 + seed, clipped_fraction=0.25))
    if failed:
        results.append(SystemResult("moslora", 0, error="NonFiniteLoss: loss is nan at step 3",
                                    loss_curve=[(1, 3.0), (2, 5.0)]))
    return base, results


def _average(result: SystemResult) -> float:
    return (result.scores["add"] + result.scores["mul"]) / 2


def test_summary_table_rows_and_columns():
    base, results = _run_results()
    table = summarize(base, results, n_resamples=200)
    assert list(table["method"]) == [BASE, "lora", "linchain:r=8,widths=8-16-8", "moslora"]
    for column in ("seeds", "failed", "trainable_params", "r", "alpha", "lr", "targets", "init", "train_on_inputs",
                   "add", "add_std", "mul", "mul_std", "average", "average_std", "grad_norm_median",
                   "clipped_fraction", "train_seconds", "seconds_per_step", "tokens_per_second", "peak_memory_mb",
                   "gain_vs_base", "gain_vs_base_low", "gain_vs_base_high", "gain_vs_base_interval",
                   "gain_vs_base_item_low", "gain_vs_base_item_high",
                   "gain_vs_lora", "gain_vs_lora_low", "gain_vs_lora_high", "gain_vs_lora_interval",
                   "gain_vs_lora_item_low", "gain_vs_lora_item_high", "gain_vs_lora_seeds", "gain_vs_lora_missing",
                   "p_vs_lora", "p_holm", "mde_vs_lora"):
        assert column in table.columns
    rows = table.set_index("method")
    assert rows.loc["lora", "seeds"] == 2 and rows.loc["moslora", "failed"] == 1
    assert rows.loc["lora", "average"] == pytest.approx(np.mean([_average(r) for r in results[:2]]))
    assert rows.loc["lora", "grad_norm_median"] == pytest.approx(1.0)  # mean of the seeds' medians 0.5, 1.5
    assert np.isnan(rows.loc["lora", "gain_vs_lora"]) and np.isnan(rows.loc[BASE, "gain_vs_base"])
    assert rows.loc["moslora", "gain_vs_lora_interval"] == "no seed both completed"


def test_with_seeds_the_gain_is_a_t_interval_over_paired_seeds():
    base, results = _run_results(failed=False, seeds=(0, 1, 2))
    rows = summarize(base, results, n_resamples=300).set_index("method")
    chain = rows.loc["linchain:r=8,widths=8-16-8"]
    lora = {r.seed: _average(r) for r in results if r.method == "lora"}
    diffs = np.array([_average(r) - lora[r.seed] for r in results if r.method != "lora"])
    half = sps.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert chain["gain_vs_lora_interval"] == T_OVER_SEEDS and chain["gain_vs_lora_seeds"] == "0 1 2"
    assert chain["gain_vs_lora"] == pytest.approx(diffs.mean())
    assert (chain["gain_vs_lora_low"], chain["gain_vs_lora_high"]) == pytest.approx((diffs.mean() - half,
                                                                                    diffs.mean() + half))
    # The item noise is beside it, around the same gain, and one comparison is its own Holm family.
    assert chain["gain_vs_lora_item_low"] < diffs.mean() < chain["gain_vs_lora_item_high"]
    assert chain["p_holm"] == pytest.approx(sps.ttest_rel(diffs + list(lora.values()), list(lora.values())).pvalue)
    # The base model, evaluated once, is paired with every seed.
    base_diffs = np.array([_average(r) - _average(base) for r in results if r.method == "lora"])
    assert rows.loc["lora", "gain_vs_base"] == pytest.approx(base_diffs.mean())
    assert rows.loc["lora", "gain_vs_base_interval"] == T_OVER_SEEDS


def test_one_seed_says_the_interval_covers_item_noise_only(tmp_path):
    base, results = _run_results(failed=False, seeds=(0,))
    written = write_report(tmp_path / "run", base, results, n_resamples=300)
    table = pd.read_csv(written["summary.csv"]).set_index("method")
    assert table.loc["lora", "gain_vs_base_interval"] == ITEMS_ONLY
    chain = table.loc["linchain:r=8,widths=8-16-8"]
    assert (chain["gain_vs_lora_low"], chain["gain_vs_lora_high"]) == pytest.approx(
        (chain["gain_vs_lora_item_low"], chain["gain_vs_lora_item_high"]))
    markdown = written["summary.md"].read_text()
    assert "covers test-item noise only" in markdown and "Student-t" not in markdown


def test_holm_across_the_comparisons_with_lora():
    base, results = _run_results(failed=False, seeds=(0, 1, 2))
    rng = np.random.default_rng(11)
    for seed in (0, 1, 2):  # a third method, clearly better than LoRA
        results.append(_system("moslora", seed, {t: (rng.random(n) < 0.8).astype(float)
                                                 for t, n in (("add", 120), ("mul", 80))}))
    rows = summarize(base, results, n_resamples=200).set_index("method")
    p = rows["p_vs_lora"].dropna()
    assert len(p) == 2
    small, large = p.idxmin(), p.idxmax()
    assert rows.loc[small, "p_holm"] == pytest.approx(min(1.0, 2 * p[small]))
    assert rows.loc[large, "p_holm"] == pytest.approx(max(min(1.0, 2 * p[small]), p[large]))
    assert np.isnan(rows.loc["lora", "p_holm"]) and np.isnan(rows.loc[BASE, "p_holm"])


def test_a_failed_seed_is_left_out_of_the_pairing_and_named(tmp_path):
    base, results = _run_results(failed=False, seeds=(0, 1, 2))
    chain = next(r for r in results if r.method != "lora" and r.seed == 1)
    chain.error, chain.scores, chain.correct = "NonFiniteLoss: loss is nan at step 2", {}, {}
    written = write_report(tmp_path / "run", base, results, n_resamples=200)
    row = pd.read_csv(written["summary.csv"], dtype={"gain_vs_lora_seeds": str, "gain_vs_lora_missing": str}
                      ).set_index("method").loc["linchain:r=8,widths=8-16-8"]
    assert row["gain_vs_lora_seeds"] == "0 2" and row["gain_vs_lora_missing"] == "1"
    lora = {r.seed: _average(r) for r in results if r.method == "lora"}
    kept = [_average(r) - lora[r.seed] for r in results if r.method != "lora" and r.ok]
    assert row["gain_vs_lora"] == pytest.approx(np.mean(kept), rel=1e-5)  # summary.csv keeps 6 digits
    markdown = written["summary.md"].read_text()
    assert "paired seeds 0 2; seed(s) 1 completed for only one of the two" in markdown


def test_write_report_files(tmp_path):
    base, results = _run_results()
    written = write_report(tmp_path / "run", base, results, header={"model": "tiny-random"}, n_resamples=200)
    assert set(written) == {"summary.csv", "summary.md", "loss_curves.png", "scores.png"}
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(written)  # no temp files left
    csv = pd.read_csv(written["summary.csv"])
    assert list(csv["method"]) == [BASE, "lora", "linchain:r=8,widths=8-16-8", "moslora"]
    assert len(csv) == 4
    markdown = written["summary.md"].read_text()
    assert "tiny-random" in markdown and "Student-t interval over the seeds" in markdown
    assert "paired bootstrap over test items" in markdown and "loss is nan" in markdown
    assert written["loss_curves.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_with_config_writes_a_repeatable_config(tmp_path):
    from harness.config import config_from_args

    cfg = config_from_args(["--model", "tiny-random", "--max-steps", "5", "--seeds", "0,1"])
    base, results = _run_results(failed=False)
    written = write_report(tmp_path / "run", base, results, config=cfg, n_resamples=100)
    assert config_from_args(["--config", str(written["config.yaml"])]) == cfg
    assert "5 steps" in written["summary.md"].read_text()


def test_the_same_difference_at_every_seed_gives_no_interval_and_says_why(tmp_path):
    _, results = _run_results(failed=False, seeds=(0, 1))
    lora = [r for r in results if r.method == "lora"]
    twins = [SystemResult(**{**r.__dict__, "method": "twin"}) for r in lora]  # scores exactly like LoRA's
    written = write_report(tmp_path / "run", None, lora + twins, n_resamples=100)
    row = pd.read_csv(written["summary.csv"]).set_index("method").loc["twin"]
    assert row["gain_vs_lora"] == 0 and np.isnan(row["gain_vs_lora_low"]) and np.isnan(row["p_holm"])
    assert np.isnan(row["mde_vs_lora"])
    assert "the spread over seeds, and so the interval, is unknown" in written["summary.md"].read_text()


def test_contaminated_scores_are_marked(tmp_path):
    base, results = _run_results(failed=False)
    for result in [base, *results]:
        result.contaminated = {"mul"}  # what harness.run sets under --allow-contamination
    written = write_report(tmp_path / "run", base, results, n_resamples=100)
    assert set(pd.read_csv(written["summary.csv"])["contaminated"]) == {"mul"}
    markdown = written["summary.md"].read_text()
    assert "| add | mul (contaminated) | average |" in markdown
    assert "more than 1% of the scored items of mul" in markdown
    clean = write_report(tmp_path / "clean", *_run_results(failed=False), n_resamples=100)
    assert "contaminated" not in clean["summary.md"].read_text()


# ----------------------------------------------------------------------------------------------------------
# What ran: per-method settings, a header of what all share, the gradient norms


def _results_for(cfg, rng_seed: int = 0) -> list[SystemResult]:
    """One seed-0 result per method of ``cfg``, with the settings harness.run records."""
    from harness.adapters import resolve_spec
    from harness.tuned_rates import rate_for

    rng = np.random.default_rng(rng_seed)
    results = []
    for text in cfg.methods:
        spec = resolve_spec(text, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets)
        results.append(_system(spec.name, 0, {"add": (rng.random(50) < 0.5).astype(float)},
                               settings=method_settings(spec, rate_for(cfg, spec)[0], cfg.train_on_inputs)))
    return results


def test_a_method_override_shows_in_its_row_and_not_in_the_header(tmp_path):
    from harness.config import config_from_args

    cfg = config_from_args(["--model", "tiny-random", "--rank", "16", "--lr", "2e-3", "--targets", "q_proj,v_proj",
                            "--methods", "lora:r=8,linchain:lr=5e-4,moslora:init=orthogonal"])
    results = _results_for(cfg)
    written = write_report(tmp_path / "run", None, results, config=cfg, n_resamples=100)
    rows = pd.read_csv(written["summary.csv"]).set_index("method")
    assert list(rows["r"]) == [8, 16, 16] and list(rows["lr"]) == pytest.approx([2e-3, 5e-4, 2e-3])
    assert list(rows["init"].fillna("")) == ["", "kaiming", "orthogonal"]
    assert set(rows["targets"]) == {"q_proj+v_proj"} and not rows["train_on_inputs"].any()
    header = header_from_config(cfg, results)
    assert header["shared by all methods"] == "alpha 32, targets q_proj+v_proj, train_on_inputs false"
    assert header["per method (see What ran)"] == "r, lr, init"
    markdown = written["summary.md"].read_text()
    assert "rank 16" not in markdown and "r 16" not in markdown.split("## Scores")[0]
    assert "| `lora` | " in markdown and "| 8 | 32 | 0.002 | q_proj+v_proj | – | false |" in markdown


def test_the_header_lists_settings_every_method_shares():
    from harness.config import config_from_args

    cfg = config_from_args(["--model", "tiny-random", "--rank", "4", "--methods", "lora,condlora"])
    header = header_from_config(cfg, _results_for(cfg))
    assert header["shared by all methods"].startswith("r 4, alpha 32, lr 0.002, targets ")
    assert "per method (see What ran)" not in header


def test_grad_norm_summary_reads_the_training_result():
    class Trained:
        grad_norms = [(1, 3.0), (2, 0.5), (3, 2.0), (4, 1.5)]
        clipped_fraction = 0.5

    median, clipped = grad_norm_summary(Trained())
    assert median == pytest.approx(1.75) and clipped == 0.5
    assert all(np.isnan(v) for v in grad_norm_summary(object()))  # a loop that records neither


# ----------------------------------------------------------------------------------------------------------
# The comparison is not fair until each method is tuned: summary.md says so


def test_an_untuned_run_says_so_and_names_the_fair_study(tmp_path):
    from harness.config import config_from_args

    cfg = config_from_args(["--model", "tiny-random", "--methods", "lora,linchain:r=8,widths=8-16-8"])
    written = write_report(tmp_path / "run", None, _results_for(cfg), config=cfg, n_resamples=100)
    markdown = written["summary.md"].read_text()
    note = markdown.index("**Not tuned per method.**")
    assert markdown.index("## Scores and gains") < note < markdown.index("| method |")
    assert "one shared learning rate (0.002)" in markdown
    assert "`python -m ablations.study fair --methods lora,linchain:r=8,widths=8-16-8`" in markdown
    tuned = write_report(tmp_path / "tuned", None, _results_for(cfg), config=cfg, n_resamples=100, tuned=True)
    assert "Not tuned" not in tuned["summary.md"].read_text()


def test_fair_study_methods_drops_hand_set_learning_rates_and_keeps_lora_first():
    assert fair_study_methods(["lora", "linchain:r=8,widths=8-16-8,lr=1e-3", "condlora:lr=1e-3"]) == \
        "lora,linchain:r=8,widths=8-16-8,condlora"
    assert fair_study_methods(["moslora", "linchain"]) == "lora,moslora,linchain"
    assert fair_study_methods(["lora:r=8", "moslora"]) == "lora:r=8,moslora"  # already has its reference
    # a matched LoRA is compared with what it matches, never the reference: plain lora is added
    assert fair_study_methods(["linchain", "lora:match=linchain"]) == "lora,linchain,lora:match=linchain"



def test_fair_study_methods_keeps_a_match_value_whole():
    # match= takes the rest of the spec, commas and its own lr= included: only the outer lr= goes
    assert fair_study_methods(["lora", "linchain:r=8,widths=8-16-8",
                               "lora:lr=1e-3,match=linchain:r=8,widths=8-16-8,lr=1e-3"]) \
        == "lora,linchain:r=8,widths=8-16-8,lora:match=linchain:r=8,widths=8-16-8,lr=1e-3"

def test_one_reference_rule_for_the_report_and_the_diagnostics():
    from harness.adapters.spec import reference_name

    assert reference_name(["moslora", "lora:r=8", "lora"]) == "lora"
    assert reference_name(["moslora", "lora:r=8", "lora:r=4"]) == "lora:r=8"
    assert reference_name(["moslora", "dora"]) is None
    matched = "lora-r18-match-linchain-8-16-8"  # a matched LoRA is a LoRA: the reference when it is the only one
    assert reference_name([matched, "linchain-8-16-8"]) == matched
    assert reference_name([matched, "linchain-8-16-8"], ["lora", "linchain"]) == matched  # as the diagnostics call it
    assert reference_name(["linchain-3", matched, "lora"]) == "lora"  # plain LoRA first, wherever it stands
    assert reference_name(["lora:match=linchain", "linchain"]) == "lora:match=linchain"  # spec texts the same
    assert reference_name(["mtlora-icfm", "dora", "linchain-3-frozen"]) is None

@pytest.mark.integration
def test_a_run_reports_what_each_method_trained_with(tmp_path):
    """The issue's case end to end: --rank 16 with lora:r=8 and a per-method lr, on tiny-random."""
    from harness.config import config_from_args
    from harness.run import run

    cfg = config_from_args(["--model", "tiny-random", "--max-steps", "2", "--limit", "3", "--batch-size", "4",
                            "--eval-batch-size", "8", "--tasks", "arithmetic_add_sub", "--rank", "16",
                            "--methods", "lora:r=8,linchain:lr=5e-4", "--output-dir", str(tmp_path / "results"),
                            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    outcome = run(cfg, progress=False, log=lambda *a: None)
    rows = pd.read_csv(outcome.run_dir / "summary.csv").set_index("method")
    assert rows.loc["lora", "r"] == 8 and rows.loc["linchain-3", "r"] == 16
    assert rows.loc["lora", "lr"] == pytest.approx(2e-3) and rows.loc["linchain-3", "lr"] == pytest.approx(5e-4)
    markdown = (outcome.run_dir / "summary.md").read_text()
    assert "per method (see What ran)**: r, lr, init" in markdown and "rank 16" not in markdown
    from harness.train import TrainResult

    # Finite once the training loop records gradient norms (TrainResult.grad_norms), NaN before.
    records_norms = hasattr(TrainResult(), "grad_norms")
    assert np.isfinite(rows.drop(index="base")["grad_norm_median"]).all() == records_norms


def test_an_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "summary.csv"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_unique_run_dir_never_returns_an_existing_folder(tmp_path):
    first = unique_run_dir(tmp_path / "results", "run")
    (first / "summary.md").write_text("a finished run")
    seen = {first}
    for _ in range(5):
        new = unique_run_dir(tmp_path / "results", "run")
        assert new not in seen and new.is_dir() and not any(new.iterdir())
        seen.add(new)
    assert (first / "summary.md").read_text() == "a finished run"
    assert sorted(p.name for p in seen) == ["run", "run-2", "run-3", "run-4", "run-5", "run-6"]
