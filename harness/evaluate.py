"""Score a model on the lm-eval tasks in harness/tasks/ (arithmetic, llm_adapters_math, llm_adapters_commonsense ...).

``evaluate(model, tokenizer, tasks, ...)`` runs lm-eval's ``simple_evaluate`` on the model object in
memory (a PeftModel too), offline, without touching the global random seeds, and returns an
``EvalResult``: per-task metrics under MLflow-safe names (``arithmetic_add_sub/exact_match``), one
primary score per task in [0, 1], and per-item samples for paired bootstraps.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harness import quiet
from harness.adapters.api import check_adapter_fits, load_adapter_model, read_adapter_folder
from harness.data import TRAIN_SETS, data_file, generate, records_checksum
from harness.data.files import resolve_data_dir
from harness.data.prompts import PROMPT_FORMATS
from harness.data.records import TEST_KEYS, TEST_SETS, read_records
from harness.errors import UserError, cli_entry
from harness.fsutil import atomic_path, write_text_atomic
from harness.models import DEFAULT_MODEL, PRECISIONS, load_model, resolve_precision, storage_dtype
from harness.quiet import offline_environment, quiet_lm_eval
from harness.tracking import git_commit, library_versions

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # shipped inside the package (and its wheel)
PRIMARY_FILTER = "answer"  # the filter every generation task scores with; multiple choice has "none"
PRIMARY_METRICS = ("exact_match", "acc")
DEFAULT_TASKS = ["arithmetic"]
SPLITS = ("validation", "test")  # what a run can score: tuning on validation, final numbers on test


@dataclass
class Sample:
    """One scored test item: enough to pair two runs item by item."""

    doc_id: int
    target: str
    response: str  # the filtered response (extracted answer) or the chosen choice index
    correct: int
    # what the model produced before filtering: the generated text, or each choice's log-likelihood (4 decimals);
    # equal outputs on every item mean an adapter changed nothing (see EvalResult.output_digests)
    output: str = ""


@dataclass
class EvalResult:
    """What an evaluation produced.

    ``metrics[task]`` maps MLflow-safe names (``task/metric`` or ``task/metric_filter``) to floats;
    ``scores[task]`` is the primary score in [0, 1] of each task and group; ``samples[task]`` the
    scored items of each task (not groups); ``raw`` is lm-eval's own results dict.
    """

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)

    def flat_metrics(self) -> dict[str, float]:
        """All metrics of all tasks in one dict, ready for ``mlflow.log_metrics``."""
        return {name: value for task_metrics in self.metrics.values() for name, value in task_metrics.items()}

    def leaf_scores(self) -> dict[str, float]:
        """Primary scores of the evaluated tasks themselves (not groups): what a run's average is taken over.

        Group aggregates stay in MLflow only, so the average over tasks does not count a group's items twice.
        """
        return {task: score for task, score in self.scores.items() if task in self.samples}

    def correctness(self) -> dict[str, dict[int, float]]:
        """Per task, each scored item's 0/1 verdict keyed by document id (for the paired bootstrap)."""
        return {task: {s.doc_id: float(s.correct) for s in samples} for task, samples in self.samples.items()}

    def output_digests(self) -> dict[str, str]:
        """Per task, a SHA-256 over every item's raw output in document order.

        Two systems with equal digests on a task produced the same text (or the same choice
        log-likelihoods) on every item of it: an adapter whose digests all equal the base model's
        was not applied, or changed nothing a greedy decode can see.
        """
        import hashlib

        digests = {}
        for task, samples in self.samples.items():
            digest = hashlib.sha256()
            for sample in sorted(samples, key=lambda s: s.doc_id):
                digest.update(f"{sample.doc_id}\x1f{sample.output}\x1e".encode())
            digests[task] = digest.hexdigest()
        return digests

    def write_samples(self, path: str | os.PathLike) -> Path:
        """The per-item samples as JSON lines (``task`` and every :class:`Sample` field), written atomically."""
        import json
        from dataclasses import asdict

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            for task, samples in self.samples.items():
                for sample in samples:
                    f.write(json.dumps({"task": task, **asdict(sample)}, default=str) + "\n")
        return path


def default_batch_size(model) -> int | str:
    """The batch size the harness picks: 16 on CPU (measured in benchmarks/bench_eval.py); lm-eval's "auto" on a GPU."""
    device = next(model.parameters()).device
    return "auto" if device.type == "cuda" else 16


