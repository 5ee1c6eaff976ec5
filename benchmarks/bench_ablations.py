"""What the study machinery costs, and what a second worker buys.

1. Overhead: a small grid study (``lora``, ``linchain:n=1``, ``linchain:n=2``; one seed) runs in
   this process on each model. For every trial it splits the wall time from claim to tell into
   - the study machinery: Optuna (claim, heartbeat, tell) and MLflow (the trial's nested run),
     i.e. trial wall time minus the time spent inside ``harness.run.run``;
   - harness.run's own per-trial set-up and evaluation (model load, data, lm-eval), i.e. the
     time inside ``run`` minus training;
   - training.
2. Throughput: the same grid with more seeds, run by 1 worker and by 2 worker processes on one
   SQLite storage (the study created once beforehand), in trials per minute of wall time.

Measures, does not assert. Usage::

    python -m benchmarks.bench_ablations                       # tiny-random and the embedded model
    python -m benchmarks.bench_ablations --models tiny-random --throughput-seeds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.quiet import offline_environment

ROOT = Path(__file__).resolve().parents[1]
SPACE = [{"method": "lora"}, {"method": "linchain", "n": [1, 2]}]


def study_args(folder: Path, model: str, steps: int, limit: int) -> list[str]:
    return ["--model", model, "--max-steps", str(steps), "--limit", str(limit), "--batch-size", "4",
            "--eval-batch-size", "8", "--tasks", "arithmetic_add_sub", "--output-dir", str(folder / "results"),
            "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]


def write_study(folder: Path, name: str, seeds: list[int]) -> Path:
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "kind": "grid", "seeds": seeds, "space": SPACE}))
    return path


def overhead(model: str, steps: int, limit: int) -> dict:
    """Run the grid in this process; split each trial's time into machinery, run set-up + eval, training."""
    import optuna

    from ablations import study as study_cli

    folder = Path(tempfile.mkdtemp(prefix="bench-ablations-"))
    path = write_study(folder, "bench", [0])
    url = f"sqlite:///{folder / 'optuna.db'}"
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        started = time.perf_counter()
        code = study_cli.main([str(path), "--storage", url, *study_args(folder, model, steps, limit)])
        wall = time.perf_counter() - started
    finally:
        os.chdir(cwd)
    assert code == 0, f"study failed with exit code {code}"
    trials = [t for t in optuna.load_study(study_name="bench", storage=url).get_trials() if t.state.name == "COMPLETE"]
    rows = []
    for t in trials[1:] if len(trials) > 1 else trials:  # the first trial also pays the imports: left out
        total = (t.datetime_complete - t.datetime_start).total_seconds()
        run_s, train_s = t.user_attrs["run_seconds"], t.user_attrs["train_seconds"]
        rows.append({"total": total, "machinery": total - run_s, "setup_eval": run_s - train_s, "train": train_s})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"model": model, "trials": len(trials), "study_wall_s": wall, **med,
            "machinery_frac": med["machinery"] / med["total"], "setup_eval_frac": med["setup_eval"] / med["total"],
            "train_frac": med["train"] / med["total"]}


def throughput(workers: int, seeds: int, model: str, steps: int, limit: int) -> dict:
    """Wall time for the grid x seeds with ``workers`` worker processes on one SQLite storage."""
    folder = Path(tempfile.mkdtemp(prefix="bench-ablations-"))
    path = write_study(folder, "tput", list(range(seeds)))
    url = f"sqlite:///{folder / 'optuna.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    subprocess.run([sys.executable, "-m", "ablations.study", str(path), "--storage", url, "--create-only",
                    *study_args(folder, model, steps, limit)], cwd=folder, env=env, check=True, capture_output=True)
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "ablations.worker", "tput", "--storage", url], cwd=folder,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    for p in procs:
        p.wait()
    wall = time.perf_counter() - started
    n = len(SPACE[0:1]) + len(SPACE[1]["n"])
    return {"workers": workers, "trials": n * seeds, "wall_s": wall, "trials_per_min": 60 * n * seeds / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-random,smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3, help="training steps per trial")
    parser.add_argument("--limit", type=int, default=5, help="test items per trial")
    parser.add_argument("--throughput-seeds", type=int, default=3, help="seeds in the throughput grid (3 trials each)")
    parser.add_argument("--throughput-model", default="tiny-random")
    args = parser.parse_args()
    offline_environment()

    print(f"Study machinery overhead, median per trial (first trial left out), {args.steps} steps, "
          f"{args.limit} items, batch 4\n")
    print("| model | trials | trial s | Optuna + MLflow s | run set-up + eval s | training s | "
          "machinery % | set-up + eval % | training % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models.split(","):
        r = overhead(model, args.steps, args.limit)
        print(f"| {model} | {r['trials']} | {r['total']:.2f} | {r['machinery']:.3f} | {r['setup_eval']:.2f} | "
              f"{r['train']:.2f} | {100 * r['machinery_frac']:.1f} | {100 * r['setup_eval_frac']:.1f} | "
              f"{100 * r['train_frac']:.1f} |", flush=True)

    print(f"\nThroughput on this machine ({os.cpu_count()} cores), {args.throughput_model}, "
          f"{args.throughput_seeds * 3} trials, worker start-up included\n")
    print("| workers | trials | wall s | trials/min |")
    print("|---:|---:|---:|---:|")
    for workers in (1, 2):
        r = throughput(workers, args.throughput_seeds, args.throughput_model, args.steps, args.limit)
        print(f"| {r['workers']} | {r['trials']} | {r['wall_s']:.1f} | {r['trials_per_min']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
