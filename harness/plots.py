"""Plotting shared by the run's report and its diagnostics: matplotlib off-screen, atomic PNGs, one colour per method.

Both :mod:`harness.report` and :mod:`harness.diagnostics` draw from here, so neither imports the other
and a method has the same colour in every figure of a run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from harness.fsutil import atomic_path


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


def method_colours(plt: Any, methods: Sequence[str]) -> dict[str, Any]:
    """The same colour for a method in every plot: its position among the run's methods in tab10."""
    return {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}


def method_colour(plt: Any, methods: Sequence[str], method: str) -> Any:
    """One method's colour of :func:`method_colours`."""
    return plt.get_cmap("tab10")(list(methods).index(method) % 10)


def legend(ax: Any) -> None:
    """A legend when something labelled was drawn (matplotlib warns about an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
