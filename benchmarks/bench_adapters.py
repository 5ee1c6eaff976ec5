"""Step time and memory of every adapter method against peft's own LoRA, in one process.

    python -m benchmarks.bench_adapters                 # embedded SmolLM2-135M, batch 16 x 64, 8 rounds
    python -m benchmarks.bench_adapters --model tiny-random --rounds 3   # a quick check of the script

Each round runs one training step (forward, backward, AdamW) of every method on the
same batch, in a rotated order, so that machine noise hits all methods alike; a
method's ratio is the median over rounds of its step time divided by LoRA's step
time in the same round. Memory, exactly accounted on any device: trainable parameters,
their gradients and AdamW's two moments, plus the bytes of every tensor autograd saves
for backward during the forward pass; on CUDA also the peak a training step allocates
above what was resident before it.

Merged inference: a trained-looking LinChain adapter is merged into the base
weights, and its forward time is compared with the untouched base model's
(interleaved, median of paired ratios). Targets (issue 2): MoSLoRA and MTLoRA <= 1.02,
LinChain-3 <= 1.03, merged inference <= 1.01.

On a GPU, steps run under the same bf16 autocast as training. ``--random-weights`` builds the
model from ``--model``'s config.json alone, with random weights: step times do not depend on the
weights' values, so a large architecture (a folder holding just its config.json) can be timed
without downloading it:

    python -m benchmarks.bench_adapters --model configs/llama-3.2-1b --random-weights --seq-len 256
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


from harness.adapters import get_adapter_model, trainable_parameters
from harness.models import DEFAULT_MODEL, load_model
from harness.train import autocast_for

METHODS = ["lora", "moslora", "linchain", "mtlora:structure=shim", "mtlora:structure=icfm",
           "mtlora:structure=ctcm", "mtlora:structure=dtsm", "condlora"]
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward pass."""
    seen: dict[tuple, int] = {}

    def pack(t):
        if t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast_for(next(model.parameters()).device):
            loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for (ptr, _), n in seen.items() if ptr not in params)


