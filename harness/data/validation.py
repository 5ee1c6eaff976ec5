"""Validation splits of LLM-Adapters training files, stratified by source task, with a floor per task.

A multi-task training file (commonsense_170k, math_10k) mixes several source tasks. One slice of the
whole file gave each task what chance left it (about 25-30 BoolQ items in commonsense_170k, a standard
error near 9 points), so the split is made per source task (a *stratum*):

- **Which task a record comes from.** A record whose question (:func:`~harness.data.keys.record_key`)
  is in a per-task upstream training file present in the data directory belongs to that task
  (``REFERENCE_FILES``: BoolQ, ARC-Easy, ARC-Challenge, OpenBookQA, MAWPS). Otherwise its answer says:
  the "Answer format" line (true/false BoolQ, solution1/solution2 PIQA, answer1-3 Social IQa,
  option1/option2 WinoGrande, ending1-4 HellaSwag; other formats, e.g. ARC or OpenBookQA items not
  found in their files, form a stratum named by the format), a letter A-E AQuA, a number GSM8K (math_10k
  is built from GSM8K, MAWPS and AQuA; its MAWPS items are recognised through MAWPS' own file), other
  text ``text``. The strata thus depend on which reference files the data directory holds (the mirror
  holds all five); they never depend on a run's seed.
- **How many.** A stratum of ``n`` records gives ``min(500, max(10% of n, min(200, 25% of n)))``:
  at least the floor of 200 items where the stratum has 800 records or more, 10% of it up to 500 above
  2,000. A smaller stratum gives a quarter of its records (below the floor: :func:`validation_sizes`
  reports the number), one under 4 records none. A file none of whose strata gives an item has no
  validation split: asking for it is one error line.
- **Upstream validation files.** Where the benchmark ships one (``UPSTREAM_VALIDATION``:
  ``dataset/mawps/validset.json``) and it is in the data directory, it is that stratum's validation set
  instead of a slice; the training file's records of that stratum all stay in training, except those
  asking one of its questions.
- **Held out.** No record asking the question of any validation record (of any stratum, upstream files
  included) is trained on.
- **Fixed.** Each stratum's sample is seeded by ``VALIDATION_SEED`` and the stratum's name. Changing these
  rules or constants changes every validation score (and so every tuning decision): they changed on
  2026-12-04 from one min(500, 10%) slice per file to these strata; validation scores from before do not
  compare with those after.

The lm-eval tasks score their stratum (``TASK_STRATA``; a custom task names one in its YAML metadata
``validation_stratum``), less any item asking a question of an LLM-Adapters test file in the data
directory (:func:`task_validation`).
"""

from __future__ import annotations

import collections
import random
import re
from harness.data.keys import record_key
from harness.errors import UserError

VALIDATION_SEED = 0
VALIDATION_FLOOR = 200  # items per source task, where the stratum has 4x as many records
FLOOR_SHARE = 0.25  # the most of a stratum the floor may take
VALIDATION_SHARE = 0.1
VALIDATION_MAX = 500

# Per-task upstream training files: their questions say which task a record of a mixed file comes from.
REFERENCE_FILES = {
    "boolq": "dataset/boolq/train.json",
    "arc_easy": "dataset/ARC-Easy/train.json",
    "arc_challenge": "dataset/ARC-Challenge/train.json",
    "openbookqa": "dataset/openbookqa/train.json",
    "mawps": "dataset/mawps/trainset.json",
}
# Upstream validation files: the validation set of their stratum.
UPSTREAM_VALIDATION = {"mawps": "dataset/mawps/validset.json"}
# The "Answer format" line of each commonsense task whose format is its own.
FORMAT_TASKS = {
    "true/false": "boolq",
    "solution1/solution2": "piqa",
    "answer1/answer2/answer3": "social_i_qa",
    "option1/option2": "winogrande",
    "ending1/ending2/ending3/ending4": "hellaswag",
}
# The stratum each LLM-Adapters test set is tuned on. AddSub, MultiArith and SingleEq are parts of MAWPS,
# and SVAMP varies MAWPS-style problems: with no training data of their own they are tuned on MAWPS'.
TASK_STRATA = {
    "boolq": "boolq", "piqa": "piqa", "social_i_qa": "social_i_qa", "hellaswag": "hellaswag",
    "winogrande": "winogrande", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
    "openbookqa": "openbookqa", "gsm8k": "gsm8k", "aqua": "aqua", "mawps": "mawps",
    "addsub": "mawps", "multiarith": "mawps", "singleeq": "mawps", "svamp": "mawps",
}

