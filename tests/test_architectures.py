"""Every method on every tiny architecture: build on the default targets, train, merge, export, reload.

One matrix (architecture x method) over the tiny random models of harness.models.TINY_MODELS, so a
method that breaks on QK-norm, one KV head, a head dimension that is not hidden / heads, a fused
projection or GPT-2's Conv1D shows up as one failing cell. The slow part (a whole ``harness.run``
per architecture) is marked integration.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from harness.adapters import get_adapter_model, load_adapter_model, save_adapter
from harness.adapters.api import export_lora, target_layers
from harness.adapters.spec import METHODS
from harness.errors import UserError
from harness.models import ARCHITECTURES, TINY_MODELS, architecture_of, tiny_random_model

ARCHS = sorted(TINY_MODELS)  # tiny-random (Llama), -qwen3, -gemma3, -mistral, -phi3, -gpt2, -gptneox
R, ALPHA = 4, 8
# float32 on CPU: merging reorders the sums of W0 x + s B A x, so logits agree to rounding, not bitwise.
TOL = dict(rtol=1e-4, atol=1e-5)
# Methods whose adapter is not a plain LoRA on the unmodified base: what export_lora says instead.
EXPORT_REFUSES = {"dora": "has a magnitude vector (lora_magnitude_vector)"}
# Methods that cannot apply to an architecture: what get_adapter_model says instead of building.
BUILD_REFUSES = {("tiny-random-gpt2", "olora"): "olora cannot adapt transformer.h.0.attn.c_attn, a Conv1D layer"}


def test_the_matrix_covers_every_method_and_architecture():
    assert {TINY_MODELS[a] for a in ARCHS} == {"llama", "qwen3", "gemma3", "mistral", "phi3", "gpt2", "gptneox"}
    assert len(METHODS) == 9 and set(EXPORT_REFUSES) <= set(METHODS)
    assert {m for _, m in BUILD_REFUSES} <= set(METHODS) and {a for a, _ in BUILD_REFUSES} <= set(ARCHS)


@pytest.fixture(scope="module")
def bases():
    return {name: tiny_random_model(seed=0, architecture=TINY_MODELS[name]) for name in ARCHS}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_method_on_architecture(bases, ids, arch, method, tmp_path):
    base = bases[arch]
    _, spec_arch = architecture_of(base)
    torch.manual_seed(0)
    if (arch, method) in BUILD_REFUSES:  # one line naming the layer and the reason, before peft touches the model
        untouched = copy.deepcopy(base)
        with pytest.raises(UserError) as refused:
            get_adapter_model(untouched, method, r=R, alpha=ALPHA)
        message = str(refused.value)
        assert "\n" not in message and BUILD_REFUSES[(arch, method)] in message
        assert logits(untouched, ids).equal(logits(base, ids))
        return
    model = get_adapter_model(copy.deepcopy(base), method, r=R, alpha=ALPHA)

    # Built on the architecture's default targets: every default names layers, and those layers are adapted.
    from peft.tuners.lora import LoraLayer

    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    expected = {n for layers in target_layers(base, spec_arch.default_targets).values() for n, _ in layers}
    assert expected and adapted == expected

    # A few training steps change the adapter (B leaves zero, so every factor matters afterwards).
    before = adapter_state(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = adapter_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    unmerged = logits(model, ids)
    assert not torch.allclose(unmerged, logits(base, ids), **TOL)  # the adapter does something

    # Merged logits equal unmerged, and the merged model is the base architecture again.
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged) is type(base)
    assert torch.allclose(logits(merged, ids), unmerged, **TOL)

    # Export to a plain LoRA that vanilla peft loads to the same logits, or a one-line refusal naming the layer.
    from peft import PeftModel

    if method in EXPORT_REFUSES:
        with pytest.raises(UserError) as refused:
            export_lora(model, tmp_path / "plain")
        message = str(refused.value)
        assert "\n" not in message and EXPORT_REFUSES[method] in message
        assert any(name in message for name in expected)  # names the layer
        assert not (tmp_path / "plain").exists()
    else:
        export_lora(model, tmp_path / "plain")
        plain = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "plain"))
        assert type(plain.peft_config["default"]).__name__ == "LoraConfig"
        assert torch.allclose(logits(plain, ids), unmerged, **TOL)

    # Save and reload round-trip as the method, exactly.
    folder = save_adapter(model, tmp_path / "saved")
    reloaded = load_adapter_model(copy.deepcopy(base), folder)
    assert torch.equal(logits(reloaded, ids), unmerged)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_adapters_command_shows_the_default_targets(arch, capsys):
    from harness.adapters.__main__ import main

    assert main(["lora", "--model", arch]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("targets"))
    model_type = tiny_random_model(architecture=TINY_MODELS[arch]).config.model_type
    assert ", ".join(ARCHITECTURES[model_type].default_targets) in line and repr(model_type) in line


def test_fused_projections_are_adapted_as_one_layer():
    """On Phi-3 and GPT-2 the defaults name the fused module (q, k and v in one output), so one LoRA
    update spans all three: docs/architectures.md. Its B has the fused width (q + k + v rows)."""
    phi3 = tiny_random_model(architecture="phi3")
    cfg = phi3.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    fused_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim
    model = get_adapter_model(phi3, "lora", r=R, alpha=ALPHA)
    layer = model.base_model.model.model.layers[0].self_attn.qkv_proj
    assert layer.lora_B["default"].weight.shape == (fused_rows, R)
    assert ARCHITECTURES["phi3"].fused["qkv_proj"] == ("q", "k", "v")
    assert ARCHITECTURES["gpt2"].fused["c_attn"] == ("q", "k", "v")


def test_gpt_neox_fused_projection_is_interleaved_per_head_and_adapted_as_one_layer():
    """GPT-NeoX's query_key_value holds q, k, v per head ([head][q, k, v][head_dim] rows): one LoRA update
    on it still shares A across q, k and v, and the q rows of head h are rows 3 h d .. 3 h d + d of B A
    (docs/architectures.md). Checked against the attention's own split of the fused output."""
    neox = tiny_random_model(architecture="gptneox")
    cfg = neox.config
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    model = get_adapter_model(copy.deepcopy(neox), "lora", r=R, alpha=ALPHA)
    layer = model.base_model.model.gpt_neox.layers[0].attention.query_key_value
    assert layer.lora_A["default"].weight.shape == (R, cfg.hidden_size)
    assert layer.lora_B["default"].weight.shape == (3 * cfg.hidden_size, R)
    # The attention's own q (captured where it enters the rotary embedding, in a real forward) is, for head h,
    # rows [3 h d, 3 h d + d) of the fused projection applied to the layer's input.
    import transformers.models.gpt_neox.modeling_gpt_neox as neox_module

    seen = {}
    rotary = neox_module.apply_rotary_pos_emb

    def capture(q, k, *args, **kwargs):
        seen.setdefault("q", q.detach().clone())
        return rotary(q, k, *args, **kwargs)

    fused = neox.gpt_neox.layers[0].attention.query_key_value
    inputs = {}
    hook = fused.register_forward_pre_hook(lambda module, args: inputs.setdefault("x", args[0].detach().clone()))
    neox_module.apply_rotary_pos_emb = capture
    try:
        with torch.no_grad():
            neox(torch.tensor([[5, 6, 7]]))
    finally:
        neox_module.apply_rotary_pos_emb = rotary
        hook.remove()
    rows = torch.cat([torch.arange(3 * h * d, 3 * h * d + d) for h in range(heads)])
    with torch.no_grad():
        q_rows = inputs["x"] @ fused.weight[rows].T + fused.bias[rows]  # (1, 3, heads * d)
    assert torch.allclose(seen["q"], q_rows.view(1, 3, heads, d).transpose(1, 2), atol=1e-6)
    assert ARCHITECTURES["gpt_neox"].default_targets == ("query_key_value", "dense_h_to_4h", "dense_4h_to_h")


