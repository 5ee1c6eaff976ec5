"""A study trial's fixed costs, computed per trial (before) and shared by a worker's trials (after).

    python -m benchmarks.bench_trial_overhead                          # embedded model, a fair trial's settings
    python -m benchmarks.bench_trial_overhead --model tiny-random --rounds 1 --steps 1 --limit 2

A fair study's trial is one ``harness.run.run`` of one method and seed on the validation split, with
``diagnostics: basic``. Its work that does not depend on the trial (loading the base model, lm-eval's
task index and the suite's checksums and documents, W0's SVD per adapted layer, the base model's loss on
the forgetting sample) is shared by the trials of one worker since :mod:`harness.reuse`. This benchmark
runs the same trial-sized run in both conditions, interleaved (the order alternates by round), in one
process:

- ``before``: every run computes its own (no sharing; what each trial paid until now);
- ``after``: inside ``shared_fixed_costs``, whose store a warm-up run filled (what every trial after a
  worker's first pays).

For each run it splits the wall time into training (``train_seconds``), evaluation (time inside
``TaskSuite.evaluate``) and the rest, the per-trial overhead. Training and evaluation are the same work in
both conditions; the overhead is what sharing changes. Printed: each round, the medians, the overhead
ratio after / before (median of the paired ratios) and the seconds saved per trial (median of the paired
differences of wall time). The training steps and evaluation items do not change the saving, only its
share: ``--steps``/``--limit`` make the runs shorter without changing what is measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from harness.quiet import offline_environment  # the standard library only: nothing loads

offline_environment()
warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices

import torch  # noqa: E402

from harness.config import config_from_args  # noqa: E402
from harness.errors import cli_entry  # noqa: E402
from harness.evaluate import TaskSuite  # noqa: E402
from harness.models import DEFAULT_MODEL  # noqa: E402
from harness.reuse import FixedCosts, shared_fixed_costs  # noqa: E402
from harness.run import run  # noqa: E402

CONDITIONS = ("before", "after")


class EvalClock:
    """Seconds spent inside ``TaskSuite.evaluate`` (every run's evaluation goes through it), while entered:
    ``with EvalClock() as clock``; leaving puts the original method back."""

    def __init__(self):
        self.seconds = 0.0
        self._evaluate = None

    def __enter__(self) -> "EvalClock":
        clock, evaluate = self, TaskSuite.evaluate
        self._evaluate = evaluate  # what is there when entered, put back on leaving

        def timed(suite, *args, **kwargs):
            started = time.perf_counter()
            try:
                return evaluate(suite, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - started

        TaskSuite.evaluate = timed
        return self

    def __exit__(self, *exc) -> None:
        TaskSuite.evaluate = self._evaluate


def trial(args, folder: Path, seed: int, clock: EvalClock) -> dict[str, float]:
    """One trial-sized run (as a fair study's tuning trial: validation split, no base row, no results folder)."""
    folder.mkdir(parents=True)
    cfg = config_from_args(["--model", args.model, "--methods", args.method, "--seeds", str(seed),
                            "--max-steps", str(args.steps), "--split", "validation", "--diagnostics", "basic",
                            "--output-dir", str(folder / "results"), "--tracking-uri",
                            f"sqlite:///{folder / 'mlflow.db'}", *(["--limit", str(args.limit)] if args.limit else [])])
    clock.seconds = 0.0
    started = time.perf_counter()
    outcome = run(cfg, write_results=False, evaluate_base=False, progress=False, log=lambda *a, **k: None)
    wall = time.perf_counter() - started
    result = outcome.results[0]
    if not result.ok:
        raise RuntimeError(f"the benchmark's run failed: {result.error}")
    train = result.train_seconds
    return {"wall": wall, "train": train, "eval": clock.seconds, "overhead": wall - train - clock.seconds}


@cli_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--method", default="lora", help="the trial's method spec (default lora)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, one run per condition each")
    parser.add_argument("--steps", type=int, default=10, help="training steps per run (a fair trial has 100)")
    parser.add_argument("--limit", type=int, default=100,
                        help="validation items per task (a fair trial scores all 400; 0 = all)")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.limit < 0:
        parser.error("--rounds and --steps must be at least 1 and --limit at least 0")

    started = time.perf_counter()
    print(f"model {args.model}, method {args.method}, {args.steps} steps, "
          f"{args.limit or 'all'} validation items per task; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    fixed = FixedCosts()
    times: dict[str, list[dict[str, float]]] = {c: [] for c in CONDITIONS}
    with EvalClock() as clock, tempfile.TemporaryDirectory(prefix="bench-trial-overhead-") as folder:
        with shared_fixed_costs(fixed):  # the worker's first trial: fills the store (not counted)
            trial(args, Path(folder) / "warm-up", 0, clock)
        for round_ in range(args.rounds):
            order = CONDITIONS if round_ % 2 == 0 else CONDITIONS[::-1]
            for condition in order:
                where = Path(folder) / f"{condition}-{round_}"
                if condition == "after":
                    with shared_fixed_costs(fixed):
                        measured = trial(args, where, round_ + 1, clock)
                else:
                    measured = trial(args, where, round_ + 1, clock)
                times[condition].append(measured)
                print(f"  round {round_ + 1} {condition:<6} wall {measured['wall']:6.1f} s = training "
                      f"{measured['train']:5.1f} + evaluation {measured['eval']:5.1f} + overhead "
                      f"{measured['overhead']:5.1f}", flush=True)
    print("\nmedians over rounds (s):")
    for condition in CONDITIONS:
        print(f"  {condition:<6} " + ", ".join(f"{part} {statistics.median(t[part] for t in times[condition]):.1f}"
                                               for part in ("wall", "train", "eval", "overhead")))
    pairs = list(zip(times["before"], times["after"]))
    ratio = statistics.median(a["overhead"] / b["overhead"] for b, a in pairs)
    saved = statistics.median(b["wall"] - a["wall"] for b, a in pairs)
    print(f"\ndone in {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.1f} (1 min)")
    print(f"ratios: overhead after/before x{ratio:.2f}; saved per trial {saved:.1f} s (median paired wall difference)")


if __name__ == "__main__":
    sys.exit(main())
