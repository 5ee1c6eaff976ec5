"""Training and test records in the LLM-Adapters schema: ``{"instruction", "input", "output", "answer"}``.

``load_records(source)`` reads a named set, a local JSON/JSONL file, a URL, or the arithmetic
generator (``arithmetic`` or ``arithmetic:<options>``). MAWPS' raw schema (``original_text``,
``equation``, ``ans``) is converted on the way in.

Every file has a validation split, held out from training and the same whatever the run's seed:
per source task (stratum) a seeded sample with a floor of about 200 items, or the benchmark's own
validation file where one exists (:mod:`harness.data.validation` says how, and what changed on
2026-12-04). ``load_records(source)`` returns the training records, ``load_records(source,
split="validation")`` every stratum's validation records, ``load_validation(source)`` them by stratum;
the lm-eval tasks each score their stratum (harness/tasks/README.md). A training record asking the
same question as a held-out one (normalised as in :mod:`harness.contamination`) is held out too,
so no question is on both sides. The generator has its own three disjoint splits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import urllib.error
from pathlib import Path

from harness.data.keys import record_key
from harness.data import arithmetic, validation as strata
from harness.data.files import data_file, download_file, resolve_data_dir
from harness.errors import UserError

DEFAULT_TRAIN_DATA = "arithmetic"

# Named training sets: upstream paths inside the data directory.
TRAIN_SETS = {
    "math_data": "ft-training_set/math_data.json",
    "math_10k": "ft-training_set/math_10k.json",
    "commonsense_170k": "ft-training_set/commonsense_170k.json",
    "arc_challenge": "dataset/ARC-Challenge/train.json",
    "arc_easy": "dataset/ARC-Easy/train.json",
    "boolq": "dataset/boolq/train.json",
    "openbookqa": "dataset/openbookqa/train.json",
    "mawps": "dataset/mawps/trainset.json",
}

# The evaluation files the lm-eval tasks read.
TEST_SETS = {
    "gsm8k": "dataset/gsm8k/test.json",
    "svamp": "dataset/SVAMP/test.json",
    "addsub": "dataset/AddSub/test.json",
    "multiarith": "dataset/MultiArith/test.json",
    "singleeq": "dataset/SingleEq/test.json",
    "mawps": "dataset/mawps/test.json",
    "aqua": "dataset/AQuA/test.json",
    "boolq": "dataset/boolq/test.json",
    "piqa": "dataset/piqa/test.json",
    "social_i_qa": "dataset/social_i_qa/test.json",
    "arc_easy": "dataset/ARC-Easy/test.json",
    "arc_challenge": "dataset/ARC-Challenge/test.json",
    "openbookqa": "dataset/openbookqa/test.json",
    "winogrande": "dataset/winogrande/test.json",
    "hellaswag": "dataset/hellaswag/test.json",
}

TRAIN_KEYS = ("instruction", "output")
TEST_KEYS = ("instruction", "answer")

# The validation split's constants (fixed on purpose: changing them changes every validation score).
VALIDATION_MAX, VALIDATION_SHARE, VALIDATION_SEED = strata.VALIDATION_MAX, strata.VALIDATION_SHARE, strata.VALIDATION_SEED


def load_records(source: str, data_dir: Path | str | None = None, limit: int | None = None, seed: int = 0,
                 sample: bool = True, split: str = "train") -> list[dict]:
    """Records of ``split`` (``train`` or ``validation``) of a named set, a local path, a URL or ``arithmetic[:options]``.

    ``limit`` keeps a tiny subset for smoke runs: a seeded sample of ``limit`` records in their
    original order (``sample=False``: the first ``limit``). Bad input raises UserError.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit={limit} must be a positive number of records")
    if source == "arithmetic" or source.startswith("arithmetic:"):
        spec = arithmetic.parse_spec(source)
        if limit is not None and limit < spec.n:
            spec = arithmetic.ArithmeticSpec(**{**spec.__dict__, "n": limit})
        return arithmetic.generate(spec, split=split, seed=seed)
    if split not in ("train", "validation"):
        raise UserError(f"unknown split {split!r} of {source} (a data file has train and validation)")
    root = resolve_data_dir(data_dir)
    read = read_records(_locate(source, data_dir), TRAIN_KEYS)
    known = reference_keys(root)
    train, by_stratum = strata.split_strata(read, known, upstream_validation(root))
    if split == "train" and not train:
        # the held-out slice takes every record asking its questions: a file of one question repeated (or of
        # empty instructions, which all ask the same "") leaves nothing to train on; say so before any model work
        questions = len({record_key(r) for r in read})
        raise UserError(f"training data {source}: no training examples are left: its {len(read)} records ask "
                        f"{questions} distinct question(s) (duplicates or empty instructions), and records asking "
                        "a held-out validation question leave training; give a file of distinct, non-empty "
                        "instructions")
    if split == "validation" and not by_stratum:
        raise strata.no_validation_error(source, read, known)
    records = train if split == "train" else [r for held in by_stratum.values() for r in held]
    return subset(records, limit, seed) if sample else records[:limit]


