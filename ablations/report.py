"""results/ablations/<study>/: trials.csv, summary.md and the study's plots, read back from the storage.

The report is a snapshot of the storage, so it can be written at any time (``--report-only``),
by any machine, while workers are still running; each file is written atomically.

- ``trials.csv``: one row per Optuna trial (every state), with its configuration, seed(s),
  score(s), trainable parameters, timings and, for failed trials, the reason;
- ``summary.md``: the study's question and setup, then per configuration the mean and std over
  seeds (grids), the best learning rate per method (tuning), or the Pareto front;
- ``score_vs_<axis>.png``: the score against the study's axis (chain length, rank: lines; init,
  structure: bars) with error bars over seeds, reference methods as dashed lines;
- ``param_importances.png``: Optuna's parameter importances (its default evaluator, PED-ANOVA in 5.0);
- ``pareto_front.png`` (pareto studies): average accuracy against trainable parameters, the front marked;
- ``lr_search.png`` (tuning studies): the score of every trial against its learning rate, per method.

Fair studies (``ablations.fair``) write ``verdict.csv`` and ``verdict.md`` (per method: the chosen
rate, the grid searched, the validation score, the test score over final seeds and the gain over
LoRA with its interval, Holm-adjusted p-value, minimum detectable effect and verdict),
``trials.csv`` (every trial, tuning and final, with its split), ``lr_sensitivity.png``,
``tuning_curve.png`` and, when the trials run with ``diagnostics: full``, ``lr_vs_curvature.png``
(the chosen rate against 1 / lambda_max per method) instead; a grid study run with ``--tune-lr``
adds its ``score_vs_<axis>.png`` of the final test scores.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ablations import fair
from harness.errors import UserError
from ablations.fair import mean_of, std_of
from ablations.space import spec_of
from harness.report import atomic_path, pyplot, save_figure, tasks_text, training_length, write_text_atomic
from harness.resultfile import _git
from harness.tracking import Tracker, library_versions, machine_label


def report_dir(plan) -> Path:
    """Where the report goes: ``--report-dir`` when given (``plan.report_to``), else OUTPUT_DIR/ablations/NAME."""
    chosen = getattr(plan, "report_to", None)
    return Path(chosen) if chosen else Path(plan.config.output_dir) / "ablations" / plan.name


def trials_frame(plan, storage) -> pd.DataFrame:
    """Every trial of every Optuna study of the plan, one row each."""
    import optuna

    rows = []
    for name in plan.optuna_names():
        study = optuna.load_study(study_name=name, storage=storage)
        for t in study.get_trials(deepcopy=False):
            values = t.values or []
            row: dict[str, Any] = {
                "study": name, "trial": t.number, "state": t.state.name, "spec": t.user_attrs.get("spec"),
                "grid_index": t.user_attrs.get("grid_index"),
                "seed": t.user_attrs.get("seed", ",".join(map(str, plan.seeds))),
                "average_accuracy": values[0] if values else math.nan,
                "trainable_params": t.user_attrs.get("trainable_params"),
                # a queued trial has no params yet: its rate is the one it was queued with (fair studies)
                "lr": t.params.get("lr", t.user_attrs.get("lr", plan.config.lr)),
                "split": t.user_attrs.get("split", plan.config.split),
            }
            row.update({k: t.user_attrs.get(k) for k in plan.study_kind.trial_attr_columns})
            row.update({f"param_{k}": v for k, v in t.params.items() if k not in ("lr", "seed")})
            row.update({f"score_{task}": v for task, v in (t.user_attrs.get("scores") or {}).items()})
            row.update({
                "trial_seconds": t.user_attrs.get("trial_seconds"), "run_seconds": t.user_attrs.get("run_seconds"),
                "train_seconds": t.user_attrs.get("train_seconds"),
                "fail_reason": t.user_attrs.get("fail_reason", ""), "retry_of": t.user_attrs.get("retry_of"),
                "started": t.datetime_start, "finished": t.datetime_complete,
            })
            made = t.user_attrs.get("provenance") or {}  # trials that predate the record have none
            row.update({"commit": made.get("commit"), "machine": machine_label(made.get("machine")),
                        "protocol": (made.get("protocol") or {}).get("hash")})
            rows.append(row)
    return pd.DataFrame(rows)


def point_table(plan, trials: pd.DataFrame) -> pd.DataFrame:
    """Grid and pareto studies: per configuration, the score's mean and std over the seeds that finished."""
    rows = []
    for k, point in enumerate(plan.points):
        spec = spec_of(point)
        mine = trials[trials["spec"] == spec] if len(trials) else trials
        done = mine[mine["state"] == "COMPLETE"] if len(mine) else mine
        scores = list(done["average_accuracy"]) if len(done) else []
        params = [p for p in (done["trainable_params"] if len(done) else []) if p == p and p is not None]
        rows.append({"spec": spec, **{f"axis_{a}": v for a, v in point.items()}, "seeds_done": len(scores),
                     "seeds_failed": int(((mine["state"] == "FAIL") & ~_retried(mine)).sum()) if len(mine) else 0,
                     "mean": mean_of(scores), "std": std_of(scores),
                     "trainable_params": int(params[0]) if params else None, "point": k})
    return pd.DataFrame(rows)


