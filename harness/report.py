"""The results report: summary table, paired-bootstrap gains, plots, written atomically.

Given the base model's evaluation and one :class:`SystemResult` per (method, seed),
:func:`write_report` writes into ``results/<run name>/``:

- ``summary.csv`` / ``summary.md``: one row per method (mean and std over seeds) plus the
  base row: trainable parameters, each task's score, the average, train time, seconds per
  step, tokens per second, peak memory, and the gain in average accuracy over the base
  model and over LoRA with a 95% confidence interval;
- ``loss_curves.png``: training loss against step, one line per method (as in the LinChain
  paper's Figure 2);
- ``scores.png``: each task's score per method, with std-over-seeds error bars;
- ``config.yaml`` when given the run's :class:`~harness.config.RunConfig`.

The confidence interval is a *paired* bootstrap (:func:`paired_bootstrap`): both systems are
scored on the same resampled test items (resampled within each task) and, where both were
trained with the same seeds, on the same resampled seeds; the statistic is the difference in
average accuracy (the mean over tasks of the per-task accuracy). Pairing removes the variance
of "which items happened to be in the test set", so real differences show with fewer items.

Every file is written to a temporary name and renamed into place, so an interrupted run
leaves either a complete file or none.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from harness.fsutil import atomic_path, write_text_atomic  # noqa: F401 (re-exported for callers)

if TYPE_CHECKING:
    import pandas as pd

    from harness.config import RunConfig

BASE = "base"
REFERENCE_METHOD = "lora"
N_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass
class SystemResult:
    """One evaluated system: the base model (``method="base"``, ``seed=None``) or one method trained with one seed.

    ``scores`` holds each task's primary score in [0, 1]; ``correct`` each task's per-item
    correctness (doc id -> 0 or 1), which the bootstrap resamples. ``error`` is set when the run
    failed (e.g. a NaN loss): the row says so and the statistics leave the run out.
    """

    method: str
    seed: int | None = None
    scores: dict[str, float] = field(default_factory=dict)
    correct: dict[str, dict[Any, float]] = field(default_factory=dict)
    trainable_params: int = 0
    train_seconds: float = float("nan")
    seconds_per_step: float = float("nan")
    tokens_per_second: float = float("nan")
    peak_memory_mb: float = float("nan")
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
    # Tasks whose scores are contaminated (the training data holds more than 1% of their items; set by
    # harness.run under --allow-contamination): tables must mark these scores.
    contaminated: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Gain:
    """A difference in average accuracy (A - B, as a fraction) with its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    n_items: int
    paired_seeds: bool

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


# ----------------------------------------------------------------------------------------------------------
# Statistics


