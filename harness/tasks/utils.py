"""The code the task YAMLs need: document loaders, answer extraction, scoring.

Everything else about a task (prompt field, generation settings, filters, metrics, groups)
is in its YAML. Documents carry a precomputed ``prompt`` built by the same function that
formats training data (harness.data.prompts), so training and evaluation read alike.

Where the data directory comes from, in order: the task metadata ``data_dir`` (the harness
passes it through lm-eval's TaskManager; on the command line ``--metadata '{"data_dir": ...}'``),
then ``$HARNESS_DATA_DIR``, then the user cache folder. The prompt format comes from metadata
``prompt_format`` (``alpaca`` by default; ``chat`` together with lm-eval's ``--apply_chat_template``).

Each task has a test and a validation split. A loader builds the validation split only when
metadata ``split`` is ``validation`` (the default is ``test``), so a test run never needs the files
a validation split comes from. lm-eval scores ``test_split`` whenever a YAML names one: for a
validation run the harness clears it on the loaded tasks (harness.evaluate.tasks_for_split), so
lm-eval's own command line scores the test split.
"""

from __future__ import annotations

import collections
import functools
import math
import re
import sys
from pathlib import Path

try:
    import harness  # noqa: F401
except ImportError:  # lm_eval run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.data import arithmetic, prompts
from harness.data.files import data_file, resolve_data_dir
from harness.data.records import (TEST_KEYS, TRAIN_SETS, file_stamp, load_test_records, load_validation, read_records,
                                  test_keys)
from harness.data.validation import TASK_STRATA, answer_stratum, task_validation
from harness.errors import UserError

INVALID = "[invalid]"
TOLERANCE = 0.001  # upstream's MAX_INT: a numeric answer is right when |pred - answer| <= 0.001
_NUMBER = re.compile(r"-?\d+\.?\d*")
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([\w/]+)\s*$")
SPLITS = ("validation", "test")


# ----------------------------------------------------------------------------- loaders
def load_llm_adapters(dataset: str | None = None, file: str | None = None, data_dir: str | None = None,
                      prompt_format: str = "alpaca", split: str = "test", validation_data: str | None = None,
                      validation_stratum: str | None = None, **_metadata):
    """An LLM-Adapters test file (or its validation split), each document with its ``prompt`` and answer ``choices``.

    ``dataset`` names a known test set (``gsm8k``); ``file`` is any file in that format, absolute
    or relative to the data directory (how a new dataset is added with YAML only). The validation
    split is the stratum ``validation_stratum`` (default: the test set's, ``TASK_STRATA``) of the
    training set ``validation_data``: see :func:`validation_records`.
    """
    root = resolve_data_dir(data_dir)
    if file is not None:
        test = read_records(data_file(file, root) if not Path(file).is_absolute() else Path(file), TEST_KEYS)
    else:
        test = load_test_records(dataset, root)
    validation = (validation_records(validation_data, test, root, dataset or file, validation_stratum)
                  if _split(split) == "validation" else [])
    return _splits(test, validation, prompt_format)


def load_arithmetic(generator: str, seed: int = 1234, prompt_format: str = "alpaca", split: str = "test",
                    **_metadata):
    """A held-out split (``test`` or ``validation``) of the arithmetic generator: no data files needed."""
    test = arithmetic.generate(generator, split="test", seed=int(seed))
    validation = arithmetic.generate(generator, split="validation", seed=int(seed)) if _split(split) == "validation" else []
    return _splits(test, validation, prompt_format)


def _splits(test: list[dict], validation: list[dict], prompt_format: str) -> dict:
    """lm-eval's dataset dict. The validation split is built only when asked for (empty otherwise); the
    test split always, because lm-eval checks a test document while it builds a task."""
    import datasets

    docs = {name: datasets.Dataset.from_list([_document(r, prompt_format) for r in records])
            for name, records in (("test", test), ("validation", validation))}
    if not validation:
        docs["validation"] = docs["test"].select([])  # same columns, no rows: never scored
    return docs


