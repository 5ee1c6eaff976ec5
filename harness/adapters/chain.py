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
how they are named and started.

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


def init_middle_(matrices: list[torch.Tensor], init: str, product: str, generator: torch.Generator) -> None:
    """Initialise the middle matrices in place.

    ``kaiming``: each matrix Kaiming-uniform with a = sqrt(5), the call peft uses for A (the papers' choice).
    ``orthogonal``: each matrix (semi-)orthogonal, so a square chain keeps the signal's norm.
    ``identity``: T starts as the identity (a chain of rectangular identities, C = I and D = 0 for a sum),
    so the adapter starts exactly as plain LoRA.
    """
    with torch.no_grad():
        for i, m in enumerate(matrices):
            if init == "kaiming":
                nn.init.kaiming_uniform_(m, a=math.sqrt(5), generator=generator)
            elif init == "orthogonal":
                nn.init.orthogonal_(m, generator=generator)
            elif init == "identity":
                m.zero_()
                if not (product == "sum" and i == 1):
                    m.fill_diagonal_(1.0)
            else:
                raise ValueError(f"unknown init {init!r}")


def middle_product(matrices, product: str) -> torch.Tensor:
    """T from the middle matrices: ``chain`` W_n...W_1, ``gram`` C C^T, ``sum`` C + D."""
    if product == "chain":
        t = matrices[0]
        for m in matrices[1:]:
            t = m @ t
        return t
    if product == "gram":
        c = matrices[0]
        return c @ c.T
    if product == "sum":
        return matrices[0] + matrices[1]
    raise ValueError(f"unknown middle product {product!r}")


class MiddleFactor(nn.Module):
    """LoRA's A with a middle product folded in: ``weight`` = T A, of shape (r, d_in).

    Parameters (saved as ``lora_A.factor`` and ``lora_A.middle_<i>``):
        factor: A, shape (r, d_in), initialised by peft exactly as for plain LoRA.
        middle_0, middle_1, ...: the method's middle matrices, shapes from :attr:`AdapterSpec.middle_shapes`.

    The middle matrices are direct attributes, not a nested list: peft finds the adapter name in a saved
    key as its second-to-last part, so ``lora_A.<adapter>.middle_0`` reloads under any adapter name.
    """

    def __init__(self, factor: nn.Parameter, shapes, product: str, init: str, generator: torch.Generator):
        super().__init__()
        self.product = product
        self.factor = factor
        self.n_middle = len(shapes)
        matrices = [torch.empty(shape, dtype=factor.dtype) for shape in shapes]
        init_middle_(matrices, init, product, generator)
        for i, m in enumerate(matrices):
            self.register_parameter(f"middle_{i}", nn.Parameter(m.to(factor.device)))
        self.in_features = factor.shape[1]
        self.out_features = factor.shape[0]

    @property
    def middle(self) -> list[nn.Parameter]:
        return [getattr(self, f"middle_{i}") for i in range(self.n_middle)]

    @property
    def weight(self) -> torch.Tensor:
        """The effective A: T A, in the parameters' precision even under autocast.

        The r x r products are tiny; keeping them out of autocast saves a cast of every middle matrix
        (and of its gradient) per step, so only the (r x d_in) result is cast, as plain LoRA's A is.
        """
        with torch.autocast(self.factor.device.type, enabled=False):
            return middle_product(self.middle, self.product) @ self.factor

    @property
    def dtype(self) -> torch.dtype:
        """The factor's dtype, without computing it (see :meth:`HarnessLinear.forward`)."""
        return self.factor.dtype

    def middle_matrix(self) -> torch.Tensor:
        """T alone (r x r), for inspection and analysis."""
        return middle_product(self.middle, self.product)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        shapes = ", ".join("x".join(map(str, m.shape)) for m in self.middle)
        return f"in_features={self.in_features}, r={self.out_features}, product={self.product}, middle=[{shapes}]"
