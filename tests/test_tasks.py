"""The lm-eval tasks in harness/tasks/: every filter and metric gives the verdicts upstream scoring gives.

Hand-written model outputs go through each task's own filter pipeline (as configured in its
YAML) and its process_results, without a model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from harness.data import format_prompt, generate
from harness.evaluate import TASKS_DIR, task_manager

logging.getLogger("lm_eval").setLevel(logging.ERROR)

MATH = ["llm_adapters_gsm8k", "llm_adapters_svamp", "llm_adapters_addsub", "llm_adapters_multiarith",
        "llm_adapters_singleeq", "llm_adapters_mawps"]
ARITHMETIC = ["arithmetic_add_sub", "arithmetic_add_sub_word", "arithmetic_mixed_ops", "arithmetic_multi_step"]
COMMONSENSE = {"llm_adapters_boolq": "true", "llm_adapters_piqa": "solution1", "llm_adapters_social_i_qa": "answer1",
               "llm_adapters_arc_easy": "answer1", "llm_adapters_arc_challenge": "answer1",
               "llm_adapters_openbookqa": "answer1", "llm_adapters_winogrande": "option1"}


@pytest.fixture(scope="module")
def tasks(data_dir):
    from lm_eval.tasks import get_task_dict

    names = MATH + ARITHMETIC + list(COMMONSENSE) + ["llm_adapters_aqua"] + [f"{n}_mc" for n in COMMONSENSE]
    return get_task_dict(names, task_manager(data_dir))


def verdicts(task, doc: dict, response: str) -> dict[str, tuple[str, float]]:
    """{filter name: (extracted answer, score)} for one response, through the task's own pipeline."""
    out = {}
    for ensemble in task._filters:
        resps = [[response]]
        for make_filter in ensemble.filters:
            resps = list(make_filter().apply(resps, [doc]))
        score = task.process_results(doc, [resps[0]])["exact_match"]
        out[ensemble.name] = (resps[0], float(score))
    return out


@pytest.mark.parametrize("name", MATH + ARITHMETIC)
@pytest.mark.parametrize("response, answer, extracted, correct", [
    ("The answer is 1,234.", "1234.0", "1234.", 1),
    ("so the total is -3.5", "-3.5", "-3.5", 1),
    ("The answer is 12. Then 13", "12", "13", 0),  # the last number wins
    ("The answer is 12. Then 13", "13.0", "13", 1),
    ("I do not know", "4", "[invalid]", 0),
    ("about 2.0004", "2", "2.0004", 1),  # within 0.001
    ("about 2.002", "2", "2.002", 0),
    ("12 + 7 = 19", "19", "19", 1),
])
def test_number_tasks_score_as_upstream(tasks, name, response, answer, extracted, correct):
    task = tasks[name]
    doc = {**task.test_docs()[0], "answer": answer}
    assert verdicts(task, doc, response) == {"answer": (extracted, correct)}


@pytest.mark.parametrize("response, answer, fixed, upstream", [
    ("The answer is (C).", "C", "C", "C"),
    ("Based on this, the answer is (C)", "C", "C", "B"),  # upstream counts the B of "Based"
    ("Clearly E", "E", "E", "C"),
    ("A or B? I pick D", "D", "D", "A"),
    ("no letter here", "A", "[invalid]", "[invalid]"),
])
def test_aqua_fixed_rule_is_default_and_upstream_rule_is_offered(tasks, response, answer, fixed, upstream):
    task = tasks["llm_adapters_aqua"]
    doc = {**task.test_docs()[0], "answer": answer}
    got = verdicts(task, doc, response)
    assert got["answer"] == (fixed, float(fixed == answer))
    assert got["upstream"] == (upstream, float(upstream == answer))