_ANSWER_FORMAT = re.compile(r"Answer format:\s*([\w/]+)\s*$")
_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER = re.compile(r"[A-E]")


def stratum_size(n: int) -> int:
    """How many of a stratum's ``n`` records are held out for validation (see the module text)."""
    return min(VALIDATION_MAX, max(int(VALIDATION_SHARE * n), min(VALIDATION_FLOOR, int(FLOOR_SHARE * n))))


def answer_stratum(record: dict) -> str:
    """The source task a record's answer implies (without reference files)."""
    found = _ANSWER_FORMAT.search(record["instruction"])
    if found:
        return FORMAT_TASKS.get(found.group(1), found.group(1))
    answer = str(record.get("answer", "")).strip()
    if _LETTER.fullmatch(answer):
        return "aqua"
    return "gsm8k" if _NUMBER.fullmatch(answer.replace(",", "")) else "text"


def stratify(records: list[dict], known: dict[bytes, str]) -> list[str]:
    """Each record's stratum (source task), in file order; ``known`` maps reference questions to their task."""
    return [known.get(record_key(r)) or answer_stratum(r) for r in records]


def split_strata(records: list[dict], known: dict[bytes, str],
                 upstream: dict[str, list[dict]]) -> tuple[list[dict], dict[str, list[dict]]]:
    """``(train, {stratum: validation records})``; validation records in file order, upstream files' as given.

    ``known``: reference questions -> task; ``upstream``: stratum -> its upstream validation records
    (records.load_validation reads both from the data directory).
    """
    strata = stratify(records, known)
    members: dict[str, list[int]] = collections.defaultdict(list)
    for index, stratum in enumerate(strata):
        members[stratum].append(index)
    chosen: set[int] = set()
    validation: dict[str, list[dict]] = {}
    for stratum, indices in members.items():
        if stratum in upstream:
            continue
        size = stratum_size(len(indices))
        picked = sorted(random.Random(f"validation-{VALIDATION_SEED}-{stratum}").sample(indices, size))
        chosen.update(picked)
        if picked:
            validation[stratum] = [records[i] for i in picked]
    for stratum, held in upstream.items():
        if stratum in members:  # only a stratum this file has: a commonsense file is not tuned on MAWPS
            validation[stratum] = held
    held_out = {record_key(r) for held in validation.values() for r in held}
    train = [r for i, r in enumerate(records) if i not in chosen and record_key(r) not in held_out]
    return train, validation


def no_validation_error(source: str, records: list[dict], known: dict[bytes, str]) -> UserError:
    counts = collections.Counter(stratify(records, known))
    listed = ", ".join(f"{s} {n}" for s, n in counts.most_common())
    return UserError(f"training data {source}: too small for a validation split: {len(records)} records "
                     f"({listed} per source task), and a source task gives validation items from 4 records up "
                     "(a quarter of them, 200 from 800); give a larger file, or score the test split")


def task_validation(strata: dict[str, list[dict]], stratum: str, test_keys: frozenset[bytes] | set[bytes],
                    source: str, name: str) -> list[dict]:
    """The validation items a task scores: its stratum, less any record asking a question of a test file."""
    records = [r for r in strata.get(stratum, []) if record_key(r) not in test_keys]
    if not records:
        have = ", ".join(f"{s} {len(v)}" for s, v in strata.items()) or "none"
        raise UserError(f"the validation split of {source} holds no item that the task on {name} can score "
                        f"(it is tuned on source task {stratum}; the split has: {have})")
    return records


def task_dataset(task: str) -> str:
    """``llm_adapters_boolq_mc`` -> ``boolq`` (a bare test-set name passes through)."""
    name = task.removeprefix("llm_adapters_")
    return name.removesuffix("_mc") if name.removesuffix("_mc") in TASK_STRATA else name
