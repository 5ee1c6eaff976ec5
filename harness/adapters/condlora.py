"""CondLoRA (Kim et al. 2024, arXiv 2403.14946): A and B generated from the frozen weight.

For each module type m (``q_proj``, ``down_proj``, ...) two matrices Theta_A and
Theta_B are shared by every layer l of that type, and each layer's LoRA factors
are computed from its own frozen weight W0_l (shape d_out x d_in). One form is
used for every layer of a model, chosen by the spec's ``form``:

- ``form=rowspace`` (default):  A_l = Theta_A W0_l,    B_l = W0_l Theta_B^T
- ``form=authors``:             A_l = Theta_A W0_l^T,  B_l = W0_l Theta_B^T  (square W0 only)

with Theta_A of shape (r, d_out) and Theta_B of shape (r, d_in), so
dW_l = s * B_l A_l. The authors' code supports square W0 only; grouped-query
attention (k_proj, v_proj) and MLP projections are not square, and the row-space
form is the only shape-compatible way to keep "one map per module type, fed that
layer's W0". It is the default because it fits every layer, the default targets
included; the authors' form is there to reproduce the paper on square targets
(e.g. ``condlora:form=authors,targets=q_proj+o_proj``) and fails on a non-square
layer with one line naming it. Theta_A is Kaiming-uniform, Theta_B zero, so
dW = 0 at the start.

Trainable parameters: r (d_in + d_out) per module TYPE, not per layer.

Sharing is designed, not assumed: the first layer of each type (in module order)
owns the pair as a registered parameter (``lora_cond.<i>``); the other layers
reach it through a plain reference. The pair is therefore counted once by
``parameters()``, stored once by ``save_pretrained`` and updated once per step,
and a reloaded adapter is shared again because construction follows the same order.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def base_weight(base_layer: nn.Module) -> torch.Tensor:
    """The frozen W0 as (d_out, d_in), whatever the storage (GPT-2's Conv1D keeps it as d_in x d_out)."""
    weight = base_layer.weight
    return weight.T if type(base_layer).__name__ == "Conv1D" else weight


def new_condlora_maps(r: int, d_in: int, d_out: int, dtype, device, generator: torch.Generator) -> nn.ParameterList:
    """A fresh (Theta_A, Theta_B) pair: Theta_A (r, d_out) Kaiming-uniform, Theta_B (r, d_in) zeros."""
    theta_a = torch.empty(r, d_out, dtype=dtype)
    nn.init.kaiming_uniform_(theta_a, a=math.sqrt(5), generator=generator)
    theta_b = torch.zeros(r, d_in, dtype=dtype)
    return nn.ParameterList([nn.Parameter(theta_a), nn.Parameter(theta_b)]).to(device)


class GeneratedFactor(nn.Module):
    """A LoRA factor computed from the shared maps and the layer's frozen weight; it has no parameters of its own.

    ``which`` is ``"A"`` (weight of shape r x d_in) or ``"B"`` (d_out x r). The base layer and the
    shared maps are held as plain references so that neither is registered (or saved) twice.
    """

    def __init__(self, which: str, base_layer: nn.Module, maps: nn.ParameterList, form: str):
        super().__init__()
        self.which = which
        self._refs = {"base": base_layer, "maps": maps}
        d_out, d_in = base_weight(base_layer).shape
        if form == "authors" and d_out != d_in:
            raise ValueError(f"CondLoRA's authors' form needs a square weight, got {d_out}x{d_in}")
        self.form = form
        r = maps[0].shape[0]
        self.in_features, self.out_features = (d_in, r) if which == "A" else (r, d_out)

    @property
    def maps(self) -> nn.ParameterList:
        return self._refs["maps"]

    @property
    def dtype(self) -> torch.dtype:
        """The factor's dtype, without computing it (see :meth:`HarnessLinear.forward`)."""
        return self.maps[0].dtype

    @property
    def weight(self) -> torch.Tensor:
        theta_a, theta_b = self.maps[0], self.maps[1]
        w0 = base_weight(self._refs["base"]).to(theta_a.dtype)
        if self.which == "A":
            return theta_a @ (w0.T if self.form == "authors" else w0)
        return w0 @ theta_b.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (f"CondLoRA {self.which}: in_features={self.in_features}, out_features={self.out_features}, "
                f"form={self.form}")