# ----------------------------------------------------------------------------------------------------------
# The selected-logits path


def test_selected_logits_types_are_the_table_entries_flagged_for_it():
    from harness.train import SELECTED_LOGITS_MODEL_TYPES

    assert set(SELECTED_LOGITS_MODEL_TYPES) == {t for t, a in ARCHITECTURES.items() if a.selected_logits}
    assert {"llama", "qwen3", "gemma3_text", "mistral", "phi3", "gpt2", "gpt_neox"} <= set(SELECTED_LOGITS_MODEL_TYPES)


@pytest.mark.parametrize("arch", ARCHS)
def test_selected_logits_loss_equals_the_models_own_loss(arch):
    """The loss from logits at the labelled positions only equals the model's full-logits loss, per
    architecture (Gemma 3's soft-capping is element-wise, so it commutes with selecting positions)."""
    from harness.train import causal_lm_loss, selected_logits_head

    model = tiny_random_model(architecture=TINY_MODELS[arch])
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :6] = -100  # a masked prompt, as the training data has
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    head = selected_logits_head(model)
    assert head is model.get_output_embeddings()
    with torch.no_grad():
        full = causal_lm_loss(model, batch, None)
        selected = causal_lm_loss(model, batch, head)
    assert torch.allclose(selected, full, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before training

SMOKE = ["--max-steps", "2", "--limit", "4", "--batch-size", "4", "--eval-batch-size", "8",
         "--tasks", "arithmetic_add_sub"]


def run_args(tmp_path, *extra):
    return [*SMOKE, "--output-dir", str(tmp_path / "results"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]


@pytest.mark.parametrize("args,message", [
    (["--model", "no-such-model"], "cannot load model 'no-such-model'"),
    (["--model", "nobody/no-such-model"], "cannot load model 'nobody/no-such-model'"),
    (["--model", "tiny-random-falcon"], "unknown tiny model 'tiny-random-falcon'"),
    (["--model", "tiny-random-gpt2", "--targets", "q_proj"],
     "target module 'q_proj' not found in the model (gpt2); its linear layers are: c_attn, c_fc, c_proj"),
    (["--model", "tiny-random-phi3", "--targets", "q_proj,v_proj"],
     "target module 'q_proj' not found in the model (phi3); its linear layers are: down_proj, gate_up_proj, "
     "lm_head, o_proj, qkv_proj"),
    (["--model", "tiny-random-gptneox", "--targets", "q_proj"],
     "target module 'q_proj' not found in the model (gpt_neox); its linear layers are: dense, dense_4h_to_h, "
     "dense_h_to_4h, lm_head, query_key_value"),
    (["--model", "tiny-random-gpt2", "--methods", "lora,olora"],
     "olora cannot adapt transformer.h.0.attn.c_attn, a Conv1D layer"),
    (["--model", "tiny-random-gpt2", "--methods", "lora,condlora:form=authors"],
     "condlora:form=authors needs square layers, but transformer.h.0.attn.c_attn is 192x64"),
    (["--model", "tiny-random-qwen3", "--methods", "condlora:form=authors,targets=q_proj+k_proj"],
     "condlora:form=authors needs square layers, but model.layers.0.self_attn.q_proj is 96x64"),
])
def test_bad_input_is_one_line_exit_2_before_training(tmp_path, monkeypatch, capsys, args, message):
    import harness.train
    from harness.run import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(harness.train, "train", no_training)
    assert main(run_args(tmp_path, *args)) == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


# ----------------------------------------------------------------------------------------------------------
# The whole run, per architecture (slow)


@pytest.mark.integration
@pytest.mark.parametrize("arch", ARCHS)
def test_harness_run_on_architecture(arch, tmp_path):
    """A whole run (train, evaluate, results) of LoRA and LinChain on the architecture, as a user starts it."""
    import subprocess
    import sys

    import pandas as pd

    done = subprocess.run([sys.executable, "-m", "harness.run", "--model", arch, "--methods", "lora,linchain:n=2",
                           "--rank", "4", "--run-name", "arch", *run_args(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # this checkout
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "arch" / "summary.csv")
    assert list(table["method"]) == ["base", "lora", "linchain-2"]
    assert (table.loc[1:, "trainable_params"] > 0).all()
