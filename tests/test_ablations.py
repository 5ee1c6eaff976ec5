"""Ablation studies: exact grids, study-file errors, the CLIs' one-line errors, the worker loop
(exactly once, resume after a killed worker, NaN trials, pruning, pareto), and end to end on
tiny-random with two worker processes on SQLite and on a throwaway PostgreSQL cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ablations.storage import open_storage, resolve_storage_url
from ablations.space import spec_of
from ablations.studyfile import builtin_studies, load_study_file, parse_study
from harness.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
# Every trial of the end-to-end tests: tiny-random, 2 steps, 3 test items of one task.
SMOKE = ["--model", "tiny-random", "--max-steps", "2", "--limit", "3", "--batch-size", "4",
         "--eval-batch-size", "8", "--tasks", "arithmetic_add_sub"]
MINI = {"name": "mini", "kind": "grid", "seeds": [0, 1],
        "space": [{"method": "lora"}, {"method": "linchain", "n": [1, 2]}]}


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def write_study(folder: Path, data: dict) -> Path:
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------------------------------------
# Study files and exact grids


def test_builtin_studies_enumerate_their_grids_exactly():
    assert set(builtin_studies()) >= {"chain_length", "rank", "init", "mtlora_structure", "lr", "pareto"}
    chain = load_study_file("chain_length")
    assert [spec_of(p) for p in chain.points] == ["lora"] + [f"linchain:n={n}" for n in range(1, 6)]
    # conditional space: the chain option exists only for the chain method
    assert all(("n" in p) == (p["method"] == "linchain") for p in chain.points)
    rank = load_study_file("rank")
    assert sorted((p["method"], p["r"]) for p in rank.points) == sorted(
        (m, r) for m in ("lora", "moslora", "linchain") for r in (4, 8, 16, 32))
    init = load_study_file("init")
    assert {(p["method"], p.get("init")) for p in init.points} == {("lora", None)} | {
        (m, i) for m in ("moslora", "linchain", "mtlora") for i in ("kaiming", "orthogonal", "identity")}
    structures = load_study_file("mtlora_structure")
    assert [p.get("structure") for p in structures.points] == [None, "shim", "icfm", "ctcm", "dtsm"]
    assert load_study_file("lr").kind == "tpe" and load_study_file("pareto").kind == "pareto"


def test_grid_queue_is_every_point_times_every_seed_once():
    from ablations.trials import StudyPlan
    from harness.config import RunConfig

    study = load_study_file("chain_length")
    plan = StudyPlan(name=study.name, kind=study.kind, config=RunConfig(), seeds=[0, 1, 2], points=study.points)
    queue = plan.queue(plan.name)
    assert len(queue) == 6 * 3
    assert len({yaml.safe_dump(params) for params, _ in queue}) == len(queue)
    assert [attrs["grid_index"] for _, attrs in queue] == list(range(len(queue)))


@pytest.mark.parametrize("change, key", [
    ({"spcae": []}, "spcae"),
    ({"kind": "random"}, "kind"),
    ({"run": {"max_stepz": 3}}, "run.max_stepz"),
    ({"run": {"methods": "lora"}}, "run.methods"),
    ({"run": {"max_steps": "many"}}, "max-steps"),
    ({"space": [{"method": "lora", "n": 2}]}, "space[0]"),
    ({"space": [{"n": 2}]}, "space[0]"),
    ({"space": [{"method": "lora"}, {"method": "lora"}]}, "space[1]"),
    ({"seeds": [0, 0]}, "seeds"),
    ({"n_trials": 5}, "n_trials"),
    ({"kind": "tpe"}, "lr"),
    ({"kind": "tpe", "lr": {"low": 1e-3, "high": 1e-2, "step": 2}}, "lr.step"),
    ({"plot": {"x": "depth"}}, "plot.x"),
])
def test_malformed_study_file_names_the_key(change, key):
    with pytest.raises(UserError) as err:
        parse_study({**MINI, **change}, source="study file 'x.yaml'")
    message = str(err.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize("change, bound", [
    ({"space": [{"method": "linchain", "n": list(range(1, 601))}]}, "more than the 300 points"),
    ({"space": [{"method": "lora", "r": list(range(1, 201))}, {"method": "linchain", "n": list(range(1, 201))}]},
     "more than the 300 points"),
    ({"seeds": list(range(10)), "space": [{"method": "linchain", "n": list(range(1, 201))}]},
     "2,000 trials is more than the 1000"),
    ({"kind": "tpe", "lr": {"low": 1e-4, "high": 1e-2}, "n_trials": 100000}, "300,000 trials is more than the 1000"),
])
def test_an_unbounded_study_file_is_one_line_naming_its_bound_at_once(change, bound):
    import time

    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        parse_study({**MINI, **change}, source="study file 'x.yaml'")
    assert time.perf_counter() - started < 5.0
    assert bound in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# Command lines: bad input is one line and a non-zero exit


def test_unknown_study_is_one_line_in_a_real_process(tmp_path):
    """A real process: the entry point and its one-line error (the other command-line checks call main here)."""
    done = subprocess.run([sys.executable, "-m", "ablations.study", "chain_lenght"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "unknown study 'chain_lenght'" in done.stderr
    assert "chain_length" in done.stderr  # lists the built-in ones


def one_line_error(capsys, main, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from ablations import study, worker

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINI, "name": "bad", "run": {"max_stepz": 3}}))
    assert "run.max_stepz" in one_line_error(capsys, study.main, [str(bad)])
    assert "--methods" in one_line_error(capsys, study.main, ["chain_length", "--methods", "lora"])
    # unreachable PostgreSQL (nothing listens on port 1) and an SQLite file in a missing folder
    assert "unreachable" in one_line_error(capsys, study.main, [
        "chain_length", "--storage", "postgresql+psycopg2://nobody@127.0.0.1:1/optuna", *SMOKE])
    assert "does not exist" in one_line_error(capsys, study.main, [
        "chain_length", "--storage", f"sqlite:///{tmp_path}/no/such/folder.db", *SMOKE])
    # a worker for a study that does not exist: no storage file at all, then a storage without that study
    assert "create the study first" in one_line_error(capsys, worker.main, [
        "chain_length", "--storage", f"sqlite:///{tmp_path}/missing.db"])
    import optuna

    url = f"sqlite:///{tmp_path}/other.db"
    optuna.create_study(study_name="something_else", storage=open_storage(resolve_storage_url(url), create=True))
    assert "no study 'chain_length'" in one_line_error(capsys, worker.main, ["chain_length", "--storage", url])
    assert not (tmp_path / "missing.db").exists()  # a worker never creates a storage


# ----------------------------------------------------------------------------------------------------------
# The worker loop with a stand-in for harness.run (fast): exactly once, resume, NaN, pruning, pareto


class FakeRun:
    """Stands in for harness.run.run: records each call; scores from the spec; NaN for chosen specs."""

    def __init__(self, nan_specs=(), intermediate=None):
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.nan_specs = set(nan_specs)
        self.intermediate = intermediate

    def __call__(self, cfg, *, parent, tracker, write_results, evaluate_base, progress, log,
                 intermediate_every=None, on_intermediate=None):
        from harness.report import SystemResult
        from harness.run import RunOutcome

        assert parent is not None and write_results is False and evaluate_base is False
        spec = cfg.methods[0]
        self.calls.append((spec, tuple(cfg.seeds)))
        if on_intermediate is not None:
            for step in range(intermediate_every, cfg.max_steps + 1, intermediate_every):
                on_intermediate(spec, cfg.seeds[0], step, self.intermediate(cfg, step))
        results = []
        for seed in cfg.seeds:
            result = SystemResult(method=spec, seed=seed, trainable_params=100 * len(spec), train_seconds=0.1)
            if spec in self.nan_specs:
                result.error = "non-finite loss (nan) at step 2"
            else:
                result.scores = {"task": (len(spec) % 7) / 10 + seed / 100}
            results.append(result)
        return RunOutcome(run_dir=Path("."), base=None, results=results, fingerprint=FAKE_FINGERPRINT)


# what harness.run hands a trial: the configuration's parts and the checksums of what it read
FAKE_FINGERPRINT = {"hash": "0123456789ab", "parts": {"base_weights": "w" * 64, "train_data_sha256": "t" * 64,
                                                      "eval_data_sha256": {"task": "e" * 64}, "cutoff_len": 256}}


def make_plan(tmp_path, data, storage_url=None, **overrides):
    from ablations.study import create_or_resume, resolve_plan

    study = parse_study(data, source="test", default_name=data["name"])
    typed = {"model": "tiny-random", "output_dir": str(tmp_path / "results"),
             "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **overrides}
    plan = resolve_plan(study, typed, None, None)
    url = resolve_storage_url(storage_url or f"sqlite:///{tmp_path / 'optuna.db'}")
    storage = open_storage(url, create=True)
    return create_or_resume(plan, storage, url, log=lambda *a: None), storage, url


def states_by_index(storage, name):
    import optuna

    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    found: dict[int, list[str]] = {}
    for t in trials:
        found.setdefault(t.user_attrs["grid_index"], []).append(t.state.name)
    return found, trials


@pytest.mark.integration
def test_nan_trial_fails_with_its_reason_and_the_study_goes_on(tmp_path):
    from ablations.report import write_report
    from ablations.trials import work

    plan, storage, _ = make_plan(tmp_path, MINI)
    fake = FakeRun(nan_specs={"linchain:n=1"})
    assert work(plan, storage, run_fn=fake, log=lambda *a: None) == 6
    found, trials = states_by_index(storage, "mini")
    assert sorted(found) == list(range(6)) and all(len(v) == 1 for v in found.values())
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert [t.user_attrs["spec"] for t in failed] == ["linchain:n=1", "linchain:n=1"]
    assert all("non-finite loss" in t.user_attrs["fail_reason"] for t in failed)
    assert sum(t.state.name == "COMPLETE" for t in trials) == 4
    folder = write_report(plan, storage)
    summary = (folder / "summary.md").read_text()
    assert "non-finite loss" in summary and "`linchain:n=2`" in summary
    import pandas as pd

    table = pd.read_csv(folder / "trials.csv")
    assert len(table) == 6 and set(table["state"]) == {"COMPLETE", "FAIL"}
    # each finished trial says in the table what ran it: the commit, the machine in one line, the protocol
    from ablations.trials import worker_provenance
    from harness.tracking import machine_label

    done = table[table["state"] == "COMPLETE"]
    made = worker_provenance()
    assert (done["commit"] == made["commit"]).all() and (done["protocol"] == "0123456789ab").all()
    assert (done["machine"] == machine_label(made["machine"])).all()


def test_a_grid_summary_warns_of_its_shared_rate_and_says_what_varies(tmp_path):
    from ablations.report import write_report
    from ablations.trials import work

    ranks = {"name": "ranks", "kind": "grid", "seeds": [0], "space": [{"method": "lora", "r": [4, 8]}]}
    plan, storage, _ = make_plan(tmp_path, ranks, max_steps=None, epochs=2.0, lr=3e-3)
    work(plan, storage, run_fn=FakeRun(), log=lambda *a: None)
    summary = (write_report(plan, storage) / "summary.md").read_text()
    header = next(line for line in summary.splitlines() if line.startswith("- **training**"))
    # the rank varies over the points: no single 'rank 16'; training by epochs says so (not '2.0 epoch(s) steps')
    assert "2 epoch(s), batch" in header and "rank per configuration" in header and "lr 0.003" in header
    assert "steps" not in header
    assert "**Not a fair comparison.** Every configuration trained at the same learning rate (0.003)" in summary
    assert "scored on the test split" in summary and "--tune-lr" in summary
    (tmp_path / "b").mkdir()
    steps, steps_storage, _ = make_plan(tmp_path / "b", MINI, max_steps=7)
    assert "7 steps, batch" in (write_report(steps, steps_storage) / "summary.md").read_text()


@pytest.mark.integration
def test_journal_storage_runs_the_grid_and_a_worker_joins_it(tmp_path):
    from ablations.study import load_plan
    from ablations.trials import work

    plan, storage, url = make_plan(tmp_path, MINI, storage_url=f"journal:{tmp_path / 'optuna-journal.log'}")
    joined = load_plan("mini", open_storage(url, create=False), url)  # what a worker sees
    assert joined.points == plan.points and joined.mlflow_parent_run_id == plan.mlflow_parent_run_id
    assert work(joined, storage, run_fn=FakeRun(), log=lambda *a: None) == 6
    found, trials = states_by_index(storage, "mini")
    assert found == {k: ["COMPLETE"] for k in range(6)}
    # every finished trial says what trained it, so a repeat that differs can be traced
    from harness.tracking import library_versions, machine

    for t in trials:
        made = t.user_attrs["provenance"]
        assert made["versions"] == library_versions() and made["machine"] == machine() and made["commit"]
        parts = FAKE_FINGERPRINT["parts"]  # the inputs' checksums; the configuration is the study's, stored once
        assert made["protocol"] == {"hash": "0123456789ab", "base_weights": parts["base_weights"],
                                    "train_data_sha256": parts["train_data_sha256"],
                                    "eval_data_sha256": parts["eval_data_sha256"]}


@pytest.mark.integration
def test_trials_record_the_commit_the_worker_loaded_not_one_made_while_it_runs(tmp_path, monkeypatch):
    import harness.tracking
    from ablations.trials import work, worker_provenance

    heads = iter(["a" * 40] + ["b" * 40] * 20)  # HEAD moves after the worker started: someone committed
    monkeypatch.setattr(harness.tracking, "git_commit", lambda folder=None: next(heads))
    harness.tracking.loaded_commit.cache_clear()
    worker_provenance.cache_clear()
    try:
        plan, storage, _ = make_plan(tmp_path, MINI)
        assert work(plan, storage, run_fn=FakeRun(), log=lambda *a: None) == 6
        _, trials = states_by_index(storage, "mini")
        assert [t.user_attrs["provenance"]["commit"] for t in trials] == ["a" * 40] * 6
    finally:  # the next test reads this process's own commit again
        harness.tracking.loaded_commit.cache_clear()
        worker_provenance.cache_clear()


@pytest.mark.integration
def test_resume_retries_killed_trials_and_never_reruns_finished_ones(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from ablations.study import create_or_resume
    from ablations.trials import claim, work

    plan, storage, url = make_plan(tmp_path, MINI)
    fake = FakeRun()
    assert work(plan, storage, max_trials=2, run_fn=fake, log=lambda *a: None) == 2
    # a worker that dies mid-trial: the trial stays RUNNING and its heartbeat stops
    study = optuna.load_study(study_name="mini", storage=storage)
    dead = claim(study, storage)
    assert dead is not None and study.trials[dead.number].state == TrialState.RUNNING
    time.sleep(1.1)
    # running the same command again: the dead trial is FAILED and queued again, the rest continues
    plan2, storage2, _ = make_plan(tmp_path, MINI)
    assert plan2.mlflow_parent_run_id == plan.mlflow_parent_run_id
    create_or_resume(plan2, storage2, url, stale_after=1.0, log=lambda *a: None)
    assert work(plan2, storage2, run_fn=fake, log=lambda *a: None) == 4
    found, trials = states_by_index(storage2, "mini")
    assert all(v.count("COMPLETE") == 1 for v in found.values()) and len(found) == 6
    killed = trials[dead.number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["killed"]
    assert "no heartbeat" in killed.user_attrs["fail_reason"]
    assert any(t.user_attrs.get("retry_of") == dead.number and t.state == TrialState.COMPLETE for t in trials)
    # every configuration ran exactly once across both sessions: the two finished first were not run again
    assert len(fake.calls) == 6 and len(set(fake.calls)) == 6
    # a third run finds nothing to do; changed settings are refused in one line
    create_or_resume(plan2, storage2, url, log=lambda *a: None)
    assert work(plan2, storage2, run_fn=fake, log=lambda *a: None) == 0
    with pytest.raises(UserError, match="max-steps"):
        make_plan(tmp_path, MINI, max_steps=7)


def test_a_journal_copied_to_another_machine_resumes_there_under_a_new_parent_run(tmp_path):
    """The journal is the study: a new MLflow store and results folder elsewhere must not block resuming it."""
    import shutil

    import mlflow

    from ablations.study import create_or_resume, resolve_plan
    from ablations.trials import work

    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    plan, storage, _ = make_plan(here, MINI, storage_url=f"journal:{here / 'journal.log'}")
    fake = FakeRun()
    assert work(plan, storage, max_trials=2, run_fn=fake, log=lambda *a: None) == 2
    shutil.copy(here / "journal.log", there / "journal.log")  # what a git clone on another machine holds
    study = parse_study(MINI, source="test", default_name="mini")
    typed = {"model": "tiny-random", "output_dir": str(there / "results"),
             "tracking_uri": f"sqlite:///{there / 'mlflow.db'}"}
    url = resolve_storage_url(f"journal:{there / 'journal.log'}")
    lines: list[str] = []
    moved = create_or_resume(resolve_plan(study, typed, None, None), open_storage(url, create=True), url,
                             log=lines.append)
    assert moved.mlflow_parent_run_id and moved.mlflow_parent_run_id != plan.mlflow_parent_run_id
    assert any("parent run is not in" in line for line in lines)
    assert work(moved, open_storage(url, create=False), run_fn=fake, log=lambda *a: None) == 4
    found, _ = states_by_index(open_storage(url, create=False), "mini")
    assert found == {k: ["COMPLETE"] for k in range(6)}  # the two finished here were not run again there
    client = mlflow.MlflowClient(f"sqlite:///{there / 'mlflow.db'}")
    assert client.get_run(moved.mlflow_parent_run_id).info.run_name == "study-mini"


@pytest.mark.integration
def test_two_processes_claim_every_queued_trial_exactly_once(tmp_path):
    """The claim itself, stressed: 2 processes race for 120 queued trials on one SQLite file."""
    import optuna

    url = resolve_storage_url(f"sqlite:///{tmp_path / 'race.db'}")
    study = optuna.create_study(study_name="race", storage=open_storage(url, create=True))
    for i in range(120):
        study.enqueue_trial({"x": i})
    # A start barrier (each process waits until both have loaded the study) and a short pause per
    # trial make both processes race for the queue; without them, on a loaded machine one process
    # could drain all 120 trials before the other had finished importing optuna.
    script = ("import pathlib, sys, time, optuna\n"
              "from ablations.storage import open_storage\nfrom ablations.trials import claim\n"
              "storage = open_storage(sys.argv[1], create=False)\n"
              "study = optuna.load_study(study_name='race', storage=storage)\n"
              "gate = pathlib.Path(sys.argv[2]); (gate / sys.argv[3]).touch()\n"
              "deadline = time.monotonic() + 120\n"
              "while len(list(gate.iterdir())) < 2 and time.monotonic() < deadline:\n"
              "    time.sleep(0.05)\n"
              "while (t := claim(study, storage)) is not None:\n"
              "    study.tell(t, 0.0); print(t.number, flush=True); time.sleep(0.01)\n")
    gate = tmp_path / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, url, str(gate), f"p{i}"], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    numbers = [int(n) for out, _ in outs for n in out.split()]
    assert sorted(numbers) == list(range(120))  # each trial claimed once, none lost
    assert all(out.split() for out, _ in outs)  # both processes took part


@pytest.mark.integration
def test_tuning_study_prunes_on_intermediate_scores_and_keeps_its_budget(tmp_path):
    import optuna

    from ablations.report import write_report
    from ablations.trials import work

    data = {"name": "tune", "kind": "tpe", "seeds": [0], "space": [{"method": "lora"}, {"method": "moslora"}],
            "n_trials": 6, "lr": {"low": 1e-4, "high": 1e-1, "log": True}, "intermediate_every": 1,
            "pruner": {"n_startup_trials": 2, "n_warmup_steps": 0}}
    # intermediate score falls with the learning rate: later trials with a higher lr get pruned
    fake = FakeRun(intermediate=lambda cfg, step: 1.0 - cfg.lr * 10)
    plan, storage, _ = make_plan(tmp_path, data, max_steps=3)
    assert plan.optuna_names() == ["tune/lora", "tune/moslora"]
    work(plan, storage, run_fn=fake, log=lambda *a: None)
    for name in plan.optuna_names():
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        assert len(trials) == 6 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        assert all(1e-4 <= t.params["lr"] <= 1e-1 for t in trials)
    states = Counter(t.state.name for n in plan.optuna_names()
                     for t in optuna.load_study(study_name=n, storage=storage).get_trials())
    assert states["PRUNED"] >= 1, states
    folder = write_report(plan, storage)
    assert (folder / "lr_search.png").is_file() and "best lr" in (folder / "summary.md").read_text()
    assert (folder / "param_importances.png").is_file()  # lr varies in every method's study


@pytest.mark.integration
def test_pareto_study_has_two_objectives_and_a_front(tmp_path):
    import optuna

    from ablations.report import write_report
    from ablations.trials import work

    data = {"name": "front", "kind": "pareto", "seeds": [0],
            "space": [{"method": ["lora", "moslora"], "r": [4, 8]}]}
    plan, storage, _ = make_plan(tmp_path, data)
    assert work(plan, storage, run_fn=FakeRun(), log=lambda *a: None) == 4
    study = optuna.load_study(study_name="front", storage=storage)
    assert all(len(t.values) == 2 for t in study.trials) and study.best_trials
    folder = write_report(plan, storage)
    assert (folder / "pareto_front.png").is_file() and "Pareto front" in (folder / "summary.md").read_text()


# ----------------------------------------------------------------------------------------------------------
# End to end on tiny-random: real trials (train, lm-eval, MLflow) in two worker processes


def run_two_workers(tmp_path: Path, storage_url: str) -> list[subprocess.CompletedProcess]:
    """Create the study once (in this process), then start two worker processes on it at the same time;
    return their results."""
    from ablations import study as study_cli

    study_file = write_study(tmp_path, MINI)
    assert study_cli.main([str(study_file), "--storage", storage_url, "--create-only", *SMOKE,
                           "--output-dir", str(tmp_path / "results"),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    procs = [subprocess.Popen([sys.executable, "-m", "ablations.worker", "mini", "--storage", storage_url],
                              cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def check_every_point_ran_once(tmp_path: Path, storage_url: str, workers) -> None:
    import optuna

    storage = open_storage(resolve_storage_url(storage_url), create=False)
    trials = optuna.load_study(study_name="mini", storage=storage).get_trials()
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(t.user_attrs["grid_index"] for t in trials) == list(range(6))
    ran = [int(w.stdout.split("ran ")[1].split()[0]) for w in workers]
    assert sum(ran) == 6, [w.stdout for w in workers]
    # MLflow: one parent run for the study, one nested run per trial with its number and parameters
    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "study-mini"]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.params["trial_number"]) for r in nested) == sorted(t.number for t in trials)
    assert all(r.info.status == "FINISHED" and 0 <= r.data.metrics["average_accuracy"] <= 1 for r in nested)
    assert {r.data.params["spec"] for r in nested} == {"lora", "linchain:n=1", "linchain:n=2"}
    # the training runs themselves sit under their trial
    trial_ids = {r.info.run_id for r in nested}
    assert sum(r.data.tags.get("mlflow.parentRunId") in trial_ids for r in runs) == 6


def mlflow_runs(tmp_path: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


@pytest.mark.integration
def test_two_workers_on_sqlite_run_every_grid_point_once_and_report(tmp_path, monkeypatch):
    from ablations import study as study_cli

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    workers = run_two_workers(tmp_path, url)
    check_every_point_ran_once(tmp_path, url, workers)
    assert study_cli.main(["mini", "--storage", url, "--report-only"]) == 0
    folder = tmp_path / "results" / "ablations" / "mini"
    for name in ("trials.csv", "summary.md", "score_vs_n.png"):
        assert (folder / name).is_file(), name
    import pandas as pd

    table = pd.read_csv(folder / "trials.csv")
    assert sorted(zip(table["spec"], table["seed"])) == sorted(
        (s, seed) for s in ("lora", "linchain:n=1", "linchain:n=2") for seed in (0, 1))
    (parent,) = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("mlflow.runName") == "study-mini"]
    assert parent.info.status == "FINISHED"


def signal_mid_trial(tmp_path, signum, data=MINI, extra=(), watch=None):
    """Start a study (MINI unless ``data``) in a worker; once a trial has finished and another runs, send ``signum``.

    ``extra`` are more command-line options; ``watch`` is the Optuna study to watch (default: the
    study's name). Returns the study command, the trial that was running and the ended worker process.
    """
    import optuna

    from ablations.storage import open_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study_file = write_study(tmp_path, data)
    command = [sys.executable, "-m", "ablations.study", str(study_file), "--storage", url, *SMOKE, *extra,
               "--output-dir", str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    log = tmp_path / "first_worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 600  # a loaded machine is slow; a worker that ends early stops the wait at once
    victim, states, storage, last_error = None, Counter(), None, None
    try:
        while time.time() < deadline and victim is None and proc.poll() is None:
            time.sleep(0.2)
            try:  # read the way workers do: without creating anything, waiting for the write lock
                storage = storage or open_storage(url, create=False)
                trials = optuna.load_study(study_name=watch or data["name"], storage=storage).get_trials()
            except Exception as err:  # noqa: BLE001 (the study is still being created)
                last_error = err
                continue
            states = Counter(t.state.name for t in trials)
            if states["COMPLETE"] >= 1 and states["RUNNING"] == 1:
                victim = next(t for t in trials if t.state.name == "RUNNING")
                proc.send_signal(signum)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert victim is not None, (f"never saw a finished and a running trial (last states {dict(states)}, "
                                f"last read error {last_error!r}); worker exit {proc.returncode}, log:\n"
                                + log.read_text()[-3000:])
    return command, victim, proc


@pytest.mark.integration
def test_sigterm_fails_the_running_trial_and_queues_it_again(tmp_path):
    import optuna

    _, victim, proc = signal_mid_trial(tmp_path, signal.SIGTERM)
    assert proc.returncode == 143, (tmp_path / "first_worker.log").read_text()[-3000:]
    trials = optuna.load_study(study_name="mini", storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials()
    lost = trials[victim.number]
    assert lost.state.name == "FAIL" and lost.user_attrs.get("killed")
    assert "SIGTERM" in lost.user_attrs["fail_reason"]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert [t.state.name for t in retry] == ["WAITING"]
    assert retry[0].user_attrs["grid_index"] == lost.user_attrs["grid_index"]


@pytest.mark.integration
def test_a_worker_killed_mid_trial_loses_only_that_trial(tmp_path, monkeypatch):
    import optuna

    from ablations import study as study_cli

    command, victim, _ = signal_mid_trial(tmp_path, signal.SIGKILL)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    finished_before = {t.number for t in optuna.load_study(study_name="mini", storage=url).get_trials()
                       if t.state.name == "COMPLETE"}
    monkeypatch.chdir(tmp_path)
    assert command[1:3] == ["-m", "ablations.study"]
    assert study_cli.main([*command[3:], "--stale-after", "1"]) == 0  # the same command again, in this process
    trials = optuna.load_study(study_name="mini", storage=url).get_trials()
    by_index = Counter(t.user_attrs["grid_index"] for t in trials if t.state.name == "COMPLETE")
    assert by_index == Counter(range(6))  # every point and seed finished exactly once
    lost = trials[victim.number]
    assert lost.state.name == "FAIL" and lost.user_attrs.get("killed")
    assert [t.state.name for t in trials if t.state.name == "FAIL"] == ["FAIL"]  # only that trial was lost
    assert finished_before <= {t.number for t in trials if t.state.name == "COMPLETE"}


# ----------------------------------------------------------------------------------------------------------
# PostgreSQL: a throwaway cluster, created and removed by the test


def _unprivileged_user() -> list[str] | None:
    """How to run a command as an unprivileged user (PostgreSQL refuses root), or None if impossible."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--"]
    return None


