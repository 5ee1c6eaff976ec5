"""Curvature at initialisation: the largest eigenvalue of the training loss's Hessian w.r.t. the adapter.

Lanczos over exact Hessian-vector products (double backward); ``full`` diagnostics level only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

HESSIAN_EXAMPLES = 64
HESSIAN_MICRO_BATCH = 16
HESSIAN_TOL = 1e-3
HESSIAN_MAX_ITER = 40


@dataclass(frozen=True)
class Eigenvalue:
    """A Lanczos estimate: ``value`` (the largest Ritz value), its residual bound, and how it was reached.

    For a symmetric H some eigenvalue lies within ``residual`` of ``value``, and the largest Ritz value never
    exceeds lambda_max; ``converged`` says ``residual <= tol * |value|`` was reached within ``max_iter``.
    """

    value: float
    residual: float
    iterations: int
    converged: bool


def lanczos_lambda_max(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, *,
                       tol: float = HESSIAN_TOL, max_iter: int = HESSIAN_MAX_ITER) -> Eigenvalue:
    """The largest (most positive) eigenvalue of a symmetric operator by Lanczos, from the vector ``start``.

    Unlike power iteration, Lanczos finds the largest eigenvalue even when a negative one is larger in
    magnitude (a Hessian away from a minimum is indefinite). No reorthogonalisation: only two vectors are
    kept (the operator can be millions of parameters wide); loss of orthogonality adds copies of converged
    Ritz values but does not move the largest. Stops when the residual bound beta_j |y_j| <= tol |theta|.
    """
    q = start / start.norm()
    q_prev = torch.zeros_like(q)
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    theta, residual = float("nan"), float("inf")
    for j in range(1, max_iter + 1):
        w = matvec(q)
        alpha = float(torch.dot(w.to(torch.float64), q.to(torch.float64)))
        w = w - alpha * q - beta * q_prev
        beta_next = float(w.norm())
        alphas.append(alpha)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        theta, residual = float(evals[-1]), beta_next * float(evecs[-1, -1].abs())
        if residual <= tol * abs(theta) or beta_next <= 1e-12 * max(abs(theta), 1.0):  # converged, or H is spent
            return Eigenvalue(theta, residual, j, True)
        betas.append(beta_next)
        q_prev, q, beta = q, w / beta_next, beta_next
    return Eigenvalue(theta, residual, max_iter, False)


def hessian_lambda_max(loss_fn: Callable[[], torch.Tensor | Iterable[torch.Tensor]], params: Sequence[torch.Tensor],
                       *, tol: float = HESSIAN_TOL, max_iter: int = HESSIAN_MAX_ITER, seed: int = 0) -> Eigenvalue:
    """The largest eigenvalue of the Hessian of ``loss_fn()`` with respect to ``params`` (Lanczos, exact HVPs).

    ``loss_fn`` returns the loss, or an iterable of terms that sum to it (micro-batches: each term's graph is
    freed before the next is built). Hessian-vector products by double backward; the parameters' own dtype.
    """
    params = [p for p in params]
    sizes = [p.numel() for p in params]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        pieces = [chunk.view_as(p) for chunk, p in zip(torch.split(v, sizes), params)]
        total = torch.zeros_like(v)
        terms = loss_fn()
        for term in [terms] if isinstance(terms, torch.Tensor) else terms:
            # a parameter a term does not reach (or reaches linearly) contributes zeros, not an error
            grads = torch.autograd.grad(term, params, create_graph=True, allow_unused=True, materialize_grads=True)
            dot = sum((g * piece).sum() for g, piece in zip(grads, pieces))
            if dot.requires_grad:
                total += torch.cat([h.reshape(-1) for h in torch.autograd.grad(
                    dot, params, allow_unused=True, materialize_grads=True)])
        return total

    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(sum(sizes), generator=generator, dtype=params[0].dtype).to(params[0].device)
    with torch.enable_grad():
        return lanczos_lambda_max(hvp, start, tol=tol, max_iter=max_iter)


def curvature_at_init(peft_model, examples: Sequence[dict], collate: Callable[[list[dict]], dict], *,
                      n_examples: int = HESSIAN_EXAMPLES, micro_batch: int = HESSIAN_MICRO_BATCH,
                      tol: float = HESSIAN_TOL, max_iter: int = HESSIAN_MAX_ITER, seed: int = 0) -> Eigenvalue:
    """lambda_max of the training loss's Hessian w.r.t. the adapter parameters, before any training step.

    The loss is the mean per-token training loss on ``n_examples`` training examples drawn once with
    ``seed`` (the same for every method given that seed), in fp32, dropout off. At initialisation B = 0
    (CondLoRA: Theta_B = 0), so the gradient reaches B only and the A and middle blocks of the Hessian are
    zero; lambda_max is set by the B block, s^2 (T A) X^T X (T A)^T weighted by the loss's curvature in the
    outputs, and by the A-B coupling through dL/dW0. It is the curvature the first steps see, which bounds
    the learning rate a method tolerates, and it depends on the scale of T A: that is why it differs between
    methods that start from the same A. Attention runs on PyTorch's plain (math) kernel here: the fused
    kernels have no second derivative.
    """
    device = next(peft_model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(examples), generator=generator)[:n_examples].tolist()
    batches = [collate([examples[i] for i in chosen[i:i + micro_batch]]) for i in range(0, len(chosen), micro_batch)]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    total = max(sum(counts), 1)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    was_training = peft_model.training
    peft_model.eval()

    def terms():
        for batch, count in zip(batches, counts):
            batch = {k: v.to(device) for k, v in batch.items()}
            yield peft_model(**batch).loss.float() * (count / total)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            return hessian_lambda_max(terms, params, tol=tol, max_iter=max_iter, seed=seed)
    finally:
        peft_model.train(was_training)
