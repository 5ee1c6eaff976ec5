"""The training loop: reproducible, same data order for every method, stops on a non-finite loss;
gradient norms, the loss on selected logits, length-grouped batches and bf16 training."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch

from harness.adapters import get_adapter_model, load_adapter_model, resolve_spec, save_adapter
from harness.config import RunConfig
from harness.data.tokenize import IGNORE_INDEX, collate
from harness.models import tiny_random_model
from harness.train import (NonFiniteLoss, TrainSettings, batch_order, causal_lm_loss, parameter_group,
                           selected_logits_head, total_steps, train)


def stack(batch):
    return {k: torch.stack([x[k] for x in batch]) for k in batch[0]}


@pytest.fixture(scope="module")
def examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(24):
        ids = torch.randint(3, 250, (12,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(12, dtype=torch.long)})
    return out


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def settings_of(seed=0, **kw) -> TrainSettings:
    """The settings harness.run trains with under RunConfig's defaults, with the test's values replaced."""
    return dataclasses.replace(TrainSettings.from_config(RunConfig(), None, seed), **kw)


def run(spec, examples, seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    model = get_adapter_model(tiny_random_model().to(device), spec, r=4)
    collate_fn = kw.pop("collate", stack)
    settings = settings_of(seed, **{"lr": 1e-2, "batch_size": 4, "max_steps": 6, "precision": "fp32", **kw})
    return model, train(model, examples, collate_fn, settings, progress=False)


@pytest.mark.integration
def test_same_seed_gives_the_same_losses_on_cpu(examples):
    _, a = run("linchain", examples)
    _, b = run("linchain", examples)
    assert a.losses == b.losses and a.steps == 6
    _, c = run("linchain", examples, seed=1)
    assert c.losses != a.losses


@pytest.mark.integration
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", ["lora", "linchain", "mtlora:structure=icfm", "condlora"])
def test_training_lowers_the_loss_on_every_device(examples, spec, device):
    """One batch seen 20 times: every method fits it (under bf16 autocast where the hardware has it)."""
    model, result = run(spec, examples[:4], device=device, max_steps=20, lr=2e-2, precision="auto")
    losses = [loss for _, loss in result.losses]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.25, losses
    assert all(p.device.type == device for p in model.parameters())


def test_every_method_sees_the_same_batches_in_the_same_order(examples):
    # at step 1 B = 0 for every method, so the first loss is the base model's loss on the first batch
    first = {spec: run(spec, examples, max_steps=1)[1].losses[0][1] for spec in ["lora", "moslora", "condlora"]}
    assert len(set(first.values())) == 1


def test_train_settings_come_from_the_run_configuration_alone():
    """TrainSettings has no defaults of its own: a default can only live in RunConfig."""
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(TrainSettings))
    with pytest.raises(TypeError):
        TrainSettings()  # type: ignore[call-arg]
    cfg = RunConfig(lr=3e-3, batch_size=5, grad_accum=3, max_steps=7, epochs=2.5, warmup_ratio=0.2,
                    weight_decay=0.01, max_grad_norm=0.5, precision="fp32")
    settings = TrainSettings.from_config(cfg, resolve_spec("lora"), seed=4)
    shared = [f.name for f in dataclasses.fields(TrainSettings) if f.name in {g.name for g in dataclasses.fields(cfg)}]
    assert len(shared) == 9 and all(getattr(settings, name) == getattr(cfg, name) for name in shared), shared
    assert settings.seed == 4 and settings.length_window > 1 and settings.selected_logits
    assert TrainSettings.from_config(cfg, resolve_spec("linchain:lr=5e-4"), seed=0).lr == 5e-4  # the spec wins
    assert TrainSettings.from_config(RunConfig(), None, seed=0).max_steps == RunConfig().max_steps


def test_batch_order_covers_the_data_before_repeating():
    batches = batch_order(10, 5, 4, seed=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and len(flat) == 20


@pytest.mark.integration
def test_warmup_then_decay_and_gradient_accumulation(examples):
    _, result = run("lora", examples, max_steps=10, warmup_ratio=0.3, grad_accum=2)
    lrs = [lr for _, lr in result.learning_rates]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-2) and lrs[-1] < max(lrs)
    assert result.tokens == 10 * 2 * 4 * 12  # steps x accumulation x batch x tokens
    assert total_steps(100, settings_of(max_steps=None, epochs=2, batch_size=8, grad_accum=2)) == 13


def test_non_finite_loss_stops_training_with_a_clear_message(examples):
    torch.manual_seed(0)
    model = get_adapter_model(tiny_random_model(), "lora", r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "down_proj.lora_" in name:
                p.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 1"):
        train(model, examples, stack, settings_of(batch_size=4, max_steps=3), progress=False)


# ---------------------------------------------------------------------------------------------------------
# Gradient norms


def test_parameter_groups_follow_the_parameter_names():
    assert parameter_group("base_model.model.layers.0.q_proj.lora_cond.default.0") == "cond"
    assert parameter_group("base_model.model.layers.0.q_proj.lora_A.default.middle_0") == "middle"
    assert parameter_group("base_model.model.layers.0.q_proj.lora_B.default.weight") == "B"
    assert parameter_group("base_model.model.layers.0.q_proj.lora_A.default.weight") == "A"
    assert parameter_group("base_model.model.lm_head.weight") == "other"


def hand_norms(model, batch):
    """Gradient norms of one fresh backward pass, computed here parameter by parameter."""
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    squares: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            group = ("cond" if "lora_cond" in name else "middle" if "middle" in name
                     else "B" if "lora_B" in name else "A" if "lora_A" in name else "other")
            squares[group] = squares.get(group, 0.0) + float(p.grad.double().pow(2).sum())
    model.zero_grad(set_to_none=True)
    return math.sqrt(sum(squares.values())), {g: math.sqrt(v) for g, v in squares.items()}


@pytest.mark.parametrize("spec", ["lora", "linchain", "condlora"])
def test_gradient_norms_are_recorded_before_clipping_per_group(examples, spec):
    torch.manual_seed(0)
    fresh = get_adapter_model(tiny_random_model(), spec, r=4)
    first = stack([examples[i] for i in batch_order(len(examples), 3, 4, seed=0,
                                                      lengths=[12] * len(examples))[0]])
    fresh.train()
    total, groups = hand_norms(fresh, first)
    _, result = run(spec, examples, max_steps=3, max_grad_norm=1e-4)  # every step clipped
    assert [s for s, _ in result.grad_norms] == [1, 2, 3] and len(result.group_grad_norms) == 3
    assert result.grad_norms[0][1] == pytest.approx(total, rel=1e-4)
    step_groups = result.group_grad_norms[0][1]
    assert set(step_groups) == set(groups)
    for group, norm in groups.items():
        assert step_groups[group] == pytest.approx(norm, rel=1e-4, abs=1e-9), group
    for (_, norm), (_, per_group) in zip(result.grad_norms, result.group_grad_norms):
        assert norm == pytest.approx(math.sqrt(sum(v * v for v in per_group.values())), rel=1e-6)
    assert result.clipped_fraction == 1.0


def test_lora_a_gets_no_gradient_at_the_first_step_and_clipping_is_counted(examples):
    """B starts at zero, so dL/dA = 0 at step 1; a threshold above every norm clips nothing."""
    _, result = run("lora", examples, max_steps=4, max_grad_norm=1e6)
    assert result.group_grad_norms[0][1]["A"] == 0.0 and result.group_grad_norms[0][1]["B"] > 0
    assert result.clipped_fraction == 0.0
    median = sorted(n for _, n in result.grad_norms)[1]
    _, half = run("lora", examples, max_steps=4, max_grad_norm=median + 1e-9)
    # clipping changes later norms, so count against the run's own record
    assert half.clipped_fraction == sum(n > median + 1e-9 for _, n in half.grad_norms) / 4


# ---------------------------------------------------------------------------------------------------------
# The loss on selected logits


def labelled_batch(prompt_masked: bool):
    """Three right-padded sequences of different lengths; with ``prompt_masked`` the first tokens carry -100."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for length, prompt in ((14, 6), (10, 4), (7, 5)):
        ids = torch.randint(3, 250, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:] if prompt_masked else list(ids)
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * length})
    return collate(rows, pad_token_id=2)


