"""Faults and bad input (issue 15): hard kills reconciled, races closed, every user error one line
before any model work, messages that say what happened, and quiet consoles."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--model", "tiny-random", "--max-steps", "2", "--limit", "3", "--batch-size", "4",
         "--eval-batch-size", "8", "--tasks", "arithmetic_add_sub"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def run_args(tmp_path: Path, *extra: str) -> list[str]:
    return [*SMOKE, "--output-dir", str(tmp_path / "results"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line of a command's stderr (and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def a_dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------------------------------------
# 1. kill -9: the next start reconciles MLflow and the partial results folder


@pytest.mark.integration
def test_a_run_killed_with_sigkill_is_reconciled_by_the_next_run(tmp_path, mlflow_runs_of):
    from harness.config import config_from_args
    from harness.run import run

    command = [sys.executable, "-m", "harness.run", *run_args(tmp_path, "--methods", "lora", "--run-name", "faulty",
                                                              "--max-steps", "1000000")]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    staged = tmp_path / "results" / ".faulty.partial"
    try:
        deadline = time.time() + 300
        while not (staged / "faulty" / "samples" / "base.jsonl").exists() and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.1)
        assert (staged / "faulty" / "samples" / "base.jsonl").exists(), "the run never reached training"
        time.sleep(1.0)  # well into the (million-step) training
        assert not (tmp_path / "results" / "faulty").exists()  # nothing under the final name while it works
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    left = mlflow_runs_of(tmp_path).set_index("tags.mlflow.runName")
    assert left.loc["faulty", "status"] == "RUNNING" and left.loc["lora-seed0", "status"] == "RUNNING"
    assert left.loc["faulty", "tags.harness.pid"] == str(proc.pid)
    assert left.loc["faulty", "tags.harness.host"] == socket.gethostname()

    messages: list[str] = []
    cfg = config_from_args(run_args(tmp_path, "--methods", "lora", "--run-name", "faulty", "--max-steps", "1"))
    outcome = run(cfg, progress=False, log=lambda *a: messages.append(" ".join(map(str, a))))
    runs = mlflow_runs_of(tmp_path)
    old = runs[runs["tags.harness.pid"] == str(proc.pid)].set_index("tags.mlflow.runName")
    assert old["status"].to_dict() == {"faulty": "KILLED", "base": "FINISHED", "lora-seed0": "KILLED"}
    for name in ("faulty", "lora-seed0"):
        assert f"pid {proc.pid}" in old.loc[name, "tags.mlflow.note.content"] and "KILLED" in old.loc[name, "tags.error"]
    assert any("marked KILLED" in m for m in messages) and any(str(staged) in m for m in messages)
    assert not staged.exists()
    # the killed run's name stays taken: the new one is faulty-2, and results/ holds only finished runs
    assert outcome.run_dir.name == "faulty-2"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["faulty-2"]
    assert set(runs[runs["tags.mlflow.runName"] == "faulty-2"]["status"]) == {"FINISHED"}


@pytest.mark.integration
def test_an_interrupted_run_does_not_free_its_name(tmp_path, monkeypatch, mlflow_runs_of):
    import harness.train
    from harness.config import config_from_args
    from harness.run import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.train, "train", interrupted)
    cfg = config_from_args(run_args(tmp_path, "--methods", "lora", "--run-name", "faulty"))
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            run(cfg, progress=False, log=lambda *a: None)
    runs = mlflow_runs_of(tmp_path)
    parents = runs[runs["tags.kind"] == "benchmark"]
    assert sorted(parents["tags.mlflow.runName"]) == ["faulty", "faulty-2"]
    assert not list((tmp_path / "results").iterdir())


def test_run_names_are_reserved_and_published_whole(tmp_path):
    from harness import rundir

    first = rundir.reserve(tmp_path, "x")
    second = rundir.reserve(tmp_path, "x")  # the first still works under "x"
    third = rundir.reserve(tmp_path, "x", taken={"x-3"})  # an MLflow run already used x-3
    assert [s.final.name for s in (first, second, third)] == ["x", "x-2", "x-4"]
    assert first.path.name == "x" and not first.final.exists()
    (first.path / "summary.md").write_text("done")
    assert first.publish() == tmp_path / "x" and (tmp_path / "x" / "summary.md").read_text() == "done"
    assert not first.reservation.exists()
    second.discard()
    assert rundir.reserve(tmp_path, "x").final.name == "x-2"  # a discarded reservation frees the name


def test_partial_folders_of_dead_runs_are_removed_and_others_reported(tmp_path):
    from harness import rundir

    dead, alive, elsewhere = (rundir.reserve(tmp_path, n) for n in ("dead", "alive", "elsewhere"))
    owner = json.loads((dead.reservation / rundir.OWNER_FILE).read_text())
    (dead.reservation / rundir.OWNER_FILE).write_text(json.dumps({**owner, "harness.pid": str(a_dead_pid())}))
    (elsewhere.reservation / rundir.OWNER_FILE).write_text(json.dumps({**owner, "harness.host": "other-host"}))
    messages: list[str] = []
    assert rundir.clean_partials(tmp_path, log=messages.append) == [dead.reservation]
    assert not dead.reservation.exists() and alive.reservation.exists() and elsewhere.reservation.exists()
    assert any("other-host" in m for m in messages)


def test_a_dead_pid_or_a_reused_one_is_not_alive():
    from harness.tracking import process_alive, process_start

    me = os.getpid()
    assert process_alive(me, process_start(me))
    assert not process_alive(a_dead_pid())
    assert not process_alive(me, "1")  # same pid, another start time: the pid was reused
    assert process_alive(None)  # nothing recorded: nothing can be said


# ----------------------------------------------------------------------------------------------------------
# 2. a study rerun while a trial still runs elsewhere: wait, or say how long; reaped trials' runs FAILED


def _grid_study(tmp_path: Path) -> Path:
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump({"name": "mini", "kind": "grid", "seeds": [0, 1],
                                    "space": [{"method": "lora"}, {"method": "linchain", "n": [1, 2]}]}))
    return path


def _fake_run():
    """A stand-in for harness.run.run that returns a score at once (the study machinery is under test)."""
    from harness.report import SystemResult
    from harness.run import RunOutcome

    def fake(cfg, **kwargs):
        return RunOutcome(run_dir=None, base=None, results=[
            SystemResult(method=cfg.methods[0], seed=s, trainable_params=10, train_seconds=0.1,
                         scores={"task": 0.5}) for s in cfg.seeds])

    return fake


def _study_with_one_trial_running_elsewhere(tmp_path: Path, host: str, pid: int):
    """The mini study with every trial done but one, which a worker of ``host``/``pid`` claimed (heartbeat now),
    with its MLflow trial run and a nested run left RUNNING. Returns (plan, storage, url, trial number, run ids)."""
    import optuna

    from ablations import study as study_cli
    from ablations.storage import open_storage
    from ablations.trials import HEARTBEAT_ATTR, MLFLOW_RUN_ATTR, WORKER_ATTR, claim, work
    from harness.tracking import RunHandle, Tracker

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert study_cli.main([str(_grid_study(tmp_path)), "--storage", url, "--create-only", *run_args(tmp_path)]) == 0
    storage = open_storage(url, create=False)
    plan = study_cli.load_plan("mini", storage, url)
    assert work(plan, storage, max_trials=5, run_fn=_fake_run(), log=lambda *a: None) == 5
    study = optuna.load_study(study_name="mini", storage=storage)
    trial = claim(study, storage)
    storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, {"harness.host": host, "harness.pid": str(pid)})
    storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_ATTR, time.time())
    tracker = Tracker(plan.config.tracking_uri, plan.config.experiment)
    parent = RunHandle(tracker.client, plan.mlflow_parent_run_id, plan.name)
    trial_run = tracker.client.create_run(tracker.experiment_id, run_name=f"trial-{trial.number}",
                                          tags={"mlflow.parentRunId": parent.run_id}).info.run_id
    method_run = tracker.client.create_run(tracker.experiment_id, run_name="lora-seed1",
                                           tags={"mlflow.parentRunId": trial_run}).info.run_id
    trial.set_user_attr(MLFLOW_RUN_ATTR, trial_run)
    return plan, storage, url, trial.number, (trial_run, method_run)


@pytest.mark.integration
def test_study_rerun_inside_the_stale_window_waits_for_the_lost_trial_and_runs_it(tmp_path):
    import optuna
    from mlflow import MlflowClient

    from ablations.report import write_report
    from ablations.trials import work

    plan, storage, url, number, run_ids = _study_with_one_trial_running_elsewhere(tmp_path, "other-host", 1)
    messages: list[str] = []
    started = time.monotonic()
    assert work(plan, storage, stale_after=2.0, run_fn=_fake_run(), log=messages.append, wait=True, poll_s=0.2) == 1
    assert time.monotonic() - started >= 1.5  # it waited for the heartbeat to go stale, then took the trial over
    assert any("waiting for 1 trial(s) running in another worker" in m and f"trial {number}" in m for m in messages)
    trials = optuna.load_study(study_name="mini", storage=storage).get_trials()
    assert sorted(t.user_attrs["grid_index"] for t in trials if t.state.name == "COMPLETE") == list(range(6))
    assert "no heartbeat" in trials[number].user_attrs["fail_reason"]
    client = MlflowClient(tracking_uri=plan.config.tracking_uri)
    for run_id in run_ids:  # the reaped trial's runs end FAILED, not RUNNING under a FINISHED study
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and "worker lost" in run.data.tags["error"]
    assert "Missing points" not in (write_report(plan, storage) / "summary.md").read_text()


@pytest.mark.integration
def test_a_trial_whose_worker_died_on_this_host_is_reaped_at_once(tmp_path):
    import optuna

    from ablations.trials import fail_stale_trials

    plan, storage, _, number, _ = _study_with_one_trial_running_elsewhere(tmp_path, socket.gethostname(), a_dead_pid())
    study = optuna.load_study(study_name="mini", storage=storage)
    assert fail_stale_trials(study, storage, plan, stale_after=3600, log=lambda *a: None) == [number]
    assert "has ended" in study.trials[number].user_attrs["fail_reason"]


@pytest.mark.integration
def test_study_no_wait_says_how_long_and_does_not_exit_0_with_a_hole(tmp_path, capsys):
    from ablations import study as study_cli
    from ablations.report import report_dir

    plan, _, url, number, _ = _study_with_one_trial_running_elsewhere(tmp_path, "other-host", 1)
    capsys.readouterr()
    code = study_cli.main([str(_grid_study(tmp_path)), "--storage", url, "--no-wait", *run_args(tmp_path)])
    assert code == study_cli.EXIT_TRY_LATER
    line = one_error_line(capsys.readouterr().err)
    assert f"trial {number}" in line and re.search(r"in \d+ s at the latest", line), line
    summary = (report_dir(plan) / "summary.md").read_text()
    assert "Missing points** (1 of 6" in summary and "(running)" in summary


# ----------------------------------------------------------------------------------------------------------
# 3. two processes creating one new SQLite MLflow store


@pytest.mark.integration
def test_two_processes_creating_one_sqlite_store_both_succeed(tmp_path):
    script = ("import sys, time\nfrom harness.tracking import Tracker, check_tracking_uri\n"
              "uri, start = sys.argv[1], float(sys.argv[2])\n"
              "while time.time() < start: time.sleep(0.005)\n"
              "Tracker(check_tracking_uri(uri), 'race')\nprint('ok')\n")
    for attempt in range(2):  # without the lock, one of the two died in 3 of 3 tries here
        uri = f"sqlite:///{tmp_path / f'mlflow-{attempt}.db'}"
        start = str(time.time() + 8)  # both have imported mlflow by then and start together
        procs = [subprocess.Popen([sys.executable, "-c", script, uri, start], env=env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]


# ----------------------------------------------------------------------------------------------------------
# 4-6. every bad input is one line and exit 2, before any model work


def _bad_run(tmp_path, capsys, *extra: str) -> str:
    from harness import run as harness_run

    capsys.readouterr()
    assert harness_run.main(run_args(tmp_path, "--methods", "lora", *extra)) == 2
    return one_error_line(capsys.readouterr().err)


def test_unusable_output_dirs_are_one_line_before_any_work(tmp_path, capsys, mlflow_runs_of):
    (tmp_path / "a-file").write_text("not a folder")
    # root ignores permission bits, so these are refusals no mode can lift: a file, a path under a file, /sys
    for where, reason in ((tmp_path / "a-file", "is a file"), (tmp_path / "a-file" / "sub", "Not a directory"),
                          (Path("/sys/lora-harness-results"), "cannot write there")):
        line = _bad_run(tmp_path, capsys, "--output-dir", str(where))
        assert "--output-dir" in line and reason in line, line
    runs = mlflow_runs_of(tmp_path)
    assert len(runs) == 0  # refused before any MLflow run was opened


def _write_eval_dir(folder: Path, content: bytes) -> Path:
    (folder / "dataset" / "gsm8k").mkdir(parents=True)
    (folder / "dataset" / "gsm8k" / "test.json").write_bytes(content)
    return folder


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ('[{"instruction": "caf\xe9", "answer": "1"}]'.encode("latin-1"), "not UTF-8"),
    (b'[{"instruction": "q", "answer": "1"},\n oops]', "not valid JSON (Expecting value at line 2"),
    (b'[{"question": "q"}]', "lacks instruction"),
])
def test_bad_evaluation_data_is_one_line_before_any_run(tmp_path, capsys, mlflow_runs_of, content, message,
                                                        monkeypatch):
    monkeypatch.setenv("HARNESS_ALLOW_MODIFIED_DATA", "1")  # past the checksum, to the reader's own checks
    data = tmp_path / "data"
    if content is None:
        data.mkdir()
    else:
        _write_eval_dir(data, content)
    line = _bad_run(tmp_path, capsys, "--tasks", "llm_adapters_gsm8k", "--data-dir", str(data))
    assert message in line and "gsm8k" in line, line
    assert len(mlflow_runs_of(tmp_path)) == 0 and not list((tmp_path / "results").glob("*"))


def test_training_data_not_utf8_is_one_line_in_the_run_and_in_harness_data(tmp_path, capsys):
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))
    assert "not UTF-8" in _bad_run(tmp_path, capsys, "--train-data", str(latin))
    from harness.data.__main__ import main as data_main

    assert data_main([str(latin)]) == 2
    assert "byte 0xe9 at line 1" in one_error_line(capsys.readouterr().err)


def test_jsonl_errors_name_the_real_line(tmp_path):
    from harness.data.records import read_records

    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n{"instruction": oops}\n')
    with pytest.raises(UserError, match="at line 4, column 17"):
        read_records(path)


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--alpha", "inf"),
                                         ("--weight-decay", "nan"), ("--epochs", "inf")])
def test_non_finite_numbers_are_refused(flag, value):
    from harness.config import config_from_args

    with pytest.raises(UserError, match=f"{flag}: must be a finite number"):
        config_from_args([flag, value])


def test_long_inputs_are_quoted_short(tmp_path, capsys):
    from harness.errors import quote

    assert quote("lora") == "'lora'"
    assert len(quote("x" * 100_000)) < 260 and "100,002 characters" in quote("x" * 100_000)
    for spec in ("lora:" + "x" * 100_000, "lora," + "y" * 100_000):
        line = _bad_run(tmp_path, capsys, "--methods", spec)
        assert len(line) < 1000, len(line)


def test_study_options_are_checked_in_one_line(tmp_path, capsys, monkeypatch):
    from ablations import study as study_cli
    from ablations import worker

    monkeypatch.chdir(tmp_path)
    storage = ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    for argv, message in ((["--stale-after", "0"], "--stale-after: must be a positive"),
                          (["--stale-after", "-5"], "--stale-after: must be a positive"),
                          (["--max-trials", "0"], "--max-trials: must be at least 1"),
                          (["--n-trials", "0"], "--n-trials: must be at least 1"),
                          (["--run-name", "x"], "--run-name: a study names its runs itself")):
        capsys.readouterr()
        assert study_cli.main(["chain_length", *storage, *SMOKE, *argv]) == 2
        assert message in one_error_line(capsys.readouterr().err)
        if argv[0] in ("--stale-after", "--max-trials"):  # the worker's own options
            assert worker.main(["chain_length", *storage, *argv]) == 2
            assert message in one_error_line(capsys.readouterr().err)
    (tmp_path / "a-file").write_text("")
    capsys.readouterr()
    assert study_cli.main(["chain_length", *storage, *SMOKE, "--output-dir", str(tmp_path / "a-file")]) == 2
    assert "--output-dir" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "optuna.db").exists()  # refused before the study was created


@pytest.mark.integration
def test_worker_says_why_it_stops(tmp_path, capsys, monkeypatch):
    import harness.run
    from ablations import study as study_cli
    from ablations import worker

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert study_cli.main([str(_grid_study(tmp_path)), "--storage", url, "--create-only", *run_args(tmp_path)]) == 0
    monkeypatch.setattr(harness.run, "run", _fake_run())
    capsys.readouterr()
    assert worker.main(["mini", "--storage", url, "--max-trials", "1"]) == 0
    assert "ran 1 trial(s); stopped at --max-trials 1 with 5 trial(s) still queued" in capsys.readouterr().out
    assert worker.main(["mini", "--storage", url]) == 0
    assert "ran 5 trial(s); nothing left to claim" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# 7. messages: a second Ctrl-C during clean-up is one line


def test_a_second_ctrl_c_during_clean_up_is_one_line(capsys):
    from harness.errors import cli_entry

    @cli_entry
    def main(argv=None):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise KeyboardInterrupt  # pressed again while cleaning up

    assert main() == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "interrupted (Ctrl-C)" in err


def test_trial_results_are_printed_with_their_label_and_unit():
    from ablations.trials import describe_values

    assert describe_values(0.575) == "average accuracy 57.5%"
    assert describe_values((0.0, 24576)) == "average accuracy 0.0%, 24,576 trainable params"


# ----------------------------------------------------------------------------------------------------------
# 8. quiet by default


LIBRARY_LINES = ["`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model",
                 "fatal: not a git repository", "FutureWarning", "INFO mlflow"]
UNLABELLED_BAR = re.compile(r"(^|\r)\s*\d+%\|")  # tqdm without a description starts with the percentage


@pytest.mark.integration
def test_the_smoke_command_prints_none_of_the_libraries_lines(tmp_path):
    command = [sys.executable, "-m", "harness.run", "--model", "tiny-random", "--max-steps", "3", "--limit", "5",
               "--methods", "lora,linchain"]
    quiet = subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    for text in LIBRARY_LINES:
        assert text not in quiet.stderr, text
    assert not UNLABELLED_BAR.search(quiet.stderr), quiet.stderr[-2000:]
    assert "lora-seed0" in quiet.stderr  # our own progress bars stay
    # --verbose shows what the default hides (so the check above can see these lines when they come)
    verbose = subprocess.run([*command, "--verbose"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                             timeout=600)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert LIBRARY_LINES[0] in verbose.stderr and "lm-eval: building prompts" in verbose.stderr
