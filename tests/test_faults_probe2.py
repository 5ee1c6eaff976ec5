"""Faults found by the second adversarial probe (harness side): each is one ``error:`` line, exit 2,
before any model work where the input can be checked then, with nothing half-written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

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
