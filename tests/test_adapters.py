"""Properties of every adapter method that users rely on, shown on the tiny in-memory Llama."""

from __future__ import annotations

import copy
import json
import math
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
    "condlora:form=authors,targets=q_proj+o_proj",
    "moslora:freeze_middle=true",
    "linchain:bias=true",
    "lora:match=linchain:r=4,widths=4-16-4",
]
# An affine chain (bias=true) is not a rank-r LoRA: it neither merges nor exports.
MERGEABLE = [spec for spec in SPECS if "bias=true" not in spec]


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


@pytest.mark.parametrize("spec", ["pissa", "olora"])
def test_pissa_and_olora_start_at_the_base_function_up_to_the_base_weights_rounding(base, ids, spec):
    """PiSSA and OLoRA move s B0 A0 out of W0, so the model starts at W0 only up to the rounding of the residual
    W0 - s B0 A0 in the base weights' precision (LoRA starts there exactly, B = 0). In float32 that is ~1e-7 of
    the logits; on a bf16 base it is a bf16 rounding of the logits (2 units in the last place of the largest),
    not more: peft computes the residual in float32 and rounds it once."""
    shift = rel_err(logits(adapted(base, spec), ids), logits(base, ids))
    assert 0 < shift < 1e-5
    half = copy.deepcopy(base).to(torch.bfloat16)
    want, got = logits(half, ids).float(), logits(adapted(half, spec), ids).float()
    top = want.abs().max().item()
    ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(top))
    assert 0 < (got - want).abs().max().item() <= 2 * ulp


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
    if not spec.startswith("lora"):
        from peft import PeftModel

        plain = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
        assert not torch.allclose(logits(plain, ids), logits(model, ids))


@pytest.mark.parametrize("spec", MERGEABLE)
def test_merge_is_exact_and_leaves_the_base_architecture(base, ids, trained, spec):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = trained[spec]
    expected = logits(model, ids)
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged) is type(base)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    assert rel_err(logits(merged, ids), expected) < 1e-5