@pytest.mark.parametrize("name, response, answer, extracted", [
    ("llm_adapters_boolq", "the correct answer is true", "true", "true"),
    ("llm_adapters_boolq", "the correct answer is True", "true", "[invalid]"),  # case-sensitive
    ("llm_adapters_boolq", "it is untrue", "false", "true"),  # upstream: a match inside another word counts
    ("llm_adapters_boolq", "false, not true", "false", "false"),  # the first match wins
    ("llm_adapters_arc_challenge", "the correct answer is answer3", "answer3", "answer3"),
    ("llm_adapters_arc_challenge", "the correct answer is Answer3", "answer3", "[invalid]"),
    ("llm_adapters_arc_easy", "answer1 or answer2", "answer2", "answer1"),
    ("llm_adapters_social_i_qa", "the correct answer is answer2", "answer2", "answer2"),
    ("llm_adapters_openbookqa", "answer4", "answer4", "answer4"),
    ("llm_adapters_piqa", "the correct answer is solution2", "solution2", "solution2"),
    ("llm_adapters_piqa", "Solution1", "solution1", "[invalid]"),
    ("llm_adapters_winogrande", "option2 fits", "option2", "option2"),
    ("llm_adapters_winogrande", "", "option1", "[invalid]"),
])
def test_commonsense_first_match(tasks, name, response, answer, extracted):
    task = tasks[name]
    doc = {**task.test_docs()[0], "answer": answer}
    assert verdicts(task, doc, response) == {"answer": (extracted, float(extracted == answer))}


@pytest.mark.parametrize("name", COMMONSENSE)
def test_multiple_choice_variant_offers_the_labels_of_each_question(tasks, name):
    task = tasks[f"{name}_mc"]
    for doc in list(task.test_docs())[:20]:
        choices = task.doc_to_choice(doc)
        assert choices[task.doc_to_target(doc)] == f"the correct answer is {doc['answer']}"
        assert all(c.startswith("the correct answer is ") for c in choices) and len(choices) >= 2
    assert task.config.target_delimiter == ""


def test_every_task_loads_its_documents(tasks):
    for name, task in tasks.items():
        doc = task.test_docs()[0]
        assert task.doc_to_text(doc).endswith("### Response:\n"), name


def test_arithmetic_prompt_is_the_training_prompt(tasks):
    task = tasks["arithmetic_add_sub"]
    held_out = generate("ops=+-,digits=2,steps=1,form=expr,n=200", "test", seed=1234)
    docs = list(task.test_docs())
    assert len(docs) == 200
    for record, doc in zip(held_out[:10], docs):
        assert task.doc_to_text(doc) == format_prompt(record) and task.doc_to_target(doc) == record["answer"]


def test_arithmetic_group_is_held_out_from_the_default_training_data(tasks):
    from harness.data import DEFAULT_TRAIN_DATA, load_records

    train = {r["instruction"] for r in load_records(DEFAULT_TRAIN_DATA)}
    for name in ("arithmetic_add_sub", "arithmetic_add_sub_word"):
        assert not train & {d["instruction"] for d in tasks[name].test_docs()}


# ----------------------------------------------------------------------------- validation and test splits
def _scored(names, data_dir, split):
    """The documents lm-eval will score for ``names`` in ``split``, loaded the way harness.evaluate loads them."""
    from harness.evaluate import expand_tasks, tasks_for_split

    manager = task_manager(data_dir, split=split)
    loaded = manager.load(tasks_for_split(expand_tasks(names, manager, data_dir), manager, split))
    return {name: list(task.eval_docs) for name, task in loaded["tasks"].items()}, loaded["groups"]


@pytest.mark.parametrize("split", ["validation", "test"])
def test_one_yaml_scores_either_arithmetic_split(data_dir, split):
    docs, groups = _scored(["arithmetic"], data_dir, split)
    assert set(groups) == {"arithmetic"}  # the group and its aggregate survive the split choice
    for name, generator in (("arithmetic_add_sub", "ops=+-,digits=2,steps=1,form=expr,n=200"),
                            ("arithmetic_add_sub_word", "ops=+-,digits=2,steps=1,form=word,n=200")):
        expected = generate(generator, split, seed=1234)
        assert [d["instruction"] for d in docs[name]] == [r["instruction"] for r in expected]
        assert [d["prompt"] for d in docs[name][:5]] == [format_prompt(r) for r in expected[:5]]


