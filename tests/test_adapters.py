"""Properties of every adapter method that users rely on, shown on the tiny in-memory Llama."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.adapters import (
    AdapterSpec,
    export_lora,
    expected_parameters,
    get_adapter_model,
    load_adapter_model,
    parse_spec,
    trainable_parameters,
    validate_against_model,
)
from harness.errors import UserError
from harness.models import tiny_random_model

R, ALPHA = 8, 16
SPECS = [
    "lora",
    "moslora",
    "moslora:init=orthogonal",
    "linchain",
    "linchain:n=5",
    "linchain:init=identity",
    "linchain:widths=8-16-4-8",
    "mtlora:structure=shim",
    "mtlora:structure=icfm",
    "mtlora:structure=ctcm",
    "mtlora:structure=dtsm",
    "mtlora:structure=icfm,init=identity",
    "condlora",
]


# Every property below is checked on the CPU, and again on the GPU where there is one (adapter tensors
# created on the wrong device, or a merge that differs there, only show up on it).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def base(request):
    return tiny_random_model(seed=0).to(request.param)


@pytest.fixture(scope="module")
def ids(base):
    g = torch.Generator().manual_seed(123)
    return torch.randint(3, 250, (3, 16), generator=g).to(base.device)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def adapted(base, spec, seed=1, **common):
    torch.manual_seed(seed)
    return get_adapter_model(copy.deepcopy(base), spec, r=R, alpha=ALPHA, **common)


def train_steps(model, ids, steps=3, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("spec", SPECS)
def test_adapted_model_equals_base_before_training(base, ids, spec):
    model = adapted(base, spec, dropout=0.1)
    assert torch.equal(logits(model, ids), logits(base, ids))


@pytest.mark.parametrize("spec", SPECS)
def test_trainable_parameters_match_formula(base, spec):
    model = adapted(base, spec)
    assert trainable_parameters(model) == expected_parameters(base, spec, r=R, alpha=ALPHA)
    # only adapter tensors train; the base stays frozen
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("spec", SPECS)
def test_every_trainable_tensor_changes_with_training(base, ids, spec):
    model = adapted(base, spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, ids)
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []


@pytest.fixture(scope="module")
def trained(base, ids):
    """Each method trained a few steps (so B != 0 and every factor matters)."""
    return {spec: train_steps(adapted(base, spec), ids) for spec in SPECS}


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments", "ignore:Found missing adapter keys")
@pytest.mark.parametrize("spec", SPECS)
def test_saved_adapter_reloads_to_identical_logits_under_another_name(base, ids, trained, spec, tmp_path):
    model = trained[spec]
    model.save_pretrained(tmp_path)
    reloaded = load_adapter_model(copy.deepcopy(base), tmp_path, adapter_name="renamed")
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    # and a plain peft load (the trap this function exists for) really does differ for our methods
    if spec != "lora":
        from peft import PeftModel

        plain = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
        assert not torch.allclose(logits(plain, ids), logits(model, ids))


@pytest.mark.parametrize("spec", SPECS)
def test_merge_is_exact_and_leaves_the_base_architecture(base, ids, trained, spec):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = trained[spec]
    expected = logits(model, ids)
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged) is type(base)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    assert rel_err(logits(merged, ids), expected) < 1e-5


def test_export_lora_loads_in_plain_peft_without_harness(base, ids, trained, tmp_path):
    """A separate process that never imports harness loads each export with plain peft: same logits."""
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    torch.save(ids.cpu(), tmp_path / "ids.pt")  # the plain-peft process runs on the CPU
    expected = {}
    for i, spec in enumerate(SPECS):
        export_lora(trained[spec], tmp_path / f"export{i}")
        expected[i] = logits(trained[spec], ids).cpu()
        saved = json.loads((tmp_path / f"export{i}" / "adapter_config.json").read_text())
        assert saved["peft_type"] == "LORA" and saved["r"] == R and "harness_method" not in saved
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        for i in range({len(SPECS)}):
            base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
            model = PeftModel.from_pretrained(base, {str(tmp_path)!r} + f"/export{{i}}").eval()
            with torch.no_grad():
                torch.save(model(ids).logits, {str(tmp_path)!r} + f"/out{{i}}.pt")
        assert not any(m == "harness" or m.startswith("harness.") for m in sys.modules), "harness was imported"
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for i, spec in enumerate(SPECS):
        got = torch.load(tmp_path / f"out{i}.pt")
        assert rel_err(got, expected[i]) < 1e-5, spec


def test_same_seed_gives_every_method_the_same_initial_A(base):
    """Differences between methods come from the methods: A (and B = 0) start identical to plain LoRA's."""

    def first_factors(model):
        out = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a = module.lora_A["default"]
                out[name] = (a.factor if hasattr(a, "factor") else a.weight).detach().clone()
        return out

    reference = first_factors(adapted(base, "lora", seed=7))
    for spec in ["moslora", "linchain:n=4", "mtlora:structure=dtsm"]:
        other = first_factors(adapted(base, spec, seed=7))
        assert other.keys() == reference.keys()
        assert all(torch.equal(other[k], reference[k]) for k in reference), spec
    # and a different seed gives a different start
    assert not all(torch.equal(a, b) for a, b in zip(reference.values(), first_factors(adapted(base, "lora", seed=8)).values()))