@pytest.mark.integration
def test_export_lora_loads_in_plain_peft_without_harness(base, ids, trained, tmp_path):
    """A separate process that never imports harness loads each export with plain peft: same logits."""
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    torch.save(ids.cpu(), tmp_path / "ids.pt")  # the plain-peft process runs on the CPU
    expected = {}
    for i, spec in enumerate(MERGEABLE):
        export_lora(trained[spec], tmp_path / f"export{i}")
        expected[i] = logits(trained[spec], ids).cpu()
        saved = json.loads((tmp_path / f"export{i}" / "adapter_config.json").read_text())
        assert saved["peft_type"] == "LORA" and "harness_spec" not in saved
        assert saved["r"] == (5 if "match" in spec else R)  # the matched rank: see test_match_picks_the_nearest_count
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        for i in range({len(MERGEABLE)}):
            base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
            model = PeftModel.from_pretrained(base, {str(tmp_path)!r} + f"/export{{i}}").eval()
            with torch.no_grad():
                torch.save(model(ids).logits, {str(tmp_path)!r} + f"/out{{i}}.pt")
        assert not any(m == "harness" or m.startswith("harness.") for m in sys.modules), "harness was imported"
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for i, spec in enumerate(MERGEABLE):
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
    ("lora:targets=nope_proj,match=lora", "target module 'nope_proj' not found"),
    ("lora:match=moslora:targets=nope_proj", "target module 'nope_proj' not found"),
    ("lora:match=linchain:r=64", "r=64 is larger than target layer"),
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
    """The one real process of ``python -m harness.adapters``."""
    done = subprocess.run([sys.executable, "-m", "harness.adapters", "linchain:n=0", "--model", "tiny-random"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "chain length n must be an integer >= 1" in lines[0]
    assert "Traceback" not in done.stderr


def test_command_line_describes_a_spec(capsys):
    from harness.adapters.__main__ import main

    assert main(["linchain:r=8,widths=8-16-8", "--model", "tiny-random"]) == 0
    out = capsys.readouterr().out
    assert "linchain-8-16-8" in out and "trainable parameters" in out


# ----------------------------------------------------------------------------------------------------------
# Labels, the one description of a method, and the controls of issue 13


def test_labels_name_the_method_and_every_option_off_its_default():
    labels = {text: parse_spec(text).label for text in [
        "lora", "moslora", "linchain", "linchain:n=5", "mtlora:structure=icfm", "linchain:r=8,widths=8-16-8",
        "moslora:init=orthogonal", "linchain:init=identity", "condlora", "condlora:form=rowspace",
        "condlora:form=authors", "moslora:freeze_middle=true", "linchain:bias=true,freeze_middle=true",
        "mtlora:structure=dtsm,init=identity,freeze_middle=true", "lora:match=linchain:r=8,widths=8-16-8",
        "lora:lr=1e-3"]}
    assert labels == {
        "lora": "lora", "moslora": "moslora", "linchain": "linchain-3", "linchain:n=5": "linchain-5",
        "mtlora:structure=icfm": "mtlora-icfm", "linchain:r=8,widths=8-16-8": "linchain-8-16-8",
        "moslora:init=orthogonal": "moslora-orthogonal", "linchain:init=identity": "linchain-3-identity",
        "condlora": "condlora", "condlora:form=rowspace": "condlora", "condlora:form=authors": "condlora-authors",
        "moslora:freeze_middle=true": "moslora-frozen",
        "linchain:bias=true,freeze_middle=true": "linchain-3-bias-frozen",
        "mtlora:structure=dtsm,init=identity,freeze_middle=true": "mtlora-dtsm-identity-frozen",
        "lora:match=linchain:r=8,widths=8-16-8": "lora-match-linchain-8-16-8",  # before the model chooses r
        "lora:lr=1e-3": "lora",
    }


def test_new_options_parse_and_round_trip_through_the_canonical_string():
    for text in ["moslora:freeze_middle=true", "linchain:bias=true,n=2", "mtlora:structure=ctcm,freeze_middle=true",
                 "condlora:form=authors", "lora:alpha=8,match=linchain:r=8,widths=8-16-8",
                 "lora:match=mtlora:structure=icfm,init=identity"]:
        spec = parse_spec(text)
        assert parse_spec(spec.canonical()) == spec, text
    matched = parse_spec("lora:alpha=8,match=linchain:r=4,widths=4-8-4", r=16, alpha=32)
    assert matched.r is None and matched.alpha == 8.0
    # the matched spec takes the run's options, not the matching LoRA's
    assert matched.match == parse_spec("linchain:r=4,widths=4-8-4", r=16, alpha=32)
    assert parse_spec("condlora").form == "rowspace"  # the default: the one form that fits every layer


def test_the_peft_config_stores_only_the_spec_and_parses_it_again(base, tmp_path):
    from harness.adapters.peft_layer import HarnessLoraConfig

    model = adapted(base, "linchain:widths=8-16-8,init=orthogonal,bias=true")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not {"harness_method", "middle_product", "chain_widths", "middle_init"} & saved.keys()
    # targets=auto is saved resolved: the Llama's q, k, v, up, down
    assert parse_spec(saved["harness_spec"]) == parse_spec("linchain:r=8,alpha=16,widths=8-16-8,init=orthogonal,"
                                                           "bias=true,targets=q_proj+k_proj+v_proj+up_proj+down_proj")
    assert HarnessLoraConfig.from_saved(tmp_path).spec.middle_shapes == ((16, 8), (8, 16))


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments", "ignore:Found missing adapter keys")
def test_an_adapter_saved_with_the_old_mirrored_fields_still_loads(base, ids, trained, tmp_path):
    """Adapters saved before the spec was the one description carried copies of it; they load the same."""
    trained["linchain:widths=8-16-4-8"].save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved.update(harness_method="linchain", middle_product="chain", chain_widths=[8, 16, 4, 8], middle_init="kaiming")
    config_file.write_text(json.dumps(saved))
    reloaded = load_adapter_model(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(reloaded, ids), logits(trained["linchain:widths=8-16-4-8"], ids))


def test_an_old_condlora_adapter_without_a_form_fails_in_one_line(base, tmp_path):
    adapted(base, "condlora").save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["harness_spec"] = saved["harness_spec"].replace(",form=rowspace", "")
    config_file.write_text(json.dumps(saved))
    with pytest.raises(UserError, match="saved before CondLoRA used one form") as err:
        load_adapter_model(copy.deepcopy(base), tmp_path)
    assert "\n" not in str(err.value)


def test_the_spec_module_and_the_configuration_need_no_peft():
    """Method names and defaults have one home, importable without torch or peft; the configuration reads it."""
    from harness import config
    from harness.adapters import spec

    assert config.METHOD_NAMES is spec.METHODS and config.AUTO_TARGETS is spec.AUTO_TARGETS
    code = ("import sys, harness.adapters, harness.adapters.spec; "
            "assert not {'torch', 'peft'} & set(sys.modules), sorted({'torch', 'peft'} & set(sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-1000:]


def _tiny_examples(n=16, length=12):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(3, 250, (length,), generator=g)), "labels": ids.clone(),
             "attention_mask": torch.ones(length, dtype=torch.long)} for _ in range(n)]


