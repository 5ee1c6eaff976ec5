"""The results report: summary table, gains with what their intervals cover, plots, written atomically.

Given the base model's evaluation and one :class:`SystemResult` per (method, seed),
:func:`write_report` writes into ``results/<run name>/``:

- ``summary.csv`` / ``summary.md``: one row per method (mean and std over seeds) plus the
  base row: each task's score, the average, the gain in average accuracy over the base model
  and over LoRA with its interval and the test-item noise beside it, the Holm-adjusted p-value
  against LoRA; and what ran: trainable parameters, r, alpha, lr, targets, init,
  train_on_inputs, the median gradient norm before clipping and the share of clipped steps,
  train time, seconds per step, tokens per second, peak memory;
- ``loss_curves.png``: training loss against step, one line per method (as in the LinChain
  paper's Figure 2);
- ``scores.png``: each task's score per method, with std-over-seeds error bars;
- ``config.yaml`` when given the run's :class:`~harness.config.RunConfig`.

The statistics are :mod:`harness.stats`'. With two or more seeds the training run is the unit
of replication: the gain is the paired difference per seed on the full test set, its interval
a t-interval over the seeds both methods completed (run-to-run variance), and the item noise
(a paired bootstrap over test items) is reported beside it. With one seed the interval covers
test-item noise only, and the table says so. The base model is evaluated once; its gain is
paired with every seed of the method.

Every file is written to a temporary name and renamed into place, so an interrupted run
leaves either a complete file or none.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from harness import stats
from harness.adapters.spec import REFERENCE_METHOD, reference_name, without_options
from harness.fsutil import atomic_path, write_text_atomic
from harness.plots import method_colour, pyplot, save_figure

if TYPE_CHECKING:
    import pandas as pd

    from harness.config import RunConfig

BASE = "base"
N_RESAMPLES = stats.N_RESAMPLES
CONFIDENCE = stats.CONFIDENCE
# What ran, per method: the columns of summary.csv / summary.md, in this order.
SETTINGS = ("r", "alpha", "lr", "targets", "init", "train_on_inputs")
FAIR_STUDY = "python -m ablations.study fair"


@dataclass
class SystemResult:
    """One evaluated system: the base model (``method="base"``, ``seed=None``) or one method trained with one seed.

    ``scores`` holds each task's primary score in [0, 1]; ``correct`` each task's per-item
    correctness (doc id -> 0 or 1), which the item bootstrap resamples. ``settings`` is what
    ran (see :func:`method_settings`). ``error`` is set when the run failed (e.g. a NaN loss):
    the row says so and the statistics leave the run out.
    """

    method: str
    seed: int | None = None
    scores: dict[str, float] = field(default_factory=dict)
    correct: dict[str, dict[Any, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    trainable_params: int = 0
    train_seconds: float = float("nan")
    seconds_per_step: float = float("nan")
    tokens_per_second: float = float("nan")
    peak_memory_mb: float = float("nan")
    grad_norm_median: float = float("nan")
    clipped_fraction: float = float("nan")
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
    # Tasks whose scores are contaminated (the training data holds more than 1% of their items; set by
    # harness.run under --allow-contamination): tables must mark these scores.
    contaminated: set[str] = field(default_factory=set)
    # Per task, the digest of every item's raw output (harness.evaluate.EvalResult.output_digests): a trained
    # method whose digests all equal the base model's produced exactly the base model's outputs.
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def method_settings(spec: Any, lr: float, train_on_inputs: bool) -> dict[str, Any]:
    """What one method trained with: its resolved spec's r, alpha, targets and init, and the lr actually used.

    ``init`` is that of the middle matrices; methods without them (LoRA, CondLoRA) have None.
    """
    return {"r": spec.r, "alpha": spec.alpha, "lr": lr, "targets": "+".join(spec.targets) if spec.targets else "auto",
            "init": spec.init if spec.middle_product is not None else None, "train_on_inputs": train_on_inputs}


def grad_norm_summary(trained: Any) -> tuple[float, float]:
    """The median gradient norm before clipping and the share of clipped steps of a training result.

    Read with defaults, so a training loop that does not record them gives NaN.
    """
    norms = [norm for _, norm in getattr(trained, "grad_norms", None) or []]
    median = float(statistics.median(norms)) if norms else float("nan")
    return median, float(getattr(trained, "clipped_fraction", float("nan")))


def score_line(scores: Mapping[str, float]) -> str:
    """One line of a run's log: each task's score and the average, in percent."""
    if not scores:
        return "no scores"
    avg = sum(scores.values()) / len(scores)
    return ", ".join(f"{t} {100 * s:.1f}%" for t, s in scores.items()) + f" (average {100 * avg:.1f}%)"


# ----------------------------------------------------------------------------------------------------------
# Statistics


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (numpy) of the values that are not None or NaN; summary.csv's numbers.

    Not :func:`harness.stats.mean_sd`: that drops infinite values too, and sums in order where numpy
    sums pairwise (from 8 values on), so the last bit of a mean or sd would change.
    """
    arr = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan")


