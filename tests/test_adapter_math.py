"""Each method's update, read back from merging, against the paper's formula written out here.

For every method and every init, dW = merged weight - W0 must equal s * B T A, with T
built in this file from the raw parameters of the module (never from the harness's own
product code) and s = alpha / r:

- LoRA                      T = I                                   (Hu et al. 2022)
- MoSLoRA                   T = M                                   (Wu et al. 2024, arXiv 2406.11909)
- LinChain-n                T = W_n ... W_2 W_1                      (Wang et al. 2024, arXiv 2411.00039)
- MTLoRA SHIM / ICFM / CTCM / DTSM   T = C,  C C^T,  C D,  C + D     (Liang et al., arXiv 2403.07440)
- CondLoRA                  A = Theta_A W0^T (authors, square) or Theta_A W0 (row space), B = W0 Theta_B^T
                                                                    (Kim et al. 2024, arXiv 2403.14946)

B starts at zero, so every B (CondLoRA's Theta_B) is set to random values first; the middle
matrices keep the values their init gave them.
"""

from __future__ import annotations

import copy

import pytest
import torch

from harness.adapters import get_adapter_model
from harness.errors import UserError
from harness.models import tiny_random_model

R, ALPHA = 8, 16
S = ALPHA / R
INITS = ["kaiming", "orthogonal", "identity"]
MIDDLE_SPECS = ["moslora", "linchain", "linchain:widths=8-16-8", "mtlora:structure=shim", "mtlora:structure=icfm",
                "mtlora:structure=ctcm", "mtlora:structure=dtsm"]


def paper_T(spec: str, m: list[torch.Tensor]) -> torch.Tensor:
    """T from the papers, given the stored middle matrices m[0], m[1], ... (stored in the order applied to x)."""
    if spec == "moslora" or spec == "mtlora:structure=shim":
        return m[0]                      # M; SHIM's C
    if spec.startswith("linchain"):
        t = torch.eye(R, dtype=torch.float64)
        for w in m:                      # W_1 is applied first: T = W_n ... W_1
            t = w @ t
        return t
    if spec == "mtlora:structure=icfm":
        return m[0] @ m[0].T             # C C^T
    if spec == "mtlora:structure=ctcm":
        d, c = m                         # x meets D first, then C: T = C D
        return c @ d
    if spec == "mtlora:structure=dtsm":
        c, d = m
        return c + d                     # C + D
    raise AssertionError(spec)


@pytest.fixture(scope="module")
def base():
    return tiny_random_model(seed=0)


def adapter_layers(model):
    """(name in the base model, LoRA layer) for every adapted layer."""
    prefix = "base_model.model."
    return [(name[len(prefix):], m) for name, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]