def test_condlora_maps_are_counted_stored_and_updated_once(base, ids, tmp_path):
    from safetensors.torch import load_file

    model = adapted(base, "condlora")
    layers = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
    assert len(layers) == 2
    shared = layers[0].lora_A["default"].maps
    assert layers[1].lora_A["default"].maps is shared  # one object, reached from every layer of the type
    # counted once: 5 module types x r (d_in + d_out), no matter how many layers
    assert trainable_parameters(model) == expected_parameters(base, "condlora", r=R)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len({id(p) for p in params}) == len(params) == 2 * 5
    # updated once: one SGD step moves Theta by exactly -lr * (gradient summed over the layers)
    train_steps(model, ids, steps=1)  # make Theta_B non-zero so Theta_A's gradient is non-zero too
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    theta_a = shared[0]
    before, grad = theta_a.detach().clone(), theta_a.grad.detach().clone()
    assert grad.abs().sum() > 0
    torch.optim.SGD(params, lr=0.5).step()
    assert torch.allclose(theta_a.detach(), before - 0.5 * grad, atol=1e-7)
    # stored once: one (Theta_A, Theta_B) pair per module type in the saved file, shared again after loading
    model.save_pretrained(tmp_path)
    keys = [k for k in load_file(tmp_path / "adapter_model.safetensors") if "lora_cond" in k]
    assert len(keys) == 2 * 5
    reloaded = load_adapter_model(copy.deepcopy(base), tmp_path)
    q = [m for n, m in reloaded.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
    assert q[0].lora_A["default"].maps is q[1].lora_A["default"].maps


def test_parameter_formula_reproduces_the_linchain_papers_table_1():
    """LLaMA-3-8B, rank 16, targets q,k,v,up,down (LinChain paper, Table 1), from the config alone."""
    from transformers import LlamaConfig

    llama3_8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                            num_key_value_heads=8, num_hidden_layers=32)
    millions = {spec: round(expected_parameters(llama3_8b, spec, r=16) / 1e6, 2)
                for spec in ["lora", "moslora", "linchain:n=3", "linchain:r=8,widths=8-16-8"]}
    assert millions == {"lora": 28.31, "moslora": 28.35, "linchain:n=3": 28.43, "linchain:r=8,widths=8-16-8": 14.20}


