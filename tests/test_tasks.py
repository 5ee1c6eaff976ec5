"""The lm-eval tasks in tasks/: every filter and metric gives the verdicts upstream scoring gives.

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
