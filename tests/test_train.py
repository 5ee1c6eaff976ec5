"""The training loop: reproducible, same data order for every method, stops on a non-finite loss."""

from __future__ import annotations


import pytest
import torch

from harness.adapters import get_adapter_model
from harness.models import tiny_random_model
from harness.train import NonFiniteLoss, TrainSettings, batch_order, total_steps, train


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


def run(spec, examples, seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    model = get_adapter_model(tiny_random_model().to(device), spec, r=4)
    settings = TrainSettings(**{"lr": 1e-2, "batch_size": 4, "max_steps": 6, "seed": seed, **kw})
    return model, train(model, examples, stack, settings, progress=False)


def test_same_seed_gives_the_same_losses_on_cpu(examples):
    _, a = run("linchain", examples)
    _, b = run("linchain", examples)
    assert a.losses == b.losses and a.steps == 6
    _, c = run("linchain", examples, seed=1)
    assert c.losses != a.losses


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", ["lora", "linchain", "mtlora:structure=icfm", "condlora"])
def test_training_lowers_the_loss_on_every_device(examples, spec, device):
    """One batch seen 20 times: every method fits it (on a GPU, under the bf16 autocast of training)."""
    model, result = run(spec, examples[:4], device=device, max_steps=20, lr=2e-2)
    losses = [loss for _, loss in result.losses]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.25, losses
    assert all(p.device.type == device for p in model.parameters())


def test_every_method_sees_the_same_batches_in_the_same_order(examples):
    # at step 1 B = 0 for every method, so the first loss is the base model's loss on the first batch
    first = {spec: run(spec, examples, max_steps=1)[1].losses[0][1] for spec in ["lora", "moslora", "condlora"]}
    assert len(set(first.values())) == 1


def test_batch_order_covers_the_data_before_repeating():
    batches = batch_order(10, 5, 4, seed=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and len(flat) == 20


def test_warmup_then_decay_and_gradient_accumulation(examples):
    _, result = run("lora", examples, max_steps=10, warmup_ratio=0.3, grad_accum=2)
    lrs = [lr for _, lr in result.learning_rates]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-2) and lrs[-1] < max(lrs)
    assert result.tokens == 10 * 2 * 4 * 12  # steps x accumulation x batch x tokens
    assert total_steps(100, TrainSettings(max_steps=None, epochs=2, batch_size=8, grad_accum=2)) == 13


def test_non_finite_loss_stops_training_with_a_clear_message(examples):
    torch.manual_seed(0)
    model = get_adapter_model(tiny_random_model(), "lora", r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "down_proj.lora_" in name:
                p.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 1"):
        train(model, examples, stack, TrainSettings(batch_size=4, max_steps=3), progress=False)
