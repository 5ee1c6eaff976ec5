"""Does this machine compute the base model as a study's runs did? The first training step's loss, per seed.

Every method here starts from a zero update, so a run's first-step loss is the frozen base model's loss on its
seed's first batch: the same for every method and learning rate, changed only by the kernels that compute it (the
CPU's instruction set, the bf16 kernels oneDNN picks for it, a GPU). A fair study's diagnostics.csv records it for
every final run (``first_loss``). Compare before resuming or repeating a study on this machine: where the losses
differ, a rerun here is a replication (a new run of the same design, which differs within seed noise), as ``python
-m ablations.repeat`` then shows; where they agree, a repeat is likely (only the forward is checked here).

Each seed costs one model load and one forward pass (the run stops at its first loss). Usage::

    python -m benchmarks.bench_kernels --study results/findings/fair-paper --seeds 1,2
    python -m benchmarks.bench_kernels --model tiny-random --seeds 1 --steps 3       # no study: print the losses
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python -m benchmarks.bench_kernels --study ...    # another oneDNN kernel level

Measures, does not assert; exit 0, 1 when a seed could not be measured, 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
from pathlib import Path

from ablations.findings import KERNEL_TOLERANCE, starts_at_base
from harness.errors import UserError
from harness.quiet import offline_environment


def first_step_losses(cfg, seeds: list[int]) -> dict[int, float]:
    """Each seed's first training-step loss under ``cfg`` (one method), computed by harness.run's own training path
    (the same data, batch order, precision, attention and loss) and stopped there, as a pruned trial stops."""
    import harness.train
    from harness.run import Pruned, run

    class FirstLoss(Pruned):
        """Raised inside the first training step once its loss is known: nothing after it is needed."""

    seen: list[float] = []
    loss_fn = harness.train.causal_lm_loss

    def first(*args, **kwargs):
        loss = loss_fn(*args, **kwargs)
        seen.append(float(loss.detach()))
        if len(seen) == cfg.grad_accum:  # the step's loss is the mean over its micro-batches
            raise FirstLoss("stopped at the first training step's loss")
        return loss

    found = {}
    harness.train.causal_lm_loss = first
    try:
        for seed in seeds:
            seen.clear()
            try:
                run(dataclasses.replace(cfg, seeds=[seed]), write_results=False, evaluate_base=False, progress=False,
                    log=lambda *a, **k: None)
            except FirstLoss:
                pass
            found[seed] = sum(seen) / len(seen) if len(seen) == cfg.grad_accum else math.nan
    finally:
        harness.train.causal_lm_loss = loss_fn
    return found


def study_config(folder: Path):
    """The trial configuration of the fair study whose findings folder is ``folder`` (from its journal), and its
    recorded first-step losses by seed (diagnostics.csv)."""
    import pandas as pd
    import yaml

    from ablations.storage import open_storage, resolve_storage_url
    from ablations.study import load_plan

    journal, design, runs = folder / "journal.log", folder / "study.yaml", folder / "diagnostics.csv"
    for path in (journal, design, runs):
        if not path.is_file():
            raise UserError(f"{path} not found: pass a fair study's findings folder (journal.log, study.yaml, "
                            "diagnostics.csv)")
    frame = pd.read_csv(runs)
    if "first_loss" not in frame.columns:
        raise UserError(f"{runs} has no first_loss column: write the report again with this version "
                        "(python -m ablations.study ... --report-only)")
    name = (yaml.safe_load(design.read_text()) or {}).get("name")
    url = resolve_storage_url(f"journal:{journal}")
    plan = load_plan(name, open_storage(url, create=False), url)
    recorded: dict[int, dict[str, float]] = {}
    for method, seed, value in zip(frame["method"], frame["seed"], frame["first_loss"]):
        if pd.notna(value):
            recorded.setdefault(int(seed), {})[str(method)] = float(value)
    return plan.trial_config("lora", [min(recorded or {0: None})], 0), recorded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_kernels", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 when measured, 1 when a seed could not be measured, 2 on bad input.")
    parser.add_argument("--study", type=Path, default=None, metavar="FOLDER",
                        help="a fair study's findings folder: its run options, and its runs' first-step losses to "
                             "compare with")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds (default: 1)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="without --study: the model")
    parser.add_argument("--steps", type=int, default=100,
                        help="without --study: the run's length, which sets the batch order (default: 100)")
    parser.add_argument("--batch-size", type=int, default=16, help="without --study (default: 16)")
    parser.add_argument("--precision", default="auto", help="without --study (default: auto)")
    args = parser.parse_args(argv)
    offline_environment()
    from harness import quiet
    from harness.config import RunConfig

    quiet.configure()
    from harness.tracking import machine, machine_label

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"error: --seeds {args.seeds!r}: give comma-separated integers", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-kernels-") as scratch:
        where = {"output_dir": str(Path(scratch) / "results"), "tracking_uri": f"sqlite:///{Path(scratch) / 'm.db'}"}
        try:
            if args.study is not None:
                cfg, recorded = study_config(args.study)
            else:
                cfg, recorded = RunConfig(methods=["lora"], model=args.model, max_steps=args.steps,
                                          batch_size=args.batch_size, precision=args.precision), {}
            cfg = dataclasses.replace(cfg, methods=["lora"], limit=1, diagnostics="none", **where)
            found = first_step_losses(cfg, seeds)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(f"this machine: {machine_label(machine())}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')}"
          f" ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')}")
    missing = [seed for seed, loss in found.items() if not math.isfinite(loss)]
    alike: dict[str, bool] = {}  # method -> whether every seed checked agrees with its runs
    for seed, loss in found.items():
        if seed in missing:
            print(f"seed {seed}: not measured (the run failed before its first loss: run harness.run with these "
                  "options to see why)")
            continue
        line = f"seed {seed}: first-step loss {loss:.6g}"
        theirs = {m: v for m, v in recorded.get(seed, {}).items() if starts_at_base(m)}
        if theirs:
            same = {m: math.isclose(loss, v, rel_tol=KERNEL_TOLERANCE) for m, v in theirs.items()}
            for m, agrees in same.items():
                alike[m] = alike.get(m, True) and agrees
            line += "; " + "; ".join(f"{m}'s run {v:.6g} ({'computed alike' if same[m] else 'computed differently'})"
                                     for m, v in theirs.items())
        print(line)
    if alike:
        repeat = [m for m, ok in alike.items() if ok]
        other = [m for m, ok in alike.items() if not ok]
        print(f"{args.study.name}: " + "; ".join(part for part in (
            f"the runs of {', '.join(repeat)} computed the base model as this machine does (consistent with a "
            "repeat here; the backward and optimizer kernels are not checked)" if repeat else "",
            f"the runs of {', '.join(other)} computed it differently (another CPU, other kernel settings, libraries "
            "or inputs): a rerun here is a replication, not a repeat" if other else "") if part))
    if missing:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
