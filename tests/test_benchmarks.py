"""The benchmark scripts still run: each on the tiny random model, as its docstring's quick check says.

They measure and do not assert, so nothing else tests them; an import that moved or a renamed
option would otherwise surface only when someone needs the figures.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from harness.models import bf16_is_fast

ROOT = Path(__file__).resolve().parents[1]

QUICK = {
    "bench_throughput.py": ["--model", "tiny-random", "--rounds", "1", "--timing-steps", "2", "--steps", "3",
                            "--limit", "4", "--eval-batch-sizes", "8"],
    "bench_diagnostics.py": ["--model", "tiny-random", "--methods", "lora,linchain", "--steps", "2",
                             "--lanczos-iters", "1"],
    "bench_adapters.py": ["--model", "tiny-random", "--rounds", "1"],
    "bench_eval.py": ["--model", "tiny-random", "--items", "4"],
    "bench_ablations.py": ["--models", "tiny-random", "--throughput-seeds", "1", "--limit", "2", "--steps", "1"],
    "bench_trial_overhead.py": ["--model", "tiny-random", "--rounds", "1", "--steps", "1", "--limit", "2"],
    "bench_kernels.py": ["--model", "tiny-random", "--seeds", "1", "--steps", "3", "--batch-size", "2"],
}


@pytest.mark.integration
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_kernel_probe_gives_the_first_step_loss_a_real_run_records(tmp_path, grad_accum):
    """bench_kernels stops harness.run at its first loss: the value must be what a full run records as step 1's
    loss (the same data, batch order and precision), for two seeds that see different first batches."""
    from benchmarks.bench_kernels import first_step_losses
    from harness.config import RunConfig
    from harness.run import run

    cfg = RunConfig(methods=["lora"], model="tiny-random", max_steps=3, batch_size=2, grad_accum=grad_accum, limit=1,
                    tasks=["arithmetic_add_sub"], diagnostics="none", output_dir=str(tmp_path / "r"),
                    tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    probed = first_step_losses(cfg, [1, 2])
    for seed in (1, 2):
        outcome = run(dataclasses.replace(cfg, seeds=[seed]), write_results=False, evaluate_base=False,
                      progress=False, log=lambda *a, **k: None)
        step, loss = outcome.results[0].loss_curve[0]
        assert step == 1 and probed[seed] == pytest.approx(loss, rel=1e-6)
    assert probed[1] != probed[2]


def test_every_benchmark_has_a_quick_check():
    assert sorted(QUICK) == sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("script", sorted(QUICK))
def test_benchmark_runs_as_a_module_and_explains_itself(script, monkeypatch, capsys):
    """``python -m benchmarks.bench_X --help`` prints the usage and exits 0 (in process: the imports are paid once)."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    saved_env = dict(os.environ)
    try:
        with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
            runpy.run_module(f"benchmarks.{script.removesuffix('.py')}", run_name="__main__", alter_sys=True)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.integration
@pytest.mark.parametrize("script", sorted(QUICK))
def test_benchmark_runs_on_the_tiny_model(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{script.removesuffix('.py')}", *QUICK[script]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if script == "bench_throughput.py" and not bf16_is_fast("cpu"):
        # it measures bf16 against fp32: on a CPU without fast bf16 it must refuse in one line, not a traceback
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
            line for line in done.stderr.splitlines() if line.strip()], done.stderr[-3000:]
        assert "no fast bf16" in done.stderr
        return
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.strip(), "a benchmark that prints nothing measured nothing"


@pytest.mark.integration
def test_throughput_conditions_measure_selected_logits_alone_against_the_first(tmp_path):
    """--conditions bf16,bf16-logits times only those two, interleaved, with the ratio to the first."""
    if not bf16_is_fast("cpu"):
        pytest.skip("measures bf16 conditions: this CPU has no fast bf16 (the refusal is tested above)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    base = [sys.executable, "-m", "benchmarks.bench_throughput", "--model", "tiny-random", "--rounds", "2",
            "--timing-steps", "2", "--training-only"]
    done = subprocess.run([*base, "--conditions", "bf16,bf16-logits"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = [line.split()[2] for line in done.stdout.splitlines() if line.strip().startswith("round ")]
    assert rounds == ["bf16", "bf16-logits", "bf16-logits", "bf16"]  # both measured each round, order rotated
    assert "train bf16-logits/bf16 x" in done.stdout.splitlines()[-1]
    bad = subprocess.run([*base, "--conditions", "bf16,fast"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "--conditions needs two or more different names" in bad.stderr


def test_the_overhead_benchmarks_evaluation_clock_puts_the_method_back(monkeypatch):
    """EvalClock times TaskSuite.evaluate only while entered: the process's suites are plain again after it."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.bench_trial_overhead import EvalClock
    from harness.evaluate import TaskSuite

    original = TaskSuite.evaluate
    calls = []
    clock = EvalClock()  # built before someone else's patch: it must put back what is there when entered
    monkeypatch.setattr(TaskSuite, "evaluate", lambda suite, *a, **k: calls.append(a) or time.sleep(0.05) or "scores")
    replaced = TaskSuite.evaluate
    with clock:
        assert TaskSuite.evaluate is not replaced
        assert TaskSuite.evaluate(object(), 1) == "scores" and calls == [(1,)]
        assert 0.05 <= clock.seconds < 5  # the time inside the method it wraps
    assert TaskSuite.evaluate is replaced and original is not replaced
