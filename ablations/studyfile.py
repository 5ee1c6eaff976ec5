"""Study files: what a study compares, read from a small YAML file and checked key by key.

A study file (``ablations/studies/<name>.yaml``; copy one and edit it)::

    name: chain_length                  # the Optuna study name (default: the file name)
    description: LinChain n in 1..5 at fixed rank; LoRA as the reference point
    kind: grid                          # grid | tpe | pareto | fair
    run:                                # any harness.run option, fixed for every trial
      max_steps: 100
      tasks: [arithmetic]
    seeds: [0, 1, 2]                    # grid/pareto: one trial per point and seed; tpe: every trial runs all
    space:                              # method templates; a list value is an axis
      - {method: lora}
      - {method: linchain, n: [1, 2, 3, 4, 5]}
    plot: {x: n}                        # grid: the axis on the x axis of the score plot (default: the first)

Each ``space`` entry is one adapter method with its spec options (``r``, ``n``, ``widths``,
``init``, ``structure``, ``alpha``, ``dropout``, ``targets``, ``lr``; see
``harness.adapters.spec``). A scalar is fixed, a list is an axis, and an entry's points are
the product of its axes: options exist only for the methods that have them, so conditional
spaces (chain length only for LinChain) are written, and enumerated, exactly. ``method`` may
itself be a list (``{method: [lora, moslora], r: [4, 8]}``).

``tpe`` studies tune a learning rate per method: every ``space`` point gets its own Optuna
study ``<name>/<spec>`` of ``n_trials`` trials, sampled by TPE in ``lr: {low, high, log}``, pruned
on intermediate evaluations every ``intermediate_every`` steps (``pruner: {n_startup_trials,
n_warmup_steps}``, Optuna's MedianPruner). ``pareto`` studies are grids with two objectives:
average accuracy (maximised) and trainable parameters (minimised).

``fair`` studies compare every method with LoRA under the fair protocol (``ablations.fair``):
each must state ``seeds`` (the tuning seeds), ``lr_grid`` (a list of rates, or ``{log10_low,
log10_high, per_decade}``), ``final_seeds`` (a count or a list, disjoint from the tuning seeds),
``extend`` (grid steps added at most per side when the best rate is at the edge) and a ``space``
with ``lora``; ``intermediate_every`` and ``pruner`` prune tuning trials on validation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ablations.kinds import KINDS
from ablations.space import enumerate_points
from harness.errors import UserError

# Not imported from ablations/__init__.py: an editable install made before that file existed maps
# `ablations` as a namespace package, which never runs it.
STUDIES_DIR = Path(__file__).resolve().parent / "studies"

TOP_KEYS = ("name", "description", "kind", "run", "seeds", "space", "n_trials", "lr", "pruner",
            "intermediate_every", "plot", "lr_grid", "final_seeds", "extend", "delta", "planned_sd")
# harness.run options a study may not fix: the study decides them per trial.
STUDY_OWNED = ("methods", "run_name", "seeds")
# Bounds checked before anything is queued: past them a study file is a typo, not an experiment, and
# enqueueing it alone would take hours (the learning-rate grid and ``extend`` are bounded in ablations.fair, the points in ablations.space).
MAX_TRIALS = 1000


@dataclass
class StudyFile:
    """A checked study file. ``points`` is the exact grid: one dict of spec options per configuration."""

    name: str
    kind: str
    description: str = ""
    run: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    points: list[dict[str, Any]] = field(default_factory=list)
    n_trials: int | None = None
    lr: dict[str, Any] | None = None
    pruner: dict[str, int] = field(default_factory=dict)
    intermediate_every: int | None = None
    plot_x: str | None = None
    source: str = ""
    lr_grid: list[float] | None = None
    final_seeds: int | list[int] | None = None  # a count or a list; resolved against the tuning seeds in the plan
    extend: int = 0
    delta: float | None = None  # the smallest effect of interest, a fraction (the file says points: delta: 2)
    planned_sd: float | None = None  # the paired per-seed SD assumed by --plan, a fraction (file: points)


def builtin_studies() -> list[str]:
    """Names of the studies that ship with the harness."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def find_study_file(name: str) -> Path:
    """A built-in study name (``chain_length``) or a path to a YAML file; unknown names are a UserError."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"study file {name!r} does not exist")
        return path
    candidate = STUDIES_DIR / f"{name}.yaml"
    if not candidate.is_file():
        raise UserError(f"unknown study {name!r}; built-in studies: {', '.join(builtin_studies())} "
                        "(or give the path of a study YAML file)")
    return candidate


def load_study_file(name: str) -> StudyFile:
    """Read and check a study file; every error is one line naming the file and the key."""
    path = find_study_file(name)
    where = f"study file {str(path)!r}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UserError(f"{where} is not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from err
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping with keys {', '.join(TOP_KEYS)}")
    return parse_study(data, source=where, default_name=path.stem)


def parse_study(data: dict[str, Any], source: str = "study", default_name: str = "study") -> StudyFile:
    """Check a study mapping (see the module docstring) and enumerate its grid."""
    def fail(key: str, what: str) -> UserError:
        return UserError(f"{source}: {key}: {what}")

    for key in data:
        if key not in TOP_KEYS:
            raise fail(str(key), f"unknown key; valid keys: {', '.join(TOP_KEYS)}")
    kind = data.get("kind", "grid")
    if kind not in KINDS:
        raise fail("kind", f"must be one of {', '.join(KINDS)} (got {kind!r})")
    this = KINDS[kind]
    for key in this.required_keys:
        if key not in data:
            raise fail(key, f"missing: a {kind} study needs " + ", ".join(this.required_keys)
                       + f" (copy ablations/studies/{kind}.yaml)")
    name = str(data.get("name") or default_name)
    if not name.replace("_", "").replace("-", "").isalnum():
        raise fail("name", f"use letters, digits, '_' and '-' only (got {name!r})")

    run = data.get("run") or {}
    if not isinstance(run, dict):
        raise fail("run", "must be a mapping of harness.run options, e.g. {max_steps: 50}")
    run = {str(k).replace("-", "_"): v for k, v in run.items()}
    _check_run_options(run, fail)

    seeds = data.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(seeds):
        raise fail("seeds", f"must be a list of distinct integers (got {data.get('seeds')!r})")

    space = data.get("space")
    if not isinstance(space, list) or not space:
        raise fail("space", "must be a non-empty list of method templates, e.g. [{method: lora}, "
                            "{method: linchain, n: [1, 2, 3]}]")
    points = enumerate_points(space, fail)

    study = StudyFile(name=name, kind=kind, description=str(data.get("description") or "").strip(), run=run,
                      seeds=list(seeds), points=points, source=source)
    this.check_file(study, data, fail)
    for other in KINDS.values():  # the keys only another kind takes, in the registry's order
        for key in other.only_keys if other is not this else ():
            if key in data and key not in this.tolerated_keys:
                raise fail(key, f"only {other.name} studies take {key} (this study is kind {kind}{other.refusal_hint}"
                                f"{this.reads_instead.get(key, '')})")
    plot = data.get("plot") or {}
    if not isinstance(plot, dict) or set(plot) - {"x"}:
        raise fail("plot", "must be a mapping {x: AXIS}, e.g. {x: n}")
    trials = planned_trials(study)
    if trials > MAX_TRIALS:
        raise fail("space", f"{trials:,} trials is more than the {MAX_TRIALS} a study may queue "
                            "(points x seeds, x learning rates in a fair study, x n_trials in a tpe one)")
    study.plot_x = plot.get("x")
    if study.plot_x is not None and not any(study.plot_x in p for p in points):
        raise fail("plot.x", f"{study.plot_x!r} is not an option of any point in the space")
    return study


def planned_trials(study: StudyFile) -> int:
    """How many trials the study queues at most: its points times seeds (a fair study: times every rate
    the grid may grow to, plus the final seeds; a tpe study: n_trials per point)."""
    return KINDS[study.kind].planned_trials(study)


def _check_run_options(run: dict[str, Any], fail) -> None:
    """Every key must be a harness.run option the study does not set itself; values are checked by RunConfig."""
    from harness.config import RunConfig, config_from_dict  # deferred: harness.config loads torch

    names = [f.name for f in dataclasses.fields(RunConfig)]
    for key in run:
        if key in STUDY_OWNED:
            hint = "use the study's top-level 'seeds:'" if key == "seeds" else "the study sets it per trial"
            raise fail(f"run.{key}", f"cannot be fixed in a study ({hint})")
        if key not in names:
            raise fail(f"run.{key}", f"unknown harness.run option; valid options: {', '.join(names)}")
    try:
        config_from_dict(run, source="run")
    except UserError as err:
        raise fail("run", str(err)) from None
