"""Mechanism diagnostics: why a method wins or loses, measured in the same run as its scores.

Every method here updates a frozen layer by dW = s B T A of rank at most r, so all of them
reach exactly the same set of updates (each exports to a plain rank-r LoRA); a difference
in score must come from training dynamics. These measurements make the dynamics visible:

- the spectrum of each adapted layer's dW (the exact product, as merging computes it):
  Frobenius norm, top singular values, the entropy effective rank
  exp(-sum_i p_i log p_i) with p_i = s_i / sum_j s_j (Roy and Vetterli 2007), and the
  stable rank ||dW||_F^2 / ||dW||_2^2;
- intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228): how many of the top k
  left singular vectors of W0 + dW have |cosine| below a threshold with every left singular
  vector of W0 (k = 10, threshold 0.5, as peft's ``reduce_intruder_dimension``), from W0's SVD
  (once per layer per run) and dW's factors (:func:`top_left_cosines`), never an SVD of W0 + dW;
- the subspace similarity of a method's dW to LoRA's dW of the same seed: Hu et al. 2021's
  normalised overlap ||U_a^T U_b||_F^2 / k of the top-k left singular vectors (the output
  space; the input spaces start equal, because every method starts from LoRA's A);
- training dynamics: ||dW||_F and the effective rank every 10 steps (:class:`DiagnosticsRecorder`,
  from r x r Gram matrices), the gradient norm of each parameter group when the training loop
  records it, and the steps to 50% and 90% of the final loss reduction;
- curvature (``full`` level only): the largest eigenvalue of the training loss's Hessian with
  respect to the adapter parameters at initialisation, by Lanczos over Hessian-vector products;
- forgetting: mean per-token cross-entropy on a fixed general-text sample, after training
  minus before (the adapter disabled).

:class:`RunDiagnostics` holds what one run shares between methods (the base weights' singular
vectors, the forgetting sample and its base loss, each method's top singular vectors for the
similarity to LoRA) and writes ``diagnostics.csv``, ``diagnostics.md`` (the LinChain paper's
three mechanism claims, each with its evidence and a verdict) and the PNGs. docs/diagnostics.md
explains every number.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

LEVELS = ("none", "basic", "full")
INTRUDER_TOP_K = 10
INTRUDER_THRESHOLD = 0.5
SIMILARITY_TOP_K = 4
RECORD_EVERY = 10
HESSIAN_EXAMPLES = 64
HESSIAN_MICRO_BATCH = 16
HESSIAN_TOL = 1e-3
HESSIAN_MAX_ITER = 40
FORGETTING_SEQUENCES = 16
FORGETTING_TOKENS = 128
CONFIDENCE = 0.95
ALL_LAYERS = "all"

# The columns of diagnostics.csv, in order. Model-level values (lambda_max, forgetting, steps_to_*) are on the
# row with layer "all" only.
COLUMNS = ("method", "spec_method", "seed", "layer", "shape", "delta_norm", "effective_rank", "stable_rank",
           "singular_values", "intruders", "similarity_to_lora", "lambda_max", "forgetting",
           "steps_to_50", "steps_to_90", "final_loss")


# ----------------------------------------------------------------------------------------------------------
# Spectra


@contextmanager
def one_thread():
    """Run the enclosed dense linear algebra on one thread, then restore torch's thread count.

    The decompositions here are small (at most a few thousand rows): LAPACK gains little from a second
    thread on them, and loses several times over when another process holds a core (measured on the 2-core
    machine: a float64 576 x 576 symmetric eigendecomposition took 37 ms on one thread and 1.2 s on two while
    other jobs ran).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def singular_values(m: torch.Tensor) -> torch.Tensor:
    """Singular values of a matrix in float64, largest first."""
    return torch.linalg.svdvals(m.detach().to(torch.float64))


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank (Roy and Vetterli 2007): exp of the entropy of s / sum(s); NaN for s = 0.

    It is r for r equal singular values and 1 for a single non-zero one; zeros contribute nothing.
    """
    s = s.detach().to(torch.float64).abs()
    total = s.sum()
    if total <= 0:
        return float("nan")
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(m: torch.Tensor) -> float:
    """Stable rank ||m||_F^2 / ||m||_2^2 of a matrix, or of the matrix whose singular values a 1-D ``m`` holds."""
    s = m.detach().to(torch.float64).abs() if m.dim() == 1 else singular_values(m)
    top = s.max() if s.numel() else torch.tensor(0.0)
    return float((s ** 2).sum() / top ** 2) if top > 0 else float("nan")


def _core(b: torch.Tensor, a: torch.Tensor):
    """QR factors of a low-rank product b @ a: b = Qb Rb, a^T = Qa Ra, so b @ a = Qb (Rb Ra^T) Qa^T."""
    qb, rb = torch.linalg.qr(b.detach().to(torch.float64))
    qa, ra = torch.linalg.qr(a.detach().to(torch.float64).T)
    return qb, rb @ ra.T, qa


def product_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of b @ a (b: m x r, a: r x n) from an r x r core: exact, without the m x n SVD."""
    _, core, _ = _core(b, a)
    return torch.linalg.svdvals(core)