def missing_points(plan, trials: pd.DataFrame) -> list[tuple[str, Any, str]]:
    """Grid points and seeds with no finished trial and no reported failure: (spec, seed, why), e.g. ``running``.

    A report written while trials still run (``--no-wait``, ``--max-trials``, another worker) must not read
    as complete: these are the holes.
    """
    missing = []
    for k, (point, seed) in enumerate(plan.grid()):
        mine = trials[trials["grid_index"] == k] if len(trials) else trials
        states = set(mine["state"]) if len(mine) else set()
        failed = len(mine) and ((mine["state"] == "FAIL") & ~_retried(mine)).any()
        if "COMPLETE" in states or failed:
            continue  # a score, or a failure the table reports
        why = "running" if "RUNNING" in states else "queued" if "WAITING" in states else "not run"
        missing.append((spec_of(point), seed, why))
    return missing


def _retried(trials: pd.DataFrame) -> pd.Series:
    """FAILED trials whose configuration was queued again (killed workers): not failures of the configuration."""
    retried = set(trials["retry_of"].dropna().astype(int))
    return trials["trial"].isin(retried)


def write_report(plan, storage) -> Path:
    """Write every file of the study's folder; log them to the study's MLflow run; return the folder.

    The kind decides which report (``StudyKind.write_report``): the summary below, or a fair study's verdict."""
    return plan.study_kind.write_report(plan, storage)


def write_summary_report(plan, storage) -> Path:
    """A grid, pareto or tpe study's folder: trials.csv, summary.md and the kind's plots."""
    kind = plan.study_kind
    folder = report_dir(plan)
    folder.mkdir(parents=True, exist_ok=True)
    trials = trials_frame(plan, storage)
    with atomic_path(folder / "trials.csv") as tmp:
        trials.to_csv(tmp, index=False)
    written = [folder / "trials.csv"]
    points = kind.point_table(plan, trials)
    plots = []
    for draw in kind.summary_plots():
        try:
            path = draw(plan, storage, trials, points, folder)
        except Exception as err:  # noqa: BLE001 (a plot that cannot be drawn must not lose the tables)
            path = None
            print(f"warning: {draw.__name__[1:]} not drawn: {type(err).__name__}: {err}")
        if path is not None:
            plots.append(path)
    write_text_atomic(folder / "summary.md", summary_markdown(plan, trials, points, plots))
    written += [folder / "summary.md", *plots]
    finish_parent_run(plan, storage, artifacts=written)
    return folder