def _average(result: SystemResult, tasks: Sequence[str]) -> float:
    scores = [result.scores[t] for t in tasks if t in result.scores]
    return float(np.mean(scores)) if scores and len(scores) == len(tasks) else float("nan")


def compare(a: Sequence[SystemResult], b: Sequence[SystemResult], tasks: Sequence[str],
            n_resamples: int = N_RESAMPLES, seed: int = 0) -> tuple[stats.SeedComparison, stats.ItemInterval | None]:
    """Gain of system ``a`` over ``b`` in average accuracy: the comparison over seeds and the item noise beside it.

    Runs are paired by seed; a system with one seedless run (the base model, evaluated once)
    is paired with every seed of the other. Failed runs count as not completed.
    """
    def per_seed(runs: Sequence[SystemResult], seeds: Sequence[Any]) -> dict[Any, SystemResult]:
        runs = [r for r in runs if r.ok]
        if len(runs) == 1 and runs[0].seed is None:
            return {s: runs[0] for s in seeds}
        return {r.seed: r for r in runs}

    seeds_a = [r.seed for r in a if r.ok and r.seed is not None]
    seeds_b = [r.seed for r in b if r.ok and r.seed is not None]
    runs_a, runs_b = per_seed(a, seeds_b), per_seed(b, seeds_a)
    items = stats.item_interval({s: r.correct for s, r in runs_a.items()}, {s: r.correct for s, r in runs_b.items()},
                                n_resamples=n_resamples, seed=seed)
    comparison = stats.seed_comparison({s: _average(r, tasks) for s, r in runs_a.items()},
                                       {s: _average(r, tasks) for s, r in runs_b.items()}, items=items)
    return comparison, items


def _gain_columns(label: str, comparison: stats.SeedComparison | None, items: stats.ItemInterval | None) -> dict:
    nan = float("nan")
    columns = {f"gain_vs_{label}": comparison.estimate if comparison else nan,
               f"gain_vs_{label}_low": comparison.low if comparison else nan,
               f"gain_vs_{label}_high": comparison.high if comparison else nan,
               f"gain_vs_{label}_interval": comparison.method if comparison else "",
               f"gain_vs_{label}_item_low": items.low if items else nan,
               f"gain_vs_{label}_item_high": items.high if items else nan}
    if label == "lora":
        columns["gain_vs_lora_seeds"] = " ".join(map(str, comparison.seeds)) if comparison else ""
        columns["gain_vs_lora_missing"] = " ".join(map(str, comparison.missing)) if comparison else ""
        columns["p_vs_lora"] = comparison.p_value if comparison else nan
        columns["mde_vs_lora"] = stats.detectable_effect(comparison) if comparison else nan
    return columns


