"""What the diagnostics measure: the one registry of measures, and the record of a run's training dynamics.

:data:`MEASURES` is the only list of measures. diagnostics.csv's columns (:data:`COLUMNS`), the layer
``all`` row (:func:`summary_row`), the blanks of a row a measure is missing from, the table in
diagnostics.md (:data:`TABLE_COLUMNS`) and the ``diag/`` metrics logged to MLflow all follow from it.
To add a measure: one :class:`Measure` here, and the line that computes it (a layer's value in
:func:`harness.diagnostics.layer_rows`, a model-level one in :func:`harness.diagnostics.diagnose`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from harness import stats

LEVELS = ("none", "basic", "full")
ALL_LAYERS = "all"
# The columns that say whose row it is, before the measures.
KEYS = ("method", "spec_method", "seed", "layer")


def nan_mean(values) -> float:
    """The mean of the values that are not None or NaN (NaN when none are); an infinite value makes it infinite."""
    return stats.mean(float(v) for v in values if v is not None and not math.isnan(float(v)))


def root_sum_square(values) -> float:
    """sqrt(sum x^2): the Frobenius norm of the layers' updates taken together."""
    return math.sqrt(sum(v ** 2 for v in values))


@dataclass(frozen=True)
class Measure:
    """One column of diagnostics.csv.

    ``combine`` is how the layer ``all`` row summarises a per-layer measure from the layers' values; a
    measure without it is either text (blank on the ``all`` row) or model-level (set on the ``all`` row
    only, NaN on the layer rows). ``text`` measures are blank where missing and stay out of diagnostics.md's
    table of means.
    """

    name: str
    per_layer: bool
    combine: Callable[[Sequence], object] | None = None
    text: bool = False

    @property
    def missing(self):
        return "" if self.text else float("nan")


MEASURES = (
    Measure("shape", per_layer=True, text=True),
    Measure("delta_norm", per_layer=True, combine=root_sum_square),       # ||dW||_F of the whole update
    Measure("effective_rank", per_layer=True, combine=nan_mean),
    Measure("stable_rank", per_layer=True, combine=nan_mean),
    Measure("singular_values", per_layer=True, text=True),
    Measure("intruders", per_layer=True, combine=sum),                    # the total over layers
    Measure("similarity_to_lora", per_layer=True, combine=nan_mean),
    Measure("lambda_max", per_layer=False),
    Measure("forgetting", per_layer=False),
    Measure("steps_to_50", per_layer=False),
    Measure("steps_to_90", per_layer=False),
    Measure("final_loss", per_layer=False),
)

# The columns of diagnostics.csv, in order; model-level values are on the row with layer "all" only.
COLUMNS = ("method", "spec_method", "seed", "layer", *(m.name for m in MEASURES))
# The columns of diagnostics.md's table of means over seeds.
TABLE_COLUMNS = tuple(m.name for m in MEASURES if not m.text)


def summary_row(rows: Sequence[dict]) -> dict:
    """The layer ``all`` row from the layer rows: each per-layer measure combined as :data:`MEASURES` says."""
    total = {"layer": ALL_LAYERS}
    for m in MEASURES:
        if m.per_layer:
            total[m.name] = m.combine([r.get(m.name, float("nan")) for r in rows]) if m.combine else m.missing
    return total


def complete_row(row: dict) -> dict:
    """``row`` with every column of :data:`COLUMNS`, in order; a measure it lacks is blank (text) or NaN."""
    missing = {m.name: m.missing for m in MEASURES}
    return {c: row.get(c, missing.get(c, float("nan"))) for c in COLUMNS}


@dataclass
class Trace:
    """One (method, seed)'s training dynamics, as the report reads them (all lists of (step, value))."""

    method: str
    spec_method: str
    seed: int
    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    group_grad_norms: list = field(default_factory=list)
    delta_norms: list = field(default_factory=list)
    effective_ranks: list = field(default_factory=list)
    movements: list = field(default_factory=list)  # (step, ||dW_step - dW_previous record||_F per step)
    alignments: list = field(default_factory=list)  # (step, cos(that step's change of dW, -dL/dW0))
