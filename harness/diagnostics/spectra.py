"""The linear algebra of an adapter's update dW = b a: its spectrum, intruder dimensions and subspaces.

Every method here updates a frozen layer by dW = s B T A of rank at most r. Everything is computed from
the factors (b = s B, a = T A, read by :func:`delta_factors`): the spectrum from an r x r core, the intruder
count from W0's SVD (once per layer per run or study worker) and r-column products (:func:`top_left_cosines`), the
recorder's ||dW||_F and effective rank from r x r Gram matrices; no d_out x d_in matrix is decomposed but W0.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from harness.adapters.spec import INITIAL_FACTORS_ATTR


INTRUDER_TOP_K = 10
INTRUDER_THRESHOLD = 0.5
SIMILARITY_TOP_K = 4
RECORD_EVERY = 10


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



def product_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(left singular vectors, singular values) of b @ a (b: m x r, a: r x n), float64, largest first.

    From the r x r core of :func:`_core`: exact, without the m x n SVD. The vectors are m x r.
    """
    qb, core, _ = _core(b, a)
    u, s, _ = torch.linalg.svd(core)
    return qb @ u, s


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
    """The intruder count of W0 + b a (the definition by two full SVDs: top-k left singular vectors of W0 + b a with
    |cosine| below ``threshold`` with every one of W0's), from W0's cached SVD and the update's factors (no m x n SVD)."""
    return int((top_left_cosines(base, w0, b, a, k) < threshold).sum())


def subspace_overlap(u_a: torch.Tensor, u_b: torch.Tensor) -> float:
    """||U_a^T U_b||_F^2 / min(k_a, k_b) for orthonormal columns: 1 for the same subspace, 0 for orthogonal ones."""
    k = min(u_a.shape[1], u_b.shape[1])
    return float((u_a.T.to(torch.float64) @ u_b.to(torch.float64)).pow(2).sum() / k) if k else float("nan")


def adapted_layers(peft_model) -> dict[str, Any]:
    """Every LoRA layer of a peft model that carries the active adapter, by module name."""
    from peft.tuners.lora.layer import LoraLayer

    adapter = _active_adapter(peft_model)
    return {name: module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A}


def _active_adapter(peft_model) -> str:
    active = peft_model.active_adapter
    return active[0] if isinstance(active, (list, tuple)) else active


def initial_factors(layer, adapter: str):
    """(B0, A0) that PiSSA/OLoRA took out of this layer's W0 (set by harness.adapters.api), or None."""
    return getattr(layer, INITIAL_FACTORS_ATTR, {}).get(adapter)


def delta_factors(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, a) with b @ a = the layer's dW, read from the same weights ``get_delta_weight`` multiplies
    (for PiSSA, whose base layer is W0 less its initial s B0 A0, the update to W0 itself: rank up to 2r).

    ``lora_A.weight`` is T A for the middle methods and the generated factor for CondLoRA, so this is every
    method's exact update in factored form: spectra then need an r x r SVD instead of a d_out x d_in one.
    """
    b = layer.lora_B[adapter].weight.detach() * layer.scaling[adapter]
    a = layer.lora_A[adapter].weight.detach()
    initial = initial_factors(layer, adapter)
    if initial is not None:  # PiSSA: the base layer holds W0 - s B0 A0, so the update to W0 is s (B A - B0 A0)
        b0, a0 = initial
        b = torch.cat([b, -b0.to(b) * layer.scaling[adapter]], dim=1)
        a = torch.cat([a, a0.to(a)], dim=0)
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
    return math.sqrt(max(squares, 0.0)), (sum(finite) / len(finite) if finite else math.nan)


def update_movement(before: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    after: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """||dW_after - dW_before||_F over all layers together, from the factors (b, a) of each layer's dW = b a.

    ||b1 a1 - b2 a2||^2 = ||b1 a1||^2 + ||b2 a2||^2 - 2 <b1 a1, b2 a2>, each term a sum over r x r products
    (<b1 a1, b2 a2> = sum((b1^T b2) * (a1 a2^T))), in float64: no d_out x d_in matrix is formed.
    """
    squares = 0.0
    with torch.no_grad():
        for name, (b2, a2) in after.items():
            b1, a1 = before[name]
            squares += float(((b1.T @ b1) * (a1 @ a1.T)).sum() + ((b2.T @ b2) * (a2 @ a2.T)).sum()
                             - 2 * ((b1.T @ b2) * (a1 @ a2.T)).sum())
    return math.sqrt(max(squares, 0.0))


class GradientCapture:
    """The full-weight gradient dL/dW0 of every adapted layer over one optimizer step, and dW before it.

    A forward hook on each adapted layer keeps its input x; a hook on the layer's output gradient g adds
    g^T x (summed over tokens, and over the micro-batches of gradient accumulation) - exactly what the frozen
    base weight's ``.grad`` would be if it were trained, the direction full fine-tuning would step along, in
    the layer's (d_out, d_in) orientation. Forward passes without gradients (evaluation) add nothing.
    :meth:`close` removes the hooks.
    """

    def __init__(self, layers: Mapping[str, Any], adapter: str):
        self.layers = layers
        self.before = _factors(layers, adapter)
        self.grads: dict[str, torch.Tensor] = {}
        self.failed: str | None = None  # why the capture gave up (a measurement never costs a method its run)
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def forward(module, inputs, output):
            if self.failed or not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                                   and output.requires_grad and inputs and isinstance(inputs[0], torch.Tensor)):
                return
            x = inputs[0].detach()

            def backward(g):
                if self.failed:
                    return
                try:
                    full = g.detach().reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                    self.grads[name] = self.grads[name] + full if name in self.grads else full
                except Exception as err:  # noqa: BLE001 (out of memory, an odd layer): drop the measurement only
                    self.failed = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    self.grads.clear()

            output.register_hook(backward)
        return forward

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _factors(layers: Mapping[str, Any], adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        return {name: tuple(x.to(torch.float64).clone() for x in delta_factors(layer, adapter))
                for name, layer in layers.items()}


def gradient_alignment(before: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       after: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       grads: Mapping[str, torch.Tensor], layers: Mapping[str, Any]) -> float:
    """cos(dW_after - dW_before, -G) over all layers together: how much of full fine-tuning's steepest-descent
    direction one optimizer step of the adapter followed.

    A cosine: the length of this step cancels, which is why it can test "more optimization paths" where the
    step's size cannot (the rate still shapes the trajectory the step is taken from). <b a, G> = sum(b * (G a^T)) with r-column products, ||dW_after -
    dW_before|| from :func:`update_movement`; NaN when the step or the gradient is zero.
    """
    inner, grad_sq = 0.0, 0.0
    with torch.no_grad():
        for name, full in grads.items():
            g = full.to(torch.float64)
            if getattr(layers[name], "fan_in_fan_out", False):
                g = g.T  # delta_factors gives dW in the stored weight's orientation there
            (b1, a1), (b2, a2) = before[name], after[name]
            inner += float((b2 * (g @ a2.T)).sum() - (b1 * (g @ a1.T)).sum())
            grad_sq += float((g * g).sum())
    step = update_movement({n: before[n] for n in grads}, {n: after[n] for n in grads})
    if step == 0 or grad_sq == 0:
        return math.nan
    return -inner / (step * math.sqrt(grad_sq))


# The step-direction cosine holds the full-weight gradient of every adapted layer for one step (fp32): at most
# this much (SmolLM2-135M with q,k,v,up,down: about 280 MB); a larger model is not measured, and its claim says so.
ALIGNMENT_MAX_BYTES = 2 * 1024 ** 3


def full_gradient_bytes(layers: Mapping[str, Any]) -> int:
    """The bytes an fp32 copy of every adapted layer's full weight takes (what :class:`GradientCapture` holds)."""
    return sum(4 * layer.get_base_layer().weight.numel() for layer in layers.values())