def task_manager(data_dir: Path | str | None = None, prompt_format: str = "alpaca", split: str = "test"):
    """lm-eval's TaskManager over tasks/ only, passing the data directory, prompt format and split to the loaders.

    The loaders build only the ``split`` asked for, so scoring the test split never needs the files
    a validation split comes from (and the other way round). A run builds one, through its :class:`TaskSuite`.
    """
    from lm_eval.tasks import TaskManager

    if split not in SPLITS:
        raise UserError(f"--split: unknown split {split!r} (one of {', '.join(SPLITS)})")
    metadata = {"data_dir": str(resolve_data_dir(data_dir)), "prompt_format": prompt_format, "split": split}
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


def expand_tasks(tasks: list[str], manager, data_dir: Path | str | None = None) -> list[str]:
    """Check task names (UserError listing the known ones) and add HellaSwag to commonsense groups when its file exists."""
    known = set(manager.all_tasks)
    unknown = [name for name in tasks if name not in known]
    if unknown:
        visible = sorted(n for n in known if not n.startswith("_"))
        raise UserError(f"unknown task {', '.join(unknown)} (known: {', '.join(visible)})")
    expanded = list(tasks)
    hellaswag = resolve_data_dir(data_dir) / TEST_SETS["hellaswag"]
    for group, extra in (("llm_adapters_commonsense", "llm_adapters_hellaswag"),
                         ("llm_adapters_commonsense_mc", "llm_adapters_hellaswag_mc")):
        if group in tasks and extra not in tasks and hellaswag.is_file():
            expanded.append(extra)
    return expanded


def tasks_for_split(names: list[str], manager, split: str) -> list:
    """What to hand lm-eval so that it scores ``split``: the names for test, loaded tasks for validation.

    lm-eval scores a task's ``test_split`` whenever the YAML names one; for a validation run each
    leaf task is loaded and its ``test_split`` cleared, so lm-eval falls back to ``validation_split``
    (groups keep their structure and aggregates). A task without a validation split is a UserError.
    """
    if split == "test":
        return names
    objects = []
    for name in names:
        loaded = manager.load([name])
        for task_name, task in loaded["tasks"].items():
            if not task.has_validation_docs():
                raise UserError(f"--split validation: task {task_name} has no validation split "
                                "(its YAML needs validation_split); score it with --split test")
            task.config.test_split = None
        objects.append(loaded["groups"].get(name) or loaded["tasks"][name])
    return objects


