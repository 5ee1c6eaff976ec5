"""The default learning rates: each method's rate from the shipped fair study, where the setup is the study's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from harness import tuned_rates
from harness.adapters import resolve_spec
from harness.config import config_from_args
from harness.train import TrainSettings

ROOT = Path(__file__).resolve().parents[1]


def spec(text, cfg):
    return resolve_spec(text, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets)


def test_the_table_is_the_rate_its_study_chose_on_validation():
    table = tuned_rates.FAIR_PAPER
    verdict = pd.read_csv(ROOT / table.study / "verdict.csv").set_index("method")
    assert table.rates, "the table names no rate"
    for method, lr in table.rates.items():
        assert lr == pytest.approx(float(verdict.loc[method, "chosen_lr"]), rel=1e-12), method
    study = (ROOT / table.study / "study.yaml").read_text()
    assert f"max_steps: {table.max_steps}" in study


def test_with_no_rate_given_each_tabled_method_trains_at_its_own_rate():
    cfg = config_from_args([])
    for method, lr in tuned_rates.FAIR_PAPER.rates.items():
        assert tuned_rates.rate_for(cfg, spec(method, cfg)) == (lr, tuned_rates.TABLE)
        assert TrainSettings.from_config(cfg, spec(method, cfg), seed=0).lr == lr
    # another adapter, or another model: the fallback, never a rate chosen for something else
    for text in ("lora:r=8", "lora:alpha=16", "linchain:n=5", "moslora:init=orthogonal", "condlora"):
        assert tuned_rates.rate_for(cfg, spec(text, cfg)) == (tuned_rates.DEFAULT_LR, tuned_rates.DEFAULT), text
    other = dataclasses.replace(cfg, model="tiny-random")
    assert tuned_rates.rate_for(other, spec("lora", other))[1] == tuned_rates.DEFAULT
    assert tuned_rates.rate_for(dataclasses.replace(cfg, rank=8), spec("lora", dataclasses.replace(cfg, rank=8)))[1] \
        == tuned_rates.DEFAULT


def test_the_specs_a_run_trains_with_get_the_tabled_rates_after_their_targets_are_resolved():
    # harness.run resolves targets=auto to the architecture's modules before training: make run must still get
    # the study's rates (it fell back to 2e-3 for every method when only the unresolved spec matched)
    from harness.models import tiny_random_model  # a Llama layout, as the study's model
    from harness.run import plan_methods

    cfg = config_from_args(["--methods", "lora,moslora,linchain,lora:targets=q_proj+v_proj"])
    plans = plan_methods(cfg, tiny_random_model())
    assert all(p.spec.targets is not None for p in plans)
    rates = [tuned_rates.rate_for(cfg, p.spec) for p in plans]
    table = tuned_rates.FAIR_PAPER.rates
    assert rates[:3] == [(table["lora"], tuned_rates.TABLE), (table["moslora"], tuned_rates.TABLE),
                         (table["linchain"], tuned_rates.TABLE)]
    assert rates[3] == (tuned_rates.DEFAULT_LR, tuned_rates.DEFAULT)  # other targets: not the study's adapter
    assert [TrainSettings.from_config(cfg, p.spec, seed=0).lr for p in plans[:3]] == [r for r, _ in rates[:3]]


def test_lr_on_the_command_line_or_in_a_spec_wins():
    cfg = config_from_args(["--lr", "5e-4"])
    assert tuned_rates.rate_for(cfg, spec("lora", cfg)) == (5e-4, tuned_rates.COMMAND_LINE)
    assert tuned_rates.rate_for(cfg, spec("lora:lr=3e-3", cfg)) == (3e-3, tuned_rates.SPEC)
    assert tuned_rates.header_line(cfg, {"lora": spec("lora", cfg)}) is None  # one rate for all: the header says lr


def test_the_summary_line_says_where_each_rate_came_from_and_what_differs():
    cfg = config_from_args(["--max-steps", "50"])
    specs = {"lora": spec("lora", cfg), "lora-r8": spec("lora:r=8", cfg)}
    line = tuned_rates.header_line(cfg, specs)
    lora = tuned_rates.FAIR_PAPER.rates["lora"]
    assert f"`lora` {lora:.3g} (tuned)" in line and "`lora-r8` 0.002 (default)" in line
    assert tuned_rates.FAIR_PAPER.study in line and tuned_rates.FAIR_PAPER.commit in line
    assert "50 steps here, 100 there" in line and "--lr sets one rate for all" in line
    same = tuned_rates.header_line(config_from_args(["--max-steps", "100"]), {"lora": spec("lora", cfg)})
    assert "another budget" not in same


def test_a_study_keeps_one_shared_rate_when_none_is_given(tmp_path):
    from ablations.study import resolve_plan
    from ablations.studyfile import parse_study

    study = parse_study({"name": "g", "kind": "grid", "seeds": [0], "space": [{"method": "lora", "r": [4, 8]}]},
                        source="test", default_name="g")
    plan = resolve_plan(study, {"model": "tiny-random", "output_dir": str(tmp_path)}, None, None)
    assert plan.config.lr == tuned_rates.DEFAULT_LR  # as before the table: journals written then resume