@pytest.fixture
def postgres_url():
    prefix = _unprivileged_user()
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN}")
    if prefix is None:
        pytest.skip("running as root without runuser: PostgreSQL needs an unprivileged user")
    folder = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    os.chmod(folder, 0o755)
    data = folder / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(data, "nobody")
        shutil.chown(folder, "nobody")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run([*prefix, str(PG_BIN / "initdb"), "-D", str(data), "--auth=trust", "-U", "harness",
                        "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w",
                        "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120)
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="harness", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE optuna")
        conn.close()
        yield f"postgresql+psycopg2://harness@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.integration
def test_two_workers_on_postgresql_run_every_grid_point_once(tmp_path, postgres_url, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workers = run_two_workers(tmp_path, postgres_url)
    check_every_point_ran_once(tmp_path, postgres_url, workers)


# ----------------------------------------------------------------------------------------------------------
# Several study commands creating one fresh storage at once


def test_opening_a_fresh_storage_again_after_losing_the_schema_race():
    from ablations.storage import create_with_retry

    calls = []

    def make():
        calls.append(1)
        if len(calls) == 1:  # what SQLAlchemy raises when the other process created the table first
            raise RuntimeError("(sqlite3.OperationalError) table studies already exists")
        return "storage"

    assert create_with_retry(make, pause_s=0.01) == "storage" and len(calls) == 2

    def fails(message):
        def make():
            calls.append(1)
            raise RuntimeError(message)
        return make

    calls.clear()
    with pytest.raises(RuntimeError, match="unable to open"):
        create_with_retry(fails("unable to open database file"), pause_s=0.01)
    assert len(calls) == 1  # not a race: no retry
    calls.clear()
    with pytest.raises(RuntimeError, match="already exists"):
        create_with_retry(fails("table studies already exists"), attempts=3, pause_s=0.01)
    assert len(calls) == 3  # a race that does not end: given up after the attempts


def test_two_creations_of_one_study_at_once_make_one_study_and_one_mlflow_run(tmp_path, monkeypatch):
    """The loser of the creation race continues the study once the winner has written its plan, and
    creates no MLflow run and queues nothing of its own."""
    import threading

    import mlflow
    import optuna

    from ablations import study as study_cli
    from ablations.study import create_or_resume, resolve_plan
    from ablations.studyfile import parse_study

    url = resolve_storage_url(f"sqlite:///{tmp_path / 'optuna.db'}")
    typed = {"model": "tiny-random", "max_steps": 2, "output_dir": str(tmp_path / "results"),
             "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    open_storage(url, create=True)
    real_claim = study_cli._claim_creation

    def slow_claim(*args):  # the winner is still creating when the other command arrives
        won = real_claim(*args)
        if won:
            time.sleep(1.0)
        return won

    import time

    monkeypatch.setattr(study_cli, "_claim_creation", slow_claim)
    lines, plans = [], []

    def command():
        plan = resolve_plan(parse_study(MINI, source="test", default_name="mini"), dict(typed), None, None)
        plans.append(create_or_resume(plan, open_storage(url, create=True), url, log=lines.append))

    threads = [threading.Thread(target=command) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(plans) == 2 and plans[0].mlflow_parent_run_id == plans[1].mlflow_parent_run_id
    assert sum("created in" in line for line in lines) == 1 and sum("continuing in" in line for line in lines) == 1
    storage = open_storage(url, create=False)
    for name in plans[0].optuna_names():  # queued once
        assert len(optuna.load_study(study_name=name, storage=storage).get_trials()) == len(plans[0].queue(name))
    client = mlflow.tracking.MlflowClient(typed["tracking_uri"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("kind") == "study"]
    assert len(runs) == 1


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_study_commands_creating_one_fresh_storage_at_once_both_succeed(tmp_path, kind):
    import mlflow

    study_file = write_study(tmp_path, MINI)
    url = f"sqlite:///{tmp_path / 'fresh.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'fresh.log'}"
    argv = [sys.executable, "-m", "ablations.study", str(study_file), "--storage", url, "--create-only", *SMOKE,
            "--output-dir", str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
        assert "study 'mini' ready" in out
    assert sorted("created in" in out for out, _ in outs) == [False, True]  # one created it, one continued it
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("kind") == "study"]
    assert len(runs) == 1  # no orphan study run