def _harness_train(model, steps=4):
    from harness.config import RunConfig
    from harness.train import TrainSettings, train

    settings = TrainSettings.from_config(RunConfig(lr=1e-2, batch_size=4, grad_accum=1, max_steps=steps, epochs=1.0,
                                                   warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0), None, 0)
    stack = lambda batch: {k: torch.stack([x[k] for x in batch]) for k in batch[0]}  # noqa: E731
    return train(model, _tiny_examples(), stack, settings, progress=False)


@pytest.mark.parametrize("spec", ["moslora:freeze_middle=true", "linchain:freeze_middle=true,bias=true",
                                  "mtlora:structure=icfm,freeze_middle=true",
                                  "mtlora:structure=dtsm,freeze_middle=true"])
def test_freeze_middle_keeps_every_middle_matrix_bit_for_bit_while_A_and_B_train(base, spec, tmp_path):
    model = adapted(base, spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    middle = [n for n in before if ".middle_" in n]
    assert middle and all(not dict(model.named_parameters())[n].requires_grad for n in middle)
    _harness_train(model.to(base.device))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in middle)
    moved = [n for n in before if n not in middle and not torch.equal(after[n], before[n])]
    assert any(".factor" in n for n in moved) and any("lora_B" in n for n in moved)
    assert len(moved) == len(before) - len(middle)  # every A and B moved
    # still frozen when reloaded for more training (peft turns adapter gradients on when it loads)
    model.save_pretrained(tmp_path)
    reloaded = load_adapter_model(copy.deepcopy(base), tmp_path, is_trainable=True)
    trainable = {n for n, p in reloaded.named_parameters() if p.requires_grad}
    assert trainable and not any(".middle_" in n for n in trainable)
    assert trainable_parameters(reloaded) == trainable_parameters(model)


@pytest.mark.parametrize("spec,per_layer_middle", [
    ("moslora:freeze_middle=true", 0),
    ("moslora:bias=true", 8 * 8 + 8),                                    # M, and its bias of width r
    ("linchain:r=8,widths=8-16-8,bias=true", 16 * 8 + 8 * 16 + 16 + 8),  # W_1, W_2 and their biases
    ("linchain:bias=true,freeze_middle=true", 0),
])
def test_parameter_count_with_frozen_middles_and_biases(base, spec, per_layer_middle):
    # tiny-random: 2 layers of q (64x64), k and v (32x64), up (128x64), down (64x128); LoRA is (d_in + d_out) r
    lora = 2 * R * ((64 + 64) + 2 * (64 + 32) + 2 * (64 + 128))
    expected = lora + 2 * 5 * per_layer_middle
    assert expected_parameters(base, spec, r=R) == expected
    assert trainable_parameters(adapted(base, spec)) == expected


