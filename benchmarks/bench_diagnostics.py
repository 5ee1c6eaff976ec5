"""What the diagnostics cost, as a share of a default run, measured in one process against a ``none`` reference.

    python -m benchmarks.bench_diagnostics                          # embedded SmolLM2-135M, the default run's methods
    python -m benchmarks.bench_diagnostics --model tiny-random      # a quick check of the script

A default run (``python -m harness.run --methods lora,moslora,linchain``) trains each method 50 steps
with batch 16, r 16 and the LinChain paper's targets on the generated arithmetic data. Here every
method of ``--methods`` trains ``--steps`` steps twice, interleaved (the order alternates between
methods), from the same seed:

- ``--diagnostics none``: training alone, the reference; its time per step, times 50, is the
  default run's training time for that method;
- ``--diagnostics basic``: the same training with the recorder in the step callback, then
  ``RunDiagnostics.finish`` on the trained adapter (the first method of the run also pays W0's SVD and
  the base model's loss on the forgetting sample; later methods reuse them). Every record of the
  recorder is timed, and a 50-step run's records (steps 1, 10, ..., 50) are counted at that time.

The basic share is (finish + a 50-step run's records) / (50 x the reference's time per step), per
method and summed over the run; the difference of the two trainings' times per step is printed as a
check (noisy: it is the recorder's cost plus run-to-run variation). Level ``full`` adds lambda_max
before training: ``--lanczos-iters`` Lanczos iterations of ``curvature_at_init`` (64 training
examples, one Hessian-vector product over them per iteration) on a fresh adapter of the last method,
reported per iteration and at the 40-iteration cap. Evaluation, which a run also spends, is left
out, so the shares are upper bounds of the shares of a whole run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch


from harness import data as hdata
from harness import diagnostics as D
from harness.adapters import get_adapter_model
from harness.config import RunConfig
from harness.models import DEFAULT_MODEL, load_model
from harness.train import TrainSettings, train

DEFAULT_RUN_STEPS = 50


class Timed:
    """Wraps a function of the harness.diagnostics package where its callers look it up (called by its name at
    call time): the package's namespace, and each of its modules that binds the same function (the recorder
    calls ``update_norm_and_rank`` in harness.diagnostics.spectra, not through the package)."""

    def __init__(self, name: str):
        self.name, self.inner, self.seconds, self.calls = name, getattr(D, name), 0.0, 0
        modules = [D] + [m for key, m in sorted(sys.modules.items()) if key.startswith(D.__name__ + ".")]
        for module in modules:
            if getattr(module, name, None) is self.inner:
                setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def take(self) -> float:
        seconds, self.seconds, self.calls = self.seconds, 0.0, 0
        return seconds


def records_in_a_run(steps: int, every: int) -> int:
    """How many records the recorder makes in a run of ``steps`` steps: step 1, every ``every``-th, and the last."""
    return len({1, steps} | set(range(every, steps + 1, every)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--methods", default="lora,moslora,linchain", help="the default run's methods")
    parser.add_argument("--steps", type=int, default=6, help="training steps actually run per method and level")
    parser.add_argument("--lanczos-iters", type=int, default=2, help="Lanczos iterations timed for level full")
    args = parser.parse_args()

    load_before = os.getloadavg()
    cfg = RunConfig(model=args.model)
    model, tokenizer = load_model(cfg.model)
    records = hdata.load_records(cfg.train_data, hdata.resolve_data_dir(None), seed=0)
    examples = hdata.build_train_dataset(records, tokenizer, prompt_format=cfg.prompt_format,
                                         train_on_inputs=cfg.train_on_inputs, cutoff_len=cfg.cutoff_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(batch):
        return hdata.collate(batch, pad)

    def fresh(method):
        torch.manual_seed(0)
        return get_adapter_model(copy.deepcopy(model), method, r=cfg.rank, alpha=cfg.alpha, targets=cfg.targets)

    settings = dataclasses.replace(TrainSettings.from_config(cfg, None, 0), max_steps=args.steps)
    parts = {name: Timed(name) for name in ("update_norm_and_rank", "base_spectrum", "update_intruders",
                                            "mean_token_loss", "general_text_sample")}
    run = D.RunDiagnostics("basic", tokenizer, examples, collate)
    n_records = records_in_a_run(DEFAULT_RUN_STEPS, run.record_every)
    methods = [m for m in args.methods.split(",") if m]
    print(f"{args.model}: {len(methods)} method(s), {args.steps} training steps per method and level, scaled to a "
          f"default run's {DEFAULT_RUN_STEPS}; {os.cpu_count()} CPUs, torch on {torch.get_num_threads()} threads, "
          f"load average {load_before[0]:.1f} at the start")
    totals = {"training": 0.0, "basic": 0.0}
    for i, method in enumerate(methods):
        per_step: dict[str, float] = {}
        for level in (("none", "basic") if i % 2 == 0 else ("basic", "none")):
            peft_model = fresh(method)
            if level == "none":
                result = train(peft_model, examples, collate, settings, progress=False)
                per_step["none"] = result.train_seconds / result.steps
                continue
            recorder = parts["update_norm_and_rank"]
            for part in parts.values():
                part.take()
            probe = run.start(peft_model, seed=0)
            result = train(peft_model, examples, collate, settings, progress=False,
                           on_step=lambda s, loss, lr: probe.on_step(s, loss, lr))
            per_step["basic"] = result.train_seconds / result.steps
            record_calls = recorder.calls
            record_seconds = recorder.take()
            start = time.perf_counter()
            run.finish(probe, peft_model, method=method, spec_method=method, seed=0, train_result=result)
            finish = time.perf_counter() - start
            record_calls += recorder.calls  # finish records the last step: counted below with the others
            finish_records = recorder.take()
            finish -= finish_records
            per_record = (record_seconds + finish_records) / max(record_calls, 1)
            breakdown = {name: part.take() for name, part in parts.items() if part is not recorder}
        training = DEFAULT_RUN_STEPS * per_step["none"]
        basic = finish + n_records * per_record
        totals["training"] += training
        totals["basic"] += basic
        shown = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in breakdown.items() if seconds >= 0.05)
        print(f"{method}: none {per_step['none']:.2f} s/step, basic {per_step['basic']:.2f} s/step "
              f"({100 * (per_step['basic'] / per_step['none'] - 1):+.1f}%, noise included); "
              f"a default run's training {training:.0f} s")
        print(f"  basic {basic:.1f} s = {100 * basic / training:.1f}% of it: finish {finish:.1f} s ({shown}), "
              f"recorder {n_records} x {per_record * 1000:.0f} ms")
    if methods:
        print(f"basic, the whole run ({', '.join(methods)}): {totals['basic']:.1f} s = "
              f"{100 * totals['basic'] / totals['training']:.1f}% of its training ({totals['training']:.0f} s)")
    start = time.perf_counter()
    run.write(Path("/tmp") / "bench_diagnostics")
    print(f"report files (once per run): {time.perf_counter() - start:.1f} s")

    if args.lanczos_iters > 0 and methods:
        method = methods[-1]
        peft_model = fresh(method)
        start = time.perf_counter()
        estimate = D.curvature_at_init(peft_model, examples, collate, max_iter=args.lanczos_iters, tol=0.0)
        per_iter = (time.perf_counter() - start) / args.lanczos_iters
        per_method = totals["training"] / len(methods)
        print(f"full, {method}: {per_iter:.1f} s per Lanczos iteration = {100 * per_iter / per_method:.1f}% of a "
              f"method's training; at the {D.HESSIAN_MAX_ITER}-iteration cap "
              f"{100 * per_iter * D.HESSIAN_MAX_ITER / per_method:.0f}% (plus basic); after {estimate.iterations} "
              f"iterations lambda_max ~ {estimate.value:.4g}, relative residual "
              f"{estimate.residual / abs(estimate.value):.2g}")
    load_after = os.getloadavg()
    print(f"load average {load_after[0]:.1f} at the end (1-minute; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