def product_left_vectors(b: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k left singular vectors of b @ a (m x k, float64), from the same r x r core."""
    qb, core, _ = _core(b, a)
    u, _, _ = torch.linalg.svd(core)
    return qb @ u[:, :k]


def left_singular_vectors(m: torch.Tensor) -> torch.Tensor:
    """All left singular vectors of m (float32, columns, largest singular value first), as peft's tool takes them.

    A wide matrix is decomposed through its transpose: the same vectors, with LAPACK's faster tall-matrix path.
    """
    return base_spectrum(m).vectors


@dataclass(frozen=True)
class BaseSpectrum:
    """A frozen weight W0's thin SVD as the intruder count needs it: W0 = U diag(s) V^T, V left out.

    ``vectors`` is U (m x min(m, n), float32, largest singular value first), ``values`` is s (float64). It is
    the same for every method and seed, so :class:`RunDiagnostics` computes it once per layer per run.
    """

    vectors: torch.Tensor
    values: torch.Tensor


def base_spectrum(w0: torch.Tensor) -> BaseSpectrum:
    """W0's left singular vectors and singular values (one float32 SVD; wide matrices through the transpose)."""
    m = w0.detach().to(torch.float32)
    if m.shape[0] < m.shape[1]:
        _, s, vh = torch.linalg.svd(m.T, full_matrices=False)
        u = vh.T
    else:
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
    return BaseSpectrum(u.contiguous(), s.to(torch.float64))


# A direction of b outside the span of W0's left singular vectors is kept when its share of b is above this.
OUTSIDE_RANGE_TOL = 1e-6


def top_left_cosines(base: BaseSpectrum, w0: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                     k: int = INTRUDER_TOP_K) -> torch.Tensor:
    """For each of the top-k left singular vectors of W = W0 + b a, its largest |cosine| with W0's left vectors.

    Exact up to rounding, without an SVD of the m x n matrix W: with W0 = U0 S0 V0^T known (``base``)
    and E = [U0, Q] an orthonormal basis of range(W) (Q: the part of range(b) outside range(U0), empty when
    m <= n), the Gram matrix of W in that basis is

        E^T W W^T E = diag(S0^2, 0) + P B^T + B P^T + B (a a^T) B^T,   B = E^T b,  P = E^T (W0 a^T),

    a p' x p' matrix (p' = min(m, n), plus at most r when m > n) built in O(m p' r) from r-column products.
    Its eigenvectors y_i are the coordinates of W's left singular vectors in E, so the cosines with U0 are
    y_i's first min(m, n) entries: no product with U0 is needed either. Cost: one dense symmetric
    eigendecomposition of p' x p' in float32 (576 x 576: 21 ms on one thread here, against 45-65 ms for the
    float32 SVD of W it replaces, 75 ms for 1536 x 576). Accuracy: float32, like those SVDs. The largest
    error of a cosine against float64 SVDs of W0 and W, on the embedded model's layers with random rank-16
    updates, was 7.5e-5 (the float32 SVDs of W0 and W: 7.0e-5), set by W0's float32 singular vectors; a test
    checks 1e-4 on constructed examples. Vectors of (nearly) equal singular values are only defined up to a
    rotation, in any method, as in peft's own tool.
    """
    u0 = base.vectors.to(torch.float64)
    m, p = u0.shape
    b = b.detach().to(torch.float64)
    a = a.detach().to(torch.float64)
    c = w0.detach().to(torch.float64) @ a.T
    coords_b, coords_c = [u0.T @ b], [u0.T @ c]
    if m > p:  # U0 does not span R^m: range(W) may leave it along b
        rest = b - u0 @ coords_b[0]
        rest = rest - u0 @ (u0.T @ rest)  # twice: orthogonal to U0 to working precision
        q, sv, _ = torch.linalg.svd(rest, full_matrices=False)
        scale = float(torch.linalg.matrix_norm(b, 2)) if b.numel() else 0.0
        q = q[:, sv > OUTSIDE_RANGE_TOL * scale] if scale > 0 else q[:, :0]
        if q.shape[1]:
            coords_b.append(q.T @ b)
            coords_c.append(q.T @ c)
    coords_b, coords_c = torch.cat(coords_b), torch.cat(coords_c)
    cross = coords_c @ coords_b.T
    gram = cross + cross.T + coords_b @ (a @ a.T) @ coords_b.T
    gram.diagonal()[:p] += base.values ** 2
    _, vectors = torch.linalg.eigh(gram.to(torch.float32))  # ascending; float32: see the docstring
    top = vectors[:, -min(k, p):].flip(1).to(torch.float64)
    return top[:p].abs().max(dim=0).values


def update_intruders(base: BaseSpectrum, w0: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                     k: int = INTRUDER_TOP_K, threshold: float = INTRUDER_THRESHOLD) -> int:
    """:func:`intruder_dimensions` of W0 + b a, from W0's cached SVD and the update's factors (no m x n SVD)."""
    return int((top_left_cosines(base, w0, b, a, k) < threshold).sum())


def intruder_dimensions(w0: torch.Tensor, w: torch.Tensor, k: int = INTRUDER_TOP_K,
                        threshold: float = INTRUDER_THRESHOLD, base_vectors: torch.Tensor | None = None) -> int:
    """How many of the top-k left singular vectors of ``w`` (= W0 + dW) are intruders (Shuttleworth et al. 2024).

    An intruder has |cosine| below ``threshold`` with every left singular vector of ``w0``: a direction the
    pre-trained weight did not have. The definition and defaults are those of peft's
    ``reduce_intruder_dimension``. This is the definition by two full SVDs; the diagnostics use
    :func:`update_intruders`, which gives the same count from the update's factors.
    """
    u0 = left_singular_vectors(w0) if base_vectors is None else base_vectors
    u = left_singular_vectors(w)[:, :k]
    best = (u.T @ u0).abs().max(dim=1).values
    return int((best < threshold).sum())


def subspace_overlap(u_a: torch.Tensor, u_b: torch.Tensor) -> float:
    """||U_a^T U_b||_F^2 / min(k_a, k_b) for orthonormal columns: 1 for the same subspace, 0 for orthogonal ones."""
    k = min(u_a.shape[1], u_b.shape[1])
    return float((u_a.T.to(torch.float64) @ u_b.to(torch.float64)).pow(2).sum() / k) if k else float("nan")


def subspace_similarity(dw_a: torch.Tensor, dw_b: torch.Tensor, k: int = SIMILARITY_TOP_K) -> float:
    """Hu et al. 2021's normalised subspace similarity of the top-k left singular vectors of two updates.

    In [0, 1]; two random k-dimensional subspaces of R^d overlap by about k / d.
    """
    u_a = torch.linalg.svd(dw_a.detach().to(torch.float64), full_matrices=False)[0][:, :k]
    u_b = torch.linalg.svd(dw_b.detach().to(torch.float64), full_matrices=False)[0][:, :k]
    return subspace_overlap(u_a, u_b)


# ----------------------------------------------------------------------------------------------------------
# Convergence


def smoothed(losses: Sequence[tuple[int, float]], window: int | None = None) -> list[tuple[int, float]]:
    """A trailing rolling mean of a loss curve (window: about 1/10 of the run by default, at least 1)."""
    window = window or max(1, len(losses) // 10)
    values = [v for _, v in losses]
    return [(step, sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1]))
            for i, (step, _) in enumerate(losses)]


def steps_to_loss(losses: Sequence[tuple[int, float]], target: float, window: int | None = None) -> float:
    """The first step at which the smoothed loss is at or below ``target``; NaN if it never is."""
    return next((float(step) for step, value in smoothed(losses, window) if value <= target), float("nan"))