def _settings_of(runs: Sequence[SystemResult]) -> dict[str, Any]:
    """A method's settings: those its runs recorded (the same for every seed)."""
    return next((r.settings for r in runs if r.settings), {})


BY_RULE = "<by rule>"  # summarize's default reference: chosen by harness.adapters.spec.reference_name


def summarize(base: SystemResult | None, results: Sequence[SystemResult], n_resamples: int = N_RESAMPLES,
              seed: int = 0, reference: str | None = BY_RULE) -> "pd.DataFrame":
    """The summary table: the base row, then one row per method in first-seen order.

    Columns: ``method``, ``seeds`` (successful runs), ``failed`` (failed runs), ``trainable_params``,
    the settings (``r``, ``alpha``, ``lr``, ``targets``, ``init``, ``train_on_inputs``), ``contaminated``
    (the tasks whose scores are marked contaminated, space-separated), ``same_as_base`` (the seeds whose
    outputs equal the base model's on every item: see :func:`same_outputs`), per task
    ``<task>`` and ``<task>_std``, ``average`` and ``average_std`` (scores as fractions), the means
    over seeds of ``grad_norm_median``, ``clipped_fraction``, ``train_seconds``, ``seconds_per_step``,
    ``tokens_per_second`` and ``peak_memory_mb``; for the gains over the base model and over LoRA
    ``gain_vs_<base|lora>`` with ``_low``/``_high`` (the interval), ``_interval`` (what it covers)
    and ``_item_low``/``_item_high`` (the item noise); ``gain_vs_lora_seeds`` and
    ``gain_vs_lora_missing`` (paired seeds, seeds only one side completed), ``p_vs_lora``,
    ``p_holm`` (Holm-adjusted over the comparisons with LoRA) and ``mde_vs_lora``. ``reference`` names
    the row that stands for LoRA (default :data:`BY_RULE`: :func:`harness.adapters.spec.reference_name` of the
    methods: ``lora``, else the first LoRA of any kind, ``lora-r18-match-...`` included, as the diagnostics choose;
    None: no row, so no gain over LoRA). The table's ``attrs["reference"]`` holds the row taken (None where there is none).
    """
    import pandas as pd

    methods = list(dict.fromkeys(r.method for r in results))
    tasks = _tasks(base, results)
    if reference == BY_RULE:
        reference = reference_name(methods)
    by_method = {m: [r for r in results if r.method == m] for m in methods}
    rows = []
    systems: list[tuple[str, list[SystemResult]]] = ([(BASE, [base])] if base is not None else [])
    systems += [(m, by_method[m]) for m in methods]
    for name, runs in systems:
        ok = [r for r in runs if r.ok]
        row: dict[str, Any] = {"method": name, "seeds": len(ok), "failed": len(runs) - len(ok),
                               "trainable_params": int(ok[0].trainable_params) if ok else 0}
        settings = _settings_of(runs)
        row.update({key: settings.get(key) for key in SETTINGS})
        row["contaminated"] = " ".join(sorted(_contaminated(runs)))
        row["same_as_base"] = " ".join(str(r.seed) for r in ok if name != BASE and same_outputs(r, base))
        for task in tasks:
            row[task], row[f"{task}_std"] = _mean_std([r.scores.get(task, float("nan")) for r in ok])
        row["average"], row["average_std"] = _mean_std([_average(r, tasks) for r in ok])
        for metric in ("grad_norm_median", "clipped_fraction", "train_seconds", "seconds_per_step",
                       "tokens_per_second", "peak_memory_mb"):
            row[metric] = _mean_std([getattr(r, metric) for r in ok])[0]
        for label, other in (("base", [base] if base is not None and name != BASE else None),
                             ("lora", by_method.get(reference) if name not in (BASE, reference) else None)):
            comparison, items = compare(ok, other, tasks, n_resamples, seed) if other else (None, None)
            row.update(_gain_columns(label, comparison, items))
        rows.append(row)
    table = pd.DataFrame(rows)
    adjusted = stats.holm(dict(zip(table["method"], table["p_vs_lora"])))
    table.insert(table.columns.get_loc("p_vs_lora") + 1, "p_holm", [adjusted[m] for m in table["method"]])
    table.attrs["reference"] = reference if reference in by_method else None
    return table


