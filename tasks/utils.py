"""The code the task YAMLs need: document loaders, answer extraction, scoring.

Everything else about a task (prompt field, generation settings, filters, metrics, groups)
is in its YAML. Documents carry a precomputed ``prompt`` built by the same function that
formats training data (harness.data.prompts), so training and evaluation read alike.

Where the data directory comes from, in order: the task metadata ``data_dir`` (the harness
passes it through lm-eval's TaskManager; on the command line ``--metadata '{"data_dir": ...}'``),
then ``$HARNESS_DATA_DIR``, then the user cache folder. The prompt format comes from metadata
``prompt_format`` (``alpaca`` by default; ``chat`` together with lm-eval's ``--apply_chat_template``).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

try:
    import harness  # noqa: F401
except ImportError:  # lm_eval run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.data import arithmetic, prompts
from harness.data.files import resolve_data_dir
from harness.data.files import data_file
from harness.data.records import TEST_KEYS, load_test_records, read_records

INVALID = "[invalid]"
TOLERANCE = 0.001  # upstream's MAX_INT: a numeric answer is right when |pred - answer| <= 0.001
_NUMBER = re.compile(r"-?\d+\.?\d*")
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([\w/]+)\s*$")


# ----------------------------------------------------------------------------- loaders
def load_llm_adapters(dataset: str | None = None, file: str | None = None, data_dir: str | None = None,
                      prompt_format: str = "alpaca", **_metadata):
    """An LLM-Adapters test file, each document with its ``prompt`` and answer ``choices``.

    ``dataset`` names a known test set (``gsm8k``); ``file`` is any file in that format, absolute
    or relative to the data directory (how a new dataset is added with YAML only).
    """
    import datasets

    root = resolve_data_dir(data_dir)
    if file is not None:
        records = read_records(data_file(file, root) if not Path(file).is_absolute() else Path(file), TEST_KEYS)
    else:
        records = load_test_records(dataset, root)
    return {"test": datasets.Dataset.from_list([_document(r, prompt_format) for r in records])}


def load_arithmetic(generator: str, seed: int = 1234, prompt_format: str = "alpaca", **_metadata):
    """The held-out (test) split of the arithmetic generator: no data files needed."""
    import datasets

    records = arithmetic.generate(generator, split="test", seed=int(seed))
    return {"test": datasets.Dataset.from_list([_document(r, prompt_format) for r in records])}


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