def steps_to_fraction(losses: Sequence[tuple[int, float]], fraction: float, window: int | None = None) -> float:
    """Steps to reach ``fraction`` of the final loss reduction (e.g. 0.9 for 90%), on the smoothed curve.

    The reduction runs from the first step's loss to the smoothed loss at the last step; NaN when the loss
    did not go down. Smoothing (see :func:`smoothed`) keeps one lucky batch from counting as convergence.
    """
    if not losses:
        return float("nan")
    curve = smoothed(losses, window)
    start, end = losses[0][1], curve[-1][1]
    if not end < start:
        return float("nan")
    return steps_to_loss(losses, start - fraction * (start - end), window)


# ----------------------------------------------------------------------------------------------------------
# The adapted layers and their updates


def adapted_layers(peft_model) -> dict[str, Any]:
    """Every LoRA layer of a peft model that carries the active adapter, by module name."""
    from peft.tuners.lora.layer import LoraLayer

    adapter = _active_adapter(peft_model)
    return {name: module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A}


def _active_adapter(peft_model) -> str:
    active = peft_model.active_adapter
    return active[0] if isinstance(active, (list, tuple)) else active


def delta_weights(peft_model) -> dict[str, torch.Tensor]:
    """The exact dW of each adapted layer, as merging computes it (peft's ``get_delta_weight``), by layer name."""
    adapter = _active_adapter(peft_model)
    with torch.no_grad():
        return {name: layer.get_delta_weight(adapter).detach() for name, layer in adapted_layers(peft_model).items()}