def test_spec_parsing_resolves_options_and_overrides():
    spec = parse_spec("linchain:r=8,widths=8-16-8,lr=5e-4", r=16, alpha=32, dropout=0.05, targets=["q_proj"])
    assert spec == AdapterSpec(method="linchain", r=8, alpha=32.0, dropout=0.05, targets=("q_proj",),
                               chain_widths=(8, 16, 8), lr=5e-4)
    assert spec.middle_shapes == ((16, 8), (8, 16))
    assert spec.name == "linchain-8-16-8"
    assert parse_spec("linchain").chain_widths == (16, 16, 16, 16)  # three r x r matrices by default
    assert parse_spec("linchain:n=1").middle_shapes == parse_spec("moslora").middle_shapes
    assert parse_spec("mtlora:structure=ctcm").middle_shapes == parse_spec("linchain:n=2").middle_shapes
    assert parse_spec("lora:targets=q_proj+v_proj").targets == ("q_proj", "v_proj")
    for text in ["lora", "moslora:init=identity", "linchain:widths=16-4-16", "mtlora:structure=dtsm", "condlora"]:
        spec = parse_spec(text)
        assert parse_spec(spec.canonical()) == spec


BAD_SPECS = [
    ("foo", "unknown adapter method 'foo'", "lora, moslora, linchain, mtlora, condlora"),
    ("", "empty adapter spec", "lora"),
    ("lora:", "nothing after ':'", ""),
    ("lora:r8", "malformed option 'r8'", "key=value"),
    ("lora:bogus=1", "unknown option 'bogus' for lora", "r, alpha, dropout, targets, lr"),
    ("linchain:n=0", "chain length n must be an integer >= 1", ""),
    ("linchain:n=two", "chain length n must be an integer >= 1", ""),
    ("linchain:r=8,widths=16-8", "widths must start and end at r=8", "8-16-8"),
    ("linchain:widths=16-x-16", "widths must be integers", ""),
    ("linchain:n=3,widths=16-16", "disagrees", ""),
    ("lora:r=0", "r must be a positive integer", ""),
    ("lora:r=2.5", "r must be a positive integer", ""),
    ("lora:dropout=1.5", "dropout must be in [0, 1)", ""),
    ("lora:alpha=-1", "alpha must be in (0", ""),
    ("moslora:init=xavier", "unknown init 'xavier'", "kaiming, orthogonal, identity"),
    ("mtlora:structure=abc", "unknown MTLoRA structure 'abc'", "shim, icfm, ctcm, dtsm"),
    ("lora:r=4,r=8", "given twice", ""),
]


@pytest.mark.parametrize("text,problem,accepted", BAD_SPECS)
def test_bad_spec_fails_with_one_clear_line(text, problem, accepted):
    with pytest.raises(UserError) as err:
        parse_spec(text)
    message = str(err.value)
    assert problem in message and accepted in message
    assert "\n" not in message


@pytest.mark.parametrize("spec,problem", [
    ("lora:r=64", "r=64 is larger than target layer"),
    ("lora:targets=q_proj+nope_proj", "target module 'nope_proj' not found"),
    ("lora:targets=embed_tokens", "only linear layers"),
])
def test_spec_that_does_not_fit_the_model_fails_before_touching_it(base, spec, problem):
    from peft.tuners.lora import LoraLayer

    model = copy.deepcopy(base)
    with pytest.raises(UserError, match=problem):
        get_adapter_model(model, spec)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_condlora_refuses_layers_of_one_type_with_different_shapes():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(16, 16)}),
                                         nn.ModuleDict({"proj": nn.Linear(16, 32)})])

    with pytest.raises(UserError, match="CondLoRA shares one map per module type.*different shapes"):
        validate_against_model(Toy(), parse_spec("condlora:r=4,targets=proj"))
    validate_against_model(Toy(), parse_spec("lora:r=4,targets=proj"))  # LoRA has no such constraint


def test_command_line_reports_a_bad_spec_in_one_line_without_traceback():
    done = subprocess.run([sys.executable, "-m", "harness.adapters", "linchain:n=0", "--model", "tiny-random"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "chain length n must be an integer >= 1" in lines[0]
    assert "Traceback" not in done.stderr


def test_command_line_describes_a_spec(tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness.adapters", "linchain:r=8,widths=8-16-8",
                           "--model", "tiny-random"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert "linchain-8-16-8" in done.stdout and "trainable parameters" in done.stdout
