"""harness.data: the data directory, record loading, the arithmetic generator, prompts and tokenisation."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.data import (
    DEFAULT_TRAIN_DATA,
    IGNORE_INDEX,
    build_train_dataset,
    collate,
    format_prompt,
    generate,
    load_records,
    parse_spec,
    resolve_data_dir,
)
from harness.data.files import data_file, download_file
from harness.errors import UserError


# ----------------------------------------------------------------------------- data directory
def test_data_dir_order_argument_then_env_then_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("HARNESS_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(None) == tmp_path / "cache" / "lora-harness" / "data"


def test_missing_file_offline_says_which_where_and_how(tmp_path):
    with pytest.raises(UserError) as err:
        data_file("dataset/gsm8k/test.json", tmp_path)
    message = str(err.value)
    assert "dataset/gsm8k/test.json" in message and str(tmp_path) in message and "--data-dir" in message
    assert "\n" not in message


def test_download_is_atomic_and_verified(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    source = tmp_path / "upstream.json"
    source.write_text('[{"instruction": "q", "input": "", "output": "a", "answer": "1"}]')
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    target = tmp_path / "data" / "dataset" / "x" / "test.json"
    with pytest.raises(UserError, match="SHA256"):
        download_file(source.as_uri(), target, "0" * 64)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no partial file left behind
    download_file(source.as_uri(), target, digest)
    assert target.read_bytes() == source.read_bytes()


# ----------------------------------------------------------------------------- records
def test_named_sets_load_in_the_llm_adapters_schema(data_dir):
    train, validation = load_records("math_data", data_dir), load_records("math_data", data_dir, split="validation")
    # by source task: 2,801 number items (10%: 280), 203 letters (a quarter: 50), MAWPS' 256 (its validset, 237)
    assert len(validation) == 280 + 50 + 237 and len(train) + len(validation) <= 3260 + 237
    assert set(train[0]) == {"instruction", "input", "output", "answer"}
    boolq = load_records("boolq", data_dir, limit=5)
    assert len(boolq) == 5 and all(r["answer"] in ("true", "false") for r in boolq)


def test_mawps_raw_schema_is_converted(data_dir):
    record = load_records("mawps", data_dir, limit=1, sample=False)[0]
    assert record["instruction"].startswith("A waiter had 22 customers")
    assert record["answer"] == "2" and record["output"].endswith("The answer is 2.")


def test_tiny_subset_is_seeded(data_dir):
    first = load_records("arc_easy", data_dir, limit=10, seed=1)
    assert first == load_records("arc_easy", data_dir, limit=10, seed=1)
    assert first != load_records("arc_easy", data_dir, limit=10, seed=2)
    assert load_records("arc_easy", data_dir, limit=3, sample=False) == load_records("arc_easy", data_dir)[:3]


def test_local_json_and_jsonl(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "answer": str(i)} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_records(str(tmp_path / "d.json")) == load_records(str(tmp_path / "d.jsonl")) == rows


@pytest.mark.parametrize("content, expected", [
    ('[{"instruction": "q", "output": "a"}, {"instruction": "q"}]', r"record 1 lacks output"),
    ("[]", "holds no records"),
    ('{"instruction": "q"}', "JSON list"),
    ("[{", "not valid JSON"),
])
def test_bad_files_name_the_file_and_record(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=expected) as err:
        load_records(str(path))
    assert str(path) in str(err.value)


def test_unknown_source_lists_named_sets():
    with pytest.raises(UserError, match="math_10k.*commonsense_170k"):
        load_records("no_such_set")


def test_missing_large_set_explains_how_to_supply(tmp_path):
    with pytest.raises(UserError, match="ft-training_set/math_10k.json"):
        load_records("math_10k", tmp_path)


def _key(record):
    return " ".join(record["instruction"].lower().split())


def test_validation_slice_is_fixed_held_out_and_sized(tmp_path):
    # rows i and 4000 + i ask the same question, written with other case and spacing
    rows = [{"instruction": f"Question {i}?" if n == 0 else f" QUESTION  {i}? ", "input": "", "output": f"a{n}",
             "answer": str(i)} for n in range(2) for i in range(4000)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    train, validation = load_records(str(path)), load_records(str(path), split="validation")
    assert len(validation) == 500  # min(500, 10% of 8,000)
    held = {_key(r) for r in validation}
    assert train == [r for r in rows if _key(r) not in held]  # a held-out question's twin does not train either
    assert len(train) < len(rows) - len(validation)
    # the slice is the same for every seed of a run; a small file holds out a quarter (the floor of 200
    # would take two thirds of 300)
    assert load_records(str(path), seed=5, split="validation") == validation
    path.write_text(json.dumps(rows[:300]))
    assert len(load_records(str(path), split="validation")) == 75 and len(load_records(str(path))) == 225


# ----------------------------------------------------------------------------- stratified validation
def _mixed_file(path, counts):
    """A multi-task training file: ``counts`` maps an "Answer format" line (or "number") to its records,
    interleaved as a concatenated file would not be (strata must not depend on order)."""
    rows = []
    for kind, n in counts.items():
        for i in range(n):
            if kind == "number":
                rows.append({"instruction": f"How many is {i} plus 1?", "input": "", "output": "x", "answer": str(i + 1)})
            else:
                rows.append({"instruction": f"{kind} question {i}\n\nAnswer format: {kind}", "input": "",
                             "output": "x", "answer": kind.split("/")[0]})
    rows = rows[::2] + rows[1::2]
    path.write_text(json.dumps(rows))
    return rows


def test_validation_is_stratified_by_source_task_with_a_floor(tmp_path):
    from harness.data import load_validation

    path = tmp_path / "mixed.json"
    _mixed_file(path, {"true/false": 1000, "solution1/solution2": 3000, "option1/option2": 100,
                       "ending1/ending2/ending3/ending4": 3, "number": 9000})
    by_task = load_validation(str(path), tmp_path)
    # floor 200 from 800 records up, 10% above 2,000 up to 500, a quarter below 800, none under 4
    assert {k: len(v) for k, v in by_task.items()} == {"boolq": 200, "piqa": 300, "winogrande": 25, "gsm8k": 500}
    assert all(r["instruction"].endswith("true/false") for r in by_task["boolq"])
    assert all(r["answer"].isdigit() for r in by_task["gsm8k"])
    # the old rule (one min(500, 10%) slice of the 13,103 records) gave BoolQ about 38 of 500
    assert len(load_records(str(path), tmp_path, split="validation")) == 1025


def test_validation_of_every_stratum_leaves_training_and_is_fixed(tmp_path):
    from harness.data import load_validation
    from harness.data.keys import record_key

    path = tmp_path / "mixed.json"
    rows = _mixed_file(path, {"true/false": 1000, "option1/option2": 100})
    # a twin of every record (other case and spacing): a held-out question's twin must not train
    twins = [{**r, "instruction": "  " + r["instruction"].upper()} for r in rows]
    path.write_text(json.dumps(rows + twins))
    train = load_records(str(path), tmp_path)
    by_task = load_validation(str(path), tmp_path)
    held = {record_key(r) for v in by_task.values() for r in v}
    assert held and not held & {record_key(r) for r in train}
    assert len(train) + sum(map(len, by_task.values())) < len(rows) + len(twins)  # the twins left training too
    assert load_validation(str(path), tmp_path) == by_task  # fixed: same file, same split
    assert load_records(str(path), tmp_path, seed=7, split="validation") == load_records(str(path), tmp_path,
                                                                                        split="validation")
    # one stratum's sample does not move when another stratum changes size
    _mixed_file(path, {"true/false": 1000, "option1/option2": 300})
    assert load_validation(str(path), tmp_path)["boolq"] == [r for r in by_task["boolq"] if r in rows]


def test_a_file_too_small_for_any_validation_is_one_error(tmp_path):
    path = tmp_path / "tiny.json"
    _mixed_file(path, {"true/false": 3, "number": 2})
    assert len(load_records(str(path), tmp_path)) == 5  # it still trains
    with pytest.raises(UserError, match=r"^training data .*tiny.json: too small for a validation split: 5 records "
                                        r"\(boolq 3, gsm8k 2 per source task\)") as err:
        load_records(str(path), tmp_path, split="validation")
    assert "\n" not in str(err.value)


def test_upstream_validation_file_and_reference_files_decide_strata(data_dir):
    from harness.data import load_validation
    from harness.data.keys import record_key
    from harness.data.records import read_records

    validset = read_records(data_dir / "dataset/mawps/validset.json")
    by_task = load_validation("mawps", data_dir)
    assert by_task == {"mawps": validset}  # the benchmark's own validation file, not a slice
    train = load_records("mawps", data_dir)
    assert not {record_key(r) for r in validset} & {record_key(r) for r in train}
    assert len(train) >= 1898 - len(validset)  # the training file's MAWPS records are not sliced
    # ARC-Easy's items have OpenBookQA's answer format; its own file names them
    assert set(load_validation("arc_easy", data_dir)) == {"arc_easy"}
    assert len(load_validation("arc_easy", data_dir)["arc_easy"]) == 225  # 10% of 2,251 is below the floor


def test_validation_sizes_per_task(tmp_path, data_dir):
    from harness.data import validation_sizes

    (tmp_path / "ft-training_set").mkdir()
    (tmp_path / "dataset").symlink_to(data_dir / "dataset")
    rows = []
    for name in ("boolq", "ARC-Easy", "openbookqa"):
        rows += json.loads((data_dir / f"dataset/{name}/train.json").read_text())
    (tmp_path / "ft-training_set/commonsense_170k.json").write_text(json.dumps(rows))
    sizes = validation_sizes("commonsense_170k", ["llm_adapters_boolq", "llm_adapters_arc_easy_mc", "openbookqa"],
                             tmp_path)
    # boolq 9,427 -> 500; ARC-Easy 2,251 -> 225; OpenBookQA 4,957 -> 495 (less any that ask a test question)
    assert list(sizes) == ["llm_adapters_boolq", "llm_adapters_arc_easy_mc", "openbookqa"]
    assert 490 <= sizes["llm_adapters_boolq"] <= 500 and 215 <= sizes["llm_adapters_arc_easy_mc"] <= 225
    assert 485 <= sizes["openbookqa"] <= 495
    with pytest.raises(UserError, match="holds no item that the task on piqa can score"):
        validation_sizes("commonsense_170k", ["llm_adapters_piqa"], tmp_path)


def test_a_file_has_no_test_split(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    with pytest.raises(UserError, match="unknown split 'test'"):
        load_records(str(tmp_path / "d.json"), split="test")


# ----------------------------------------------------------------------------- arithmetic generator
def test_generator_is_reproducible_and_seeded():
    assert generate("n=50", seed=3) == generate("n=50", seed=3)
    assert generate("n=50", seed=3) != generate("n=50", seed=4)
    assert load_records("arithmetic:n=20", seed=3) == generate("n=20", "train", seed=3)


def _problem(record) -> tuple:
    """The arithmetic of a record, whatever its form, with commuted twins made equal: written here from the
    worked answer ("a op b = c, c op d = e"), not with the generator's own key."""
    steps = re.findall(r"(\d+) ([-+*/]) (\d+) =", record["output"])
    first = steps[0]
    if first[1] in "+*":
        first = tuple(sorted((int(first[0]), int(first[2])))) + (first[1],)
    return (first, *[(op, int(b)) for _, op, b in steps[1:]])