class TaskSuite:
    """The tasks one run scores, and everything asked of them: one lm-eval TaskManager, built on first use.

    ``TaskSuite(tasks, data_dir, prompt_format, split)`` answers

    - :meth:`checksums`: each evaluated data set's SHA-256 (and the check of the names and files),
    - :meth:`documents`: every leaf task's documents in the split (what :mod:`harness.contamination` looks up),
    - :meth:`protocol`: each leaf task's YAML checksum, decoding and filters (what :mod:`harness.fingerprint`
      records),
    - :meth:`evaluate`: a model's scores (:func:`evaluate` is this on a suite of its own).

    ``harness.run`` builds one per run (a study worker's trials share one, :mod:`harness.reuse`) and hands
    it to each of them; the module-level functions
    (:func:`task_data_checksums`, :func:`evaluate`, ``contamination.scored_documents``,
    ``fingerprint.task_protocol``) each build one for a caller that has none.
    """

    def __init__(self, tasks: Sequence[str], data_dir: Path | str | None = None, prompt_format: str = "alpaca",
                 split: str = "test"):
        self.tasks = list(tasks)
        self.data_dir = data_dir
        self.prompt_format = prompt_format
        self.split = split
        self._manager = None
        self._names: list[str] | None = None

    @property
    def manager(self):
        """lm-eval's TaskManager (:func:`task_manager`), built once; an unknown split is a UserError here."""
        if self._manager is None:
            self._manager = task_manager(self.data_dir, self.prompt_format, self.split)
        return self._manager

    def names(self) -> list[str]:
        """The tasks and groups as asked, checked, with HellaSwag added to the commonsense groups (:func:`expand_tasks`)."""
        if self._names is None:
            self._names = expand_tasks(self.tasks, self.manager, self.data_dir)
        return list(self._names)

    def leaves(self) -> list[tuple[str, Any]]:
        """Each evaluated leaf task as ``(name, task index entry)``, groups walked into, in the order asked."""
        index = self.manager.task_index
        found: list[tuple[str, Any]] = []

        def visit(name: str) -> None:
            entry = index.get(name)
            if entry is None:
                return
            cfg = entry.cfg or {}
            if "group" in cfg:
                for sub in cfg.get("task", []):
                    visit(sub if isinstance(sub, str) else sub.get("task", ""))
                return
            found.append((name, entry))

        for name in self.names():
            visit(name)
        return found

    def checksums(self) -> dict[str, str]:
        """SHA-256 of each evaluated task's documents in the split: its data file(s), or the generated split.

        A validation split of an LLM-Adapters task also depends on the training set it is cut from
        (``validation_data``), whose checksum is added.

        Also checks the task names (an unknown task is a one-line UserError listing the known ones) and
        reads every data file as the task will (missing, not UTF-8, malformed: one line now, not after
        the base model's evaluation has started).
        """
        import hashlib

        checksums: dict[str, str] = {}
        for name, entry in self.leaves():
            meta = (entry.cfg or {}).get("metadata") or {}
            if meta.get("generator"):
                records = generate(meta["generator"], split=self.split, seed=int(meta.get("seed", 1234)))
                checksums[name] = records_checksum(records)
            elif meta.get("dataset") in TEST_SETS or meta.get("file"):
                paths = [meta.get("file") or TEST_SETS[meta["dataset"]]]
                if self.split == "validation" and meta.get("validation_data") in TRAIN_SETS:
                    paths.append(TRAIN_SETS[meta["validation_data"]])
                digest = hashlib.sha256()
                for i, relative in enumerate(paths):
                    path = Path(relative) if Path(relative).is_absolute() else data_file(relative, self.data_dir)
                    if i == 0:
                        read_records(path, TEST_KEYS)  # what the task's loader does: a bad file fails here, in one line
                    digest.update(path.read_bytes())
                checksums[name] = digest.hexdigest()
        return checksums

    def documents(self) -> dict[str, list[dict]]:
        """Every leaf task's documents in the split, as lm-eval will score them (all of them: ``--limit`` aside)."""
        manager = self.manager
        loaded = manager.load(tasks_for_split(self.names(), manager, self.split))
        return {name: [dict(d) for d in task.eval_docs] for name, task in loaded["tasks"].items()}

    def protocol(self) -> dict[str, dict[str, Any]]:
        """Per evaluated leaf task: a checksum of its YAML files (and the task folder's Python), its decoding
        settings and its answer filters, as lm-eval will read them (the fingerprint's ``task_protocol``)."""
        import hashlib

        out: dict[str, dict[str, Any]] = {}
        for name, entry in self.leaves():
            path = Path(entry.yaml_path) if getattr(entry, "yaml_path", None) else None
            if path is None or not path.is_file():
                continue
            merged: dict[str, Any] = {}
            for file in reversed(task_files(path)):  # includes first, the task's own keys win
                merged.update({k: v for k, v in _TaskLoader.load(file).items() if k != "include"})
            files = task_files(path) + sorted(path.parent.glob("*.py"))
            digest = hashlib.sha256()
            for file in files:
                digest.update(file.name.encode())
                digest.update(file.read_bytes())
            out[name] = {
                "yaml_sha256": digest.hexdigest(),
                "generation_kwargs": merged.get("generation_kwargs"),
                "filters": [f.get("name") for f in merged.get("filter_list") or [] if isinstance(f, dict)],
                "output_type": merged.get("output_type"),
            }
        return out

    def evaluate(self, model, tokenizer, *, limit: int | None = None, batch_size: int | str = 1, num_beams: int = 1,
                 log_samples: bool = True, max_batch_size: int = 64, precision: str = "fp32",
                 check_precision: bool = True) -> EvalResult:
        """Run lm-eval on an in-memory model: see :func:`evaluate`, which is this on a suite of its own."""
        offline_environment()
        if self.prompt_format not in PROMPT_FORMATS:
            raise UserError(f"unknown prompt format {self.prompt_format!r} (one of {', '.join(PROMPT_FORMATS)})")
        if num_beams < 1:
            raise UserError(f"num_beams={num_beams} must be at least 1")
        if limit is not None and limit < 1:
            raise UserError(f"limit={limit} must be a positive number of items")
        import logging

        import torch
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        quiet_lm_eval()

        # lm-eval warns once per custom-loaded task that metadata can be passed; we pass it.
        logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)

        manager = self.manager
        names = tasks_for_split(self.names(), manager, self.split)
        # lm-eval wraps every forward in its own autocast (disabled unless given a dtype): pass the training's
        # precision through it; log-softmax over the vocabulary stays fp32
        bf16 = (precision == "bf16" if not check_precision
                else resolve_precision(precision, next(model.parameters()).device) == "bf16")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  max_batch_size=max_batch_size, mixed_precision_dtype=torch.bfloat16 if bf16 else None,
                  softmax_dtype=torch.float32 if bf16 else None)
        was_training = model.training
        # lm-eval is told not to reseed, but it still draws from the global generators; restore them so
        # an evaluation in the middle of training leaves the training's random stream as it was.
        rng_state = _rng_state()
        try:
            output = simple_evaluate(
                model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=log_samples,
                gen_kwargs={"num_beams": num_beams, "do_sample": False} if num_beams > 1 else None,
                apply_chat_template=self.prompt_format == "chat",
                random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None,
                bootstrap_iters=0, verbosity="ERROR",
            )
        finally:
            model.train(was_training)
            _set_rng_state(rng_state)
        return _to_result(output)


