"""Training and evaluation throughput of today's path against the new one, and what bf16 does to accuracy.

    python -m benchmarks.bench_throughput                       # embedded SmolLM2-135M, the default run's settings
    python -m benchmarks.bench_throughput --model tiny-random --rounds 1 --timing-steps 2 --steps 3 --limit 4
    python -m benchmarks.bench_throughput --model gemma3-270m --training-only --conditions bf16,bf16-logits

Everything runs in one process, interleaved, so that machine noise hits every condition alike;
a ratio is the median over rounds of the paired per-round ratios. Only ratios are meant to be
compared: the absolute times depend on the load on the machine, which is printed.

1. Training tokens per second (real tokens, padding not counted) of LoRA, with the default
   run's settings (batch 16, r 16, targets q,k,v,up,down, answer-only loss), each round a fresh
   adapter trained ``--timing-steps`` steps with the round's seed in four conditions:
   ``old`` (fp32, logits at every position, the seeded order as is), ``bf16`` only,
   ``logits`` (selected logits only), and ``new`` (bf16, selected logits, batches grouped by
   length): what each change is worth, and all together.
2. Accuracy: LoRA and LinChain-3 trained ``--steps`` steps (the default run's 50) with the same
   seed in fp32 and in bf16 (both on the new path otherwise), each evaluated on the ``arithmetic``
   tasks in its own precision; the bf16 - fp32 difference in accuracy with a 95% paired-bootstrap
   interval over the test items (one seed: the interval covers the items, not the training's
   randomness).
3. Evaluation items per second: the fp32-trained LoRA adapter evaluated on the fp32 base in fp32
   (today) and on the bf16 base in bf16 (new), interleaved; then, in bf16, a sweep over the
   evaluation batch size.

The last line gives every ratio.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
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

from harness import data as hdata  # noqa: E402
from harness import evaluate as hevaluate  # noqa: E402
from harness.adapters import fresh_adapter_model, load_adapter_model, resolve_spec, save_adapter  # noqa: E402
from harness.config import RunConfig  # noqa: E402
from harness.errors import cli_entry  # noqa: E402
from harness.models import DEFAULT_MODEL, load_model, resolve_precision, storage_dtype  # noqa: E402
from harness.report import SystemResult  # noqa: E402
from harness.stats import item_interval  # noqa: E402
from harness.train import TrainSettings, train  # noqa: E402

CONDITIONS = {  # name: (precision, selected logits, length window)
    "old": ("fp32", False, 1),
    "bf16": ("bf16", False, 1),
    "logits": ("fp32", True, 1),
    "new": ("bf16", True, None),
    "bf16-logits": ("bf16", True, 1),  # what selected logits are worth in the default precision (--conditions)
}


def load(args, precisions=("fp32", "bf16")):
    """The base in each of ``precisions``, the tokenizer, the default run's training examples and collator."""
    cfg = RunConfig(model=args.model, max_steps=args.steps)
    bases = {}
    for precision in precisions:
        dtype = torch.float32 if precision == "fp32" else storage_dtype(resolve_precision("bf16", "cpu"))
        bases[precision], tokenizer = load_model(args.model, dtype=dtype)
    records = hdata.load_records(cfg.train_data, hdata.resolve_data_dir(args.data_dir), seed=0)
    examples = hdata.build_train_dataset(records, tokenizer, prompt_format=cfg.prompt_format,
                                         train_on_inputs=cfg.train_on_inputs, cutoff_len=cfg.cutoff_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return cfg, bases, tokenizer, examples, lambda batch: hdata.collate(batch, pad)


def settings_for(cfg, spec, seed, condition, steps):
    precision, selected, window = CONDITIONS[condition]
    settings = TrainSettings.from_config(cfg, spec, seed)
    return dataclasses.replace(settings, precision=precision, selected_logits=selected, max_steps=steps,
                               length_window=window or settings.length_window)


def median_ratio(rates: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(rates[a], rates[b]))


def training_throughput(args, cfg, bases, examples, collate, names: list[str]) -> dict[str, float]:
    """Tokens/s of each condition in ``names``, interleaved; ratios to the first."""
    spec = resolve_spec("lora", r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets)
    rates: dict[str, list[float]] = {c: [] for c in names}
    print(f"\n1. training tokens/s, LoRA, batch {cfg.batch_size}, {args.timing_steps} steps per condition and round")
    for round_ in range(args.rounds):
        for condition in names[round_ % len(names):] + names[:round_ % len(names)]:  # rotated order
            precision = CONDITIONS[condition][0]
            model = fresh_adapter_model(bases[precision], spec, seed=100 + round_)
            settings = settings_for(cfg, spec, 100 + round_, condition, args.timing_steps)
            result = train(model, examples, collate, settings, progress=False)
            rates[condition].append(result.tokens_per_second)
            print(f"  round {round_ + 1} {condition:<11} {result.tokens_per_second:8.1f} tokens/s "
                  f"({result.seconds_per_step:.2f} s/step, {result.tokens} tokens)", flush=True)
            del model
            gc.collect()
    ratios = {f"train {c}/{names[0]}": median_ratio(rates, c, names[0]) for c in names[1:]}
    for name, value in ratios.items():
        print(f"  {name}: x{value:.2f}")
    return ratios


def accuracy(args, cfg, bases, tokenizer, examples, collate, folder: Path):
    """Train LoRA and LinChain-3 in fp32 and bf16 with the same seed; evaluate each in its precision."""
    print(f"\n2. accuracy after {args.steps} steps, seed 0, tasks arithmetic"
          + (f" (first {args.limit} items per task)" if args.limit else ""))
    systems: dict[tuple[str, str], SystemResult] = {}
    timings: dict[tuple[str, str], tuple[float, float]] = {}  # (training, evaluation) seconds
    kept = None
    for method in ("lora", "linchain"):
        spec = resolve_spec(method, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets)
        for precision in ("fp32", "bf16"):
            model = fresh_adapter_model(bases[precision], spec, seed=0)
            # the run's own settings, the new path in both: only the precision differs
            settings = dataclasses.replace(TrainSettings.from_config(cfg, spec, 0), precision=precision, max_steps=args.steps)
            trained = train(model, examples, collate, settings, progress=False)
            start = time.perf_counter()
            evaluation = hevaluate.evaluate(model, tokenizer, ["arithmetic"], args.data_dir, limit=args.limit,
                                            batch_size=cfg.eval_batch_size, precision=precision)
            eval_seconds = time.perf_counter() - start
            leaf = {t: s for t, s in evaluation.scores.items() if t in evaluation.samples}
            timings[method, precision] = (trained.train_seconds, eval_seconds)
            systems[method, precision] = SystemResult(
                method=f"{method}-{precision}", seed=0, scores=leaf,
                correct={t: {s.doc_id: float(s.correct) for s in v} for t, v in evaluation.samples.items()})
            average = sum(leaf.values()) / len(leaf)
            print(f"  {method:<9} {precision}: accuracy {100 * average:5.1f}%  final loss {trained.final_loss:.4f}  "
                  f"train {trained.train_seconds:6.1f} s ({trained.tokens_per_second:.0f} tokens/s)  "
                  f"eval {eval_seconds:5.1f} s", flush=True)
            if (method, precision) == ("lora", "fp32"):
                kept = save_adapter(model, folder / "lora-fp32")
            del model
            gc.collect()
    differences = {}
    for method in ("lora", "linchain"):
        gain = item_interval({0: systems[method, "bf16"].correct}, {0: systems[method, "fp32"].correct})
        differences[method] = gain
        print(f"  {method}: bf16 - fp32 = {100 * gain.estimate:+.1f} points, 95% paired-bootstrap interval "
              f"[{100 * gain.low:+.1f}, {100 * gain.high:+.1f}] over the test items", flush=True)
    # the default run (base, lora, moslora, linchain) from these parts, an estimate: MoSLoRA costs what
    # LoRA does (bench_adapters: x0.995 per step) and the base model is taken to evaluate as fast as LoRA
    for precision in ("fp32", "bf16"):
        lora, linchain = timings["lora", precision], timings["linchain", precision]
        estimate = lora[1] + 2 * sum(lora) + sum(linchain)
        print(f"  default run estimate in {precision} (training and evaluation, without start-up): "
              f"{estimate / 60:.1f} min", flush=True)
    return differences, kept


def eval_throughput(args, cfg, bases, tokenizer, adapter_dir) -> dict[str, float]:
    print(f"\n3. evaluation items/s, the fp32-trained LoRA on tasks arithmetic, batch {cfg.eval_batch_size}")
    models = {p: load_adapter_model(copy.deepcopy(bases[p]), adapter_dir) for p in ("fp32", "bf16")}
    limit = args.timing_limit or args.limit
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    scores: dict[str, float] = {}
    for round_ in range(args.eval_rounds):
        for precision in (("fp32", "bf16") if round_ % 2 == 0 else ("bf16", "fp32")):
            start = time.perf_counter()
            result = hevaluate.evaluate(models[precision], tokenizer, ["arithmetic"], args.data_dir,
                                        limit=limit, batch_size=cfg.eval_batch_size, precision=precision)
            seconds = time.perf_counter() - start
            items = sum(len(v) for v in result.samples.values())
            rates[precision].append(items / seconds)
            scores[precision] = result.scores["arithmetic"]
            print(f"  round {round_ + 1} {precision}: {items / seconds:6.2f} items/s ({items} items, {seconds:.1f} s, "
                  f"accuracy {100 * scores[precision]:.1f}%)", flush=True)
    ratios = {"eval bf16/fp32": median_ratio(rates, "bf16", "fp32")}
    print(f"  eval bf16/fp32: x{ratios['eval bf16/fp32']:.2f}")
    print_lengths(result, tokenizer)
    sweep = [int(b) for b in args.eval_batch_sizes.split(",") if b.strip()]
    for batch_size in sweep:
        start = time.perf_counter()
        result = hevaluate.evaluate(models["bf16"], tokenizer, ["arithmetic"], args.data_dir, limit=limit,
                                    batch_size=batch_size, precision="bf16")
        seconds = time.perf_counter() - start
        items = sum(len(v) for v in result.samples.values())
        print(f"  bf16, batch {batch_size:>3}: {items / seconds:6.2f} items/s, accuracy "
              f"{100 * result.scores['arithmetic']:.1f}%", flush=True)
    return ratios


def print_lengths(result, tokenizer) -> None:
    """Where generation time goes: prompt tokens (each computed once, in the prefill) against answer tokens."""
    prompts, answers = [], []
    for samples in result.raw["samples"].values():
        for sample in samples:
            prompts.append(len(tokenizer(sample["arguments"][0][0])["input_ids"]))
            answers.append(len(tokenizer(sample["resps"][0][0], add_special_tokens=False)["input_ids"]))
    preamble = len(tokenizer(hdata.format_prompt({"instruction": "", "input": ""}, "alpaca", tokenizer))["input_ids"])
    print(f"  prompt tokens per item: mean {statistics.mean(prompts):.1f} (an empty alpaca prompt alone: {preamble}); "
          f"answer tokens before the stop: mean {statistics.mean(answers):.1f}, max {max(answers)} (limit 32)")


@cli_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved training-throughput rounds")
    parser.add_argument("--timing-steps", type=int, default=8,
                        help="training steps per condition and round (8 = one length-grouping window)")
    parser.add_argument("--steps", type=int, default=50, help="training steps of the accuracy comparison")
    parser.add_argument("--limit", type=int, default=None, help="test items per task (default: all)")
    parser.add_argument("--eval-rounds", type=int, default=2, help="interleaved evaluation-throughput rounds")
    parser.add_argument("--timing-limit", type=int, default=None,
                        help="test items per task when timing evaluation (default: --limit)")
    parser.add_argument("--eval-batch-sizes", default="16,64", help="bf16 evaluation batch sizes to sweep")
    parser.add_argument("--training-only", action="store_true", help="measure training throughput (part 1) only")
    parser.add_argument("--conditions", default="old,bf16,logits,new",
                        help=f"training conditions to interleave, the first the reference of the ratios; of "
                             f"{', '.join(CONDITIONS)} (bf16,bf16-logits: selected logits alone, in bf16). "
                             "Parts 2 and 3 need the default")
    args = parser.parse_args()
    names = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONDITIONS]
    if unknown or len(names) < 2 or len(set(names)) < len(names):
        parser.error(f"--conditions needs two or more different names of {', '.join(CONDITIONS)}; got {args.conditions!r}")
    if not args.training_only and names != ["old", "bf16", "logits", "new"]:
        parser.error("--conditions other than the default measure training only: add --training-only")

    started = time.perf_counter()
    resolve_precision("bf16", "cpu")  # fails with one line where the CPU has no fast bf16
    print(f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    precisions = sorted({CONDITIONS[c][0] for c in names} | (set() if args.training_only else {"fp32", "bf16"}))
    cfg, bases, tokenizer, examples, collate = load(args, precisions)
    train_ratios = training_throughput(args, cfg, bases, examples, collate, names)
    differences, eval_ratios = {}, {}
    if not args.training_only:
        with tempfile.TemporaryDirectory(prefix="bench-throughput-") as folder:
            differences, adapter_dir = accuracy(args, cfg, bases, tokenizer, examples, collate, Path(folder))
            eval_ratios = eval_throughput(args, cfg, bases, tokenizer, adapter_dir)
    print(f"\ndone in {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.1f} (1 min)")
    parts = [f"{name} x{value:.2f}" for name, value in {**train_ratios, **eval_ratios}.items()]
    parts += [f"{m} bf16-fp32 {100 * g.estimate:+.1f} pts [{100 * g.low:+.1f}, {100 * g.high:+.1f}]"
              for m, g in differences.items()]
    print("ratios: " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
