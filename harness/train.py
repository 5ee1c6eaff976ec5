"""The training loop: short enough to read in one sitting.

AdamW on the trainable (adapter) parameters, linear warm-up then linear decay,
gradient accumulation, gradient clipping. ``precision="bf16"`` trains under bf16 autocast
(the caller stores the frozen base in bf16 once, :func:`harness.models.load_model`; the
adapter parameters and AdamW's state stay fp32). The data order is drawn from a generator
seeded with the run's seed, so every method given the same seed sees the same batches in
the same order; within a window of a few micro-batches of that order, examples of similar
length are batched together, which cuts padding without changing which examples are used.

The loss is the mean cross-entropy over the label tokens, as transformers computes it, but
the output layer is applied only at the positions whose next token has a label (the answer
tokens of a default run): :func:`causal_lm_loss`.

Per step the loop records the loss, the learning rate, the total gradient norm before
clipping and the norm of each parameter group (:func:`parameter_group`), read from the
device once per step.

A non-finite loss stops training with :class:`NonFiniteLoss`, and adapter weights that are not
finite at the end with :class:`NonFiniteAdapter` (a subclass); the caller marks that method's run
as failed and goes on with the others.

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

from harness import distributed
from harness.data.tokenize import IGNORE_INDEX
from harness.models import ARCHITECTURES, autocast_for, resolve_precision
from harness.tuned_rates import rate_for

# Parameter groups whose gradient norms are recorded, in the order of parameter_group's rules.
PARAMETER_GROUPS = ("cond", "middle", "B", "A", "other")
# Micro-batches of the seeded order that are regrouped by length together (see batch_order).
LENGTH_WINDOW = 8
# Model types whose *ForCausalLM forward is "decoder, final norm, lm_head, cross-entropy" with at most
# element-wise work after the head (Gemma 3's soft-capping) and whose head input goes through transformers'
# slice_logits_to_keep, checked in transformers 5.23 (tests/test_architectures.py compares both losses): causal_lm_loss may ask for logits at the labelled
# positions only (a boolean logits_to_keep mask). Other models take the full path (logits at every position).
# Derived from harness.models.ARCHITECTURES (its ``selected_logits`` flag), so a new architecture is one entry there.
SELECTED_LOGITS_MODEL_TYPES = tuple(sorted(t for t, a in ARCHITECTURES.items() if a.selected_logits))


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


class NonFiniteAdapter(NonFiniteLoss):
    """Training ended with NaN or infinite adapter weights; handled as a diverged run, like a non-finite loss."""


@dataclass
class TrainSettings:
    """How one method trains with one seed: built from the run's configuration by :meth:`from_config`.

    No field has a default of its own: every default is :class:`harness.config.RunConfig`'s.
    ``length_window`` and ``selected_logits`` are not run options (``from_config`` sets the harness's
    choice; benchmarks compare others with ``dataclasses.replace``).
    """

    lr: float
    batch_size: int
    grad_accum: int
    max_steps: int | None
    epochs: float
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    precision: str  # auto, fp32 or bf16: see harness.models.resolve_precision
    length_window: int  # micro-batches regrouped by length; 1 keeps the seeded order as is
    selected_logits: bool  # False: logits at every position, the model's own loss (benchmarks compare)

    @classmethod
    def from_config(cls, cfg, spec, seed: int) -> "TrainSettings":
        """The settings of the run ``cfg`` (a :class:`~harness.config.RunConfig`) for one method and seed.

        ``spec`` is the method's :class:`~harness.adapters.AdapterSpec`; its rate is
        :func:`harness.tuned_rates.rate_for`'s (the spec's ``lr=``, else ``cfg.lr``, else the tuned table).
        """
        return cls(lr=rate_for(cfg, spec)[0], batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                   max_steps=cfg.max_steps, epochs=cfg.epochs, warmup_ratio=cfg.warmup_ratio,
                   weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=seed,
                   precision=cfg.precision, length_window=LENGTH_WINDOW, selected_logits=True)


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    learning_rates: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens: int = 0
    peak_memory_mb: float = 0.0
    precision: str = "fp32"  # the precision trained in (auto resolved)
    # (step, total gradient norm before clipping) per optimizer step
    grad_norms: list[tuple[int, float]] = field(default_factory=list)
    # (step, {group: gradient norm}) per optimizer step, for the groups of parameter_group that have parameters
    group_grad_norms: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    clipped_fraction: float = 0.0  # share of steps whose gradient norm exceeded max_grad_norm (0 without clipping)

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


def batch_order(n_examples: int, n_batches: int, batch_size: int, seed: int,
                lengths: Sequence[int] | None = None, window: int = LENGTH_WINDOW) -> list[list[int]]:
    """Indices of each micro-batch: seeded shuffles of the data, repeated as often as needed.

    With ``lengths`` (one per example), each run of ``window`` consecutive micro-batches of that order
    is sorted by length, cut into micro-batches again, and those micro-batches are shuffled with the
    same generator: examples of similar length share a batch (less padding), every example is used
    exactly as often as without regrouping, and the result depends on the seed and the data only, so
    every method given the same seed still sees the same batches.
    """
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n_batches * batch_size:
        order.extend(torch.randperm(n_examples, generator=g).tolist())
    order = order[:n_batches * batch_size]
    if lengths is not None and window > 1:
        span = window * batch_size
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: lengths[i])  # stable: ties keep the seeded order
            batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            shuffled = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
            order[start:start + span] = [i for batch in shuffled for i in batch]
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def parameter_group(name: str) -> str:
    """The group a parameter's gradient norm is reported under: cond, middle, B, A or other.

    ``cond`` for CondLoRA's generating maps (``lora_cond``), ``middle`` for the middle matrices of
    MoSLoRA, LinChain and MTLoRA, ``B`` and ``A`` for the LoRA factors, ``other`` for anything else.
    """
    for group, marker in (("cond", "lora_cond"), ("middle", "middle"), ("B", "lora_B"), ("A", "lora_A")):
        if marker in name:
            return group
    return "other"


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

    if not examples:
        raise ValueError("no training examples")
    device = next(model.parameters()).device
    ctx = distributed.context()
    steps = total_steps(len(examples), settings, ctx.world_size)
    micro_batches = batch_order(len(examples), steps * settings.grad_accum * ctx.world_size, settings.batch_size,
                                settings.seed, lengths=[len(e["input_ids"]) for e in examples],
                                window=settings.length_window)
    micro_batches = micro_batches[ctx.rank::ctx.world_size]

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    groups = {g: [p for n, p in named if parameter_group(n) == g] for g in PARAMETER_GROUPS}
    groups = {g: params for g, params in groups.items() if params}
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    step_model = _wrap_distributed(model) if ctx.distributed else model
    precision = resolve_precision(settings.precision, device)
    autocast = autocast_for(device, precision)
    selected = settings.selected_logits and selected_logits_head(model) is not None

    result = TrainResult(precision=precision)
    clipped = 0
    _reset_peak_memory(device)
    restore_attention = _training_attention(model, device, precision)
    model.train()
    bar = tqdm(total=steps, desc=description, unit="step", disable=not progress or not ctx.is_main,
               dynamic_ncols=True)
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
                        loss = causal_lm_loss(step_model, batch, selected) / settings.grad_accum
                    loss.backward()
                step_loss += loss.detach()
            # one host read per step: the loss and every group's gradient norm together
            norms = _group_norms(groups)
            values = torch.cat([distributed.mean_over_ranks(step_loss, ctx).reshape(1),
                                norms.to(torch.float64)]).tolist()
            step_loss, group_norms = values[0], dict(zip(groups, values[1:]))
            if not math.isfinite(step_loss):
                raise NonFiniteLoss(f"loss became {step_loss} at step {step}: lower the learning rate "
                                    f"(now {settings.lr:g}) or check the data")
            grad_norm = math.sqrt(sum(v * v for v in group_norms.values()))
            if settings.max_grad_norm:
                # the total norm is the norm of the group norms: clip with it instead of computing it again
                torch.nn.utils.clip_grads_with_norm_(trainable, settings.max_grad_norm, norms.square().sum().sqrt())
                clipped += grad_norm > settings.max_grad_norm
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps = step
            result.tokens += step_tokens * ctx.world_size
            result.losses.append((step, step_loss))
            result.learning_rates.append((step, lr))
            result.grad_norms.append((step, grad_norm))
            result.group_grad_norms.append((step, group_norms))
            result.clipped_fraction = clipped / step
            if on_step is not None:
                on_step(step, step_loss, lr)
            if on_checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
                model.eval()
                on_checkpoint(step)
                model.train()
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{result.tokens / elapsed:.0f}", refresh=False)
            bar.update(1)
        # A finite loss does not prove finite weights (an infinite rate can leave NaN in a factor that the loss
        # of the last step did not see yet): a run must never report a score for a NaN adapter.
        bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteAdapter(f"non-finite adapter: {len(bad)} tensor(s) hold NaN or inf after training (first: {bad[0]}): "
                                   f"lower the learning rate (now {settings.lr:g})")
    finally:
        bar.close()
        result.train_seconds = time.perf_counter() - start
        result.peak_memory_mb = _peak_memory_mb(device)
        restore_attention()
        model.eval()
    return result


def _training_attention(model, device: torch.device, precision: str) -> Callable[[], None]:
    """bf16 training on CPU uses eager attention; returns the call that restores the model's own choice.

    Measured on the embedded model (2-core AVX512_BF16 CPU, torch 2.13, batch 16, interleaved): a bf16
    training step took 2.37 s with SDPA (its CPU flash-attention backward is slow in bf16) and 1.76 s
    with eager attention; in fp32 the two are within noise, and generation is faster with SDPA in both
    precisions, so evaluation keeps it. Both compute the same attention, to float tolerance.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if device.type != "cpu" or precision != "bf16" or before != "sdpa":
        return lambda: None
    config._attn_implementation = "eager"

    def restore() -> None:
        config._attn_implementation = before

    return restore