@pytest.mark.parametrize("spec", ["moslora:bias=true", "linchain:bias=true,widths=8-16-8"])
def test_bias_adapter_refuses_merge_and_export_in_one_line(base, ids, trained, spec, tmp_path):
    model = trained.get(spec) or train_steps(adapted(base, spec), ids)
    before = logits(model, ids)
    for action in (lambda: copy.deepcopy(model).merge_and_unload(), lambda: model.merge_adapter(),
                   lambda: export_lora(model, tmp_path / "export")):
        with pytest.raises(UserError, match="bias=true cannot be") as err:
            action()
        assert "\n" not in str(err.value)
    assert torch.equal(logits(model, ids), before)  # a refused merge leaves the adapter as it was
    assert not (tmp_path / "export").exists()


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments", "ignore:Found missing adapter keys")
@pytest.mark.integration
def test_bias_adapter_trains_saves_reloads_and_evaluates(base, ids, tmp_path, data_dir):
    from harness.evaluate import evaluate
    from harness.models import load_model

    model = adapted(base, "linchain:bias=true")
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if "middle_bias" in n}
    assert len(biases) == 2 * 5 * 3  # one per chain matrix of every adapted layer
    result = _harness_train(model.to(base.device), steps=6)
    assert result.final_loss < result.losses[0][1]
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], b) for n, b in biases.items())
    model.save_pretrained(tmp_path)
    reloaded = load_adapter_model(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    _, tokenizer = load_model("tiny-random")
    evaluation = evaluate(reloaded, tokenizer, ["arithmetic_add_sub"], data_dir, limit=2)
    assert len(evaluation.samples["arithmetic_add_sub"]) == 2


def test_match_picks_the_rank_of_the_nearest_parameter_count(base):
    from harness.adapters import resolve_match

    # tiny-random: LoRA costs 1408 parameters per unit of rank (2 layers, d_in + d_out summed over q,k,v,up,down);
    # LinChain 8-16-8 has 8 x 1408 + 10 layers x (16x8 + 8x16) = 13824: r = 10 gives 14080 (256 off), r = 9 12672.
    spec = resolve_match(parse_spec("lora:match=linchain:r=8,widths=8-16-8"), base)
    assert spec.r == 10 and spec.label == "lora-r10-match-linchain-8-16-8"
    assert expected_parameters(base, spec) == 14080
    assert trainable_parameters(adapted(base, "lora:match=linchain:r=8,widths=8-16-8")) == 14080
    # MoSLoRA at r = 16 costs 16 x 1408 + 10 x 256 = 25088 = 17.8 x 1408: r = 18 (25344, 256 off; r = 17 is 1152 off)
    assert resolve_match(parse_spec("lora:match=moslora:r=16"), base).r == 18
    # CondLoRA at r = 8 has 8 x 704 (one map pair per module type) = 4 x 1408 exactly
    assert resolve_match(parse_spec("lora:match=condlora:r=8"), base).r == 4
    # a canonical string names the rank; it must be the one match chooses
    assert resolve_match(parse_spec(spec.canonical()), base) == spec
    with pytest.raises(UserError, match="gives r=9, but match=linchain-8-16-8 chooses r=10"):
        resolve_match(parse_spec("lora:r=9,match=linchain:r=8,widths=8-16-8"), base)


def test_run_plan_labels_a_matched_lora_with_its_rank(base):
    from harness.config import RunConfig
    from harness.run import plan_methods

    cfg = RunConfig(methods=["lora", "lora:match=linchain:r=8,widths=8-16-8", "moslora:freeze_middle=true"], rank=8)
    assert [p.label for p in plan_methods(cfg)] == ["lora", "lora-match-linchain-8-16-8", "moslora-frozen"]
    planned = plan_methods(cfg, base)
    assert [p.label for p in planned] == ["lora", "lora-r10-match-linchain-8-16-8", "moslora-frozen"]
    assert planned[1].spec.r == 10


@pytest.mark.parametrize("text,problem", [
    ("mtlora:bias=true", "unknown option 'bias' for mtlora"),
    ("lora:freeze_middle=true", "unknown option 'freeze_middle' for lora"),
    ("moslora:freeze_middle=yes", "freeze_middle must be true or false"),
    ("linchain:bias=1", "bias must be true or false"),
    ("condlora:form=square", "unknown CondLoRA form 'square'"),
    ("lora:match=lora:match=moslora", "match takes a spec without a match of its own"),
    ("lora:match=foo", "unknown adapter method 'foo'"),
    ("moslora:match=lora", "unknown option 'match' for moslora"),
])
def test_bad_new_options_fail_with_one_clear_line(text, problem):
    with pytest.raises(UserError, match=problem) as err:
        parse_spec(text)
    assert "\n" not in str(err.value)


def test_condlora_authors_form_on_a_non_square_layer_names_it(base):
    from peft.tuners.lora import LoraLayer

    model = copy.deepcopy(base)
    with pytest.raises(UserError, match=r"form=authors needs square layers, but model\.layers\.0\.self_attn\.k_proj "
                                        r"is 32x64") as err:
        get_adapter_model(model, "condlora:form=authors", r=R)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_command_line_help_shows_every_method_option(capsys):
    from harness.adapters.__main__ import main
    from harness.adapters.spec import METHOD_OPTIONS

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    for method, options in METHOD_OPTIONS.items():
        line = next(line for line in shown.splitlines() if line.strip().startswith(f"{method}:"))
        assert all(f"{key}=" in line for key in options), line
    assert "[default rowspace]" in shown and "lora:match=linchain:r=8,widths=8-16-8" in shown


def test_parameter_formula_refuses_a_target_the_model_lacks(base):
    with pytest.raises(UserError, match="target module 'nope_proj' not found"):
        expected_parameters(base, "lora:targets=q_proj+nope_proj")


def test_command_line_describes_a_matched_lora(capsys):
    from harness.adapters.__main__ import main

    assert main(["lora:match=linchain:r=8,widths=8-16-8", "--model", "tiny-random"]) == 0
    out = capsys.readouterr().out
    assert "lora-r10-match-linchain-8-16-8" in out and "trainable parameters  14,080" in out


@pytest.mark.parametrize("spec", ["linchain:init=orthogonal", "moslora:init=orthogonal",
                                  "mtlora:structure=ctcm,init=orthogonal", "linchain:init=kaiming",
                                  "linchain:init=identity"])
def test_every_init_builds_on_a_bf16_base_as_on_fp32(spec):
    """A bf16 run builds its adapter on the bf16 base (torch's QR has no bf16 CPU kernel): the middle matrices
    are the fp32 build's, rounded to bf16, and an orthogonal one is orthogonal up to that rounding."""
    base = tiny_random_model()
    full = adapted(base, spec)
    half = adapted(base.to(torch.bfloat16), spec)
    middles = {n: p for n, p in full.named_parameters() if ".middle_" in n}
    assert middles
    for name, p in half.named_parameters():
        if name in middles:
            rounded = middles[name].detach().to(torch.bfloat16).to(p.dtype)
            if "kaiming" in spec:  # drawn in the factor's dtype: a bf16 draw, not the fp32 one rounded
                assert p.shape == rounded.shape and torch.isfinite(p).all()
                continue
            assert torch.equal(p.detach(), rounded), name
            if "orthogonal" in spec:
                m = p.detach().double()
                gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
                assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=3e-2), name
