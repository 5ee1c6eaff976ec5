"""The diagnostics' figures: spectra.png, grad_norms.png, convergence.png, and a fair study's lr against curvature."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from harness.diagnostics.convergence import smoothed
from harness.diagnostics.measures import ALL_LAYERS, Trace, nan_mean
from harness.plots import legend as _legend
from harness.plots import method_colours as _colours
from harness.plots import pyplot, save_figure


def _mean_series(series: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """The mean over runs of (step, value) series, at the steps they share."""
    common = sorted(set.intersection(*[{s for s, _ in one} for one in series])) if series else []
    maps = [dict(one) for one in series]
    return common, [sum(m[s] for m in maps) / len(maps) for s in common]


def plot_spectra(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Normalised spectra s_i / s_1 of dW per method: the mean over layers and seeds, index i on the x axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    layers = [r for r in rows if r["layer"] != ALL_LAYERS and r["singular_values"]]
    methods = list(dict.fromkeys(r["method"] for r in layers))
    colours = _colours(plt, methods)
    for method in methods:
        spectra = [[float(x) for x in r["singular_values"].split()] for r in layers if r["method"] == method]
        spectra = [[x / s[0] for x in s] for s in spectra if s and s[0] > 0]
        if not spectra:
            continue
        width = min(len(s) for s in spectra)
        mean = [sum(s[i] for s in spectra) / len(spectra) for i in range(width)]
        erank = nan_mean(r["effective_rank"] for r in layers if r["method"] == method)
        ax.plot(range(1, width + 1), mean, marker="o", markersize=3, color=colours[method],
                label=f"{method} (effective rank {erank:.1f})")
    if layers and all(len(r["singular_values"].split()) <= 32 for r in layers):
        ax.set_xticks(range(1, max(len(r["singular_values"].split()) for r in layers) + 1))
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("s_i / s_1 (mean over layers and seeds)")
    ax.set_title("Normalised spectra of the updates dW", fontsize=10)
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return save_figure(fig, path)


def plot_grad_norms(traces: Sequence[Trace], path: str | os.PathLike) -> Path:
    """Gradient norm of each parameter group (A, middle, B, cond) per step, one line per method (mean over seeds)."""
    plt = pyplot()
    groups = [g for g in ("A", "middle", "B", "cond")
              if any(g in gs for t in traces for _, gs in t.group_grad_norms)]
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4 * max(len(groups), 1), 4), dpi=120, squeeze=False)
    methods = list(dict.fromkeys(t.method for t in traces))
    colours = _colours(plt, methods)
    for ax, group in zip(axes[0], groups):
        for method in methods:
            series = [[(s, gs[group]) for s, gs in t.group_grad_norms if group in gs]
                      for t in traces if t.method == method]
            series = [s for s in series if s]
            if series:
                steps, values = _mean_series(series)
                ax.plot(steps, values, color=colours[method], label=method, linewidth=1)
        if any(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")  # (a group whose gradients are all zero, e.g. LoRA's A at step 1, stays linear)
        ax.set_title(f"group {group}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("gradient norm before clipping (mean over seeds)")
    if groups:
        _legend(axes[0][0])
    else:
        axes[0][0].text(0.5, 0.5, "no per-group gradient norms were recorded", ha="center", va="center",
                        transform=axes[0][0].transAxes)
    return save_figure(fig, path)


def plot_convergence(traces: Sequence[Trace], path: str | os.PathLike) -> Path:
    """Left: the fraction of its final loss reduction each method has reached; right: ||dW||_F per step."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    methods = list(dict.fromkeys(t.method for t in traces))
    colours = _colours(plt, methods)
    for method in methods:
        mine = [t for t in traces if t.method == method and t.losses]
        fractions = []
        for t in mine:
            curve = smoothed(t.losses)
            start, end = t.losses[0][1], curve[-1][1]
            if end < start:
                fractions.append([(s, (start - v) / (start - end)) for s, v in curve])
        if fractions:
            steps, values = _mean_series(fractions)
            left.plot(steps, values, color=colours[method], label=method)
        norms = [t.delta_norms for t in mine if t.delta_norms]
        if norms:
            steps, values = _mean_series(norms)
            right.plot(steps, values, color=colours[method], marker="o", markersize=3, label=method)
    for level in (0.5, 0.9):
        left.axhline(level, color="0.5", linestyle=":", linewidth=1)
    left.set_xlabel("optimizer step")
    left.set_ylabel("fraction of the final loss reduction (smoothed)")
    left.set_title("Convergence (mean over seeds)", fontsize=10)
    right.set_xlabel("optimizer step")
    right.set_ylabel("||dW||_F over all adapted layers")
    right.set_title("Size of the update", fontsize=10)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        _legend(ax)
    return save_figure(fig, path)


def plot_lr_vs_curvature(points: Iterable[Mapping[str, Any] | tuple[str, float, float]],
                         path: str | os.PathLike) -> Path:
    """A fair study's chosen learning rate against 1 / lambda_max, per method (log-log).

    ``points`` are ``(method, lr, lambda_max)`` tuples or mappings with those keys (diagnostics rows with an
    ``lr`` added). Several points of one method (seeds) are drawn as one colour. The dotted line lr = 2 /
    lambda_max is gradient descent's stability edge, for orientation only: AdamW's effective step differs.
    """
    triples = [(p["method"], float(p["lr"]), float(p["lambda_max"])) if isinstance(p, Mapping) else
               (p[0], float(p[1]), float(p[2])) for p in points]
    triples = [(m, lr, lam) for m, lr, lam in triples if lam > 0 and lr > 0]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    methods = list(dict.fromkeys(m for m, _, _ in triples))
    colours = _colours(plt, methods)
    for method in methods:
        xs = [1 / lam for m, _, lam in triples if m == method]
        ys = [lr for m, lr, _ in triples if m == method]
        ax.scatter(xs, ys, color=colours[method], label=method)
    if triples:
        xs = sorted(1 / lam for _, _, lam in triples)
        ax.plot(xs, [2 * x for x in xs], color="0.5", linestyle=":", linewidth=1, label="lr = 2 / lambda_max")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _legend(ax)
    ax.set_xlabel("1 / lambda_max (Hessian at initialisation)")
    ax.set_ylabel("chosen learning rate")
    ax.set_title("Chosen learning rate against curvature (a correlation across methods, not a rule)", fontsize=9)
    ax.grid(True, alpha=0.3, which="both")
    return save_figure(fig, path)
