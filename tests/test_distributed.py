"""Data parallelism under torchrun, on the CPU (gloo): two ranks train exactly as one process that
accumulates two micro-batches, and only rank 0 evaluates, tracks and writes results."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

ARGS = ["--model", "tiny-random", "--methods", "lora,linchain:n=2", "--run-name", "ddp", "--batch-size", "2",
        "--max-steps", "11", "--lr", "1e-2", "--limit", "4", "--eval-batch-size", "8", "--tasks", "arithmetic_add_sub"]


def _run(tmp_path, launcher, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*ARGS, "--output-dir", str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            *extra]
    return subprocess.run([*launcher, "-m", "harness.run", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def two_ranks_and_one(tmp_path_factory):
    ddp = tmp_path_factory.mktemp("ddp")
    single = tmp_path_factory.mktemp("single")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done_ddp = _run(ddp, torchrun, "--grad-accum", "1")
    done_single = _run(single, [sys.executable], "--grad-accum", "2")
    return (ddp, done_ddp), (single, done_single)


@pytest.mark.integration
def test_two_ranks_write_one_set_of_results_and_one_mlflow_run(two_ranks_and_one, mlflow_runs_of):
    (ddp, done), _ = two_ranks_and_one
    assert done.returncode == 0, done.stderr[-4000:]
    assert [p.name for p in (ddp / "results").iterdir()] == ["ddp"]  # not one folder per rank
    assert "2 ranks" in done.stdout
    runs = mlflow_runs_of(ddp)
    parents = runs[runs["tags.mlflow.runName"] == "ddp"]
    assert len(parents) == 1 and parents["status"].iloc[0] == "FINISHED"
    children = runs[runs["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]]
    assert sorted(children["tags.mlflow.runName"]) == ["base", "linchain-2-seed0", "lora-seed0"]
    assert len(runs) == 4  # nothing from rank 1


@pytest.mark.integration
def test_two_ranks_train_exactly_as_one_process_accumulating_two_micro_batches(two_ranks_and_one, mlflow_runs_of):
    """Same batches, gradients averaged over ranks = over accumulated micro-batches: the same adapter."""
    from safetensors.torch import load_file

    (ddp, done_ddp), (single, done_single) = two_ranks_and_one
    assert done_ddp.returncode == 0, done_ddp.stderr[-4000:]
    assert done_single.returncode == 0, done_single.stderr[-4000:]
    for name in ["lora-seed0", "linchain-2-seed0"]:
        a = load_file(ddp / "results" / "ddp" / "adapters" / name / "adapter_model.safetensors")
        b = load_file(single / "results" / "ddp" / "adapters" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        init = {k: v for k, v in a.items() if "lora_B" in k}
        assert any(v.abs().sum() > 0 for v in init.values()), "training did not move B"
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), (name, key)
    runs_ddp, runs_single = mlflow_runs_of(ddp), mlflow_runs_of(single)
    for name in ["lora-seed0", "linchain-2-seed0"]:
        loss_ddp = runs_ddp[runs_ddp["tags.mlflow.runName"] == name]["metrics.final_train_loss"].iloc[0]
        loss_single = runs_single[runs_single["tags.mlflow.runName"] == name]["metrics.final_train_loss"].iloc[0]
        assert loss_ddp == pytest.approx(loss_single, rel=1e-5)


@pytest.mark.integration
def test_the_step_direction_cosine_is_withheld_under_torchrun(two_ranks_and_one, mlflow_runs_of):
    """Rank 0 holds only its own micro-batches' full-weight gradient, not the all-reduced one the optimizer stepped
    with: its cosine would be another quantity, so none is recorded (one process records it at step 10)."""
    (ddp, done_ddp), (single, done_single) = two_ranks_and_one
    assert done_ddp.returncode == 0 and done_single.returncode == 0, (done_ddp.stderr[-2000:], done_single.stderr[-2000:])
    mine, theirs = mlflow_runs_of(single), mlflow_runs_of(ddp)
    for name in ["lora-seed0", "linchain-2-seed0"]:
        one, two = mine[mine["tags.mlflow.runName"] == name], theirs[theirs["tags.mlflow.runName"] == name]
        assert len(one) == 1 and len(two) == 1
        assert math.isfinite(one["metrics.diag/alignment"].iloc[0])
        assert "metrics.diag/alignment" not in two or two["metrics.diag/alignment"].isna().all()
        assert math.isfinite(two["metrics.diag/effective_rank"].iloc[0])  # the other diagnostics are still there


@pytest.mark.parametrize("raw", ["ten", "0", "-5", "inf"])
def test_a_bad_timeout_fails_with_a_clear_message(monkeypatch, raw):
    from harness import distributed
    from harness.errors import UserError

    monkeypatch.setenv("HARNESS_DIST_TIMEOUT_MIN", raw)
    with pytest.raises(UserError, match="HARNESS_DIST_TIMEOUT_MIN"):
        distributed._timeout_minutes()


def test_without_torchrun_nothing_is_distributed(monkeypatch):
    from harness import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    assert distributed.mean_over_ranks(torch.tensor(2.5), ctx) == 2.5
