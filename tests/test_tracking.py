"""Tests for harness.tracking: runs written to a temporary SQLite store and read back with mlflow.search_runs."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from harness.errors import UserError
from harness.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    Tracker,
    check_tracking_uri,
    flatten_params,
    library_versions,
    resolve_tracking_uri,
    run_params,
    sanitize_name,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: creating MLflow's schema is the slow part (and must happen once)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = check_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    return uri, folder


def _runs(uri: str, experiment: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=[experiment], output_format="pandas")
    finally:
        mlflow.set_tracking_uri(None)


def test_parent_and_nested_runs_read_back(store, tmp_path):
    uri, folder = store
    tracker = Tracker(uri, "exp-readback")
    artifact = tmp_path / "samples.jsonl"
    artifact.write_text('{"doc_id": 0, "correct": 1}\n')
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")

    with tracker.run("bench", tags={"kind": "benchmark"}) as parent:
        parent.log_params(run_params({"methods": ["lora", "linchain:r=8,widths=8-16-8"], "rank": 16},
                                     {"arithmetic": "abc123"}))
        with tracker.run("lora-seed0", parent=parent) as child:
            child.log_params({"method": "lora", "seed": 0})
            with child.step_logger(flush_every=7) as steps:
                for step in range(1, 21):
                    steps.log(step, train_loss=1.0 / step, lr=1e-3)
            child.log_metrics({"arithmetic/exact_match,none": 0.5, "average_accuracy": 0.5, "note": "x"})
            child.log_artifact(artifact, "samples")
            child.log_artifacts(adapter, "adapter")
        with pytest.raises(RuntimeError):
            with tracker.run("linchain-seed0", parent=parent):
                raise RuntimeError("loss is NaN at step 3")
        with tracker.run("moslora-seed0", parent=parent) as handled:
            handled.fail("loss is inf at step 2")

    runs = _runs(uri, "exp-readback").set_index("tags.mlflow.runName")
    assert set(runs.index) == {"bench", "lora-seed0", "linchain-seed0", "moslora-seed0"}
    parent_id = runs.loc["bench", "run_id"]
    assert runs.loc["bench", "status"] == "FINISHED"
    assert runs.loc["bench", "params.methods"] == "lora;linchain:r=8,widths=8-16-8"
    assert runs.loc["bench", "params.data_checksum.arithmetic"] == "abc123"
    assert runs.loc["bench", "params.versions.mlflow"] == library_versions()["mlflow"]
    assert runs.loc["bench", "params.git_commit"]
    for name in ("lora-seed0", "linchain-seed0", "moslora-seed0"):
        assert runs.loc[name, "tags.mlflow.parentRunId"] == parent_id
    assert runs.loc["lora-seed0", "status"] == "FINISHED"
    assert runs.loc["lora-seed0", "metrics.arithmetic/exact_match_none"] == 0.5
    assert runs.loc["linchain-seed0", "status"] == "FAILED"
    assert "NaN" in runs.loc["linchain-seed0", "tags.error"]
    assert runs.loc["moslora-seed0", "status"] == "FAILED"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    child_id = runs.loc["lora-seed0", "run_id"]
    history = client.get_metric_history(child_id, "train_loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 21))
    assert {a.path for a in client.list_artifacts(child_id)} == {"samples", "adapter"}
    # Artifacts live beside the database, not in whatever the working directory is.
    assert (folder / "mlruns").is_dir()


def test_ctrl_c_marks_runs_killed(store):
    uri, _ = store
    tracker = Tracker(uri, "exp-killed")
    with pytest.raises(KeyboardInterrupt):
        with tracker.run("bench"):
            with tracker.run("lora-seed0"):
                raise KeyboardInterrupt
    runs = _runs(uri, "exp-killed")
    assert set(runs["status"]) == {"KILLED"}
    assert set(runs["tags.error"]) == {"interrupted (Ctrl-C)"}
    from harness.errors import Terminated

    with pytest.raises(Terminated):
        with tracker.run("pre-empted"):
            raise Terminated("received SIGTERM")
    runs = _runs(uri, "exp-killed").set_index("tags.mlflow.runName")
    assert runs.loc["pre-empted", "tags.error"] == "terminated (SIGTERM)"


def test_every_run_records_its_host_and_process(store):
    import socket

    uri, _ = store
    with Tracker(uri, "exp-owner").run("bench"):
        pass
    run = _runs(uri, "exp-owner").iloc[0]
    assert run["tags.harness.host"] == socket.gethostname() and run["tags.harness.pid"] == str(os.getpid())


def test_unreachable_stores_fail_fast_in_one_line(tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError, match="unreachable") as err:
        check_tracking_uri("http://127.0.0.1:9", timeout_s=2)
    assert "\n" not in str(err.value) and time.monotonic() - start < 10
    with pytest.raises(UserError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path / 'no' / 'such' / 'mlflow.db'}")
    with pytest.raises(UserError, match="sqlite"):
        check_tracking_uri(str(tmp_path / "mlruns"))


def test_unusable_sqlite_store_is_refused(tmp_path):
    garbage = tmp_path / "mlflow.db"
    garbage.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(UserError, match="unreachable") as err:
        check_tracking_uri(f"sqlite:///{garbage}")
    assert "\n" not in str(err.value)
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):  # root may write anywhere: permissions mean nothing
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(UserError, match="not writable"):
                check_tracking_uri(f"sqlite:///{locked / 'mlflow.db'}")
        finally:
            locked.chmod(0o700)


def test_default_uri_is_mlflow_db_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert resolve_tracking_uri("http://h:5000") == "http://h:5000"


def test_names_are_sanitised_for_mlflow():
    from mlflow.utils.validation import _validate_metric_name

    for raw in ["acc,none", "exact_match,strict-match", "a:b", "/x//y/", "..", "a/../b", "", "score (%)"]:
        clean = sanitize_name(raw)
        _validate_metric_name(clean)  # raises if MLflow would reject it
        assert "," not in clean
    assert sanitize_name("arithmetic/acc,none") == "arithmetic/acc_none"


def test_params_are_flattened_and_cut_to_the_limit():
    flat = flatten_params({"a": {"b": 1, "c": None}, "l": [1, 2], "long": "x" * 10_000})
    assert flat["a.b"] == "1" and flat["a.c"] == "None" and flat["l"] == "1,2"
    assert len(flat["long"]) == MAX_PARAM_VALUE_LENGTH and flat["long"].endswith("cut]")


def test_machine_names_this_cpu_and_the_kernel_features_it_has():
    from pathlib import Path

    from harness.tracking import CPU_FLAGS, machine

    found = machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():  # Linux: read the same file independently
        lines = info.read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in lines if line.startswith("flags")).split())
        assert found["cpu"] == model
        assert found["cpu_flags"] == [f for f in CPU_FLAGS if f in flags]
        # a hypervisor's generic name ("AMD EPYC") hides the generation: its numbers and cache tell it
        first = {}
        for line in lines:
            key, _, value = line.partition(":")
            first.setdefault(key.strip(), value.strip())
        for key, name in (("cpu family", "cpu_family"), ("model", "cpu_model"), ("stepping", "cpu_stepping"),
                          ("cache size", "cpu_cache")):
            assert found.get(name) == first.get(key)
    import torch

    assert found["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert found["cores"] == os.cpu_count() and found["torch_threads"] >= 1


def test_machine_label_is_one_line_with_what_the_record_has():
    from harness.tracking import machine_label

    full = {"cpu": "AMD EPYC", "cpu_family": "25", "cpu_model": "17", "cpu_stepping": "1", "cpu_cache": "1024 KB",
            "cpu_flags": ["avx2"], "cores": 2, "torch_cpu_capability": "AVX512", "torch_threads": 2}
    assert machine_label(full) == ("AMD EPYC (family 25 model 17 stepping 1, 1024 KB cache), AVX512 kernels, "
                                   "2 cores, 2 threads")
    # an older record (no ids, no kernel level): its flags stand in
    assert machine_label({"cpu": "X", "cpu_flags": ["avx2", "avx512f"], "cores": 4}) == "X, avx2+avx512f, 4 cores"
    assert machine_label(None) is None and machine_label({}) is None


def test_a_commit_is_dirty_only_where_code_changed(tmp_path):
    import subprocess

    from harness.tracking import git_commit

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "results" / "study").mkdir(parents=True)
    files = {"pkg/code.py": "x = 1\n", "results/study/journal.log": "{}\n", "README.md": "# r\n",
             "pkg/notes.md": "n\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = git("rev-parse", "HEAD")
    # a study writing its journal and a README edited beside it do not change what runs
    for name in ("results/study/journal.log", "README.md", "pkg/notes.md"):
        (tmp_path / name).write_text("changed\n")
    (tmp_path / "pkg" / "new.py").write_text("untracked\n")
    assert git_commit(tmp_path / "pkg") == head
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "pkg") == head + "+dirty"
    assert git_commit(tmp_path / "results") == head + "+dirty"  # wherever in the repository it is asked


def test_loaded_commit_is_read_once_per_process(monkeypatch):
    import harness.tracking

    heads = iter(["a" * 40, "b" * 40])
    monkeypatch.setattr(harness.tracking, "git_commit", lambda folder=None: next(heads))
    harness.tracking.loaded_commit.cache_clear()
    try:
        assert harness.tracking.loaded_commit() == "a" * 40
        assert harness.tracking.loaded_commit() == "a" * 40  # a commit made since does not relabel the code
    finally:
        harness.tracking.loaded_commit.cache_clear()