def delta_factors(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, a) with b @ a = the layer's dW, read from the same weights ``get_delta_weight`` multiplies.

    ``lora_A.weight`` is T A for the middle methods and the generated factor for CondLoRA, so this is every
    method's exact update in factored form: spectra then need an r x r SVD instead of a d_out x d_in one.
    """
    b = layer.lora_B[adapter].weight.detach() * layer.scaling[adapter]
    a = layer.lora_A[adapter].weight.detach()
    return (a.T, b.T) if getattr(layer, "fan_in_fan_out", False) else (b, a)


def update_norm_and_rank(layers: Mapping[str, Any], adapter: str) -> tuple[float, float]:
    """(||dW||_F over all layers together, mean effective rank over layers): cheap enough for every few steps.

    Never forms a d_out x d_in matrix: with b a = dW, ||dW||_F^2 = <b^T b, a a^T> and the squared singular
    values are the eigenvalues of C (a a^T) C with C = (b^T b)^(1/2), all r x r (float64, every layer in
    one batched eigendecomposition). Singular values below ~1e-8 of the largest are lost to rounding, which
    moves the effective rank by less than 1e-6.
    """
    squares, ranks = 0.0, []
    with torch.no_grad(), one_thread():
        by_rank: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for layer in layers.values():
            b, a = delta_factors(layer, adapter)
            b, a = b.to(torch.float64), a.to(torch.float64)
            by_rank.setdefault(a.shape[0], []).append((b.T @ b, a @ a.T))
        for grams in by_rank.values():  # (one group unless layers differ in rank)
            gb, ga = torch.stack([g for g, _ in grams]), torch.stack([g for _, g in grams])
            squares += float((gb * ga).sum())
            lam, vec = torch.linalg.eigh(gb)
            root = vec @ torch.diag_embed(lam.clamp(min=0).sqrt()) @ vec.transpose(1, 2)
            ranks += [effective_rank(s) for s in torch.linalg.eigvalsh(root @ ga @ root).clamp(min=0).sqrt()]
    finite = [x for x in ranks if not math.isnan(x)]
    return math.sqrt(max(squares, 0.0)), (sum(finite) / len(finite) if finite else float("nan"))


class DiagnosticsRecorder:
    """Records ||dW||_F and the mean effective rank every ``every`` steps; call :meth:`on_step` from training.

    ``on_step(step, loss, lr)`` has the signature of :func:`harness.train.train`'s callback and returns the
    metrics it recorded at that step (empty between records), so a caller can log them too.
    """

    def __init__(self, peft_model, every: int = RECORD_EVERY):
        self.adapter = _active_adapter(peft_model)
        self.layers = adapted_layers(peft_model)
        self.every = every
        self.delta_norms: list[tuple[int, float]] = []
        self.effective_ranks: list[tuple[int, float]] = []

    def on_step(self, step: int, loss: float | None = None, lr: float | None = None) -> dict[str, float]:
        if step != 1 and step % self.every:
            return {}
        return self.record(step)

    def record(self, step: int) -> dict[str, float]:
        """Measure now (also used once after the last step, which ``on_step`` may have skipped)."""
        if self.delta_norms and self.delta_norms[-1][0] == step:
            return {}
        norm, rank = update_norm_and_rank(self.layers, self.adapter)
        self.delta_norms.append((step, norm))
        self.effective_ranks.append((step, rank))
        return {"diag/delta_norm": norm, "diag/effective_rank": rank}


# ----------------------------------------------------------------------------------------------------------
# Curvature


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


# ----------------------------------------------------------------------------------------------------------
# Forgetting


def general_text(max_chars: int = 200_000) -> str:
    """Fixed general English prose that needs no network: the prose paragraphs of CPython's ``pydoc_data``.

    ``pydoc_data.topics`` ships with every CPython (it is what ``help("if")`` prints): the Python Language
    Reference's sections as plain text. Grammar rules, code examples (indented), headings and short lines
    are dropped; paragraphs come in the topics' sorted order, so the text is the same on every machine with
    the same Python version (diagnostics.md records its SHA-256). It is expository technical English, a
    different domain from the arithmetic the adapters learn.
    """
    from pydoc_data.topics import topics

    paragraphs: list[str] = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.strip("\n").splitlines()
            if not lines or any(line.startswith(" ") or not line.strip() for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if "::=" in text or len(text) < 200 or set(lines[-1].strip()) <= set("*=-"):
                continue
            paragraphs.append(text)
            if sum(len(p) + 2 for p in paragraphs) >= max_chars:
                return "\n\n".join(paragraphs)
    return "\n\n".join(paragraphs)


@dataclass
class GeneralTextSample:
    """``n`` sequences of ``length`` tokens of :func:`general_text`, and where they came from."""

    input_ids: torch.Tensor
    source: str
    sha256: str

    def describe(self) -> str:
        n, length = self.input_ids.shape
        return f"{n} sequences x {length} tokens of {self.source} (text SHA-256 {self.sha256[:12]})"


def general_text_sample(tokenizer, n_sequences: int = FORGETTING_SEQUENCES,
                        seq_len: int = FORGETTING_TOKENS) -> GeneralTextSample:
    """The forgetting sample: consecutive ``seq_len``-token windows of :func:`general_text`, no padding."""
    import sys

    text = general_text(max_chars=n_sequences * seq_len * 8)  # a token is well under 8 characters of prose
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # no "longer than the model" note
    n = min(n_sequences, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"the general-text sample has only {len(ids)} tokens, fewer than {seq_len}")
    windows = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    used = tokenizer.decode(windows.reshape(-1).tolist())
    source = f"CPython {sys.version.split()[0]} pydoc_data.topics (Python Language Reference prose)"
    return GeneralTextSample(windows, source, hashlib.sha256(used.encode()).hexdigest())


def mean_token_loss(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean per-token cross-entropy of next-token prediction over equal-length sequences, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    try:
        with torch.no_grad():
            for chunk in torch.split(input_ids, batch_size):
                chunk = chunk.to(device)
                losses.append(float(model(input_ids=chunk, labels=chunk).loss) * chunk.shape[0])
    finally:
        model.train(was_training)
    return sum(losses) / input_ids.shape[0]


# ----------------------------------------------------------------------------------------------------------
# One method and seed


def _fmt_spectrum(s: torch.Tensor) -> str:
    return " ".join(f"{float(x):.4g}" for x in s)


def _nanmean(values: Iterable[float]) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else float("nan")


def layer_rows(peft_model, base_spectra: dict[str, BaseSpectrum] | None = None,
               reference_vectors: Mapping[str, torch.Tensor] | None = None,
               vectors: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """One row per adapted layer: shape, delta_norm, effective_rank, stable_rank, singular_values, intruders,
    similarity_to_lora (when ``reference_vectors``, LoRA's :func:`top_left_vectors` of the same seed, is given).

    ``base_spectra`` caches W0's SVD by layer name across methods (they share W0): filled on first use. Given
    ``vectors``, it is filled with each layer's top left singular vectors of dW (for the similarity to LoRA).
    Everything comes from the update's factors b a = dW: its spectrum from an r x r core, the intruders from
    :func:`top_left_cosines`; no d_out x d_in matrix is decomposed, only W0 once.
    """
    adapter = _active_adapter(peft_model)
    base_spectra = {} if base_spectra is None else base_spectra
    rows = []
    with torch.no_grad(), one_thread():
        for name, layer in adapted_layers(peft_model).items():
            b, a = delta_factors(layer, adapter)
            qb, core, _ = _core(b, a)
            u, s, _ = torch.linalg.svd(core)
            top = qb @ u[:, :SIMILARITY_TOP_K]
            if vectors is not None:
                vectors[name] = top
            w0 = layer.get_base_layer().weight.detach()
            if name not in base_spectra:
                base_spectra[name] = base_spectrum(w0)
            row = {"layer": name, "shape": f"{b.shape[0]}x{a.shape[1]}", "delta_norm": float(s.pow(2).sum().sqrt()),
                   "effective_rank": effective_rank(s), "stable_rank": stable_rank(s),
                   "singular_values": _fmt_spectrum(s),
                   "intruders": update_intruders(base_spectra[name], w0, b, a)}
            if reference_vectors is not None and name in reference_vectors:
                row["similarity_to_lora"] = subspace_overlap(top, reference_vectors[name])
            rows.append(row)
    return rows


def top_left_vectors(peft_model, k: int = SIMILARITY_TOP_K) -> dict[str, torch.Tensor]:
    """The top-k left singular vectors of each layer's dW (for the similarity to LoRA), by layer name."""
    adapter = _active_adapter(peft_model)
    with torch.no_grad():
        return {name: product_left_vectors(*delta_factors(layer, adapter), k)
                for name, layer in adapted_layers(peft_model).items()}


def summary_row(rows: Sequence[dict]) -> dict:
    """The layer ``all`` row: ||dW||_F of the whole update, mean effective and stable rank, total intruders."""
    return {"layer": ALL_LAYERS, "shape": "",
            "delta_norm": math.sqrt(sum(r["delta_norm"] ** 2 for r in rows)),
            "effective_rank": _nanmean(r["effective_rank"] for r in rows),
            "stable_rank": _nanmean(r["stable_rank"] for r in rows),
            "singular_values": "",
            "intruders": sum(r["intruders"] for r in rows),
            "similarity_to_lora": _nanmean(r.get("similarity_to_lora", float("nan")) for r in rows)}


def diagnose(peft_model, *, method: str, seed: int, level: str = "basic", spec_method: str | None = None,
             losses: Sequence[tuple[int, float]] = (), lambda_max: float = float("nan"),
             forgetting_sample: GeneralTextSample | None = None, base_loss: float | None = None,
             base_spectra: dict[str, BaseSpectrum] | None = None,
             reference_vectors: Mapping[str, torch.Tensor] | None = None,
             vectors: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Diagnostics rows of one trained adapter: one per adapted layer, then the layer ``all`` row.

    ``level`` ``none`` gives no rows; ``basic`` and ``full`` the same rows (``full`` differs by
    ``lambda_max``, which must be measured before training: pass :func:`curvature_at_init`'s value).
    ``losses`` is the training curve (steps_to_50, steps_to_90, final_loss); with ``forgetting_sample`` the
    row's ``forgetting`` is its loss after training minus ``base_loss`` (measured with the adapter disabled
    when not given). ``base_spectra`` and ``vectors``: as in :func:`layer_rows`.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown diagnostics level {level!r}; one of {', '.join(LEVELS)}")
    if level == "none":
        return []
    rows = layer_rows(peft_model, base_spectra, reference_vectors, vectors)
    total = summary_row(rows)
    total.update({"lambda_max": lambda_max, "steps_to_50": steps_to_fraction(losses, 0.5),
                  "steps_to_90": steps_to_fraction(losses, 0.9),
                  "final_loss": smoothed(losses)[-1][1] if losses else float("nan")})
    if forgetting_sample is not None:
        if base_loss is None:
            with peft_model.disable_adapter():
                base_loss = mean_token_loss(peft_model, forgetting_sample.input_ids)
        total["forgetting"] = mean_token_loss(peft_model, forgetting_sample.input_ids) - base_loss
    common = {"method": method, "spec_method": spec_method or method.split(":", 1)[0].split("-", 1)[0],
              "seed": seed}
    return [{c: {**common, **row}.get(c, float("nan") if c not in ("shape", "singular_values") else "")
             for c in COLUMNS} for row in [*rows, total]]


# ----------------------------------------------------------------------------------------------------------
# A whole run


@dataclass
class Trace:
    """One (method, seed)'s training dynamics, as the report reads them (all lists of (step, value))."""

    method: str
    spec_method: str
    seed: int
    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    group_grad_norms: list = field(default_factory=list)
    delta_norms: list = field(default_factory=list)
    effective_ranks: list = field(default_factory=list)


def trace_of(method: str, seed: int, train_result, recorder: DiagnosticsRecorder | None = None,
             spec_method: str | None = None) -> Trace:
    """A :class:`Trace` from a :class:`harness.train.TrainResult` (its gradient-norm fields are read if present)."""
    return Trace(method, spec_method or method, seed, list(train_result.losses),
                 list(getattr(train_result, "grad_norms", None) or []),
                 list(getattr(train_result, "group_grad_norms", None) or []),
                 list(recorder.delta_norms) if recorder else [], list(recorder.effective_ranks) if recorder else [])


@dataclass
class MethodProbe:
    """What :meth:`RunDiagnostics.start` prepared for one method: the step recorder and the curvature at init."""

    recorder: DiagnosticsRecorder
    curvature: Eigenvalue | None = None
    problem: str | None = None  # why a measurement could not be made, for diagnostics.md

    def on_step(self, step: int, loss: float | None = None, lr: float | None = None) -> dict[str, float]:
        return self.recorder.on_step(step)


class RunDiagnostics:
    """The diagnostics of one run: :meth:`start` before each method trains, :meth:`finish` after, :meth:`write` last.

    Holds what methods share: W0's SVD (:class:`BaseSpectrum`, one per layer per run), the forgetting sample and the
    base model's loss on it, and each method's top singular vectors for the similarity to LoRA.
    """

    def __init__(self, level: str, tokenizer=None, examples: Sequence[dict] = (), collate=None, *,
                 record_every: int = RECORD_EVERY, hessian_examples: int = HESSIAN_EXAMPLES):
        if level not in LEVELS:
            raise ValueError(f"unknown diagnostics level {level!r}; one of {', '.join(LEVELS)}")
        self.level = level
        self.tokenizer, self.examples, self.collate = tokenizer, examples, collate
        self.record_every, self.hessian_examples = record_every, hessian_examples
        self.rows: list[dict] = []
        self.traces: list[Trace] = []
        self.failed: list[tuple[str, int]] = []
        self.problems: list[str] = []
        self.sample: GeneralTextSample | None = None
        self._base_loss: float | None = None
        self._base_spectra: dict[str, BaseSpectrum] = {}
        self._vectors: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    @property
    def enabled(self) -> bool:
        return self.level != "none"

    def start(self, peft_model, seed: int) -> MethodProbe:
        """Before training: the recorder, and at level ``full`` the Hessian's lambda_max at initialisation."""
        probe = MethodProbe(DiagnosticsRecorder(peft_model, self.record_every))
        if self.level == "full" and self.examples:
            try:
                probe.curvature = curvature_at_init(peft_model, self.examples, self.collate,
                                                    n_examples=self.hessian_examples, seed=seed)
            except Exception as err:  # noqa: BLE001 (a measurement must not cost the method its run)
                traceback.print_exc()
                probe.problem = f"lambda_max not measured: {type(err).__name__}: {err}"
        return probe

    def finish(self, probe: MethodProbe, peft_model, *, method: str, spec_method: str, seed: int,
               train_result) -> dict[str, float]:
        """After training: the rows of this method and seed; returns the ``diag/`` metrics of its ``all`` row.

        Log them at the last step: ``diag/delta_norm`` and ``diag/effective_rank`` are also the recorder's curves.
        A measurement that fails is reported (traceback on stderr, a line in diagnostics.md) and costs the
        method nothing else: its training and evaluation go on.
        """
        if probe.problem:
            self.problems.append(f"{method} seed {seed}: {probe.problem}")
        try:
            return self._measure(probe, peft_model, method, spec_method, seed, train_result)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            self.problems.append(f"{method} seed {seed}: not measured: {type(err).__name__}: {err}")
            return {}

    def _measure(self, probe: MethodProbe, peft_model, method: str, spec_method: str, seed: int,
                 train_result) -> dict[str, float]:
        probe.recorder.record(train_result.steps)
        if self.tokenizer is not None and self.sample is None:
            self.sample = general_text_sample(self.tokenizer)
        if self.sample is not None and self._base_loss is None:
            with peft_model.disable_adapter():  # every method shares the base model: measure it once
                self._base_loss = mean_token_loss(peft_model, self.sample.input_ids)
        lambda_max = probe.curvature.value if probe.curvature else float("nan")
        vectors: dict[str, torch.Tensor] = {}
        rows = diagnose(peft_model, method=method, seed=seed, level=self.level, spec_method=spec_method,
                        losses=train_result.losses, lambda_max=lambda_max, forgetting_sample=self.sample,
                        base_loss=self._base_loss, base_spectra=self._base_spectra, vectors=vectors)
        self._vectors[(method, seed)] = vectors
        self.rows.extend(rows)
        self.traces.append(trace_of(method, seed, train_result, probe.recorder, spec_method))
        metrics = {f"diag/{k}": v for k, v in rows[-1].items() if k not in ("method", "spec_method", "seed", "layer")
                   and isinstance(v, (int, float))}
        if probe.curvature:
            metrics.update({"diag/lambda_max_residual": probe.curvature.residual,
                            "diag/lambda_max_iterations": probe.curvature.iterations})
        return metrics

    def record_failure(self, method: str, seed: int) -> None:
        """A run that failed: listed in diagnostics.md, never silently dropped."""
        self.failed.append((method, seed))

    def fill_similarity(self) -> None:
        """similarity_to_lora of every row whose seed has a LoRA run (LoRA may train after the others)."""
        reference = _reference_label(self.rows)
        for row_seed in {r["seed"] for r in self.rows}:
            lora = self._vectors.get((reference, row_seed))
            if lora is None:
                continue
            for row in (r for r in self.rows if r["seed"] == row_seed and r["layer"] != ALL_LAYERS):
                row["similarity_to_lora"] = subspace_overlap(self._vectors[(row["method"], row_seed)][row["layer"]],
                                                             lora[row["layer"]])
            for row in (r for r in self.rows if r["seed"] == row_seed and r["layer"] == ALL_LAYERS):
                row["similarity_to_lora"] = _nanmean(r["similarity_to_lora"] for r in self.rows
                                                     if r["seed"] == row_seed and r["method"] == row["method"]
                                                     and r["layer"] != ALL_LAYERS)

    def write(self, run_dir: str | os.PathLike) -> dict[str, Path]:
        """diagnostics.csv, diagnostics.md and the PNGs into ``run_dir``; nothing when the level is ``none``."""
        if not self.enabled:
            return {}
        self.fill_similarity()
        return write_diagnostics(run_dir, self.rows, self.traces, failed=self.failed, level=self.level,
                                 sample=self.sample.describe() if self.sample else None, problems=self.problems)


def _reference_label(rows: Sequence[dict]) -> str | None:
    """The method that stands for LoRA: the label ``lora`` if present, else the first plain-LoRA method."""
    labels = list(dict.fromkeys(r["method"] for r in rows))
    if "lora" in labels:
        return "lora"
    return next((r["method"] for r in rows if r["spec_method"] == "lora"), None)


# ----------------------------------------------------------------------------------------------------------
# The paper's claims, answered


@dataclass(frozen=True)
class Comparison:
    """A method against LoRA on one measure, paired by seed: the differences and what they say."""

    measure: str
    method_values: list
    lora_values: list
    predicted: int  # +1: the claim predicts the method's value is larger than LoRA's; -1: smaller

    @property
    def differences(self) -> list[float]:
        return [m - l for m, l in zip(self.method_values, self.lora_values)
                if not (math.isnan(m) or math.isnan(l))]

    def interval(self) -> tuple[float, float, float]:
        """Mean paired difference and its 95% Student-t interval over seeds (NaN bounds below 2 seeds)."""
        d = self.differences
        if not d:
            return float("nan"), float("nan"), float("nan")
        mean = sum(d) / len(d)
        if len(d) < 2:
            return mean, float("nan"), float("nan")
        from scipy.stats import t

        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
        half = float(t.ppf(0.5 + CONFIDENCE / 2, len(d) - 1)) * sd / math.sqrt(len(d))
        return mean, mean - half, mean + half

    def verdict(self) -> str:
        """supported / not supported when the interval excludes 0 (in the predicted / the other direction)."""
        n = len(self.differences)
        mean, low, high = self.interval()
        if n < 2 or math.isnan(low):
            return f"inconclusive at {n} seed{'s' if n != 1 else ''}"
        if (low > 0 and self.predicted > 0) or (high < 0 and self.predicted < 0):
            return "supported"
        if (low > 0 and self.predicted < 0) or (high < 0 and self.predicted > 0):
            return "not supported"
        if low == high == 0.0:  # every seed gave exactly LoRA's value
            return "not supported"
        return f"inconclusive at {n} seeds"


def _mean_sd(values: Sequence[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return f"{mean:.3g}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
    return f"{mean:.3g} ± {sd:.2g}"


def _at_step(series: Sequence[tuple[int, float]], step: float) -> float:
    """The recorded value nearest to ``step`` (NaN without records or for a NaN step)."""
    if not series or math.isnan(step):
        return float("nan")
    return min(series, key=lambda item: abs(item[0] - step))[1]


def matched_loss_targets(traces: Sequence[Trace]) -> dict[int, float]:
    """Per seed, the highest final (smoothed) training loss among the methods: a loss every method reached."""
    targets: dict[int, float] = {}
    for trace in traces:
        if trace.losses:
            final = smoothed(trace.losses)[-1][1]
            targets[trace.seed] = max(targets.get(trace.seed, -math.inf), final)
    return targets


def _mean_grad_norm(trace: Trace) -> float:
    """Mean over steps of the adapter's total gradient norm before clipping (from the groups if need be)."""
    if trace.grad_norms:
        return _nanmean(v for _, v in trace.grad_norms)
    if trace.group_grad_norms:
        return _nanmean(math.sqrt(sum(v ** 2 for g, v in groups.items() if g != "other"))
                        for _, groups in trace.group_grad_norms)
    return float("nan")


def claim_comparisons(rows: Sequence[dict], traces: Sequence[Trace]) -> dict[str, dict[str, list[Comparison]]]:
    """For each of the three claims and each method other than LoRA, its comparisons with LoRA (paired by seed).

    Claim 1 (effective rank of updates): the mean effective rank of dW at the end, and at matched training
    loss (the step where the smoothed loss first reaches the run's matched-loss target, nearest record).
    Claim 2 (more optimisation paths): the mean gradient norm reaching the adapter, a consequence the claim
    implies (more paths carrying gradient to the same factors). Claim 3 (faster convergence): steps to the
    matched loss and steps to 90% of the method's own final loss reduction. The verdict of a claim rests on
    its first comparison that has data (the matched-loss rank needs the recorder's curve).
    """
    reference = _reference_label(rows)
    totals = {(r["method"], r["seed"]): r for r in rows if r["layer"] == ALL_LAYERS}
    by_key = {(t.method, t.seed): t for t in traces}
    targets = matched_loss_targets(traces)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != reference]
    claims: dict[str, dict[str, list[Comparison]]] = {"rank": {}, "paths": {}, "convergence": {}}
    if reference is None:
        return claims
    for method in methods:
        seeds = sorted(s for (m, s) in totals if m == method and (reference, s) in totals)

        def values(fn, who):
            return [fn(who, s) for s in seeds]

        def total(col):
            return lambda who, s: float(totals[(who, s)][col])

        def trace_value(fn):
            return lambda who, s: fn(by_key[(who, s)], s) if (who, s) in by_key else float("nan")

        rank_at_match = trace_value(lambda t, s: _at_step(t.effective_ranks, steps_to_loss(t.losses, targets[s])))
        steps_at_match = trace_value(lambda t, s: steps_to_loss(t.losses, targets[s]))
        grad = trace_value(lambda t, s: _mean_grad_norm(t))

        def compare(name, fn, predicted):
            return Comparison(name, values(fn, method), values(fn, reference), predicted)

        claims["rank"][method] = [compare("effective rank of dW at matched training loss", rank_at_match, +1),
                                  compare("effective rank of dW at the end of training", total("effective_rank"), +1)]
        claims["paths"][method] = [compare("mean gradient norm reaching the adapter (before clipping)", grad, +1)]
        claims["convergence"][method] = [compare("steps to the matched training loss", steps_at_match, -1),
                                         compare("steps to 90% of its own final loss reduction",
                                                 total("steps_to_90"), -1)]
    return claims


CLAIMS = {
    "rank": "LinChain \"expands the effective rank of updates\"",
    "paths": "LinChain gives \"more optimization paths\"",
    "convergence": "LinChain gives \"faster convergence\"",
}


def claims_markdown(rows: Sequence[dict], traces: Sequence[Trace]) -> str:
    """The section that opens diagnostics.md: each claim, the evidence per method, a verdict."""
    comparisons = claim_comparisons(rows, traces)
    reference = _reference_label(rows)
    lines = ["## The paper's claims, answered", ""]
    if reference is None:
        return "\n".join(lines + ["LoRA is not in this run, so none of the claims (each is relative to LoRA) "
                                  "can be checked. Add `lora` to `--methods`.", ""])
    targets = matched_loss_targets(traces)
    lines += [f"Each method is compared with `{reference}` trained with the same seed (paired differences, "
              f"method minus {reference}; 95% Student-t interval over seeds). A verdict is *supported* when "
              "the interval excludes 0 in the direction the claim predicts, *not supported* when it excludes "
              "0 in the other direction, and *inconclusive* otherwise or below 2 seeds. The verdict (on its "
              "row) rests on the first measure of each claim that was measured. Matched training loss: per seed, the highest final "
              "smoothed training loss among the methods (" + ", ".join(f"seed {s}: {v:.3f}"
                                                                     for s, v in sorted(targets.items()))
              + "), a loss every method reached.", ""]
    no_grads = all(not t.grad_norms and not t.group_grad_norms for t in traces)
    for key, title in CLAIMS.items():
        lines += [f"### {title}", "", f"| method | measure | method | {reference} | difference (95% CI) | verdict |",
                  "|---|---|---|---|---|---|"]
        for method, comps in comparisons[key].items():
            rests_on = next((i for i, comp in enumerate(comps) if comp.differences), 0)
            for i, comp in enumerate(comps):
                mean, low, high = comp.interval()
                ci = "n/a" if math.isnan(mean) else (f"{mean:+.3g}" + ("" if math.isnan(low)
                                                                          else f" [{low:+.3g}, {high:+.3g}]"))
                verdict = comp.verdict() if i == rests_on else ""
                if key == "paths" and no_grads:
                    verdict = "not measured: the training loop recorded no gradient norms"
                lines.append(f"| {method} | {comp.measure} | {_mean_sd(comp.method_values)} | "
                             f"{_mean_sd(comp.lora_values)} | {ci} | {verdict} |")
        lines.append("")
    lines += ["Every method here reaches the same set of updates (rank(B T A) <= r, each exports to a plain "
              "rank-r LoRA), so a difference can only come from training dynamics: the scale the middle "
              "matrices give the update, the curvature at initialisation (lambda_max, level `full`), the "
              "learning rate each method was given.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Files


def _table_markdown(rows: Sequence[dict]) -> list[str]:
    """Per method, mean ± sd over seeds of the ``all`` row's columns."""
    columns = ("delta_norm", "effective_rank", "stable_rank", "intruders", "similarity_to_lora", "lambda_max",
               "forgetting", "steps_to_50", "steps_to_90", "final_loss")
    totals = [r for r in rows if r["layer"] == ALL_LAYERS]
    lines = ["| method | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for method in dict.fromkeys(r["method"] for r in totals):
        mine = [r for r in totals if r["method"] == method]
        cells = [_mean_sd([float(r[c]) for r in mine]) for c in columns]
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    return lines


def diagnostics_markdown(rows: Sequence[dict], traces: Sequence[Trace], *, failed: Sequence[tuple[str, int]] = (),
                         level: str = "basic", sample: str | None = None, problems: Sequence[str] = ()) -> str:
    lines = ["# Diagnostics", "", claims_markdown(rows, traces), "## All measurements", "",
             "Means ± sd over seeds of the layer `all` rows of diagnostics.csv: delta_norm is ||dW||_F of the "
             "whole update, effective_rank and stable_rank are means over the adapted layers, intruders the "
             "total over layers (top 10 singular vectors, threshold 0.5), similarity_to_lora the mean over "
             f"layers (top {SIMILARITY_TOP_K} left singular vectors), steps in optimizer steps. "
             "What each number means: docs/diagnostics.md.", "", *_table_markdown(rows), ""]
    if level != "full":
        lines.append("lambda_max was not measured (level `basic`; `--diagnostics full` adds it).")
    else:
        lines.append(f"lambda_max: largest Hessian eigenvalue of the training loss w.r.t. the adapter parameters "
                     f"at initialisation, {HESSIAN_EXAMPLES} training examples, fp32, Lanczos to a relative "
                     f"residual of {HESSIAN_TOL:g} (at most {HESSIAN_MAX_ITER} iterations).")
    if sample:
        lines.append(f"forgetting: mean per-token cross-entropy after training minus before (adapter disabled) on {sample}.")
    if failed:
        lines += ["", "Failed runs (no diagnostics; not in the statistics): "
                  + ", ".join(f"{m} seed {s}" for m, s in failed) + "."]
    if problems:
        lines += ["", "Measurements that could not be made:", *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n"


def write_diagnostics(run_dir: str | os.PathLike, rows: Sequence[dict], traces: Sequence[Trace], *,
                      failed: Sequence[tuple[str, int]] = (), level: str = "basic",
                      sample: str | None = None, problems: Sequence[str] = ()) -> dict[str, Path]:
    """Write diagnostics.csv, diagnostics.md, spectra.png, grad_norms.png and convergence.png, atomically."""
    import csv

    from harness.fsutil import atomic_path, write_text_atomic

    run_dir = Path(run_dir)
    written: dict[str, Path] = {}
    with atomic_path(run_dir / "diagnostics.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows([{c: (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in COLUMNS}
                              for r in rows])
    written["diagnostics.csv"] = run_dir / "diagnostics.csv"
    written["diagnostics.md"] = write_text_atomic(
        run_dir / "diagnostics.md",
        diagnostics_markdown(rows, traces, failed=failed, level=level, sample=sample, problems=problems))
    written["spectra.png"] = plot_spectra(rows, run_dir / "spectra.png")
    written["grad_norms.png"] = plot_grad_norms(traces, run_dir / "grad_norms.png")
    written["convergence.png"] = plot_convergence(traces, run_dir / "convergence.png")
    return written


# ----------------------------------------------------------------------------------------------------------
# Plots


def _colours(plt, methods: Sequence[str]) -> dict[str, Any]:
    return {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}


def _legend(ax) -> None:
    """A legend when something labelled was drawn (matplotlib warns about an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _mean_series(series: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """The mean over runs of (step, value) series, at the steps they share."""
    common = sorted(set.intersection(*[{s for s, _ in one} for one in series])) if series else []
    maps = [dict(one) for one in series]
    return common, [sum(m[s] for m in maps) / len(maps) for s in common]


def plot_spectra(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Normalised spectra s_i / s_1 of dW per method: the mean over layers and seeds, index i on the x axis."""
    from harness.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    layers = [r for r in rows if r["layer"] != ALL_LAYERS and r["singular_values"]]
    methods = list(dict.fromkeys(r["method"] for r in layers))
    colours = _colours(plt, methods)
    for method in methods:
        spectra = [[float(x) for x in r["singular_values"].split()] for r in layers if r["method"] == method]
        spectra = [[x / s[0] for x in s] for s in spectra if s and s[0] > 0]
        if not spectra:
            continue
        width = min(len(s) for s in spectra)
        mean = [sum(s[i] for s in spectra) / len(spectra) for i in range(width)]
        erank = _nanmean(r["effective_rank"] for r in layers if r["method"] == method)
        ax.plot(range(1, width + 1), mean, marker="o", markersize=3, color=colours[method],
                label=f"{method} (effective rank {erank:.1f})")
    if layers and all(len(r["singular_values"].split()) <= 32 for r in layers):
        ax.set_xticks(range(1, max(len(r["singular_values"].split()) for r in layers) + 1))
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("s_i / s_1 (mean over layers and seeds)")
    ax.set_title("Normalised spectra of the updates dW", fontsize=10)
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return save_figure(fig, path)


def plot_grad_norms(traces: Sequence[Trace], path: str | os.PathLike) -> Path:
    """Gradient norm of each parameter group (A, middle, B, cond) per step, one line per method (mean over seeds)."""
    from harness.report import pyplot, save_figure

    plt = pyplot()
    groups = [g for g in ("A", "middle", "B", "cond")
              if any(g in gs for t in traces for _, gs in t.group_grad_norms)]
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4 * max(len(groups), 1), 4), dpi=120, squeeze=False)
    methods = list(dict.fromkeys(t.method for t in traces))
    colours = _colours(plt, methods)
    for ax, group in zip(axes[0], groups):
        for method in methods:
            series = [[(s, gs[group]) for s, gs in t.group_grad_norms if group in gs]
                      for t in traces if t.method == method]
            series = [s for s in series if s]
            if series:
                steps, values = _mean_series(series)
                ax.plot(steps, values, color=colours[method], label=method, linewidth=1)
        if any(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")  # (a group whose gradients are all zero, e.g. LoRA's A at step 1, stays linear)
        ax.set_title(f"group {group}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("gradient norm before clipping (mean over seeds)")
    if groups:
        _legend(axes[0][0])
    else:
        axes[0][0].text(0.5, 0.5, "no per-group gradient norms were recorded", ha="center", va="center",
                        transform=axes[0][0].transAxes)
    return save_figure(fig, path)


def plot_convergence(traces: Sequence[Trace], path: str | os.PathLike) -> Path:
    """Left: the fraction of its final loss reduction each method has reached; right: ||dW||_F per step."""
    from harness.report import pyplot, save_figure

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    methods = list(dict.fromkeys(t.method for t in traces))
    colours = _colours(plt, methods)
    for method in methods:
        mine = [t for t in traces if t.method == method and t.losses]
        fractions = []
        for t in mine:
            curve = smoothed(t.losses)
            start, end = t.losses[0][1], curve[-1][1]
            if end < start:
                fractions.append([(s, (start - v) / (start - end)) for s, v in curve])
        if fractions:
            steps, values = _mean_series(fractions)
            left.plot(steps, values, color=colours[method], label=method)
        norms = [t.delta_norms for t in mine if t.delta_norms]
        if norms:
            steps, values = _mean_series(norms)
            right.plot(steps, values, color=colours[method], marker="o", markersize=3, label=method)
    for level in (0.5, 0.9):
        left.axhline(level, color="0.5", linestyle=":", linewidth=1)
    left.set_xlabel("optimizer step")
    left.set_ylabel("fraction of the final loss reduction (smoothed)")
    left.set_title("Convergence (mean over seeds)", fontsize=10)
    right.set_xlabel("optimizer step")
    right.set_ylabel("||dW||_F over all adapted layers")
    right.set_title("Size of the update", fontsize=10)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        _legend(ax)
    return save_figure(fig, path)


def plot_lr_vs_curvature(points: Iterable[Mapping[str, Any] | tuple[str, float, float]],
                         path: str | os.PathLike) -> Path:
    """A fair study's chosen learning rate against 1 / lambda_max, per method (log-log).

    ``points`` are ``(method, lr, lambda_max)`` tuples or mappings with those keys (diagnostics rows with an
    ``lr`` added). Several points of one method (seeds) are drawn as one colour. The dotted line lr = 2 /
    lambda_max is gradient descent's stability edge, for orientation only: AdamW's effective step differs.
    """
    from harness.report import pyplot, save_figure

    triples = [(p["method"], float(p["lr"]), float(p["lambda_max"])) if isinstance(p, Mapping) else
               (p[0], float(p[1]), float(p[2])) for p in points]
    triples = [(m, lr, lam) for m, lr, lam in triples if lam > 0 and lr > 0]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    methods = list(dict.fromkeys(m for m, _, _ in triples))
    colours = _colours(plt, methods)
    for method in methods:
        xs = [1 / lam for m, _, lam in triples if m == method]
        ys = [lr for m, lr, _ in triples if m == method]
        ax.scatter(xs, ys, color=colours[method], label=method)
    if triples:
        xs = sorted(1 / lam for _, _, lam in triples)
        ax.plot(xs, [2 * x for x in xs], color="0.5", linestyle=":", linewidth=1, label="lr = 2 / lambda_max")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _legend(ax)
    ax.set_xlabel("1 / lambda_max (Hessian at initialisation)")
    ax.set_ylabel("chosen learning rate")
    ax.set_title("Chosen learning rate against curvature", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    return save_figure(fig, path)