def build(base, spec, seed=3):
    torch.manual_seed(seed)
    model = get_adapter_model(copy.deepcopy(base), spec, r=R, alpha=ALPHA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-zero B (CondLoRA: Theta_B), or every dW would be 0 = 0
        for _, layer in adapter_layers(model):
            if hasattr(layer, "lora_cond") and "default" in layer.lora_cond:
                theta_b = layer.lora_cond["default"][1]
                theta_b.copy_(torch.randn(theta_b.shape, generator=g) * 0.1)
            elif not hasattr(layer.lora_B["default"], "maps"):
                b = layer.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def merged_deltas(base, model) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(model).merge_and_unload()
    return {name: (merged.get_submodule(name).weight - base.get_submodule(name).weight).double()
            for name, _ in adapter_layers(model)}


def assert_close(got: torch.Tensor, want: torch.Tensor, name: str):
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("spec", MIDDLE_SPECS)
def test_middle_methods_merge_to_s_B_T_A(base, spec, init):
    model = build(base, f"{spec}{',' if ':' in spec else ':'}init={init}")
    deltas = merged_deltas(base, model)
    for name, layer in adapter_layers(model):
        factor = layer.lora_A["default"]
        a = factor.factor.detach().double()
        middle = [getattr(factor, f"middle_{i}").detach().double() for i in range(factor.n_middle)]
        b = layer.lora_B["default"].weight.detach().double()
        want = S * b @ paper_T(spec, middle) @ a
        assert_close(deltas[name], want, name)
        # peft's own delta (what merging adds) is the same product
        assert_close(layer.get_delta_weight("default").double(), want, name)


def test_lora_merges_to_s_B_A(base):
    model = build(base, "lora")
    deltas = merged_deltas(base, model)
    for name, layer in adapter_layers(model):
        want = S * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        assert_close(deltas[name], want.detach(), name)


@pytest.mark.parametrize("spec,transpose", [("condlora", False),
                                            ("condlora:form=rowspace,targets=q_proj+o_proj", False),
                                            ("condlora:form=authors,targets=q_proj+o_proj", True)])
def test_condlora_merges_to_W0_ThetaB_ThetaA_W0(base, spec, transpose):
    model = build(base, spec)
    deltas = merged_deltas(base, model)
    maps = {}
    for name, layer in adapter_layers(model):
        if "default" in layer.lora_cond:
            maps[name.rsplit(".", 1)[-1]] = [p.detach().double() for p in layer.lora_cond["default"]]
    for name, _ in adapter_layers(model):
        theta_a, theta_b = maps[name.rsplit(".", 1)[-1]]
        w0 = base.get_submodule(name).weight.detach().double()
        a = theta_a @ (w0.T if transpose else w0)        # authors: Theta_A W0^T; row space: Theta_A W0
        b = w0 @ theta_b.T
        assert_close(deltas[name], S * b @ a, name)


def test_the_two_condlora_forms_differ_on_square_layers(base):
    targets = "targets=q_proj+o_proj"
    rowspace = merged_deltas(base, build(base, f"condlora:form=rowspace,{targets}"))
    authors = merged_deltas(base, build(base, f"condlora:form=authors,{targets}"))
    assert all(not torch.allclose(rowspace[n], authors[n]) for n in rowspace)


@pytest.mark.parametrize("spec", ["moslora", "linchain", "linchain:n=5", "linchain:widths=8-16-8",
                                  "mtlora:structure=shim", "mtlora:structure=icfm", "mtlora:structure=ctcm",
                                  "mtlora:structure=dtsm"])
def test_identity_init_gives_T_equal_to_I_exactly(base, spec):
    torch.manual_seed(0)
    model = get_adapter_model(copy.deepcopy(base), f"{spec}{',' if ':' in spec else ':'}init=identity", r=R)
    eye = torch.eye(R, dtype=torch.float64)
    for name, layer in adapter_layers(model):
        factor = layer.lora_A["default"]
        middle = [getattr(factor, f"middle_{i}").detach().double() for i in range(factor.n_middle)]
        assert torch.equal(paper_T(spec, middle), eye), name
        assert torch.equal(factor.weight, factor.factor), name  # so T A is exactly plain LoRA's A


def test_orthogonal_init_gives_orthonormal_middle_matrices(base):
    model = build(base, "linchain:widths=8-16-8,init=orthogonal")
    for name, layer in adapter_layers(model):
        factor = layer.lora_A["default"]
        for i in range(factor.n_middle):
            m = getattr(factor, f"middle_{i}").detach().double()
            small = min(m.shape)  # a semi-orthogonal matrix: orthonormal rows or columns, whichever are fewer
            gram = m @ m.T if m.shape[0] == small else m.T @ m
            assert torch.allclose(gram, torch.eye(small, dtype=torch.float64), atol=1e-6), name


@pytest.mark.parametrize("spec", ["moslora:bias=true", "linchain:bias=true,widths=8-16-8"])
def test_bias_chain_adds_s_B_c_with_c_from_the_affine_chain(base, spec):
    """z -> W_i z + b_i for each chain matrix: the layer adds s B (T A x + c), c = b_n + W_n (... (W_2 b_1))."""
    model = build(base, spec)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    name, layer = adapter_layers(model)[0]  # a q_proj: d_in = 64
    factor = layer.lora_A["default"]
    z = x.double() @ factor.factor.detach().double().T
    for i in range(factor.n_middle):       # the chain, one affine map at a time, as the authors' nn.Linear does
        w = getattr(factor, f"middle_{i}").detach().double()
        b = getattr(factor, f"middle_bias_{i}").detach().double()[:, 0]  # stored as a column
        z = z @ w.T + b
    want = S * z @ layer.lora_B["default"].weight.detach().double().T
    with torch.no_grad():
        got = layer(x).double() - layer.get_base_layer()(x).double()
    assert_close(got, want, name)
    with pytest.raises(UserError):
        copy.deepcopy(model).merge_and_unload()
