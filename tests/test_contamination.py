"""harness.contamination and what harness.run does with it; each seed's training data.

Overlaps are checked against counts written here independently (lower-case, white space collapsed,
instruction and input compared as a pair), not against the module's own hashing.
"""

from __future__ import annotations

import json
import logging

import pytest

from harness import contamination
from harness.config import RunConfig
from harness.errors import UserError

logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _question(record) -> tuple[str, str]:
    return tuple(" ".join(str(record.get(k) or "").lower().split()) for k in ("instruction", "input"))


def _share(training, documents) -> float:
    questions = {_question(r) for r in training}
    return sum(_question(d) in questions for d in documents) / len(documents)


def _rec(instruction, input_=""):
    return {"instruction": instruction, "input": input_, "output": "o", "answer": "1"}


# ----------------------------------------------------------------------------- the check itself
def test_keys_ignore_case_and_spacing_but_not_the_input():
    key = contamination.record_key
    assert key(_rec("What is  2 + 3?")) == key(_rec(" what is 2 +\n3? "))
    assert key(_rec("What is 2 + 3?")) != key(_rec("What is 2 + 4?"))
    assert key(_rec("Answer:", "ctx one")) != key(_rec("Answer:", "ctx two"))
    assert key({"instruction": "q"}) == key(_rec("q"))  # a missing input is an empty one


def test_overlap_is_the_share_of_documents_found_in_training():
    docs = {"a": [_rec(f"Q{i}") for i in range(200)], "b": [_rec(f"R{i}") for i in range(50)]}
    training = [_rec(f"q{i}") for i in range(0, 200, 8)] + [_rec("unrelated")]
    found = contamination.overlaps(training, docs, "test")
    assert found["a"].share == pytest.approx(_share(training, docs["a"])) == pytest.approx(25 / 200)
    assert found["b"].in_training == 0 and found["b"].items == 50 and not found["b"].contaminated
    assert found["a"].contaminated


def test_above_one_percent_of_a_test_split_stops_with_one_line():
    docs = {"task_x": [_rec(f"Q{i}") for i in range(1000)], "task_y": [_rec(f"R{i}") for i in range(100)]}
    exactly_one_percent = contamination.overlaps([_rec(f"Q{i}") for i in range(10)], docs, "test")
    assert contamination.check(exactly_one_percent, allow=False) == set()  # 1% is the limit, not over it
    found = contamination.overlaps([_rec(f"Q{i}") for i in range(11)] + [_rec("R1"), _rec("R2")], docs, "test")
    with pytest.raises(UserError) as err:
        contamination.check(found, allow=False)
    message = str(err.value)
    assert "\n" not in message and "--allow-contamination" in message
    assert "task_x 1.1% (11/1000)" in message and "task_y 2.0% (2/100)" in message
    assert contamination.check(found, allow=True) == {"task_x", "task_y"}


def test_a_validation_split_is_marked_but_does_not_stop():
    docs = {"task_x": [_rec(f"Q{i}") for i in range(10)]}
    found = contamination.overlaps([_rec("Q1")], docs, "validation")
    assert contamination.check(found, allow=False) == {"task_x"}


def test_documents_without_an_instruction_are_not_checked():
    docs = {"custom": [{"question": "q", "answer": "a"}], "ours": [_rec("q")]}
    assert contamination.unchecked(docs) == ["custom"]
    assert set(contamination.overlaps([_rec("q")], docs, "test")) == {"ours"}


# ----------------------------------------------------------------------------- the real files
def test_math_data_holds_most_of_the_math_test_sets(data_dir):
    """The LLM-Adapters math_data file is built from the test sets: the check must see it, task by task."""
    from harness.data import load_records, load_test_records

    training = load_records("math_data", data_dir)
    docs = contamination.scored_documents(["llm_adapters_gsm8k", "llm_adapters_aqua"], data_dir, "alpaca", "test")
    found = contamination.overlaps(training, docs, "test")
    for task, dataset in (("llm_adapters_gsm8k", "gsm8k"), ("llm_adapters_aqua", "aqua")):
        expected = _share(training, load_test_records(dataset, data_dir))
        assert found[task].share == pytest.approx(expected) and found[task].items == len(docs[task])
        assert found[task].share > 0.5
    with pytest.raises(UserError, match="llm_adapters_gsm8k .*--allow-contamination"):
        contamination.check(found, allow=False)


def test_the_default_run_is_clean_on_both_splits():
    from harness.data import DEFAULT_TRAIN_DATA, load_records

    for split in ("validation", "test"):
        docs = contamination.scored_documents(["arithmetic_extended"], None, "alpaca", split)
        found = contamination.overlaps(load_records(DEFAULT_TRAIN_DATA, seed=0), docs, split)
        assert set(found) == {"arithmetic_add_sub", "arithmetic_add_sub_word", "arithmetic_mixed_ops",
                              "arithmetic_multi_step"}
        assert all(o.in_training == 0 and o.items == 200 for o in found.values())