class DiagnosticsRecorder:
    """Records ||dW||_F, the mean effective rank, how far dW moved and along what, every ``every`` steps.

    Call :meth:`on_step` from training. ``movements`` holds (step, ||dW_step - dW_previous||_F / steps
    between the two records): the distance the update itself travelled per optimizer step, which is what
    the optimizer's step sets (under Adam the gradient norm does not). ``alignments`` holds (step, the
    cosine between that step's change of dW and the negative full-weight gradient of its batch,
    :func:`gradient_alignment`): a direction, which the step size does not set; recorded where the layers'
    full-weight gradients fit in :data:`ALIGNMENT_MAX_BYTES`. ``on_step(step, loss, lr)``
    has the signature of :func:`harness.train.train`'s callback and returns the metrics it recorded at that
    step (empty between records), so a caller can log them too.
    """

    def __init__(self, peft_model, every: int = RECORD_EVERY, alignment: bool = True):
        self.adapter = _active_adapter(peft_model)
        self.layers = adapted_layers(peft_model)
        self.every = every
        # the captured G is one fp32 d_out x d_in matrix per adapted layer: within the budget, or not measured
        self.alignment = alignment and full_gradient_bytes(self.layers) <= ALIGNMENT_MAX_BYTES
        self.delta_norms: list[tuple[int, float]] = []
        self.effective_ranks: list[tuple[int, float]] = []
        self.movements: list[tuple[int, float]] = []
        self.alignments: list[tuple[int, float]] = []
        self._previous: tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._capture: GradientCapture | None = None
        self.alignment_failed: str | None = None

    def on_step(self, step: int, loss: float | None = None, lr: float | None = None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self._capture is not None:  # the step just taken was captured: its direction against -G
            capture, self._capture = self._capture, None
            capture.close()
            if capture.failed:  # the hooks could not keep G (memory): no cosine for the rest of this run
                self.alignment, self.alignment_failed = False, capture.failed
            elif capture.grads:
                value = gradient_alignment(capture.before, _factors(self.layers, self.adapter), capture.grads,
                                           self.layers)
                self.alignments.append((step, value))
                metrics["diag/alignment"] = value
        if self.alignment and self.layers and (step + 1) % self.every == 0:  # the next step is a record step
            self._capture = GradientCapture(self.layers, self.adapter)
        if step != 1 and step % self.every:
            return metrics
        return {**metrics, **self.record(step)}

    def close(self) -> None:
        """Remove any gradient hooks still armed (a run that stopped between the arming and the next step)."""
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    def record(self, step: int) -> dict[str, float]:
        """Measure now (also used once after the last step, which ``on_step`` may have skipped)."""
        if self.delta_norms and self.delta_norms[-1][0] == step:
            return {}
        norm, rank = update_norm_and_rank(self.layers, self.adapter)
        self.delta_norms.append((step, norm))
        self.effective_ranks.append((step, rank))
        metrics = {"diag/delta_norm": norm, "diag/effective_rank": rank}
        factors = _factors(self.layers, self.adapter)
        if self._previous is not None and step > self._previous[0]:
            moved = update_movement(self._previous[1], factors) / (step - self._previous[0])
            self.movements.append((step, moved))
            metrics["diag/movement"] = moved
        self._previous = (step, factors)
        return metrics
