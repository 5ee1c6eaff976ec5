"""How fast a loss curve comes down: a trailing rolling mean and the steps to a loss or a share of the reduction."""

from __future__ import annotations

from typing import Sequence


def smoothed(losses: Sequence[tuple[int, float]], window: int | None = None) -> list[tuple[int, float]]:
    """A trailing rolling mean of a loss curve (window: about 1/10 of the run by default, at least 1)."""
    window = window or max(1, len(losses) // 10)
    values = [v for _, v in losses]
    return [(step, sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1]))
            for i, (step, _) in enumerate(losses)]


def steps_to_loss(losses: Sequence[tuple[int, float]], target: float, window: int | None = None) -> float:
    """The first step at which the smoothed loss is at or below ``target``; NaN if it never is."""
    return next((float(step) for step, value in smoothed(losses, window) if value <= target), float("nan"))


def steps_to_fraction(losses: Sequence[tuple[int, float]], fraction: float, window: int | None = None) -> float:
    """Steps to reach ``fraction`` of the final loss reduction (e.g. 0.9 for 90%), on the smoothed curve.

    The reduction runs from the first step's loss to the smoothed loss at the last step; NaN when the loss
    did not go down. Smoothing (see :func:`smoothed`) keeps one lucky batch from counting as convergence.
    """
    if not losses:
        return float("nan")
    curve = smoothed(losses, window)
    start, end = losses[0][1], curve[-1][1]
    if not end < start:
        return float("nan")
    return steps_to_loss(losses, start - fraction * (start - end), window)
