"""What the runs of one process share when they differ only in the trial: computed once, then reused.

A study runs many short trials on one base model, one task list and one precision. The parts of a run
that do not depend on the trial are

- the base model and its tokenizer (loaded, and converted on first use),
- the task suite (lm-eval's TaskManager indexes every task folder; the checksums, documents and protocol),
- the base model's diagnostics: W0's SVD per adapted layer and its loss on the forgetting sample.

Inside ``with shared_fixed_costs():`` (the study worker's loop), :func:`harness.run.run` takes them from
one :class:`FixedCosts` instead of computing them again for every trial; outside it, each run computes
its own, as before. Nothing here changes a number: the base model is never modified (every method trains
a deep copy, :func:`harness.adapters.fresh_adapter_model`), and the cached values are functions of it
alone. ``benchmarks/bench_trial_overhead.py`` measures what it saves per trial.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BaseMeasures:
    """The base model's side of the diagnostics: W0's SVD by layer name, the forgetting sample and the base
    model's mean token loss on it (filled on first use by :class:`harness.diagnostics.RunDiagnostics`)."""

    spectra: dict[str, Any] = field(default_factory=dict)  # layer name -> harness.diagnostics.BaseSpectrum
    sample: Any = None  # harness.diagnostics.GeneralTextSample
    loss: float | None = None


class FixedCosts:
    """One process's base models, task suites and base measures, each keyed by what decides it."""

    def __init__(self) -> None:
        self._models: dict[tuple, tuple[Any, Any]] = {}
        self._suites: dict[tuple, Any] = {}
        self._measures: dict[int, tuple[Any, BaseMeasures]] = {}  # id(model) -> (model, its measures)
        self.hits = 0  # how many times a run took something already here (the tests and the benchmark read it)

    def model(self, name: str, dtype, device) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of ``name`` in ``dtype`` on ``device``, loaded once."""
        from harness.models import load_model  # looked up per call: tests replace harness.models.load_model

        key = (name, str(dtype), str(device))
        if key in self._models:
            self.hits += 1
        else:
            model, tokenizer = load_model(name, dtype=dtype)
            self._models[key] = (model.to(device), tokenizer)
        return self._models[key]

    def suite(self, tasks, data_dir: Path | str | None, prompt_format: str, split: str):
        """The :class:`harness.evaluate.TaskSuite` of these tasks, data folder, prompt format and split."""
        from harness.evaluate import TaskSuite

        key = (tuple(tasks), str(Path(data_dir).resolve()) if data_dir is not None else None, prompt_format, split)
        if key in self._suites:
            self.hits += 1
        else:
            self._suites[key] = TaskSuite(tasks, data_dir, prompt_format, split)
        return self._suites[key]

    def base_measures(self, model) -> BaseMeasures:
        """The base measures of ``model`` (held here with them, so its ``id`` is never another object's)."""
        held = self._measures.get(id(model))
        if held is not None and held[0] is model:
            self.hits += 1
        else:
            self._measures[id(model)] = held = (model, BaseMeasures())
        return held[1]


_shared: FixedCosts | None = None


@contextlib.contextmanager
def shared_fixed_costs(fixed: FixedCosts | None = None) -> Iterator[FixedCosts]:
    """Within the block, every :func:`harness.run.run` of this process shares one :class:`FixedCosts`
    (``fixed``, or a new one)."""
    global _shared
    previous, _shared = _shared, fixed if fixed is not None else FixedCosts()
    try:
        yield _shared
    finally:
        _shared = previous


def current() -> FixedCosts | None:
    """The :class:`FixedCosts` of the enclosing :func:`shared_fixed_costs` block, or None outside one."""
    return _shared