def summary_markdown(plan, trials: pd.DataFrame, points: pd.DataFrame | None, plots: list[Path]) -> str:
    cfg = plan.config
    states = trials["state"].value_counts().to_dict() if len(trials) else {}
    lines = [f"# Study: {plan.name}", "", plan.description or "", "",
             f"- **kind**: {plan.kind}" + plan.study_kind.kind_note(plan),
             f"- **model**: {cfg.model}; **training data**: {cfg.train_data}; **tasks**: {tasks_text(cfg)}",
             f"- **training**: {training_length(cfg)}, batch {cfg.batch_size}, "
             + ", ".join(f"{name} {value}" for name, value in shared_settings(plan)),
             f"- **seeds**: {', '.join(map(str, plan.seeds))}",
             "- **trials**: " + (", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "none"), ""]
    if not plan.study_kind.tunes_lr:
        lines += [shared_rate_warning(plan), ""]
    if points is not None:
        lines += ["Average accuracy (%) over the tasks, mean ± std over seeds.", "",
                  "| configuration | seeds | failed | trainable params | average accuracy |",
                  "|---|---:|---:|---:|---:|"]
        for _, row in points.iterrows():
            lines.append(f"| `{row['spec']}` | {row['seeds_done']} | {row['seeds_failed']} | "
                         f"{_fmt_int(row['trainable_params'])} | {_pct(row['mean'], row['std'])} |")
        missing = missing_points(plan, trials)
        if missing:
            lines += ["", f"**Missing points** ({len(missing)} of {len(plan.grid())}; the table above is incomplete): "
                      + ", ".join(f"`{spec}` seed {seed} ({why})" for spec, seed, why in missing)]
        lines += plan.study_kind.point_lines(points)
    else:
        lines += ["Best learning rate per method on the validation split (completed trials; pruned trials stopped "
                  "early). These are validation scores of the best of many trials, so they overstate what the rate "
                  "gives; for test scores at a tuned rate on fresh seeds, run the fair study.", "",
                  "| method | trials done | pruned | failed | best lr | best validation accuracy |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in plan.optuna_names():
            mine = trials[trials["study"] == name] if len(trials) else trials
            done = mine[mine["state"] == "COMPLETE"] if len(mine) else mine
            best = done.loc[done["average_accuracy"].idxmax()] if len(done) else None
            lines.append(f"| `{name.split('/', 1)[1]}` | {len(done)} | {int((mine['state'] == 'PRUNED').sum()) if len(mine) else 0} | "
                         f"{int((mine['state'] == 'FAIL').sum()) if len(mine) else 0} | "
                         f"{best['lr']:.3g} | {_pct(best['average_accuracy'])} |" if best is not None else
                         f"| `{name.split('/', 1)[1]}` | 0 | – | – | – | – |")
    failed = trials[trials["state"] == "FAIL"] if len(trials) else trials
    if len(failed):
        lines += ["", "Failed trials:", ""] + [f"- trial {r['trial']} (`{r['spec']}`, seed {r['seed']}): {r['fail_reason']}"
                                              for _, r in failed.iterrows()]
    lines += ["", "Files: trials.csv (every trial)" + "".join(f", {p.name}" for p in plots) + ". "
              "Each trial is a nested MLflow run under the study's run `study-" + plan.name + "`.", ""]
    return "\n".join(lines)


# a method option that overrides a run option in the header: the spec key -> the header's name and the run field
_OVERRIDES = {"lr": ("lr", "lr"), "r": ("rank", "rank"), "alpha": ("alpha", "alpha")}


def shared_settings(plan) -> list[tuple[str, str]]:
    """(name, value) of lr, rank and alpha: the run's value when no point overrides it, else 'per configuration'.

    Not :func:`harness.report.shared_settings`, which reads the settings each method's results recorded: a
    study's header is written from its plan, before (and while) its trials run. The header's model, tasks and
    training length are :mod:`harness.report`'s (:func:`~harness.report.tasks_text`,
    :func:`~harness.report.training_length`), its layout its own (one line each for setup and training).
    """
    out = []
    for key, (name, field_name) in _OVERRIDES.items():
        varies = any(key in point for point in plan.points) or (key == "lr" and plan.study_kind.tunes_lr)
        value = getattr(plan.config, field_name)
        out.append((name, "per configuration" if varies else f"{value:g}"))
    return out


def shared_rate_warning(plan) -> str:
    """The line a grid study's summary opens with: one shared rate, scored on one split, so no verdict."""
    rate = dict(shared_settings(plan))["lr"]
    where = "the test split" if plan.config.split == "test" else f"the {plan.config.split} split"
    return (f"**Not a fair comparison.** Every configuration trained at the same learning rate ({rate}), not tuned "
            f"for each, and was scored on {where}. Under Adam the middle matrices change how far a step moves "
            "dW, so a difference here may be that rate suiting one configuration better; nothing here is a "
            "verdict. For one, run this study with `--tune-lr` (each point's rate chosen on validation, then "
            "fresh seeds scored once on test, compared with the LoRA point of its options) or the `fair` study.")


def _pct(value: float, std: float | None = None) -> str:
    if value is None or value != value:
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None and std == std else "")


def _fmt_int(value) -> str:
    return "–" if value is None or value != value else f"{int(value):,}"


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """Configurations no other beats on both objectives (higher accuracy, fewer parameters)."""
    done = points.dropna(subset=["mean", "trainable_params"])
    keep = []
    for i, a in done.iterrows():
        dominated = any((b["mean"] >= a["mean"] and b["trainable_params"] <= a["trainable_params"]
                         and (b["mean"] > a["mean"] or b["trainable_params"] < a["trainable_params"]))
                        for j, b in done.iterrows() if j != i)
        if not dominated:
            keep.append(i)
    return done.loc[keep].sort_values("trainable_params")


# ----------------------------------------------------------------------------------------------------------
# Plots


def plot_axis(plan) -> str:
    """The axis on the x axis: the study file's plot.x, else the first option that varies (else the method)."""
    if plan.plot_x:
        return plan.plot_x
    for key in dict.fromkeys(k for p in plan.points for k in p):
        if key != "method" and len({str(p.get(key)) for p in plan.points if key in p}) > 1:
            return key
    return "method"


def _plot_axis(plan, storage, trials, points, folder: Path) -> Path | None:
    """Score against the study's axis, one series per configuration of the other options, error bars = std over seeds."""
    if points is None:
        return None
    plt = pyplot()
    x_key = plot_axis(plan)
    series: dict[str, list[tuple[Any, float, float]]] = {}
    references = []
    for _, row in points.iterrows():
        point = plan.points[row["point"]]
        if x_key not in point:
            references.append((row["spec"], row["mean"], row["std"]))
            continue
        rest = {k: v for k, v in point.items() if k != x_key}
        series.setdefault(spec_of(rest) if rest else "", []).append((point[x_key], row["mean"], row["std"]))
    numeric = all(isinstance(x, (int, float)) for pts in series.values() for x, _, _ in pts)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.get_cmap("tab10")
    if numeric:
        for i, (label, pts) in enumerate(series.items()):
            pts.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * _nz(p[2]) for p in pts],
                        marker="o", capsize=3, color=colours(i % 10), label=label or x_key)
        xs = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(xs)
        if x_key == "r" and len(xs) > 2:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
    else:
        cats = list(dict.fromkeys(x for pts in series.values() for x, _, _ in pts))
        width = 0.8 / max(len(series), 1)
        for i, (label, pts) in enumerate(series.items()):
            at = {x: (m, s) for x, m, s in pts}
            xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(cats)) if cats[c] in at]
            ys = [100 * at[c][0] for c in cats if c in at]
            errs = [100 * _nz(at[c][1]) for c in cats if c in at]
            ax.bar(xs, [0 if y != y else y for y in ys], width, yerr=errs, capsize=3, color=colours(i % 10),
                   label=label or x_key)
        ax.set_xticks(range(len(cats)), [str(c) for c in cats])
    for j, (label, mean, std) in enumerate(references):
        if mean == mean:
            colour = colours((len(series) + j) % 10)
            ax.axhline(100 * mean, linestyle="--", color=colour, label=f"{label} (reference)")
            if std == std:
                ax.axhspan(100 * (mean - std), 100 * (mean + std), color=colour, alpha=0.1)
    ax.set_xlabel({"n": "chain length n", "r": "rank r", "init": "initialisation of the middle matrices",
                   "structure": "MTLoRA structure"}.get(x_key, x_key))
    ax.set_ylabel("average accuracy (%)")
    seeds = plan.study_kind.scored_seeds(plan)
    ax.set_title(f"{plan.name}: mean ± std over {len(seeds)} seed(s)" + plan.study_kind.axis_title_note)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, folder / f"score_vs_{x_key}.png", dpi=120)


def _nz(value: float) -> float:
    return 0.0 if value is None or value != value else value