def _group_norms(groups: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """The 2-norm of each group's gradients (one fused reduction per group), as one tensor on the device.

    Parameters without a gradient count as zero, as in clip_grad_norm_.
    """
    norms = []
    for params in groups.values():
        grads = [p.grad for p in params if p.grad is not None]
        norms.append(torch.nn.utils.get_total_norm(grads).to(torch.float32) if grads
                     else torch.zeros((), device=params[0].device))
    return torch.stack(norms)


def causal_lm_loss(model, batch: dict[str, torch.Tensor], selected) -> torch.Tensor:
    """The mean cross-entropy over the label tokens, as transformers' causal-LM loss computes it.

    With ``selected`` (truthy where :func:`selected_logits_head` found a head the model applies
    plainly), the model computes logits only where the next token has a label: a boolean
    ``logits_to_keep`` mask, which the model types of SELECTED_LOGITS_MODEL_TYPES apply to the final
    hidden states before the output layer, so with the prompt masked most of the 49,152-way output
    layer's work of a step is never done. The forward still goes through ``model`` itself, so PeftModel
    and DistributedDataParallel see an ordinary call. Without it, the model's own loss (logits everywhere).

    (An earlier version asked for ``logits_to_keep=1`` plus the hidden states and applied the head
    itself; under bf16 autocast on CPU the head on that one strided position went through a batched
    matmul that copied the 49,152 x 576 weight once per sequence: 2.6 s of a 7.4 s step.)
    """
    if not selected:
        return model(**batch).loss
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (kept positions, vocabulary)
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])


def selected_logits_head(model) -> torch.nn.Module | None:
    """The output layer where :func:`causal_lm_loss` may ask for selected logits, or None where the full path is needed.

    The model still applies it (through a boolean ``logits_to_keep``); a non-None result only says that
    this model type computes its logits as ``head(final hidden states)`` with nothing after the head.

    Works through peft's PeftModel (and DDP's wrapper, since the caller passes the unwrapped model)
    for the model types in SELECTED_LOGITS_MODEL_TYPES; any other model (a type harness.models.ARCHITECTURES
    does not list, or one flagged ``selected_logits=False``) returns None and trains on the model's own loss.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in SELECTED_LOGITS_MODEL_TYPES:
        return None
    if getattr(config, "tie_last_hidden_states", True) is False:  # hidden_states[-1] would precede the norm
        return None
    return base.get_output_embeddings()


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