class _TaskLoader:
    """Reads a task YAML file with lm-eval's ``!function`` tags kept as text."""

    @staticmethod
    def load(path: Path) -> dict:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
        return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader) or {}


def task_files(yaml_path: Path) -> list[Path]:
    """A task's YAML file followed by the files it includes, recursively, in include order."""
    seen: list[Path] = []

    def visit(path: Path) -> None:
        if path in seen or not path.is_file():
            return
        seen.append(path)
        include = _TaskLoader.load(path).get("include")
        for item in [include] if isinstance(include, str) else include or []:
            visit((path.parent / item).resolve())

    visit(Path(yaml_path).resolve())
    return seen


def task_data_checksums(tasks: list[str], data_dir: Path | str | None, prompt_format: str,
                        split: str = "test") -> dict[str, str]:
    """:meth:`TaskSuite.checksums` on a suite of its own: each evaluated data set's SHA-256, names and files checked."""
    return TaskSuite(tasks, data_dir, prompt_format, split).checksums()


def evaluate(model, tokenizer, tasks: list[str] | None = None, data_dir: Path | str | None = None,
             limit: int | None = None, batch_size: int | str = 1, num_beams: int = 1,
             prompt_format: str = "alpaca", log_samples: bool = True, max_batch_size: int = 64,
             split: str = "test", precision: str = "fp32", check_precision: bool = True) -> EvalResult:
    """Run lm-eval on an in-memory model (:meth:`TaskSuite.evaluate` on a suite of its own).

    ``precision`` is the training's (``fp32``, ``bf16`` or ``auto``, see
    :func:`harness.models.resolve_precision`): with bf16 the model runs under bf16 autocast, as in training.

    ``limit`` takes the first N items of each task; ``batch_size`` is a number or ``"auto"``;
    ``num_beams=4`` is the papers' decoding (greedy, 1, is the default: faster). ``prompt_format``
    must be the one used in training: ``alpaca`` or ``chat`` (the tokenizer's chat template).
    ``split`` is ``test`` (final numbers) or ``validation`` (tuning; see :func:`tasks_for_split`).
    ``check_precision=False`` runs bf16 even where the hardware emulates it slowly (harness.equivalence
    measures what bf16 does to the answers; nothing else should need it).
    """
    return TaskSuite(tasks or DEFAULT_TASKS, data_dir, prompt_format, split).evaluate(
        model, tokenizer, limit=limit, batch_size=batch_size, num_beams=num_beams, log_samples=log_samples,
        max_batch_size=max_batch_size, precision=precision, check_precision=check_precision)


def _rng_state():
    import random

    import numpy as np
    import torch

    return random.getstate(), np.random.get_state(), torch.random.get_rng_state()


def _set_rng_state(state) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.random.set_rng_state(state[2])