def test_arithmetic_validation_and_test_items_differ(data_dir):
    validation, _ = _scored(["arithmetic_extended"], data_dir, "validation")
    test, _ = _scored(["arithmetic_extended"], data_dir, "test")
    for name in validation:
        assert not {d["instruction"] for d in validation[name]} & {d["instruction"] for d in test[name]}


def _fake_training_sets(data_dir, target):
    """math_10k and commonsense_170k are not in the mirror: stand-ins built from files that are, plus copies
    of a few test questions (which the validation split must leave out)."""
    import json

    from harness.data.records import read_records

    (target / "ft-training_set").mkdir(parents=True)
    (target / "dataset").symlink_to(data_dir / "dataset")
    gsm8k = json.loads((data_dir / "dataset/gsm8k/test.json").read_text())
    letters = [{"instruction": f"Pick one {i}. Answer Choices: (A) 1 (B) 2", "input": "", "output": "A", "answer": "A"}
               for i in range(300)]
    numbers = [{"instruction": f"A box holds {i} pens and {i + 3} pencils. How many in all?", "input": "",
                "output": f"{2 * i + 3}", "answer": f"{2 * i + 3}"} for i in range(1000)]
    math = read_records(data_dir / "dataset/mawps/trainset.json")[:1200] + letters + gsm8k[:300] + numbers
    (target / "ft-training_set/math_10k.json").write_text(json.dumps(math))
    commonsense = []
    for name in ("boolq", "openbookqa", "ARC-Easy"):
        commonsense += json.loads((data_dir / f"dataset/{name}/train.json").read_text())[:1500]
    (target / "ft-training_set/commonsense_170k.json").write_text(json.dumps(commonsense))
    return target


def test_llm_adapters_validation_split_is_the_held_out_slice_the_task_can_score(data_dir, tmp_path):
    from harness.contamination import record_key
    from harness.data import load_records, load_test_records

    fake = _fake_training_sets(data_dir, tmp_path / "data")
    docs, groups = _scored(["llm_adapters_math", "llm_adapters_boolq"], fake, "validation")
    assert "llm_adapters_math" in groups
    every_test_question = {record_key(r) for name in ("gsm8k", "svamp", "addsub", "multiarith", "singleeq", "mawps",
                                                      "aqua", "boolq")
                           for r in load_test_records(name, fake)}
    for name, source in (("llm_adapters_gsm8k", "math_10k"), ("llm_adapters_aqua", "math_10k"),
                         ("llm_adapters_boolq", "commonsense_170k")):
        held_out = {record_key(r) for r in load_records(source, fake, split="validation")}
        trained = {record_key(r) for r in load_records(source, fake)}
        keys = {record_key(d) for d in docs[name]}
        assert keys and keys <= held_out and not keys & trained and not keys & every_test_question, name
    assert all(d["answer"] in "ABCDE" for d in docs["llm_adapters_aqua"])  # letters to the letter task
    assert all(d["answer"] not in "ABCDE" for d in docs["llm_adapters_gsm8k"])
    assert all(d["answer"] in ("true", "false") for d in docs["llm_adapters_boolq"])
    # each task scores its own stratum: GSM8K none of MAWPS' items, MAWPS' tasks its upstream validation file
    from harness.data.records import read_records

    mawps_train = {record_key(r) for r in read_records(fake / "dataset/mawps/trainset.json")}
    validset = {record_key(r) for r in read_records(fake / "dataset/mawps/validset.json")}
    assert not {record_key(d) for d in docs["llm_adapters_gsm8k"]} & (mawps_train | validset)
    for name in ("llm_adapters_mawps", "llm_adapters_addsub", "llm_adapters_svamp"):
        assert docs[name] and {record_key(d) for d in docs[name]} <= validset - every_test_question, name
    from harness.errors import UserError

    with pytest.raises(UserError, match="holds no item that the task on winogrande can score"):
        _scored(["llm_adapters_winogrande_mc"], fake, "validation")  # the stand-in has no option1/option2 items


