"""Inputs a second adversarial probe found accepted until training (or after it): each is now refused early.

The probe's cases and what a user sees are listed in docs/probes.md.
"""

from __future__ import annotations

import os

import pytest
import torch

from harness import run as harness_run
from harness.adapters import get_adapter_model, resolve_spec
from harness.config import MAX_RUN_NAME_BYTES, config_from_args, config_from_dict
from harness.errors import UserError
from harness.evaluate import main as evaluate_main
from harness.models import tiny_random_model
from harness.train import NonFiniteAdapter, NonFiniteLoss, train

from test_faults import one_error_line, run_args
from test_train import examples, settings_of, stack  # noqa: F401  (examples is a fixture)


def test_a_tilde_in_the_output_dir_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_from_args(["--output-dir", "~/res"]).output_dir == str(tmp_path / "res")
    assert config_from_dict({"output_dir": "~/res", "data_dir": "~/data"}).data_dir == str(tmp_path / "data")


@pytest.mark.integration
def test_a_run_into_a_tilde_folder_writes_its_results_there_and_no_literal_tilde(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    args = run_args(tmp_path, "--methods", "lora", "--run-name", "t")
    args[args.index("--output-dir") + 1] = "~/res"
    assert harness_run.main(args) == 0
    assert (home / "res" / "t" / "summary.csv").is_file()
    assert not (work / "~").exists()


@pytest.mark.parametrize("spec", ["lora:lr=inf", "lora:lr=nan", "linchain:alpha=inf", "lora:dropout=nan"])
def test_a_non_finite_number_in_a_method_spec_is_refused(spec):
    with pytest.raises(UserError, match="must be in"):
        resolve_spec(spec)


def test_a_run_with_lr_inf_in_its_spec_is_one_line_before_any_work(tmp_path, capsys):
    capsys.readouterr()
    assert harness_run.main(run_args(tmp_path, "--methods", "lora:lr=inf")) == 2
    assert "lr must be in" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_an_adapter_left_non_finite_by_its_last_step_fails_the_run(examples, monkeypatch):  # noqa: F811
    """The loss of every step was finite, yet the last optimizer step wrote NaN: no score may be reported."""
    torch.manual_seed(0)
    model = get_adapter_model(tiny_random_model(), "lora", r=4)
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(NonFiniteAdapter, match="hold NaN or inf after training") as caught:
        train(model, examples, stack, settings_of(batch_size=4, max_steps=1), progress=False)
    assert isinstance(caught.value, NonFiniteLoss)  # so harness.run marks the method failed, as for a NaN loss
    from ablations.trials import is_divergence

    assert is_divergence(str(caught.value))  # and a study counts it as a divergence, not a crash to retry


@pytest.mark.parametrize("argv, message", [
    (["--run-name", "r" * 300], f"at most {MAX_RUN_NAME_BYTES} bytes"),
    (["--run-name", "\u00e9" * 150], f"at most {MAX_RUN_NAME_BYTES} bytes"),  # 300 bytes in UTF-8
    (["--run-name", "a\x00b"], "NUL byte"),
    (["--experiment", "e\x00"], "NUL byte"),
    (["--experiment", "e" * 501], "at most 500 characters"),
    (["--seeds", str(2**63 + 1)], r"in \[0, 2\*\*32\)"),
    (["--seeds", "0,-1"], r"in \[0, 2\*\*32\)"),
])
def test_names_seeds_and_values_the_system_refuses_are_one_line_at_configuration(argv, message):
    with pytest.raises(UserError, match=message):
        config_from_args(argv)


def test_a_long_value_in_a_config_file_is_refused_before_mlflow_sees_it():
    with pytest.raises(UserError, match="--tracking-uri: must be at most 500 characters"):
        config_from_dict({"tracking_uri": "sqlite:///" + "x" * 600})


def test_the_largest_allowed_run_name_and_seed_are_accepted():
    cfg = config_from_args(["--run-name", "r" * MAX_RUN_NAME_BYTES, "--seeds", str(2**32 - 1)])
    assert len(cfg.run_name) == MAX_RUN_NAME_BYTES and cfg.seeds == [2**32 - 1]


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.5"])
def test_evaluate_refuses_a_bad_batch_size_in_one_line(value, capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate_main(["--model", "tiny-random", "--batch-size", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [
        f"python -m harness.evaluate: error: argument --batch-size: must be a whole number of at least 1 "
        f"or 'auto' (got {value!r})"]


def test_home_is_not_expanded_in_other_text(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_from_args(["--experiment", "~exp"]).experiment == "~exp"
    assert os.path.expanduser("~") == str(tmp_path)