def mlflow_name(task: str, key: str) -> str | None:
    """``("gsm8k", "exact_match,answer")`` -> ``"gsm8k/exact_match"``; other filters become a suffix."""
    metric, _, filter_name = key.partition(",")
    if metric == "alias" or not filter_name:
        return None
    suffix = "" if filter_name in (PRIMARY_FILTER, "none") else f"_{filter_name}"
    return f"{task}/{metric}{suffix}".replace(",", "_").replace(" ", "_")


def _to_result(output: dict) -> EvalResult:
    result = EvalResult(raw=output)
    for task, values in {**output.get("results", {}), **output.get("groups", {})}.items():
        metrics = {}
        for key, value in values.items():
            name = mlflow_name(task, key)
            if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[name] = float(value)
        result.metrics[task] = metrics
        primary = next((metrics[f"{task}/{m}"] for m in PRIMARY_METRICS if f"{task}/{m}" in metrics), None)
        if primary is not None:
            result.scores[task] = primary
    for task, samples in (output.get("samples") or {}).items():
        # one sample per (item, filter): keep the primary filter's, so each item appears once
        result.samples[task] = [_sample(s) for s in samples if s.get("filter", "none") in (PRIMARY_FILTER, "none")]
    return result


def _sample(sample: dict) -> Sample:
    metric = "exact_match" if "exact_match" in sample else "acc"
    filtered = sample.get("filtered_resps")
    if metric == "acc" and filtered:
        # multiple choice: filtered_resps are (loglikelihood, is_greedy) per choice; report the argmax
        loglikelihoods = [float(item[0]) for item in filtered]
        response = str(max(range(len(loglikelihoods)), key=loglikelihoods.__getitem__))
        output = " ".join(f"{value:.4f}" for value in loglikelihoods)
    else:
        response = filtered[0] if isinstance(filtered, list) and filtered else str(filtered)
        raw = sample.get("resps")
        while isinstance(raw, list) and raw:  # [[text]] per item
            raw = raw[0]
        output = str(raw if raw is not None else response)
    return Sample(doc_id=int(sample["doc_id"]), target=str(sample["target"]), response=str(response),
                  correct=int(round(float(sample[metric]))), output=output)


def _batch_size_arg(text: str) -> int | str:
    """``--batch-size``: a positive whole number or ``auto``; argparse prints the refusal as one line, exit 2."""
    if text == "auto":
        return text
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1 or 'auto' (got {text!r})")
    return int(text)


@dataclass(frozen=True)
class AdapterSource:
    """An adapter to score, and what the run that saved it says about how it was trained.

    ``folder`` is the adapter folder (a harness save or a plain LoRA); ``name`` its label (``lora-seed0``) or
    folder name; ``run_config`` the config of the run that saved it (its result.json), empty when it came
    from elsewhere. Defaults for model, prompt format and tasks are read from there.
    """

    folder: Path
    name: str
    run_config: dict = field(default_factory=dict)

    def model(self) -> str | None:
        """The base model: the saving run's ``model``, else the adapter config's ``base_model_name_or_path``."""
        return self.run_config.get("model") or read_adapter_folder(self.folder).config().get("base_model_name_or_path")


def locate_adapter(path: str | os.PathLike, label: str | None = None) -> AdapterSource:
    """``results/<run>`` plus a label (``lora-seed0``, or ``lora`` when it has one seed), or an adapter folder.

    A one-line :class:`UserError` for a run folder without that label (naming the labels it has), and for
    a folder that is neither a run's nor an adapter's.
    """
    import json

    path = Path(path)
    if (path / "adapters").is_dir() and not (path / "adapter_config.json").exists():
        labels = sorted(p.name for p in (path / "adapters").iterdir() if p.is_dir())
        if label is None:
            raise UserError(f"{path} is a results folder: name one of its adapters with --label "
                            f"({', '.join(labels) or 'it has none'})")
        matches = [name for name in labels if name == label] or [n for n in labels if n.rsplit("-seed", 1)[0] == label]
        if len(matches) != 1:
            which = "several seeds" if matches else "no adapter"
            raise UserError(f"{path} has {which} for --label {label}: pass one of {', '.join(labels) or 'none'}")
        folder, run_dir = path / "adapters" / matches[0], path
    else:
        if label is not None:
            raise UserError(f"--label names an adapter inside a results folder; {path} is not one "
                            "(pass the results folder, or the adapter folder without --label)")
        folder = path
        run_dir = path.parent.parent if path.parent.name == "adapters" else None
    read_adapter_folder(folder)  # one line when it is not an adapter
    run_config: dict = {}
    if run_dir is not None and (run_dir / "result.json").is_file():
        try:
            run_config = json.loads((run_dir / "result.json").read_text()).get("config") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            run_config = {}
    return AdapterSource(folder, folder.name, run_config)


