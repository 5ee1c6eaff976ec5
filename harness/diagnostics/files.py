"""diagnostics.csv and diagnostics.md (the claims, then every measure's mean ± sd), and the PNGs, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from harness.diagnostics.claims import claims_markdown, mean_sd_text
from harness.diagnostics.curvature import HESSIAN_EXAMPLES, HESSIAN_MAX_ITER, HESSIAN_TOL
from harness.diagnostics.measures import ALL_LAYERS, COLUMNS, TABLE_COLUMNS, Trace
from harness.diagnostics.plots import plot_convergence, plot_grad_norms, plot_spectra
from harness.diagnostics.spectra import SIMILARITY_TOP_K
from harness.fsutil import atomic_path, write_text_atomic


def _table_markdown(rows: Sequence[dict]) -> list[str]:
    """Per method, mean ± sd over seeds of the ``all`` row's columns."""
    columns = TABLE_COLUMNS
    totals = [r for r in rows if r["layer"] == ALL_LAYERS]
    lines = ["| method | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for method in dict.fromkeys(r["method"] for r in totals):
        mine = [r for r in totals if r["method"] == method]
        cells = [mean_sd_text([float(r[c]) for r in mine]) for c in columns]
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    return lines


def diagnostics_markdown(rows: Sequence[dict], traces: Sequence[Trace], *, failed: Sequence[tuple[str, int]] = (),
                         level: str = "basic", sample: str | None = None, problems: Sequence[str] = (),
                         learning_rates: Mapping[str, float] | None = None) -> str:
    lines = ["# Diagnostics", "", claims_markdown(rows, traces, learning_rates), "## All measurements", "",
             "Means ± sd over seeds of the layer `all` rows of diagnostics.csv: delta_norm is ||dW||_F of the "
             "whole update, effective_rank and stable_rank are means over the adapted layers, intruders the "
             "total over layers (top 10 singular vectors, threshold 0.5), similarity_to_lora the mean over "
             f"layers (top {SIMILARITY_TOP_K} left singular vectors), steps in optimizer steps. "
             "What each number means: docs/diagnostics.md.", "", *_table_markdown(rows), ""]
    if level != "full":
        lines.append("lambda_max was not measured (level `basic`; `--diagnostics full` adds it).")
    else:
        lines.append(f"lambda_max: largest Hessian eigenvalue of the training loss w.r.t. the adapter parameters "
                     f"at initialisation, {HESSIAN_EXAMPLES} training examples, fp32, Lanczos to a relative "
                     f"residual of {HESSIAN_TOL:g} (at most {HESSIAN_MAX_ITER} iterations).")
    if sample:
        lines.append(f"forgetting: mean per-token cross-entropy after training minus before (adapter disabled) on {sample}.")
    if failed:
        lines += ["", "Failed runs (no diagnostics; not in the statistics): "
                  + ", ".join(f"{m} seed {s}" for m, s in failed) + "."]
    if problems:
        lines += ["", "Measurements that could not be made:", *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n"


def write_diagnostics(run_dir: str | os.PathLike, rows: Sequence[dict], traces: Sequence[Trace], *,
                      failed: Sequence[tuple[str, int]] = (), level: str = "basic",
                      sample: str | None = None, problems: Sequence[str] = (),
                      learning_rates: Mapping[str, float] | None = None) -> dict[str, Path]:
    """Write diagnostics.csv, diagnostics.md, spectra.png, grad_norms.png and convergence.png, atomically."""
    import csv

    run_dir = Path(run_dir)
    written: dict[str, Path] = {}
    with atomic_path(run_dir / "diagnostics.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows([{c: (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in COLUMNS}
                              for r in rows])
    written["diagnostics.csv"] = run_dir / "diagnostics.csv"
    written["diagnostics.md"] = write_text_atomic(
        run_dir / "diagnostics.md",
        diagnostics_markdown(rows, traces, failed=failed, level=level, sample=sample, problems=problems,
                             learning_rates=learning_rates))
    written["spectra.png"] = plot_spectra(rows, run_dir / "spectra.png")
    written["grad_norms.png"] = plot_grad_norms(traces, run_dir / "grad_norms.png")
    written["convergence.png"] = plot_convergence(traces, run_dir / "convergence.png")
    return written