@pytest.mark.parametrize("spec, sizes", [
    ("ops=+-", (3000, 500, 1000)), ("ops=+-*/,steps=2,form=word", (1000, 300, 500)), ("ops=+*,digits=1", (25, 4, 8)),
])
def test_three_splits_are_disjoint_even_for_commuted_twins(spec, sizes):
    splits = {split: {_problem(r) for r in generate(f"{spec},n={n}", split, seed=0)}
              for split, n in zip(("train", "validation", "test"), sizes)}
    assert not splits["train"] & splits["validation"]
    assert not splits["train"] & splits["test"]
    assert not splits["validation"] & splits["test"]
    for split, n in zip(splits, sizes):
        assert len(splits[split]) == n  # no duplicates, not even commuted ones, inside a split


def test_commuted_twins_share_a_split():
    from harness.data.arithmetic import canonical, problem_split

    for a in range(10, 100, 7):
        for b in range(10, 100, 11):
            for op in "+*":
                assert canonical([a, b], [op]) == canonical([b, a], [op])
                assert problem_split(canonical([a, b, 3], [op, "-"])) == problem_split(canonical([b, a, 3], [op, "-"]))
            assert (canonical([a, b], ["-"]) == canonical([b, a], ["-"])) == (a == b)  # - does not commute


