"""A study worker's trials share the base model, the task suite and the base measures (harness.reuse),
and sharing them changes no number: the same runs give the same scores, items, curves and diagnostics."""

from __future__ import annotations

import math

import pytest

import harness.models
from harness.config import config_from_args
from harness.evaluate import TaskSuite
from harness.reuse import current, shared_fixed_costs

SMOKE = ["--model", "tiny-random", "--max-steps", "3", "--limit", "4", "--batch-size", "4",
         "--eval-batch-size", "8", "--tasks", "arithmetic_add_sub", "--diagnostics", "basic"]


def config(folder, *extra):
    folder.mkdir(parents=True, exist_ok=True)
    return config_from_args([*SMOKE, "--output-dir", str(folder / "results"), "--tracking-uri",
                             f"sqlite:///{folder / 'mlflow.db'}", *extra])


def same(a, b) -> bool:
    """Equal, NaN equal to NaN (a diagnostics row has NaN where a measure does not apply)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_the_block_sets_and_restores_the_shared_costs():
    assert current() is None
    with shared_fixed_costs() as outer:
        assert current() is outer
        with shared_fixed_costs() as inner:
            assert current() is inner and inner is not outer
        assert current() is outer
    assert current() is None


@pytest.mark.integration
def test_shared_trials_load_once_and_give_the_same_numbers(tmp_path, monkeypatch):
    from harness.run import run

    loads, suites = [], []
    real_load, real_init = harness.models.load_model, TaskSuite.__init__

    def counting_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    def counting_init(self, *args, **kwargs):
        suites.append(args)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(harness.models, "load_model", counting_load)
    monkeypatch.setattr(TaskSuite, "__init__", counting_init)

    def trials(folder):
        """Two trials as a study runs them: one method each, other rate and seed, no results folder."""
        return [run(config(tmp_path / folder, "--methods", method, "--seeds", seed, "--lr", lr),
                    write_results=False, evaluate_base=False, progress=False, log=lambda *a, **k: None)
                for method, seed, lr in (("lora", "0", "2e-3"), ("linchain:n=2", "1", "1e-3"))]

    alone = trials("alone")
    assert (len(loads), len(suites)) == (2, 2)  # each run its own
    loads.clear(), suites.clear()
    with shared_fixed_costs() as fixed:
        shared = trials("shared")
    assert (len(loads), len(suites)) == (1, 1) and fixed.hits == 3  # model, suite, base measures
    for a, b in zip(alone, shared):
        ra, rb = a.results[0], b.results[0]
        assert ra.scores == rb.scores and ra.correct == rb.correct and ra.loss_curve == rb.loss_curve
        rows_a, rows_b = a.diagnostics.rows, b.diagnostics.rows
        assert len(rows_a) == len(rows_b) > 1
        for row_a, row_b in zip(rows_a, rows_b):
            assert row_a.keys() == row_b.keys()
            assert all(same(row_a[k], row_b[k]) for k in row_a), (row_a, row_b)
        assert not math.isnan(rows_a[-1]["forgetting"])


@pytest.mark.integration
def test_forgetting_is_measured_against_the_unmodified_base_whatever_method_comes_first(tmp_path):
    """PiSSA moves W0's principal part into its adapter, so its model with the adapter disabled is not the
    base model: the base loss must come from the base model itself, or LoRA's forgetting would depend on
    whether PiSSA trained before it in the same run."""
    from harness.diagnostics import mean_token_loss
    from harness.run import run

    def lora_forgetting(folder, methods):
        outcome = run(config(tmp_path / folder, "--methods", methods), write_results=False, progress=False,
                      log=lambda *a, **k: None)
        rows = [r for r in outcome.diagnostics.rows if r["method"] == "lora" and r["layer"] == "all"]
        return rows[0]["forgetting"], outcome.diagnostics

    alone, diagnostics = lora_forgetting("alone", "lora")
    after_pissa, _ = lora_forgetting("after", "pissa,lora")
    assert alone == after_pissa
    base, _ = harness.models.load_model("tiny-random", dtype=next(diagnostics.base_model.parameters()).dtype)
    assert diagnostics.base.loss == mean_token_loss(base, diagnostics.base.sample.input_ids)