DESCRIPTION = """\
Score a model, or a model with an adapter, on the lm-eval tasks in harness/tasks/.

Without --adapter the base model is scored. With --adapter the adapter is loaded onto it as the
harness trained it (a folder saved by harness.run, results/<run>/adapters/<label>; a results folder
with --label; or any plain peft LoRA folder, such as one harness.export wrote). The model, prompt
format and tasks default to those of the run that saved the adapter.

Scores print as JSON. With --adapter (or --output-dir) the per-item samples are written as a run
writes them, samples/<name>.jsonl with one line per item (task, doc_id, target, the extracted
response, correct, the raw output), beside scores.json (scores, metrics and what was scored).
"""


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """``python -m harness.evaluate --model tiny-random --tasks arithmetic --limit 5``: print scores as JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m harness.evaluate", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"base model: a name, folder or hub id (default: the adapter's run's, else {DEFAULT_MODEL})")
    parser.add_argument("--adapter", default=None, metavar="FOLDER",
                        help="an adapter folder (harness save or plain LoRA), or a results folder with --label")
    parser.add_argument("--label", default=None, help="with a results folder as --adapter: which adapter (lora-seed0)")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated tasks or groups (default: the adapter's run's, else {DEFAULT_TASKS[0]})")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", default=None, type=_batch_size_arg,
                        help="a number or auto (default: the harness's pick)")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--prompt-format", default=None, choices=PROMPT_FORMATS,
                        help="alpaca or chat: the training's (default: the adapter's run's, else alpaca)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="the split to score (default: test)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 where the hardware runs it fast, else fp32 (default: auto)")
    parser.add_argument("--output-dir", default=None,
                        help="where scores.json and samples/ go (default with --adapter: results/evaluate/<name>)")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own warnings and logs")
    args = parser.parse_args(argv)
    quiet.configure(verbose=args.verbose)
    source = locate_adapter(args.adapter, args.label) if args.adapter else None
    if args.label and not source:
        raise UserError("--label needs --adapter (a results folder)")
    run = source.run_config if source else {}
    model_name = args.model or (source.model() if source else None) or DEFAULT_MODEL
    tasks_arg = args.tasks or ",".join(run.get("tasks") or DEFAULT_TASKS)
    tasks = [t.strip() for t in tasks_arg.split(",") if t.strip()]
    prompt_format = args.prompt_format or run.get("prompt_format") or "alpaca"
    data_dir = args.data_dir or run.get("data_dir")
    precision = resolve_precision(args.precision, "cpu")
    output_dir = Path(args.output_dir) if args.output_dir else (Path("results") / "evaluate" / source.name
                                                                if source else None)
    suite = TaskSuite(tasks, data_dir, prompt_format, args.split)
    checksums = suite.checksums()  # bad names, files: one line now
    model, tokenizer = load_model(model_name, dtype=storage_dtype(precision))
    if source is not None:
        check_adapter_fits(model, source.folder)
        model = load_adapter_model(model, source.folder)
    batch_size = args.batch_size or default_batch_size(model)
    batch_size = int(batch_size) if str(batch_size).isdigit() else batch_size
    result = suite.evaluate(model, tokenizer, limit=args.limit, batch_size=batch_size, num_beams=args.num_beams,
                            log_samples=output_dir is not None, precision=precision)
    print(json.dumps({"scores": result.scores, "metrics": result.flat_metrics()}, indent=1))
    if output_dir is not None:
        name = source.name if source else "base"
        samples = result.write_samples(output_dir / "samples" / f"{name}.jsonl")
        record = {"model": model_name, "adapter": str(source.folder) if source else None, "tasks": tasks,
                  "split": args.split, "limit": args.limit, "prompt_format": prompt_format, "precision": precision,
                  "num_beams": args.num_beams, "data_checksums": checksums, "versions": library_versions(),
                  "git_commit": git_commit(), "scores": result.scores, "metrics": result.flat_metrics()}
        write_text_atomic(output_dir / "scores.json", json.dumps(record, indent=1) + "\n")
        print(f"wrote {samples} and {output_dir / 'scores.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