class _OpCounter(TorchDispatchMode):
    """Counts the operators a step dispatches below autograd (on a GPU, about one kernel launch each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def step_profile(step, device) -> dict:
    """Operators dispatched by one step and, on CUDA, the GPU's busy time (sum of kernel times) in it."""
    with _OpCounter() as counter:
        step()
    out = {"ops": counter.count}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        out["gpu_ms"] = sum(e.self_device_time_total for e in kernels) / 1000
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--methods", default=",".join(METHODS), help="';'-separated specs (lora is always added)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (after one warm-up round)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the model from --model's config.json with random weights (timing only)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    methods = [m for m in args.methods.replace(";", "|").split("|")] if ";" in args.methods else args.methods.split(",")
    methods = ["lora"] + [m for m in methods if m != "lora"]
    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        with device:
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    else:
        base, _ = load_model(args.model)
    base.to(device)
    autocast = autocast_for(device)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    models, optims, memory = {}, {}, {}
    for spec in methods:
        torch.manual_seed(0)
        model = get_adapter_model(copy.deepcopy(base), spec, r=args.rank, alpha=args.alpha, dropout=0.0,
                                  targets=TARGETS).to(device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        models[spec], optims[spec] = model, torch.optim.AdamW(params, lr=1e-4)
        state_bytes = 4 * sum(p.numel() * p.element_size() for p in params)  # param, grad, exp_avg, exp_avg_sq
        memory[spec] = {"trainable": trainable_parameters(model), "adapter_state_mb": state_bytes / 2**20,
                        "activations_mb": saved_activation_bytes(model, batch) / 2**20}

    def step(spec):
        model, opt = models[spec], optims[spec]  # noqa: F821 (called before the del below)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if device.type == "cuda":
            # what the step itself adds on top of everything resident (all methods' models stay loaded)
            memory[spec]["step_mb"] = (torch.cuda.max_memory_allocated() - resident) / 2**20
        return time.perf_counter() - t0

    print(f"model {args.model}{' (random weights)' if args.random_weights else ''} on {device}, batch {args.batch_size} x {args.seq_len}, r {args.rank}, "
          f"alpha {args.alpha:g}, targets {'+'.join(TARGETS)}, {args.rounds} rounds", flush=True)
    for spec in methods:  # warm-up
        step(spec)
    times = {spec: [] for spec in methods}
    for k in range(args.rounds):
        order = methods[k % len(methods):] + methods[: k % len(methods)]
        for spec in order:
            times[spec].append(step(spec))
        print(f"round {k + 1}/{args.rounds}: " + ", ".join(f"{s.split(':')[-1]} {times[s][-1]:.2f}s" for s in methods),
              flush=True)

    ratios = {s: statistics.median(t / l for t, l in zip(times[s], times["lora"])) for s in methods}
    profiles = {spec: step_profile(lambda: step(spec), device) for spec in methods}
    print()
    header = f"{'method':28s} {'trainable':>10s} {'median step s':>13s} {'ratio to LoRA':>13s} "
    header += f"{'state MB':>9s} {'saved act MB':>12s}" + (f" {'step MB':>9s}" if device.type == "cuda" else "")
    header += f" {'ops/step':>9s}" + (f" {'GPU ms':>8s} {'GPU ratio':>9s}" if device.type == "cuda" else "")
    print(header)
    for s in methods:
        mem = memory[s]
        print(f"{s:28s} {mem['trainable']:>10,d} {statistics.median(times[s]):>13.3f} {ratios[s]:>13.3f} "
              f"{mem['adapter_state_mb']:>9.1f} {mem['activations_mb']:>12.1f}"
              + (f" {mem['step_mb']:>9.1f}" if "step_mb" in mem else "")
              + f" {profiles[s]['ops']:>9d}"
              + (f" {profiles[s]['gpu_ms']:>8.1f} {profiles[s]['gpu_ms'] / profiles['lora']['gpu_ms']:>9.3f}"
                 if "gpu_ms" in profiles[s] else ""))
    print("state MB: adapter parameters, gradients and AdamW moments; saved act MB: tensors autograd keeps for "
          "backward" + ("; step MB: peak memory a training step adds above what is resident" if device.type == "cuda" else "")
          + "; ops/step: operators dispatched (each a kernel launch on a GPU)"
          + ("; GPU ms: the kernels' busy time in one step (when the step ratio exceeds the GPU ratio, the "
             "difference is launch overhead on the CPU, hidden once the GPU is the bottleneck)" if device.type == "cuda" else ""))

    # Merged inference against the base model.
    merged_src = models.get("linchain") or models[methods[-1]]
    with torch.no_grad():
        for p in merged_src.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    merged = copy.deepcopy(merged_src).merge_and_unload().eval()
    base.eval()
    del models, optims
    infer = {"base": [], "merged": []}
    with torch.no_grad():
        for _ in range(2):
            with autocast:
                base(ids), merged(ids)
        for k in range(max(args.rounds * 2, 6)):
            for name, m in (("base", base), ("merged", merged)) if k % 2 == 0 else (("merged", merged), ("base", base)):
                sync(device)
                t0 = time.perf_counter()
                with autocast:
                    m(ids)
                sync(device)
                infer[name].append(time.perf_counter() - t0)
    merged_ratio = statistics.median(m / b for m, b in zip(infer["merged"], infer["base"]))
    print(f"\nmerged inference: base {statistics.median(infer['base']):.3f}s, merged "
          f"{statistics.median(infer['merged']):.3f}s per forward of {args.batch_size} x {args.seq_len}")
    short = {s: s.split("structure=")[-1] if "mtlora" in s else s for s in methods}
    print("RATIOS " + " ".join(f"{short[s]}={ratios[s]:.3f}" for s in methods if s != "lora")
          + f" merged_inference={merged_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