def _plot_pareto(plan, storage, trials, points, folder: Path) -> Path | None:
    plt = pyplot()
    done = points.dropna(subset=["mean", "trainable_params"])
    if not len(done):
        return None
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(done["trainable_params"], 100 * done["mean"], yerr=100 * done["std"].fillna(0), fmt="o",
                color="0.6", capsize=3, label="configuration (mean ± std over seeds)")
    ax.plot(front["trainable_params"], 100 * front["mean"], "-o", color="C3", label="Pareto front")
    for _, row in done.iterrows():
        ax.annotate(row["spec"], (row["trainable_params"], 100 * row["mean"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(f"{plan.name}: accuracy against trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, folder / "pareto_front.png", dpi=120)


def _plot_lr(plan, storage, trials, points, folder: Path) -> Path | None:
    if not len(trials):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, name in enumerate(plan.optuna_names()):
        mine = trials[(trials["study"] == name) & trials["state"].isin(["COMPLETE", "PRUNED"])]
        done = mine[mine["state"] == "COMPLETE"]
        ax.scatter(done["lr"], 100 * done["average_accuracy"], color=f"C{i % 10}", label=name.split("/", 1)[1])
        pruned = mine[mine["state"] == "PRUNED"]
        ax.scatter(pruned["lr"], [0] * len(pruned), color=f"C{i % 10}", marker="x")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (x: pruned)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{plan.name}: TPE search per method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, folder / "lr_search.png", dpi=120)


def _plot_importances(plan, storage, trials, points, folder: Path) -> Path | None:
    """Importances over the parameters every completed trial has (Optuna's own evaluator; no plotly needed)."""
    import optuna

    importances: dict[str, dict[str, float]] = {}
    for name in plan.optuna_names():
        study = optuna.load_study(study_name=name, storage=storage)
        complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if len(complete) < 2:
            continue
        target = plan.study_kind.importance_target()
        try:
            with warnings.catch_warnings():  # it warns about few trials per value and about custom targets
                warnings.simplefilter("ignore", UserWarning)
                found = optuna.importance.get_param_importances(study, target=target)
        except (RuntimeError, ValueError):
            continue  # e.g. no parameter varies among the completed trials
        if found:
            importances[name] = found
    if not importances:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.35 * sum(len(v) for v in importances.values())))
    labels, values = [], []
    for name, found in importances.items():
        for param, value in found.items():
            labels.append(param if len(importances) == 1 else f"{name.split('/', 1)[-1]}: {param}")
            values.append(value)
    ax.barh(range(len(values)), values, color="C0")
    ax.set_yticks(range(len(values)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("importance for the average accuracy (Optuna's default evaluator)")
    ax.set_title(f"{plan.name}: parameter importances")
    return save_figure(fig, folder / "param_importances.png", dpi=120)


# ----------------------------------------------------------------------------------------------------------
# The study's MLflow run


def finish_parent_run(plan, storage, artifacts=(), interrupted: bool = False) -> None:
    """Log the report to the study's MLflow run; end it KILLED (interrupted), FINISHED (nothing left) or leave it RUNNING."""
    import optuna
    from optuna.trial import TrialState

    if not plan.mlflow_parent_run_id:
        return
    tracker = Tracker(plan.config.tracking_uri, plan.config.experiment)
    if not tracker.has_run(plan.mlflow_parent_run_id):  # the journal came from another machine: nothing to log to
        return
    client = tracker.client
    for path in artifacts:
        client.log_artifact(plan.mlflow_parent_run_id, str(path), "results")
    pending = sum(len(optuna.load_study(study_name=n, storage=storage).get_trials(
        deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))) for n in plan.optuna_names())
    if interrupted:
        client.set_terminated(plan.mlflow_parent_run_id, status="KILLED")
    elif pending == 0:
        client.set_terminated(plan.mlflow_parent_run_id, status="FINISHED")


# ----------------------------------------------------------------------------------------------------------
# Fair studies: the verdict per method (ablations.fair)


def write_fair_report(plan, storage) -> Path:
    """verdict.csv, verdict.md, trials.csv (every trial with its split) and the tuning plots of a fair study."""
    folder = report_dir(plan)
    folder.mkdir(parents=True, exist_ok=True)
    trials = trials_frame(plan, storage)
    results = fair.method_results(plan, storage)
    rows = pd.DataFrame(fair.verdict_rows(plan, results), columns=list(fair.VERDICT_COLUMNS))
    with atomic_path(folder / "trials.csv") as tmp:
        trials.to_csv(tmp, index=False)
    with atomic_path(folder / "verdict.csv") as tmp:
        rows.to_csv(tmp, index=False)
    plots = []
    for draw in (_plot_lr_sensitivity, _plot_tuning_curve, _plot_tuned_axis, _plot_forgetting_frontier):
        try:
            path = draw(plan, results, trials, folder)
        except Exception as err:  # noqa: BLE001 (a plot that cannot be drawn must not lose the tables)
            path = None
            print(f"warning: {draw.__name__[1:]} not drawn: {type(err).__name__}: {err}")
        if path is not None:
            plots.append(path)
    try:
        path, curvature = _plot_lr_vs_curvature(plan, storage, results, folder)
    except Exception as err:  # noqa: BLE001 (MLflow unreadable, say: the verdict does not depend on it)
        path, curvature = None, [f"lr_vs_curvature.png not drawn: {type(err).__name__}: {err}"]
        print(f"warning: {curvature[0]}")
    if path is not None:
        plots.append(path)
    write_text_atomic(folder / "verdict.md", verdict_markdown(plan, results, rows, trials, plots, curvature))
    written = [folder / "verdict.csv", folder / "verdict.md", folder / "trials.csv", *plots,
               *write_mechanisms(plan, results, folder), write_items(results, folder),
               write_study_result(plan, results, rows, folder)]
    finish_parent_run(plan, storage, artifacts=written)
    return folder


def write_study_result(plan, results, rows: pd.DataFrame, folder: Path) -> Path:
    """result.json of a fair study: the commit, library versions, the resolved trial configuration, the design
    (grid, seeds, delta) and, per method, its chosen rate, per-seed test scores and verdict row. Not a
    harness.run result.json (no single fingerprint: each trial's is in MLflow), so harness.compare does not
    read it; items.csv.gz holds the per-item verdicts."""
    import json

    from harness.config import config_to_dict  # deferred: harness.config loads torch

    verdicts = {r["method"]: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                for r in rows.to_dict(orient="records")}
    content = {
        "format": 1, "kind": "fair study", "study": plan.name, "created": pd.Timestamp.now("UTC").isoformat(),
        "git": _git(), "versions": library_versions(), "config": config_to_dict(plan.config),
        "design": {"lr_grid": list(plan.lr_grid), "tuning_seeds": list(plan.seeds),
                   "final_seeds": list(getattr(plan, "final_seeds", []) or []), "extend": getattr(plan, "extend", None),
                   "delta_points": 100 * (getattr(plan, "delta", None) or 0.0)},
        "methods": [{"method": r.spec, "reference": r.reference, "chosen_lr": r.chosen_lr,
                     "tuning": {str(fair.lr_at(plan.lr_grid, p)): v for p, v in sorted(r.tuning.scores.items())},
                     "test": {str(s): v for s, v in sorted(r.test.items())}, "diverged": r.diverged,
                     "failed": r.failed, "verdict": verdicts.get(r.spec)} for r in results],
    }
    return write_text_atomic(folder / "result.json", json.dumps(content, indent=1, default=str) + "\n")


ITEM_COLUMNS = ("method", "seed", "task", "doc_id", "correct")


def item_frame(results) -> pd.DataFrame:
    """Every final run's per-item correctness (method as in verdict.csv): what every statistic of the verdict
    can be recomputed from without rerunning (python -m ablations.recompute)."""
    records = [(arm.spec, seed, task, doc, value) for arm in results for seed, tasks in sorted(arm.correct.items())
               for task, items in sorted(tasks.items()) for doc, value in items.items()]
    frame = pd.DataFrame.from_records(records, columns=list(ITEM_COLUMNS))
    return frame.sort_values(["method", "seed", "task", "doc_id"], kind="stable", key=_natural).reset_index(drop=True)


def _natural(column: pd.Series) -> pd.Series:
    """Sort doc ids as numbers where they all are (2 before 10), else as text."""
    numeric = pd.to_numeric(column, errors="coerce")
    return numeric if numeric.notna().all() else column.astype(str)


def write_items(results, folder: Path) -> Path:
    path = folder / "items.csv.gz"
    with atomic_path(path) as tmp:
        item_frame(results).to_csv(tmp, index=False, compression={"method": "gzip", "mtime": 0})
    return path


def write_mechanisms(plan, results, folder: Path) -> list[Path]:
    """diagnostics.md, diagnostics.csv (every final run's measures) and claims.csv (ablations.mechanisms)."""
    from ablations import mechanisms  # deferred: harness.diagnostics loads torch

    runs = mechanisms.run_rows(results)
    claims = mechanisms.claim_rows(results)
    with atomic_path(folder / "diagnostics.csv") as tmp:
        pd.DataFrame(runs, columns=list(mechanisms.RUN_COLUMNS)).to_csv(tmp, index=False)
    with atomic_path(folder / "claims.csv") as tmp:
        pd.DataFrame(claims, columns=list(mechanisms.CLAIM_COLUMNS)).to_csv(tmp, index=False)
    write_text_atomic(folder / "diagnostics.md", mechanisms.markdown(plan, results, claims, runs))
    return [folder / "diagnostics.md", folder / "diagnostics.csv", folder / "claims.csv"]


def verdict_markdown(plan, results, rows: pd.DataFrame, trials: pd.DataFrame, plots: list[Path],
                     curvature: list[str] = ()) -> str:
    """verdict.md: each comparison's interval first, then its verdict, the table, the design and the notes."""
    cfg = plan.config
    delta = plan.delta or 0.02
    tune = trials[trials["stage"] == "tune"] if len(trials) else trials
    ran = tune[tune["state"].isin(["COMPLETE", "PRUNED", "FAIL"]) & tune["duplicate_of"].isna()] if len(tune) else tune
    grid = ", ".join(f"{r:.3g}" for r in plan.lr_grid)
    lines = [f"# Fair comparison: {plan.name}", "", *([plan.description, ""] if plan.description else [])]
    compared = [r for _, r in rows.iterrows() if r["reference"]]
    if compared:
        lines += ["## The gains", ""]
        for r in compared:
            if r["gain_low"] == r["gain_low"]:
                head = (f"- `{r['method']}` - `{r['reference']}`: the gain lies in [{_signed(r['gain_low'])}, "
                        f"{_signed(r['gain_high'])}] points (95% over {len(str(r['seeds']).split(','))} seeds; "
                        f"estimate {_signed(r['gain'])})")
            else:
                head = f"- `{r['method']}` - `{r['reference']}`: no interval yet"
            lines.append(f"{head}: **{r['verdict']}**. {r['note'] or ''}".rstrip())
        lines.append("")
    lines += [
        "## Protocol", "",
        f"- **model**: {cfg.model}; **training data**: {cfg.train_data}; **tasks**: {', '.join(cfg.tasks)}"
        + (f" (at most {cfg.limit} items each)" if cfg.limit else ""),
        f"- **the same for every method**: {cfg.max_steps or str(cfg.epochs) + ' epoch(s)'} steps, batch "
        f"{cfg.batch_size}, rank {cfg.rank}, alpha {cfg.alpha:g}; learning-rate grid {grid} "
        f"(extended by at most {plan.extend} step(s) on a side where the best rate is the edge); tuning "
        f"seed(s) {', '.join(map(str, plan.seeds))} per rate",
        f"- **selection**: each method's rate is the best on a smoothed validation curve (a Gaussian kernel in "
        f"log10 lr, {fair.SMOOTHING_STEPS:g} grid steps wide, over every tuning score: not one seed's argmax; "
        f"{len(ran)} tuning trials in all, every one on the validation split"
        + (f", pruned on validation every {plan.intermediate_every} steps" if plan.intermediate_every else "")
        + "). Nothing was chosen on the test split. A rate still at the edge after the last extension "
        "withholds the verdict.",
        f"- **final runs**: each method retrained at its chosen rate with the fresh seeds "
        f"{', '.join(map(str, plan.final_seeds))} and scored on the test split once; no test score exists "
        "for any other rate. A diverged final run is scored as the base model (never dropped).",
        f"- **verdicts**, fixed before any result: the smallest effect of interest delta = {100 * delta:.1f} points. "
        "`better` / `worse`: the paired t-test over seeds, Holm-adjusted within its family; `equivalent`: the 90% "
        "interval lies inside +-delta (two one-sided tests, Holm-adjusted); `inconclusive`: neither, or withheld. "
        "Comparisons with LoRA and method-minus-control contrasts are separate Holm families.", "",
        "| method | vs | chosen lr | grid searched | validation: best of grid (biased up) / smoothed | test mean ± std "
        "| seeds | diverged | gain [95% over seeds] | 90% interval | ± items (95%) | p (Holm) | p equiv. (Holm) "
        "| verdict |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for _, r in rows.iterrows():
        gain = _signed(r["gain"]) + (f" [{_signed(r['gain_low'])}, {_signed(r['gain_high'])}]"
                                     if r["gain_low"] == r["gain_low"] else "")
        ninety = (f"[{_signed(r['gain_low90'])}, {_signed(r['gain_high90'])}]" if r["gain_low90"] == r["gain_low90"]
                  else "–")
        items = (f"[{_signed(r['items_low'])}, {_signed(r['items_high'])}]" if r["items_low"] == r["items_low"]
                 else "–")
        diverged = "–" if r["divergence_rate"] != r["divergence_rate"] else f"{100 * r['divergence_rate']:.0f}%"
        lines.append(
            f"| `{r['method']}` | {('`' + r['reference'] + '`') if r['reference'] else '–'} | {_g(r['chosen_lr'])} | "
            f"{_g(r['grid_low'])} – {_g(r['grid_high'])} | {_pct(r['valid_best_of_grid'])} / "
            f"{_pct(r['valid_smoothed'])} | {_pct(r['test_mean'], r['test_std'])} | {r['seeds'] or '–'} | {diverged} | "
            f"{gain} | {ninety} | {items} | {_g(r['p_holm'])} | {_g(r['p_equivalence_holm'])} | {r['verdict']} |")
    lines += ["", "Scores are average accuracy (%) over the tasks; gains are the row minus its reference (vs), in "
              "points. " + interval_sentence(plan),
              "The validation column's first figure is the best raw score of the grid: the maximum of several noisy "
              "scores, biased upwards; the second is the smoothed curve at the chosen rate, which the choice used."]
    shares = [r for r in compared if r["var_seed_share"] == r["var_seed_share"]]
    if shares:
        lines += ["", "## Where the gain's uncertainty comes from", "",
                  "Variance of each gain split into training runs (seeds) and test items (a method-by-item "
                  "interaction); the rest is their interaction and each answer's 0/1 noise. A large seed share asks "
                  "for more seeds, a large item share for more test items.", "",
                  "| comparison | seeds | items | interaction |", "|---|---:|---:|---:|"]
        for r in shares:
            rest = 1 - r["var_seed_share"] - r["var_item_share"]
            lines.append(f"| `{r['method']}` - `{r['reference']}` | {100 * r['var_seed_share']:.0f}% | "
                         f"{100 * r['var_item_share']:.0f}% | {100 * rest:.0f}% |")
    lines += _validation_sizes_lines(cfg)
    d = fair.design(plan, results)
    lines += ["", "## What this design can show", "",
              "Recomputed from this study's results (the pooled per-seed SD of every comparison, more degrees "
              "of freedom than one comparison's); the trial time is not estimated here.", "",
              *[f"- {line}" for line in fair.design_lines(d, plan)[2:]]]
    notes = [f"- `{r['method']}`: {r['note']}" for _, r in rows.iterrows() if r["note"] and not r["reference"]]
    if notes:
        lines += ["", "Notes on the references (grid extensions, rates at the edge, failed or missing seeds):", "",
                  *notes]
    lines += ["", "The intervals do not cover the choice of rate, made once from the tuning seed(s) above. How far "
              "the chosen rate and the gains move when a method is re-tuned with another tuning seed is measured "
              "by a second study with the same protocol and another `seeds:`, compared with this one by "
              "`python -m ablations.retune` (docs/ablations.md)."]
    if curvature:
        lines += ["", *curvature]
    lines += ["", "Files: verdict.csv (this table), trials.csv (every trial, tuning and final, with its split)"
              + "".join(f", {p.name}" for p in plots) + ", items.csv.gz (every final run's per-item correctness: "
              "`python -m ablations.recompute` recomputes this table from it), diagnostics.md, diagnostics.csv and "
              "claims.csv (the mechanisms at the tuned rates). Each trial is a nested MLflow run under `study-"
              + plan.name + "`.", ""]
    return "\n".join(lines)


def _validation_sizes_lines(cfg) -> list[str]:
    """Each task's validation size (what the rates were chosen on), for the LLM-Adapters tasks; arithmetic's
    validation split is the generator's own."""
    from harness.data import validation_sizes  # deferred: harness.data loads torch

    tasks = [t for t in cfg.tasks if t.startswith("llm_adapters")]
    if not tasks:
        return ["", f"Validation: the generator's own validation split of {', '.join(cfg.tasks)}"
                + (f", at most {cfg.limit} items each." if cfg.limit else ".")]
    try:
        sizes = validation_sizes(cfg.train_data, tasks, cfg.data_dir)
    except (UserError, OSError) as err:
        return ["", f"Validation sizes could not be listed: {err}"]
    listed = ", ".join(f"{t} {n}" for t, n in sizes.items())
    return ["", f"Validation items per task (the rates were chosen on these; each stratum of the training file): "
            f"{listed}" + (f"; at most {cfg.limit} scored per task." if cfg.limit else ".")]


def interval_sentence(plan) -> str:
    """What the gain's intervals cover, said where the numbers are shown (a fair study has at least 2 final seeds)."""
    return ("The 95% interval is a Student-t interval over the final seeds: each seed's paired difference on the "
            "full test set, the training run as the unit of replication, so it covers run-to-run variation on this "
            "test set; it does not cover which test items were drawn (the item bootstrap beside it, ± items, "
            "resamples items with the seeds fixed) nor the choice of learning rate, which was made on validation "
            "before any test score existed. The 90% interval is the one the equivalence test uses.")


def _signed(value) -> str:
    return "–" if value is None or value != value else f"{100 * value:+.1f}"


def _g(value) -> str:
    return "–" if value is None or value != value else f"{value:.3g}"


def _plot_lr_sensitivity(plan, results, trials, folder: Path) -> Path | None:
    """Validation score against learning rate per method: mean over tuning seeds, band from lowest to highest seed."""
    if not any(r.tuning.scores for r in results):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in enumerate(results):
        positions = sorted(r.tuning.scores)
        if not positions:
            continue
        xs = [fair.lr_at(plan.lr_grid, p) for p in positions]
        values = [list(r.tuning.scores[p].values()) for p in positions]
        colour = f"C{i % 10}"
        ax.plot(xs, [100 * mean_of(v) for v in values], "-o", color=colour, label=r.spec)
        if len(plan.seeds) > 1:
            ax.fill_between(xs, [100 * min(v) for v in values], [100 * max(v) for v in values], color=colour,
                            alpha=0.15)
        if r.chosen_lr is not None:
            ax.plot([r.chosen_lr], [100 * r.valid_smoothed], "*", color=colour, markersize=14)
        if r.tuning.smoothed:
            smooth = sorted(r.tuning.smoothed)
            ax.plot([fair.lr_at(plan.lr_grid, p) for p in smooth], [100 * r.tuning.smoothed[p] for p in smooth],
                    ":", color=colour, linewidth=1)
    for edge in (plan.lr_grid[0], plan.lr_grid[-1]):
        ax.axvline(edge, color="0.7", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate\n(vertical dotted: the grid's ends; dotted curve: smoothed; star: chosen)")
    ax.set_ylabel("validation accuracy (%)")
    band = f"band: lowest to highest of {len(plan.seeds)} tuning seeds" if len(plan.seeds) > 1 else "1 tuning seed"
    ax.set_title(f"{plan.name}: learning-rate sensitivity ({band})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, folder / "lr_sensitivity.png", dpi=120)


def frontier_points(results) -> dict[str, list[tuple[int, float, float]]]:
    """Per method, (final seed, forgetting, test accuracy) of every final run that measured its forgetting."""
    out = {}
    for r in results:
        points = [(s, measures.get("forgetting", math.nan), r.test[s]) for s, (measures, _) in sorted(r.measured.items())
                  if s in r.test and math.isfinite(measures.get("forgetting", math.nan))]
        if points:
            out[r.spec] = points
    return out


def _plot_forgetting_frontier(plan, results, trials, folder: Path) -> Path | None:
    """Learning against forgetting (the loss increase on general text; Biderman et al. 2024, "LoRA Learns Less and
    Forgets Less"). Left: validation accuracy against forgetting over the tuning rates, one line per method in order
    of lr (the trade-off the rate sets). Right: every final run's test accuracy against its forgetting at the chosen
    rate, and each method's mean ± sd. Up and to the left is learning more while forgetting less."""
    points = frontier_points(results)
    tuning = {r.spec: sorted((lr, mean_of(m.get("forgetting", math.nan) for m in by_seed.values()),
                              mean_of(r.tuning.scores.get(_position(plan, r, lr), {}).get(s, math.nan) for s in by_seed))
                             for lr, by_seed in r.tuning_measured.items()) for r in results if r.tuning_measured}
    if not points and not tuning:
        return None
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(results):
        colour = f"C{i % 10}"
        line = [(f, 100 * v, lr) for lr, f, v in tuning.get(r.spec, []) if math.isfinite(f) and math.isfinite(v)]
        if line:
            left.plot([f for f, _, _ in line], [v for _, v, _ in line], "-o", color=colour, label=r.spec, markersize=4)
            for f, v, lr in line:
                left.annotate(f"{lr:.2g}", (f, v), fontsize=6, color=colour, xytext=(3, 3), textcoords="offset points")
        mine = points.get(r.spec)
        if mine:
            xs, ys = [f for _, f, _ in mine], [100 * a for _, _, a in mine]
            right.scatter(xs, ys, color=colour, alpha=0.35, s=18)
            right.errorbar([mean_of(xs)], [mean_of(ys)], xerr=[std_of(xs) if len(xs) > 1 else 0],
                           yerr=[std_of(ys) if len(ys) > 1 else 0], fmt="o", color=colour, markersize=8, capsize=3,
                           label=f"{r.spec} (lr {r.chosen_lr:.3g}, {len(mine)} seeds)")
    left.set_title("tuning: validation accuracy over the rates (labels: lr)", fontsize=9)
    left.set_ylabel("validation accuracy (%)")
    right.set_title("final runs at the chosen rate (each seed; mean ± sd)", fontsize=9)
    right.set_ylabel("test accuracy (%)")
    for ax in (left, right):
        ax.set_xlabel("forgetting: general-text loss after minus before (nats/token)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{plan.name}: learning against forgetting", fontsize=10)
    return save_figure(fig, folder / "forgetting_frontier.png", dpi=120)


def _position(plan, arm, lr: float) -> int | None:
    """The grid position of ``lr`` among the arm's tuning scores (None when it has none there)."""
    return next((p for p in arm.tuning.scores if math.isclose(fair.lr_at(plan.lr_grid, p), lr)), None)


def _plot_lr_vs_curvature(plan, storage, results, folder: Path) -> tuple[Path | None, list[str]]:
    """Each method's chosen rate against 1 / lambda_max (harness.diagnostics.plot_lr_vs_curvature), and the lines
    verdict.md says about it: a table of the values, or why there is no plot."""
    from harness.diagnostics import plot_lr_vs_curvature  # deferred: it loads torch

    if plan.config.diagnostics != "full":
        return None, ["The chosen rate against 1 / lambda_max (lr_vs_curvature.png) needs `diagnostics: full` in the "
                      "study's run options: lambda_max, the Hessian's largest eigenvalue at initialisation, is "
                      "measured only at that level."]
    measured = fair.curvatures(plan, storage)
    chosen = [(r, measured[r.spec]) for r in results if r.chosen_lr is not None and r.spec in measured]
    if not chosen:
        return None, ["lr_vs_curvature.png: not drawn yet: no method has both a chosen rate and a measured "
                      "lambda_max."]
    points = [(r.spec, r.chosen_lr, value) for r, values in chosen for _, value in sorted(values.items())]
    path = plot_lr_vs_curvature(points, folder / "lr_vs_curvature.png")
    lines = ["Curvature (lr_vs_curvature.png): lambda_max is the largest eigenvalue of the training loss's Hessian "
             "w.r.t. the adapter at initialisation (it does not depend on the rate), mean over the seeds measured. "
             "The \"Learning Rate Matters\" study reports a correlation between a method's best rate and "
             "1 / lambda_max across methods, not a rule: where it holds here, lr x lambda_max is about the same for "
             "every method. A few methods make a few points; read agreement as consistent with it, not as proof.",
             "",
             "| method | chosen lr | lambda_max | seeds | lr x lambda_max |", "|---|---:|---:|---:|---:|"]
    for r, values in chosen:
        mean = mean_of(values.values())
        lines.append(f"| `{r.spec}` | {_g(r.chosen_lr)} | {_g(mean)} | {len(values)} | {_g(r.chosen_lr * mean)} |")
    return path, lines


def tuning_curves(trials: pd.DataFrame) -> dict[str, list[float]]:
    """Per method, the best validation score after each finished tuning trial, in the order they finished."""
    if not len(trials):
        return {}
    tune = trials[(trials["stage"] == "tune") & trials["duplicate_of"].isna()
                  & trials["state"].isin(["COMPLETE", "PRUNED", "FAIL"])]
    curves = {}
    for spec, mine in tune.groupby("spec", sort=False):
        mine = mine.sort_values(["finished", "trial"], na_position="last")
        mine = mine[~((mine["state"] == "FAIL") & _retried(mine))]  # a killed trial's retry stands for it
        best, curve = math.nan, []
        for _, t in mine.iterrows():
            if t["state"] == "COMPLETE" and not (t["average_accuracy"] <= best):
                best = t["average_accuracy"]
            curve.append(best)
        curves[spec] = curve
    return curves


def _plot_tuning_curve(plan, results, trials, folder: Path) -> Path | None:
    curves = tuning_curves(trials)
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in enumerate(results):
        curve = curves.get(r.spec)
        if curve:
            ax.step(range(1, len(curve) + 1), [100 * v for v in curve], where="post", marker="o", color=f"C{i % 10}",
                    label=r.spec)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tuning trials finished (pruned and failed ones count)")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_title(f"{plan.name}: tuning curve per method", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, folder / "tuning_curve.png", dpi=120)


def _plot_tuned_axis(plan, results, trials, folder: Path) -> Path | None:
    """Grid studies run with --tune-lr: the test score against the study's axis, each point at its own rate."""
    if plot_axis(plan) == "method" or not len(trials):
        return None
    finals = trials[(trials["stage"] == "final") & trials["duplicate_of"].isna()]
    return _plot_axis(plan, None, finals, point_table(plan, finals), folder)
