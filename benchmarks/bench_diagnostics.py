"""What the diagnostics cost, as a share of a default run's training, in one process.

    python benchmarks/bench_diagnostics.py                          # embedded SmolLM2-135M, the default run
    python benchmarks/bench_diagnostics.py --model tiny-random      # a quick check of the script

One method (``--method``, default LinChain-3) trains ``--steps`` steps with the run's defaults
(batch 16, r 16, the LinChain paper's targets, the generated arithmetic data); the time per
step is scaled to a default run's 50 steps. Then, on the trained adapter:

- basic: the recorder (one record of ||dW|| and the effective rank, times the records a
  50-step run makes: every 5 steps and the last), and ``RunDiagnostics.finish`` twice: the
  first method of a run also pays for W0's singular vectors and the base model's loss on the
  forgetting sample, later methods reuse them;
- full: ``--lanczos-iters`` Lanczos iterations of ``curvature_at_init`` on 64 training examples
  (each iteration is one Hessian-vector product over the whole batch), reported per iteration
  and at the 40-iteration cap.

Shares are of the scaled training time (evaluation, which a run also spends, is left out, so
the shares are upper bounds of the shares of a whole run).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import data as hdata  # noqa: E402
from harness import diagnostics as D  # noqa: E402
from harness.adapters import get_adapter_model  # noqa: E402
from harness.config import RunConfig  # noqa: E402
from harness.models import DEFAULT_MODEL, load_model  # noqa: E402
from harness.train import TrainSettings, train  # noqa: E402

DEFAULT_RUN_STEPS = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--method", default="linchain")
    parser.add_argument("--steps", type=int, default=10, help="training steps actually run (scaled to 50)")
    parser.add_argument("--lanczos-iters", type=int, default=3, help="Lanczos iterations timed for level full")
    args = parser.parse_args()

    cfg = RunConfig(model=args.model)
    model, tokenizer = load_model(cfg.model)
    records = hdata.load_records(cfg.train_data, hdata.resolve_data_dir(None), seed=0)
    examples = hdata.build_train_dataset(records, tokenizer, prompt_format=cfg.prompt_format,
                                         train_on_inputs=cfg.train_on_inputs, cutoff_len=cfg.cutoff_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(batch):
        return hdata.collate(batch, pad)

    torch.manual_seed(0)
    peft_model = get_adapter_model(copy.deepcopy(model), args.method, r=cfg.rank, alpha=cfg.alpha,
                                   targets=cfg.targets)
    settings = dataclasses.replace(TrainSettings.from_config(cfg, None, 0), max_steps=args.steps)
    result = train(peft_model, examples, collate, settings, progress=False)
    train_per_step = result.train_seconds / result.steps
    default_training = train_per_step * DEFAULT_RUN_STEPS
    print(f"{args.model}, {args.method}: {result.steps} training steps, {train_per_step:.2f} s/step; "
          f"a default run's {DEFAULT_RUN_STEPS} steps: {default_training:.0f} s")

    run = D.RunDiagnostics("basic", tokenizer, examples, collate)
    probe = run.start(peft_model, seed=0)
    start = time.perf_counter()
    probe.recorder.record(result.steps)
    record = time.perf_counter() - start
    records = DEFAULT_RUN_STEPS // D.RECORD_EVERY + 1
    timings = {"recorder": record * records}
    for key in ("first method", "later method"):
        start = time.perf_counter()
        run.finish(probe, peft_model, method=args.method, spec_method=args.method, seed=0, train_result=result)
        timings[key] = time.perf_counter() - start
    start = time.perf_counter()
    run.write(Path("/tmp") / "bench_diagnostics")
    timings["files"] = time.perf_counter() - start
    for key in ("first method", "later method"):
        basic = timings["recorder"] + timings[key]
        print(f"basic, {key}: {basic:.1f} s = {100 * basic / default_training:.1f}% of training "
              f"(recorder {timings['recorder']:.2f} s for {records} records, finish {timings[key]:.1f} s)")
    print(f"report files (once per run): {timings['files']:.1f} s")

    fresh = get_adapter_model(copy.deepcopy(model), args.method, r=cfg.rank, alpha=cfg.alpha, targets=cfg.targets)
    start = time.perf_counter()
    estimate = D.curvature_at_init(fresh, examples, collate, max_iter=args.lanczos_iters, tol=0.0)
    per_iter = (time.perf_counter() - start) / args.lanczos_iters
    print(f"full: {per_iter:.1f} s per Lanczos iteration = {100 * per_iter / default_training:.1f}% of training; "
          f"at the {D.HESSIAN_MAX_ITER}-iteration cap {100 * per_iter * D.HESSIAN_MAX_ITER / default_training:.0f}%; "
          f"after {estimate.iterations} iterations lambda_max ~ {estimate.value:.4g}, "
          f"relative residual {estimate.residual / abs(estimate.value):.2g}")


if __name__ == "__main__":
    main()
