"""Time lm-eval on the embedded model: one generation and one log-likelihood task, 200 items each,
at batch size 1 and at the batch size the harness picks; print items per second and the speed-up.

    .venv/bin/python -m benchmarks.bench_eval [--model smollm2-135m-instruct] [--items 200]
"""

from __future__ import annotations

import argparse
import time

from harness.quiet import offline_environment

offline_environment()

from harness.data import resolve_data_dir  # noqa: E402  (after the environment: the libraries read it on import)
from harness.evaluate import default_batch_size, evaluate  # noqa: E402
from harness.models import EMBEDDED_MODEL, load_model  # noqa: E402

TASKS = {"generation": "arithmetic_add_sub", "log-likelihood": "llm_adapters_boolq_mc"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    import torch

    model, tokenizer = load_model(args.model)
    data_dir = resolve_data_dir(args.data_dir)
    picked = default_batch_size(model)
    print(f"model {args.model}, {args.items} items per task, torch threads {torch.get_num_threads()}, "
          f"harness batch size {picked}")
    print(f"{'kind':<15} {'task':<24} {'batch':>6} {'seconds':>8} {'items/s':>8} {'score':>6}")
    for kind, task in TASKS.items():
        rates, scores = {}, {}
        for batch_size in (1, picked):
            start = time.perf_counter()
            result = evaluate(model, tokenizer, [task], data_dir, limit=args.items, batch_size=batch_size)
            seconds = time.perf_counter() - start
            rates[batch_size], scores[batch_size] = args.items / seconds, result.scores[task]
            print(f"{kind:<15} {task:<24} {batch_size!s:>6} {seconds:8.1f} {rates[batch_size]:8.2f} "
                  f"{result.scores[task]:6.3f}", flush=True)
        same = "same scores" if scores[1] == scores[picked] else f"SCORES DIFFER {scores}"
        print(f"{kind:<15} speed-up x{rates[picked] / rates[1]:.2f} ({same})", flush=True)


if __name__ == "__main__":
    main()