def load_validation(source: str, data_dir: Path | str | None = None) -> dict[str, list[dict]]:
    """A training file's validation records by stratum (source task); a file too small for any is one error."""
    if source == "arithmetic" or source.startswith("arithmetic:"):
        raise UserError(f"{source}: the generator's validation split is not stratified; use load_records")
    root = resolve_data_dir(data_dir)
    read = read_records(_locate(source, data_dir), TRAIN_KEYS)
    known = reference_keys(root)
    _, by_stratum = strata.split_strata(read, known, upstream_validation(root))
    if not by_stratum:
        raise strata.no_validation_error(source, read, known)
    return by_stratum


def reference_keys(root: Path) -> dict[bytes, str]:
    """question key -> task, from the per-task upstream files (strata.REFERENCE_FILES) present in ``root``."""
    keys: dict[bytes, str] = {}
    for task, relative in strata.REFERENCE_FILES.items():
        if (Path(root) / relative).is_file():
            for record in read_records(Path(root) / relative, TRAIN_KEYS):
                keys.setdefault(record_key(record), task)
    return keys


def upstream_validation(root: Path) -> dict[str, list[dict]]:
    """stratum -> records of the upstream validation files (strata.UPSTREAM_VALIDATION) present in ``root``."""
    return {task: read_records(Path(root) / relative, TRAIN_KEYS)
            for task, relative in strata.UPSTREAM_VALIDATION.items() if (Path(root) / relative).is_file()}


def validation_sizes(train_source: str, tasks: list[str] | tuple[str, ...],
                     data_dir: Path | str | None = None) -> dict[str, int]:
    """task -> number of validation items it scores when tuning a model trained on ``train_source``.

    ``tasks`` are LLM-Adapters task names (``llm_adapters_boolq``, ``llm_adapters_boolq_mc``) or test-set
    names (``boolq``); the keys of the result are the names as given. A task whose stratum is empty raises
    the UserError its validation run would; so does a training file too small for any validation.
    """
    root = resolve_data_dir(data_dir)
    by_stratum = load_validation(train_source, root)
    banned = test_keys(root)
    sizes = {}
    for task in tasks:
        dataset = strata.task_dataset(task)
        if dataset not in strata.TASK_STRATA:
            raise UserError(f"validation_sizes: {task} is not an LLM-Adapters task "
                            f"(known: {', '.join(strata.TASK_STRATA)})")
        sizes[task] = len(strata.task_validation(by_stratum, strata.TASK_STRATA[dataset], banned, train_source,
                                                 dataset))
    return sizes


def split_validation(records: list[dict], data_dir: Path | str | None = None) -> tuple[list[dict], list[dict]]:
    """``(train, validation)`` of records, validation of every stratum together (:func:`strata.split_strata`)."""
    root = resolve_data_dir(data_dir)
    train, by_stratum = strata.split_strata(records, reference_keys(root), upstream_validation(root))
    return train, [r for held in by_stratum.values() for r in held]


def test_keys(data_dir: Path | str | None = None) -> frozenset[bytes]:
    """The questions of every LLM-Adapters test file present in the data directory (read once per version)."""
    paths = tuple(resolve_data_dir(data_dir) / path for path in TEST_SETS.values())
    return _cached_test_keys(tuple((path, file_stamp(path)) for path in paths))


