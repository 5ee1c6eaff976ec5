"""The main job end to end on tiny-random: train, lm-eval, MLflow, results; and its failure modes.

One test (the smoke run) starts ``python -m harness.run`` as a user would, and one sends a real process
SIGTERM; the command-line checks call ``main(argv)`` in this process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.config import config_from_args
from harness.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--model", "tiny-random", "--max-steps", "3", "--limit", "4", "--batch-size", "4",
         "--eval-batch-size", "8", "--tasks", "arithmetic_add_sub"]


def smoke_args(tmp_path, *extra):
    return [*SMOKE, "--output-dir", str(tmp_path / "results"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One whole run of three methods, as a user would start it, in a separate process."""
    tmp_path = tmp_path_factory.mktemp("smoke")
    done = subprocess.run([sys.executable, "-m", "harness.run", "--methods", "lora,moslora,linchain:n=2",
                           "--run-name", "smoke", *smoke_args(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    return tmp_path, done


@pytest.mark.integration
def test_smoke_run_completes_and_writes_results(smoke_run):
    tmp_path, done = smoke_run
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "results" / "smoke"
    for name in ["summary.md", "summary.csv", "loss_curves.png", "scores.png", "config.yaml"]:
        assert (run_dir / name).is_file(), name
        assert (run_dir / name).stat().st_mode & 0o044 == 0o044, f"{name} is not readable by others"
    import pandas as pd

    table = pd.read_csv(run_dir / "summary.csv")
    assert list(table["method"]) == ["base", "lora", "moslora", "linchain-2"]
    assert (table.loc[1:, "trainable_params"] > 0).all()
    # config.yaml repeats the run exactly
    again = config_from_args(["--config", str(run_dir / "config.yaml")])
    assert again.methods == ["lora", "moslora", "linchain:n=2"] and again.max_steps == 3 and again.limit == 4


@pytest.mark.integration
def test_smoke_run_is_readable_from_mlflow(smoke_run, mlflow_runs_of):
    tmp_path, done = smoke_run
    assert done.returncode == 0, done.stderr[-3000:]
    runs = mlflow_runs_of(tmp_path)
    parent = runs[runs["tags.mlflow.runName"] == "smoke"]
    assert len(parent) == 1 and parent["status"].iloc[0] == "FINISHED"
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]]
    assert sorted(children["tags.mlflow.runName"]) == ["base", "linchain-2-seed0", "lora-seed0", "moslora-seed0"]
    assert (children["status"] == "FINISHED").all()
    lora = children[children["tags.mlflow.runName"] == "lora-seed0"].iloc[0]
    assert lora["metrics.trainable_params"] > 0 and lora["metrics.seconds_per_step"] > 0
    assert 0 <= lora["metrics.average_accuracy"] <= 1
    assert "params.versions.peft" in parent and parent["params.versions.peft"].iloc[0]
    assert parent["params.data_checksum.train_data"].iloc[0]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(lora["run_id"], "train_loss")
    assert [m.step for m in history] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(lora["run_id"])}
    assert {"adapter", "samples"} <= artifacts


@pytest.mark.integration
def test_same_seed_reproduces_the_same_numbers(tmp_path):
    from harness.run import run

    outcomes = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        cfg = config_from_args(smoke_args(tmp_path / str(i), "--methods", "moslora"))
        outcomes.append(run(cfg, progress=False, log=lambda *a: None))
    a, b = (o.results[0] for o in outcomes)
    assert a.loss_curve == b.loss_curve and a.scores == b.scores and a.correct == b.correct


@pytest.mark.integration
def test_a_failing_method_does_not_lose_the_others(tmp_path, mlflow_runs_of):
    from harness.run import run

    cfg = config_from_args(smoke_args(tmp_path, "--methods", "lora,linchain:lr=1e30", "--max-grad-norm", "0"))
    outcome = run(cfg, progress=False, log=lambda *a: None)
    lora, broken = outcome.results
    assert lora.ok and lora.scores
    assert not broken.ok and "loss became" in broken.error
    assert (outcome.run_dir / "summary.md").is_file()
    runs = mlflow_runs_of(tmp_path).set_index("tags.mlflow.runName")
    assert runs.loc["linchain-3-seed0", "status"] == "FAILED" and runs.loc["lora-seed0", "status"] == "FINISHED"


