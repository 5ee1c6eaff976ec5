"""Faults found by the second adversarial probe (harness side): each is one ``error:`` line, exit 2,
before any model work where the input can be checked then, with nothing half-written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from harness.errors import UserError
from tests.test_faults import one_error_line, run_args


def _copy_data_dir(source: Path, target: Path, *relatives: str) -> Path:
    for relative in relatives:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, target / relative)
    return target


# 1. a corrupted local benchmark file is refused, not scored
def test_a_modified_local_benchmark_file_is_refused_before_any_run(tmp_path, data_dir, capsys, mlflow_runs_of,
                                                                    monkeypatch):
    from harness import run as harness_run

    relative = "dataset/AddSub/test.json"
    data = _copy_data_dir(data_dir, tmp_path / "data", relative)
    records = json.loads((data / relative).read_text())
    for record in records:
        record["answer"] = "0"  # what the probe did: every answer set to 0
    (data / relative).write_text(json.dumps(records))
    actual = hashlib.sha256((data / relative).read_bytes()).hexdigest()
    original = hashlib.sha256((data_dir / relative).read_bytes()).hexdigest()

    capsys.readouterr()
    code = harness_run.main(run_args(tmp_path, "--methods", "lora", "--tasks", "llm_adapters_addsub",
                                             "--data-dir", str(data)))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert str(data / relative) in line and actual in line and original in line, line
    assert "HARNESS_ALLOW_MODIFIED_DATA=1" in line
    assert len(mlflow_runs_of(tmp_path)) == 0 and not list((tmp_path / "results").glob("*"))

    # the override is what the message says it is: the modified copy is then read
    from harness.data.files import data_file
    monkeypatch.setenv("HARNESS_ALLOW_MODIFIED_DATA", "1")
    assert data_file(relative, data) == data / relative


# 2. harness.compare on a damaged result.json: one line naming the file
def _damaged(content: dict, how: str) -> str:
    if how == "bare number":
        return "42\n"
    if how == "truncated":
        return json.dumps(content)[:-40]
    if how == "null fingerprint":
        content["fingerprint"] = None
    elif how == "string for a mapping":
        content["systems"][0]["scores"] = "arithmetic_add_sub: 0.5"
    elif how == "bad python literal":
        content["systems"][0]["contaminated"] = "{'arithmetic_add_sub'"  # a set's repr, cut short
    return json.dumps(content)


@pytest.mark.parametrize("how", ["bare number", "truncated", "null fingerprint", "string for a mapping",
                                 "bad python literal"])
def test_compare_on_a_damaged_result_json_is_one_line_naming_the_file(tmp_path, capsys, how):
    from harness import compare as hcompare
    from tests.test_compare import FP, _content
    from harness.resultfile import write_result_json

    for name in ("good", "bad"):
        (tmp_path / name).mkdir()
        write_result_json(tmp_path / name, _content(name, FP))
    bad = tmp_path / "bad" / "result.json"
    bad.write_text(_damaged(json.loads(bad.read_text()), how))
    capsys.readouterr()
    assert hcompare.main([str(tmp_path / "good"), str(tmp_path / "bad")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "bad") in line, line


# 3. harness.compare with a run id and a tracking server nobody answers: seconds, one line
def test_compare_with_an_unreachable_tracking_server_fails_fast(tmp_path, capsys):
    import time

    from harness import compare as hcompare
    from tests.test_compare import FP, _content
    from harness.resultfile import write_result_json

    (tmp_path / "good").mkdir()
    write_result_json(tmp_path / "good", _content("good", FP))
    capsys.readouterr()
    started = time.monotonic()
    code = hcompare.main([str(tmp_path / "good"), "0123456789abcdef", "--tracking-uri", "http://127.0.0.1:9"])
    elapsed = time.monotonic() - started
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and elapsed < 15, elapsed
    assert "http://127.0.0.1:9" in line and "unreachable" in line, line


# 4. training data with nothing left to train on: refused before the model loads
@pytest.mark.parametrize("record", [{"instruction": "What is 2 + 2?", "output": "4", "answer": "4"},
                                    {"instruction": "", "output": "4", "answer": "4"}])
def test_training_data_of_duplicates_or_empty_instructions_is_refused_before_the_model(tmp_path, capsys,
                                                                                       mlflow_runs_of, monkeypatch,
                                                                                       record):
    from harness import models
    from harness import run as harness_run

    training = tmp_path / "train.json"
    training.write_text(json.dumps([record] * 50))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_model, raising=False)
    capsys.readouterr()
    assert harness_run.main(run_args(tmp_path, "--methods", "lora", "--train-data", str(training))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(training) in line and "no training examples" in line and "distinct" in line, line
    assert len(mlflow_runs_of(tmp_path)) == 0 and not list((tmp_path / "results").glob("*"))


# 5. one SQLite file for the Optuna storage and the MLflow store: refused, nothing created
def test_one_sqlite_file_for_both_stores_is_refused(tmp_path, capsys, monkeypatch):
    from ablations import study
    from tests.test_ablations import SMOKE

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = study.main(["chain_length", "--storage", "sqlite:///x.db", "--tracking-uri", f"sqlite:///{tmp_path}/x.db",
                       *SMOKE])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and str(tmp_path / "x.db") in line and "two files" in line, line
    assert not (tmp_path / "x.db").exists()


# 6. pickled weights (.bin) for a model or an adapter: one line, exit 2
def test_pickled_model_or_adapter_weights_are_one_line(tmp_path, capsys):
    import pickle

    from harness import run as harness_run
    from harness.adapters.api import load_adapter_model
    from harness.errors import UserError

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": [1.0]}))
    capsys.readouterr()
    assert harness_run.main(run_args(tmp_path, "--methods", "lora", "--model", str(model))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(model) in line and "pytorch_model.bin" in line and "safetensors" in line, line

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"weight": [1.0]}))
    with pytest.raises(UserError) as caught:
        load_adapter_model(None, adapter)
    assert "adapter_model.bin" in str(caught.value) and "\n" not in str(caught.value)


# 7. a full disk midway: one line that stops the run and says what was kept where
def test_a_full_disk_midway_stops_the_run_in_one_line_and_keeps_the_finished_methods(tmp_path, capsys,
                                                                                     mlflow_runs_of, monkeypatch):
    import errno

    from harness import rundir, tracking
    from harness import run as harness_run

    real_log_evaluation = tracking.log_evaluation
    writes = []

    def disk_fills_on_the_second_method(handle, evaluation, samples_path):
        writes.append(samples_path)
        if "moslora" in Path(samples_path).name:  # the base's and lora's samples are on disk; no space for moslora
            raise OSError(errno.ENOSPC, "No space left on device", str(samples_path))
        return real_log_evaluation(handle, evaluation, samples_path)

    monkeypatch.setattr(tracking, "log_evaluation", disk_fills_on_the_second_method)
    capsys.readouterr()
    code = harness_run.main(run_args(tmp_path, "--methods", "lora,moslora", "--run-name", "full"))
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert code == 2
    assert "disk is full" in line and str(writes[-1]) in line and "lora-seed0" in line, line
    assert ": FAILED" not in err and "going on" not in err  # not counted as a method failure

    results = tmp_path / "results"
    assert not (results / "full").exists()  # nothing published as if complete
    kept = results / f".full{rundir.PARTIAL_SUFFIX}"
    assert str(kept / "full") in line
    assert (kept / "full" / "samples" / "lora-seed0.jsonl").is_file()
    note = (kept / rundir.KEPT_FILE).read_text()
    assert "lora-seed0" in note and "moslora" not in note.split("Finished")[1]
    # no MLflow run is left RUNNING
    runs = mlflow_runs_of(tmp_path)
    assert len(runs) and "RUNNING" not in set(runs["status"])

    # a later run in the same folder leaves the kept folder alone, and says so
    monkeypatch.setattr(tracking, "log_evaluation", real_log_evaluation)
    notes = []
    rundir.clean_partials(results, log=notes.append)
    assert kept.is_dir() and any(str(kept) in n and "left alone" in n for n in notes), notes


def _can_mount_tmpfs() -> bool:
    import subprocess

    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


# 7b. the same on real full file systems (a 1 MB tmpfs in a private mount namespace): the results folder
# full from the start, and the MLflow store filling up during the run (its SQLite file alone is ~0.9 MB)
@pytest.mark.integration
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and tmpfs mounts in a user namespace")
@pytest.mark.parametrize("full_part", ["results", "tracking store"])
def test_a_really_full_disk_is_one_line_and_no_traceback(tmp_path, full_part):
    import subprocess
    import sys

    from harness.rundir import KEPT_FILE
    from tests.test_faults import env

    full = tmp_path / "full"
    full.mkdir()
    if full_part == "results":
        filler = f"(head -c 2000000 /dev/zero > {full}/filler; true) && "
        where = ["--output-dir", str(full / "results"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    else:
        filler = ""
        where = ["--output-dir", str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{full / 'mlflow.db'}"]
    args = " ".join([*run_args(tmp_path, "--methods", "lora"), *where])
    # the tmpfs exists only inside the namespace: list what the run left there before it goes
    script = (f"mount -t tmpfs -o size=1m tmpfs {full} && {filler}{sys.executable} -m harness.run {args}; "
              f"rc=$?; echo LEFT:; ls -A {full / 'results'} 2>/dev/null; exit $rc")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env(),
                          timeout=300)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "disk is full" in line, proc.stderr[-3000:]
    assert "SQL" not in proc.stderr and "warning: could not mark" not in proc.stderr, proc.stderr[-3000:]
    if full_part == "results":  # nothing could be written there, and no reservation is left behind
        assert "did not start" in line, line
        assert proc.stdout.split("LEFT:")[-1].split() == [], proc.stdout[-2000:]
    else:  # what was finished before the store filled stays, unpublished, with its note
        kept = [p for p in (tmp_path / "results").iterdir()]
        assert len(kept) == 1 and kept[0].name.endswith(".partial") and (kept[0] / KEPT_FILE).is_file(), kept


# 8. the up-front network checks wait $HARNESS_NETWORK_TIMEOUT seconds (default 5); a bad value is one line
def test_the_network_timeout_is_configurable_and_checked(tmp_path, capsys, monkeypatch):
    import socket
    import time

    from harness import run as harness_run
    from harness.tracking import DEFAULT_NETWORK_TIMEOUT_S, NETWORK_TIMEOUT_ENV, check_tracking_uri, network_timeout_s

    monkeypatch.delenv(NETWORK_TIMEOUT_ENV, raising=False)
    assert network_timeout_s() == DEFAULT_NETWORK_TIMEOUT_S
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for seconds in (1.0, 2.5):
            monkeypatch.setenv(NETWORK_TIMEOUT_ENV, str(seconds))
            started = time.monotonic()
            with pytest.raises(UserError) as caught:
                check_tracking_uri(uri)
            elapsed = time.monotonic() - started
            assert seconds <= elapsed < seconds + 2, (seconds, elapsed)
            assert f"waited {seconds:g} s" in str(caught.value) and NETWORK_TIMEOUT_ENV in str(caught.value)

    for bad in ("abc", "0", "-3", "inf", "nan", "601"):
        monkeypatch.setenv(NETWORK_TIMEOUT_ENV, bad)
        capsys.readouterr()
        assert harness_run.main(run_args(tmp_path, "--methods", "lora", "--tracking-uri", "http://127.0.0.1:9")) == 2
        line = one_error_line(capsys.readouterr().err)
        assert NETWORK_TIMEOUT_ENV in line and repr(bad) in line, line
