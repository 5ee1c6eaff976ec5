"""Contamination: how many of the items a run will score are already in its training data.

Before any training, ``harness.run`` hashes every training record's normalised instruction and
input, and looks up every document of every task in the split the run scores (``--split``). The
share of a task's documents found in training is its overlap. It is recorded for every task (MLflow
metrics ``contamination/<task>``, the summary's header, ``RunOutcome.contamination``), and:

- an overlap above :data:`LIMIT` with a **test** split stops the run before training, with one line
  naming the tasks, their shares and ``--allow-contamination``;
- with ``--allow-contamination`` (or on a validation split, where the run only warns) the run goes
  on and those tasks are marked contaminated (``RunOutcome.contaminated``, ``SystemResult.contaminated``)
  so that every table can flag their scores.

Normalisation is lower-casing and collapsing runs of white space, which is what makes a copy of a
test question in a training file visible (the LLM-Adapters ``math_data`` set contains about 80% of
the gsm8k, SVAMP, AddSub, MultiArith, SingleEq and AQuA test questions this way). It does not catch
paraphrases, and a generated arithmetic problem's commuted twin is the generator's business (its
splits are disjoint by construction, see ``harness.data.arithmetic``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from harness.data.keys import normalise, record_key, record_keys  # noqa: F401  (re-exported)
from harness.errors import UserError
from harness.evaluate import TaskSuite

LIMIT = 0.01  # an overlap above 1% of a test split stops the run


@dataclass(frozen=True)
class Overlap:
    """How many of one task's documents (in one split) the training data contains."""

    task: str
    split: str
    items: int
    in_training: int

    @property
    def share(self) -> float:
        return self.in_training / self.items if self.items else 0.0

    @property
    def contaminated(self) -> bool:
        return self.share > LIMIT


def overlaps(training: Iterable[Mapping], documents: Mapping[str, Sequence[Mapping]], split: str) -> dict[str, Overlap]:
    """Per task, the overlap of its documents with the training records (tasks :func:`unchecked` names are left out)."""
    keys = record_keys(training)
    skip = set(unchecked(documents))
    return {task: Overlap(task, split, len(docs), sum(record_key(d) in keys for d in docs))
            for task, docs in documents.items() if task not in skip}


def check(found: Mapping[str, Overlap], allow: bool) -> set[str]:
    """The contaminated tasks; raises UserError when one is a test split and ``allow`` is false."""
    bad = sorted((o for o in found.values() if o.contaminated), key=lambda o: -o.share)
    blocking = [o for o in bad if o.split == "test"]
    if blocking and not allow:
        shares = ", ".join(f"{o.task} {100 * o.share:.1f}% ({o.in_training}/{o.items})" for o in blocking)
        raise UserError(f"the training data contains test items of {shares} (above {100 * LIMIT:g}%): train on "
                        "data without them (e.g. math_10k, not math_data) or pass --allow-contamination, "
                        "which marks those scores contaminated")
    return {o.task for o in bad}


def scored_documents(tasks: Sequence[str], data_dir: Path | str | None, prompt_format: str,
                     split: str) -> dict[str, list[dict]]:
    """Every leaf task's documents in ``split``, as lm-eval will score them (all of them: ``--limit`` aside).

    A task whose documents have no ``instruction`` field (a task not built on the harness's loaders)
    cannot be checked and is left out; :func:`unchecked` names it. This is
    :meth:`harness.evaluate.TaskSuite.documents` on a suite of its own (a run asks its own suite).
    """
    return TaskSuite(tasks, data_dir, prompt_format, split).documents()


def unchecked(documents: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """Tasks whose documents carry no instruction to compare."""
    return [task for task, docs in documents.items() if docs and "instruction" not in docs[0]]