def paired_bootstrap(a: Sequence[SystemResult], b: Sequence[SystemResult], n_resamples: int = N_RESAMPLES,
                     confidence: float = CONFIDENCE, seed: int = 0) -> Gain | None:
    """Gain in average accuracy of system ``a`` over system ``b`` with a paired-bootstrap CI.

    ``a`` and ``b`` are the runs (one per seed) of each system. Tasks and items are those present
    in every run of both. If both have the same set of seeds, runs are paired by seed and seeds
    are resampled too; otherwise each system's correctness is first averaged over its seeds (the
    base model has one evaluation). Each resample draws, per task, items with replacement (the
    same items for both systems) and, when paired, seeds with replacement. Returns the point
    estimate on the full data and the percentile interval, or None when nothing is comparable.
    """
    a = [r for r in a if r.ok]
    b = [r for r in b if r.ok]
    if not a or not b:
        return None
    tasks = sorted(set.intersection(*(set(r.correct) for r in [*a, *b])))
    seeds_a = sorted((r.seed for r in a), key=str)
    seeds_b = sorted((r.seed for r in b), key=str)
    paired = seeds_a == seeds_b and None not in seeds_a
    if paired:
        a = sorted(a, key=lambda r: str(r.seed))
        b = sorted(b, key=lambda r: str(r.seed))
    differences: list[np.ndarray] = []  # per task: (k seeds, n items) of correct_a - correct_b
    for task in tasks:
        docs = sorted(set.intersection(*(set(r.correct[task]) for r in [*a, *b])), key=str)
        if not docs:
            continue
        mat_a = np.array([[float(r.correct[task][d]) for d in docs] for r in a])
        mat_b = np.array([[float(r.correct[task][d]) for d in docs] for r in b])
        differences.append(mat_a - mat_b if paired else (mat_a.mean(0) - mat_b.mean(0))[None, :])
    if not differences:
        return None
    estimate = float(np.mean([d.mean() for d in differences]))
    rng = np.random.default_rng(seed)
    k = differences[0].shape[0]
    # Seed weights per resample: how often each seed was drawn, divided by k (all ones when k == 1).
    seed_weights = rng.multinomial(k, np.full(k, 1.0 / k), size=n_resamples) / k  # (B, k)
    total = np.zeros(n_resamples)
    for diff in differences:
        n = diff.shape[1]
        per_seed = np.empty((n_resamples, k))
        # Item counts per resample, in chunks so that n_resamples x n stays small in memory.
        chunk = max(1, 2_000_000 // max(n, 1))
        for start in range(0, n_resamples, chunk):
            stop = min(start + chunk, n_resamples)
            counts = rng.multinomial(n, np.full(n, 1.0 / n), size=stop - start)  # (chunk, n)
            per_seed[start:stop] = counts @ diff.T / n
        total += (per_seed * seed_weights).sum(axis=1)
    total /= len(differences)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(total, [tail, 100 - tail])
    return Gain(estimate, float(low), float(high), sum(d.shape[1] for d in differences), paired)


def _reference_method(methods: Sequence[str]) -> str | None:
    """The spec that stands for LoRA: exactly ``lora`` if present, else the first ``lora:...`` spec."""
    if REFERENCE_METHOD in methods:
        return REFERENCE_METHOD
    return next((m for m in methods if m.split(":", 1)[0] == REFERENCE_METHOD), None)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan")


def _average(result: SystemResult, tasks: Sequence[str]) -> float:
    scores = [result.scores[t] for t in tasks if t in result.scores]
    return float(np.mean(scores)) if scores and len(scores) == len(tasks) else float("nan")


def summarize(base: SystemResult | None, results: Sequence[SystemResult], n_resamples: int = N_RESAMPLES,
              seed: int = 0) -> "pd.DataFrame":
    """The summary table: the base row, then one row per method in first-seen order.

    Columns: ``method``, ``seeds`` (successful runs), ``failed`` (failed runs), ``trainable_params``,
    per task ``<task>`` and ``<task>_std``, ``average`` and ``average_std`` (scores as fractions),
    ``train_seconds``, ``seconds_per_step``, ``tokens_per_second``, ``peak_memory_mb`` (means over
    seeds), and ``gain_vs_base``/``gain_vs_lora`` with ``_low``/``_high`` CI bounds.
    """
    import pandas as pd

    methods = list(dict.fromkeys(r.method for r in results))
    tasks = list(dict.fromkeys(t for r in ([base] if base else []) + list(results) for t in r.scores))
    reference = _reference_method(methods)
    by_method = {m: [r for r in results if r.method == m] for m in methods}
    rows = []
    systems: list[tuple[str, list[SystemResult]]] = ([(BASE, [base])] if base is not None else [])
    systems += [(m, by_method[m]) for m in methods]
    for name, runs in systems:
        ok = [r for r in runs if r.ok]
        row: dict[str, Any] = {"method": name, "seeds": len(ok), "failed": len(runs) - len(ok),
                               "trainable_params": int(ok[0].trainable_params) if ok else 0}
        for task in tasks:
            row[task], row[f"{task}_std"] = _mean_std([r.scores.get(task, float("nan")) for r in ok])
        row["average"], row["average_std"] = _mean_std([_average(r, tasks) for r in ok])
        for metric in ("train_seconds", "seconds_per_step", "tokens_per_second", "peak_memory_mb"):
            row[metric] = _mean_std([getattr(r, metric) for r in ok])[0]
        for label, other in (("base", [base] if base is not None and name != BASE else None),
                             ("lora", by_method.get(reference) if name not in (BASE, reference) else None)):
            gain = paired_bootstrap(ok, other, n_resamples=n_resamples, seed=seed) if other else None
            row[f"gain_vs_{label}"] = gain.estimate if gain else float("nan")
            row[f"gain_vs_{label}_low"] = gain.low if gain else float("nan")
            row[f"gain_vs_{label}_high"] = gain.high if gain else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# Files


def default_run_name() -> str:
    """A run name from the local time, e.g. ``run-20261105-142233``."""
    return time.strftime("run-%Y%m%d-%H%M%S")


def unique_run_dir(output_dir: str | os.PathLike, run_name: str) -> Path:
    """Create and return a new, empty folder ``output_dir/run_name`` (or ``run_name-2``, ``-3``, ...).

    A folder that already exists is never reused, so a run can never overwrite another's results.
    The folder is created here (``mkdir`` without ``exist_ok``), which also keeps two runs started
    at the same moment from picking the same name.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        candidate = root / (run_name if i == 1 else f"{run_name}-{i}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RuntimeError(f"no free run folder name for {run_name!r} in {root}")


def _fmt_pct(value: float, std: float | None = None) -> str:
    if value is None or math.isnan(value):
        return "–"
    text = f"{100 * value:.1f}"
    if std is not None and not math.isnan(std):
        text += f" ± {100 * std:.1f}"
    return text


def _fmt_gain(row: Mapping[str, Any], label: str) -> str:
    value = row[f"gain_vs_{label}"]
    if value is None or math.isnan(value):
        return "–"
    return f"{100 * value:+.1f} [{100 * row[f'gain_vs_{label}_low']:+.1f}, {100 * row[f'gain_vs_{label}_high']:+.1f}]"


def _fmt_num(value: float, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _fmt_params(n: int) -> str:
    if not n:
        return "0"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def summary_markdown(table: "pd.DataFrame", tasks: Sequence[str], header: Mapping[str, Any] | None = None,
                     title: str = "Results", failures: Sequence[SystemResult] = (),
                     n_resamples: int = N_RESAMPLES) -> str:
    """A readable markdown report of the summary table, with a header saying what was run and what the CI is."""
    lines = [f"# {title}", ""]
    for key, value in (header or {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += [
        "",
        "Scores are each task's primary metric in %, mean ± std over seeds. *Gain* columns are the difference "
        "in average accuracy, in percentage points, against the base model and against LoRA, with a "
        f"{int(CONFIDENCE * 100)}% confidence interval from a paired bootstrap ({n_resamples} resamples of "
        "the test items within each task, and of the seeds where both methods ran the same seeds; both "
        "methods are scored on the same resampled items). An interval that excludes 0 is a difference the "
        "test set supports.",
        "",
    ]
    columns = (["method", "seeds", "trainable params"] + list(tasks)
               + ["average", "gain vs base", "gain vs LoRA", "train s", "s/step", "tokens/s", "peak MB"])
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|")
    for _, row in table.iterrows():
        seeds = "–" if row["method"] == BASE else str(row["seeds"]) + (f" ({row['failed']} failed)" if row["failed"] else "")
        cells = [f"`{row['method']}`", seeds, _fmt_params(row["trainable_params"])]
        cells += [_fmt_pct(row[t], row[f"{t}_std"]) for t in tasks]
        cells += [f"**{_fmt_pct(row['average'], row['average_std'])}**", _fmt_gain(row, "base"), _fmt_gain(row, "lora"),
                  _fmt_num(row["train_seconds"], 0), _fmt_num(row["seconds_per_step"]),
                  _fmt_num(row["tokens_per_second"], 0), _fmt_num(row["peak_memory_mb"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    if failures:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r.method}` seed {r.seed}: {(r.error or '').splitlines()[0] if r.error else ''}" for r in failures]
    lines += ["", "Files: see results/README.md. Plots: loss_curves.png, scores.png.", ""]
    return "\n".join(lines)


def header_from_config(cfg: "RunConfig") -> dict[str, str]:
    """The summary.md header lines for a run configuration."""
    steps = f"{cfg.max_steps} steps" if cfg.max_steps is not None else f"{cfg.epochs:g} epoch(s)"
    return {
        "model": cfg.model,
        "training data": cfg.train_data,
        "tasks": ", ".join(cfg.tasks) + (f" (at most {cfg.limit} items each)" if cfg.limit else ""),
        "training": (f"{steps}, batch {cfg.batch_size} x {cfg.grad_accum} accumulation, lr {cfg.lr:g}, "
                     f"rank {cfg.rank}, alpha {cfg.alpha:g}, targets {','.join(cfg.targets)}"),
        "seeds": ", ".join(str(s) for s in cfg.seeds),
    }


# ----------------------------------------------------------------------------------------------------------
# Plots


def pyplot():
    """matplotlib with the non-interactive Agg backend, imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Lay out ``fig``, write it as PNG atomically (no half-written file on a crash) and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
    return Path(path)


def _method_colour(plt: Any, methods: Sequence[str], method: str) -> Any:
    """The same colour for a method in every plot: its position among the run's methods in tab10."""
    return plt.get_cmap("tab10")(methods.index(method) % 10)


def plot_loss_curves(results: Sequence[SystemResult], path: str | os.PathLike, smooth: int | None = None) -> Path:
    """Training loss against step, one colour per method: the mean over seeds (bold, smoothed) and each seed (thin).

    ``smooth`` is the width of a centred rolling mean in steps (default: about 1/25 of the run,
    at least 1); the unsmoothed mean is drawn faintly behind so nothing is hidden.
    """
    import pandas as pd

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    all_methods = list(dict.fromkeys(r.method for r in results))
    methods = [m for m in all_methods if any(r.loss_curve for r in results if r.method == m)]
    window_used = 1
    for method in methods:
        colour = _method_colour(plt, all_methods, method)
        runs = [r for r in results if r.method == method and r.loss_curve]
        curves = {str(r.seed): pd.Series(dict(r.loss_curve), dtype=float) for r in runs}
        frame = pd.DataFrame(curves).sort_index()
        mean = frame.mean(axis=1)
        window = smooth if smooth is not None else max(1, len(mean) // 25)
        window_used = max(window_used, window)
        if frame.shape[1] > 1:
            for column in frame.columns:
                ax.plot(frame.index, frame[column], color=colour, linewidth=0.6, alpha=0.25)
        if window > 1:
            ax.plot(mean.index, mean.values, color=colour, linewidth=0.8, alpha=0.3)
        smoothed = mean.rolling(window, center=True, min_periods=1).mean()
        label = f"{method} ({frame.shape[1]} seed{'s' if frame.shape[1] > 1 else ''})"
        failed = not any(r.ok for r in runs)
        ax.plot(smoothed.index, smoothed.values, color=colour, linewidth=2, linestyle="--" if failed else "-",
                label=label + (" FAILED" if failed else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    title = "Training loss"
    if window_used > 1:
        title += f" (bold: mean over seeds, rolling mean over {window_used} steps)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if methods:
        ax.legend()
    return save_figure(fig, path)


def plot_scores(table: "pd.DataFrame", tasks: Sequence[str], path: str | os.PathLike) -> Path:
    """Grouped bars: each task (and the average) on the x axis, one bar per method, std-over-seeds error bars."""
    plt = pyplot()
    groups = list(tasks) + (["average"] if len(tasks) > 1 else [])
    all_methods = [m for m in table["method"] if m != BASE]
    table = table[table["seeds"] > 0]  # a method whose runs all failed has nothing to draw
    systems = list(table["method"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 + len(groups) * (0.5 + 0.35 * len(systems))), 5), dpi=120)
    width = 0.8 / max(len(systems), 1)
    x = np.arange(len(groups))
    for i, (_, row) in enumerate(table.iterrows()):
        heights = np.array([row[g] for g in groups], dtype=float) * 100
        errors = np.nan_to_num(np.array([row[f"{g}_std"] for g in groups], dtype=float) * 100)
        colour = "0.6" if row["method"] == BASE else _method_colour(plt, all_methods, row["method"])
        bars = ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(heights), width, yerr=errors, capsize=3,
                      color=colour, label=row["method"], edgecolor="white", linewidth=0.5)
        for bar, h, e in zip(bars, heights, errors):
            if not math.isnan(h):  # the value, just above its error bar
                ax.annotate(f"{h:.0f}", (bar.get_x() + bar.get_width() / 2, h + e), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, groups)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Scores per task (error bars: std over seeds)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# Everything at once


def write_report(run_dir: str | os.PathLike, base: SystemResult | None, results: Sequence[SystemResult],
                 config: "RunConfig | None" = None, header: Mapping[str, Any] | None = None,
                 n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, Path]:
    """Write summary.csv, summary.md, loss_curves.png, scores.png (and config.yaml if ``config``) into ``run_dir``.

    Failed runs are listed in summary.md and left out of the statistics; a method whose runs all
    failed keeps its row, with empty scores. Returns the written paths by file name.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    table = summarize(base, results, n_resamples=n_resamples, seed=seed)
    tasks = list(dict.fromkeys(t for r in ([base] if base else []) + list(results) for t in r.scores))
    written: dict[str, Path] = {}
    if config is not None:
        from harness.config import save_config_yaml

        written["config.yaml"] = save_config_yaml(config, run_dir / "config.yaml")
        header = {**header_from_config(config), **(header or {})}
    with atomic_path(run_dir / "summary.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    written["summary.csv"] = run_dir / "summary.csv"
    failures = [r for r in results if not r.ok]
    markdown = summary_markdown(table, tasks, header, title=f"Results: {run_dir.name}", failures=failures,
                                n_resamples=n_resamples)
    written["summary.md"] = write_text_atomic(run_dir / "summary.md", markdown)
    written["loss_curves.png"] = plot_loss_curves(results, run_dir / "loss_curves.png")
    written["scores.png"] = plot_scores(table, tasks, run_dir / "scores.png")
    return written
