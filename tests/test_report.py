"""Tests for harness.report: the paired bootstrap, the summary files and never-overwritten run folders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.report import (
    BASE,
    SystemResult,
    atomic_path,
    paired_bootstrap,
    summarize,
    unique_run_dir,
    write_report,
)


def _system(method: str, seed: int | None, correct: dict[str, np.ndarray], **extra) -> SystemResult:
    return SystemResult(
        method=method, seed=seed,
        scores={t: float(v.mean()) for t, v in correct.items()},
        correct={t: {f"doc{i}": float(x) for i, x in enumerate(v)} for t, v in correct.items()},
        **extra,
    )


def _paired_systems(n_items: int, p_a: float, p_b: float, seeds=(0, 1, 2), rng_seed: int = 0):
    """Two systems on the same items: A is right on a superset-ish of B's items (a realistic positive correlation)."""
    rng = np.random.default_rng(rng_seed)
    a, b = [], []
    for seed in seeds:
        u = rng.random(n_items)
        a.append(_system("a", seed, {"t": (u < p_a).astype(float)}))
        b.append(_system("b", seed, {"t": (u < p_b).astype(float)}))
    return a, b


def test_bootstrap_ci_contains_the_true_difference():
    a, b = _paired_systems(400, 0.55, 0.40)
    gain = paired_bootstrap(a, b, seed=1)
    assert gain.paired_seeds and gain.n_items == 400
    assert gain.contains(0.15)
    assert gain.low > 0  # a 15-point gain on 400 items x 3 seeds is clearly supported


def test_bootstrap_ci_covers_the_truth_in_most_repetitions():
    hits = 0
    for rep in range(40):
        a, b = _paired_systems(150, 0.5, 0.42, seeds=(0,), rng_seed=100 + rep)
        hits += paired_bootstrap(a, b, n_resamples=500, seed=rep).contains(0.08)
    assert hits >= 33  # nominal 95%: 38 of 40 expected; allow sampling noise


def test_more_items_give_a_narrower_interval():
    widths = []
    for n in (100, 1600):
        a, b = _paired_systems(n, 0.5, 0.4)
        gain = paired_bootstrap(a, b, seed=0)
        widths.append(gain.high - gain.low)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(16) = 1/4 in theory


def test_identical_systems_gain_zero_with_a_ci_containing_zero():
    a, _ = _paired_systems(300, 0.5, 0.5)
    b = [SystemResult(**{**r.__dict__, "method": "b"}) for r in a]
    gain = paired_bootstrap(a, b)
    assert gain.estimate == 0.0 and gain.contains(0.0)


def test_unpaired_seeds_are_averaged_and_items_aligned_by_doc_id():
    rng = np.random.default_rng(3)
    truth = rng.random(200) < 0.3
    base = _system(BASE, None, {"t": truth.astype(float)})
    # The method's items come in another order; only the shared doc ids are compared.
    runs = [_system("m", s, {"t": np.ones(200)}) for s in (0, 1)]
    for r in runs:
        r.correct["t"] = dict(reversed(list(r.correct["t"].items())))
    gain = paired_bootstrap(runs, [base])
    assert not gain.paired_seeds
    assert gain.estimate == pytest.approx(1 - truth.mean())


def _run_results(failed: bool = True):
    rng = np.random.default_rng(7)
    tasks = {"add": 120, "mul": 80}
    base = _system(BASE, None, {t: (rng.random(n) < 0.1).astype(float) for t, n in tasks.items()})
    results = []
    for method, p in (("lora", 0.4), ("linchain:r=8,widths=8-16-8", 0.45)):
        for seed in (0, 1):
            curve = [(s, float(3 * np.exp(-s / 20) + 0.3)) for s in range(1, 41)]
            results.append(_system(method, seed, {t: (rng.random(n) < p).astype(float) for t, n in tasks.items()},
                                   trainable_params=1000, train_seconds=10.0, seconds_per_step=0.25,
                                   tokens_per_second=500.0, peak_memory_mb=100.0, loss_curve=curve))
    if failed:
        results.append(SystemResult("moslora", 0, error="NonFiniteLoss: loss is nan at step 3",
                                    loss_curve=[(1, 3.0), (2, 5.0)]))
    return base, results


def test_summary_table_rows_and_columns():
    base, results = _run_results()
    table = summarize(base, results, n_resamples=200)
    assert list(table["method"]) == [BASE, "lora", "linchain:r=8,widths=8-16-8", "moslora"]
    for column in ("seeds", "failed", "trainable_params", "add", "add_std", "mul", "mul_std", "average",
                   "average_std", "train_seconds", "seconds_per_step", "tokens_per_second", "peak_memory_mb",
                   "gain_vs_base", "gain_vs_base_low", "gain_vs_base_high",
                   "gain_vs_lora", "gain_vs_lora_low", "gain_vs_lora_high"):
        assert column in table.columns
    rows = table.set_index("method")
    assert rows.loc["lora", "seeds"] == 2 and rows.loc["moslora", "failed"] == 1
    assert rows.loc["lora", "average"] == pytest.approx(np.mean([(r.scores["add"] + r.scores["mul"]) / 2
                                                                 for r in results[:2]]))
    chain = rows.loc["linchain:r=8,widths=8-16-8"]
    assert chain["gain_vs_base_low"] <= chain["gain_vs_base"] <= chain["gain_vs_base_high"]
    assert not np.isnan(chain["gain_vs_lora"])
    assert np.isnan(rows.loc["lora", "gain_vs_lora"]) and np.isnan(rows.loc[BASE, "gain_vs_base"])


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
    assert "tiny-random" in markdown and "paired bootstrap" in markdown and "loss is nan" in markdown
    assert written["loss_curves.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_with_config_writes_a_repeatable_config(tmp_path):
    from harness.config import config_from_args

    cfg = config_from_args(["--model", "tiny-random", "--max-steps", "5", "--seeds", "0,1"])
    base, results = _run_results(failed=False)
    written = write_report(tmp_path / "run", base, results, config=cfg, n_resamples=100)
    assert config_from_args(["--config", str(written["config.yaml"])]) == cfg
    assert "5 steps" in written["summary.md"].read_text()


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
