"""Data parallelism under ``torchrun``: which process this is, its device, and the few collectives needed.

``torchrun --nproc-per-node N -m harness.run ...`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set. Every process loads the model and the data and
trains each method in step with the others (DistributedDataParallel averages the
gradients); only rank 0 evaluates, talks to MLflow and writes results/. While rank 0
evaluates, the other ranks wait for it at the start of the next method's training, so
the process group is created with a long timeout (``HARNESS_DIST_TIMEOUT_MIN``, default
720 minutes) rather than torch's default of 10 to 30.

Without ``WORLD_SIZE`` > 1 nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from harness.errors import UserError


@dataclass(frozen=True)
class Context:
    """This process's place in the job: rank ``rank`` of ``world_size``, GPU ``local_rank`` of its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank if self.distributed else torch.cuda.current_device())
        return torch.device("cpu")


def context() -> Context:
    """The job this process belongs to; joins the process group on first use when there are several ranks."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or not torch.distributed.is_available():
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        minutes = _timeout_minutes()
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                             timeout=timedelta(minutes=minutes))
    return Context(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank)


def _timeout_minutes() -> float:
    raw = os.environ.get("HARNESS_DIST_TIMEOUT_MIN", "720")
    try:
        minutes = float(raw)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0 or minutes == float("inf"):
        raise UserError(f"HARNESS_DIST_TIMEOUT_MIN={raw!r}: expected a positive number of minutes")
    return minutes


def mean_over_ranks(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of the tensor ``value`` over all ranks (``value`` itself in a single process)."""
    if not ctx.distributed:
        return value
    total = value.clone()
    torch.distributed.all_reduce(total)
    return total / ctx.world_size


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        torch.distributed.barrier()


def shutdown(ctx: Context) -> None:
    if ctx.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