# ----------------------------------------------------------------------------- harness.run
def test_run_stops_before_training_on_a_contaminated_test_split(tmp_path, data_dir, capsys):
    from harness.run import main

    code = main(["--model", "tiny-random", "--train-data", "math_data", "--tasks", "llm_adapters_gsm8k",
                 "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "results"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "llm_adapters_gsm8k" in err and "--allow-contamination" in err and "%" in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started


@pytest.mark.integration
def test_allowed_contamination_is_recorded_and_marked(tmp_path, data_dir, mlflow_runs_of):
    from harness.config import config_from_args
    from harness.data import load_records
    from harness.run import run

    training = tmp_path / "train.json"
    gsm8k = json.loads((data_dir / "dataset/gsm8k/test.json").read_text())
    training.write_text(json.dumps(gsm8k[:40] + [_rec(f"extra question {i}") for i in range(60)]))
    cfg = config_from_args(["--model", "tiny-random", "--train-data", str(training), "--tasks", "llm_adapters_gsm8k",
                            "--methods", "lora", "--max-steps", "1", "--limit", "2", "--batch-size", "2",
                            "--data-dir", str(data_dir), "--allow-contamination", "--run-name", "dirty",
                            "--output-dir", str(tmp_path / "results"),
                            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    outcome = run(cfg, progress=False, log=lambda *a, **k: None)
    expected = _share(load_records(str(training)), gsm8k)  # what trains: the file less its validation slice
    assert outcome.contamination["llm_adapters_gsm8k"].share == pytest.approx(expected) and expected > 0.01
    assert outcome.contaminated == {"llm_adapters_gsm8k"}
    assert outcome.base.contaminated == {"llm_adapters_gsm8k"} and outcome.results[0].contaminated == {"llm_adapters_gsm8k"}
    summary = (outcome.run_dir / "summary.md").read_text()
    assert "contaminated" in summary and "llm_adapters_gsm8k" in summary and "scored split**: test" in summary
    runs = mlflow_runs_of(tmp_path)
    parent = runs[runs["tags.mlflow.runName"] == "dirty"].iloc[0]
    assert parent["metrics.contamination/llm_adapters_gsm8k"] == pytest.approx(expected)
    assert parent["params.split"] == "test" and parent["params.allow_contamination"] == "True"
    # the run hands its protocol fingerprint to its caller (a study's trial records it): the one result.json has
    written = json.loads((outcome.run_dir / "result.json").read_text())["fingerprint"]
    assert outcome.fingerprint == written and outcome.fingerprint["parts"]["train_data_sha256"]


# ----------------------------------------------------------------------------- each seed's training data
def test_a_seed_trains_on_the_same_data_whatever_the_seed_list():
    from harness.run import training_records

    few = training_records(RunConfig(seeds=[1, 2], train_data="arithmetic:n=200"), None)
    many = training_records(RunConfig(seeds=[0, 1, 2], train_data="arithmetic:n=200"), None)
    assert few[1] == many[1] and few[2] == many[2]
    assert many[0] != many[1]  # the generated set is part of what a seed replicates


def test_a_data_file_is_the_same_for_every_seed(tmp_path):
    from harness.run import training_checksums, training_records

    path = tmp_path / "d.json"
    path.write_text(json.dumps([_rec(f"q{i}") for i in range(50)]))
    records = training_records(RunConfig(seeds=[3, 4], train_data=str(path)), None)
    assert records[3] == records[4] and len(records[3]) == 38  # a quarter (12) held out for validation (below the floor)
    assert set(training_checksums(records)) == {"train_data"}
    generated = training_records(RunConfig(seeds=[3, 4], train_data="arithmetic:n=20"), None)
    assert set(training_checksums(generated)) == {"train_data_seed3", "train_data_seed4"}


@pytest.mark.integration
def test_a_validation_run_scores_and_records_the_validation_split(tmp_path, mlflow_runs_of):
    from harness.config import config_from_args
    from harness.data import generate
    from harness.run import run

    cfg = config_from_args(["--model", "tiny-random", "--tasks", "arithmetic_add_sub", "--methods", "lora",
                            "--max-steps", "1", "--limit", "3", "--batch-size", "2", "--split", "validation",
                            "--run-name", "tune", "--output-dir", str(tmp_path / "results"),
                            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    outcome = run(cfg, progress=False, log=lambda *a, **k: None)
    expected = generate("ops=+-,digits=2,steps=1,form=expr,n=200", "validation", seed=1234)[:3]
    for name in ("base", "lora-seed0"):
        lines = (outcome.run_dir / "samples" / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line)["target"] for line in lines] == [r["answer"] for r in expected]
    assert outcome.contamination["arithmetic_add_sub"].split == "validation" and not outcome.contaminated
    assert "scored split**: validation" in (outcome.run_dir / "summary.md").read_text()
    runs = mlflow_runs_of(tmp_path)
    assert set(runs["params.split"].dropna()) == {"validation"}  # the parent and the method's run
    assert len(runs["params.split"].dropna()) == 2


@pytest.mark.parametrize("argv", [["--split", "dev"], ["--split", "train"]])
def test_unknown_split_is_one_line_and_exit_2(argv, capsys):
    from harness.run import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--split" in err and "validation, test" in err