@pytest.mark.integration
def test_ctrl_c_marks_runs_killed_and_leaves_no_results(tmp_path, monkeypatch, mlflow_runs_of):
    import harness.train
    from harness.run import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.train, "train", interrupted)
    cfg = config_from_args(smoke_args(tmp_path, "--methods", "lora", "--run-name", "stopped"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False, log=lambda *a: None)
    assert not (tmp_path / "results" / "stopped").exists() and not list((tmp_path / "results").iterdir())
    runs = mlflow_runs_of(tmp_path).set_index("tags.mlflow.runName")
    assert runs.loc["stopped", "status"] == "KILLED" and runs.loc["lora-seed0", "status"] == "KILLED"


@pytest.mark.integration
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, mlflow_runs_of):
    """`kill` or a scheduler's pre-emption mid-training: exit 143, runs KILLED, no half-written results folder."""
    command = [sys.executable, "-m", "harness.run", *smoke_args(tmp_path, "--methods", "lora", "--run-name", "term",
                                                                "--max-steps", "1000000")]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base_samples = tmp_path / "results" / ".term.partial" / "term" / "samples" / "base.jsonl"  # written out of sight
    try:
        deadline = time.time() + 300
        while not base_samples.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert base_samples.exists(), "the run never reached training"
        time.sleep(1.0)  # well into the (million-step) training
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM): MLflow runs marked KILLED" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "results" / "term").exists() and not (tmp_path / "results" / ".term.partial").exists()
    runs = mlflow_runs_of(tmp_path).set_index("tags.mlflow.runName")
    assert runs.loc["term", "status"] == "KILLED" and runs.loc["lora-seed0", "status"] == "KILLED"
    assert runs.loc["lora-seed0", "tags.error"] == "terminated (SIGTERM)"  # not "interrupted (Ctrl-C)"


@pytest.mark.integration
def test_an_existing_run_folder_is_never_overwritten(tmp_path):
    from harness.run import run

    (tmp_path / "results" / "taken").mkdir(parents=True)
    (tmp_path / "results" / "taken" / "summary.md").write_text("an earlier run")
    cfg = config_from_args(smoke_args(tmp_path, "--methods", "lora", "--run-name", "taken"))
    outcome = run(cfg, progress=False, log=lambda *a: None)
    assert outcome.run_dir.name == "taken-2"
    assert (tmp_path / "results" / "taken" / "summary.md").read_text() == "an earlier run"


@pytest.mark.integration
def test_one_run_builds_one_task_manager(tmp_path, monkeypatch):
    """Checksums, contamination, the fingerprint and every evaluation share the run's TaskSuite and its one manager."""
    from lm_eval.tasks import TaskManager

    from harness.run import run

    built = []
    init = TaskManager.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(TaskManager, "__init__", counting_init)
    cfg = config_from_args(smoke_args(tmp_path, "--methods", "lora"))
    outcome = run(cfg, progress=False, log=lambda *a: None)
    assert outcome.base.scores and outcome.results[0].scores
    assert len(built) == 1


@pytest.mark.parametrize("args,message", [
    (["--methods", "lora,bogus"], "unknown adapter method 'bogus'"),
    (["--methods", "linchain:n=0"], "chain length n must be an integer >= 1"),
    (["--tracking-uri", "http://127.0.0.1:9"], "127.0.0.1:9"),
    (["--tasks", "no_such_task"], "no_such_task"),
    (["--train-data", "no_such_set"], "no_such_set"),
    (["--rank", "0"], "--rank"),
    (["--targets", "nope_proj"], "target module 'nope_proj' not found"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(tmp_path, monkeypatch, capsys, args, message):
    from harness.run import main

    monkeypatch.chdir(tmp_path)
    assert main([*smoke_args(tmp_path), *args]) == 2  # an exception other than UserError would fail the test
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_unknown_yaml_option_is_rejected(tmp_path):
    (tmp_path / "run.yaml").write_text("max_stepz: 3\n")
    with pytest.raises(UserError, match="max_stepz"):
        config_from_args(["--config", str(tmp_path / "run.yaml")])