def same_outputs(result: SystemResult, base: SystemResult | None) -> bool:
    """True when ``result`` produced exactly the base model's raw output on every item of every task both scored.

    A trained adapter that does so was, most likely, never applied (a loader that dropped its weights, a
    merge that did not happen), or learned nothing a greedy decode can see: either way its scores are
    the base model's, not the method's. False when either side carries no output digests.
    """
    mine, theirs = getattr(result, "outputs", None) or {}, getattr(base, "outputs", None) or {}
    shared = set(mine) & set(theirs)
    return bool(shared) and all(mine[task] == theirs[task] for task in shared)


def _contaminated(runs: Sequence[SystemResult]) -> set[str]:
    """Tasks whose scores these runs mark as contaminated (``SystemResult.contaminated``, set under
    --allow-contamination); runs that do not carry the mark have none."""
    return set().union(*(getattr(r, "contaminated", None) or () for r in runs))


def _tasks(base: SystemResult | None, results: Sequence[SystemResult]) -> list[str]:
    return list(dict.fromkeys(t for r in ([base] if base else []) + list(results) for t in r.scores))


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


def _fmt_gain(row: Mapping[str, Any], label: str, mark_items_only: bool = False) -> str:
    value = row[f"gain_vs_{label}"]
    if value is None or math.isnan(value):
        return "–"
    low, high = row[f"gain_vs_{label}_low"], row[f"gain_vs_{label}_high"]
    text = f"{100 * value:+.1f}"
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    if mark_items_only and row[f"gain_vs_{label}_interval"] == stats.ITEMS_ONLY:
        text += " *items only*"
    return text


def _fmt_item_noise(row: Mapping[str, Any], label: str) -> str:
    low, high = row[f"gain_vs_{label}_item_low"], row[f"gain_vs_{label}_item_high"]
    return "–" if math.isnan(low) or math.isnan(high) else f"±{100 * (high - low) / 2:.1f}"


def _fmt_p(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}" if value >= 0.001 else "<0.001"


