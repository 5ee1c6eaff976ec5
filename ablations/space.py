"""A study's space: its points (one dict of method-spec options per configuration) and their specs.

A point ``{method: linchain, n: 3}`` is the harness.run method spec ``linchain:n=3``
(:func:`spec_of`); a study file's ``space`` is a list of templates whose list-valued options
multiply out into points (:func:`enumerate_points`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from harness.adapters.spec import parse_spec
from harness.errors import UserError

# Past this a space is a typo, not an experiment (checked before anything is queued).
MAX_POINTS = 300


def enumerate_points(space: list[Any], fail) -> list[dict[str, Any]]:
    """Every configuration of the space, in file order: the product of each template's list-valued axes.

    Each point is checked as a method spec (so a misspelt option is caught before any trial runs),
    and a point listed twice is an error: a grid runs each configuration exactly once per seed.
    """
    points: list[dict[str, Any]] = []
    total = 0
    for i, template in enumerate(space):
        where = f"space[{i}]"
        if not isinstance(template, dict) or "method" not in template:
            raise fail(where, "must be a mapping with a 'method' key, e.g. {method: linchain, n: [1, 2]}")
        axes = {str(k): (v if isinstance(v, list) else [v]) for k, v in template.items()}
        total += math.prod(len(v) for v in axes.values())
        if total > MAX_POINTS:
            raise fail(where, f"the space has more than the {MAX_POINTS} points a study may have "
                              f"({total:,} up to here); split it into several studies")
        for key, values in axes.items():
            if not values:
                raise fail(f"{where}.{key}", "an empty list gives no points")
            for value in values:
                if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                    raise fail(f"{where}.{key}", f"values must be numbers or strings (got {value!r})")
        for combo in itertools.product(*axes.values()):
            point = dict(zip(axes, combo))
            try:
                parse_spec(spec_of(point))
            except UserError as err:
                raise fail(where, str(err)) from None
            if point in points:
                raise fail(where, f"{spec_of(point)!r} is already in the space; each point must be listed once")
            points.append(point)
    return points


def spec_of(point: dict[str, Any]) -> str:
    """The harness.run method spec of a point: ``{method: linchain, n: 3}`` -> ``'linchain:n=3'``."""
    options = [f"{k}={_fmt(v)}" for k, v in point.items() if k != "method"]
    return str(point["method"]) + (":" + ",".join(options) if options else "")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
