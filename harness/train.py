"""The training loop: short enough to read in one sitting.

AdamW on the trainable (adapter) parameters, linear warm-up then linear decay,
gradient accumulation, gradient clipping, bf16 autocast on GPUs that support it
and fp32 on CPU. The data order is drawn from a generator seeded with the run's
seed, so every method given the same seed sees the same batches in the same order.

A non-finite loss stops training with :class:`NonFiniteLoss`; the caller marks that
method's run as failed and goes on with the others.

Data parallel: under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel and each rank takes every WORLD_SIZE-th micro-batch of the
same seeded order; the effective batch is batch_size x grad_accum x WORLD_SIZE, and N
ranks train exactly as one process with N times the gradient accumulation would. The
logged loss is the mean over ranks, and the non-finite check uses it, so every rank
stops at the same step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


@dataclass
class TrainSettings:
    lr: float = 2e-3
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int | None = 150
    epochs: float = 1.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    learning_rates: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens: int = 0
    peak_memory_mb: float = 0.0

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else float("nan")


def total_steps(n_examples: int, settings: TrainSettings, world_size: int = 1) -> int:
    """Optimizer steps: ``max_steps`` if given, else ``epochs`` passes over the data."""
    if settings.max_steps:
        return settings.max_steps
    per_step = settings.batch_size * settings.grad_accum * world_size
    return max(1, math.ceil(settings.epochs * n_examples / per_step))


def batch_order(n_examples: int, n_batches: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of each micro-batch: seeded shuffles of the data, repeated as often as needed."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n_batches * batch_size:
        order.extend(torch.randperm(n_examples, generator=g).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def train(
    model: torch.nn.Module,
    examples: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    settings: TrainSettings,
    *,
    on_step: Callable[[int, float, float], None] | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``examples``.

    ``on_step(step, loss, lr)`` runs after each optimizer step; ``on_checkpoint(step)`` every
    ``checkpoint_every`` steps before the last (intermediate evaluation, e.g. for pruning: an exception
    it raises ends training and propagates).
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from harness import distributed

    if not examples:
        raise ValueError("no training examples")
    device = next(model.parameters()).device
    ctx = distributed.context()
    steps = total_steps(len(examples), settings, ctx.world_size)
    micro_batches = batch_order(len(examples), steps * settings.grad_accum * ctx.world_size, settings.batch_size,
                                settings.seed)
    micro_batches = micro_batches[ctx.rank::ctx.world_size]

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    step_model = _wrap_distributed(model) if ctx.distributed else model
    autocast = autocast_for(device)

    result = TrainResult()
    _reset_peak_memory(device)
    model.train()
    bar = tqdm(total=steps, desc=description, disable=not progress or not ctx.is_main, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            # summed on the device and read once per step: no host sync per micro-batch
            step_loss, step_tokens = torch.zeros((), dtype=torch.float64, device=device), 0
            for micro in range(settings.grad_accum):
                batch = collate([examples[i] for i in micro_batches[(step - 1) * settings.grad_accum + micro]])
                step_tokens += int(batch["attention_mask"].sum())  # counted on the host, before the copy
                batch = {k: v.to(device) for k, v in batch.items()}
                last = micro == settings.grad_accum - 1
                # gradients are averaged across ranks once per step, on the last micro-batch
                with contextlib.nullcontext() if last or not ctx.distributed else step_model.no_sync():
                    with autocast:
                        loss = step_model(**batch).loss / settings.grad_accum
                    loss.backward()
                step_loss += loss.detach()
            step_loss = distributed.mean_over_ranks(step_loss, ctx).item()
            if not math.isfinite(step_loss):
                raise NonFiniteLoss(f"loss became {step_loss} at step {step}: lower the learning rate "
                                    f"(now {settings.lr:g}) or check the data")
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps = step
            result.tokens += step_tokens * ctx.world_size
            result.losses.append((step, step_loss))
            result.learning_rates.append((step, lr))
            if on_step is not None:
                on_step(step, step_loss, lr)
            if on_checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
                model.eval()
                on_checkpoint(step)
                model.train()
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{result.tokens / elapsed:.0f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
        result.train_seconds = time.perf_counter() - start
        result.peak_memory_mb = _peak_memory_mb(device)
        model.eval()
    return result


def autocast_for(device: torch.device):
    """The mixed precision training uses: bf16 autocast on GPUs that support it, none elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _wrap_distributed(model):
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident memory since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