def test_split_shares_follow_the_hash():
    from harness.data.arithmetic import canonical, problem_split

    counts = {"train": 0, "validation": 0, "test": 0}
    for a in range(100):
        for b in range(a, 100):
            counts[problem_split(canonical([a, b], ["+"]))] += 1
    total = sum(counts.values())
    assert abs(counts["test"] / total - 0.2) < 0.02 and abs(counts["validation"] / total - 0.1) < 0.02


def test_splits_are_deterministic_and_test_ignores_the_training_seed():
    for split in ("validation", "test"):
        assert generate("n=100", split, seed=1234) == generate("n=100", split, seed=1234)
    # membership is a property of the problem: no training seed ever draws a test problem
    test = {_problem(r) for r in generate("ops=+-,n=1500", "test", seed=1234)}
    for seed in range(4):
        assert not test & {_problem(r) for r in generate("ops=+-,n=2000", "train", seed=seed)}


def test_unknown_generator_split():
    with pytest.raises(UserError, match="unknown split 'dev'"):
        generate("n=5", "dev")


@pytest.mark.parametrize("spec", ["ops=+-*/,digits=2,steps=3,n=300", "ops=/,digits=1,n=15", "ops=-,digits=3,n=100"])
def test_answers_are_right(spec):
    for record in generate(spec, "test", seed=0):
        value = None
        for left, op, right, result in re.findall(r"(\d+) ([-+*/]) (\d+) = (-?\d+)", record["output"]):
            left, right, result = int(left), int(right), int(result)
            assert value is None or left == value
            expected = {"+": left + right, "-": left - right, "*": left * right, "/": left // right}[op]
            assert result == expected and result >= 0
            if op == "/":
                assert left % right == 0
            value = result
        assert str(value) == record["answer"]


def test_word_form_and_default():
    word = generate("form=word,n=5", seed=0)
    assert all("How many" in r["instruction"] for r in word)
    assert DEFAULT_TRAIN_DATA == "arithmetic"
    assert str(parse_spec(DEFAULT_TRAIN_DATA)) == "ops=+-,digits=2,steps=1,form=mixed,n=2000"


@pytest.mark.parametrize("spec, expected", [
    ("arithmetic:digits=9", "digits=9 is out of range"),
    ("arithmetic:steps=0", "steps=0 is out of range"),
    ("arithmetic:ops=+^", "ops="),
    ("arithmetic:form=poem", "form='poem' is unknown"),
    ("arithmetic:n=0", "n=0 is out of range"),
    ("arithmetic:colour=red", "options: ops, digits"),
    ("arithmetic:digits=two", "not an integer"),
    ("arithmetic:ops=+,digits=1,n=500", "distinct train problems"),
])
def test_generator_options_out_of_range(spec, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        load_records(spec)


# ----------------------------------------------------------------------------- prompts and tokenisation
RECORD = {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5", "answer": "5"}


def test_alpaca_prompt():
    assert format_prompt(RECORD) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is 2 + 3?\n\n### Response:\n")
    assert "### Input:\nctx" in format_prompt({**RECORD, "input": "ctx"})


@pytest.mark.parametrize("prompt_format", ["alpaca", "chat"])
def test_train_example_is_prompt_response_eos(tiny_tokenizer, prompt_format):
    tok = tiny_tokenizer
    prompt_ids = tok(format_prompt(RECORD, prompt_format, tok))["input_ids"]
    whole = build_train_dataset([RECORD], tok, prompt_format, train_on_inputs=True, cutoff_len=512)[0]
    masked = build_train_dataset([RECORD], tok, prompt_format, train_on_inputs=False, cutoff_len=512)[0]
    # the prompt's ids are exactly what lm-eval feeds at evaluation
    assert whole["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tok.decode(whole["input_ids"][len(prompt_ids):]) == RECORD["output"] + tok.eos_token
    assert whole["labels"] == whole["input_ids"]
    assert masked["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert masked["labels"][len(prompt_ids):] == whole["input_ids"][len(prompt_ids):]
    if prompt_format == "chat":
        assert tok.decode(prompt_ids).startswith("<|im_start|>user\nWhat is 2 + 3?")


def test_cutoff_and_collate(tiny_tokenizer):
    examples = build_train_dataset([RECORD, {**RECORD, "output": "5"}], tiny_tokenizer, "alpaca", train_on_inputs=True,
                                   cutoff_len=20)
    assert [len(e["input_ids"]) for e in examples] == [20, 20]
    long, short = build_train_dataset([RECORD, {**RECORD, "instruction": "1+1?"}], tiny_tokenizer, "alpaca",
                                      train_on_inputs=True, cutoff_len=512)
    batch = collate([long, short], pad_token_id=tiny_tokenizer.pad_token_id)
    width = len(long["input_ids"])
    assert batch["input_ids"].shape == (2, width)
    pad = width - len(short["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * len(short["input_ids"]) + [0] * pad
    assert batch["labels"][1, -pad:].tolist() == [IGNORE_INDEX] * pad
    assert batch["input_ids"][1, -pad:].tolist() == [tiny_tokenizer.pad_token_id] * pad


# ----------------------------------------------------------------------------- command line
@pytest.mark.parametrize("argv, expected", [
    (["no_such_set"], "is not a named set"),
    (["arithmetic:digits=0"], "digits=0 is out of range"),
    (["math_10k", "--data-dir", "/nonexistent/data"], "ft-training_set/math_10k.json"),
    (["arithmetic", "--limit", "0"], "limit=0"),
    (["arithmetic", "--split", "dev"], "unknown split 'dev'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, expected):
    from harness.data.__main__ import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_preview(capsys):
    from harness.data.__main__ import main

    assert main(["arithmetic:n=5", "--show", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "5 train records from arithmetic:n=5" and json.loads(out[1])["answer"]


def test_command_line_is_one_line_in_a_real_process(tmp_path):
    """The one real process of ``python -m harness.data``: the entry point, exit 2 and one line, no traceback
    (the other command-line checks call ``main(argv)`` in this process)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "harness.data", "no_such_set"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a named set" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