def file_stamp(path: Path) -> tuple[int, int] | None:
    """What tells a changed file from a cached one: modification time and size (None when absent)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _cached_test_keys(files: tuple) -> frozenset[bytes]:
    return frozenset(record_key(r) for path, stamp in files if stamp is not None
                     for r in read_records(path, TEST_KEYS))


def load_test_records(name: str, data_dir: Path | str | None = None) -> list[dict]:
    """The evaluation records of a named test set (``gsm8k``, ``boolq`` ...)."""
    if name not in TEST_SETS:
        raise UserError(f"unknown test set {name!r} (known: {', '.join(TEST_SETS)})")
    return read_records(data_file(TEST_SETS[name], resolve_data_dir(data_dir)), TEST_KEYS)


def subset(records: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """A seeded sample of ``limit`` records, kept in their original order."""
    if limit is None or limit >= len(records):
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def records_checksum(records: list[dict]) -> str:
    """SHA-256 of records' content (files and generated data alike): what the protocol fingerprint hashes."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def read_text(path: Path) -> str:
    """A data file's text, or a one-line UserError (unreadable, or not UTF-8, which is what JSON is)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read data file {path}: {err.strerror or err}") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"data file {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}): "
                        "save it as UTF-8 JSON") from err


def parse_json(path: Path, text: str) -> object:
    """A JSON document, or for ``.jsonl`` a list of one value per non-empty line; errors name the real line."""
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as err:  # err.lineno counts within the line: always 1
            raise UserError(f"{path} is not valid JSON Lines ({err.msg} at line {number}, column {err.colno})") from err
    return values


def read_records(path: Path, required: tuple[str, ...] = TRAIN_KEYS) -> list[dict]:
    """Read a JSON list or JSONL file into checked records (MAWPS' raw schema converted)."""
    raw = parse_json(path, read_text(path))
    if not isinstance(raw, list):
        raise UserError(f"{path} must hold a JSON list of records, not a {type(raw).__name__}")
    if not raw:
        raise UserError(f"{path} holds no records")
    records = []
    for index, item in enumerate(raw):
        if isinstance(item, dict) and "original_text" in item and "ans" in item:
            item = _from_mawps(item)
        if not isinstance(item, dict):
            raise UserError(f"{path}: record {index} is a {type(item).__name__}, not an object")
        missing = [key for key in required if not isinstance(item.get(key), str)]
        if missing:
            raise UserError(f"{path}: record {index} lacks {', '.join(missing)} "
                            f"(LLM-Adapters records have instruction, input, output, answer)")
        records.append({"instruction": item["instruction"], "input": item.get("input") or "",
                        "output": item.get("output") or "", "answer": str(item.get("answer") or "")})
    return records


def _from_mawps(item: dict) -> dict:
    """MAWPS' raw schema -> LLM-Adapters schema; the equation is the worked answer."""
    answer = float(item["ans"])
    answer_text = str(int(answer)) if answer.is_integer() else str(answer)
    equation = re.sub(r"^\s*[xX]\s*=\s*", "", str(item.get("equation", "")))
    return {"instruction": item["original_text"].strip(), "input": "",
            "output": f"{equation} = {answer_text}. The answer is {answer_text}.", "answer": answer_text}


def _locate(source: str, data_dir: Path | str | None) -> Path:
    if source in TRAIN_SETS:
        return data_file(TRAIN_SETS[source], resolve_data_dir(data_dir))
    if source.startswith(("http://", "https://")):
        name = source.rstrip("/").rsplit("/", 1)[-1] or "data.json"
        target = resolve_data_dir(data_dir) / "downloads" / f"{hashlib.sha256(source.encode()).hexdigest()[:12]}-{name}"
        if not target.is_file():
            try:
                download_file(source, target)
            except (urllib.error.URLError, OSError, TimeoutError) as err:
                raise UserError(f"cannot download {source} ({getattr(err, 'reason', err)}): "
                                "download it yourself and pass the local path") from err
        return target
    path = Path(source).expanduser()
    if path.is_file():
        return path
    raise UserError(f"training data {source!r} is not a named set ({', '.join(['arithmetic', *TRAIN_SETS])}), "
                    "an existing file or a URL")