def test_a_test_run_needs_no_validation_source(tmp_path, data_dir):
    # the mirror has no math_10k: scoring the test split must not need it, the validation split must say so
    docs, _ = _scored(["llm_adapters_gsm8k"], data_dir, "test")
    assert len(docs["llm_adapters_gsm8k"]) == 1319
    from harness.errors import UserError

    with pytest.raises(UserError, match="ft-training_set/math_10k.json"):
        _scored(["llm_adapters_gsm8k"], data_dir, "validation")


def test_unknown_split_is_one_line():
    from harness.errors import UserError

    with pytest.raises(UserError, match="--split: unknown split 'dev'"):
        task_manager(split="dev")


def test_a_task_suite_answers_everything_from_one_manager(data_dir, monkeypatch):
    """TaskSuite's checksums, documents and protocol are the module-level functions' answers, from one manager."""
    from lm_eval.tasks import TaskManager

    from harness.contamination import scored_documents
    from harness.evaluate import TaskSuite, task_data_checksums
    from harness.fingerprint import task_protocol

    names = ["arithmetic", "arithmetic_mixed_ops"]
    expected = (task_data_checksums(names, data_dir, "alpaca", "validation"),
                scored_documents(names, data_dir, "alpaca", "validation"), task_protocol(names, data_dir, "alpaca"))
    built = []
    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **k: (built.append(self), init(self, *a, **k))[1])
    suite = TaskSuite(names, data_dir, "alpaca", "validation")
    assert (suite.checksums(), suite.documents(), suite.protocol()) == expected
    assert [name for name, _ in suite.leaves()] == ["arithmetic_add_sub", "arithmetic_add_sub_word",
                                                    "arithmetic_mixed_ops"]
    assert len(built) == 1


def test_evaluate_scores_the_validation_split(tiny_model, data_dir):
    from harness.evaluate import evaluate

    model, tokenizer = tiny_model
    result = evaluate(model, tokenizer, ["arithmetic_add_sub"], data_dir, limit=3, batch_size=8, split="validation")
    expected = generate("ops=+-,digits=2,steps=1,form=expr,n=200", "validation", seed=1234)[:3]
    assert [s["doc"]["instruction"] for s in result.raw["samples"]["arithmetic_add_sub"]] == [
        r["instruction"] for r in expected]
    assert [s.target for s in result.samples["arithmetic_add_sub"]] == [r["answer"] for r in expected]


def test_new_dataset_with_yaml_only(tmp_path, data_dir):
    """The recipe of tasks/README.md: a file in the LLM-Adapters format plus one YAML file."""
    from lm_eval.tasks import TaskManager, get_task_dict

    data = tmp_path / "my_math.json"
    data.write_text('[{"instruction": "What is 6 times 7?", "input": "", "output": "", "answer": "42"}]')
    (tmp_path / "my_math.yaml").write_text(
        f"include: {TASKS_DIR / '_math_template.yaml'}\ntask: my_math\nmetadata:\n  version: 1.0\n  file: {data}\n")
    manager = TaskManager(include_path=[str(TASKS_DIR), str(tmp_path)], include_defaults=False,
                          metadata={"data_dir": str(data_dir)})
    task = get_task_dict(["my_math"], manager)["my_math"]
    doc = task.test_docs()[0]
    assert "What is 6 times 7?" in task.doc_to_text(doc)
    assert verdicts(task, doc, "6 * 7 = 42") == {"answer": ("42", 1.0)}


def test_readme_explains_the_recipe():
    text = (Path(TASKS_DIR) / "README.md").read_text()
    assert "include: _math_template.yaml" in text and "file:" in text
