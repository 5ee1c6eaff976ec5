"""The learning rates a run uses when none is given: each method's rate from the shipped fair study.

``python -m harness.run`` with no ``--lr`` (and no ``lr=`` in a method's spec) trains each method at the
rate the fair study chose for it on the validation split (results/findings/fair-paper: stage 1 of the
findings, every method tuned on the same grid and budget). The table applies to a method only where the
run is set up as the study was on what decides the rate's meaning: the same model and the same adapter
(method, rank, alpha, dropout, targets, initialisation); any other method or setup trains at
``DEFAULT_LR``, and summary.md says which rate each method got and why. Steps, batch and data may differ;
summary.md then names the difference, because a rate chosen for one budget is only a starting point for
another.

``--lr`` sets one rate for every method (the old behaviour) and a spec's ``lr=`` sets one method's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from harness.adapters.spec import AdapterSpec, parse_spec

# The fallback rate: with so few steps the usual 2e-4 barely moves the adapter; 2e-3 was measured to train
# every method without divergence on CPU for r=16 (the harness's earlier 50-step runs).
DEFAULT_LR = 2e-3

SPEC, COMMAND_LINE, TABLE, DEFAULT = "the method's spec (lr=)", "--lr", "tuned", "default"


@dataclass(frozen=True)
class RateTable:
    """Rates chosen by one fair study, with the setup they were chosen under."""

    study: str  # the findings folder that chose them
    commit: str  # the commit that ships that study's report
    model: str
    max_steps: int
    batch_size: int
    rank: int
    alpha: float
    dropout: float
    rates: dict[str, float] = field(default_factory=dict)  # method spec as the study wrote it -> rate
    # what targets=auto resolved to on the study's model: a run's spec matches before or after its resolution
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

    def reference_spec(self, method: str) -> AdapterSpec:
        return parse_spec(method, r=self.rank, alpha=self.alpha, dropout=self.dropout, targets=list(self.targets))

    def key(self, spec: AdapterSpec) -> str:
        """The spec's canonical text with its targets resolved as the study's were (auto: the table's targets)."""
        targets = self.targets if spec.targets is None else spec.targets
        return dataclasses.replace(spec, targets=tuple(sorted(targets))).canonical()


# Stage 1 of the findings (issue 20): each rate is the one the fair study chose on the smoothed validation
# curve (results/findings/fair-paper/verdict.csv, chosen_lr). Rewrite this table from a new verdict.csv,
# never from test scores.
FAIR_PAPER = RateTable(
    study="results/findings/fair-paper", commit="1f05959", model="smollm2-135m-instruct",
    max_steps=100, batch_size=16, rank=16, alpha=32.0, dropout=0.0,
    rates={"lora": 0.0017782794100389228, "moslora": 0.001, "linchain": 0.0031622776601683794},
)


def rate_for(cfg: Any, spec: AdapterSpec | None, table: RateTable = FAIR_PAPER) -> tuple[float, str]:
    """(learning rate, where it came from) for one method of the run ``cfg`` (a RunConfig).

    The spec's ``lr=`` wins, then ``cfg.lr`` (``--lr``), then the table where the run's model and this exact
    adapter are the study's, else :data:`DEFAULT_LR`.
    """
    if getattr(spec, "lr", None) is not None:
        return float(spec.lr), SPEC
    if cfg.lr is not None:
        return float(cfg.lr), COMMAND_LINE
    if spec is not None and cfg.model == table.model:  # no spec: the settings of no method in particular
        for method, lr in table.rates.items():
            if table.key(table.reference_spec(method)) == table.key(spec):
                return lr, TABLE
    return DEFAULT_LR, DEFAULT


def differences(cfg: Any, table: RateTable = FAIR_PAPER) -> list[str]:
    """How this run's training budget differs from the one the table's rates were chosen under."""
    found = []
    if cfg.max_steps != table.max_steps:
        found.append(f"{cfg.max_steps if cfg.max_steps is not None else f'{cfg.epochs:g} epoch(s) of'} steps here, "
                     f"{table.max_steps} there")
    if cfg.batch_size * cfg.grad_accum != table.batch_size:
        found.append(f"batch {cfg.batch_size * cfg.grad_accum} here, {table.batch_size} there")
    return found


def header_line(cfg: Any, specs: dict[str, AdapterSpec], table: RateTable = FAIR_PAPER) -> str | None:
    """summary.md's line on where each method's rate came from, or None when ``--lr`` set one for all."""
    if cfg.lr is not None and not any(s.lr is not None for s in specs.values()):
        return None
    parts, tuned = [], False
    for label, spec in specs.items():
        lr, source = rate_for(cfg, spec, table)
        tuned = tuned or source == TABLE
        parts.append(f"`{label}` {lr:.3g} ({source})")
    line = "; ".join(parts)
    if tuned:
        line += (f". 'tuned': chosen on the validation split by the fair study {table.study} (commit "
                 f"{table.commit}) for {table.model}")
        gaps = differences(cfg, table)
        if gaps:
            line += f", under another budget ({'; '.join(gaps)}), so treat it as a starting point"
    if any(rate_for(cfg, s, table)[1] == DEFAULT for s in specs.values()):
        line += f". 'default': no tuned rate for this method or setup, the fallback {DEFAULT_LR:g}"
    return line + ". --lr sets one rate for all."