def reference_loss(model, batch):
    """transformers' causal-LM loss written out: logits everywhere, shift, mean over labelled tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets,
                                             ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("prompt_masked", [True, False])
@pytest.mark.parametrize("spec", ["lora", "linchain"])
def test_selected_logits_give_the_same_loss_and_gradients(spec, prompt_masked):
    torch.manual_seed(0)
    model = get_adapter_model(tiny_random_model(), spec, r=4)
    with torch.no_grad():  # a non-zero B, so that every adapter parameter gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    batch = labelled_batch(prompt_masked)
    head = selected_logits_head(model)
    assert head is model.get_base_model().lm_head

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads(lambda: reference_loss(model, batch))
    head_rows = []
    hook = head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].numel() // args[0].shape[-1]))
    new_loss, new_grads = loss_and_grads(lambda: causal_lm_loss(model, batch, head))
    hook.remove()
    assert head_rows == [int((batch["labels"][:, 1:] != -100).sum())]  # the head ran at the labelled positions only
    assert new_loss == pytest.approx(ref_loss, rel=1e-6)
    assert any(g.abs().sum() > 0 for g in ref_grads.values())
    for name, grad in ref_grads.items():
        torch.testing.assert_close(new_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_models_outside_the_checked_families_take_the_full_path():
    from transformers import OPTConfig, OPTForCausalLM

    from harness.models import ARCHITECTURES

    # OPT is not in harness.models.ARCHITECTURES (GPT-2 and GPT-NeoX now are: tests/test_architectures.py)
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, ffn_dim=32,
                                   word_embed_proj_dim=16, vocab_size=260, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=2)).eval()
    assert opt.config.model_type not in ARCHITECTURES
    assert selected_logits_head(opt) is None
    batch = labelled_batch(prompt_masked=True)
    assert causal_lm_loss(opt, batch, None).item() == pytest.approx(reference_loss(opt, batch).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Batches grouped by length


def test_length_grouping_keeps_every_example_and_cuts_padding():
    lengths = [int(x) for x in torch.randint(5, 60, (50,), generator=torch.Generator().manual_seed(3))]
    plain = batch_order(50, 40, 5, seed=7)
    grouped = batch_order(50, 40, 5, seed=7, lengths=lengths, window=8)
    assert Counter(i for b in grouped for i in b) == Counter(i for b in plain for i in b)  # same use of every example
    assert all(len(b) == 5 for b in grouped)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < 0.8 * padded(plain)
    # regrouping stays within windows of 8 micro-batches of the seeded order
    for start in range(0, 40, 8):
        window = slice(start, start + 8)
        assert sorted(i for b in grouped[window] for i in b) == sorted(i for b in plain[window] for i in b)


def test_length_grouping_depends_on_the_seed_and_the_data_only():
    lengths = [i % 13 for i in range(30)]
    a = batch_order(30, 12, 4, seed=0, lengths=lengths)
    assert a == batch_order(30, 12, 4, seed=0, lengths=list(lengths))
    assert a != batch_order(30, 12, 4, seed=1, lengths=lengths)
    assert batch_order(30, 12, 4, seed=0, lengths=lengths, window=1) == batch_order(30, 12, 4, seed=0)


@pytest.mark.integration
def test_every_method_trains_on_the_same_length_grouped_batches():
    g = torch.Generator().manual_seed(5)
    varied = []
    for i in range(24):
        ids = torch.randint(3, 250, (4 + (i * 7) % 17,), generator=g).tolist()
        varied.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)})
    seen: dict[str, list] = {}
    for spec in ("lora", "linchain", "condlora"):
        batches = seen.setdefault(spec, [])

        def recording(rows, batches=batches):
            batches.append([tuple(r["input_ids"]) for r in rows])
            return collate(rows, pad_token_id=2)

        run(spec, varied, max_steps=5, collate=recording)
    assert seen["lora"] == seen["linchain"] == seen["condlora"] and len(seen["lora"]) == 5


# ---------------------------------------------------------------------------------------------------------
# bf16


@pytest.mark.integration
def test_bf16_training_keeps_the_adapter_fp32_and_it_merges_exactly_onto_the_fp32_base(examples, tmp_path,
                                                                                         monkeypatch):
    from harness import models

    monkeypatch.setattr(models, "bf16_is_fast", lambda device: True)  # bf16 runs on any CPU, fast or not
    torch.manual_seed(0)
    model = get_adapter_model(tiny_random_model().to(models.storage_dtype("bf16")), "linchain", r=4)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    _, fp32 = run("linchain", examples, max_steps=1)
    config = model.get_base_model().config
    seen = []
    model.get_base_model().model.register_forward_pre_hook(lambda m, a: seen.append(config._attn_implementation))
    result = train(model, examples, stack, settings_of(lr=1e-2, batch_size=4, max_steps=6, precision="bf16"),
                   progress=False)
    assert result.precision == "bf16" and all(math.isfinite(loss) for _, loss in result.losses)
    # bf16 training on CPU runs eager attention (SDPA's backward is slow there); evaluation gets SDPA back
    assert seen and set(seen) == {"eager"} and config._attn_implementation == "sdpa"
    assert result.losses[0][1] == pytest.approx(fp32.losses[0][1], rel=2e-2)  # B = 0: the base's loss, in bf16
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())

    loaded = load_adapter_model(tiny_random_model(), save_adapter(model, tmp_path / "adapter"))
    for name, p in loaded.named_parameters():
        if name in trained:
            assert p.dtype == torch.float32 and torch.equal(p, trained[name]), name  # saved as trained, in fp32
    assert sum(name in trained for name, _ in loaded.named_parameters()) == len(trained)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = loaded(input_ids=ids).logits
        merged_model = loaded.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    assert all(p.dtype == torch.float32 for p in merged_model.parameters())
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_a_run_logs_gradient_norms_clipping_and_precision_to_mlflow(tmp_path, mlflow_runs_of):
    import mlflow

    from harness.config import config_from_args
    from harness.run import run as run_job

    cfg = config_from_args(["--model", "tiny-random", "--methods", "lora", "--max-steps", "3", "--limit", "1",
                            "--batch-size", "4", "--tasks", "arithmetic_add_sub", "--precision", "fp32",
                            "--max-grad-norm", "1e-6", "--output-dir", str(tmp_path / "results"),
                            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    run_job(cfg, progress=False, evaluate_base=False, log=lambda *a, **k: None)
    runs = mlflow_runs_of(tmp_path)
    lora = runs[runs["tags.mlflow.runName"] == "lora-seed0"].iloc[0]
    assert lora["metrics.clipped_fraction"] == 1.0 and lora["params.resolved_precision"] == "fp32"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(lora["run_id"], "grad_norm")
    assert sorted(m.step for m in history) == [1, 2, 3] and all(m.value > 1e-6 for m in history)
    assert "- **precision**: fp32" in next((tmp_path / "results").glob("*/summary.md")).read_text()
