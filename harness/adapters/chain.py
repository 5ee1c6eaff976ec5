"""MoSLoRA, LinChain and MTLoRA: a learnable middle T between LoRA's A and B.

All three compute, for a frozen linear layer y = x W0^T,

    y = x W0^T + s * x A^T T^T B^T,      dW = s * B T A,

with A of shape (r, d_in), B of shape (d_out, r), s = alpha / r, and T an r x r
matrix built from the method's middle matrices:

- MoSLoRA (Wu et al. 2024, arXiv 2406.11909):      T = M                (one r x r mixer)
- LinChain-n (Wang et al. 2024, arXiv 2411.00039): T = W_n ... W_2 W_1  (W_i of shape h_i x h_{i-1},
  widths r = h_0 -> h_1 -> ... -> h_n = r)
- MTLoRA (Liang et al., arXiv 2403.07440):         SHIM T = C, ICFM T = C C^T, CTCM T = C D, DTSM T = C + D

MoSLoRA and MTLoRA-SHIM are a chain of one, LinChain-2 and MTLoRA-CTCM a chain of
two (W_1 = D, W_2 = C): they share the ``chain`` product here and differ only in
how they are named and started. Which product a method uses, the middle matrices'
shapes and which of them start at zero under identity init are one table,
:data:`harness.adapters.spec.MIDDLE_PRODUCTS`; this module only reads it.

With ``bias=true`` (MoSLoRA, LinChain) every chain matrix is affine, z -> W_i z + b_i,
as in the LinChain authors' released code, so the adapter adds s * B c with
c = b_n + W_n b_{n-1} + ... + W_n ... W_2 b_1 on top of s * B T A x. That constant term
has no place in a bias-free base layer: such an adapter trains, saves and loads, but
neither merges nor exports as a plain LoRA.

T is folded into A: the layer's ``lora_A`` is a :class:`MiddleFactor` whose
``weight`` is the product T A (r x d_in). peft's own LoRA code then runs
unchanged: forward is ``lora_B(lora_A(dropout(x)))``, merging adds
``s * B.weight @ A.weight`` = s B T A exactly, and the adapter converts to a plain
rank-r LoRA by reading ``lora_A.weight``. Folding costs one r x r x d_in product per
forward, far less than the activations' x A^T (tokens x d_in x r).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


from harness.adapters.spec import AdapterSpec, MiddleProduct


def init_middle_(matrices: list[torch.Tensor], init: str, product: MiddleProduct, generator: torch.Generator) -> None:
    """Initialise the middle matrices in place.

    ``kaiming``: each matrix Kaiming-uniform with a = sqrt(5), the call peft uses for A (the papers' choice).
    ``orthogonal``: each matrix (semi-)orthogonal, so a square chain keeps the signal's norm (drawn in fp32
    and rounded where the matrices are bf16 or fp16, as they are while peft builds an adapter on a bf16 base).
    ``identity``: rectangular identities, except the matrices the product starts at zero (DTSM's D), so T
    starts as I and the adapter as plain LoRA (for a chain narrower than r somewhere, T starts as the
    projection on the first min(widths) coordinates).
    """
    with torch.no_grad():
        for i, m in enumerate(matrices):
            if init == "kaiming":
                nn.init.kaiming_uniform_(m, a=math.sqrt(5), generator=generator)
            elif init == "orthogonal":  # torch's QR has no bf16/fp16 kernel on the CPU: draw in fp32 at least
                full = torch.empty(m.shape, dtype=torch.promote_types(m.dtype, torch.float32), device=m.device)
                nn.init.orthogonal_(full, generator=generator)
                m.copy_(full)
            elif init == "identity":
                m.zero_()
                if i not in product.zero_at_identity:
                    m.fill_diagonal_(1.0)
            else:
                raise ValueError(f"unknown init {init!r}")


def init_biases_(biases: list[torch.Tensor], init: str, generator: torch.Generator) -> None:
    """Chain biases: torch's ``nn.Linear`` default under kaiming (what the authors' code gets), else zero.

    nn.Linear draws its bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)); orthogonal and identity starts keep
    the chain linear at step 0 (identity then starts exactly as plain LoRA).
    """
    with torch.no_grad():
        for b, fan_in in biases:
            if init == "kaiming":
                bound = 1.0 / math.sqrt(fan_in)
                b.uniform_(-bound, bound, generator=generator)
            else:
                b.zero_()


class MiddleFactor(nn.Module):
    """LoRA's A with a middle product folded in: ``weight`` = T A, of shape (r, d_in).

    Parameters (saved as ``lora_A.factor``, ``lora_A.middle_<i>`` and ``lora_A.middle_bias_<i>``):
        factor: A, shape (r, d_in), initialised by peft exactly as for plain LoRA.
        middle_0, middle_1, ...: the method's middle matrices, shapes from :attr:`AdapterSpec.middle_shapes`.
        middle_bias_0, ...: with ``bias=true``, one bias per chain matrix, a column of its output width
            (h_i x 1: peft's save check warns about any 1-D tensor under ``lora_A``). The names contain
            ``middle`` so that per-group statistics file them with the middle matrices.

    With ``freeze_middle=true`` the middle matrices and biases are parameters that never require a gradient
    (:meth:`freeze_middle_`, re-applied by the layer whenever peft re-enables gradients).

    The middle matrices are direct attributes, not a nested list: peft finds the adapter name in a saved
    key as its second-to-last part, so ``lora_A.<adapter>.middle_0`` reloads under any adapter name.
    """

    def __init__(self, factor: nn.Parameter, spec: AdapterSpec, generator: torch.Generator):
        super().__init__()
        self.product = spec.middle
        self.frozen = spec.freeze_middle
        self.factor = factor
        shapes = spec.middle_shapes
        self.n_middle = len(shapes)
        matrices = [torch.empty(shape, dtype=factor.dtype) for shape in shapes]
        init_middle_(matrices, spec.init, self.product, generator)
        for i, m in enumerate(matrices):
            self.register_parameter(f"middle_{i}", nn.Parameter(m.to(factor.device)))
        self.has_bias = spec.bias
        if spec.bias:
            biases = [(torch.empty(out, 1, dtype=factor.dtype), fan_in) for out, fan_in in shapes]
            init_biases_(biases, spec.init, generator)
            for i, (b, _) in enumerate(biases):
                self.register_parameter(f"middle_bias_{i}", nn.Parameter(b.to(factor.device)))
        self.in_features = factor.shape[1]
        self.out_features = factor.shape[0]
        self.freeze_middle_()

    @property
    def middle(self) -> list[nn.Parameter]:
        return [getattr(self, f"middle_{i}") for i in range(self.n_middle)]

    @property
    def middle_biases(self) -> list[nn.Parameter]:
        return [getattr(self, f"middle_bias_{i}") for i in range(self.n_middle)] if self.has_bias else []

    def freeze_middle_(self) -> None:
        """With ``freeze_middle``, stop the middle matrices and biases from training (A is untouched)."""
        if self.frozen:
            for p in self.middle + self.middle_biases:
                p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The effective A: T A, in the parameters' precision even under autocast.

        The r x r products are tiny; keeping them out of autocast saves a cast of every middle matrix
        (and of its gradient) per step, so only the (r x d_in) result is cast, as plain LoRA's A is.
        """
        with torch.autocast(self.factor.device.type, enabled=False):
            return self.middle_matrix() @ self.factor

    def chain_bias(self) -> torch.Tensor | None:
        """c = b_n + W_n b_{n-1} + ... + W_n ... W_2 b_1 (length r): the chain's constant term, or None."""
        if not self.has_bias:
            return None
        with torch.autocast(self.factor.device.type, enabled=False):
            c = self.middle_biases[0]
            for m, b in zip(self.middle[1:], self.middle_biases[1:]):
                c = m @ c + b
            return c[:, 0]

    @property
    def dtype(self) -> torch.dtype:
        """The factor's dtype, without computing it (see :meth:`HarnessLinear.forward`)."""
        return self.factor.dtype

    def middle_matrix(self) -> torch.Tensor:
        """T alone (r x r), for inspection and analysis."""
        return self.product.combine(self.middle)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.chain_bias())

    def extra_repr(self) -> str:
        shapes = ", ".join("x".join(map(str, m.shape)) for m in self.middle)
        extras = (", bias" if self.has_bias else "") + (", frozen" if self.frozen else "")
        return (f"in_features={self.in_features}, r={self.out_features}, T={self.product.formula}, "
                f"middle=[{shapes}]{extras}")