def _split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    return split


def validation_records(source: str | None, test: list[dict], root: Path, name: str | None,
                       stratum: str | None = None) -> list[dict]:
    """The validation items of a task: stratum ``stratum`` of training set ``source``'s validation split.

    The split is stratified by source task (:mod:`harness.data.validation`): BoolQ is tuned on
    commonsense_170k's BoolQ items, GSM8K on math_10k's, MAWPS and its parts on MAWPS' upstream
    validation file. A task without a known stratum (a custom ``file:``) names one in its metadata
    ``validation_stratum``, else it takes the stratum its test items' answers imply (their most common).
    Items asking a question of any LLM-Adapters test file in the data directory are left out, so tuning
    never sees a test item.
    """
    if not source:
        raise UserError(f"task on {name}: no validation split (give its YAML metadata validation_data: "
                        "<training set>), or score it with --split test")
    if stratum is None:
        stratum = TASK_STRATA.get(str(name)) or collections.Counter(answer_stratum(r) for r in test).most_common(1)[0][0]
    return task_validation(_validation_strata(source, str(root)), stratum, test_keys(root), source, str(name))


def _validation_strata(source: str, root: str) -> dict[str, list[dict]]:
    """The validation split of a training set, read once per process and file version (a group's tasks share it)."""
    path = Path(root) / TRAIN_SETS[source] if source in TRAIN_SETS else Path(source).expanduser()
    return _cached_strata(source, root, file_stamp(path))


@functools.lru_cache(maxsize=4)
def _cached_strata(source: str, root: str, _stamp: tuple | None) -> dict[str, list[dict]]:
    return load_validation(source, root)


def _document(record: dict, prompt_format: str) -> dict:
    # The answer labels the instruction offers ("Answer format: answer1/answer2/answer3"), for multiple choice.
    found = _ANSWER_FORMAT.search(record["instruction"])
    choices = found.group(1).split("/") if found else []
    return {**record, "prompt": prompts.format_prompt(record, prompt_format), "choices": choices}


# ----------------------------------------------------------------------------- multiple choice
def mc_choices(doc: dict) -> list[str]:
    """Each answer label as the response training teaches: "the correct answer is answer2"."""
    return [f"the correct answer is {label}" for label in doc["choices"]]


def mc_target(doc: dict) -> int:
    return doc["choices"].index(doc["answer"])


# ----------------------------------------------------------------------------- filters
def last_number(resps, docs):
    """Upstream's math extraction: commas removed, the LAST number (-?\\d+\\.?\\d*) of the output."""
    return [[_last_number(r) for r in responses] for responses in resps]


def _last_number(text: str) -> str:
    found = _NUMBER.findall(str(text).replace(",", ""))
    return found[-1] if found else INVALID


def aqua_letter_upstream(resps, docs):
    """Upstream's AQuA rule: the FIRST capital A-E anywhere, letters inside words included."""
    return [[(re.findall(r"A|B|C|D|E", str(r)) or [INVALID])[0] for r in responses] for responses in resps]


def aqua_letter(resps, docs):
    """The fixed AQuA rule (default): the LAST A-E standing alone, as a word or in parentheses."""
    pattern = re.compile(r"(?<![A-Za-z])[A-E](?![A-Za-z])")
    return [[(pattern.findall(str(r)) or [INVALID])[-1] for r in responses] for responses in resps]


# ----------------------------------------------------------------------------- metrics
def score_number(doc: dict, results: list[str]) -> dict:
    """exact_match = 1 when the extracted number is within 0.001 of the gold answer."""
    return {"exact_match": float(numbers_match(results[0], doc["answer"]))}


def numbers_match(prediction: str, answer: str) -> bool:
    try:
        value, gold = float(prediction), float(str(answer).replace(",", ""))
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and abs(value - gold) <= TOLERANCE


def score_letter(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(results[0] == doc["answer"].strip())}