def _fmt_mde(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _fmt_num(value: float, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _fmt_params(n: int) -> str:
    if not n:
        return "0"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _fmt_setting(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _interval_note(table: "pd.DataFrame", n_resamples: int) -> tuple[str, bool]:
    """What the gain intervals cover, for the kinds this table uses; and whether cells must say which kind."""
    kinds = {k for label in ("base", "lora") for k in table[f"gain_vs_{label}_interval"] if k}
    level = f"{CONFIDENCE:.0%}"
    n_lora = int(table["p_holm"].notna().sum())
    items = (f"*± items* is the half-width of the {level} paired bootstrap over test items ({n_resamples} "
             "resamples; items resampled once, the same for both methods and every seed): how far the gain "
             "could move on another test set of this size.")
    note = ("*Gain* columns: the difference in average accuracy (the mean over tasks), in percentage points, "
            "paired by seed; the base model, evaluated once, is paired with every seed.")
    if stats.T_OVER_SEEDS in kinds:
        note += (f" With 2 or more seeds the training run is the unit of replication: the bracket is a {level} "
                 "Student-t interval over the seeds both methods completed, and covers run-to-run variance "
                 "(another seed trains another adapter) on this test set.")
    if any(row[f"gain_vs_{label}_interval"] == stats.T_OVER_SEEDS and math.isnan(row[f"gain_vs_{label}_low"])
           for _, row in table.iterrows() for label in ("base", "lora")):
        note += (" A gain without a bracket had the same difference at every seed: the spread over seeds, and "
                 "so the interval, is unknown; run more seeds.")
    if stats.ITEMS_ONLY in kinds:
        which = "Rows marked *items only* had" if stats.T_OVER_SEEDS in kinds else "This run had"
        note += (f" {which} one seed: the interval covers test-item noise only (the paired bootstrap over "
                 "items). It does not cover run-to-run variance, and another seed can change the ranking; "
                 "run more seeds (--seeds 0,1,2) for an interval over training runs.")
    note += " " + items
    if n_lora:
        note += (" *p (Holm)*: the p-value of \"no difference from LoRA\" (the paired t-test over seeds; with one "
                 f"seed, the item bootstrap's), Holm-adjusted over the {n_lora} comparison(s) with LoRA. *MDE*: the "
                 "smallest true gain over LoRA that this many seeds (with one seed, this many items) would detect "
                 "with 80% power at the 5% level (per comparison, before Holm).")
    return note, {stats.T_OVER_SEEDS, stats.ITEMS_ONLY} <= kinds


def _untuned_note(table: "pd.DataFrame", fair_methods: str) -> str:
    """The warning every untuned comparison carries, with the command that makes it fair."""
    lrs = sorted({row["lr"] for _, row in table.iterrows() if row["method"] != BASE and row["lr"] is not None
                  and not (isinstance(row["lr"], float) and math.isnan(row["lr"]))})
    if len(lrs) == 1:
        how = f"Every method trained at one shared learning rate ({lrs[0]:g}), not tuned for each"
    elif lrs:
        rates = ", ".join(f"{lr:g}" for lr in lrs)
        how = (f"The learning rates ({rates}) differ by method but were not each tuned under one budget in this "
               "run (the header says where each came from)")
    else:
        how = "The methods' learning rates were not each tuned"
    return (f"**Not tuned per method.** {how}: under Adam the middle matrices change how far each step moves the "
            "adapter, so these differences may reflect step size rather than the methods. For a fair comparison "
            f"run `{FAIR_STUDY} --methods {fair_methods}` (every method's learning rate chosen on the validation "
            "split over the same grid and budget, then retrained with fresh seeds and scored on test once).")


def fair_study_methods(methods: Sequence[str]) -> str:
    """The ``--methods`` value for the fair study: the run's specs without ``lr=`` (the study tunes it), LoRA first.

    The fair study needs a LoRA point without ``match=`` as its reference (a matched LoRA is compared with what
    it matches), so plain ``lora`` is added unless such a point is there."""
    specs = list(dict.fromkeys(without_options(spec, ["lr"]) for spec in methods))
    plain = [spec for spec in specs if "match=" not in spec]
    if reference_name(plain) is None:
        specs.insert(0, REFERENCE_METHOD)
    return ",".join(specs)


def summary_markdown(table: "pd.DataFrame", tasks: Sequence[str], header: Mapping[str, Any] | None = None,
                     title: str = "Results", failures: Sequence[SystemResult] = (),
                     n_resamples: int = N_RESAMPLES, tuned: bool = False, fair_methods: str = "lora,...") -> str:
    """A readable markdown report of the summary table: what ran, the gains and what their intervals cover.

    Unless ``tuned`` (each method's learning rate chosen under one protocol, as the fair study
    does), the gains carry a note that the comparison is not fair yet and the command that makes
    it so, with ``fair_methods`` as its ``--methods``.
    """
    lines = [f"# {title}", ""]
    for key, value in (header or {}).items():
        lines.append(f"- **{key}**: {value}")
    note, mark_items_only = _interval_note(table, n_resamples)
    lines += ([""] if header else []) + ["## Scores and gains", ""]
    if not tuned:
        lines += [_untuned_note(table, fair_methods), ""]
    lines += ["Scores are each task's primary metric in %, mean ± std over seeds. " + note, ""]
    rows = []
    for _, row in table.iterrows():
        seeds = "–" if row["method"] == BASE else str(row["seeds"]) + (f" ({row['failed']} failed)" if row["failed"] else "")
        rows.append([f"`{row['method']}`", seeds] + [_fmt_pct(row[t], row[f"{t}_std"]) for t in tasks]
                    + [f"**{_fmt_pct(row['average'], row['average_std'])}**",
                       _fmt_gain(row, "base", mark_items_only), _fmt_item_noise(row, "base"),
                       _fmt_gain(row, "lora", mark_items_only), _fmt_item_noise(row, "lora"), _fmt_p(row["p_holm"]),
                       _fmt_mde(row["mde_vs_lora"])])
    contaminated = {t for marks in table["contaminated"] for t in marks.split()}
    task_columns = [f"{t} (contaminated)" if t in contaminated else t for t in tasks]
    lines += _markdown_table(["method", "seeds", *task_columns, "average", "gain vs base", "± items", "gain vs LoRA",
                              "± items", "p (Holm)", "MDE"], rows)
    reference = table.attrs.get("reference")
    if reference is not None and reference != REFERENCE_METHOD:  # say which row "gain vs LoRA" is against
        why = "" if reference.rsplit("/", 1)[-1] == REFERENCE_METHOD else ", the first LoRA of the table (no plain `lora` ran)"
        lines += ["", f"*gain vs LoRA* is against `{reference}`{why}."]
    if contaminated:
        lines += ["", f"*Contaminated*: the training data holds more than 1% of the scored items of "
                  f"{', '.join(sorted(contaminated))} (the run was allowed with --allow-contamination); those "
                  "scores, and the average and gains built on them, overstate what the method learned."]
    silent = [row for _, row in table.iterrows() if row.get("same_as_base")]
    if silent:
        lines += ["", "## Adapters that changed nothing", ""]
        lines += [f"- **`{row['method']}` seed(s) {row['same_as_base']}: its outputs equal the base model's on every "
                  "scored item.** The adapter was most likely not applied (weights dropped on load, a merge that "
                  "did not happen) or learned nothing a greedy decode can see; its scores are the base model's. "
                  "Check the adapter with `python -m harness.equivalence`." for row in silent]
    unpaired = [row for _, row in table.iterrows() if row["gain_vs_lora_missing"]]
    if unpaired:
        lines.append("")
        lines += [f"- `{row['method']}` vs LoRA: paired seeds {row['gain_vs_lora_seeds'] or 'none'}; seed(s) "
                  f"{row['gain_vs_lora_missing']} completed for only one of the two (see Failed runs)."
                  for row in unpaired]
    lines += ["", "## What ran", "",
              "Per method: the adapter's settings and the learning rate it trained with; *grad norm* is the median "
              "over steps of the gradient norm before clipping, *clipped* the share of steps it exceeded "
              "--max-grad-norm (both means over seeds); times and memory are means over seeds.", ""]
    rows = [[f"`{row['method']}`", _fmt_params(row["trainable_params"])]
            + [_fmt_setting(row[key]) for key in SETTINGS]
            + [_fmt_num(row["grad_norm_median"], 3), _fmt_pct(row["clipped_fraction"]),
               _fmt_num(row["train_seconds"], 0), _fmt_num(row["seconds_per_step"]),
               _fmt_num(row["tokens_per_second"], 0), _fmt_num(row["peak_memory_mb"], 0)]
            for _, row in table.iterrows() if row["method"] != BASE]
    lines += _markdown_table(["method", "trainable params", *SETTINGS, "grad norm", "clipped %", "train s", "s/step",
                              "tokens/s", "peak MB"], rows)
    if failures:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r.method}` seed {r.seed}: {(r.error or '').splitlines()[0] if r.error else ''}" for r in failures]
    lines += ["", "Files: see results/README.md. Plots: loss_curves.png, scores.png.", ""]
    return "\n".join(lines)


def shared_settings(results: Sequence[SystemResult]) -> tuple[dict[str, Any], list[str]]:
    """The settings every method ran with (by name), and the names of those that differ between methods."""
    recorded = [r.settings for r in results if r.settings]
    shared, differing = {}, []
    for key in SETTINGS:
        values = {repr(s.get(key)) for s in recorded}
        if len(values) == 1:
            shared[key] = recorded[0].get(key)
        elif values:
            differing.append(key)
    return shared, differing


# The parts of a summary header that a run's (header_from_config) and a study's (ablations.report) share.


def training_length(cfg: "RunConfig") -> str:
    """'100 steps' or '1 epoch(s)': what bounds training (max_steps wins over epochs)."""
    return f"{cfg.max_steps} steps" if cfg.max_steps is not None else f"{cfg.epochs:g} epoch(s)"


def tasks_text(cfg: "RunConfig", split: str | None = None) -> str:
    """The tasks a header lists: their names, the split when given, and the item limit when there is one."""
    return (", ".join(cfg.tasks) + (f" ({split} split)" if split else "")
            + (f" (at most {cfg.limit} items each)" if cfg.limit else ""))


def header_from_config(cfg: "RunConfig", results: Sequence[SystemResult] = ()) -> dict[str, str]:
    """The summary.md header lines: the run's configuration, and of the methods' settings only those all share.

    A setting a method overrode (``lora:r=8`` in a run with ``--rank 16``) is not in the header;
    the per-method table says what each ran with.
    """
    header = {
        "model": cfg.model,
        "training data": cfg.train_data,
        "tasks": tasks_text(cfg, getattr(cfg, "split", None)),
        "training": f"{training_length(cfg)}, batch {cfg.batch_size} x {cfg.grad_accum} accumulation",
    }
    shared, differing = shared_settings(results)
    if shared:
        header["shared by all methods"] = ", ".join(f"{key} {_fmt_setting(value)}" for key, value in shared.items()
                                                    if value is not None)
    if differing:
        header["per method (see What ran)"] = ", ".join(differing)
    header["seeds"] = ", ".join(str(s) for s in cfg.seeds)
    return header


# ----------------------------------------------------------------------------------------------------------
# Plots


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
        colour = method_colour(plt, all_methods, method)
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
        colour = "0.6" if row["method"] == BASE else method_colour(plt, all_methods, row["method"])
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
                 n_resamples: int = N_RESAMPLES, seed: int = 0, tuned: bool = False) -> dict[str, Path]:
    """Write summary.csv, summary.md, loss_curves.png, scores.png (and config.yaml if ``config``) into ``run_dir``.

    Failed runs are listed in summary.md and left out of the statistics; a method whose runs all
    failed keeps its row, with empty scores. ``header`` lines override those drawn from ``config``.
    ``tuned`` says every method's learning rate was chosen under one protocol (the fair study);
    otherwise summary.md warns that the gains may reflect step size. Returns the written paths by
    file name.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    table = summarize(base, results, n_resamples=n_resamples, seed=seed)
    tasks = _tasks(base, results)
    written: dict[str, Path] = {}
    if config is not None:
        from harness.config import save_config_yaml  # deferred: harness.config loads torch

        written["config.yaml"] = save_config_yaml(config, run_dir / "config.yaml")
        header = {**header_from_config(config, results), **(header or {})}
    with atomic_path(run_dir / "summary.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    written["summary.csv"] = run_dir / "summary.csv"
    failures = [r for r in results if not r.ok]
    markdown = summary_markdown(table, tasks, header, title=f"Results: {run_dir.name}", failures=failures,
                                n_resamples=n_resamples, tuned=tuned,
                                fair_methods=fair_study_methods(config.methods) if config is not None else "lora,...")
    written["summary.md"] = write_text_atomic(run_dir / "summary.md", markdown)
    written["loss_curves.png"] = plot_loss_curves(results, run_dir / "loss_curves.png")
    written["scores.png"] = plot_scores(table, tasks, run_dir / "scores.png")
    return written
